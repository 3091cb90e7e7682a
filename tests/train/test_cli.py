"""ovsw-train (issue 3): flags and configs, data sets, the digits run end to end,
resume exactness, atomic checkpoints, Fashion-MNIST IDX parsing, the sweep grid."""

from __future__ import annotations

import csv
import gzip
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ovsw
from ovsw.testing import assert_close
from ovsw.train import args as train_args
from ovsw.train import checkpoints, cli, configs, optimizers, sweep
from ovsw.train import data as datasets

DIGITS = "configs/smallscale/w1a1-ovsw-resnet20-digits.yaml"
# Tiny settings for runs that must stay fast on two CPU cores.
TINY = ["--batch-size", "8", "--limit-batches", "2", "-p", "1"]

README_COMMANDS = [
    r"""--config ./configs/largescale/w1a1-ovsw-resnet18-imagenet.yaml \
--forward-type xnor --name xnor_200_0.00002_0.01000 --epochs 200 --delta 0.01000 \
--seed 42 --enable_ags True \--enable_dampen True --dampen_weight 2e-05 --set ImageNet \
--scaling_factor False --batch-size 512 --warmup_length 5""",
    r"""--config ./configs/largescale/w1a1-ovsw-resnet34-imagenet.yaml \
--forward-type xnor --name xnor_200_0.00002_0.01000 --epochs 200 --delta 0.01000 \
--seed 42 --enable_ags True \--enable_dampen True --dampen_weight 2e-05 --set ImageNet \
--scaling_factor False --batch-size 512 --warmup_length 5 --evaluate --pretrained [PRETRAINED]""",
]


def parse(*argv):
    return train_args.parse_args(list(argv))


