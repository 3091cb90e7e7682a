"""``ovsw-train``: upstream's ``main.py`` workflow (SPEC section 5).

    ovsw-train --config configs/smallscale/w1a1-ovsw-resnet20-digits.yaml
    ovsw-train --config ./configs/largescale/w1a1-ovsw-resnet18-imagenet.yaml \\
        --forward-type xnor --name xnor_200_0.00002_0.01000 --epochs 200 --delta 0.01000 \\
        --seed 42 --enable_ags True --enable_dampen True --dampen_weight 2e-05 \\
        --set ImageNet --scaling_factor False --batch-size 512 --warmup_length 5

The YAML config sets defaults and flags given on the command line win. Boolean flags
take Python literals (``--enable_ags True``); a bare boolean flag (``--evaluate``)
means True. ``--config`` takes a real path or the name of a config shipped inside the
package (``configs/smallscale/...yaml``), so upstream's commands work from any folder.

A run writes runs/<config stem>/<name>/ (a numbered subfolder when that exists) with
logs/ (TensorBoard), checkpoints/ (checkpoint.pth every epoch, model_best.pth on a new
best, written atomically), settings.txt and args.yaml, and appends a row to
runs/results.csv.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import datetime
import importlib.util
import io
import math
import os
import pickle
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from . import data as datasets
from . import distributed, models
from .optim import OvSW

__all__ = [
    "build_parser",
    "parse_args",
    "find_config",
    "load_config",
    "lr_at",
    "load_weights",
    "save_checkpoint",
    "run",
    "main",
]

PROG = "ovsw-train"
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
LR_POLICIES = ("constant_lr", "cosine_lr", "multistep_lr")
TRAINERS = ("ovsw", "default")
CONV_TYPES = ("OvSWConv2d",)
FORWARD_TYPES = ("xnor",)
ACT_A = ("binary",)
ACT_W = ("ste", "hardtanh", "ste_v2", "hardtanhv2")
DIST_BACKENDS = ("auto", "nccl", "gloo")
IN_MEMORY_SETS = ("Digits", "FashionMNIST")
# Imported lazily; the "train" extra of the package installs them.
TRAIN_EXTRAS = ("yaml", "tqdm", "tensorboard", "torchvision", "sklearn")


class CLIError(Exception):
    """A user's mistake, reported as one line ``ovsw-train: error: ...`` (exit status 2,
    as argparse's own errors)."""


# -- argument types ---------------------------------------------------------------------


def str2bool(value: Any) -> bool:
    """A Python literal (``True``, ``False``, ``1``, ``0``) or yes/no/true/false."""
    if isinstance(value, bool):
        return value
    text = str(value).strip()
    low = text.lower()
    if low in ("true", "yes", "y", "on"):
        return True
    if low in ("false", "no", "n", "off", "none"):
        return False
    try:
        lit = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lit = None
    if isinstance(lit, (bool, int)) and lit in (0, 1):
        return bool(lit)
    raise argparse.ArgumentTypeError(f"expected a boolean (True or False), got {text!r}")


def _choice(options: Sequence[str], aliases: dict[str, str] | None = None):
    """A type that matches ``options`` case-insensitively (plus ``aliases``) and returns
    the canonical spelling."""
    table = {o.lower(): o for o in options}
    table.update({k.lower(): v for k, v in (aliases or {}).items()})

    def convert(value: str) -> str:
        try:
            return table[str(value).strip().lower()]
        except KeyError:
            raise argparse.ArgumentTypeError(
                f"invalid choice {value!r} (choose from {', '.join(options)})"
            ) from None

    convert.__name__ = "choice"
    return convert


def _number(kind, *, lo=None, lo_open=False, hi=None, hi_open=False):
    def convert(value: str):
        try:
            x = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {value!r}"
            ) from None
        if kind is float and not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"must be finite, got {value!r}")
        if lo is not None and (x < lo or (lo_open and x == lo)):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {x}")
        if hi is not None and (x > hi or (hi_open and x == hi)):
            raise argparse.ArgumentTypeError(f"must be {'<' if hi_open else '<='} {hi}, got {x}")
        return x

    convert.__name__ = kind.__name__
    return convert


def _optional(convert):
    """``convert``, with ``None``/``null`` meaning None (for values a YAML file nulls)."""

    def wrapped(value: str):
        if str(value).strip().lower() in ("none", "null", "~", ""):
            return None
        return convert(value)

    wrapped.__name__ = getattr(convert, "__name__", "value")
    return wrapped


_ARCH_ALIASES = {}
for _name in models.names():
    base = _name.replace("_1w1a", "")
    _ARCH_ALIASES[base] = _name  # "resnet18" (upstream's help text) -> ResNet18_1w1a


