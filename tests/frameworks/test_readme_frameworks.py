"""The README's framework example (PyTorch on the wafer, trained one step) runs as written."""

import pathlib
import re

import numpy as np
import torch

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_frameworks_example_runs():
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "compiler.from_torch" in b]
    assert blocks, "README.md has no python example using compiler.from_torch"
    ns: dict = {}
    exec(compile(blocks[0], str(README), "exec"), ns)
    net, x, out = ns["net"], ns["x"], ns["out"]
    net.eval()
    assert np.isfinite(float(ns["metrics"]["loss"]))
    with torch.no_grad():  # the module now holds the trained params: its output moved away from `out`
        assert not np.allclose(net(torch.from_numpy(x)).numpy(), np.asarray(out), atol=1e-6)
