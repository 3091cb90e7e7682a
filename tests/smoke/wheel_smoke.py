"""Smoke test of an installed ovsw wheel, run by ``scripts/wheel_smoke.sh`` in a fresh
virtual environment that held torch (and what torch needs) before the wheel was
installed, and now the wheel and what it pulled in (numpy), nothing else, from a folder
outside the source tree.

It checks that the ``ovsw`` imported is the installed one, trains one OvSW step
(AGS + SAD) watched by the flip monitor, exports the model to a deploy file and runs it
on the Rust engine, and that the training application's configs ship and
``ovsw-train`` and ``ovsw-experiment`` without their extras say in one line how to get
them.
"""

import importlib.resources
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import ovsw
import ovsw.deploy

TRAIN_EXTRAS = ("yaml", "sklearn", "torchvision", "tensorboard", "tqdm", "matplotlib")


def installed() -> None:
    where = Path(ovsw.__file__).resolve()
    assert "site-packages" in where.parts, f"imported {where}, not the installed wheel"
    assert Path(ovsw._core.__file__).name.endswith(".abi3.so"), ovsw._core.__file__
    present = [m for m in TRAIN_EXTRAS if importlib.util.find_spec(m) is not None]
    assert not present, f"only torch, what it needs and numpy should be here; {present} are"
    print(f"ovsw {ovsw.__version__} from {where.parent}, torch {torch.__version__}")


def train_step() -> torch.nn.Module:
    torch.manual_seed(0)
    model = ovsw.models.create("cResNet20_1w1a", num_classes=10)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = ovsw.OvSW(sgd, model, enable_ags=True, delta=0.04, enable_dampen=True, dampen_weight=9e-4)
    monitor = ovsw.analysis.FlipMonitor(model, opt)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    w0 = model.layer1[0].conv1.weight.detach().clone()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    monitor.update()
    stats = opt.stats()
    flips = monitor.total()
    assert flips is not None and 0 < flips["never_flipped"] <= 1 and flips["weights"] == 267264
    assert [s["silent"] for s in monitor.stats()] == [s["silent_ratio"] for s in stats]
    assert torch.isfinite(loss) and not torch.equal(w0, model.layer1[0].conv1.weight)
    assert len(stats) == 18 and all(s["ags_ratio"] is not None for s in stats)
    assert all(s["silent_ratio"] is not None for s in stats)
    print(f"one OvSW step: loss {loss.item():.4f}, {len(stats)} binary convs")
    return model.eval()


def deploy(model: torch.nn.Module) -> None:
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "cresnet20.ovsw"
        ovsw.deploy.export(model, path)
        engine = ovsw.deploy.load(path, threads=2)
        got = engine(x.numpy())
    assert got.shape == ref.shape == (8, 10)
    # per image; a value within rounding of zero may binarize both ways (README), so one
    # image in eight may differ, the rest must agree to float rounding
    rel = np.abs(got - ref).max(1) / np.abs(ref).max(1)
    assert (rel < 1e-4).sum() >= 7, rel
    median = np.median(rel)
    print(f"deploy file run by the engine (kernel {engine.kernel}): median rel err {median:.1e}")


def train_cli_without_extras() -> None:
    experiment = Path(sys.executable).parent / "ovsw-experiment"
    proc = subprocess.run([str(experiment), "silent-weights"], capture_output=True, text=True)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("ovsw-experiment: error:") and "ovsw[train]" in lines[0], lines
    script = Path(sys.executable).parent / "ovsw-train"
    assert script.is_file(), f"no console script {script}"
    config = "configs/smallscale/w1a1-ovsw-resnet20-digits.yaml"
    shipped = importlib.resources.files("ovsw.train").joinpath(config)
    assert shipped.is_file(), f"{config} is not in the wheel"
    proc = subprocess.run([str(script), "--config", config], capture_output=True, text=True)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("ovsw-train: error:") and "ovsw[train]" in lines[0], lines
    print(f"ovsw-train without its extras: {lines[0]}")


if __name__ == "__main__":
    installed()
    deploy(train_step())
    train_cli_without_extras()
    print("wheel smoke test passed")
