"""The progress line of a conversion on stderr."""

from __future__ import annotations

import sys
import time
from typing import IO


class Progress:
    """One updating line on stderr (tensors done / total, MB, MB/s); on a non-terminal, only the final line."""

    def __init__(self, label: str, total_items: int, total_bytes: int, enabled: bool = True,
                 stream: IO[str] | None = None, interval: float = 0.1):
        self.label, self.total_items, self.total_bytes = label, total_items, total_bytes
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.live = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.interval = interval
        self.items = self.bytes = 0
        self.start = self.last = time.perf_counter()
        self.width = 0

    def line(self) -> str:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        mb, total_mb = self.bytes / 1e6, self.total_bytes / 1e6
        digits = 0 if total_mb >= 100 else 1
        return (f"{self.label}: {self.items}/{self.total_items} tensors, {mb:,.{digits}f}/{total_mb:,.{digits}f} MB, "
                f"{mb / seconds:,.0f} MB/s, {seconds:.1f} s")

    def update(self, nbytes: int) -> None:
        self.items += 1
        self.bytes += nbytes
        now = time.perf_counter()
        if self.live and (now - self.last >= self.interval or self.items == self.total_items):
            self.last = now
            self._show(end="")

    def _show(self, end: str) -> None:
        text = self.line()
        pad = " " * max(self.width - len(text), 0)
        self.width = len(text)
        self.stream.write(("\r" if self.live else "") + text + pad + end)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._show(end="\n")
