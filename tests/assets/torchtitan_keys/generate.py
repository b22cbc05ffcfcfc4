"""How ``step-3`` and ``expected.json`` were made: TorchTitan 0.2.2's own CheckpointManager, on CPU, 1 process.

Not run by the tests (TorchTitan is not a dependency). To regenerate::

    pip install --no-deps --target /tmp/tt torchtitan==0.2.2 tyro   # plus tyro's small dependencies
    PYTHONPATH=/tmp/tt python tests/assets/torchtitan_keys/generate.py /tmp/tt_run

then copy ``/tmp/tt_run/checkpoint/step-3`` here and the printed lrs into ``expected.json``.
Only the MoE Triton kernels are replaced (an import TorchTitan's optimizer pulls in; unused by a dense model).
"""

import json
import os
import sys
import types

kernels = types.ModuleType("torchtitan.models.moe.kernels")
kernels.generate_permute_indices = None
sys.modules["torchtitan.models.moe.kernels"] = kernels

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import IterableDataset  # noqa: E402
from torchtitan.components.checkpoint import CheckpointManager  # noqa: E402
from torchtitan.components.dataloader import ParallelAwareDataloader  # noqa: E402
from torchtitan.components.lr_scheduler import build_lr_schedulers  # noqa: E402
from torchtitan.components.optimizer import build_optimizers  # noqa: E402
from torchtitan.config import JobConfig  # noqa: E402
from torchtitan.distributed import ParallelDims  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))  # the repository
from savepoint.models.llama3 import ModelArgs, build_model  # noqa: E402


class Tokens(IterableDataset):
    """Random token windows of 9 (8 inputs, 8 labels), with TorchTitan's Stateful dataset methods."""

    def __init__(self):
        self.i = 0

    def __iter__(self):
        while True:
            self.i += 1
            x = torch.randint(0, 32, (9,), generator=torch.Generator().manual_seed(self.i))
            yield x[:-1], x[1:]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


class TrainState:
    """What torchtitan/train.py's Trainer saves as "train_state"."""

    step = 0
    ntokens_seen = 0

    def state_dict(self):
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, state):
        self.step, self.ntokens_seen = state["step"], state["ntokens_seen"]


def main(out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = JobConfig()
    cfg.optimizer.lr = 1e-3
    cfg.lr_scheduler.warmup_steps = 2
    cfg.lr_scheduler.decay_ratio = 0.8
    cfg.checkpoint.enable = True
    cfg.checkpoint.folder = "checkpoint"
    cfg.checkpoint.interval = 3
    cfg.checkpoint.last_save_model_only = False
    model = build_model(ModelArgs(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=32, max_seq_len=16),
                        seed=0)
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    optimizers = build_optimizers([model], cfg.optimizer, dims)
    schedulers = build_lr_schedulers(optimizers, cfg.lr_scheduler, 10)
    loader = ParallelAwareDataloader(Tokens(), dp_rank=0, dp_world_size=1, batch_size=2)
    train_state = TrainState()
    ckpt = CheckpointManager(dataloader=loader, model_parts=[model], optimizers=optimizers,
                             lr_schedulers=schedulers, states={"train_state": train_state},
                             checkpoint_config=cfg.checkpoint, sd_adapter=None, base_folder=out)
    batches, lrs = iter(loader), {}
    for step in range(1, 7):  # saved after step 3; the lrs of steps 4-6 are what a resume must reproduce
        x, y = next(batches)
        train_state.step, train_state.ntokens_seen = step, train_state.ntokens_seen + y.numel()
        lrs[step] = optimizers.optimizers[0].param_groups[0]["lr"]
        optimizers.zero_grad()
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        optimizers.step()
        schedulers.step()
        if step == 3:
            ckpt.save(step, last_step=False)
    ckpt.close()
    print(json.dumps({"lr_per_step": lrs, "ntokens_seen_at_3": 3 * 2 * 8}))


if __name__ == "__main__":
    main(sys.argv[1])
