"""State adapters: what each training component contributes to a checkpoint, and how it is restored.

Keys follow TorchTitan v0.2.x. Model parameters go flat at the top level; the optimizer is
flattened and keyed by parameter FQN (``optimizer.state.<fqn>.exp_avg``), so the layout does not
depend on parameter order or on how the model is sharded.

A checkpoint may be damaged or foreign (a step without checksums, or one whose manifest was
rewritten to match), so every value a component restores is checked for type and range first:
``check_state_dict`` raises :class:`LoadedValueError` naming the key, and ``load_state_dict``
changes nothing before its check passed. :class:`StagedLoad` goes one further for a whole load:
every component is checked before any is changed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from savepoint.errors import CorruptCheckpointError
from savepoint.values import LoadedValueError, check_count, check_real, check_rng_state, check_type, show_value

MODEL = "model"
OPTIMIZER = "optimizer"
LR_SCHEDULER = "lr_scheduler"
DATALOADER = "dataloader"
TRAIN_STATE = "train_state"
# Components a user may leave out of a load with --checkpoint.exclude_from_loading.
EXCLUDABLE = (OPTIMIZER, LR_SCHEDULER, DATALOADER, TRAIN_STATE)


class ModelState:
    """The model's tensors under their FQNs, ready to sit flat at the top of a checkpoint."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=True))


# AdamW hyperparameters in a param group: key -> check of the loaded value.
_GROUP_CHECKS: dict[str, Callable[[str, Any], object]] = {
    "lr": lambda k, v: check_real(k, v, 0.0),
    "initial_lr": lambda k, v: check_real(k, v, 0.0),
    "eps": lambda k, v: check_real(k, v, 0.0, low_open=True),
    "weight_decay": lambda k, v: check_real(k, v, 0.0),
}
_GROUP_SWITCHES = ("amsgrad", "maximize", "capturable", "differentiable", "decoupled_weight_decay")
_GROUP_OPTIONAL_SWITCHES = ("foreach", "fused")


def _check_betas(key: str, value: Any) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise LoadedValueError(key, value, "a pair of numbers in [0, 1)")
    for i, beta in enumerate(value):
        check_real(f"{key}[{i}]", beta, 0.0, 1.0, high_open=True)


class OptimizerState(Stateful):
    """AdamW state flattened to ``state.<fqn>.<name>`` and ``param_groups.<fqn>.<key>``."""

    options = StateDictOptions(flatten_optimizer_state_dict=True)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer, options=self.options)

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Hyperparameters numeric and in range (lr, betas, eps, weight_decay), switches bool, steps counts.

        Raises:
            LoadedValueError: naming the first bad key.
        """
        for key, value in state_dict.items():
            name = key.rsplit(".", 1)[-1]
            if key.startswith("param_groups."):
                if name in _GROUP_CHECKS:
                    _GROUP_CHECKS[name](key, value)
                elif name == "betas":
                    _check_betas(key, value)
                elif name in _GROUP_SWITCHES and not isinstance(value, bool):
                    raise LoadedValueError(key, value, "true or false")
                elif name in _GROUP_OPTIONAL_SWITCHES and not (value is None or isinstance(value, bool)):
                    raise LoadedValueError(key, value, "true, false or None")
                elif not (value is None or isinstance(value, (bool, int, float, str))):
                    raise LoadedValueError(key, value, "a plain number, string or switch")
            elif key.startswith("state.") and name == "step":
                check_real(key, value, 0.0)  # AdamW keeps its step as a float tensor
            elif key.startswith("state.") and not isinstance(value, torch.Tensor):
                raise LoadedValueError(key, value, "a tensor")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_state_dict(state_dict)
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=self.options)


# The scheduler entries TorchTitan v0.2.2 saves and asks for on load (``LRSchedulersContainer.state_dict``
# is its first LambdaLR's ``state_dict()``; the ``lr_lambdas`` of its ``functools.partial`` schedule is
# ``[{}]``, which DCP stores as no entry at all).
TITAN_LR_SCHEDULER_KEYS = ("base_lrs", "last_epoch", "_step_count", "_last_lr", "_is_initial",
                           "_get_lr_called_within_step")


class LRSchedulerState(Stateful):
    """The scheduler's counters under TorchTitan's names; the schedule itself comes from the config.

    Saved: every key of ``LambdaLR.state_dict()`` except ``lr_lambdas`` (``TITAN_LR_SCHEDULER_KEYS``
    on the torch versions savepoint supports), so TorchTitan's loader finds each entry it asks for,
    and savepoint loads TorchTitan's entries as they are. Older savepoint checkpoints also hold
    ``lr_lambdas`` (``[None]``); it is no longer asked for, since the schedule function never comes
    from a checkpoint.
    """

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler):
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        state = self.scheduler.state_dict()
        state.pop("lr_lambdas", None)
        return state

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Counters are counts, learning rates finite and >= 0 (one per param group), nothing else is code.

        ``LRScheduler.load_state_dict`` copies every key into the scheduler's ``__dict__``, so only
        the keys this scheduler saves are accepted, each with the type it saves.

        Raises:
            LoadedValueError: naming the first bad key.
        """
        ours = self.scheduler.state_dict()
        groups = len(self.scheduler.optimizer.param_groups)
        for key, value in state_dict.items():
            if key not in ours:
                raise LoadedValueError(key, value, f"absent (this scheduler saves only {sorted(self.state_dict())})")
            if key in ("last_epoch", "_step_count"):
                check_count(key, value)
            elif key in ("base_lrs", "_last_lr"):
                if not isinstance(value, list) or len(value) != groups:
                    raise LoadedValueError(key, value, f"a list of {groups} learning rate(s)")
                for i, lr in enumerate(value):
                    check_real(f"{key}[{i}]", lr, 0.0)
            elif key == "lr_lambdas":
                # None per plain function (older savepoint steps), {} per functools.partial (TorchTitan's);
                # anything in a dict would be copied into the schedule function's attributes.
                plain = isinstance(value, list) and all(v is None or (isinstance(v, dict) and not v) for v in value)
                if not plain or len(value) != groups:
                    raise LoadedValueError(key, value, f"a list of {groups} None or {{}} (the schedule comes from "
                                           "the config)")
            else:
                check_type(key, value, ours[key])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_state_dict(state_dict)
        state = dict(state_dict)
        lambdas = getattr(self.scheduler, "lr_lambdas", None)
        if lambdas is not None:  # LambdaLR's load needs the entry; None leaves this run's schedule as it is
            state["lr_lambdas"] = [None] * len(lambdas)
        self.scheduler.load_state_dict(state)