_ARCH_CHOICE = _choice(models.names(), _ARCH_ALIASES)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``ovsw-train: error: argument --x: ...``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Every flag of upstream's main.py (SPEC section 5) with upstream's defaults, plus
    this project's ``--download`` and ``--limit-batches``."""
    p = _Parser(
        prog=PROG,
        description="Train or evaluate a binary network with OvSW (upstream's main.py).",
        epilog="Boolean flags take True/False; a bare boolean flag means True.",
    )
    B = dict(type=str2bool, nargs="?", const=True, metavar="BOOL")

    g = p.add_argument_group("data and model")
    g.add_argument("--data", default="./dataset", metavar="DIR", help="dataset base folder")
    g.add_argument(
        "--set",
        default="Digits",
        type=_choice(datasets.SETS),
        help=f"data set: {', '.join(datasets.SETS)} (default: Digits, the embedded set)",
    )
    g.add_argument(
        "-a",
        "--arch",
        default="ResNet18_1w1a",
        type=_ARCH_CHOICE,
        help=f"architecture: {', '.join(models.names())} (default: ResNet18_1w1a)",
    )
    g.add_argument("--config", default=None, help="YAML config (a path or a shipped config)")
    g.add_argument("--log-dir", default=None, help="base folder for runs (default: runs)")
    g.add_argument("--num-classes", default=None, type=_optional(_number(int, lo=1)))
    g.add_argument("--download", default=False, help="download CIFAR if missing", **B)
    g.add_argument(
        "--dali",
        default=False,
        help="NVIDIA DALI input pipelines (ImageNet, CIFAR image folders; ovsw[dali])",
        **B,
    )

    g = p.add_argument_group("training")
    g.add_argument("-j", "--workers", default=20, type=_number(int, lo=0), metavar="N")
    g.add_argument("--epochs", default=90, type=_number(int, lo=0), metavar="N")
    g.add_argument("--start-epoch", default=None, type=_optional(_number(int, lo=0)))
    g.add_argument("-b", "--batch-size", default=256, type=_number(int, lo=1), metavar="N")
    g.add_argument("--lr", "--learning-rate", default=0.1, type=_number(float, lo=0), dest="lr")
    g.add_argument("--warmup_length", default=0, type=_number(int, lo=0), metavar="EPOCHS")
    g.add_argument("--momentum", default=0.9, type=_number(float, lo=0), metavar="M")
    g.add_argument(
        "--wd",
        "--weight-decay",
        default=1e-4,
        type=_number(float, lo=0),
        dest="weight_decay",
        metavar="W",
    )
    g.add_argument("-p", "--print-freq", default=10, type=_number(int, lo=1), metavar="N")
    g.add_argument("--resume", default="", help="checkpoint to resume from (file or run folder)")
    g.add_argument("-e", "--evaluate", default=False, help="only evaluate on validation", **B)
    g.add_argument("--pretrained", default=None, help="checkpoint to load weights from")
    g.add_argument("--seed", default=42, type=_optional(_number(int, lo=0)))
    g.add_argument("--gpu", default=None, type=_optional(_number(int, lo=0)), help="GPU index")
    g.add_argument("--lr-policy", default="constant_lr", type=_choice(LR_POLICIES))
    g.add_argument("--multistep-lr-adjust", default=30, type=_number(int, lo=1), metavar="E")
    g.add_argument("--multistep-lr-gamma", default=0.1, type=_number(float, lo=0))
    g.add_argument("--name", default=None, help="experiment name (run folder)")
    g.add_argument("--save_every", default=-1, type=int, help="also keep epoch_N.pth every N")
    g.add_argument("--nesterov", default=False, **B)
    g.add_argument("--no-bn-decay", default=False, help="no weight decay on 1-D params", **B)
    g.add_argument(
        "--label-smoothing", default=None, type=_optional(_number(float, lo=0, hi=1, hi_open=True))
    )
    g.add_argument("--optimizer", default="sgd", type=_choice(OPTIMIZERS))
    g.add_argument(
        "--limit-batches",
        "--limit_batches",
        default=0,
        type=_number(int, lo=0),
        metavar="N",
        help="debugging: stop every train and validation epoch after N batches (0: all)",
    )

    g = p.add_argument_group(
        "binary network (accepted as upstream; the architectures fix "
        "mode, nonlinearity, bn-type and init themselves)"
    )
    g.add_argument("--conv-type", default="OvSWConv2d", type=_choice(CONV_TYPES))
    g.add_argument("--mode", default="fan_in")
    g.add_argument("--nonlinearity", default="relu")
    g.add_argument("--bn-type", default=None)
    g.add_argument("--init", default="kaiming_normal")
    g.add_argument(
        "--forward-type", default=None, type=_choice(FORWARD_TYPES), help="required: xnor"
    )
    g.add_argument("--act-a", default="binary", type=_choice(ACT_A))
    g.add_argument("--act-w", default="ste", type=_choice(ACT_W))
    g.add_argument("--scaling_factor", default=False, **B)

    g = p.add_argument_group("OvSW")
    g.add_argument("--trainers", default="ovsw", type=_choice(TRAINERS))
    g.add_argument("--delta", default=0.01, type=_number(float, lo=0), help="AGS lower bound")
    g.add_argument("--enable_ags", default=False, help="Adaptive Gradient Scaling", **B)
    g.add_argument("--enable_dampen", default=False, help="Silence Awareness Decaying", **B)
    g.add_argument("--dampen_weight", default=0.0, type=_number(float, lo=0), help="SAD lambda")
    g.add_argument("--track_momentum", default=0.999, type=_number(float, lo=0, hi=1, hi_open=True))
    g.add_argument("--track_threshold", default=1e-4, type=_number(float, lo=0))
    g.add_argument("--track_ones", default=False, **B)

    g = p.add_argument_group(
        "distributed (launch with torchrun; its RANK/WORLD_SIZE/LOCAL_RANK win over "
        "--rank/--world-size)"
    )
    g.add_argument(
        "--distributed", default=False, help="DistributedDataParallel, one process a GPU", **B
    )
    g.add_argument("--world-size", default=1, type=_number(int, lo=1))
    g.add_argument("--rank", default=0, type=_number(int, lo=0))
    g.add_argument("--dist-url", default="tcp://127.0.0.1:23456", help="without torchrun")
    g.add_argument(
        "--dist-backend",
        default=None,
        type=_optional(_choice(DIST_BACKENDS)),
        help="nccl, gloo or auto (default: nccl on CUDA, gloo on the CPU)",
    )
    g.add_argument("--sync-bn", default=False, help="SyncBatchNorm (CUDA, --distributed)", **B)
    return p


