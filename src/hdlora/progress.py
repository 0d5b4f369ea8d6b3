"""Progress bars on stderr (tqdm), plain lines when stderr is not a terminal.

On a terminal the bar redraws in place; in a log file (stderr redirected, a batch
job) a redrawing bar would write carriage returns, so each refresh becomes one
plain line instead, at most one every ``log_interval`` seconds (and the final state).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


class _Lines:
    """A file-like object that turns tqdm's carriage-return redraws into plain lines."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        for part in text.replace("\r", "\n").split("\n"):
            part = part.replace("\x1b[A", "").strip()
            if part:
                self.stream.write(part + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def bar(*, file: TextIO | None = None, log_interval: float = 10.0, **kwargs: Any):
    """A tqdm bar on ``file`` (default stderr): redrawn on a terminal, plain lines otherwise."""
    from tqdm import tqdm

    stream = sys.stderr if file is None else file
    if not _isatty(stream):
        stream = _Lines(stream)
        kwargs.pop("dynamic_ncols", None)
        kwargs.setdefault("mininterval", log_interval)
        kwargs.setdefault("ncols", 100)
    return tqdm(file=stream, **kwargs)