class TrainState(Stateful):
    """Step, tokens seen, and the RNG states that make resume bit-exact."""

    def __init__(self) -> None:
        self.step = 0
        self.ntokens_seen = 0

    def state_dict(self) -> dict[str, Any]:
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        return {"step": self.step, "ntokens_seen": self.ntokens_seen, "rng_state": rng}

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Step and tokens are counts >= 0; each RNG state has torch's type, dtype and size.

        A step beyond ``--training.steps`` is fine (there is nothing left to train).

        Raises:
            LoadedValueError: naming the first bad key.
        """
        check_count("step", state_dict.get("step"))
        check_count("ntokens_seen", state_dict.get("ntokens_seen"))
        rng = state_dict.get("rng_state") or {}  # TorchTitan checkpoints carry no RNG state
        if not isinstance(rng, dict):
            raise LoadedValueError("rng_state", rng, "a dict of RNG states")
        if "cpu" in rng:
            check_rng_state("rng_state.cpu", rng["cpu"], torch.get_rng_state(), torch.Generator())
        if "cuda" in rng and torch.cuda.is_available():
            check_rng_state("rng_state.cuda", rng["cuda"], torch.cuda.get_rng_state(), None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_state_dict(state_dict)
        self.step = check_count("step", state_dict["step"])
        self.ntokens_seen = check_count("ntokens_seen", state_dict["ntokens_seen"])
        rng = state_dict.get("rng_state") or {}
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


class StagedLoad:
    """One load's components: DCP hands each its values, and nothing changes until every one checked out.

    ``wrap`` each component before giving it to ``dcp.load`` (innermost, under any key-renaming
    wrapper); then ``apply`` checks every component's values and only then loads them all.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[str, Stateful, dict[str, Any]]] = []

    def wrap(self, name: str, component: Stateful) -> Stateful:
        return _Staged(self, name, component)

    def apply(self, path: Path, metadata: Any = None) -> None:
        """Check every staged component's values, then load them all.

        Raises:
            CorruptCheckpointError: a value is of the wrong type or out of range; nothing was loaded.
        """
        for name, component, state_dict in self._pending:
            check = getattr(component, "check_state_dict", None)
            if check is None:
                continue
            try:
                check(state_dict)
            except LoadedValueError as e:
                key = f"{name}.{e.key}"
                raise CorruptCheckpointError(
                    f"{_file_of(path, metadata, key)}: {key} is {show_value(e.value)}, but it must be {e.requirement}; "
                    "the step is damaged or was not written by savepoint or TorchTitan, and nothing was "
                    "restored from it") from None
        for _, component, state_dict in self._pending:
            component.load_state_dict(state_dict)
        self._pending.clear()


class _Staged(Stateful):
    def __init__(self, staged: StagedLoad, name: str, inner: Stateful):
        self.staged, self.name, self.inner = staged, name, inner

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.staged._pending.append((self.name, self.inner, state_dict))


def _file_of(path: Path, metadata: Any, key: str) -> Path:
    """The data file that holds ``key`` (a flattened checkpoint key, or a prefix of one), else the step folder."""
    storage = getattr(metadata, "storage_data", None) or {}
    key = key.split("[", 1)[0]  # betas[0] is stored with betas
    for index, info in storage.items():
        fqn = getattr(index, "fqn", "")
        if fqn == key or fqn.startswith(key + ".") or key.startswith(fqn + "."):
            relative = getattr(info, "relative_path", None)
            if isinstance(relative, str) and relative:
                return Path(path) / relative
    return Path(path)
