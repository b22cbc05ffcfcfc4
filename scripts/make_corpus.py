"""Regenerate savepoint/data/assets/pydocs.txt: the docstrings of a fixed list of stdlib modules.

The corpus ships in the repo so training never downloads anything; this script only documents how
it was made (CPython 3.11 docstrings, PSF license).
"""

import importlib
import inspect
import sys
from pathlib import Path

MODULES = [
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
    "functools", "gzip", "hashlib", "heapq", "html", "http.client", "inspect", "io", "ipaddress",
    "itertools", "json", "logging", "math", "operator", "os", "pathlib", "pickle", "pprint", "queue",
    "random", "re", "sched", "secrets", "shutil", "socket", "sqlite3", "statistics", "string",
    "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "tokenize",
    "turtle", "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "zipfile",
]


def docs_of(module_name: str):
    module = importlib.import_module(module_name)
    if module.__doc__:
        yield inspect.cleandoc(module.__doc__)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 80:
            yield f"{module_name}.{name}\n\n{doc}"


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "savepoint/data/assets/pydocs.txt")
    texts = [doc for m in MODULES for doc in docs_of(m)]
    out.write_text("\n\n\n".join(texts) + "\n", encoding="utf-8")
    print(f"wrote {out}: {len(texts)} documents, {out.stat().st_size} bytes")
