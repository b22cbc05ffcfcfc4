"""The job configuration: one dataclass per TOML table, named as in TorchTitan v0.2.x.

The string under each field is its documentation; ``--help`` prints it.
Defaults follow TorchTitan where TorchTitan has the option.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from savepoint.config.sections import (
    DataLoader,
    Debug,
    Experimental,
    FaultTolerance,
    MemoryEstimation,
    Profiling,
    Quantize,
    Validation,
)


@dataclass
class Job:
    config_file: str | None = None
    """TOML file to read before applying command-line overrides (also settable with CONFIG_FILE)."""

    dump_folder: str = "./outputs"
    """Folder for everything the job writes: checkpoints, metrics, logs."""

    description: str = "default job"
    """Free-text description of the job, logged at start."""

    print_config: bool = False
    """Log the resolved config (as TOML) when the job starts."""

    save_config_file: str | None = None
    """Also write the resolved config to this file in --job.dump_folder (not supported yet)."""

    custom_config_module: str = ""
    """A module extending the config with more sections (not supported yet)."""


@dataclass
class Model:
    name: str = "llama3"
    """Model family. Only 'llama3' exists."""

    flavor: str = "debugmodel"
    """Model size: debugmodel, 8B, 70B or 405B."""

    hf_assets_path: str | None = None
    """Folder with Hugging Face assets (config.json, tokenizer files, safetensors index)."""

    tokenizer_path: str | None = None
    """TorchTitan's deprecated tokenizer folder option (not supported yet); use --model.hf_assets_path."""

    converters: list[str] = field(default_factory=list)
    """Model converters applied before training, such as float8 or mx (torchao; not supported yet)."""

    print_after_conversion: bool = False
    """Print the model after its converters ran (not supported yet)."""


@dataclass
class Training:
    dataset: str = "pydocs"
    """Dataset name. 'pydocs' is the offline corpus shipped in savepoint/data/assets."""

    dataset_path: str | None = None
    """Where the dataset's files are (a file or folder); None: the dataset savepoint ships under that name."""

    local_batch_size: int = 8
    """Samples per data-parallel rank per step."""

    global_batch_size: int = -1
    """Samples per optimizer step over all data-parallel ranks; -1: local_batch_size x the data-parallel degree.
    A multiple of that product accumulates gradients over global / (local x dp) micro-steps."""

    seq_len: int = 2048
    """Tokens per sample; at most the flavor's context (debugmodel 2048, 8B/70B/405B 131072)."""

    max_norm: float = 1.0
    """Gradient clipping: maximum total L2 norm of the gradients. 0 disables clipping."""

    steps: int = 10000
    """Number of training steps; the job ends after this step."""

    seed: int = 0
    """Seed for weight init and data order, 0 to 2**32 - 1. Same seed, same run. Also spelt [debug] seed
    (TorchTitan's name)."""

    deterministic: bool = False
    """Use deterministic torch algorithms (slower on GPU; CPU is deterministic already). Also spelt [debug]
    deterministic."""

    mixed_precision_param: str = "bfloat16"
    """FSDP compute dtype of parameters on GPU: bfloat16 or float32 (CPU always computes in float32)."""

    mixed_precision_reduce: str = "float32"
    """FSDP gradient reduction dtype on GPU: float32 or bfloat16."""

    enable_cpu_offload: bool = False
    """FSDP offloads parameters, gradients and optimizer state to CPU (not supported yet)."""

    dtype: Literal["bfloat16", "float32"] = "float32"
    """Dtype of parameters, gradients and optimizer state: float32 (bfloat16 training is not supported yet)."""

    gc_freq: int = 50
    """Steps between Python garbage collections in TorchTitan; savepoint leaves Python's collector as it is, so
    any value is accepted and has no effect."""

    gc_debug: bool = False
    """Collect garbage every step to find reference cycles (not supported yet)."""

    dataloader: DataLoader = field(default_factory=DataLoader)
    """How batches are loaded ([training.dataloader])."""


