"""Compiling onto a defective wafer (spec.with_defects; wafer/defects.py): the compile, the numerics and training are
those of a perfect wafer; only cycles change, by the extra hops of remapped links, charged once by the schedule
(report == estimate == cost model at tau 0), at least the perfect wafer's, and exactly as counted by hand on a tiny
case."""

import jax
import numpy as np
import optax
import pytest
from model_zoo import MODELS

import compiler
import wafer
from compiler import costmodel as cm
from wafer import fabric

PERFECT = wafer.WaferSpec.mini(16, 16)
DEFECTIVE = PERFECT.with_defects(rate=0.01, seed=0)
RTOL = 1e-5  # float32 outputs (summation order may differ), as tests/compiler/test_execute.py
RTOL_MODEL = 2e-6  # the cost model's float32 evaluation of the schedule, as tests/compiler/test_costmodel.py


def test_the_map_has_defects_to_hide():
    rm = DEFECTIVE.remap
    assert rm.dead.sum() >= 2 and rm.remapped_links > 0


@pytest.mark.parametrize("name", ["mlp", "lenet", "encoder_block", "decoder_lm"])
def test_compile_and_numerics_unchanged_cycles_charged_once(name):
    case = MODELS[name]()
    perfect = compiler.compile(*case.trace_args(), spec=PERFECT)
    exe = compiler.compile(*case.trace_args(), spec=DEFECTIVE)
    # programs see the whole logical grid: the same placement, the same SRAM layout
    assert exe.placement == perfect.placement
    assert exe.report.peak_sram_bytes_per_core == perfect.report.peak_sram_bytes_per_core
    out, _ = exe(exe.load(), *case.inputs)
    want = case.run()
    for g, w in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL, atol=1e-6 * float(np.abs(w).max()))
    # one schedule: the report, the estimate and the cost model at tau 0 agree
    assert compiler.estimate(exe).to_dict() == exe.report.to_dict()
    pred = jax.jit(cm.predict, static_argnums=2)(cm.features(exe), cm.layout_of(exe), DEFECTIVE)
    np.testing.assert_allclose(float(pred["latency_cycles"]), exe.report.latency_cycles, rtol=RTOL_MODEL)
    np.testing.assert_allclose(float(pred["samples_per_s"]), exe.report.samples_per_s, rtol=RTOL_MODEL)
    np.testing.assert_allclose(np.asarray(pred["kernel"]["cycles"]), exe.schedule.kernels["cycles"], rtol=RTOL_MODEL)
    assert int(pred["hops"]) == exe.report.route_hops
    # never faster than a perfect wafer; the report says what the defects cost
    r, p = exe.report, perfect.report
    assert r.latency_cycles >= p.latency_cycles and r.samples_per_s <= p.samples_per_s
    assert r.route_hops == p.route_hops + r.extra_route_hops
    assert r.dead_cores == DEFECTIVE.remap.dead.sum() and p.dead_cores == 0
    assert "defects" in str(r) and "defects" not in str(p)
    assert all(k.cycles_per_sample >= q.cycles_per_sample for k, q in zip(r.kernels, p.kernels))