# -- configs ------------------------------------------------------------------------------


def shipped_configs() -> list[str]:
    """Names (``largescale/...yaml``) of the configs shipped inside the package."""
    root = resources.files("ovsw").joinpath("configs")
    out = []
    for sub in root.iterdir():
        if sub.is_dir():
            out += [f"{sub.name}/{f.name}" for f in sub.iterdir() if f.name.endswith(".yaml")]
    return sorted(out)


def find_config(path: str | os.PathLike) -> Path:
    """A real file wins; else the shipped config of that name: the part of the path after
    ``configs/`` (``configs/smallscale/x.yaml``), else the file name alone."""
    given = Path(path).expanduser()
    if given.is_file():
        return given
    root = resources.files("ovsw").joinpath("configs")
    text = str(path).replace("\\", "/")
    candidates = []
    if "configs/" in text:
        candidates.append(text.rsplit("configs/", 1)[1])
    candidates.append(text.lstrip("./"))
    names = shipped_configs()
    for cand in candidates:
        for c in (cand, cand + ".yaml"):
            if c in names:
                return Path(str(root.joinpath(c)))
    base = Path(text).name
    for c in (base, base + ".yaml"):
        hits = [n for n in names if n.split("/")[-1] == c]
        if len(hits) == 1:
            return Path(str(root.joinpath(hits[0])))
    raise FileNotFoundError(
        f"no such file {str(path)!r}, and no shipped config of that name "
        f"(shipped: {', '.join('configs/' + n for n in names)})"
    )


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML mapping in ``path`` (see :func:`find_config`)."""
    import yaml

    with open(find_config(path)) as f:
        cfg = yaml.safe_load(f)
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a config holds a mapping of flag: value")
    return cfg


def _option_table(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    table = {}
    for action in parser._actions:
        if action.dest == "help":
            continue
        table[action.dest] = action
        for opt in action.option_strings:
            if opt.startswith("--"):
                table[opt[2:].replace("-", "_")] = action
    return table


def _to_default(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return repr(value)
    raise TypeError(f"expected a single value, got {value!r}")


def _normalise_argv(argv: Sequence[str]) -> list[str]:
    # The README's "\--enable_dampen" reaches us as "--enable_dampen" from a shell; a
    # literal backslash (a copy into a non-shell launcher) is taken the same way.
    return [a[1:] if a.startswith("\\-") else a for a in argv]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``): config defaults, then the command line.
    Exits with status 2 and one line naming the flag on a bad value."""
    argv = _normalise_argv(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)  # abbreviates as the full parser does
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            cfg = load_config(known.config)
        except (OSError, ValueError) as e:
            parser.error(f"argument --config: {e}")
        except Exception as e:  # yaml.YAMLError
            parser.error(f"argument --config: {known.config}: {str(e).splitlines()[0]}")
        table = _option_table(parser)
        defaults = {}
        for key, value in cfg.items():
            action = table.get(str(key).replace("-", "_"))
            if action is None:
                parser.error(f"argument --config: {known.config}: unknown key {key!r}")
            if action.dest == "config":
                continue
            try:
                defaults[action.dest] = _to_default(value)
            except TypeError as e:
                parser.error(f"argument --config: {known.config}: key {key!r}: {e}")
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    _validate(parser, args)
    return args


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.forward_type is None:
        parser.error("argument --forward-type: required (the one type is xnor)")
    if args.dali:
        from . import dali

        if args.set not in dali.FOLDERS:
            parser.error(
                "argument --dali: the DALI pipelines read ImageNet or CIFAR10/CIFAR100 image "
                f"folders, not {args.set}"
            )
        if not dali.available():
            parser.error(f"argument --dali: {dali.INSTALL_HINT}")
    if args.distributed:
        world = distributed.env_world_size(args.world_size)
        if args.batch_size % world:
            parser.error(
                f"argument --batch-size: {args.batch_size} does not split evenly over "
                f"{world} processes (each takes batch_size / world size)"
            )
    if args.gpu is not None:
        if not torch.cuda.is_available():
            parser.error(f"argument --gpu: {args.gpu} asked for, but CUDA is not available")
        if args.gpu >= torch.cuda.device_count():
            parser.error(f"argument --gpu: no GPU {args.gpu} ({torch.cuda.device_count()} visible)")
    if args.warmup_length > args.epochs and args.lr_policy == "cosine_lr" and not args.evaluate:
        parser.error(
            f"argument --warmup_length: {args.warmup_length} exceeds --epochs {args.epochs}"
        )


