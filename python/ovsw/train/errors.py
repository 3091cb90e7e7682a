"""The error every module of the training application raises for a user's mistake."""

from __future__ import annotations

__all__ = ["CLIError", "first_line", "os_reason"]


class CLIError(Exception):
    """A user's mistake, reported as one line ``ovsw-train: error: ...`` (exit status 2,
    as argparse's own errors)."""


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message, at most 160 characters (for one-line errors)."""
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def os_reason(e: OSError) -> str:
    """``strerror: filename`` of an ``OSError``."""
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or first_line(e)}{where}"
