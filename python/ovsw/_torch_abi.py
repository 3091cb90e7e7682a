"""The torch this build of ovsw was compiled against, checked before the Rust core loads.

ovsw's core (``ovsw._core``) links libtorch's C++ API, which changes between torch
releases: a build for torch 2.11 loaded beside torch 2.15 fails with an undefined symbol,
or worse, loads and misbehaves. Wheels carry the torch they were built for in
``ovsw/_build_info.py`` (written by the build backend, ``build_backend/``); a different
torch release (major.minor) raises an ``ImportError`` naming both versions and the way
out, before the core is loaded. ``ovsw/__init__.py`` imports this module first.
"""

from __future__ import annotations

import torch


def built_for() -> str | None:
    """The torch version this ovsw was built against, where the build recorded it."""
    try:
        from ._build_info import TORCH_VERSION
    except ImportError:  # a build that did not go through the backend (cargo, maturin develop)
        return None
    return TORCH_VERSION


def _release(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def mismatch(built: str, running: str) -> str:
    """The message for a build for torch ``built`` imported beside torch ``running``."""
    return (
        f"this ovsw was built against torch {built}, but torch {running} is installed; "
        f"install the ovsw build for torch {_release(running)} (the wheel "
        f"ovsw-<version>+torch{_release(running)}, or build it here: "
        "pip install --no-build-isolation ovsw), or go back to "
        f"torch=={_release(built)}.*"
    )


def check(running: str | None = None) -> None:
    """Raises ``ImportError`` when the installed torch is not the release ovsw was built for."""
    built = built_for()
    running = running or torch.__version__
    if built is not None and _release(built) != _release(running):
        raise ImportError(mismatch(built, running))


def load_core():
    """Imports ``ovsw._core`` after :func:`check`; an undefined libtorch symbol (a build
    for another torch without a record of it) becomes the same ``ImportError``."""
    check()
    try:
        from . import _core
    except ImportError as e:
        if "undefined symbol" not in str(e):
            raise
        raise ImportError(mismatch(built_for() or "another release", torch.__version__)) from e
    return _core


load_core()  # at import, before ``ovsw/__init__.py`` imports the core
