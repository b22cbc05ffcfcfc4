"""The TorchTitan v0.2.2 config sections savepoint has no counterpart for, so that its TOML files load.

Names, types and defaults are TorchTitan's. Most of these keys are refused with one line when set to
a value other than the default (``savepoint.config.unsupported``); the string under each field says
what it does or why it may be left as any value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Profiling:
    enable_profiling: bool = False
    """Run torch.profiler during training (not supported yet)."""

    save_traces_folder: str = "profile_traces"
    """Profiler trace folder inside --job.dump_folder; read only with profiling on."""

    profile_freq: int = 10
    """Steps between profiled windows; read only with profiling on."""

    profiler_active: int = 1
    """Steps each profiled window records; read only with profiling on."""

    profiler_warmup: int = 3
    """Warm-up steps before each profiled window; read only with profiling on."""

    enable_memory_snapshot: bool = False
    """Dump CUDA memory snapshots (not supported yet)."""

    save_memory_snapshot_folder: str = "memory_snapshot"
    """Memory snapshot folder; read only with memory snapshots on."""


@dataclass
class DataLoader:
    num_workers: int = 0
    """Data-loading worker processes; savepoint loads in the training process (0)."""

    persistent_workers: bool = False
    """Keep data-loading workers between epochs (needs workers; not supported yet)."""

    pin_memory: bool = False
    """Copy batches to pinned memory (not supported yet)."""

    prefetch_factor: int | None = None
    """Batches each worker loads ahead (needs workers; not supported yet)."""


@dataclass
class Float8Linear:
    enable_fsdp_float8_all_gather: bool = False
    """FSDP all-gathers float8 weights; read only with the float8 converter (--model.converters)."""

    precompute_float8_dynamic_scale_for_fsdp: bool = False
    """Precompute float8 scales for FSDP; read only with the float8 converter."""

    recipe_name: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"] | None = None
    """Float8 scaling recipe; read only with the float8 converter."""

    filter_fqns: list[str] = field(default_factory=list)
    """Linear modules left in high precision; read only with the float8 converter."""

    emulate: bool = False
    """Emulate float8 matmuls; read only with the float8 converter."""


@dataclass
class MXLinear:
    mxfp8_dim1_cast_kernel_choice: Literal["triton", "cuda", "torch"] = "triton"
    """MX cast kernel; read only with the mx converter (--model.converters)."""

    recipe_name: str = "mxfp8_cublas"
    """MX recipe; read only with the mx converter."""

    filter_fqns: list[str] = field(default_factory=lambda: ["output"])
    """Linear modules left in high precision; read only with the mx converter."""


@dataclass
class Float8GroupedMM:
    fqns: list[str] | str = field(default_factory=list)
    """MoE modules whose grouped matmuls use float8; llama3 has none, read only with a converter."""


@dataclass
class MXGroupedMM:
    recipe_name: Literal["mxfp8"] = "mxfp8"
    """MX recipe for grouped matmuls; read only with a converter."""

    fqns: list[str] | str = field(default_factory=list)
    """MoE modules whose grouped matmuls use MX formats; llama3 has none, read only with a converter."""


@dataclass
class QuantizedLinear:
    float8: Float8Linear = field(default_factory=Float8Linear)
    """Float8 training of nn.Linear layers."""

    mx: MXLinear = field(default_factory=MXLinear)
    """MX-format training of nn.Linear layers."""


@dataclass
class QuantizedGroupedMM:
    float8: Float8GroupedMM = field(default_factory=Float8GroupedMM)
    """Float8 grouped matmuls (MoE)."""

    mx: MXGroupedMM = field(default_factory=MXGroupedMM)
    """MX-format grouped matmuls (MoE)."""


@dataclass
class Quantize:
    linear: QuantizedLinear = field(default_factory=QuantizedLinear)
    """Quantized training of nn.Linear layers."""

    grouped_mm: QuantizedGroupedMM = field(default_factory=QuantizedGroupedMM)
    """Quantized grouped matmuls."""


@dataclass
class MemoryEstimation:
    enable: bool = False
    """Estimate FSDP memory use before training (not supported yet)."""

    disable_fake_mode: bool = False
    """Estimate without FakeTensorMode; read only with the estimate on."""


@dataclass
class FaultTolerance:
    enable: bool = False
    """TorchFT fault-tolerant training (not supported yet)."""

    process_group: str = "gloo"
    """TorchFT process group; read only with fault tolerance on."""

    process_group_timeout_ms: int = 10000
    """TorchFT process-group timeout; read only with fault tolerance on."""

    replica_id: int = 0
    """TorchFT replica id; read only with fault tolerance on."""

    group_size: int = 0
    """TorchFT replica groups; read only with fault tolerance on."""

    min_replica_size: int = 1
    """TorchFT minimum replicas per step; read only with fault tolerance on."""

    semi_sync_method: str | None = None
    """TorchFT semi-synchronous method (local_sgd, diloco); read only with fault tolerance on."""


@dataclass
class Experimental:
    custom_import: str = ""
    """Module to import before training (not supported yet)."""

    custom_args_module: str = ""
    """Older spelling of --job.custom_config_module (not supported yet)."""


@dataclass
class Validation:
    enable: bool = False
    """Evaluate on a validation set during training (not supported yet)."""

    dataset: str = "c4_validation"
    """Validation dataset; read only with validation on."""

    dataset_path: str | None = None
    """Validation dataset files; read only with validation on."""

    local_batch_size: int = 8
    """Validation samples per rank; read only with validation on."""

    seq_len: int = 2048
    """Validation sequence length; read only with validation on."""

    freq: int = 10
    """Steps between validations; read only with validation on."""

    steps: int = -1
    """Validation steps, -1 for the whole set (> 0 or -1); read only with validation on."""

    dataloader: DataLoader = field(default_factory=DataLoader)
    """Validation data loading; read only with validation on."""


@dataclass
class Debug:
    seed: int | None = None
    """Seed for weight init and data order, 0 to 2**32 - 1; none: --training.seed (default 0). [training] seed is
    the same setting under its older name; setting both to different values is an error."""

    deterministic: bool = False
    """Use deterministic torch algorithms; [training] deterministic is the same setting."""

    deterministic_warn_only: bool = False
    """Warn instead of failing on ops without a deterministic kernel (not supported yet)."""

    moe_force_load_balance: bool = False
    """Round-robin tokens over MoE experts (llama3 has none; not supported)."""
