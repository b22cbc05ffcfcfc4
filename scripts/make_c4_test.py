"""Build the shipped ``c4_test`` sample: JSONL documents shaped like C4's, from savepoint's own corpus.

    python -m scripts.make_c4_test   # writes savepoint/data/assets/c4_test/c4_test.jsonl

Each line is ``{"text", "timestamp", "url"}`` as in allenai/c4; the texts are the paragraphs of
``pydocs.txt`` regrouped (seeded, so the file is the same on every run) into documents of 2 to 6
paragraphs, about 300 KB in all, so that ``--training.dataset c4_test`` trains offline.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "savepoint" / "data" / "assets" / "pydocs.txt"
OUT = ROOT / "savepoint" / "data" / "assets" / "c4_test" / "c4_test.jsonl"
TARGET_BYTES = 300_000
SEED = 2019  # C4's year


def documents() -> list[dict[str, str]]:
    paragraphs = [p.strip() for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    rng = random.Random(SEED)
    rng.shuffle(paragraphs)
    docs, size, i = [], 0, 0
    while size < TARGET_BYTES and i < len(paragraphs):
        n = rng.randint(2, 6)
        text = "\n\n".join(paragraphs[i : i + n])
        i += n
        day = 1 + len(docs) % 28
        docs.append({"text": text, "timestamp": f"2019-04-{day:02d}T00:00:00Z",
                     "url": f"https://docs.python.org/3/library/sample-{len(docs):04d}.html"})
        size += len(text.encode("utf-8"))
    return docs


def main() -> int:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    docs = documents()
    with OUT.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}: {len(docs)} documents, {OUT.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
