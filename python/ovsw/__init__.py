"""ovsw: OvSW (ECCV 2024, "Overcoming Silent Weights for Accurate Binary Neural Networks")
for PyTorch, with its compute core in Rust.

The library (``ovsw.nn``, ``ovsw.ops``, ``ovsw.optim``, ``ovsw.convert``,
``ovsw.models``, ``ovsw.analysis``, ``ovsw.deploy``) needs only torch and numpy. The
training application ``ovsw-train`` lives in :mod:`ovsw.train` (the ``ovsw[train]``
extra) and is not imported here.

>>> import ovsw
>>> model = ovsw.models.create("cResNet20_1w1a", num_classes=10)
>>> opt = ovsw.OvSW(torch.optim.SGD(model.parameters(), lr=0.1), model,
...                 enable_ags=True, delta=0.01, enable_dampen=True, dampen_weight=2e-5)
>>> resnet = ovsw.binarize(torchvision.models.resnet18())  # any network
"""

import torch  # noqa: F401  (loads libtorch before the Rust extension links against it)

from . import _torch_abi  # noqa: F401  (first: ImportError when built for another torch release)

# isort: split
from . import _core, analysis, models, ops
from .convert import binarize, summary
from .nn import OvSWConv2d, OvSWLinear, binary_convs, binary_layers
from .optim import OvSW

__version__ = _core.__version__

__all__ = [
    "OvSWConv2d",
    "OvSWLinear",
    "OvSW",
    "binarize",
    "summary",
    "binary_layers",
    "binary_convs",
    "models",
    "ops",
    "analysis",
    "__version__",
]
