"""``python -m ovsw.deploy profile``: each op's time and the stem's share (issue 22)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ovsw.deploy as deploy
from ovsw.deploy import OpTime
from ovsw.deploy._bench import calibrated
from ovsw.deploy._profile import report, stem


def op(name: str, kind: str, ms: float) -> OpTime:
    return OpTime(name, kind, (1, 8, 4, 4), ms / 1e3)


def test_the_stem_is_what_runs_before_the_first_binary_conv():
    times = [op("conv1", "conv2d", 3), op("pool", "maxpool", 1), op("b1", "bconv2d", 4)]
    times += [op("down", "conv2d", 2)]
    assert [t.name for t in stem(times)] == ["conv1", "pool"]
    # 4 of 10 ms.
    assert report(times).splitlines()[-1] == (
        "stem (the ops before the first binary conv: conv1, pool): 4.000 ms, 40.0% of 10.000 ms"
    )
    # A network without a binary conv is all stem.
    assert stem(times[:2]) == times[:2]


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "r18.ovsw"
    deploy.export(calibrated("ResNet18_1w1a", 64), path, input_size=64)
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ovsw.deploy", "profile", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_profile_prints_every_op_and_the_stem_share(resnet_file):
    r = cli(resnet_file, "--repeats", "2", "--batch", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "input 3x64x64, batch 2, 1 threads" in lines[0]
    ops = deploy.load(resnet_file).ops
    # One row per op, in order, after the header lines.
    assert [line.split()[2] for line in lines[2:-1]] == [name for name, _ in ops]
    assert lines[-1].startswith("stem (the ops before the first binary conv: conv1, maxpool): ")
    share = float(lines[-1].split(", ")[-1].split("%")[0])
    assert 0 < share < 100


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch", "0"], "--batch must be positive, got 0"),
        (["--size", "0"], "--size must be positive, got 0"),
    ],
)
def test_bad_arguments_get_one_line(resnet_file, args, message):
    r = cli(resnet_file, *args)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_missing_file_gets_one_line(tmp_path):
    r = cli(tmp_path / "none.ovsw")
    assert r.returncode == 1 and r.stderr.startswith("error: "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
