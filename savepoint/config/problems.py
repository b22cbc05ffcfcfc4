"""How a config problem is worded: one line naming the flag, its value and what to do instead."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

from savepoint.urls import bucket_problem

# torch's generators take 64-bit seeds and the data order seeds each epoch with seed * 1_000_003 + epoch;
# a 32-bit seed leaves room for every epoch (and is what most tools call a seed).
MAX_SEED = 2**32 - 1


URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def url_problem(flag: str, value: str | None, sep: str = "=", s3: bool = False) -> list[str]:
    """One problem if ``value`` is a URL this option cannot take: ``s3://bucket/prefix`` where ``s3``, else none.

    Without this a URL would be taken as a relative path: ``s3://ckpt/run`` becomes a local folder
    ``s3:/ckpt/run`` and nothing reaches the object store.
    """
    if not value or not URL_RE.match(value.strip()):
        return []
    scheme = value.strip().split("://", 1)[0]
    if s3 and scheme == "s3":
        problem = bucket_problem(value.strip())
        return [f"{flag}{sep}{problem}"] if problem else []
    if s3:
        return [f"{flag}{sep}{value}: {scheme}:// is not supported yet; object storage is s3:// only (any "
                "S3-compatible store: set AWS_ENDPOINT_URL), or give a local or shared-filesystem path"]
    return [f"{flag}{sep}{value}: this option takes a local path, not a URL: give a path on this machine "
            "(s3:// works for --checkpoint.folder, --checkpoint.initial_load_path, savepoint inspect|verify "
            "and the converters)"]


def need(flag: str, value: Any, ok: bool, requirement: str) -> list[str]:
    """One problem if not ok: the flag, its bad value, and what to set instead."""
    if ok:
        return []
    section, _, key = flag[2:].rpartition(".")
    return [
        f"{flag} must be {requirement}, got {value!r}: change {flag} on the command line "
        f"or {key} under [{section}] in the TOML file"
    ]


def one_of(flag: str, value: str, choices: Sequence[str]) -> list[str]:
    """One problem if value is not a choice, with the closest choice suggested."""
    if value in choices:
        return []
    lowered = {c.lower(): c for c in choices}
    match = difflib.get_close_matches(str(value).lower(), list(lowered), n=1)
    hint = f"; did you mean {flag}={lowered[match[0]]}?" if match else ""
    return [f"{flag}={value!r} is not one of {', '.join(choices)}{hint}"]