@dataclass
class Optimizer:
    name: str = "AdamW"
    """Optimizer. Only 'AdamW' exists."""

    lr: float = 8e-4
    """Peak learning rate."""

    beta1: float = 0.9
    """AdamW beta1, in [0, 1)."""

    beta2: float = 0.95
    """AdamW beta2, in [0, 1)."""

    eps: float = 1e-8
    """AdamW epsilon, > 0."""

    weight_decay: float = 0.1
    """AdamW decoupled weight decay, >= 0."""

    implementation: str = "foreach"
    """AdamW kernel: 'for-loop', 'foreach' or 'fused'."""

    early_step_in_backward: bool = False
    """Step the optimizer inside backward (not supported yet)."""


@dataclass
class LRScheduler:
    warmup_steps: int = 200
    """Steps of linear warmup from near zero to the peak learning rate."""

    total_steps: int | None = None
    """Steps the schedule spans; none: --training.steps (other values are not supported yet)."""

    decay_ratio: float | None = None
    """Share of the steps spent decaying at the end; unset means decay through all steps after warmup."""

    decay_type: str = "linear"
    """Decay shape: 'linear', 'sqrt' or 'cosine'."""

    min_lr_factor: float = 0.0
    """Floor of the decay, as a fraction of the peak learning rate."""


