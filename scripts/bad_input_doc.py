"""Write docs/bad-input.md from the messages a run of tests/test_bad_input.py printed.

    SAVEPOINT_BAD_INPUT_REPORT=/tmp/bad_input.json ./run_tests.sh tests/test_bad_input.py
    .venv/bin/python -m scripts.bad_input_doc /tmp/bad_input.json > docs/bad-input.md

Run it as a module from the repository root (as above), so that it imports the row tables from the
``tests`` package there.

Rows are grouped by the table they come from in the test; each shows the command the row runs
(``savepoint train`` unless it says otherwise; ``SAVEPOINT_WORLD_SIZE=N savepoint check`` is what
``NGPU=N ./run_train.sh`` runs before it launches) and the whole of what it printed on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests import test_bad_input as rows

AREAS = [
    ("Config and checkpoint folder", None),
    ("Hostile and damaged checkpoints", rows.HOSTILE_READ_CASES),
    ("Commit, lock, disk and launcher", rows.COMMIT_CASES),
    ("Values restored from a checkpoint, and config values", rows.LOADED_VALUE_CASES),
    ("Hugging Face folders and exports", rows.HF_CASES),
    ("Pipeline parallelism, refused before launch", rows.PIPELINE_CASES),
]

HEAD = """# Bad input: one clear error, nothing touched

Each row below is one case of `tests/test_bad_input.py`. It copies a dump folder holding committed
steps 5 and 10 of the debug model, damages it (or passes a bad option), runs the command, and
asserts: exactly one line on stderr, `error: ...`, naming what is wrong, where and how to fix it,
with no traceback; exit status 1; every file under the checkpoint folder byte-identical to what it
was before the run (files a row damaged on purpose must stay as damaged). `<dump>` stands for
`--job.dump_folder`. `SAVEPOINT_WORLD_SIZE=N savepoint check` is the check `NGPU=N ./run_train.sh`
runs before it starts any process. The messages are the ones the last run printed (regenerate this
page with `scripts/bad_input_doc.py`).
"""


def cell(text: str) -> str:
    return "`` " + text.replace("|", "\\|") + " ``"


def main(report: str) -> None:
    messages: dict[str, str] = json.loads(Path(report).read_text())
    grouped = {name for _, table in AREAS if table for name in table}
    print(HEAD)
    for title, table in AREAS:
        names = [n for n in rows.CASES if (n in table if table else n not in grouped)]
        print(f"## {title}\n")
        print("| case | command | stderr (the whole of it) |")
        print("|---|---|---|")
        for name in names:
            case = rows.CASES[name]
            command = "savepoint " + (case.command[0] if case.command else "train")
            if case.world_size is not None:  # what run_train.sh runs before launch, with NGPU processes
                command = f"SAVEPOINT_WORLD_SIZE={case.world_size} {command}"
            if case.command and len(case.command) > 1 and not case.command[1].startswith(("-", "{")):
                command += " " + case.command[1]
            message = messages.get(name, "(not run)")
            shown = message if message.startswith("(exit 0)") else cell(message)
            print(f"| {name} | `{command}` | {shown} |")
        print()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