# -- learning rate, optimizer -----------------------------------------------------------


def lr_at(args: argparse.Namespace, epoch: int) -> float:
    """The learning rate of ``epoch`` (set once per epoch, SPEC section 5): linear
    warm-up ``lr * (e + 1) / warmup_length`` while ``e < warmup_length``, then the policy:
    constant; cosine ``0.5 * (1 + cos(pi * (e - w) / (epochs - w))) * lr + 1e-5``;
    multistep ``lr * gamma ** (e // adjust)``."""
    w = args.warmup_length
    if epoch < w:
        return args.lr * (epoch + 1) / w
    if args.lr_policy == "cosine_lr":
        span = max(1, args.epochs - w)
        return 0.5 * (1 + math.cos(math.pi * (epoch - w) / span)) * args.lr + 1e-5
    if args.lr_policy == "multistep_lr":
        return args.lr * args.multistep_lr_gamma ** (epoch // args.multistep_lr_adjust)
    return args.lr


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """Two parameter groups: 1-D parameters (BN, biases, scales; weight decay 0 with
    ``--no-bn-decay``) and the rest (``--wd``), for every optimizer."""
    params = [p for p in model.parameters() if p.requires_grad]
    one_d = [p for p in params if p.ndim <= 1]
    rest = [p for p in params if p.ndim > 1]
    wd = args.weight_decay
    groups = [
        {"params": one_d, "weight_decay": 0.0 if args.no_bn_decay else wd},
        {"params": rest, "weight_decay": wd},
    ]
    if args.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=args.lr, momentum=args.momentum, weight_decay=wd, nesterov=args.nesterov
        )
    if args.optimizer == "adam":
        return torch.optim.Adam(groups, lr=args.lr, weight_decay=wd)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, weight_decay=wd)
    return torch.optim.RMSprop(groups, lr=args.lr, momentum=args.momentum, weight_decay=wd)


# -- checkpoints ----------------------------------------------------------------------------


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= 160 else line[:157] + "..."


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
        raise CLIError(f"{path} is not a readable checkpoint ({_first_line(e)})") from None
    try:
        state = _torch_load(path, device, weights_only=False)
    except Exception as e:
        raise CLIError(f"{path} is not a readable checkpoint ({_first_line(e)})") from None
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
        resolved = _ARCH_CHOICE(named)
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


def _load_into(model: nn.Module, path: str, flag: str, arch: str, device, *, strict: bool):
    """``--resume`` / ``--pretrained``: the checkpoint at ``path`` into ``model``."""
    source = f"--{flag} {path}"
    ckpt = load_checkpoint(path, device)
    check_arch(ckpt, arch, source)
    load_weights(model, ckpt, source, strict=strict)
    return ckpt if isinstance(ckpt, dict) else {"state_dict": ckpt}


# -- data -----------------------------------------------------------------------------------


def select_device(gpu: int | None = None) -> torch.device:
    """The device of a single-process run, made current when it is a GPU: ``cuda:<gpu>``
    with ``--gpu``, else the current CUDA device when CUDA is there, else the CPU. A CUDA
    device always carries its index (``torch.cuda.set_device`` refuses a bare
    ``"cuda"``)."""
    if gpu is not None:
        device = torch.device("cuda", gpu)
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        return torch.device("cpu")
    torch.cuda.set_device(device)
    return device


def _loader(
    ds: Dataset, args, batch_size: int, *, shuffle: bool, epoch: int, device, dist_info=None
) -> DataLoader:
    in_memory = args.set in IN_MEMORY_SETS or isinstance(ds, TensorDataset)
    workers = 0 if in_memory else args.workers
    gen = sampler = None
    if shuffle:
        # The order (and the workers' seeds) depend only on seed and epoch, so a resumed
        # run sees exactly the batches an uninterrupted one does.
        gen = torch.Generator().manual_seed((args.seed or 0) + epoch)
    if dist_info is not None:
        # Each rank takes batch_size / world size samples of its share.
        batch_size = max(1, batch_size // dist_info.world_size)
        if shuffle:
            sampler = distributed.train_sampler(ds, dist_info, seed=args.seed or 0, epoch=epoch)
            gen.manual_seed((args.seed or 0) + epoch + 7919 * dist_info.rank)  # worker seeds
        else:
            sampler = distributed.ShardSampler(len(ds), dist_info.rank, dist_info.world_size)
        shuffle = False
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=gen,
        drop_last=False,
    )


