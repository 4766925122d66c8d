"""The cost model is the schedule on a relaxed layout: at temperature 0 on a compiled plan's own layout it returns
the report's figures and what the emulator charges, exactly (to float32 rounding; float64 with x64), for every zoo
model, for automatic and random hand placements, in inference and training; and it is jittable, vmappable,
differentiable."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from model_zoo import MODELS, mean_square_loss

import compiler
import wafer
from compiler import costmodel as cm

SPECS = {"mini": wafer.WaferSpec.mini(16, 16), "wse2": wafer.WSE2}
RTOL = 2e-6  # float32 evaluation of the same formulas (a few roundings of cycle sums)


@pytest.fixture(scope="module")
def compiled():
    out = {}
    for sname, spec in SPECS.items():
        for name in MODELS:
            case = MODELS[name]()
            out[sname, name] = compiler.compile(*case.trace_args(), spec=spec)
    return out


def _agree(program, spec, clock=None):
    """The cost model at tau=0 on the program's layout equals the report, per kernel and for the program."""
    feats, lay = cm.features(program), cm.layout_of(program)
    pred = jax.jit(cm.predict, static_argnums=2)(feats, lay, spec)
    report, sched = program.report, program.schedule
    for key in ("cycles", "compute", "comm", "cores", "weight_bytes", "act_bytes"):
        np.testing.assert_allclose(np.asarray(pred["kernel"][key]), sched.kernels[key], rtol=RTOL, err_msg=key)
    rows = {r.name: r for r in report.kernels}
    np.testing.assert_allclose(
        np.asarray(pred["cycles_per_sample"]), [rows[n].cycles_per_sample for n in feats.names], rtol=RTOL
    )
    np.testing.assert_allclose(float(pred["samples_per_s"]), report.samples_per_s, rtol=RTOL)
    np.testing.assert_allclose(float(pred["latency_cycles"]), report.latency_cycles, rtol=RTOL)
    assert int(pred["cores"]) == report.active_cores
    assert int(pred["peak_sram_bytes"]) == report.peak_sram_bytes_per_core
    assert int(pred["hops"]) == report.route_hops
    if clock is not None:  # what the emulator charged its clock for one call or step
        np.testing.assert_allclose(float(pred["call_cycles"]), clock, rtol=RTOL)


@pytest.mark.parametrize("sname", list(SPECS))
@pytest.mark.parametrize("name", list(MODELS))
def test_cost_model_equals_report_and_emulator(compiled, sname, name):
    exe = compiled[sname, name]
    state = exe.load()
    _, state = exe(state, *MODELS[name]().inputs)
    _agree(exe, SPECS[sname], float(state.clock))
    assert compiler.estimate(exe).to_dict() == exe.report.to_dict()


@pytest.mark.parametrize("name", ["mlp", "lenet", "encoder_block", "decoder_lm", "rnn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cost_model_equals_report_for_random_hand_placements(compiled, name, seed):
    """Random valid placements (random areas legalised by the compiler's floorplan, placed anew), compiled by hand."""
    spec = SPECS["mini"]
    auto = compiled["mini", name]
    rng = np.random.default_rng(seed)
    ds = auto.plan.demands
    least = np.array([d.least_cores for d in ds], float)
    usable = compiler.usable_region(spec).cores
    areas = least + (usable - least.sum()) * rng.dirichlet(np.ones(len(ds))) * rng.uniform(0.3, 1.0)
    weighted = [compiler.KernelDemand(d.name, float(a), min_cores=d.min_cores) for d, a in zip(ds, areas)]
    order = ("serpentine", "rows", "columns")[seed % 3]
    params = compiler.PlacementParams(order=order, min_aspect=0.0, max_aspect=float("inf"), fraction=0.9)
    hand = compiler.place(weighted, spec, params)
    exe = compiler.compile(*MODELS[name]().trace_args(), spec=spec, placement=hand)
    assert exe.placement == hand
    state = exe.load()
    _, state = exe(state, *MODELS[name]().inputs)
    _agree(exe, spec, float(state.clock))


@pytest.mark.parametrize("mode", ["pipelined", "weight_streaming"])
@pytest.mark.parametrize("name", ["mlp", "lenet", "encoder_block", "decoder_lm", "plain_jax", "rnn"])
def test_cost_model_equals_report_in_training(name, mode):
    spec = SPECS["mini"]
    case = MODELS[name]()
    tx = compiler.compile_train(
        mean_square_loss(case), case.params, case.inputs, optax.adam(1e-3), spec=spec, mode=mode
    )
    state, _ = tx.step(tx.init(case.params), case.inputs)
    _agree(tx, spec, float(state.wafer.clock))
    assert compiler.estimate(tx.plan).to_dict() == tx.report.to_dict()


def test_rnn_training_equals_native_optax():
    """The rnn zoo model (a scan whose weight dots the partition tiles, records and charges): three pipelined steps
    give native optax's parameters, and the clock and counters are the schedule's (three steps' worth)."""
    spec = SPECS["mini"]
    case = MODELS["rnn"]()
    loss, opt = mean_square_loss(case), optax.adam(1e-2)
    tx = compiler.compile_train(loss, case.params, case.inputs, opt, spec=spec, mode="pipelined")
    assert tx.plan.kernels["scan_0"].traffic.words > 0 and tx.plan.kernels["scan_0"].backward_traffic.words > 0
    state = tx.init(case.params)
    params, opt_state = case.params, opt.init(case.params)
    for _ in range(3):
        state, _ = tx.step(state, case.inputs)
        updates, opt_state = opt.update(jax.grad(loss)(params, case.inputs), opt_state, params)
        params = optax.apply_updates(params, updates)
    for g, w in zip(jax.tree.leaves(tx.read_params(state)), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(state.wafer.links), 3 * compiler.schedule.link_words(tx.plan).astype(np.float32)
    )
    assert float(state.wafer.clock) == pytest.approx(3 * tx.schedule.step_cycles, rel=1e-6)


def test_estimate_on_another_spec(compiled):
    exe = compiled["mini", "mlp"]
    fast = exe.spec.with_(clock_hz=1.1e9)
    est = compiler.estimate(exe, fast)
    assert est.to_dict().keys() == exe.report.to_dict().keys()
    np.testing.assert_allclose(est.samples_per_s / exe.report.samples_per_s, 1.1e9 / exe.spec.clock_hz, rtol=1e-12)
    pred = cm.predict(cm.features(exe), cm.layout_of(exe), fast)
    np.testing.assert_allclose(float(pred["samples_per_s"]), est.samples_per_s, rtol=RTOL)


def test_x64_evaluation_is_exact():
    """With JAX's x64 mode the cost model is the report to float64 rounding."""
    code = textwrap.dedent(
        """
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp, numpy as np
        from model_zoo import MODELS
        import compiler, wafer
        from compiler import costmodel as cm
        for name in ("mlp", "encoder_block", "lenet"):
            exe = compiler.compile(*MODELS[name]().trace_args(), spec=wafer.WSE2)
            f, lay = cm.features(exe), cm.layout_of(exe)
            f, lay = f.as_jax(jnp.float64), lay.as_jax(jnp.float64)
            pred = cm.predict(f, lay, wafer.WSE2)
            np.testing.assert_allclose(np.asarray(pred["kernel"]["cycles"]), exe.schedule.kernels["cycles"], rtol=1e-14)
            np.testing.assert_allclose(float(pred["samples_per_s"]), exe.report.samples_per_s, rtol=1e-14)
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": "tests"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


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
