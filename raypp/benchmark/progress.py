"""A one-line progress bar on stderr: redrawn in place on a terminal, a line every few
seconds in a log (where carriage returns would pile up)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, stream=None, log_every_s: float = 5.0):
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.log_every_s = log_every_s
        self._last = 0.0

    def update(self, done: int, failed: int, tokens: int, elapsed_s: float) -> None:
        now = time.monotonic()
        if not self.tty and done < self.total and now - self._last < self.log_every_s:
            return
        self._last = now
        width = 24
        filled = width * done // max(1, self.total)
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} requests, "
                f"{failed} failed, {tokens / max(elapsed_s, 1e-9):.1f} tok/s, {elapsed_s:.1f}s")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and done >= self.total:
            self.stream.write("\n")
        self.stream.flush()
