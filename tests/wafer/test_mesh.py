"""wafer.mesh: the wafer's state on a device mesh gives bit-identical results, sharded where the grid divides.

Several devices are faked with XLA_FLAGS=--xla_force_host_platform_device_count=4 in a subprocess (the flag
must be set before JAX starts); the subprocess runs every case once and reports JSON, which the tests read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import wafer
from wafer.mesh import grid_sharding, mesh_shape

N_DEVICES = 4

# Runs in the subprocess: a 7-point stencil built on wafer primitives (halo exchange, per-core update, Z
# neighbours from the core's own column), and a multicast + reduce step, each run for a few steps on one device
# and on `wafer.shard(state, wafer.make_mesh(spec))`.
_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import wafer

    ALPHA, Z, STEPS = 0.1, 6, 4

    def column_update(u, n, s, w, e):
        zero = jnp.zeros((), u.dtype)
        total = n + s + w + e + jax.lax.pad(u, zero, [(1, -1, 0)]) + jax.lax.pad(u, zero, [(-1, 1, 0)])
        return (1.0 - 6.0 * ALPHA) * u + ALPHA * total

    def stencil_step(state):
        u = state.read("data")
        halo, traffic = wafer.halo_exchange(u, 1)
        new, kc = wafer.map_cores(column_update, u, halo["N"], halo["S"], halo["W"], halo["E"])
        return state.write("data", new), wafer.superstep(kc, traffic)

    def collective_step(state):
        # Row multicast from the middle core, then a column sum to every core: all-gathers and all-reduces
        # once sharded. Values are small integers, so every summation order is exact.
        u = state.read("data")
        row, t1 = wafer.multicast(u, "row", src=u.shape[1] // 2)
        col, t2 = wafer.reduce(u, "col", "sum", to="all")
        new, kc = wafer.map_cores(lambda a, b, c: jnp.floor(0.5 * (a + b) + 0.25 * c) - 3.0, u, row, col)
        return state.write("data", new), wafer.superstep(kc, t1 + t2)

    def shard_shapes(x):
        return sorted({tuple(s.data.shape) for s in x.addressable_shards})

    def case(name, rows, cols, step, integers):
        spec = wafer.WaferSpec.mini(rows, cols)
        rng = np.random.default_rng(0)
        u0 = rng.integers(-8, 8, (rows, cols, Z)) if integers else rng.uniform(-1, 1, (rows, cols, Z))
        u0 = u0.astype(np.float32)
        run = jax.jit(lambda s: wafer.run(s, spec, step, STEPS)[0], donate_argnums=0)
        one = run(wafer.init(spec, words=Z, value=u0))
        mesh = wafer.make_mesh(spec)
        placed = wafer.shard(wafer.init(spec, words=Z, value=u0), mesh)
        placed_info = {
            "sram_spec": [str(a) for a in placed.sram["data"].sharding.spec],
            "sram_shards": shard_shapes(placed.sram["data"]),
            "links_shards": shard_shapes(placed.links),
            "busy_shards": shard_shapes(placed.busy),
        }
        out = run(placed)
        fields = {"sram": lambda s: s.sram["data"], "links": lambda s: s.links, "busy": lambda s: s.busy,
                  "clock": lambda s: s.clock, "steps": lambda s: s.steps}
        return {
            "mesh": [mesh.shape["rows"], mesh.shape["cols"]],
            "devices": len(placed.sram["data"].sharding.device_set),
            "placed": placed_info,
            "out_shards": shard_shapes(out.sram["data"]),
            "out_links_shards": shard_shapes(out.links),
            "equal": {k: bool(np.array_equal(np.asarray(f(one)), np.asarray(f(out)))) for k, f in fields.items()},
            "finite": bool(np.isfinite(np.asarray(out.sram["data"])).all()),
            "changed": bool(not np.array_equal(np.asarray(out.sram["data"]), u0)),
        }

    assert len(jax.devices()) == %(n)d, jax.devices()
    results = {
        "stencil-8x12": case("stencil-8x12", 8, 12, stencil_step, False),
        "stencil-7x10": case("stencil-7x10", 7, 10, stencil_step, False),
        "stencil-13x9": case("stencil-13x9", 13, 9, stencil_step, False),
        "stencil-757x8": case("stencil-757x8", 757, 8, stencil_step, False),
        "collective-8x12": case("collective-8x12", 8, 12, collective_step, True),
        "collective-7x10": case("collective-7x10", 7, 10, collective_step, True),
    }
    results["make_mesh"] = {
        "wse2": dict(wafer.make_mesh(wafer.WSE2).shape),
        "wse3": dict(wafer.make_mesh(wafer.WSE3).shape),
        "forced": dict(wafer.make_mesh(wafer.WSE2, shape=(2, 2)).shape),
    }
    print("RESULTS " + json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEVICES}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT % {"n": N_DEVICES}], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    return json.loads(line[len("RESULTS ") :])


# name -> (expected mesh, expected SRAM shard shape): grids that divide are split; axes that do not are replicated.
CASES = {
    "stencil-8x12": ((2, 2), (4, 6, 6)),
    "stencil-7x10": ((2, 2), (7, 5, 6)),  # 7 rows do not divide by 2: rows replicated, columns split
    "stencil-13x9": ((1, 4), (13, 9, 6)),  # nothing divides 13 x 9 over 4 devices: replicated, no core dropped
    "stencil-757x8": ((1, 4), (757, 2, 6)),  # WSE-2-like prime row count: split along columns only
    "collective-8x12": ((2, 2), (4, 6, 6)),
    "collective-7x10": ((2, 2), (7, 5, 6)),
}


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_sharded_run_is_bit_identical(results, name):
    r = results[name]
    assert r["equal"] == {"sram": True, "links": True, "busy": True, "clock": True, "steps": True}
    assert r["finite"] and r["changed"]


@pytest.mark.parametrize("name", list(CASES), ids=list(CASES))
def test_state_is_sharded_where_the_grid_divides(results, name):
    mesh, sram_shard = CASES[name]
    r = results[name]
    assert tuple(r["mesh"]) == mesh
    assert r["devices"] == N_DEVICES
    assert [tuple(s) for s in r["placed"]["sram_shards"]] == [sram_shard]
    assert [tuple(s) for s in r["out_shards"]] == [sram_shard]  # jitted steps keep the placement
    rows, cols = sram_shard[:2]
    assert [tuple(s) for s in r["placed"]["links_shards"]] == [(4, rows, cols)]
    assert [tuple(s) for s in r["out_links_shards"]] == [(4, rows, cols)]
    assert [tuple(s) for s in r["placed"]["busy_shards"]] == [(rows, cols)]


def test_make_mesh_on_four_devices(results):
    m = results["make_mesh"]
    assert m["wse2"] == {"rows": 1, "cols": 4}  # 757 rows are prime; 996 = 4 x 249
    assert m["wse3"] == {"rows": 2, "cols": 2}  # 762 x 1172 both even: squarer cuts
    assert m["forced"] == {"rows": 2, "cols": 2}


@pytest.mark.parametrize(
    "rows,cols,devices,expected",
    [
        (757, 996, 4, (1, 4)),
        (757, 996, 8, (2, 4)),  # 996 % 8 != 0: four column shards, rows replicated over 2
        (757, 996, 6, (1, 6)),
        (8, 12, 4, (2, 2)),
        (7, 10, 4, (2, 2)),
        (13, 9, 4, (1, 4)),
        (8, 1024, 4, (1, 4)),  # a long thin grid is cut across its short side
        (1024, 8, 4, (4, 1)),
        (16, 16, 16, (4, 4)),
        (5, 5, 1, (1, 1)),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_mesh_shape(rows, cols, devices, expected):
    dr, dc = mesh_shape(rows, cols, devices)
    assert (dr, dc) == expected
    assert dr * dc == devices


@pytest.mark.parametrize("bad", [0, -1, 2.5, True], ids=["zero", "negative", "float", "bool"])
def test_mesh_shape_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="devices must be an int >= 1"):
        mesh_shape(8, 8, bad)


def test_make_mesh_validates():
    spec = wafer.WaferSpec.mini(8, 8)
    with pytest.raises(ValueError, match="no devices"):
        wafer.make_mesh(spec, devices=[])
    with pytest.raises(ValueError, match=r"dr \* dc == 1 devices"):
        wafer.make_mesh(spec, shape=(2, 2), devices=jax.devices()[:1])
    mesh = wafer.make_mesh(spec, devices=jax.devices()[:1])
    assert dict(mesh.shape) == {"rows": 1, "cols": 1}


def test_shard_rejects_foreign_mesh():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("x", "y"))
    with pytest.raises(ValueError, match="axes"):
        grid_sharding(mesh, (8, 8, 4))
    with pytest.raises(ValueError, match="axes"):
        wafer.shard(wafer.init(wafer.WaferSpec.mini(8, 8), words=4), mesh)


def test_shard_on_one_device_keeps_values():
    spec = wafer.WaferSpec.mini(4, 6)
    state = wafer.init(spec, words=3, value=np.arange(4 * 6 * 3, dtype=np.float32).reshape(4, 6, 3))
    placed = wafer.shard(state, wafer.make_mesh(spec, devices=jax.devices()[:1]))
    np.testing.assert_array_equal(np.asarray(placed.read("data")), np.asarray(state.read("data")))
    assert placed.memory == state.memory
