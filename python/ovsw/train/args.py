"""``ovsw-train``'s arguments: every flag of upstream's ``main.py`` (SPEC section 5) with
upstream's defaults, YAML configs that set defaults (flags given on the command line
win), and the checks that refuse a bad value while parsing, in one line naming the flag.

Boolean flags take Python literals (``--enable_ags True``); a bare boolean flag
(``--evaluate``) means True. ``--config`` takes a real path or the name of a config
shipped with the application (:mod:`ovsw.train.configs`).
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
from collections.abc import Sequence
from typing import Any

import torch

from .. import _core, models
from . import data as datasets
from . import distributed
from .configs import load_config

__all__ = [
    "PROG",
    "OPTIMIZERS",
    "LR_POLICIES",
    "ACT_W",
    "str2bool",
    "build_parser",
    "parse_args",
    "parse_arch",
    "num_classes",
]

PROG = "ovsw-train"
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
LR_POLICIES = ("constant_lr", "cosine_lr", "multistep_lr")
TRAINERS = ("ovsw", "default")
CONV_TYPES = ("OvSWConv2d",)
# The binarizer names and OvSW's options are the core's (one definition, in Rust).
FORWARD_TYPES = tuple(_core.forward_type_names())
ACT_A = tuple(_core.act_a_names())
ACT_W = tuple(_core.act_w_names())
DIST_BACKENDS = ("auto", "nccl", "gloo")


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


def _ovsw_option(name: str):
    """A type for the float OvSW option ``name``: the text is read as a number here and
    the core checks it (``_core.ovsw_check_option``: the one range check of the option
    table), so the parser refuses exactly what ``ovsw.OvSW`` refuses, with its message."""

    def convert(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        try:
            _core.ovsw_check_option(name, x)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return x

    convert.__name__ = "float"
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


parse_arch = _choice(models.names(), _ARCH_ALIASES)
parse_arch.__doc__ = """The canonical architecture name of ``value`` (any case, or upstream's short
name such as ``resnet18``); ``argparse.ArgumentTypeError`` for an unknown one."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``ovsw-train: error: argument --x: ...``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Every flag of upstream's main.py (SPEC section 5) with upstream's defaults, plus
    this project's ``--download``, ``--dali`` and ``--limit-batches``."""
    p = _Parser(
        prog=PROG,
        description="Train or evaluate a binary network with OvSW (upstream's main.py).",
        epilog="Boolean flags take True/False; a bare boolean flag means True. "
        "To deploy a trained run: ovsw-export RUN_DIR.",
    )
    B = dict(type=str2bool, nargs="?", const=True, metavar="BOOL")
    for add in (_data_and_model, _training, _binary_network, _ovsw, _distributed_flags):
        add(p, B)
    return p


def _data_and_model(p: argparse.ArgumentParser, B: dict) -> None:
    """Data set, architecture, config and folders."""
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
        type=parse_arch,
        help=f"architecture: {', '.join(models.names())} (default: ResNet18_1w1a)",
    )
    g.add_argument("--config", default=None, help="YAML config (a path or a shipped config)")
    g.add_argument("--log-dir", default=None, help="base folder for runs (default: runs)")
    g.add_argument("--num-classes", default=None, type=_optional(_number(int, lo=1)))
    g.add_argument("--download", default=False, help="download CIFAR if missing", **B)
    g.add_argument(
        "--augment",
        default=True,
        help="the set's training augmentation (False: train on the validation transforms)",
        **B,
    )
    g.add_argument(
        "--native-size",
        default=False,
        help=f"keep {' and '.join(datasets.NATIVE_SIZE_SETS)} at their own size (28x28, "
        "8x8) instead of 32x32",
        **B,
    )
    g.add_argument(
        "--dali",
        default=False,
        help="NVIDIA DALI input pipelines (ImageNet, CIFAR image folders; ovsw[dali])",
        **B,
    )


def _training(p: argparse.ArgumentParser, B: dict) -> None:
    """The schedule, the optimizer, checkpoints and seeds."""
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


def _binary_network(p: argparse.ArgumentParser, B: dict) -> None:
    """The binary conv options (upstream's, accepted as upstream takes them)."""
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


def _ovsw(p: argparse.ArgumentParser, B: dict) -> None:
    """AGS and SAD: one flag per option of :class:`ovsw.OvSW`, with the name, default
    and help of the core's option table (``_core.ovsw_options()``); the core checks each
    value (:func:`_ovsw_option`), so the parser refuses exactly the values it refuses."""
    g = p.add_argument_group("OvSW")
    g.add_argument("--trainers", default="ovsw", type=_choice(TRAINERS))
    for opt in _core.ovsw_options():
        flag = "--" + opt["name"]
        if opt["type"] == "bool":
            g.add_argument(flag, default=opt["default"], help=opt["help"], **B)
            continue
        g.add_argument(
            flag, default=opt["default"], type=_ovsw_option(opt["name"]), help=opt["help"]
        )


def _distributed_flags(p: argparse.ArgumentParser, B: dict) -> None:
    """Multi-process training."""
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
    if args.native_size and args.set == "ImageNet":
        parser.error("argument --native-size: ImageNet's size is its transforms' (224x224)")
    if args.dali and (args.native_size or not args.augment):
        parser.error(
            "argument --dali: the DALI pipelines take neither --native-size nor --augment False"
        )
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


def num_classes(args: argparse.Namespace) -> int:
    """``--num-classes``, else the class count of ``--set``."""
    return args.num_classes or datasets.NUM_CLASSES[args.set]