def _dali_loader(args, train: bool, batch_size: int, device, dist_info=None):
    """A DALI loader over <data>/<imagenet|cifar10|cifar100>/{train,val} (this rank's
    shard); train loaders read epoch e after ``set_epoch(e)``."""
    from . import dali

    folder = Path(args.data).expanduser() / dali.FOLDERS[args.set] / ("train" if train else "val")
    if not folder.is_dir():
        hint = "one sub-folder of images per class"
        if args.set != "ImageNet":
            hint = (
                f"write them from torchvision's {args.set} with: python -m ovsw.dali "
                f"export-cifar --data {args.data} --set {args.set} [--download]"
            )
        raise CLIError(f"{args.set} image folders not found: looked for {folder} (--dali); {hint}")
    world = dist_info.world_size if dist_info else 1
    make = dali.imagenet_loader if args.set == "ImageNet" else dali.cifar_loader
    try:
        loader = make(
            folder,
            train,
            max(1, batch_size // world),
            device=device,
            shard_id=dist_info.rank if dist_info else 0,
            num_shards=world,
            num_threads=max(1, args.workers),
            seed=args.seed or 0,
        )
    except FileNotFoundError as e:
        raise CLIError(f"{args.set} (--dali): {e}") from None
    if loader.num_classes > _num_classes(args):
        raise CLIError(
            f"{folder} holds {loader.num_classes} class folders but the model has "
            f"{_num_classes(args)} outputs (--num-classes)"
        )
    return loader


def _val_loader(args, val_set, device, dist_info=None):
    """The validation loader: DALI with ``--dali``, else this rank's share of ``val_set``."""
    if args.dali:
        return _dali_loader(args, False, _val_batch(args), device, dist_info)
    return _loader(
        val_set, args, _val_batch(args), shuffle=False, epoch=0, device=device, dist_info=dist_info
    )


def _datasets(args: argparse.Namespace, need_train: bool):
    try:
        train = (
            datasets.build(args.set, True, args.data, download=args.download)
            if need_train
            else None
        )
        val = datasets.build(args.set, False, args.data, download=args.download)
    except datasets.DataNotFoundError as e:
        raise CLIError(str(e)) from None
    return train, val


# -- the loop --------------------------------------------------------------------------------


class _Meter:
    def __init__(self) -> None:
        self.sum = 0.0
        self.n = 0

    def update(self, value: float, n: int) -> None:
        self.sum += value * n
        self.n += n

    @property
    def avg(self) -> float:
        return self.sum / max(1, self.n)


def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1, 5)) -> list[float]:
    """Top-k accuracies in percent (k capped at the number of classes)."""
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, 1, True, True).indices
    correct = pred.eq(target.view(-1, 1))
    return [100.0 * correct[:, : min(k, maxk)].any(1).float().mean().item() for k in topk]


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _reduce_meters(*meters: _Meter) -> None:
    """Under torch.distributed: every rank's meters become the sums over all ranks."""
    if not torch.distributed.is_initialized():
        return
    sums = distributed.reduce_sums([x for m in meters for x in (m.sum, m.n)])
    for k, m in enumerate(meters):
        m.sum, m.n = sums[2 * k], int(sums[2 * k + 1])


def _limit(loader: DataLoader, args) -> int:
    n = len(loader)
    return min(n, args.limit_batches) if args.limit_batches else n


