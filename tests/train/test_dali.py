"""NVIDIA DALI input pipelines (issue 5), in CPU mode (device_id=None) on small image
folders generated here (JPEG ImageNet-style; CIFAR-10 as torchvision's pickled batches,
exported to PNG folders); skipped where DALI is not installed (the ovsw[dali] extra)
unless OVSW_REQUIRE_DALI=1."""

from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovsw.testing import max_abs_err, within
from ovsw.train import args as train_args
from ovsw.train import checkpoints, cli
from ovsw.train import dali as ovsw_dali
from ovsw.train import data as datasets

CLASSES, PER_CLASS = 3, 5
CIFAR10_NAMES = (
    "airplane automobile bird cat deer dog frog horse ship truck".split()
)  # torchvision's CIFAR-10 classes, in label order
CIFAR_TRAIN_BATCHES, CIFAR_PER_BATCH, CIFAR_TEST = 5, 4, 12


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
        train_args.parse_args(["--forward-type", "xnor", "--set", "ImageNet", "--dali", "True"])
    assert "pip install" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_args.parse_args(["--forward-type", "xnor", "--set", "Digits", "--dali", "True"])
    assert "ImageNet" in capsys.readouterr().err


def test_val_batches_match_torchvision(imagenet_dir):
    _require_dali()
    from PIL import Image
    from torchvision import datasets

    from ovsw.train.data import imagenet_transforms

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
    # normalised units; JPEG decoders and resamplers differ a little
    assert within(float((x - ref).abs().mean()), 0.02) and within(max_abs_err(x, ref), 0.25)
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


@pytest.mark.slow
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


# -- CIFAR-style folders -------------------------------------------------------------------


def _trust_fake_cifar(monkeypatch):
    """torchvision checks CIFAR's files against the real archive's MD5 sums; the small
    stand-in written here has the real format but not those sums."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """<root>/cifar10/cifar-10-batches-py in torchvision's format (random pixels, so every
    crop has one place it can come from), then ``python -m ovsw.train.dali export-cifar``'s
    folders next to it. Returns (root, train images, train labels, test images, test
    labels), images uint8 [N, 32, 32, 3] as torchvision's ``.data`` holds them."""
    root = tmp_path_factory.mktemp("data")
    d = root / "cifar10" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    n_train = CIFAR_TRAIN_BATCHES * CIFAR_PER_BATCH
    train_x = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
    train_y = rng.permutation(np.arange(n_train) % 10)
    test_x = rng.integers(0, 256, (CIFAR_TEST, 32, 32, 3), dtype=np.uint8)
    test_y = rng.permutation(np.arange(CIFAR_TEST) % 10)

    def dump(name, x, y):
        rows = x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # CIFAR stores CHW rows
        with open(d / name, "wb") as f:
            pickle.dump({"data": rows, "labels": [int(v) for v in y]}, f)

    for b in range(CIFAR_TRAIN_BATCHES):
        part = slice(b * CIFAR_PER_BATCH, (b + 1) * CIFAR_PER_BATCH)
        dump(f"data_batch_{b + 1}", train_x[part], train_y[part])
    dump("test_batch", test_x, test_y)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_NAMES)}, f)
    with pytest.MonkeyPatch.context() as mp:
        _trust_fake_cifar(mp)
        assert ovsw_dali.main(["export-cifar", "--data", str(root), "--set", "CIFAR10"]) == 0
    return root, train_x, train_y, test_x, test_y