def test_route_extra_hops_are_the_routes_lanes_physical_hops():
    """The schedule's closed form of the longest route on a defective wafer equals the most physical hops
    (`wafer.defects.lane_hops`) of any lane the router laid (compiler/plan/route.py), for placements that put
    streams side by side, one above the other and diagonal."""
    case = MODELS["lenet"]()
    rng = np.random.default_rng(0)
    spec = wafer.WaferSpec.mini(16, 16).with_defects(rate=0.04, seed=2, spare_cols=3, spare_rows=2)
    exe = compiler.compile(*case.trace_args(), spec=spec)
    for _ in range(4):
        names = list(exe.placement)
        # random non-overlapping rectangles: one per 4x4 block, shuffled
        blocks = rng.permutation(16)[: len(names)]
        placement = {n: (int(b // 4) * 4, int(b % 4) * 4, 3, 3) for n, b in zip(names, blocks)}
        e = compiler.compile(*case.trace_args(), spec=spec, placement=placement)
        lanes = np.concatenate(list(e.plan.routes.lanes.values()))
        assert e.report.route_hops == int(wafer.defects.lane_hops(spec.remap, lanes).max())
        pred = jax.jit(cm.predict, static_argnums=2)(cm.features(e), cm.layout_of(e), spec)
        assert int(pred["hops"]) == e.report.route_hops
        assert e.plan.routes.traffic.phases[0].latency_hops(spec) == e.report.route_hops


# ---- by hand ----------------------------------------------------------------------------------------------------

MLP_PLACEMENT = {"dense_0": (0, 3, 3, 3), "dense_1": (3, 3, 3, 3), "dense_2": (6, 3, 2, 3)}


def _mlp(spec):
    case = MODELS["mlp"]()
    return compiler.compile(*case.trace_args(), spec=spec, placement=MLP_PLACEMENT)


@pytest.mark.parametrize("latency", [1.0, 5.0])
def test_dead_cores_west_of_a_kernel_add_exactly_one_hop_to_the_input_route(latency):
    """mlp on 8x8: dense_0 at rows 0-2, columns 3-5, fed from the west edge along its rows (3 hops). A dead core at
    column 1 of each of its rows shifts those rows one core east: every input lane spans 4 physical hops, dense_0's
    own rows and columns stay straight, and the links from row 2 into dense_1 (row 3, not shifted) are diagonal
    (one hop). So the longest route is 4 hops and a call's latency grows by exactly one hop latency."""
    base = wafer.WaferSpec.mini(8, 8, hop_latency_cycles=latency)
    perfect = _mlp(base)
    exe = _mlp(base.with_defects(dead_cores=[(0, 1), (1, 1), (2, 1)]))
    assert perfect.report.route_hops == 3 and exe.report.route_hops == 4 and exe.report.extra_route_hops == 1
    assert exe.report.latency_cycles - perfect.report.latency_cycles == latency
    assert exe.report.samples_per_s == perfect.report.samples_per_s
    assert [k.extra_hops for k in exe.report.kernels] == [0, 0, 0]
    assert exe.report.remapped_links == 3  # the input rows' links from column 0 to column 1
    state = exe.load()
    out, state = exe(state, *MODELS["mlp"]().inputs)
    np.testing.assert_allclose(np.asarray(out), np.asarray(MODELS["mlp"]().run()), rtol=RTOL, atol=1e-6)
    # the emulator's clock is charged the schedule's call: one hop latency more than on the perfect wafer
    np.testing.assert_allclose(float(state.clock), exe.schedule.step_cycles, rtol=1e-6)
    assert exe.schedule.step_cycles - perfect.schedule.step_cycles == latency


def test_a_dead_core_inside_a_kernel_lengthens_its_multicast_by_one_hop():
    """A dead core at (1, 4), inside dense_0: its row 1 runs 3 -> 3, 4 -> 5, 5 -> 6, so the input multicast along
    row 1 (from column 3 to 5) takes 2 + 1 hops; its columns bend by one (diagonal links): no extra hop."""
    base = wafer.WaferSpec.mini(8, 8)
    spec = base.with_defects(dead_cores=[(1, 4)])
    perfect, exe = _mlp(base).schedule.kernel("dense_0"), _mlp(spec).schedule.kernel("dense_0")
    assert exe["extra_hops"] == 1 and perfect["extra_hops"] == 0
    words = perfect["in_words"]
    assert perfect["multicast"] == fabric.multicast_cycles(3, words, base, src="first")
    assert exe["multicast"] == fabric.multicast_cycles(3, words, spec, src="first", extra_hops=1.0)
    # in_words words per core: the latency term (mean words + hops) sets the multicast, so one hop is one cycle
    assert exe["multicast"] == perfect["multicast"] + spec.hop_latency_cycles
    assert exe["reduction"] == perfect["reduction"]
    assert _mlp(spec).report.kernel("dense_0").extra_hops == 1


def test_two_dead_cores_bend_a_kernels_columns_by_one_hop_each():
    """Dead cores at (1, 0) and (1, 1) shift row 1 two columns: dense_0's columns (rows 0-2) bend twice by two
    columns, one extra hop each, so its reduction down its columns takes 2 + 2 hops; the input lanes into row 1 do
    not pass a dead core between columns 0 and 3 (both ends move), so no route grows."""
    base = wafer.WaferSpec.mini(8, 8)
    spec = base.with_defects(dead_cores=[(1, 0), (1, 1)])
    exe = _mlp(spec)
    k = exe.schedule.kernel("dense_0")
    assert k["extra_hops"] == 2 and exe.report.extra_route_hops == 0
    pattern = compiler.schedule.PATTERNS[int(k["reduce_pattern"])]
    words = k["out_words"]
    want = fabric.reduce_cycles(3, words, spec, pattern=pattern, to="last", extra_hops=2.0)
    assert k["reduction"] == want


# ---- training ---------------------------------------------------------------------------------------------------


def test_training_is_unchanged_on_a_defective_wafer():
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.relu(nn.Dense(24)(x)))

    model = MLP()
    rng = np.random.default_rng(0)
    batches = [
        {"x": rng.standard_normal((16, 12)).astype(np.float32), "y": rng.integers(0, 10, 16).astype(np.int32)}
        for _ in range(4)
    ]
    params = model.init(jax.random.key(0), batches[0]["x"])

    def loss_fn(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, b["x"]), b["y"]).mean()

    opt = optax.adam(1e-2)
    spec = wafer.WaferSpec.mini(8, 8).with_defects(rate=0.01, seed=0)
    assert spec.remap.dead.sum() >= 1

    def run(s):
        tx = compiler.compile_train(loss_fn, params, batches[0], opt, spec=s)
        state = tx.init(params)
        losses = []
        for b in batches:
            state, m = tx.step(state, b)
            losses.append(float(m["loss"]))
        return tx, losses, tx.read_params(state)

    tx, losses, final = run(spec)
    tx0, losses0, final0 = run(wafer.WaferSpec.mini(8, 8))
    # native
    p, o = params, opt.init(params)
    native = []
    for b in batches:
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        u, o = opt.update(g, o, p)
        p = optax.apply_updates(p, u)
        native.append(float(loss))
    np.testing.assert_allclose(losses, native, rtol=1e-4)
    assert losses == losses0  # the same program on the same cores: bit for bit
    for a, b, n in zip(jax.tree.leaves(final), jax.tree.leaves(final0), jax.tree.leaves(p)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_allclose(np.asarray(a), np.asarray(n), rtol=1e-4, atol=1e-6)
    assert compiler.estimate(tx).to_dict() == tx.report.to_dict()
    assert tx.report.latency_cycles >= tx0.report.latency_cycles
    pred = jax.jit(cm.predict, static_argnums=2)(cm.features(tx), cm.layout_of(tx), spec)
    np.testing.assert_allclose(float(pred["step_cycles"]), tx.report.latency_cycles, rtol=RTOL_MODEL)


def test_pictures_mark_the_dead_cores():
    from compiler import plots

    spec = wafer.WaferSpec.mini(8, 8).with_defects(dead_cores=[(1, 4), (3, 0), (5, 1), (5, 2), (5, 3)], spare_rows=1)
    points, retired = plots.defect_marks(spec)
    # (1, 4) lies between logical (1, 3) and (1, 4): on their boundary; (3, 0) west of logical (3, 0); row 5 retired
    np.testing.assert_array_equal(points, [[4.0, 1.5], [0.0, 3.5]])
    np.testing.assert_array_equal(retired, [5.0])
    exe = _mlp(spec)
    fig = plots.placement_map(exe)
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert any("dead cores (5" in t for t in labels) and any("retired rows (1)" in t for t in labels)
    plots.sram_map(exe)
    plots.link_map(exe, "sum")
    assert plots.defect_marks(wafer.WaferSpec.mini(8, 8))[0].shape == (0, 2)