def train_epoch(model, loader, opt, criterion, scaler, device, epoch, args, writer):
    from tqdm import tqdm

    model.train()
    loss_m, top1, top5 = _Meter(), _Meter(), _Meter()
    total = _limit(loader, args)
    amp = device.type == "cuda"
    bar = tqdm(
        total=total,
        desc=f"epoch {epoch + 1}/{args.epochs} train",
        leave=False,
        disable=None if _is_main() else True,
    )
    for i, (x, y) in enumerate(loader):
        if i >= total:
            break
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            out = model(x)
            loss = criterion(out, y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            scaler.step(opt)  # OvSW.step: AGS + SAD, then the wrapped update
            scaler.update()
        else:
            loss.backward()
            opt.step()
        a1, a5 = accuracy(out.detach().float(), y)
        loss_m.update(loss.item(), len(y))
        top1.update(a1, len(y))
        top5.update(a5, len(y))
        bar.update(1)
        if i % args.print_freq == 0 or i == total - 1:
            bar.set_postfix(loss=f"{loss_m.avg:.4f}", top1=f"{top1.avg:.2f}")
            if writer is not None:
                step = epoch * total + i
                writer.add_scalar("train/loss_step", loss.item(), step)
    bar.close()
    _reduce_meters(loss_m, top1, top5)
    return loss_m.avg, top1.avg, top5.avg


@torch.no_grad()
def validate(model, loader, criterion, device, args, desc="val"):
    from tqdm import tqdm

    model.eval()
    loss_m, top1, top5 = _Meter(), _Meter(), _Meter()
    total = _limit(loader, args)
    amp = device.type == "cuda"
    bar = tqdm(total=total, desc=desc, leave=False, disable=None if _is_main() else True)
    for i, (x, y) in enumerate(loader):
        if i >= total:
            break
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            out = model(x)
            loss = criterion(out, y)
        a1, a5 = accuracy(out.float(), y)
        loss_m.update(loss.item(), len(y))
        top1.update(a1, len(y))
        top5.update(a5, len(y))
        bar.update(1)
    bar.close()
    _reduce_meters(loss_m, top1, top5)
    return loss_m.avg, top1.avg, top5.avg


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _config_stem(args) -> str:
    return Path(args.config).stem if args.config else "no-config"


def make_run_dir(args) -> Path:
    """runs/<config stem>/<name>/, or a numbered subfolder of it when it exists."""
    base = Path(args.log_dir or "runs") / _config_stem(args) / (args.name or "default")
    run_dir = base
    if base.exists():
        n = 0
        while (base / str(n)).exists():
            n += 1
        run_dir = base / str(n)
    (run_dir / "logs").mkdir(parents=True, exist_ok=False)
    (run_dir / "checkpoints").mkdir()
    return run_dir


def run_dir_of(checkpoint: str | os.PathLike) -> Path | None:
    """The ``ovsw-train`` run folder that ``checkpoint`` belongs to: the folder itself
    when given one, ``RUN`` for ``RUN/checkpoints/<file>``; ``None`` for a checkpoint
    outside a run folder (one without args.yaml and checkpoints/)."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        cand = path
    elif path.parent.name == "checkpoints":
        cand = path.parent.parent
    else:
        return None
    if (cand / "args.yaml").is_file() and (cand / "checkpoints").is_dir():
        return cand
    return None


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _open_run_dir(args, argv: Sequence[str]) -> Path:
    """The run folder, with settings.txt and args.yaml written: ``--resume RUN`` without
    ``--name`` continues in the checkpoint's own run folder (its name kept, settings.txt
    extended), anything else gets a new one (:func:`make_run_dir`). A folder that cannot
    be written is a :class:`CLIError`."""
    own = run_dir_of(args.resume) if args.resume and not args.name else None
    try:
        if own is not None:
            args.name = _read_run_args(own).get("name") or None
            run_dir = own
        else:
            run_dir = make_run_dir(args)
        _write_settings(run_dir, args, argv, resumed=own is not None)
    except OSError as e:
        where = own if own is not None else Path(args.log_dir or "runs")
        raise CLIError(f"cannot write the run folder under {where} ({_os_reason(e)})") from None
    return run_dir


def _read_run_args(run_dir: Path) -> dict[str, Any]:
    import yaml

    try:
        with open(run_dir / "args.yaml") as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise CLIError(f"{run_dir / 'args.yaml'}: cannot read it ({_first_line(e)})") from None
    if not isinstance(saved, dict):
        raise CLIError(f"{run_dir / 'args.yaml'} is not an ovsw-train args file")
    return saved


def _os_reason(e: OSError) -> str:
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or _first_line(e)}{where}"


def _save(state: dict[str, Any], path: Path) -> None:
    try:
        save_checkpoint(state, path)
    except OSError as e:
        raise CLIError(f"cannot write checkpoint {path}: {_os_reason(e)}") from None


def _write_settings(run_dir: Path, args, argv: Sequence[str], resumed: bool = False) -> None:
    import yaml

    lines = [f"command: {PROG} {' '.join(argv)}"]
    lines += [f"{k}: {v}" for k, v in sorted(vars(args).items())]
    with open(run_dir / "settings.txt", "a" if resumed else "w") as f:
        f.write(("\n# resumed\n" if resumed else "") + "\n".join(lines) + "\n")
    _atomic_write_text(run_dir / "args.yaml", yaml.safe_dump(vars(args), sort_keys=True))


RESULT_FIELDS = [
    "date_finished",
    "base_config",
    "name",
    "run_dir",
    "arch",
    "set",
    "epochs",
    "curr_acc1",
    "curr_acc5",
    "best_acc1",
    "best_acc5",
    "best_train_acc1",
    "best_train_acc5",
    "mean_silent_fraction",
]


def _same_dir(a: str, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False


def record_result(args, row: dict[str, Any]) -> Path:
    """Write the results row of a finished run: the row of the same run folder is
    replaced where a results CSV holds one (a run continued by ``--resume``), else the
    row is appended to ``<log-dir>/results.csv``. Returns the CSV's path."""
    run_dir = Path(row["run_dir"])
    first = Path(args.log_dir or "runs") / "results.csv"
    # the log folder of run_dir: <log>/<stem>/<name> or <log>/<stem>/<name>/<n>
    for path in (first, *(p / "results.csv" for p in run_dir.parents[1:3])):
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        hits = [i for i, r in enumerate(rows) if _same_dir(r.get("run_dir", ""), run_dir)]
        if hits:
            rows[hits[-1]] = row
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
            _atomic_write_text(path, buf.getvalue())
            return path
    new = not first.exists()
    with open(first, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)
    return first


def _num_classes(args) -> int:
    return args.num_classes or datasets.NUM_CLASSES[args.set]


