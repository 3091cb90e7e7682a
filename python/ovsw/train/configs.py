"""The YAML configs shipped with ``ovsw-train`` (upstream's ``configs/`` folder: ImageNet
ResNet-18/34 in ``largescale/``, CIFAR-10/100 ResNet-18/20 and VGG-Small plus digits and
Fashion-MNIST in ``smallscale/``), found by path or by name from any folder, and read.

The files live in this package's ``configs/`` folder (``ovsw/train/configs/``).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["shipped_configs", "find_config", "load_config"]


def _root():
    return resources.files(__package__).joinpath("configs")


def shipped_configs() -> list[str]:
    """Names (``largescale/...yaml``) of the configs shipped inside the package."""
    root = _root()
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
    root = _root()
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
