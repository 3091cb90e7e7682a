"""Datasets for ``ovsw-train`` (``--set``).

- ``Digits``: scikit-learn's bundled 8x8 digits, upscaled to 3x32x32 (the embedded
  default data set: it ships inside scikit-learn, so it needs no download);
- ``FashionMNIST``: the four IDX ``.gz`` files, read here with gzip + numpy, padded to
  32x32 and repeated to three channels so the CIFAR architectures take them;
- ``CIFAR10`` / ``CIFAR100``: torchvision's layout under ``<data>/cifar10`` and
  ``<data>/cifar100`` (downloaded only when asked);
- ``ImageNet``: ``ImageFolder`` under ``<data>/imagenet/{train,val}`` with upstream's
  transforms, PCA lighting noise included.

``--augment False`` trains on the validation transforms; ``--native-size True`` keeps
Fashion-MNIST at 28x28 and the digits at 8x8 (the CIFAR architectures take both).

Missing data raises :class:`DataNotFoundError` with one line naming the path looked at
and how to get the data.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

__all__ = [
    "SETS",
    "NUM_CLASSES",
    "NATIVE_SIZE_SETS",
    "DataNotFoundError",
    "Lighting",
    "TransformTensorDataset",
    "build",
    "cifar",
    "digits",
    "fashion_mnist",
    "imagenet",
    "read_idx",
]

#: The ``--set`` names, as upstream spells them (plus this project's two small sets).
SETS = ("ImageNet", "CIFAR10", "CIFAR100", "FashionMNIST", "Digits")
NUM_CLASSES = {"ImageNet": 1000, "CIFAR10": 10, "CIFAR100": 100, "FashionMNIST": 10, "Digits": 10}
#: The sets that ``native_size`` keeps at the size they come in (else 32x32).
NATIVE_SIZE_SETS = ("FashionMNIST", "Digits")
#: Where Debian's ``dataset-fashion-mnist`` package puts the IDX files.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"

CIFAR_MEAN, CIFAR_STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# PCA of ImageNet's RGB pixels (AlexNet's lighting noise, as upstream uses it).
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


class DataNotFoundError(FileNotFoundError):
    """The data set's files are not where they were looked for (one-line message)."""


@functools.lru_cache(maxsize=2)
def _digits_tensors(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data set comes with scikit-learn: pip install scikit-learn"
        ) from e
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    x = images[:, None]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    return x, labels


def digits(
    train: bool, *, val_fraction: float = 0.2, seed: int = 0, size: int = 32
) -> TensorDataset:
    """scikit-learn's 1,797 handwritten digits as CIFAR-shaped tensors.

    Images (8x8, values 0..16) are scaled to [0, 1], bilinearly upscaled to
    ``size`` x ``size`` (32 by default; 8 keeps them as they are), repeated to three
    channels and normalised to zero mean and unit variance over the whole set. A fixed,
    class-stratified split gives ``val_fraction`` of every class to validation;
    ``train`` picks which side to return.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    x, labels = _digits_tensors(size)

    g = torch.Generator().manual_seed(seed)
    val_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        val_mask[idx[: int(round(len(idx) * val_fraction))]] = True
    keep = ~val_mask if train else val_mask
    return TensorDataset(x[keep], labels[keep])


# -- transforms and wrappers ---------------------------------------------------------


class Lighting:
    """AlexNet-style PCA lighting noise on a CHW float tensor (before normalisation):
    ``img + eigvec @ (alpha * eigval)`` with ``alpha ~ N(0, alphastd)`` per image."""

    def __init__(
        self,
        alphastd: float = 0.1,
        eigval=IMAGENET_PCA_EIGVAL,
        eigvec=IMAGENET_PCA_EIGVEC,
    ) -> None:
        self.alphastd = float(alphastd)
        self.eigval = torch.tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float32)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.alphastd == 0:
            return img
        alpha = torch.empty(3).normal_(0, self.alphastd)
        rgb = (self.eigvec.to(img.dtype) * (alpha * self.eigval).view(1, 3)).sum(1)
        return img + rgb.view(3, 1, 1)

    def __repr__(self) -> str:
        return f"Lighting(alphastd={self.alphastd})"


class TransformTensorDataset(Dataset):
    """In-memory images ``x`` [N, C, H, W] and labels ``y`` with an optional per-sample
    transform on the image tensor."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable | None = None) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        self.tensors = (x, y)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.tensors[1])

    def __getitem__(self, i):
        x, y = self.tensors[0][i], self.tensors[1][i]
        if self.transform is not None:
            x = self.transform(x)
        return x, y


