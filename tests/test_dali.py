"""NVIDIA DALI input pipelines (issue 5), in CPU mode (device_id=None) on a small JPEG
folder generated here; skipped where DALI is not installed (the ovsw[dali] extra)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from ovsw import cli
from ovsw import dali as ovsw_dali

CLASSES, PER_CLASS = 3, 5


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    """<root>/imagenet/{train,val}/c<k>/<i>.jpg: smooth images of varied sizes."""
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for side in ("train", "val"):
        for c in range(CLASSES):
            folder = root / "imagenet" / side / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(PER_CLASS):
                h, w = (int(v) for v in rng.integers(240, 330, 2))
                y, x = np.mgrid[0:h, 0:w]
                img = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h) + 60 * c], -1)
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{i}.jpg", quality=95)
    return root


def _require_dali():
    """Skip without DALI, except where OVSW_REQUIRE_DALI=1 (CI sets it): there a missing
    DALI is a failure, never a silent skip."""
    if os.environ.get("OVSW_REQUIRE_DALI") == "1":
        import nvidia.dali  # noqa: F401
    else:
        pytest.importorskip("nvidia.dali")


def test_without_dali_the_flag_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(ovsw_dali, "available", lambda: False)
    with pytest.raises(SystemExit):
        cli.parse_args(["--forward-type", "xnor", "--set", "ImageNet", "--dali", "True"])
    assert "pip install" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--forward-type", "xnor", "--set", "Digits", "--dali", "True"])
    assert "ImageNet" in capsys.readouterr().err


def test_val_batches_match_torchvision(imagenet_dir):
    _require_dali()
    from PIL import Image
    from torchvision import datasets

    from ovsw.data import imagenet_transforms

    folder = imagenet_dir / "imagenet" / "val"
    loader = ovsw_dali.imagenet_loader(folder, False, 4)
    n = CLASSES * PER_CLASS
    assert len(loader) == math.ceil(n / 4)
    xs, ys = zip(*loader)
    assert [len(y) for y in ys] == [4, 4, 4, 3]
    assert all(x.shape[1:] == (3, 224, 224) and x.dtype == torch.float32 for x in xs)
    ref_set = datasets.ImageFolder(str(folder), transform=imagenet_transforms(False))
    ref = torch.stack([ref_set[i][0] for i in range(n)])
    labels = torch.tensor([ref_set[i][1] for i in range(n)])
    x, y = torch.cat(xs), torch.cat(ys)
    assert torch.equal(y, labels)  # file order, labels from the class folders
    diff = (x - ref).abs()  # normalised units; JPEG decoders and resamplers differ a little
    assert diff.mean() < 0.02 and diff.max() < 0.25, (diff.mean(), diff.max())
    assert Image  # PIL is what torchvision decoded with


def test_train_batches_shapes_labels_epochs(imagenet_dir):
    _require_dali()
    folder = imagenet_dir / "imagenet" / "train"
    loader = ovsw_dali.imagenet_loader(folder, True, 4, seed=3)
    assert len(loader) == 4
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(x.shape == (len(y), 3, 224, 224) for x, y in batches)
        labels = torch.cat([y for _, y in batches])
        assert sorted(labels.tolist()) == sorted(list(range(CLASSES)) * PER_CLASS)
        epochs.append(labels)
    sorted_labels = torch.tensor(sorted(epochs[0].tolist()))
    assert not torch.equal(epochs[0], sorted_labels)  # the first epoch is shuffled too
    assert not torch.equal(epochs[0], epochs[1])  # and reshuffled after it
    # two shards split the files, each with its own epoch length
    shards = [ovsw_dali.imagenet_loader(folder, False, 4, shard_id=r, num_shards=2) for r in (0, 1)]
    for _ in range(2):  # each rank keeps its validation files, epoch after epoch
        got = [torch.cat([y for _, y in s]) for s in shards]
        assert [len(g) for g in got] == [7, 8] and [len(s) for s in shards] == [2, 2]
        assert sorted(torch.cat(got).tolist()) == sorted(list(range(CLASSES)) * PER_CLASS)
    # train shards are cut equal (every rank the same number of steps) and disjoint
    shards = [ovsw_dali.imagenet_loader(folder, True, 4, shard_id=r, num_shards=2) for r in (0, 1)]
    assert [s.shard_size for s in shards] == [7, 7] and [len(s) for s in shards] == [2, 2]


def test_cli_trains_one_step_with_dali(imagenet_dir, tmp_path):
    _require_dali()
    argv = [
        "--forward-type", "xnor", "--set", "ImageNet", "--dali", "True", "--data",
        str(imagenet_dir), "--arch", "ResNet18_1w1a", "--num-classes", str(CLASSES),
        "--batch-size", "4", "--limit-batches", "1", "--epochs", "1", "-j", "1",
        "--log-dir", str(tmp_path / "runs"),
    ]  # fmt: skip
    result = cli.run(argv)
    assert result["run_dir"].is_dir() and 0 <= result["acc1"] <= 100