def parse_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        train_args.parse_args(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    return err


# -- flags and defaults ------------------------------------------------------------------

SPEC_FLAGS = (
    "--data --set --arch --config --log-dir -j --workers --epochs --start-epoch -b "
    "--batch-size --lr --warmup_length --momentum --wd --weight-decay -p --print-freq "
    "--num-classes --resume -e --evaluate --pretrained --seed --gpu --lr-policy "
    "--multistep-lr-adjust --multistep-lr-gamma --name --save_every --nesterov --conv-type "
    "--mode --nonlinearity --bn-type --init --no-bn-decay --label-smoothing --trainers "
    "--forward-type --act-a --act-w --delta --enable_ags --enable_dampen --dampen_weight "
    "--track_momentum --track_threshold --scaling_factor --track_ones --distributed "
    "--world-size --rank --dist-url --dist-backend --optimizer"
).split()


def test_every_spec_flag_exists():
    options = {o for a in train_args.build_parser()._actions for o in a.option_strings}
    assert not [f for f in SPEC_FLAGS if f not in options]


def test_upstream_defaults():
    a = parse("--forward-type", "xnor")
    assert (a.lr, a.warmup_length, a.momentum, a.weight_decay, a.seed) == (0.1, 0, 0.9, 1e-4, 42)
    assert (a.enable_ags, a.delta, a.enable_dampen, a.dampen_weight) == (False, 0.01, False, 0.0)
    assert (a.track_momentum, a.track_threshold, a.track_ones) == (0.999, 1e-4, False)
    assert (a.optimizer, a.lr_policy, a.evaluate, a.nesterov, a.no_bn_decay) == (
        "sgd",
        "constant_lr",
        False,
        False,
        False,
    )
    assert (a.conv_type, a.act_a, a.act_w, a.scaling_factor) == (
        "OvSWConv2d",
        "binary",
        "ste",
        False,
    )
    assert a.set == "Digits" and a.config is None and a.resume == "" and a.pretrained is None


def test_yaml_sets_defaults_and_command_line_wins():
    a = parse("--config", DIGITS)
    assert (a.arch, a.set, a.epochs, a.batch_size, a.lr_policy) == (
        "cResNet20_1w1a",
        "Digits",
        15,
        64,
        "cosine_lr",
    )
    assert (a.enable_ags, a.enable_dampen, a.delta, a.dampen_weight) == (True, True, 0.04, 9e-4)
    b = parse("--config", DIGITS, "--lr", "0.5", "--enable_ags", "False", "--epochs", "3")
    assert (b.lr, b.enable_ags, b.epochs, b.enable_dampen) == (0.5, False, 3, True)


def test_yaml_values_are_typed_and_checked(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("forward-type: xnor\ndampen_weight: 2e-05\nenable_ags: 'True'\nwd: 0.003\n")
    a = parse("--config", str(cfg))
    assert (a.dampen_weight, a.enable_ags, a.weight_decay) == (2e-5, True, 0.003)
    cfg.write_text("forward_type: xnor\narch: AlexNet\n")
    assert "--arch" in parse_error(capsys, "--config", str(cfg))
    cfg.write_text("forward_type: xnor\nlearning_speed: 3\n")
    assert "learning_speed" in parse_error(capsys, "--config", str(cfg))


@pytest.mark.parametrize(
    "text,value", [("True", True), ("False", False), ("1", True), ("0", False), ("true", True)]
)
def test_boolean_literals(text, value):
    a = parse("--forward-type", "xnor", "--enable_ags", text, "--scaling_factor", text)
    assert a.enable_ags is value and a.scaling_factor is value


def test_bare_evaluate_means_true():
    a = parse("--forward-type", "xnor", "--evaluate", "--pretrained", "x.pth")
    assert a.evaluate is True and a.pretrained == "x.pth"
    assert parse("--forward-type", "xnor", "-e").evaluate is True


def _bash_argv(command: str) -> list[str]:
    out = subprocess.run(
        ["bash", "-c", 'f() { printf "%s\\0" "$@"; }; f ' + command],
        capture_output=True,
        check=True,
    ).stdout
    return out.decode().split("\0")[:-1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("command", README_COMMANDS)
def test_readme_commands_parse_as_written(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs come from the package, not a checkout
    argv = _bash_argv(command)
    assert "--enable_dampen" in argv  # what bash makes of "\--enable_dampen"
    a = train_args.parse_args(argv)
    assert a.set == "ImageNet" and a.arch.startswith("ResNet")
    assert (a.epochs, a.batch_size, a.warmup_length, a.delta, a.dampen_weight) == (
        200,
        512,
        5,
        0.01,
        2e-5,
    )
    assert a.enable_ags and a.enable_dampen and not a.scaling_factor
    assert a.evaluate is ("--evaluate" in command)
    # A literal backslash (a launcher without a shell) is taken the same way.
    assert train_args.parse_args([t.replace("--enable_dampen", "\\--enable_dampen") for t in argv])


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--arch", "AlexNet"], "--arch"),
        (["--set", "MNIST"], "--set"),
        (["--optimizer", "lamb"], "--optimizer"),
        (["--lr-policy", "step_lr"], "--lr-policy"),
        (["--epochs", "-1"], "--epochs"),
        (["--enable_ags", "maybe"], "--enable_ags"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "fast"], "--lr"),
        (["--config", "configs/none/such.yaml"], "--config"),
    ],
)
def test_bad_values_name_the_flag(argv, flag, capsys):
    err = parse_error(capsys, "--forward-type", "xnor", *argv)
    assert f"{flag}" in err and err.startswith("ovsw-train: error:")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_gpu_without_cuda_is_an_error(capsys):
    assert "--gpu" in parse_error(capsys, "--forward-type", "xnor", "--gpu", "0")


def test_forward_type_is_required(capsys):
    assert "--forward-type" in parse_error(capsys, "--epochs", "1")


# -- configs ----------------------------------------------------------------------------------


def test_every_upstream_config_ships():
    names = set(configs.shipped_configs())
    for arch in ("resnet18", "resnet34"):
        assert f"largescale/w1a1-ovsw-{arch}-imagenet.yaml" in names
    for arch in ("resnet18", "resnet20", "vgg"):
        for ds in ("cifar10", "cifar100"):
            assert f"smallscale/w1a1-ovsw-{arch}-{ds}.yaml" in names
    assert "smallscale/w1a1-ovsw-resnet20-digits.yaml" in names
    assert any("fashion" in n for n in names)


@pytest.mark.parametrize("name", configs.shipped_configs())
def test_shipped_configs_parse_from_another_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = parse("--config", f"configs/{name}")
    assert a.forward_type == "xnor" and a.enable_ags and a.enable_dampen
    assert a.num_classes == datasets.NUM_CLASSES[a.set]


def test_config_lookup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "configs/smallscale/w1a1-ovsw-resnet20-cifar10.yaml"
    shipped = configs.find_config(name)
    assert shipped.is_file() and shipped.parent.parent.name == "configs"
    assert configs.find_config("./" + name) == shipped
    assert configs.find_config("/elsewhere/" + name) == shipped
    assert configs.find_config("w1a1-ovsw-resnet20-cifar10.yaml") == shipped
    # A real file of that path wins.
    real = tmp_path / name
    real.parent.mkdir(parents=True)
    real.write_text("forward_type: xnor\nset: CIFAR10\nlr: 0.25\n")
    assert configs.find_config(name) == Path(name)
    assert parse("--config", name).lr == 0.25


# -- pieces of the loop -------------------------------------------------------------------------


def test_lr_policies():
    a = parse("--forward-type", "xnor", "--lr", "0.1", "--epochs", "10")
    assert optimizers.lr_at(a, 0) == optimizers.lr_at(a, 9) == 0.1
    a = parse(
        "--forward-type", "xnor", "--lr-policy", "cosine_lr", "--epochs", "10",
        "--warmup_length", "2",
    )  # fmt: skip
    assert optimizers.lr_at(a, 0) == pytest.approx(0.05) and optimizers.lr_at(
        a, 1
    ) == pytest.approx(0.1)
    assert optimizers.lr_at(a, 2) == pytest.approx(0.1 + 1e-5)
    assert optimizers.lr_at(a, 6) == pytest.approx(0.05 + 1e-5)
    a = parse(
        "--forward-type", "xnor", "--lr-policy", "multistep_lr", "--multistep-lr-adjust", "3"
    )  # fmt: skip
    assert [round(optimizers.lr_at(a, e), 6) for e in (0, 2, 3, 6)] == [0.1, 0.1, 0.01, 0.001]


@pytest.mark.parametrize("name", train_args.OPTIMIZERS)
def test_optimizers_and_no_bn_decay(name):
    a = parse("--forward-type", "xnor", "--optimizer", name, "--no-bn-decay", "--wd", "0.01")
    model = ovsw.models.create("cResNet20_1w1a", num_classes=10)
    opt = optimizers.build_optimizer(model, a)
    one_d, rest = opt.param_groups
    assert one_d["weight_decay"] == 0.0 and rest["weight_decay"] == 0.01
    assert all(p.ndim == 1 for p in one_d["params"]) and all(p.ndim > 1 for p in rest["params"])


def test_lighting_noise():
    img = torch.rand(3, 8, 8)
    assert torch.equal(datasets.Lighting(0.0)(img), img)
    torch.manual_seed(0)
    out = datasets.Lighting(0.1)(img)
    shift = out - img  # one RGB offset for the whole image
    assert shift.shape == img.shape
    assert_close(shift, shift[:, :1, :1].expand_as(shift), rtol=1e-5, atol=1e-8)


def test_save_checkpoint_is_atomic(tmp_path):
    path = tmp_path / "checkpoint.pth"
    checkpoints.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    checkpoints.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    assert torch.load(path)["epoch"] == 2
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        checkpoints.save_checkpoint({"epoch": 3, "bad": lambda: 0}, path)
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temporary file left
    assert torch.load(path)["epoch"] == 2  # the old file is intact


def test_upstream_checkpoint_loads_with_no_key_dropped(capsys):
    torch.manual_seed(0)
    src = ovsw.models.create("cResNet20_1w1a", num_classes=10)
    ovsw.OvSW(torch.optim.SGD(src.parameters(), lr=0.1), src, enable_dampen=True)
    for _, m in ovsw.binary_convs(src):
        m.tracker.fill_(0.5)
    sd = {"module." + k: v for k, v in src.state_dict().items()}  # DataParallel's keys
    dst = ovsw.models.create("cResNet20_1w1a", num_classes=10)
    report = checkpoints.load_weights(dst, {"state_dict": sd}, "upstream")
    assert report["loaded"] == report["total"] == len(sd)
    assert not (report["missing"] or report["unexpected"] or report["shape_mismatch"])
    assert torch.equal(dst.layer1[0].conv1.tracker, src.layer1[0].conv1.tracker)
    # Keys that do not fit are listed, never silently ignored.
    sd["module.extra.weight"] = torch.zeros(1)
    sd["module.linear.weight"] = torch.zeros(3, 64)
    report = checkpoints.load_weights(dst, {"state_dict": sd}, "odd")
    assert report["unexpected"] == ["extra.weight"]
    assert report["shape_mismatch"] == ["linear.weight (3, 64) vs model (10, 64)"]
    out = capsys.readouterr().out
    assert "extra.weight" in out and "linear.weight" in out


# -- data sets -------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def _fake_fashion_mnist(root: Path, n_train=12, n_test=6) -> Path:
    d = root / "fashion-mnist"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for train, n in ((True, n_train), (False, n_test)):
        img, lbl = datasets.FASHION_MNIST_FILES[train]
        _write_idx(d / img, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(d / lbl, (np.arange(n) % 10).astype(np.uint8))
    return d


def test_read_idx(tmp_path):
    a = (np.arange(24).reshape(2, 3, 4) - 5).astype(">i4")
    _write_idx(tmp_path / "a.gz", a)
    out = datasets.read_idx(tmp_path / "a.gz")
    assert out.shape == (2, 3, 4) and np.array_equal(out, a)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="magic"):
        datasets.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 5) + b"\x00")
    with pytest.raises(ValueError, match="bytes"):
        datasets.read_idx(tmp_path / "short")


