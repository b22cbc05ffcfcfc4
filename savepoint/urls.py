"""Object-store URLs (``s3://bucket/prefix``): their scheme and whether they name a bucket and a key prefix.

A leaf: the config checks (which may not import the checkpoint package) and the object-store
client (``checkpoint/objstore.py``) both parse URLs here.
"""

from __future__ import annotations

import re
from typing import Any

SCHEMES = ("s3",)
URL_RE = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*)$")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def url_scheme(value: Any) -> str | None:
    """The scheme of a URL-looking string (``s3``, ``gs``, ...), else None (a local path)."""
    if not isinstance(value, str):
        return None
    match = URL_RE.match(value)
    return match.group(1) if match else None


def bucket_problem(url: str) -> str | None:
    """Why ``url`` is not a usable ``s3://bucket/prefix``, else None."""
    match = URL_RE.match(url)
    if not match or match.group(1) not in SCHEMES:
        return f"{url} is not an s3:// URL"
    bucket = match.group(2).split("/", 1)[0]
    if not BUCKET_RE.match(bucket):
        return (f"{url}: {bucket!r} is not a bucket name (3-63 lower-case letters, digits, dots and hyphens); "
                "write s3://<bucket>/<prefix>")
    if "//" in match.group(2).rstrip("/") or any(p in (".", "..") for p in match.group(2).split("/")):
        return f"{url}: the key prefix has an empty, '.' or '..' part; write s3://<bucket>/<prefix>"
    return None