# -- Fashion-MNIST (IDX files) ------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

FASHION_MNIST_FILES = {
    True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed when the name ends in ``.gz``) into an array.

    Format: two zero bytes, a type byte (0x08 uint8 ... 0x0E float64), the number of
    dimensions, that many big-endian uint32 sizes, then the data, big-endian.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path}: IDX header says {shape} of {dtype} ({count * dtype.itemsize} bytes) "
            f"but the file holds {len(raw) - header} bytes of data"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _fashion_mnist_dir(root: str | os.PathLike | None) -> Path:
    candidates = []
    if root is not None:
        candidates.append(Path(root).expanduser() / "fashion-mnist")
    candidates.append(Path(FASHION_MNIST_SYSTEM_DIR))
    names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
    for d in candidates:
        if all((d / n).is_file() for n in names):
            return d
    looked = " and ".join(str(d) for d in candidates)
    raise DataNotFoundError(
        f"Fashion-MNIST not found: looked for {', '.join(names)} in {looked}; "
        "install Debian's dataset-fashion-mnist package or copy the four IDX .gz files "
        "from https://github.com/zalandoresearch/fashion-mnist to <data>/fashion-mnist"
    )


def fashion_mnist(
    train: bool,
    root: str | os.PathLike | None = None,
    *,
    augment: bool | None = None,
    pad: bool = True,
) -> TransformTensorDataset:
    """Fashion-MNIST as CIFAR-shaped tensors: 28x28 images zero-padded (2 pixels a side)
    to 32x32 (unless ``pad`` is False: 28x28 as they are), repeated to three channels,
    normalised with the set's mean and std.

    The files are looked for in ``<root>/fashion-mnist``, then in
    ``/usr/share/datasets/fashion-mnist``. With ``augment`` (default: ``train``) each
    sample gets a random crop of the 4-pixel-padded image and a horizontal flip.
    """
    d = _fashion_mnist_dir(root)
    img_name, lbl_name = FASHION_MNIST_FILES[bool(train)]
    images = read_idx(d / img_name)
    labels = read_idx(d / lbl_name)
    return _mnist_like(images, labels, train if augment is None else augment, 32 if pad else 0)


def _mnist_like(
    images: np.ndarray, labels: np.ndarray, augment: bool, pad_to: int = 32
) -> TransformTensorDataset:
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"expected images [N, H, W] and labels [N], got {images.shape} and {labels.shape}"
        )
    x = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32) / 255.0
    ph, pw = max(0, pad_to - x.shape[1]), max(0, pad_to - x.shape[2])
    x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))  # black border
    x = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    x = x[:, None].repeat(1, 3, 1, 1).contiguous()
    y = torch.as_tensor(np.ascontiguousarray(labels), dtype=torch.int64)
    transform = None
    if augment:
        from torchvision import transforms as T

        black = -FASHION_MNIST_MEAN / FASHION_MNIST_STD
        crop = T.RandomCrop(tuple(x.shape[-2:]), padding=4, fill=black)
        transform = T.Compose([crop, T.RandomHorizontalFlip()])
    return TransformTensorDataset(x, y, transform)


# -- CIFAR ----------------------------------------------------------------------------