def _model(args, device) -> nn.Module:
    model = models.create(
        args.arch,
        num_classes=_num_classes(args),
        act_a=args.act_a,
        act_w=args.act_w,
        scaling_factor=args.scaling_factor,
        forward_type=args.forward_type,
    )
    return model.to(device)


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _distributed(fn, args, *rest):
    """``fn(args, *rest, dist_info)``: inside a process group with ``--distributed``
    (joined here, left at the end), else with ``dist_info=None``."""
    if not args.distributed:
        return fn(args, *rest, None)
    use_cuda = args.gpu is not None or torch.cuda.is_available()
    try:
        info = distributed.init(
            rank=args.rank,
            world_size=args.world_size,
            dist_url=args.dist_url,
            backend=args.dist_backend,
            use_cuda=use_cuda,
        )
    except (ValueError, RuntimeError) as e:
        raise CLIError(f"--distributed: {e}") from None
    ok = False
    try:
        with distributed.main_process_output(info):
            result = fn(args, *rest, info)
        ok = True
        return result
    finally:
        if ok:
            distributed.shutdown()  # waits for every rank
        elif torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def evaluate(args) -> dict[str, float]:
    """``--evaluate``: top-1 / top-5 on the validation side (no run folder written)."""
    return _distributed(_evaluate, args)


def _evaluate(args, dist_info) -> dict[str, float]:
    device = dist_info.device if dist_info else select_device(args.gpu)
    _seed_everything(args.seed or 0)
    val_set = None if args.dali else _datasets(args, need_train=False)[1]
    model = _model(args, device)
    if args.pretrained:
        # --evaluate scores this very model: a checkpoint that does not fit is refused
        _load_into(model, args.pretrained, "pretrained", args.arch, device, strict=True)
    else:
        print("warning: --evaluate without --pretrained evaluates a freshly initialised model")
    criterion = nn.CrossEntropyLoss()
    loader = _val_loader(args, val_set, device, dist_info)
    loss, acc1, acc5 = validate(model, loader, criterion, device, args)
    print(f"top-1 {acc1:.2f}%  top-5 {acc5:.2f}%  loss {loss:.4f}")
    return {"acc1": acc1, "acc5": acc5, "loss": loss}


