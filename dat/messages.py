"""How the command-line tools speak: every error and warning as one line.

An error raised in a DataLoader worker comes back with the worker's traceback folded into
its message, and Python's warnings print the source line that raised them; neither is
what a user should read.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator

__all__ = ["count", "one_line", "one_line_warnings"]

_RAISED = re.compile(r"^[\w.]+(Error|Exception|Warning): ")


def count(n: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``: a number with its noun in the right number."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def one_line(err: BaseException) -> str:
    """``err``'s message on one line; for an error re-raised from a DataLoader worker, the
    worker's own message without its traceback."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if any(line.startswith("Original Traceback") for line in lines):
        return _RAISED.sub("", lines[-1])
    return " ".join(lines)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Inside, warnings print as ``warning: message`` (no file, line or source echo)."""
    before = warnings.formatwarning

    def short(message, category, filename, lineno, line=None) -> str:
        return f"warning: {' '.join(str(message).split())}\n"

    warnings.formatwarning = short
    try:
        yield
    finally:
        warnings.formatwarning = before
