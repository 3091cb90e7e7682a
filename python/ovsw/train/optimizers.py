"""The learning-rate policy (set once per epoch) and the optimizer: the wrapped
``torch.optim`` optimizer with its two parameter groups, and :class:`ovsw.OvSW` around it
with the run's AGS and SAD options."""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from ..optim import OPTIONS, OvSW
from .errors import CLIError

__all__ = ["lr_at", "build_optimizer", "build_ovsw"]


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


def build_ovsw(net: nn.Module, args: argparse.Namespace) -> OvSW:
    """:func:`build_optimizer` wrapped in :class:`ovsw.OvSW` with the run's AGS and SAD
    options. Under ``--distributed``, ``net`` is the DDP wrapper (see
    :func:`ovsw.train.distributed.wrap`)."""
    try:
        options = {o["name"]: getattr(args, o["name"]) for o in OPTIONS}
        return OvSW(build_optimizer(net, args), net, **options)
    except ValueError as e:  # a value the core refuses (the parser should have)
        raise CLIError(f"OvSW: {e}") from None
