"""``savepoint plot``: loss and learning rate against step, from ``<dump_folder>/metrics.jsonl``,
with a marker at every committed save and every resume.

Saves come from the checkpoint folder's committed steps and the ``saved_steps`` the trainer notes
in the log (a save that retention removed since is still marked). Resumes come from the
``resumed_from`` field of the first record after a resume; in a log without it, a step that is not
larger than the one logged just before it marks a resume (at the newest save before that step, else the
step before it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from savepoint.checkpoint.storage import checkpoint_location, open_folder
from savepoint.errors import SavepointError

USAGE = """\
usage: savepoint plot DUMP_FOLDER [-o OUT.png] [--checkpoint_folder NAME|s3://BUCKET/PREFIX]

Plot loss and learning rate against step from DUMP_FOLDER/metrics.jsonl, marking committed saves
(from DUMP_FOLDER/NAME, default "checkpoint", and the log) and resumes. OUT.png defaults to
DUMP_FOLDER/metrics.png."""


def read_records(dump_folder: Path) -> list[dict]:
    """The step records of ``dump_folder/metrics.jsonl``, in file order.

    A last line without its newline (a write cut short by a crash) is left out; any other line that
    is not a JSON record with a ``step`` and ``loss`` is an error.
    """
    if not dump_folder.is_dir():
        raise SavepointError(f"{dump_folder} is not a folder; give the --job.dump_folder of a training job")
    path = dump_folder / "metrics.jsonl"
    if not path.is_file():
        raise SavepointError(f"{path} does not exist: {dump_folder} is not the dump folder of a job that "
                             "trained (give its --job.dump_folder)")
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    complete = lines[:-1]  # the part after the last newline is empty, or a torn write
    records = []
    for number, line in enumerate(complete, start=1):
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and isinstance(record.get("step"), int) and "loss" in record
        except json.JSONDecodeError:
            ok = False
        if not ok:
            raise SavepointError(f"{path} line {number} is not a step record ({line[:60]!r}); remove or repair "
                                 "that line")
        records.append(record)
    if not records:
        raise SavepointError(f"{path} holds no step record yet; plot after the first logged step")
    return records


def find_events(records: list[dict], committed: list[int]) -> tuple[list[int], list[int]]:
    """(save steps, resume steps), each ascending and without repeats."""
    saves = set(committed)
    for record in records:
        saves.update(record.get("saved_steps", []))
    resumes = []
    previous = None
    for record in records:
        step = record["step"]
        if "resumed_from" in record:
            resumes.append(record["resumed_from"])
        elif previous is not None and step <= previous:
            earlier = [s for s in saves if s < step]
            resumes.append(max(earlier) if earlier else step - 1)
        previous = step
    return sorted(saves), sorted(set(resumes))


def segments(records: list[dict]) -> list[list[dict]]:
    """The records split into the runs that wrote them (a new run starts at a resume)."""
    runs: list[list[dict]] = []
    previous = 0
    for record in records:
        if not runs or "resumed_from" in record or record["step"] <= previous:
            runs.append([])
        runs[-1].append(record)
        previous = record["step"]
    return runs


def plot(dump_folder: Path, out: Path, checkpoint_folder: str = "checkpoint") -> tuple[list[int], list[int]]:
    """Write the PNG; returns (save steps, resume steps) as marked."""
    records = read_records(dump_folder)
    folder = open_folder(checkpoint_location(str(dump_folder), checkpoint_folder))  # s3:// too
    saves, resumes = find_events(records, folder.committed_steps())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, lr_ax) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    for i, run in enumerate(segments(records)):
        steps = [r["step"] for r in run]
        label = "run 1" if i == 0 else f"run {i + 1} (resumed)"
        loss_ax.plot(steps, [r["loss"] for r in run], label=label)
        lr_ax.plot(steps, [r["lr"] for r in run])
    for ax in (loss_ax, lr_ax):  # x in steps, y in axis fractions: saves along the bottom, resumes along the top
        where = ax.get_xaxis_transform()
        for step in saves:
            ax.axvline(step, color="tab:green", linestyle=":", linewidth=1)
        for step in resumes:
            ax.axvline(step, color="tab:red", linestyle="--", linewidth=1)
        if saves:
            ax.plot(saves, [0.03] * len(saves), "^", color="tab:green", transform=where, label="committed save")
        if resumes:
            ax.plot(resumes, [0.97] * len(resumes), "v", color="tab:red", transform=where, label="resume")
    loss_ax.set_ylabel("loss")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    loss_ax.set_title(str(dump_folder))
    loss_ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    try:
        fig.savefig(out, format="png")
    except OSError as e:
        raise SavepointError(f"cannot write {out} ({e.strerror or e}); choose another -o path") from None
    finally:
        plt.close(fig)
    return saves, resumes


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    args, options = [], {"-o": None, "--checkpoint_folder": "checkpoint"}
    rest = iter(argv)
    for arg in rest:
        if arg in options:
            value = next(rest, None)
            if value is None:
                raise SavepointError(f"savepoint plot: {arg} needs a value (savepoint plot --help)")
            options[arg] = value
        elif arg.startswith("-"):
            raise SavepointError(f"savepoint plot: unknown option {arg!r} (savepoint plot --help lists them)")
        else:
            args.append(arg)
    if len(args) != 1:
        raise SavepointError(f"savepoint plot takes one DUMP_FOLDER, got {len(args)} (savepoint plot --help)")
    dump = Path(args[0])
    out = Path(options["-o"]) if options["-o"] else dump / "metrics.png"
    saves, resumes = plot(dump, out, options["--checkpoint_folder"])
    print(f"wrote {out}: {len(saves)} committed save(s), {len(resumes)} resume(s) marked", file=sys.stdout)
