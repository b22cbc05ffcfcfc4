"""What a killed job left: the checkpoint folder's steps, the phase the kill landed in, and the logged losses.

Read without the code under test wherever that is possible (folder names, marker files, the
metrics file); a committed step is checked with ``savepoint.checkpoint.verify.verify_step``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from savepoint.checkpoint.verify import verify_step
from savepoint.durable import DCP_MARKER, MANIFEST

STEP_PREFIX = "step-"
HIDDEN_PREFIX = ".step-"


def _step_of(name: str) -> int | None:
    if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX):].isdigit():
        return int(name[len(STEP_PREFIX):])
    return None


@dataclass
class FolderState:
    """What a checkpoint folder holds, read without torch."""

    committed: list[int]  # step-N with the DCP marker
    incomplete: list[int]  # step-N without the DCP marker: never allowed
    restorable: list[int]  # .step-N.replaced with the DCP marker and no step-N: the restart restores them
    hidden: list[str]  # every hidden leftover name

    @property
    def expected_resume(self) -> int | None:
        candidates = self.committed + self.restorable
        return max(candidates) if candidates else None


def read_folder(root: Path) -> FolderState:
    committed, incomplete, restorable, hidden = [], [], [], []
    names = set(os.listdir(root)) if root.is_dir() else set()
    for name in names:
        step = _step_of(name)
        if step is not None:
            (committed if (root / name / DCP_MARKER).is_file() else incomplete).append(step)
        elif name.startswith(HIDDEN_PREFIX):
            hidden.append(name)
            if name.endswith(".replaced"):
                step = int(name[len(HIDDEN_PREFIX):-len(".replaced")])
                if f"{STEP_PREFIX}{step}" not in names and (root / name / DCP_MARKER).is_file():
                    restorable.append(step)
    return FolderState(sorted(committed), sorted(incomplete), sorted(restorable), sorted(hidden))


def classify_phase(root: Path, dump: Path) -> str:
    """Where a kill landed, judged from what it left: cheap and approximate.

    - ``startup``: no metrics line yet (forking, building, loading, cleaning leftovers);
    - ``retention``: a ``.step-N.trash`` (a deletion between its rename and its rmtree);
    - ``resave``: a ``.step-N.replaced`` (a re-save between its two renames);
    - ``commit``: a ``.step-N.partial`` holding a manifest (between manifest and rename);
    - ``metadata``: a ``.step-N.partial`` holding the DCP marker (``.metadata``) but no manifest
      (DCP finished, manifest not written yet, or the manifest being written);
    - ``writing``: a ``.step-N.partial`` without the DCP marker (staging, shard writes, fsyncs; for
      async modes also the training steps that overlap the background write);
    - ``training``: none of these (a training step, or between saves).
    """
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        names = []
    if any(n.endswith(".trash") for n in names):
        return "retention"
    if any(n.endswith(".replaced") for n in names):
        return "resave"
    partial = [n for n in names if n.endswith(".partial")]
    if partial:
        inside = set(os.listdir(root / partial[0])) if (root / partial[0]).is_dir() else set()
        if MANIFEST in inside:
            return "commit"
        if DCP_MARKER in inside:
            return "metadata"
        return "writing"
    metrics = dump / "metrics.jsonl"
    if not metrics.is_file() or metrics.stat().st_size == 0:
        return "startup"
    return "training"


def verify(step_dir: Path) -> list[str]:
    """Problems ``verify_step`` finds with one committed step (empty: it verifies)."""
    report = verify_step(step_dir)
    return [] if report.ok else [str(p) for p in report.problems] or ["verify_step: not ok"]


def verify_folder(root: Path, state: FolderState) -> list[str]:
    problems = [f"{STEP_PREFIX}{s} is visible without {DCP_MARKER} (incomplete)" for s in state.incomplete]
    for step in state.committed:
        problems += [f"{STEP_PREFIX}{step}: {p}" for p in verify(root / f"{STEP_PREFIX}{step}")]
    return problems


def read_losses(dump: Path, offset: int = 0) -> tuple[list[tuple[int, float]], int]:
    """(step, loss) records appended to metrics.jsonl from byte ``offset`` on, and the new end offset.

    The file is append-only across runs; a killed run may leave a torn last line, which is skipped
    (the next run's first record then starts a new line only if the torn one ended with one).
    """
    path = dump / "metrics.jsonl"
    if not path.is_file():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    out = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            # A line torn by the kill, possibly continued by the next run's first record.
            start = line.rfind(b'{"step"')
            try:
                rec = json.loads(line[start:]) if start > 0 else None
            except ValueError:
                rec = None
            if rec is None:
                continue
        out.append((int(rec["step"]), float(rec["loss"])))
    return out, offset + len(data)


def compare_losses(got: list[tuple[int, float]], reference: dict[int, float]) -> list[str]:
    bad = []
    for step, loss in got:
        ref = reference.get(step)
        if ref is None or loss.hex() != ref.hex():
            bad.append(f"step {step}: loss {loss!r} != reference {ref!r}")
    return bad
