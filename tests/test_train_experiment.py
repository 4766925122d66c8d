"""experiments/train.py, the main job: a Flax model trained on an emulated wafer matches native training."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "train.py"
_SPEC = importlib.util.spec_from_file_location("train_experiment", _PATH)
train = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = train  # the Flax modules are dataclasses, which look their module up
_SPEC.loader.exec_module(train)

TINY = ["--rows", "16", "--cols", "16", "--steps", "20", "--batch", "16", "--eval-every", "10", "--no-progress"]


def test_main_trains_checks_and_reports(capsys):
    assert train.main(TINY) == 0
    out = capsys.readouterr().out
    for key in (
        "Trained MLP",
        "mini-16x16: 16 x 16 cores",
        "adam, lr 0.003, batch 16, 20 steps",
        "max relative difference over 20 steps",
        "OK",
        "max |emulated - native|",
        "test accuracy emulated",
        "Compile report: pipelined training on mini-16x16, batch 16",
        "Predicted on the CS-2 (WSE-2, 757 x 996 cores)",
        "Compile report: pipelined training on WSE-2, batch 16",
        "predicted throughput",
        "batch I/O",
    ):
        assert key in out, key


@pytest.mark.parametrize(
    "extra,key",
    [
        (["--model", "cnn", "--optimizer", "momentum"], "Trained CNN"),
        (["--mode", "weight_streaming", "--optimizer", "sgd"], "weight_streaming training on mini-16x16"),
    ],
    ids=["cnn-momentum", "weight-streaming-sgd"],
)
def test_main_variants(capsys, extra, key):
    assert train.main([*TINY, "--steps", "6", *extra]) == 0
    out = capsys.readouterr().out
    assert key in out and "OK" in out


def test_main_resumes_from_its_checkpoints(capsys, tmp_path):
    args = [*TINY, "--checkpoint-dir", str(tmp_path), "--checkpoint-every", "5"]
    assert train.main([*args, "--steps", "10"]) == 0
    capsys.readouterr()
    assert train.main([*args, "--steps", "20", "--progress"]) == 0  # resumes at step 10; compared over all 20
    out = capsys.readouterr().out
    assert "resumed from the checkpoint of step 10" in out
    assert "max relative difference over 20 steps" in out and "OK" in out


def test_main_reports_bad_configurations(capsys):
    assert train.main(["--rows", "2", "--cols", "2", "--mode", "pipelined", "--steps", "2", "--no-progress"]) == 2
    assert "error:" in capsys.readouterr().err
