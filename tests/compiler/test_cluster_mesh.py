"""The wafers' states on a JAX device mesh with a wafer axis (compiler/run/cluster.py): bit-identical to one device,
with forced host devices and across two processes (jax.distributed on localhost, experiments/cluster_distributed.py).

The devices are forced host devices (XLA_FLAGS=--xla_force_host_platform_device_count=4), which must be set before
JAX starts, so the check runs in a fresh process: this module, run as a script, is that process.
    python tests/compiler/test_cluster_mesh.py OUT.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

WAFERS = 4


def test_states_on_a_wafer_mesh_are_bit_identical_to_one_device(tmp_path):
    out = tmp_path / "out.json"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={WAFERS}", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    for mode in ("pipelined", "weight_streaming"):
        r = result[mode]
        assert r["devices"] == WAFERS, r  # one wafer per device
        assert r["sharded_leaves"] > 0 and r["stays_sharded"]
        assert r["identical"], f"{mode}: leaves differ: {r['differ']}"
        assert r["losses_mesh"] == r["losses_one"]


def _check(mode: str) -> dict:
    import jax
    import numpy as np
    import optax
    from test_cluster import _problem

    import compiler
    import wafer

    loss_fn, params, batches = _problem()
    spec = wafer.WaferSpec.mini(8, 8)
    mesh = compiler.cluster_mesh(WAFERS)
    compile_ = lambda **kw: compiler.compile_train(  # noqa: E731
        loss_fn, params, batches.batch(0), optax.adam(0.05), spec=spec, mode=mode, wafers=WAFERS, **kw
    )
    on_one, on_mesh = compile_(), compile_(mesh=mesh)

    def run(tx):
        state, losses = tx.init(params), []
        for i in range(3):
            state, metrics = tx.step(state, batches.batch(i))
            losses.append(float(metrics["loss"]))
        return state, losses

    one, losses_one = run(on_one)
    mesh_state, losses_mesh = run(on_mesh)
    per_wafer = jax.tree_util.tree_leaves(mesh_state.wafer)  # SRAM (pipelined) and counters
    a, b = jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(mesh_state)
    differ = [i for i, (u, v) in enumerate(zip(a, b)) if not np.array_equal(np.asarray(u), np.asarray(v))]
    return {
        "devices": len(mesh.devices.flat),
        "sharded_leaves": len(per_wafer),
        # the jitted step keeps each wafer's state on its own device
        "stays_sharded": all(
            len(x.sharding.device_set) == WAFERS and x.addressable_shards[0].data.shape[0] == 1 for x in per_wafer
        ),
        "identical": not differ and len(a) == len(b),
        "differ": differ,
        "losses_one": losses_one,
        "losses_mesh": losses_mesh,
    }


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    result = {mode: _check(mode) for mode in ("pipelined", "weight_streaming")}
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)


def test_two_processes_with_jax_distributed_are_bit_identical_to_one():
    script = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "cluster_distributed.py")
    done = subprocess.run(
        [sys.executable, os.path.abspath(script), "--steps", "2"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "bit-identical: losses True, params True" in done.stdout
