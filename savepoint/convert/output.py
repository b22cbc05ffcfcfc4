"""A conversion's output folder: written under a hidden ``.<name>.partial``, published whole or not at all."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from savepoint.durable import publish
from savepoint.errors import CheckpointError


def partial_path(out_dir: str | Path) -> Path:
    """The hidden sibling a conversion into ``out_dir`` writes to before it renames it."""
    out = Path(os.path.abspath(out_dir))
    return out.parent / f".{out.name}.partial"


def check_output(out_dir: str | Path) -> Path:
    """``out_dir`` as an absolute path, if a conversion may create it.

    Raises:
        CheckpointError: it is a file or a non-empty folder (left untouched).
    """
    out = Path(os.path.abspath(out_dir))
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise CheckpointError(f"output {out} exists and is not a folder; nothing was written. "
                                  "Choose a new output folder")
        if any(out.iterdir()):
            raise CheckpointError(f"output folder {out} already exists and is not empty; nothing was written "
                                  "and it was left untouched. Choose a new output folder or remove it first")
    return out


@contextmanager
def staged_output(out_dir: str | Path) -> Iterator[Path]:
    """Yield an empty hidden ``.<name>.partial`` folder; rename it to ``out_dir`` if the body succeeds.

    On any failure (or interrupt) the partial folder is removed and ``out_dir`` is not created.

    Raises:
        CheckpointError: ``out_dir`` is a file or a non-empty folder, or cannot be created.
    """
    out = check_output(out_dir)
    partial = partial_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)  # left by an interrupted conversion into the same folder
        partial.mkdir()
    except OSError as e:
        raise CheckpointError(f"cannot create {partial} next to the output folder: {e.strerror or e}") from e
    try:
        yield partial
        try:
            publish(partial, out)  # takes the place of an empty folder, never of one with files
        except FileExistsError:
            raise CheckpointError(f"output folder {out} got files from elsewhere during the conversion; nothing "
                                  "was written there and it was left as it was. Choose a new output folder") from None
        except OSError as e:
            raise CheckpointError(f"cannot rename {partial} to {out}: {e.strerror or e}; {out} was left as "
                                  "it was") from e
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
