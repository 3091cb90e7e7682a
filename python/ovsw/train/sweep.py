"""``ovsw-sweep`` / ``python -m ovsw.train.sweep``: upstream's two sweep scripts.

- ``imagenet`` (upstream's resnet18_resnet34_imagenet.py): the README's two ImageNet
  runs, ResNet-18 and ResNet-34, 200 epochs, delta 0.01, lambda 2e-5, batch 512.
- ``cifar`` (upstream's resnet18_resnet20_vggsmall.py): cResNet-18, cResNet-20 and
  VGG-Small on CIFAR-10 with delta 0.04 and lambda 9e-4 (the SPEC's CIFAR-10 ResNet-20
  values; the epochs come from the shipped configs).

Without ``--run`` it prints the command grid, one ``ovsw-train`` command a line. With
``--run`` it runs them one after the other (``python -m ovsw``, this interpreter) and
stops at the first that fails. Arguments after ``--`` are appended to every command
(for instance ``-- --data /datasets``).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence

__all__ = ["grid", "main"]

GRIDS = ("imagenet", "cifar")


def _name(epochs: int, dampen_weight: float, delta: float) -> str:
    return f"xnor_{epochs}_{dampen_weight:.5f}_{delta:.5f}"


def _ovsw_flags(epochs: int, delta: float, dampen_weight: float, seed: int = 42) -> list[str]:
    return [
        "--forward-type", "xnor",
        "--name", _name(epochs, dampen_weight, delta),
        "--epochs", str(epochs),
        "--delta", f"{delta:.5f}",
        "--seed", str(seed),
        "--enable_ags", "True",
        "--enable_dampen", "True",
        "--dampen_weight", repr(dampen_weight),
    ]  # fmt: skip


def grid(which: str = "all") -> list[list[str]]:
    """The argument lists (without the program name) of the sweep ``which``:
    ``imagenet``, ``cifar`` or ``all``."""
    if which not in (*GRIDS, "all"):
        raise ValueError(f"unknown grid {which!r}; choose one of: {', '.join(GRIDS)}, all")
    out: list[list[str]] = []
    if which in ("imagenet", "all"):
        for arch in ("resnet18", "resnet34"):
            out.append(
                ["--config", f"./configs/largescale/w1a1-ovsw-{arch}-imagenet.yaml"]
                + _ovsw_flags(200, 0.01, 2e-5)
                + ["--set", "ImageNet", "--scaling_factor", "False"]
                + ["--batch-size", "512", "--warmup_length", "5"]
            )
    if which in ("cifar", "all"):
        for arch in ("resnet18", "resnet20", "vgg"):
            out.append(
                ["--config", f"./configs/smallscale/w1a1-ovsw-{arch}-cifar10.yaml"]
                + _ovsw_flags(400, 0.04, 9e-4)
                + ["--set", "CIFAR10", "--scaling_factor", "False"]
            )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(
        prog="ovsw-sweep",
        description="Print (or run, with --run) the command grid of upstream's sweep scripts.",
        epilog="Arguments after -- go to every ovsw-train command.",
    )
    ap.add_argument("--grid", default="all", choices=(*GRIDS, "all"))
    ap.add_argument("--run", action="store_true", help="run the commands, one after the other")
    args = ap.parse_args(argv)

    commands = [cmd + extra for cmd in grid(args.grid)]
    for cmd in commands:
        print(shlex.join(["ovsw-train", *cmd]), flush=True)
    if not args.run:
        return 0
    for i, cmd in enumerate(commands, 1):
        print(f"[{i}/{len(commands)}] {shlex.join(['ovsw-train', *cmd])}", flush=True)
        rc = subprocess.call([sys.executable, "-m", "ovsw", *cmd])
        if rc != 0:
            print(f"ovsw-sweep: command {i} failed with exit status {rc}", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