@dataclass
class Checkpoint:
    enable: bool = False
    """Save and load checkpoints."""

    folder: str = "checkpoint"
    """Checkpoint folder, joined to --job.dump_folder (an absolute path replaces it)."""

    interval: int = 500
    """Save every this many steps (and always at the last step)."""

    initial_load_path: str | None = None
    """Checkpoint (a step folder) to start from when --checkpoint.folder holds no committed step."""

    initial_load_model_only: bool = True
    """Load only model weights from --checkpoint.initial_load_path."""

    initial_load_in_hf: bool = False
    """The initial load is a Hugging Face safetensors folder (needs --checkpoint.initial_load_model_only)."""

    initial_load_in_hf_quantized: bool = False
    """The Hugging Face initial load holds quantized weights to dequantize (not supported yet)."""

    last_save_model_only: bool = True
    """The final save holds only the model weights, cast to --checkpoint.export_dtype."""

    last_save_in_hf: bool = False
    """Write the final save as a Hugging Face safetensors folder (needs --checkpoint.last_save_model_only)."""

    export_dtype: str = "float32"
    """Dtype of floating tensors in the final model-only save: float32, bfloat16 or float16."""

    async_mode: str = "disabled"
    """How saves run: 'disabled' (synchronous), 'async' or 'async_with_pinned_mem'."""

    keep_latest_k: int = 10
    """Keep the newest k committed steps and delete older ones. 0 keeps all."""

    load_step: int = -1
    """Step to load; -1 loads the latest committed step."""

    exclude_from_loading: list[str] = field(default_factory=list)
    """State not restored on load: any of optimizer, lr_scheduler, dataloader, train_state."""

    enable_first_step_checkpoint: bool = False
    """Also save right after step 1, to check early that saving works."""

    enable_ft_dataloader_checkpoints: bool = True
    """TorchFT saves the data position; read only with --fault_tolerance.enable (savepoint always saves it)."""

    create_seed_checkpoint: bool = False
    """Write a model-only step-0 from a single-process CPU init, then exit."""

    load_only: bool = False
    """Load checkpoints but never save."""

    fail_on_corruption: bool = False
    """A corrupt latest step stops auto-resume with an error, instead of falling back to the previous step."""

    require_checksums: bool = False
    """Refuse to load a step without checksums (TorchTitan's), instead of loading it unverified with a warning."""

    preemption_grace_seconds: float = 60.0
    """After SIGTERM: finish the step, commit a checkpoint and exit 0; give up (exit 1) after this many seconds."""

    memory_interval: int = 0
    """Also save to node-local memory (--checkpoint.memory_folder) every this many steps, so a restarted process
    resumes from there; 0 turns the in-memory tier off. It never replaces the durable saves of --checkpoint.interval."""

    memory_folder: str = "/dev/shm/savepoint"
    """Where in-memory checkpoints live: a RAM-backed folder on each node (tmpfs), one subfolder per run and rank."""

    memory_keep_latest_k: int = 2
    """In-memory steps kept per rank (1 or more): with 2, a rank that died while writing its newest one still
    shares the one before with every other rank."""


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = 1
    """Replicated data-parallel degree (HSDP outer dimension)."""

    fsdp_reshard_after_forward: Literal["default", "always", "never"] = "default"
    """When FSDP frees gathered parameters after forward: 'default' (other policies are not supported yet)."""

    data_parallel_shard_degree: int = -1
    """Sharded data-parallel degree (FSDP); -1 fills what the other degrees leave."""

    tensor_parallel_degree: int = 1
    """Tensor-parallel degree."""

    disable_loss_parallel: bool = False
    """Turn off the loss computed on sharded logits under tensor parallelism (not supported yet)."""

    enable_async_tensor_parallel: bool = False
    """Overlap tensor-parallel communication with compute (needs torch.compile; not supported yet)."""

    pipeline_parallel_degree: int = 1
    """Pipeline-parallel degree: how many ranks the layers are split over (looped schedules give each several
    stages). 1 disables pipeline parallelism."""

    pipeline_parallel_schedule: str = "1F1B"
    """torch.distributed.pipelining schedule: single-stage GPipe or 1F1B (one stage per rank), looped
    Interleaved1F1B, LoopedBFS or InterleavedZeroBubble, V-shaped ZBVZeroBubble or DualPipeV (two stages per rank).
    Case-insensitive."""

    pipeline_parallel_microbatch_size: int = 1
    """Samples per pipeline microbatch; --training.local_batch_size must be a multiple of it."""

    pipeline_parallel_layers_per_stage: int | None = None
    """Layers per (virtual) stage, the embedding and the output counting as the two options below say: the
    stage count is ceil((layers + first + last) / this), which the PP degree must divide. None: one stage per
    rank for single-stage schedules, two for the others."""

    pipeline_parallel_first_stage_less_layers: int = 1
    """How many layers the embedding counts as, when stages share out the layers (the first stage gets fewer)."""

    pipeline_parallel_last_stage_less_layers: int = 1
    """How many layers the final norm and output count as (the last stage gets fewer)."""

    module_fqns_per_model_part: list[list[str]] | None = None
    """The modules of each model part (stage), in stage order, e.g. [["tok_embeddings", "layers.0"], ["layers.1",
    "norm", "output"]]: every module once, in model order; on the command line parts are separated by ';' and
    modules by ','. None: split evenly."""

    pipeline_parallel_schedule_csv: str | None = ""
    """Accepted for TorchTitan configs; a schedule CSV file is not supported yet (leave it empty)."""

    context_parallel_degree: int = 1
    """Context-parallel degree."""

    context_parallel_load_balancer: str | None = "headtail"
    """Context-parallel load balancer (headtail, ptrr or none; not empty); read only with context parallelism."""

    context_parallel_rotate_method: Literal["allgather", "alltoall"] = "allgather"
    """How context parallelism exchanges key/value shards; read only with context parallelism."""

    expert_parallel_degree: int = 1
    """Expert-parallel degree."""

    expert_tensor_parallel_degree: int = 1
    """Tensor-parallel degree of MoE experts (llama3 has none; values above 1 are not supported)."""

    expert_parallel_comm_backend: Literal["standard", "deepep"] = "standard"
    """Expert-parallel communication; read only with expert parallelism."""

    pipeline_parallel_expert_parallel_overlap: bool = True
    """Overlap expert- and pipeline-parallel communication (DualPipeV with experts); read only with expert
    parallelism."""


