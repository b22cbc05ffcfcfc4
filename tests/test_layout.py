"""Resolving the [parallelism] degrees against the world size (torch-free, as `savepoint check` does it)."""

from __future__ import annotations

import pytest

from savepoint.errors import ConfigError, NotSupportedYet
from savepoint.job import layout_problems, resolve_parallel_dims
from savepoint.parallel_dims import ParallelDims
from tests.conftest import make_config


def dims(tmp_path, world_size: int, *overrides: str) -> ParallelDims:
    return resolve_parallel_dims(make_config(tmp_path, *overrides), world_size)


@pytest.mark.parametrize("world_size,overrides,expected", [
    (1, [], (1, 1, 1)),
    (2, [], (1, 2, 1)),  # dp_shard -1 fills the world: FSDP
    (2, ["--parallelism.tensor_parallel_degree", "2"], (1, 1, 2)),
    (2, ["--parallelism.data_parallel_replicate_degree", "2"], (2, 1, 1)),  # HSDP 2x1
    (4, ["--parallelism.data_parallel_replicate_degree", "2"], (2, 2, 1)),
    (8, ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.tensor_parallel_degree", "2"],
     (2, 2, 2)),
    (4, ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2"], (1, 2, 2)),
])
def test_degrees_resolve(tmp_path, world_size, overrides, expected):
    d = dims(tmp_path, world_size, *overrides)
    assert (d.dp_replicate, d.dp_shard, d.tp) == expected
    assert d.dp == expected[0] * expected[1] and d.world_size == world_size
    assert d.fsdp == (d.dp > 1)


def test_describe(tmp_path):
    assert dims(tmp_path, 1).describe() == "1 process"
    assert dims(tmp_path, 2).describe() == "FSDP 2"
    assert dims(tmp_path, 4, "--parallelism.data_parallel_replicate_degree", "2",
                "--parallelism.tensor_parallel_degree", "2").describe() == "HSDP 2x1 + TP 2"


def test_product_must_equal_world_size(tmp_path):
    with pytest.raises(ConfigError) as info:
        dims(tmp_path, 4, "--parallelism.data_parallel_shard_degree", "3")
    message = str(info.value)
    assert "multiply to 3" in message and "world size is 4" in message
    assert "--parallelism.data_parallel_shard_degree -1" in message  # the fix


def test_fill_needs_a_divisor(tmp_path):
    with pytest.raises(ConfigError, match=r"tensor_parallel_degree=2 = 2 does not divide the world size 3"):
        dims(tmp_path, 3, "--parallelism.tensor_parallel_degree", "2")


def test_tensor_parallel_must_divide_the_model(tmp_path):
    # debugmodel: 16 heads, 8 kv heads, hidden 768; seq_len 32 in the test config
    with pytest.raises(ConfigError) as info:
        dims(tmp_path, 3, "--parallelism.tensor_parallel_degree", "3")
    assert "n_heads=16" in str(info.value) and "n_kv_heads=8" in str(info.value)
    with pytest.raises(ConfigError, match="n_kv_heads=8"):
        dims(tmp_path, 16, "--parallelism.tensor_parallel_degree", "16")
    with pytest.raises(ConfigError, match="seq_len=30"):
        dims(tmp_path, 4, "--parallelism.tensor_parallel_degree", "4", "--training.seq_len", "30")


@pytest.mark.parametrize("degree", ["pipeline_parallel_degree", "context_parallel_degree", "expert_parallel_degree"])
def test_not_yet_supported(tmp_path, degree):
    with pytest.raises(NotSupportedYet, match=f"--parallelism.{degree}=2"):
        dims(tmp_path, 2, f"--parallelism.{degree}", "2")


def test_seed_checkpoint_rules(tmp_path):
    seed = ["--checkpoint.create_seed_checkpoint"]
    assert dims(tmp_path, 1, *seed).world_size == 1  # dp_shard -1 resolves to 1: allowed
    with pytest.raises(ConfigError, match="launch it with NGPU=1"):
        dims(tmp_path, 2, *seed)
    with pytest.raises(ConfigError, match="set --parallelism.data_parallel_shard_degree 1"):
        make_config(tmp_path, *seed, "--parallelism.data_parallel_shard_degree", "2")
    with pytest.raises(ConfigError, match="needs --checkpoint.enable"):
        make_config(tmp_path, *seed, "--checkpoint.no_enable")


def test_layout_problems_lists_instead_of_raising(tmp_path):
    cfg = make_config(tmp_path)
    assert layout_problems(cfg, 2) == []
    assert layout_problems(cfg, None) == []
    cfg.parallelism.data_parallel_shard_degree = 3
    assert len(layout_problems(cfg, 2)) == 1


def test_nccl_without_cuda_is_a_clear_error(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from savepoint.train import Trainer

    with pytest.raises(ConfigError, match="--comm.backend nccl needs CUDA"):
        Trainer(make_config(tmp_path, "--comm.backend", "nccl"))
    with pytest.raises(ConfigError, match="did you mean --comm.backend=gloo"):
        make_config(tmp_path, "--comm.backend", "glo")