def _folder_order(labels: np.ndarray) -> np.ndarray:
    """The order the folders are read in: by class, then by index within a class."""
    return np.lexsort((np.arange(len(labels)), labels))


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 HWC (or NHWC) images -> normalised float CHW, as ToTensor + Normalize do."""
    t = torch.as_tensor(x).movedim(-1, -3).float() / 255
    mean = torch.tensor(datasets.CIFAR_MEAN).view(3, 1, 1)
    std = torch.tensor(datasets.CIFAR_STD).view(3, 1, 1)
    return (t - mean) / std


def test_export_cifar_writes_lossless_class_folders(cifar_root, tmp_path):
    from PIL import Image

    root, train_x, train_y, test_x, test_y = cifar_root
    for side, x, y in (("train", train_x, train_y), ("val", test_x, test_y)):
        folder = root / "cifar10" / side
        assert sorted(p.name for p in folder.iterdir()) == list(CIFAR10_NAMES)
        files = sorted(folder.glob("*/*.png"))
        assert len(files) == len(x)
        for f in files:
            i = int(f.stem)
            assert f.parent.name == CIFAR10_NAMES[y[i]]
            assert np.array_equal(np.asarray(Image.open(f).convert("RGB")), x[i])
    with pytest.raises(FileExistsError, match=re.escape(str(root / "cifar10" / "train"))):
        ovsw_dali.export_cifar(root)
    # class names that do not sort in label order get their label as a prefix
    out = ovsw_dali.write_image_folder(train_x[:3], [0, 1, 1], ["zebra", "ant"], tmp_path / "z")
    assert sorted(p.name for p in out.iterdir()) == ["0_zebra", "1_ant"]
    assert sorted(p.name for p in (out / "1_ant").iterdir()) == ["1.png", "2.png"]
    with pytest.raises(ValueError, match="labels"):
        ovsw_dali.write_image_folder(train_x[:1], [2], ["a", "b"], tmp_path / "bad")
    with pytest.raises(datasets.DataNotFoundError, match=re.escape(str(tmp_path / "nothing"))):
        ovsw_dali.export_cifar(tmp_path / "nothing")


def test_cifar_val_batches_match_torchvision(cifar_root, monkeypatch):
    _require_dali()
    root, _, _, _, test_y = cifar_root
    loader = ovsw_dali.cifar_loader(root / "cifar10" / "val", False, 5)
    assert len(loader) == math.ceil(CIFAR_TEST / 5) and loader.num_classes == 10
    xs, ys = zip(*loader)
    assert [len(y) for y in ys] == [5, 5, 2]
    assert all(x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 for x in xs)
    _trust_fake_cifar(monkeypatch)
    ref_set = datasets.cifar(False, root)  # torchvision's CIFAR10 with data.py's transforms
    order = _folder_order(test_y)
    ref = torch.stack([ref_set[int(i)][0] for i in order])
    assert torch.equal(torch.cat(ys), torch.as_tensor(test_y[order]))
    x = torch.cat(xs)
    # PNG is lossless: only (x - 255 m) / (255 s) against (x / 255 - m) / s rounding
    assert within(max_abs_err(x, ref), 1e-5)


def _identify(x: torch.Tensor, y: int, padded: torch.Tensor, labels: np.ndarray):
    """(image index, dy, dx, flipped) of every 32x32 window of a zero-padded source image
    of label ``y`` (``padded``: [N, 3, 40, 40] normalised) that ``x`` equals."""
    hits = []
    for n in np.flatnonzero(labels == y):
        windows = padded[n].unfold(1, 32, 1).unfold(2, 32, 1)  # [3, 9, 9, 32, 32]
        for flipped, img in ((False, x), (True, x.flip(-1))):
            err = (windows - img[:, None, None]).abs().amax(dim=(0, 3, 4))
            hits += [(int(n), dy, dx, flipped) for dy, dx in (err < 1e-5).nonzero().tolist()]
    return hits


def test_cifar_train_crops_are_windows_of_the_zero_padded_image(cifar_root):
    _require_dali()
    root, train_x, train_y, _, _ = cifar_root
    n = len(train_y)
    # the normalised image zero-padded by 4 (RandomCrop pads the uint8 image with 0)
    padded = F.pad(torch.as_tensor(train_x).movedim(-1, 1), (4, 4, 4, 4)).movedim(1, -1)
    padded = _normalise(padded.numpy())
    loader = ovsw_dali.cifar_loader(root / "cifar10" / "train", True, 8, seed=3)
    assert len(loader) == 3 and loader.shard_size == n
    seen, orders = [], []
    for _ in range(2):
        batches = list(loader)
        assert [len(y) for _, y in batches] == [8, 8, 4]
        assert all(x.shape == (len(y), 3, 32, 32) and x.dtype == torch.float32 for x, y in batches)
        order = []
        for x, y in batches:
            for img, label in zip(x, y.tolist()):
                hits = _identify(img, label, padded, train_y)
                assert len(hits) == 1, hits  # one source image, one offset, one flip
                seen.append(hits[0])
                order.append(hits[0][0])
        assert sorted(order) == list(range(n))  # every image once an epoch
        orders.append(order)
    assert orders[0] != sorted(orders[0]) and orders[0] != orders[1]  # shuffled, reshuffled
    offsets = [(dy, dx) for _, dy, dx, _ in seen]
    assert all(0 <= dy <= 8 and 0 <= dx <= 8 for dy, dx in offsets)
    assert len(set(offsets)) >= 10  # spread over the 9 x 9 offsets
    assert sum(dy != 4 or dx != 4 for dy, dx in offsets) > len(offsets) // 2  # into the padding
    flips = sum(f for *_, f in seen)
    assert 0.25 * len(seen) <= flips <= 0.75 * len(seen)


def test_dali_epoch_is_a_function_of_seed_epoch_and_shard(cifar_root):
    """What exact resume rests on: epoch e's batches do not depend on the epochs read
    before it in the process, and shards split each epoch's files."""
    _require_dali()
    folder = cifar_root[0] / "cifar10" / "train"
    walked = ovsw_dali.cifar_loader(folder, True, 8, seed=5)
    epochs = [list(walked) for _ in range(3)]
    for e in (1, 2):
        fresh = ovsw_dali.cifar_loader(folder, True, 8, seed=5)
        fresh.set_epoch(e)
        again = list(fresh)
        assert len(again) == len(epochs[e])
        for (xa, ya), (xb, yb) in zip(epochs[e], again):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    x0, x1 = (torch.cat([x for x, _ in epochs[e]]) for e in (0, 1))
    assert not torch.equal(x0, x1)
    other_seed = ovsw_dali.cifar_loader(folder, True, 8, seed=6)
    assert not torch.equal(torch.cat([x for x, _ in other_seed]), x0)
    # a broken-off pass leaves nothing behind
    it = iter(fresh)
    next(it)
    del it
    fresh.set_epoch(1)
    assert torch.equal(next(iter(fresh))[0], epochs[1][0][0])
    # two train shards: equal halves of the epoch, together every label once
    shards = [
        ovsw_dali.cifar_loader(folder, True, 8, seed=5, shard_id=r, num_shards=2) for r in (0, 1)
    ]
    labels = [torch.cat([y for _, y in s]) for s in shards]
    assert [len(y) for y in labels] == [10, 10] and [len(s) for s in shards] == [2, 2]
    assert sorted(torch.cat(labels).tolist()) == sorted(cifar_root[2].tolist())