@dataclass
class Comm:
    backend: str = "auto"
    """Process-group backend: 'auto' (nccl when CUDA is available, else gloo), 'gloo' or 'nccl'."""

    init_timeout_seconds: int = 300
    """Seconds a collective of the training process group (joining it included) may wait before it fails."""

    train_timeout_seconds: int = 100
    """A tighter collective timeout after the first step (not supported yet: --comm.init_timeout_seconds applies
    throughout)."""

    trace_buf_size: int = 20000
    """Flight recorder ring buffer (entries). savepoint does not set up the flight recorder, so any value is
    accepted and has no effect."""

    save_traces_folder: str = "comm_traces"
    """Flight recorder trace folder; no effect (see --comm.trace_buf_size)."""

    save_traces_file_prefix: str = "rank_"
    """Flight recorder trace file prefix; no effect (see --comm.trace_buf_size)."""

    mode: Literal["default", "fake_backend", "local_tensor"] = "default"
    """'default': real communication (dry runs with a fake backend or local tensors are not supported yet)."""


@dataclass
class Metrics:
    log_freq: int = 10
    """Log the loss every this many steps (and at the last step)."""

    enable_tensorboard: bool = False
    """Write TensorBoard event files (loss, lr, grad norm, tokens/s, saves) under <dump_folder>/<save_tb_folder>."""

    save_tb_folder: str = "tb"
    """TensorBoard folder, inside --job.dump_folder."""

    save_for_all_ranks: bool = False
    """Every rank writes its own TensorBoard folder (default: rank 0 only)."""

    disable_color_printing: bool = False
    """Plain log lines, without terminal colors."""

    enable_wandb: bool = False
    """Log to Weights & Biases in offline mode (needs the wandb package)."""


@dataclass
class ActivationCheckpoint:
    mode: Literal["selective", "full", "memory_budget", "none"] = "selective"
    """Activation checkpointing: 'none', 'full' (recompute every block in backward) or 'selective'
    ('memory_budget' is not supported yet)."""

    selective_ac_option: str = "2"
    """With mode 'selective': an integer N (checkpoint every N-th block) or 'op' (save matmul outputs, recompute
    the rest)."""

    per_op_sac_force_recompute_mm_shapes_by_fqns: list[str] = field(default_factory=lambda: ["moe.router.gate"])
    """Linear modules whose matmul shapes op-level selective checkpointing always recomputes (not supported yet)."""

    early_stop: bool = False
    """Stop recomputing once every activation is back (not supported yet)."""

    memory_budget: float = 0.5
    """Compiler memory budget, 0 to 1; read only with mode 'memory_budget'."""

    visualize_memory_budget_pareto: bool = False
    """Draw the memory-budget trade-off (not supported yet)."""

    preserve_rng_state: bool = True
    """Restore the RNG state when recomputing (savepoint's blocks use no randomness; false is not supported
    yet)."""

    determinism_check: str = "default"
    """torch.utils.checkpoint's determinism check (not supported yet)."""

    debug: bool = False
    """torch.utils.checkpoint debug information (not supported yet)."""


@dataclass
class Compile:
    enable: bool = False
    """torch.compile each transformer block."""

    components: list[str] = field(default_factory=lambda: ["model", "loss"])
    """What to compile: 'model', 'loss'."""

    backend: str = "inductor"
    """torch.compile backend."""


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    parallelism: Parallelism = field(default_factory=Parallelism)
    comm: Comm = field(default_factory=Comm)
    metrics: Metrics = field(default_factory=Metrics)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    profiling: Profiling = field(default_factory=Profiling)
    quantize: Quantize = field(default_factory=Quantize)
    memory_estimation: MemoryEstimation = field(default_factory=MemoryEstimation)
    fault_tolerance: FaultTolerance = field(default_factory=FaultTolerance)
    experimental: Experimental = field(default_factory=Experimental)
    validation: Validation = field(default_factory=Validation)
    debug: Debug = field(default_factory=Debug)
