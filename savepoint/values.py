"""Checks of values read back from a checkpoint: counts, bounded reals, types, RNG states.

A checkpoint may be damaged or foreign, so every value a component restores is checked for type
and range first; a failed check raises :class:`LoadedValueError` naming the key. Used by the
checkpoint's state adapters and by the data loader's state.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from savepoint.errors import CorruptCheckpointError

# Counters (steps, tokens, sample positions) are int64 wherever torch or TorchTitan stores them.
MAX_COUNT = 2**63 - 1


class LoadedValueError(CorruptCheckpointError):
    """A value in a checkpoint has the wrong type or is out of range (``key`` is relative to its component).

    A subclass of ``CorruptCheckpointError``: savepoint never saves such a value, so the step is
    damaged (or foreign), and auto-resume falls back to the step before it, as for a checksum mismatch.
    """

    def __init__(self, key: str, value: Any, requirement: str):
        self.key, self.value, self.requirement = key, value, requirement
        super().__init__(f"{key} is {show_value(value)}, but it must be {requirement}")


def show_value(value: Any) -> str:
    """A short description of a loaded value for an error line (never a whole tensor)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and not value.is_complex():
            return f"{value.item()!r} (a {value.dtype} tensor)"
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})" if not isinstance(value, (int, float)) or isinstance(value, bool) \
        else text


def _scalar(value: Any, integer: bool) -> int | float | None:
    """The Python number a loaded value stands for (a 0-d tensor counts, a bool does not); None if not one."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            return None
        if integer and value.is_floating_point():
            return None
        return value.item()
    if isinstance(value, bool):
        return None
    if integer:
        return value if isinstance(value, int) else None
    return value if isinstance(value, (int, float)) else None


def check_count(key: str, value: Any, minimum: int = 0, maximum: int = MAX_COUNT) -> int:
    """``value`` as an int in ``[minimum, maximum]``.

    Raises:
        LoadedValueError: it is not an int (a 0-d integer tensor counts) or is out of range.
    """
    number = _scalar(value, integer=True)
    if number is None or not minimum <= number <= maximum:
        bound = "below 2**63" if maximum == MAX_COUNT else f"<= {maximum}"
        raise LoadedValueError(key, value, f"an int >= {minimum} and {bound}")
    return int(number)


def check_real(key: str, value: Any, low: float, high: float = math.inf, low_open: bool = False,
               high_open: bool = False) -> float:
    """``value`` as a finite float within the bounds (open or closed at each end).

    Raises:
        LoadedValueError: it is not a number, not finite, or out of range.
    """
    number = _scalar(value, integer=False)
    ok = number is not None and math.isfinite(number)
    ok = ok and (number > low if low_open else number >= low) and (number < high if high_open else number <= high)
    if not ok:
        if math.isinf(high):
            where = f"{'>' if low_open else '>='} {low:g}"
        else:
            where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise LoadedValueError(key, value, f"a finite number {where}")
    return float(number)  # type: ignore[arg-type]


def check_type(key: str, value: Any, like: Any) -> None:
    """``value`` has the type of ``like`` (what this run would save there); None matches only None."""
    if type(value) is not type(like):
        raise LoadedValueError(key, value, f"of type {type(like).__name__}, like {like!r}")


def check_rng_state(key: str, value: Any, current: torch.Tensor, generator: torch.Generator | None) -> None:
    """An RNG state: a uint8 tensor of the size this torch uses, and (for the CPU) a valid generator state.

    Raises:
        LoadedValueError: wrong type, dtype or size, or a state the generator refuses.
    """
    want = f"a {current.dtype} tensor of shape {list(current.shape)} (torch's RNG state)"
    if not isinstance(value, torch.Tensor) or value.dtype != current.dtype or value.shape != current.shape:
        raise LoadedValueError(key, value, want)
    if generator is not None:
        try:
            generator.set_state(value.clone())  # a scratch generator: the global one is not touched
        except (RuntimeError, TypeError, ValueError) as e:
            raise LoadedValueError(key, value, f"{want} that torch accepts ({e})") from None