def test_imagenet_lighting_is_the_pca_offset_before_normalising(imagenet_dir):
    """The DALI train pipeline with lighting against the same pipeline (same seeds, so
    the same crops and flips) without it: the difference must be data.py's Lighting, a
    per-image RGB offset eigvec @ (alpha * eigval) on the [0, 1] image, alpha ~ N(0, 0.1)
    per component, i.e. (offset / std) in normalised units."""
    _require_dali()
    folder = imagenet_dir / "imagenet" / "train"
    n = CLASSES * PER_CLASS
    lit = ovsw_dali.imagenet_loader(folder, True, n, seed=11)
    plain = ovsw_dali.imagenet_loader(folder, True, n, seed=11, lighting=0.0)
    std = torch.tensor(datasets.IMAGENET_STD).view(1, 3, 1, 1)
    offsets = []
    for _ in range(6):
        (xa, ya), (xb, yb) = next(iter(lit)), next(iter(plain))
        assert torch.equal(ya, yb)
        offset = (xa - xb) * std  # back to [0, 1] image units
        per_image = offset.mean(dim=(2, 3), keepdim=True)
        # one RGB offset per image
        assert within(max_abs_err(offset, per_image.expand_as(offset)), 1e-5)
        offsets.append(per_image.flatten(1))
    rgb = torch.cat(offsets).double()  # [90, 3]
    eigvec = torch.tensor(datasets.IMAGENET_PCA_EIGVEC, dtype=torch.float64)
    eigval = torch.tensor(datasets.IMAGENET_PCA_EIGVAL, dtype=torch.float64)
    alpha = torch.linalg.solve(eigvec, rgb.T).T / eigval  # rgb = eigvec @ (alpha * eigval)
    assert alpha.abs().min() > 0
    sd, mean = alpha.std(0), alpha.mean(0)
    assert ((sd > 0.07) & (sd < 0.13)).all(), sd  # 270 draws of N(0, 0.1)
    assert (mean.abs() < 0.05).all(), mean
    corr = torch.corrcoef(alpha.T)
    assert within(max_abs_err(corr, torch.eye(3)), 0.4), corr  # drawn independently
    with pytest.raises(ValueError, match="lighting"):
        ovsw_dali.imagenet_loader(folder, True, n, lighting=-1.0)