def _val_batch(args) -> int:
    return max(1, args.batch_size // 4) if args.set == "ImageNet" else args.batch_size


def train(args, argv: Sequence[str] = ()) -> dict[str, Any]:
    """Train as upstream's main.py does; returns the summary figures and the run folder
    (``None`` on ranks other than 0 under ``--distributed``)."""
    return _distributed(_train, args, argv)


def _train(args, argv: Sequence[str], dist_info) -> dict[str, Any]:
    from torch.utils.tensorboard import SummaryWriter

    main_rank = dist_info is None or dist_info.is_main
    device = dist_info.device if dist_info else select_device(args.gpu)
    _seed_everything(args.seed or 0)
    train_set = val_set = None
    if not args.dali:
        train_set, val_set = _datasets(args, need_train=True)
    model = _model(args, device)
    if args.pretrained:
        # fine-tuning: keys that do not fit are reported and skipped (SPEC section 5)
        _load_into(model, args.pretrained, "pretrained", args.arch, device, strict=False)
    # Under --distributed, net is the DDP wrapper (built before OvSW, see
    # distributed.wrap); model stays the plain network for loading, validation and
    # checkpoints, so checkpoints keep upstream's key names.
    net = distributed.wrap(model, dist_info, sync_bn=args.sync_bn) if dist_info else model
    base_opt = build_optimizer(net, args)
    try:
        opt = OvSW(
            base_opt,
            net,
            enable_ags=args.enable_ags,
            delta=args.delta,
            enable_dampen=args.enable_dampen,
            dampen_weight=args.dampen_weight,
            track_momentum=args.track_momentum,
            track_threshold=args.track_threshold,
            track_ones=args.track_ones,
        )
    except ValueError as e:  # a value the core refuses (the parser should have)
        raise CLIError(f"OvSW: {e}") from None
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing or 0.0)

    best = {"best_acc1": 0.0, "best_acc5": 0.0, "best_train_acc1": 0.0, "best_train_acc5": 0.0}
    curr_acc1 = curr_acc5 = 0.0
    start_epoch = 0
    if args.resume:
        # a run continues only from a checkpoint of this very model
        ckpt = _load_into(model, args.resume, "resume", args.arch, device, strict=True)
        try:
            if "optimizer" in ckpt:
                opt.load_state_dict(ckpt["optimizer"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CLIError(
                f"resume {args.resume}: its optimizer state does not fit --optimizer "
                f"{args.optimizer} ({_first_line(e)})"
            ) from None
        start_epoch = int(ckpt.get("epoch", 0))
        for k in best:
            best[k] = float(ckpt.get(k, 0.0))
        curr_acc1 = float(ckpt.get("curr_acc1", 0.0))
        curr_acc5 = float(ckpt.get("curr_acc5", 0.0))
        print(f"resumed from {args.resume} at epoch {start_epoch}")
    if args.start_epoch is not None:
        start_epoch = args.start_epoch

    run_dir = writer = None
    if main_rank:
        run_dir = _open_run_dir(args, argv)
        writer = SummaryWriter(log_dir=str(run_dir / "logs"))
    ckpt_dir = run_dir / "checkpoints" if run_dir else None
    if args.dali:
        dali_train = _dali_loader(args, True, args.batch_size, device, dist_info)
    val_loader = _val_loader(args, val_set, device, dist_info)
    where = f"{device}" if dist_info is None else f"{dist_info.world_size} x {device.type}"
    print(
        f"{PROG}: {args.arch} on {args.set} ({where}), epochs {start_epoch}..{args.epochs}, "
        f"run folder {run_dir}"
    )
    start = time.time()
    try:
        for epoch in range(start_epoch, args.epochs):
            lr = lr_at(args, epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            rank = dist_info.rank if dist_info else 0
            # augmentation RNG of the main process (of each rank)
            torch.manual_seed((args.seed or 0) + epoch + 7919 * rank)
            if args.dali:  # epoch e's pipeline: order and augmentation from (seed, e, rank)
                dali_train.set_epoch(epoch)
            loader = (
                dali_train
                if args.dali
                else _loader(
                    train_set,
                    args,
                    args.batch_size,
                    shuffle=True,
                    epoch=epoch,
                    device=device,
                    dist_info=dist_info,
                )
            )
            tr_loss, tr1, tr5 = train_epoch(
                net, loader, opt, criterion, scaler, device, epoch, args, writer
            )
            if dist_info is not None:
                distributed.broadcast_bn_stats(model)  # rank 0's, as its checkpoint keeps
            va_loss, curr_acc1, curr_acc5 = validate(model, val_loader, criterion, device, args)
            is_best = curr_acc1 > best["best_acc1"]
            best["best_acc1"] = max(best["best_acc1"], curr_acc1)
            best["best_acc5"] = max(best["best_acc5"], curr_acc5)
            best["best_train_acc1"] = max(best["best_train_acc1"], tr1)
            best["best_train_acc5"] = max(best["best_train_acc5"], tr5)
            state = {
                "epoch": epoch + 1,
                "arch": args.arch,
                "state_dict": model.state_dict(),
                **best,
                "optimizer": opt.state_dict(),
                "curr_acc1": curr_acc1,
                "curr_acc5": curr_acc5,
                "scaler": scaler.state_dict() if scaler is not None else None,
            }
            stats = opt.stats()
            silent = opt.mean_silent_ratio()
            if not main_rank:
                continue
            _save(state, ckpt_dir / "checkpoint.pth")
            if is_best:
                _save(state, ckpt_dir / "model_best.pth")
            if args.save_every > 0 and (epoch + 1) % args.save_every == 0:
                _save(state, ckpt_dir / f"epoch_{epoch + 1}.pth")

            for tag, value in (
                ("train/loss", tr_loss),
                ("train/acc1", tr1),
                ("train/acc5", tr5),
                ("val/loss", va_loss),
                ("val/acc1", curr_acc1),
                ("val/acc5", curr_acc5),
                ("lr", lr),
            ):
                writer.add_scalar(tag, value, epoch)
            if silent is not None:
                writer.add_scalar("silent/mean", silent, epoch)
            for s in stats:
                if s["silent_ratio"] is not None:
                    writer.add_scalar(
                        f"silent/{s['name'].removeprefix('module.')}", s["silent_ratio"], epoch
                    )
                if s["ags_ratio"] is not None:
                    writer.add_scalar(
                        f"ags_ratio/{s['name'].removeprefix('module.')}", s["ags_ratio"], epoch
                    )
            writer.flush()
            print(
                f"epoch {epoch + 1}/{args.epochs}  lr {lr:.5f}  train loss {tr_loss:.4f} "
                f"top-1 {tr1:.2f}  val top-1 {curr_acc1:.2f} top-5 {curr_acc5:.2f}  "
                f"silent {_fmt(silent)}  ({time.time() - start:.0f}s)",
                flush=True,
            )
    finally:
        if writer is not None:
            writer.close()

    silent = opt.mean_silent_ratio()
    row = {
        "date_finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "base_config": args.config or "",
        "name": args.name or "default",
        "run_dir": str(run_dir),
        "arch": args.arch,
        "set": args.set,
        "epochs": args.epochs,
        "curr_acc1": f"{curr_acc1:.2f}",
        "curr_acc5": f"{curr_acc5:.2f}",
        **{k: f"{v:.2f}" for k, v in best.items()},
        "mean_silent_fraction": _fmt(silent),
    }
    if main_rank:
        try:
            record_result(args, row)
        except OSError as e:
            raise CLIError(f"cannot write the results CSV: {_os_reason(e)}") from None
    print(
        f"top-1 {curr_acc1:.2f}% (best {best['best_acc1']:.2f}%)  "
        f"mean silent fraction {_fmt(silent)}  run folder {run_dir}"
    )
    return {
        "acc1": curr_acc1,
        "acc5": curr_acc5,
        **best,
        "mean_silent_fraction": silent,
        "run_dir": run_dir,
        "model": model,
    }


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` and evaluate or train; returns the figures (for scripts and tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.evaluate:
        return evaluate(args)
    return train(args, argv)


def _extras_error(missing: Sequence[str]) -> int:
    print(
        f"{PROG}: error: {', '.join(missing)} missing; ovsw-train needs the training "
        'extras: pip install "ovsw[train]"',
        file=sys.stderr,
    )
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ovsw-train`` console script."""
    missing = [m for m in TRAIN_EXTRAS if importlib.util.find_spec(m) is None]
    if missing:
        return _extras_error(missing)
    try:
        run(argv)
    except ModuleNotFoundError as e:
        if e.name not in TRAIN_EXTRAS:
            raise
        return _extras_error([e.name])
    except CLIError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
