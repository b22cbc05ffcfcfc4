"""Resolving the [parallelism] degrees against the world size (torch-free, as `savepoint check` does it)."""

from __future__ import annotations

import re

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


@pytest.mark.parametrize("degree", ["context_parallel_degree", "expert_parallel_degree"])
def test_not_yet_supported(tmp_path, degree):
    with pytest.raises(NotSupportedYet, match=f"--parallelism.{degree}=2"):
        dims(tmp_path, 2, f"--parallelism.{degree}", "2")


PP = "--parallelism.pipeline_parallel_degree"


@pytest.mark.parametrize("world_size,overrides,expected", [
    (2, [PP, "2"], (2, 1, 1, 1)),
    (4, [PP, "2"], (2, 1, 2, 1)),  # dp_shard -1 takes what PP leaves: PP 2 x FSDP 2
    (4, [PP, "2", "--parallelism.tensor_parallel_degree", "2"], (2, 1, 1, 2)),
    (8, [PP, "2", "--parallelism.data_parallel_replicate_degree", "2"], (2, 2, 2, 1)),
    (4, [PP, "4", "--training.local_batch_size", "4"], (4, 1, 1, 1)),
])
def test_pipeline_degree_resolves(tmp_path, world_size, overrides, expected):
    d = dims(tmp_path, world_size, *overrides)
    assert (d.pp, d.dp_replicate, d.dp_shard, d.tp) == expected
    assert d.pp * d.dp * d.tp == world_size
    assert d.describe().startswith(f"PP {expected[0]}")


def test_pipeline_degree_must_fit_the_world(tmp_path):
    with pytest.raises(ConfigError, match=r"pipeline_parallel_degree=3 x .* = 3 does not divide the world size 4"):
        dims(tmp_path, 4, PP, "3", "--training.local_batch_size", "3")
    with pytest.raises(ConfigError, match=r"multiply to 4 \(pipeline_parallel_degree=2 x .*world size is 2"):
        dims(tmp_path, 2, PP, "2", "--parallelism.data_parallel_shard_degree", "2")


# Configs that parse (each PP value is fine on its own) but whose pipeline cannot run the debug model
# (6 layers) with this batch at PP degree 2: (mutation of cfg.parallelism / cfg.training, words of the problem).
PIPELINE_MISFITS = [
    ({"pipeline_parallel_microbatch_size": 3}, "--training.local_batch_size=2 is not divisible by "
     "--parallelism.pipeline_parallel_microbatch_size=3"),
    ({"local_batch_size": 1}, "gives 1 microbatch(es), but --parallelism.pipeline_parallel_schedule=1F1B needs at "
     "least one per stage (2)"),
    ({"pipeline_parallel_schedule": "Interleaved1F1B", "local_batch_size": 5},
     "gives 5 microbatch(es), but --parallelism.pipeline_parallel_schedule=Interleaved1F1B runs them in rounds of 2"),
    ({"pipeline_parallel_schedule": "DualPipeV", "local_batch_size": 3}, "needs at least one per stage (4 stages)"),
    ({"pipeline_parallel_schedule": "Interleaved1F1B", "pipeline_parallel_layers_per_stage": 4},
     "pipeline_parallel_layers_per_stage=4 gives 2 stage(s) for 6 layers, 1 per PP rank, but Interleaved1F1B runs "
     "several stages per rank"),
    ({"pipeline_parallel_layers_per_stage": 3}, "gives 3 stage(s) for 6 layers, which "
     "--parallelism.pipeline_parallel_degree=2 does not divide"),
    ({"pipeline_parallel_layers_per_stage": 1}, "gives 8 stage(s) for 6 layers, 4 per PP rank, but 1F1B runs one "
     "stage per rank"),
    ({"module_fqns_per_model_part": [["tok_embeddings", "layers.0", "layers.1", "layers.2"],
                                     ["layers.3", "layers.4", "layers.5", "norm", "output"]],
      "pipeline_parallel_layers_per_stage": 5}, "both say how stages split the model; set only one"),
    ({"pipeline_parallel_first_stage_less_layers": 8}, "pipeline_parallel_first_stage_less_layers=8 is more than the "
     "7 layer(s) each of the 2 stages holds"),
    ({"pipeline_parallel_schedule": "GPipee"}, "is not a pipeline schedule (did you mean GPipe?)"),
]


@pytest.mark.parametrize("change,words", PIPELINE_MISFITS, ids=[str(sorted(c)) for c, _ in PIPELINE_MISFITS])
def test_pipeline_misfits_are_layout_problems(tmp_path, change, words):
    cfg = make_config(tmp_path, PP, "2")
    assert layout_problems(cfg, 2) == []
    for key, value in change.items():
        setattr(cfg.training if key == "local_batch_size" else cfg.parallelism, key, value)
    problems = layout_problems(cfg, 2)
    assert len(problems) == 1 and words in problems[0], problems
    assert layout_problems(cfg, None) == problems  # without a world size, the pipeline is still checked
    with pytest.raises(ConfigError, match=re.escape(words)):
        resolve_parallel_dims(cfg, 2)


def test_pipeline_misfits_are_config_errors_too(tmp_path):
    """``parse_args`` checks the pipeline the config asks for, so ``savepoint check`` without a world size does."""
    with pytest.raises(ConfigError) as info:
        make_config(tmp_path, PP, "8", "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B")
    assert info.value.problems == [
        "Interleaved1F1B at --parallelism.pipeline_parallel_degree=8 uses 16 stage(s): 16 stages is more than the "
        "model's 6 layers plus --parallelism.pipeline_parallel_first_stage_less_layers=1 and "
        "--parallelism.pipeline_parallel_last_stage_less_layers=1 (8 in all); lower "
        "--parallelism.pipeline_parallel_degree or use 1F1B (one stage per rank)"]
    # A bad value is reported once, by the config's own check, not again as a pipeline that cannot run.
    with pytest.raises(ConfigError) as info:
        make_config(tmp_path, PP, "2", "--parallelism.pipeline_parallel_microbatch_size", "0")
    assert len(info.value.problems) == 1 and "must be >= 1, got 0" in info.value.problems[0]
    with pytest.raises(ConfigError) as info:
        make_config(tmp_path, PP, "2", "--parallelism.pipeline_parallel_schedule", "DualPipe")
    assert len(info.value.problems) == 1 and "did you mean DualPipeV?" in info.value.problems[0]


def test_pipeline_degree_one_ignores_the_pipeline_options(tmp_path):
    """As in TorchTitan, the PP options only matter when the PP degree is above 1."""
    cfg = make_config(tmp_path, "--parallelism.pipeline_parallel_microbatch_size", "3",
                      "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B")
    assert layout_problems(cfg, 2) == [] and dims(tmp_path, 2).pp == 1


def test_seed_checkpoint_rules(tmp_path):
    seed = ["--checkpoint.create_seed_checkpoint"]
    assert dims(tmp_path, 1, *seed).world_size == 1  # dp_shard -1 resolves to 1: allowed
    with pytest.raises(ConfigError, match="launch it with NGPU=1"):
        dims(tmp_path, 2, *seed)
    with pytest.raises(ConfigError, match="set --parallelism.data_parallel_shard_degree 1"):
        make_config(tmp_path, *seed, "--parallelism.data_parallel_shard_degree", "2")
    with pytest.raises(ConfigError, match="needs --checkpoint.enable"):
        make_config(tmp_path, *seed, "--checkpoint.no_enable")
    with pytest.raises(ConfigError, match="set --parallelism.pipeline_parallel_degree 1 \\(got 2\\)"):
        make_config(tmp_path, *seed, PP, "2")


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