def test_cli_dali_cifar_missing_folder_names_the_path(tmp_path, capsys):
    _require_dali()
    rc = cli.main(
        ["--forward-type", "xnor", "--set", "CIFAR10", "--dali", "True", "--data", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert str(tmp_path / "cifar10" / "train") in err and "export-cifar" in err
    (tmp_path / "cifar10" / "train" / "cat").mkdir(parents=True)
    rc = cli.main(
        ["--forward-type", "xnor", "--set", "CIFAR10", "--dali", "True", "--data", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "no images" in err and str(tmp_path / "cifar10" / "train") in err
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none"))):
        ovsw_dali.cifar_loader(tmp_path / "none", True, 4)


class _Stop(Exception):
    pass


def _ckpt(run_dir: Path):
    return torch.load(run_dir / "checkpoints" / "checkpoint.pth", weights_only=True)


@pytest.mark.slow
def test_cli_dali_resume_is_batch_exact(cifar_root, tmp_path, monkeypatch):
    """2 epochs straight against 1 epoch, a crash, and --resume for the 2nd: the same
    weights and momentum, to the bit (CPU)."""
    _require_dali()
    base = [
        "--forward-type", "xnor", "--set", "CIFAR10", "--dali", "True", "--data",
        str(cifar_root[0]), "--arch", "cResNet20_1w1a", "--batch-size", "8", "--epochs", "2",
        "--limit-batches", "2", "-j", "1", "-p", "1", "--lr", "0.5", "--enable_dampen", "True",
        "--dampen_weight", "0.01",
    ]  # fmt: skip
    straight = cli.run([*base, "--log-dir", str(tmp_path / "a")])["run_dir"]

    save = checkpoints.save_checkpoint

    def save_then_die(state, path):
        save(state, path)
        if Path(path).name == "checkpoint.pth" and state["epoch"] == 1:
            raise _Stop  # killed right after epoch 1's checkpoint

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(_Stop):
        cli.run([*base, "--log-dir", str(tmp_path / "b")])
    monkeypatch.setattr(checkpoints, "save_checkpoint", save)
    first = tmp_path / "b" / "no-config" / "default"
    one = _ckpt(first)["state_dict"]
    resumed = cli.run([*base, "--log-dir", str(tmp_path / "b"), "--resume", str(first)])["run_dir"]

    a, b = _ckpt(straight), _ckpt(resumed)
    assert a["epoch"] == b["epoch"] == 2 and a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert not torch.equal(one["layer1.0.conv1.weight"], a["state_dict"]["layer1.0.conv1.weight"])
    ma, mb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert ma.keys() == mb.keys()
    assert all(torch.equal(ma[i]["momentum_buffer"], mb[i]["momentum_buffer"]) for i in ma)
