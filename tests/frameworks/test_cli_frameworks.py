"""`wafer compile FILE:FACTORY` where the factory returns a torch module or a Keras model with its inputs: compiled,
run once and checked against the framework's own forward (compiler/cli.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("factory", ["cnn", "kmlp"], ids=["torch-cnn", "keras-mlp"])
def test_wafer_compile_a_framework_factory(factory, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "compiler.cli", "compile", f"{HERE / 'cli_factories.py'}:{factory}", "--preset", "mini",
         "--rows", "16", "--cols", "16", "--out", str(tmp_path), "--no-pictures"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "KERAS_BACKEND": "jax"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "forward pass: emulated vs native" in out.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["active_cores"] > 0
