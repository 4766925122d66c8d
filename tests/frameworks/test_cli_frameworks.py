"""`wafer compile FILE:FACTORY` where the factory returns a torch module or a Keras model with its inputs: compiled,
run once and checked against the framework's own forward (compiler/cli.py). Run in process, as tests/compiler/
test_cli.py does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compiler import cli

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("factory", ["cnn", "kmlp"], ids=["torch-cnn", "keras-mlp"])
def test_wafer_compile_a_framework_factory(factory, tmp_path, capsys):
    target = f"{HERE / 'cli_factories.py'}:{factory}"
    args = ["compile", target, "--preset", "mini", "--rows", "16", "--cols", "16", "--out", str(tmp_path)]
    assert cli.main([*args, "--no-pictures"]) == 0, capsys.readouterr().err
    assert "forward pass: emulated vs native" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["active_cores"] > 0