def test_fashion_mnist_from_idx_files(tmp_path):
    d = _fake_fashion_mnist(tmp_path)
    train = datasets.fashion_mnist(True, tmp_path)
    val = datasets.fashion_mnist(False, tmp_path)
    assert len(train) == 12 and len(val) == 6
    x, y = val[3]
    assert x.shape == (3, 32, 32) and int(y) == 3
    raw = datasets.read_idx(d / "t10k-images-idx3-ubyte.gz")[3]
    expect = (torch.tensor(raw, dtype=torch.float32) / 255 - 0.2860) / 0.3530
    assert_close(x[1, 2:30, 2:30], expect, rtol=1e-5, atol=1e-8)
    assert train[0][0].shape == (3, 32, 32)


def test_missing_data_one_line_naming_the_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "nowhere"))
    for set_name, needle in (
        ("CIFAR10", "cifar10"),
        ("CIFAR100", "cifar100"),
        ("ImageNet", "imagenet"),
        ("FashionMNIST", "fashion-mnist"),
    ):
        rc = cli.main(["--forward-type", "xnor", "--set", set_name, "--data", str(tmp_path)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert str(tmp_path / needle) in err


# -- runs end to end ----------------------------------------------------------------------------


def _ckpt(run_dir: Path, name="checkpoint.pth"):
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)


@pytest.mark.slow
def test_digits_end_to_end_then_evaluate(tmp_path, capsys):
    logs = tmp_path / "runs"
    rc = cli.main(["--config", DIGITS, "--epochs", "1", "--log-dir", str(logs), *TINY])
    out = capsys.readouterr().out
    assert rc == 0
    run_dir = logs / "w1a1-ovsw-resnet20-digits" / "default"
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("top-1 ") and "mean silent fraction 0." in summary
    assert str(run_dir) in summary
    for p in ("logs", "checkpoints", "settings.txt", "args.yaml"):
        assert (run_dir / p).exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/acc1", "val/acc1", "val/acc5", "lr", "silent/mean"} <= tags
    assert {"silent/layer1.0.conv1", "ags_ratio/layer3.2.conv2"} <= tags
    ckpt = _ckpt(run_dir)
    assert set(ckpt) >= {
        "epoch", "arch", "state_dict", "best_acc1", "best_acc5", "best_train_acc1",
        "best_train_acc5", "optimizer", "curr_acc1", "curr_acc5",
    }  # fmt: skip
    assert ckpt["epoch"] == 1 and ckpt["arch"] == "cResNet20_1w1a"
    assert "layer1.0.conv1.tracker" in ckpt["state_dict"]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["checkpoint.pth", "model_best.pth"]
    rows = list(csv.DictReader(open(logs / "results.csv")))
    assert len(rows) == 1 and rows[0]["run_dir"] == str(run_dir)
    assert rows[0]["curr_acc1"] == f"{ckpt['curr_acc1']:.2f}"
    # args.yaml works as a config again.
    again = train_args.parse_args(["--config", str(run_dir / "args.yaml")])
    assert again.epochs == 1 and again.limit_batches == 2

    # The same name again: a numbered subfolder.
    assert cli.main(["--config", DIGITS, "--epochs", "0", "--log-dir", str(logs), *TINY]) == 0
    assert (run_dir / "0" / "settings.txt").exists()
    capsys.readouterr()

    # python -m ovsw.train --evaluate --pretrained the checkpoint it wrote.
    proc = subprocess.run(
        [sys.executable, "-m", "ovsw.train", "--config", DIGITS, "--evaluate", "--pretrained",
         str(run_dir / "checkpoints" / "model_best.pth"), "--batch-size", "128"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()
    assert "loaded 157 of 157" in last[0]
    assert last[-1].startswith("top-1 ") and "top-5 " in last[-1]


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    base = ["--config", DIGITS, "--epochs", "2", *TINY, "--lr", "0.5", "--dampen_weight", "0.01"]
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
    first = tmp_path / "b" / "w1a1-ovsw-resnet20-digits" / "default"
    one = _ckpt(first)["state_dict"]["layer1.0.conv1.weight"]
    resumed = cli.run([*base, "--log-dir", str(tmp_path / "b"), "--resume", str(first)])["run_dir"]
    assert resumed == first  # continued in its own run folder

    a, b = _ckpt(straight), _ckpt(resumed)
    assert a["epoch"] == b["epoch"] == 2
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert not torch.equal(one, a["state_dict"]["layer1.0.conv1.weight"])  # epoch 2 did train
    ma, mb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(ma[i]["momentum_buffer"], mb[i]["momentum_buffer"]) for i in ma)


def test_fashion_mnist_run(tmp_path, capsys):
    _fake_fashion_mnist(tmp_path / "data")
    rc = cli.main(
        ["--config", "configs/smallscale/w1a1-ovsw-resnet20-fashionmnist.yaml", "--epochs", "1",
         "--data", str(tmp_path / "data"), "--log-dir", str(tmp_path / "runs"), *TINY]
    )  # fmt: skip
    assert rc == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("top-1 ")


# -- the sweep -----------------------------------------------------------------------------------


def test_sweep_grid_parses(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert sweep.main([]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("ovsw-train --config ") for line in lines)
    imagenet = sweep.grid("imagenet")
    assert _bash_argv(README_COMMANDS[0]) == imagenet[0]
    arches = []
    for cmd in sweep.grid("all"):
        a = train_args.parse_args(cmd)
        arches.append(a.arch)
        assert a.enable_ags and a.enable_dampen
    assert arches == [
        "ResNet18_1w1a", "ResNet34_1w1a", "cResNet18_1w1a", "cResNet20_1w1a", "VGGSmall_1w1a"
    ]  # fmt: skip


# -- user mistakes: exit status 2 and one line, no traceback (issue 9) ----------------------


def cli_error(capsys, *argv) -> str:
    """Run the console entry point; it must exit 2 with exactly one stderr line."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse's errors leave through SystemExit
        rc = e.code
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("ovsw-train: error: "), err
    return lines[0]


def _digits_checkpoint(path: Path, arch="cResNet20_1w1a", num_classes=10, **extra) -> Path:
    torch.manual_seed(0)
    model = ovsw.models.create(arch, num_classes=num_classes)
    state = {"epoch": 1, "arch": arch, "state_dict": model.state_dict(), **extra}
    checkpoints.save_checkpoint(state, path)
    return path


def test_track_momentum_one_is_refused_while_parsing(tmp_path, capsys, monkeypatch):
    def no_data(*a, **k):
        raise AssertionError("data sets built before the flag was checked")

    monkeypatch.setattr(datasets, "build", no_data)
    err = cli_error(capsys, "--config", DIGITS, "--track_momentum", "1.0")
    assert "--track_momentum" in err and "track_momentum must be in [0, 1), got 1" in err
    # the largest values below 1 the parser takes, the core takes too
    a = parse("--forward-type", "xnor", "--track_momentum", "0.999999")
    model = ovsw.models.create("cResNet20_1w1a")
    ovsw.OvSW(torch.optim.SGD(model.parameters(), lr=0.1), model, track_momentum=a.track_momentum)


# Values at and around every finite end of every float option's range, plus odd ones.
_PROBES = (-1.0, -1e-12, 0.0, 1e-12, 0.5, 1.0 - 1e-9, 1.0, 1.0 + 1e-9, 2.0, 1e9)


@pytest.mark.parametrize(
    "option",
    [o for o in ovsw._core.ovsw_options() if o["type"] == "float"],
    ids=lambda o: o["name"],
)
def test_cli_accepts_exactly_what_the_core_accepts(option, capsys):
    # The flag is derived from the core's option table: for every probe value the parser
    # and ovsw._core.OvSWConfig agree on whether it is valid.
    name = option["name"]
    for value in _PROBES:
        try:
            ovsw._core.OvSWConfig(**{name: value})
            core_ok = True
        except ValueError:
            core_ok = False
        try:
            parsed = parse("--forward-type", "xnor", f"--{name}", repr(value))
            cli_ok = True
        except SystemExit:
            capsys.readouterr()
            cli_ok = False
        assert cli_ok == core_ok, f"--{name} {value!r}: parser {cli_ok}, core {core_ok}"
        if cli_ok:
            assert getattr(parsed, name) == value


def test_every_ovsw_option_is_a_flag_with_the_core_default():
    args = parse("--forward-type", "xnor")
    for option in ovsw._core.ovsw_options():
        assert getattr(args, option["name"]) == option["default"], option["name"]
    assert train_args.ACT_W == tuple(ovsw._core.act_w_names())


@pytest.mark.parametrize("kind", ["text", "list", "dict", "pickle"])
def test_pretrained_that_is_not_a_checkpoint(kind, tmp_path, capsys):
    path = tmp_path / "weights.pth"
    if kind == "text":
        path.write_text("hello, not a checkpoint\n")
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "dict":
        torch.save({"epoch": 3, "note": "no tensors"}, path)
    else:  # a plain pickle, not torch's zip format
        import pickle

        path.write_bytes(pickle.dumps({"state_dict": {"w": 1}}))
    for mode in ([], ["--evaluate"]):
        err = cli_error(capsys, "--config", DIGITS, *mode, "--pretrained", str(path))
        assert str(path) in err and "checkpoint" in err


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "empty"])
def test_resume_from_a_damaged_checkpoint(damage, tmp_path, capsys):
    path = _digits_checkpoint(tmp_path / "checkpoint.pth")
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "corrupt":
        path.write_bytes(raw[:100] + bytes(b ^ 0x5A for b in raw[100:400]) + raw[400:])
    else:
        path.write_bytes(b"")
    err = cli_error(
        capsys, "--config", DIGITS, "--resume", str(path), "--log-dir", str(tmp_path / "r")
    )
    assert f"{path} is not a readable checkpoint" in err
    assert not (tmp_path / "r").exists()  # refused before a run folder was made


def test_checkpoint_of_another_architecture_is_refused(tmp_path, capsys):
    vgg = _digits_checkpoint(tmp_path / "vgg.pth", arch="VGGSmall_1w1a")
    base = ["--config", DIGITS, "--epochs", "0", "--log-dir", str(tmp_path / "r")]
    for flag in (["--resume"], ["--pretrained"], ["--evaluate", "--pretrained"]):
        err = cli_error(capsys, *base, *flag, str(vgg))
        assert "VGGSmall_1w1a" in err and "cResNet20_1w1a" in err
    # the same weights without the arch entry: no parameter of it fits
    sd = torch.load(vgg, weights_only=True)["state_dict"]
    bare = tmp_path / "bare.pth"
    torch.save(sd, bare)
    for flag in (["--resume"], ["--pretrained"], ["--evaluate", "--pretrained"]):
        assert "none of its parameters fits" in cli_error(capsys, *base, *flag, str(bare))


def test_checkpoint_of_another_class_count(tmp_path, capsys):
    ten = _digits_checkpoint(tmp_path / "ten.pth")
    base = ["--config", DIGITS, "--num-classes", "5", "--log-dir", str(tmp_path / "r")]
    err = cli_error(capsys, *base, "--resume", str(ten))
    assert "does not fit" in err and "linear.weight (10, 64) vs model (5, 64)" in err
    err = cli_error(capsys, *base, "--evaluate", "--pretrained", str(ten))
    assert "does not fit" in err and "linear.weight" in err
    # fine-tuning (--pretrained without --evaluate) takes what fits and reports the rest
    assert cli.main([*base, "--epochs", "0", "--pretrained", str(ten), *TINY]) == 0
    out = capsys.readouterr().out
    assert "skipped, shape does not fit (2): linear.weight (10, 64) vs model (5, 64)" in out


def test_run_folder_that_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for log_dir in (blocker, blocker / "runs"):
        err = cli_error(capsys, "--config", DIGITS, "--epochs", "0", "--log-dir", str(log_dir))
        assert "cannot write the run folder" in err and str(blocker) in err


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders"
)
def test_run_folder_under_a_read_only_folder(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        err = cli_error(
            capsys, "--config", DIGITS, "--epochs", "0", "--log-dir", str(locked / "runs")
        )
    finally:
        locked.chmod(0o700)
    assert "cannot write the run folder" in err and "Permission denied" in err


@pytest.mark.slow
def test_console_script_errors_are_one_line(tmp_path):
    """The real entry point (python -m ovsw.train): status 2, one stderr line, no traceback."""
    broken = _digits_checkpoint(tmp_path / "checkpoint.pth")
    broken.write_bytes(broken.read_bytes()[:1000])
    for argv in (
        ["--config", DIGITS, "--track_momentum", "1.0"],
        ["--config", DIGITS, "--resume", str(broken), "--log-dir", str(tmp_path / "r")],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "ovsw.train", *argv],
            capture_output=True, text=True, cwd=tmp_path, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("ovsw-train: error: "), proc.stderr


# -- devices and resuming in the run's own folder (issue 9) ---------------------------------


def test_device_selection_without_gpu_flag_names_the_current_cuda_device(monkeypatch):
    """Without --gpu on a CUDA machine the device is cuda:<current>, and it is made
    current; torch.cuda.set_device (its real index check kept) refuses a bare "cuda"."""
    made_current = []

    def set_device(device):
        made_current.append(torch.cuda._utils._get_device_index(device))  # torch's own check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    assert cli.select_device(None) == torch.device("cuda", 1) and made_current == [1]
    assert cli.select_device(0) == torch.device("cuda", 0) and made_current == [1, 0]
    with pytest.raises(ValueError, match="specified index"):  # what the old code hit
        set_device(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.select_device(None) == torch.device("cpu") and made_current == [1, 0]


@pytest.mark.cuda
def test_one_epoch_on_cuda_without_gpu_flag(tmp_path):
    result = cli.run(
        ["--config", DIGITS, "--epochs", "1", "--log-dir", str(tmp_path / "runs"), *TINY]
    )
    params = list(result["model"].parameters())
    assert all(p.device == torch.device("cuda", torch.cuda.current_device()) for p in params)
    assert _ckpt(result["run_dir"])["epoch"] == 1


def _scalars(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


@pytest.mark.slow
def test_resume_without_name_continues_in_the_checkpoints_run_folder(tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    base = ["--config", DIGITS, *TINY, "--log-dir", str(logs)]
    cli.run([*base, "--epochs", "1", "--name", "mine"])
    run_dir = logs / "w1a1-ovsw-resnet20-digits" / "mine"
    other = cli.run([*base, "--epochs", "1"])["run_dir"]  # a second run, its own row
    (row,) = [r for r in csv.DictReader(open(logs / "results.csv")) if r["name"] == "mine"]
    assert row["epochs"] == "1"

    # from elsewhere, without --log-dir: the run's own folder and its own results.csv
    monkeypatch.chdir(tmp_path)
    ckpt = run_dir / "checkpoints" / "checkpoint.pth"
    result = cli.run(["--config", DIGITS, *TINY, "--epochs", "2", "--resume", str(ckpt)])
    assert result["run_dir"] == run_dir
    assert sorted(p.name for p in (logs / "w1a1-ovsw-resnet20-digits").iterdir()) == [
        "default",
        "mine",
    ]  # no new folder
    assert not (tmp_path / "runs").exists()  # nothing under the default --log-dir
    assert _ckpt(run_dir)["epoch"] == 2
    # Both epochs in the same logs/. The two runs' event files are read in file-name
    # order, which for two writers started in the same second compares their counters
    # as text ("10" before "9"), so the steps are compared as a set.
    assert sorted(_scalars(run_dir, "val/acc1")) == [0, 1]
    rows = list(csv.DictReader(open(logs / "results.csv")))
    assert [r["run_dir"] for r in rows] == [str(run_dir), str(other)]  # updated in place
    assert rows[0]["epochs"] == "2" and rows[0]["name"] == "mine"
    assert rows[0]["curr_acc1"] == f"{_ckpt(run_dir)['curr_acc1']:.2f}"
    settings = (run_dir / "settings.txt").read_text()
    assert settings.count("command: ovsw-train") == 2 and "# resumed" in settings
    assert train_args.parse_args(["--config", str(run_dir / "args.yaml")]).epochs == 2

    # with --name, a resumed run starts a new folder (and row) of that name
    again = cli.run([*base, "--epochs", "3", "--resume", str(run_dir), "--name", "longer"])
    assert again["run_dir"] == logs / "w1a1-ovsw-resnet20-digits" / "longer"
    assert len(list(csv.DictReader(open(logs / "results.csv")))) == 3


def test_missing_training_extras_are_one_line(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("yaml", "sklearn") else real(name, *a),
    )
    err = cli_error(capsys, "--config", DIGITS)
    assert "yaml, sklearn missing" in err and 'pip install "ovsw[train]"' in err
