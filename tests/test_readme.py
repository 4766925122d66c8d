"""The README's examples run as written."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _run_block(marker: str) -> dict:
    """Execute the README's python block that contains `marker`; return its namespace."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    matching = [b for b in blocks if marker in b]
    assert matching, f"README.md has no python example using {marker}"
    namespace = {}
    exec(compile(matching[0], str(README), "exec"), namespace)
    return namespace


def test_readme_training_example_runs():
    ns = _run_block("compiler.fit")
    history, tx = ns["history"], ns["tx"]
    assert [row["step"] for row in history] == list(range(1, 101))
    assert history[-1]["loss"] < 0.75 * history[0]["loss"]
    assert tx.report.samples_per_s > 0
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in ns["jax"].tree_util.tree_leaves(ns["trained"]))


def test_readme_stencil_example_runs():
    ns = _run_block("wafer.halo_exchange")
    state, record, spec = ns["state"], ns["record"], ns["spec"]
    assert int(state.steps) == 100
    assert float(state.clock) == 100 * float(record.cycles(spec))
