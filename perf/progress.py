"""A dependency-free progress bar on stderr.

On a terminal the bar redraws in place; in a log (CI, ``tee``) each update is its own line.
Messages (skips, failures, out-of-memory) are printed on their own lines above the bar.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, enabled: bool = True, stream=None, width: int = 28):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.reset(total)

    def reset(self, total: int) -> None:
        self.total, self.done, self.label = max(total, 0), 0, ""
        self.start = time.monotonic()
        self._drawn = False

    def _line(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        fill = int(round(frac * self.width))
        elapsed = int(time.monotonic() - self.start)
        return (f"[{'#' * fill}{'.' * (self.width - fill)}] {self.done}/{self.total} "
                f"{elapsed // 60}:{elapsed % 60:02d}  {self.label}")

    def _draw(self) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\033[K" + self._line())
            self._drawn = True
        else:
            self.stream.write(self._line() + "\n")
        self.stream.flush()

    def update(self, label: str) -> None:
        self.label = label
        self._draw()

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if self.tty:
            self._draw()

    def message(self, msg: str) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r\033[K")
        self.stream.write(msg + "\n")
        if self.tty and self._drawn:
            self.stream.write(self._line())
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.label = "done"
        if self.tty:
            self._draw()
            self.stream.write("\n")
        else:
            self.stream.write(self._line() + "\n")
        self.stream.flush()