def cifar(
    train: bool,
    root: str | os.PathLike,
    *,
    num_classes: int = 10,
    download: bool = False,
    augment: bool = True,
) -> Dataset:
    """CIFAR-10 or CIFAR-100 (torchvision's layout under ``<root>/cifar10`` or
    ``<root>/cifar100``), with upstream's transforms: train RandomCrop(32, padding 4)
    and horizontal flip (unless ``augment`` is False); both sides normalised with mean
    (0.491, 0.482, 0.447), std (0.247, 0.243, 0.262). Downloads only with
    ``download=True``."""
    from torchvision import datasets
    from torchvision import transforms as T

    if num_classes not in (10, 100):
        raise ValueError(f"CIFAR has 10 or 100 classes, not {num_classes}")
    cls = datasets.CIFAR10 if num_classes == 10 else datasets.CIFAR100
    folder = Path(root).expanduser() / f"cifar{num_classes}"
    normalize = T.Normalize(CIFAR_MEAN, CIFAR_STD)
    if train and augment:
        tf = T.Compose(
            [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize]
        )
    else:
        tf = T.Compose([T.ToTensor(), normalize])
    if download:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            return cls(str(folder), train=train, transform=tf, download=True)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            raise DataNotFoundError(
                f"CIFAR-{num_classes} download into {folder} failed ({e}); "
                f"are you online? Or place {cls.base_folder}/ there by hand"
            ) from None
    try:
        return cls(str(folder), train=train, transform=tf, download=False)
    except RuntimeError:
        raise DataNotFoundError(
            f"CIFAR-{num_classes} not found: looked for {folder / cls.base_folder}; "
            f"pass --download True (needs network) or extract {cls.filename} into {folder}"
        ) from None


# -- ImageNet -------------------------------------------------------------------------


def imagenet_transforms(train: bool):
    """Upstream's ImageNet transforms: train RandomResizedCrop(224, scale (0.08, 1.25)),
    horizontal flip, ToTensor, PCA lighting noise (alpha std 0.1), normalize; val
    Resize 256, CenterCrop 224, ToTensor, normalize."""
    from torchvision import transforms as T

    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        return T.Compose(
            [
                T.RandomResizedCrop(224, scale=(0.08, 1.25)),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                Lighting(0.1),
                normalize,
            ]
        )
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])


def imagenet(train: bool, root: str | os.PathLike, *, augment: bool = True) -> Dataset:
    """``ImageFolder`` over ``<root>/imagenet/train`` or ``<root>/imagenet/val`` (one
    folder per class) with :func:`imagenet_transforms` (the validation ones for
    training too when ``augment`` is False)."""
    from torchvision import datasets

    folder = Path(root).expanduser() / "imagenet" / ("train" if train else "val")
    if not folder.is_dir():
        raise DataNotFoundError(
            f"ImageNet not found: looked for {folder}; place the ILSVRC-2012 images there, "
            "one sub-folder per class (train/ and val/ under <data>/imagenet, see the README)"
        )
    try:
        tf = imagenet_transforms(train and augment)
        return datasets.ImageFolder(str(folder), transform=tf)
    except FileNotFoundError as e:
        raise DataNotFoundError(
            f"ImageNet: {folder} holds no class folders of images ({e})"
        ) from None


# -- by name ---------------------------------------------------------------------------


def build(
    name: str,
    train: bool,
    root: str | os.PathLike = "./dataset",
    *,
    download: bool = False,
    augment: bool = True,
    native_size: bool = False,
) -> Dataset:
    """The ``train`` or validation side of data set ``name`` (one of :data:`SETS`).

    ``augment=False`` trains on the validation-side transforms (no random crops or
    flips). ``native_size=True`` keeps the small sets at the size they come in
    (:data:`NATIVE_SIZE_SETS`: Fashion-MNIST 28x28, digits 8x8) instead of 32x32; the
    CIFAR sets are 32x32 either way, and ImageNet's size is its transforms'."""
    if native_size and name not in (*NATIVE_SIZE_SETS, "CIFAR10", "CIFAR100"):
        raise ValueError(f"native_size applies to {', '.join(NATIVE_SIZE_SETS)}, not {name}")
    if name == "Digits":
        return digits(train, size=8 if native_size else 32)
    if name == "FashionMNIST":
        return fashion_mnist(train, root, augment=train and augment, pad=not native_size)
    if name in ("CIFAR10", "CIFAR100"):
        return cifar(train, root, num_classes=NUM_CLASSES[name], download=download, augment=augment)
    if name == "ImageNet":
        return imagenet(train, root, augment=augment)
    raise ValueError(f"unknown data set {name!r}; choose one of: {', '.join(SETS)}")
