"""Checkpoints: written atomically, read with a one-line error for anything that is not
one, and loaded into a model with every key that does not fit reported (``--pretrained``
fine-tuning) or refused (``--resume``, ``--evaluate``, export).

The checkpoint dict is upstream's: ``epoch``, ``arch``, ``state_dict``, ``best_acc1``,
``best_acc5``, ``best_train_acc1``, ``best_train_acc5``, ``optimizer``, ``curr_acc1``,
``curr_acc5``, plus ``scaler`` (the AMP GradScaler's state, ``None`` on the CPU).
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .args import parse_arch
from .errors import CLIError, first_line, os_reason

__all__ = [
    "save_checkpoint",
    "save",
    "load_checkpoint",
    "check_arch",
    "load_weights",
    "load_into",
]


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``:
    a crash leaves the old file or the new one, never a truncated one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save(state: dict[str, Any], path: Path) -> None:
    """:func:`save_checkpoint`, with a :class:`CLIError` when it cannot be written."""
    try:
        save_checkpoint(state, path)
    except OSError as e:
        raise CLIError(f"cannot write checkpoint {path}: {os_reason(e)}") from None


def _torch_load(path: Path, device, weights_only: bool) -> Any:
    with warnings.catch_warnings():  # torch warns about odd pickle protocols on stderr
        warnings.simplefilter("ignore")
        return torch.load(path, map_location=device, weights_only=weights_only)


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> Any:
    """The object saved in checkpoint ``path`` (a file, or a run folder: its
    ``checkpoints/checkpoint.pth``). Raises :class:`CLIError` when there is none or the
    file is not one ``torch.load`` can read (truncated, corrupt, another format)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for cand in (path / "checkpoints" / "checkpoint.pth", path / "checkpoint.pth"):
            if cand.is_file():
                path = cand
                break
    if not path.is_file():
        raise CLIError(f"no checkpoint at {path}")
    try:
        return _torch_load(path, device, weights_only=True)
    except pickle.UnpicklingError:
        pass  # objects beyond tensors (an upstream checkpoint may pickle its args)
    except Exception as e:  # torch.load raises RuntimeError, KeyError, EOFError, ...
        raise CLIError(f"{path} is not a readable checkpoint ({first_line(e)})") from None
    try:
        state = _torch_load(path, device, weights_only=False)
    except Exception as e:
        raise CLIError(f"{path} is not a readable checkpoint ({first_line(e)})") from None
    print(
        f"note: {path} holds objects beyond tensors; loaded it with weights_only=False "
        "(only load checkpoints you trust)"
    )
    return state


def check_arch(checkpoint: Any, arch: str, source: str) -> None:
    """Refuse a checkpoint whose ``arch`` names another architecture than ``arch``."""
    named = checkpoint.get("arch") if isinstance(checkpoint, dict) else None
    if not isinstance(named, str):
        return
    try:
        resolved = parse_arch(named)
    except argparse.ArgumentTypeError:
        resolved = named
    if resolved != arch:
        raise CLIError(f"{source} holds a {named} checkpoint, not {arch} (--arch)")


def load_weights(
    model: nn.Module, checkpoint: Any, source: str = "checkpoint", *, strict: bool = False
) -> dict:
    """Load ``checkpoint["state_dict"]`` (or a bare state_dict) into ``model``.

    A ``module.`` prefix (DataParallel) is stripped. SAD buffers (``tracker``,
    ``weight_prev``) load whether or not the model set SAD up. Keys whose shape does not
    fit, keys the model lacks and model keys the checkpoint lacks are skipped, listed in
    the returned report and printed; nothing is dropped silently. Raises
    :class:`CLIError` when no parameter fits, and with ``strict`` when anything does not
    (``--resume`` and ``--evaluate`` take only a checkpoint of this very model)."""
    sd = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CLIError(f"{source}: not a checkpoint (no state_dict of tensors in it)")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    own = model.state_dict()
    bad = {k for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)}
    fits = {k: v for k, v in sd.items() if k not in bad}
    result = model.load_state_dict(fits, strict=False)
    report = {
        "loaded": len(fits) - len(result.unexpected_keys),
        "total": len(sd),
        "shape_mismatch": [
            f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in sd if k in bad
        ],
        "unexpected": list(result.unexpected_keys),
        "missing": [k for k in result.missing_keys if k not in bad],
    }
    problems = [
        (label, report[key])
        for label, key in (
            ("shape does not fit", "shape_mismatch"),
            ("not in the model", "unexpected"),
            ("missing from the checkpoint", "missing"),
        )
        if report[key]
    ]
    params = dict(model.named_parameters())
    if not any(k in params for k in fits):  # BatchNorm counters alone do not make a fit
        raise CLIError(f"{source}: none of its parameters fits the model")
    if strict and problems:
        label, keys = problems[0]
        more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
        raise CLIError(f"{source} does not fit the model: {label}: {keys[0]}{more}")
    print(f"{source}: loaded {report['loaded']} of {report['total']} tensors")
    for label, key in (
        ("skipped, shape does not fit", "shape_mismatch"),
        ("skipped, not in the model", "unexpected"),
        ("missing from the checkpoint, left as initialised", "missing"),
    ):
        if report[key]:
            print(f"  {label} ({len(report[key])}): {', '.join(report[key])}")
    return report


def load_into(model: nn.Module, path: str, source: str, arch: str, device, *, strict: bool):
    """The checkpoint at ``path`` into ``model`` (``source`` names it in messages, e.g.
    ``--resume PATH``): refused when it names another architecture than ``arch``, when no
    parameter fits, and with ``strict`` when anything does not fit. Returns the
    checkpoint dict (a bare state_dict comes back as ``{"state_dict": ...}``)."""
    ckpt = load_checkpoint(path, device)
    check_arch(ckpt, arch, source)
    load_weights(model, ckpt, source, strict=strict)
    return ckpt if isinstance(ckpt, dict) else {"state_dict": ckpt}
