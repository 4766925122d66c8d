"""The closed-form cost model agrees with the emulator's counters and is jittable, vmappable, differentiable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_zoo import MODELS

import compiler
import wafer
from compiler import costmodel as cm

SPECS = {"mini": wafer.WaferSpec.mini(16, 16), "wse2": wafer.WSE2}


@pytest.fixture(scope="module")
def compiled():
    out = {}
    for sname, spec in SPECS.items():
        for name in MODELS:
            case = MODELS[name]()
            out[sname, name] = compiler.compile(*case.trace_args(), spec=spec)
    return out


@pytest.mark.parametrize("sname", list(SPECS))
@pytest.mark.parametrize("name", list(MODELS))
def test_model_agrees_with_emulator_within_2_percent(compiled, sname, name):
    spec = SPECS[sname]
    exe = compiled[sname, name]
    feats, lay = cm.features(exe), cm.layout_of(exe)
    pred = jax.jit(cm.predict, static_argnums=2)(feats, lay, spec)
    emu = np.array([float(exe.plans[n].cycles(spec)) for n in feats.names])
    np.testing.assert_allclose(np.asarray(pred["kernel"]["cycles"]), emu, rtol=0.02)
    np.testing.assert_allclose(float(pred["samples_per_s"]), exe.report.samples_per_s, rtol=0.02)
    # what the emulator charges its clock for one call
    state = exe.load()
    _, state = exe(state, *MODELS[name]().inputs)
    np.testing.assert_allclose(float(pred["call_cycles"]), float(state.clock), rtol=0.02)
    np.testing.assert_allclose(float(pred["latency_cycles"]), exe.report.latency_cycles, rtol=0.02)
    assert int(pred["cores"]) == sum(p.cores for p in exe.plans.values())


def test_vmap_over_layouts_and_specs(compiled):
    exe = compiled["wse2", "mlp"]
    feats, lay = cm.features(exe), cm.layout_of(exe)
    scales = jnp.linspace(0.5, 2.0, 7)
    lays = jax.vmap(lambda s: cm.Layout(lay.height * s, lay.width, lay.row, lay.col))(scales)
    out = jax.jit(jax.vmap(lambda lo: cm.predict(feats, lo, wafer.WSE2)["samples_per_s"]))(lays)
    assert out.shape == (7,) and bool(jnp.all(out > 0))
    clocks = jnp.array([0.85e9, 1.1e9])
    spec_batch = jax.vmap(lambda c: wafer.WSE2.with_(clock_hz=c))(clocks)
    thr = jax.vmap(lambda sp: cm.predict(feats, lay, sp)["samples_per_s"])(spec_batch)
    np.testing.assert_allclose(float(thr[1] / thr[0]), 1.1 / 0.85, rtol=1e-5)


def test_gradients_wrt_hardware_and_placement(compiled):
    exe = compiled["wse2", "lenet"]
    feats, lay = cm.features(exe), cm.layout_of(exe)
    g_spec = jax.grad(lambda sp: cm.predict(feats, lay, sp, tau=1.0)["samples_per_s"])(wafer.WSE2)
    assert float(g_spec.clock_hz) > 0  # a faster clock is faster
    for leaf in jax.tree_util.tree_leaves(g_spec):
        assert np.isfinite(float(leaf))
    g_lay = jax.grad(lambda lo: cm.predict(feats, lo, wafer.WSE2, tau=1.0)["bottleneck_cycles"])(lay)
    assert np.all(np.isfinite(np.asarray(g_lay.height)))
    assert float(jnp.abs(g_lay.height).sum() + jnp.abs(g_lay.width).sum()) > 0


def test_temperature_recovers_exact_max(compiled):
    exe = compiled["mini", "encoder_block"]
    feats, lay = cm.features(exe), cm.layout_of(exe)
    spec = SPECS["mini"]
    exact = float(cm.predict(feats, lay, spec)["bottleneck_cycles"])
    taus = (1000.0, 100.0, 0.01)
    errs = [abs(float(cm.predict(feats, lay, spec, tau=t)["bottleneck_cycles"]) - exact) for t in taus]
    assert errs[0] > 0 and errs[0] >= errs[1] >= errs[2] and errs[2] < 1e-3 * exact
    x = jnp.array([3.0, 2.9, 1.0])
    assert float(cm.smax(x, 1.0)) > float(cm.smax(x, 0.1)) > float(cm.smax(x, 0.001)) >= 3.0
    np.testing.assert_allclose(float(cm.smax(x, 0.001)), 3.0, rtol=1e-5)
