"""The schedule (compiler/schedule.py) by hand on tiny programs, the Plan's passes, the one Program interface, and
the pieces written once that the schedule rests on (the route's longest lane in closed form, the optimizer update's
affine count)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import compiler
import wafer
from compiler import plan as planning
from compiler import schedule
from compiler.plan import features as ft
from compiler.plan.route import flow_hops, flow_lanes
from wafer import cost
from wafer.memory import Rect

MINI = wafer.WaferSpec.mini(16, 16)
B, K, H, N = 4, 16, 32, 8
# dense_0's W [16, 32] on a 4x4 grid: tiles 4x8 (+ a bias of 32 over 16 cores: 2 each); dense_1's W [32, 8] on a
# 4x1 grid: tiles 8x8 (+ a bias of 8 over 4 cores: 2 each). No padding.
HAND = {"dense_0": (0, 3, 4, 4), "dense_1": (0, 7, 4, 1)}


class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(N)(nn.relu(nn.Dense(H)(x)))


def _data():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, K)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((B, N)), jnp.float32)
    params = TwoLayer().init(jax.random.key(0), x)
    return params, {"x": x, "y": y}


def _loss(params, batch):
    return jnp.mean((TwoLayer().apply(params, batch["x"]) - batch["y"]) ** 2)


@pytest.fixture(scope="module")
def trained():
    params, batch = _data()
    return (
        params,
        batch,
        compiler.compile_train(_loss, params, batch, optax.sgd(0.1), spec=MINI, mode="pipelined", placement=HAND),
    )


def test_pipelined_training_step_by_hand(trained):
    params, batch, tx = trained
    sched = tx.schedule
    k = {name: sched.kernel(name) for name in ("dense_0", "dense_1")}
    # SGD on a core's tiles: u = -lr * g, p + u fuse into one FMAC per element held (W tile + bias slice: reading g
    # and p, writing p, one fp32 lane: a cycle each), one instruction per parameter, one task
    tiles = {"dense_0": 4 * 8 + 2, "dense_1": 8 * 8 + 2}
    for name, kk in k.items():
        assert kk["forward"] == kk["cycles"] == max(kk["compute"], kk["comm"])
        # the backward is the kernel's VJP program and its anchor's weight (and input) cotangents, not 2 x forward
        assert kk["backward"] == max(kk["bwd_compute"], kk["bwd_comm"]) != 2 * kk["forward"]
        assert kk["grad_sum"] == 0  # one copy of each tile grid: nothing to sum
        sgd = tiles[name] / MINI.simd_fmac_fp32 + 2 * MINI.instr_startup_cycles + MINI.task_cycles
        assert kk["update"] == pytest.approx(sgd, rel=1e-12)
    assert tx.plan.features.dx.tolist() == [0.0, 1.0]  # dense_0 reads the data: no input cotangent
    per_sample = {n: (kk["forward"] + kk["backward"]) / B for n, kk in k.items()}
    # streams per sample: dense_0 -> dense_1 32 words over 4 lanes; x and y (16 + 8 words) in over dense_0's 4 rows;
    # the loss (one word per batch) out over dense_1's 4 rows
    streams = sched.figures["stream_cycles"]
    np.testing.assert_allclose(streams, [32 / 4, (16 + 8) / 4, 1 / B / 4], rtol=1e-15)
    pace = max(*per_sample.values(), *streams)
    assert sched.figures["bottleneck_cycles"] == pace
    hops = tx.report.route_hops
    compute = (
        sum(per_sample.values())
        + 2 * hops * MINI.hop_latency_cycles  # activations in, gradients back
        + (B - 1) * pace
        + max(kk["update"] for kk in k.values())
    )
    io = cost.io_cycles(MINI, sum(int(np.prod(v.shape)) * 4 for v in batch.values()))  # x and y stream in
    assert sched.figures["io_cycles"] == io and io < compute
    assert sched.step_cycles == pytest.approx(compute, rel=1e-12) and sched.step_cycles == tx.report.latency_cycles
    assert tx.report.samples_per_s == pytest.approx(MINI.clock_hz * B / compute, rel=1e-12)
    # the emulator charges the schedule: its clock, and every kernel's forward + backward + update on its cores
    state, _ = tx.step(tx.init(params), batch)
    assert float(state.wafer.clock) == pytest.approx(compute, rel=1e-6)
    busy = np.asarray(state.wafer.busy)
    for name, (r, c, h, w) in HAND.items():
        kk = k[name]
        np.testing.assert_allclose(busy[r : r + h, c : c + w], kk["forward"] + kk["backward"] + kk["update"])
    assert busy.sum() == pytest.approx(sum(h * w * float(busy[r, c]) for r, c, h, w in HAND.values()))


def test_weight_streaming_step_by_hand():
    params, batch = _data()
    tx = compiler.compile_train(_loss, params, batch, optax.sgd(0.1), spec=MINI, mode="weight_streaming")
    sched, f = tx.schedule, tx.plan.features
    total = 0.0
    for i, name in enumerate(sched.names):
        kk = sched.kernel(name)
        weights = sum(int(np.prod(t.shape)) * 4 for t in tx.plan.kernels[name].params)  # its kernel and bias
        assert weights == {"dense_0": (K * H + H) * 4, "dense_1": (H * N + N) * 4}[name]
        assert f.stream_bytes[i] == weights
        io = cost.io_cycles(MINI, weights)
        assert kk["io"] == pytest.approx(io)
        total += max(kk["forward"], io) + max(kk["backward"], 2 * io)  # weights in; weights in, gradients out
        assert kk["update"] == 0  # the optimizer runs on the host
    io_batch = cost.io_cycles(MINI, sum(int(np.prod(v.shape)) * 4 for v in batch.values()))
    assert sched.step_cycles == pytest.approx(max(total, io_batch), rel=1e-12)
    state, _ = tx.step(tx.init(params), batch)
    assert float(state.wafer.clock) == pytest.approx(sched.step_cycles, rel=1e-6)


def test_inference_events_follow_the_formula():
    params, batch = _data()
    exe = compiler.compile(TwoLayer().apply, params, batch["x"], spec=MINI, placement=HAND)
    sched = exe.schedule
    spans = sched.events(steps=2)
    steps = [s for s in spans if s.track == "program"]
    assert [s.cycles for s in steps] == [sched.step_cycles] * 2 and steps[1].start == sched.step_cycles
    s = np.asarray(sched.figures["cycles_per_sample"])
    pace = sched.figures["bottleneck_cycles"]
    assert pace == max(*s, *sched.figures["stream_cycles"], sched.figures["io_sample_cycles"])
    # the batch's inputs in and outputs out over the edge I/O (256 B of x, at once with 128 B of y), then the first
    # input's trip over the fabric (the longest route)
    io = B * K * 4 * 8 / MINI.edge_io_bits_per_s * MINI.clock_hz / B
    (host,) = [sp for sp in spans if sp.track == "host I/O" and sp.start < sched.step_cycles]
    assert (host.start, host.name) == (0.0, "inputs in, outputs out") and host.cycles == pytest.approx(B * io)
    latency = sched.figures["hops"] * MINI.hop_latency_cycles
    (route,) = [sp for sp in spans if sp.track == "routes" and sp.start < sched.step_cycles]
    assert route.start == pytest.approx(io) and route.cycles == latency == 8
    for i, name in enumerate(sched.names):
        samples = sorted((sp for sp in spans if sp.track == name and sp.cat == "sample"), key=lambda sp: sp.start)
        assert len(samples) == 2 * B
        # sample j reaches kernel i when it has passed the kernels before it, at the pipeline's pace
        for j, sp in enumerate(samples[:B]):
            assert sp.start == pytest.approx(io + latency + s[:i].sum() + j * pace)
    last = max(sp.start + sp.cycles for sp in spans if sp.cat == "sample" and sp.start < sched.step_cycles)
    assert last == pytest.approx(sched.step_cycles)


def test_charge_is_the_schedule():
    params, batch = _data()
    exe = compiler.compile(TwoLayer().apply, params, batch["x"], spec=MINI, placement=HAND)
    rec, sched = exe.record, exe.schedule
    assert rec.cycles(MINI) == sched.step_cycles
    np.testing.assert_array_equal(rec.compute_map(MINI, MINI.rows, MINI.cols), sched.compute_map())
    np.testing.assert_array_equal(rec.link_words(MINI.rows, MINI.cols), sched.link_words())
    # with the spec's figures traced (jax.grad over hardware through the emulator), the same charge
    grad = jax.grad(lambda clock_per_hop: rec.cycles(MINI.with_(hop_latency_cycles=clock_per_hop)))(1.0)
    assert float(grad) == sched.figures["hops"]


# ---- the plan -----------------------------------------------------------------------------------------------------


def test_passes_build_what_compile_builds():
    params, batch = _data()
    base = planning.trace_program(TwoLayer().apply, params, batch["x"], spec=MINI)
    assert base.graph is None and base.placement is None
    plan = base
    for p in planning.PASSES:
        before = plan
        plan = p(plan)
        assert plan is not before  # passes return new plans
    assert base.graph is None  # ... and leave their input as it was
    exe = compiler.compile(TwoLayer().apply, params, batch["x"], spec=MINI)
    assert plan.placement == exe.placement and plan.names == exe.plan.names
    assert compiler.estimate(plan).to_dict() == exe.report.to_dict()
    with pytest.raises(ValueError, match="Plan.task"):
        base.replace(task="serving")


def test_demands_work_is_the_schedules_one_core_cycles():
    params, batch = _data()
    exe = compiler.compile(TwoLayer().apply, params, batch["x"], spec=MINI)
    f = exe.plan.features
    one = schedule.Layout(np.ones(f.n), np.ones(f.n), np.zeros(f.n), np.zeros(f.n))
    cycles = schedule.kernel_figures(f, one, MINI)["cycles"] / B
    assert [d.work for d in exe.plan.demands] == pytest.approx(list(cycles), rel=1e-12)


def test_inference_and_training_are_one_program_type(trained):
    params, batch, tx = trained
    exe = compiler.compile(TwoLayer().apply, params, batch["x"], spec=MINI)
    assert type(exe) is type(tx) is compiler.Program is compiler.Executable is compiler.Trainer
    for p in (exe, tx):
        assert {"init", "step", "apply", "read_params"} <= {f.name for f in p.__dataclass_fields__.values()}
        assert p.report == compiler.estimate(p) and p.schedule.plan is p.plan
    state, out = exe.step(exe.init(params), batch["x"])  # the shared form: (state, out)
    np.testing.assert_allclose(np.asarray(out), np.asarray(TwoLayer().apply(params, batch["x"])), rtol=1e-5)
    out2, state = exe(state, batch["x"])  # the inference call form
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))
    with pytest.raises(TypeError, match="training program"):
        tx(tx.init(params), batch)


# ---- rules written once ----------------------------------------------------------------------------------------


RECTS = st.builds(Rect, st.integers(0, 35), st.integers(0, 35), st.integers(1, 12), st.integers(1, 12))


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(RECTS, RECTS)
def test_longest_lane_in_closed_form_equals_the_lanes(src, dst):
    assume(not src.overlaps(dst))
    lanes = flow_lanes(src, dst, lanes="auto")
    want = int((np.abs(lanes[:, 1] - lanes[:, 3]) + np.abs(lanes[:, 0] - lanes[:, 2])).max())
    got = flow_hops(*(float(v) for v in (*src, *dst)))
    assert got == want
    # the same function on JAX arrays (the cost model's form)
    assert float(flow_hops(*(jnp.float32(v) for v in (*src, *dst)))) == want


OPTIMIZERS = {
    "sgd": optax.sgd(0.1),
    "momentum": optax.sgd(0.1, momentum=0.9),
    "adam": optax.adam(1e-3),
    "adamw_clip": optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1)),
    "lion": optax.lion(1e-4),
    "rmsprop": optax.rmsprop(1e-3),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_update_count_is_affine_in_tile_elements(name):
    """The schedule counts a core's optimizer update as beta + sum_p alpha_p * (elements of its tile of parameter p)
    (features.upd_*); it equals counting the update's jaxpr on the plan's actual tiles."""
    params, batch = _data()
    opt = OPTIMIZERS[name]
    # HAND: every tile holds two elements or more (W tiles 4 x 8 and 8 x 8, bias slices of 2), the vectors the
    # affine rule is measured on (a one-element operand is a scalar in a register: wafer/kernel.py)
    tx = compiler.compile_train(_loss, params, batch, opt, spec=MINI, mode="pipelined", placement=HAND)
    f, plan = tx.plan.features, tx.plan
    shape = schedule.kernel_figures(f, plan.layout, MINI)
    upd = np.asarray(compiler.plan.partition.update_counts(f, shape))
    for i, kp in enumerate(plan.kernels.values()):
        tiles = [jax.ShapeDtypeStruct(t.tile, t.dtype) for t in kp.params]
        direct = ft._update_counts(opt, tiles)
        assert dict(zip(f.keys, upd[i])) == {key: float(direct.get(key, 0.0)) for key in f.keys}
        assert math.isclose(shape["update"][i], cost.compute_cycles(MINI, direct))
    assert (f.upd_alpha >= 0).all()  # per element of a tile: never a negative count


def test_update_count_of_one_element_tiles():
    """dense_0 on 8 x 8 cores holds one bias value per core: a one-element operand, which the machine keeps in a
    register (no SRAM bytes; wafer/kernel.py). The affine count charges it as a vector element: the same arithmetic
    and instructions, and for SGD's fp32 FMAC (lane-bound either way) the same cycles."""
    params, batch = _data()
    opt = optax.sgd(0.1)
    placement = {"dense_0": (0, 3, 8, 8), "dense_1": (0, 11, 4, 1)}
    tx = compiler.compile_train(_loss, params, batch, opt, spec=MINI, mode="pipelined", placement=placement)
    f, plan = tx.plan.features, tx.plan
    shape = schedule.kernel_figures(f, plan.layout, MINI)
    upd = np.asarray(compiler.plan.partition.update_counts(f, shape))
    assert [t.tile for t in plan.kernels["dense_0"].params] == [(2, 4), (1,)]  # W [16, 32] on 8 x 8, b [32] on 32
    for i, kp in enumerate(plan.kernels.values()):
        direct = ft._update_counts(opt, [jax.ShapeDtypeStruct(t.tile, t.dtype) for t in kp.params])
        affine = {key: v for key, v in zip(f.keys, upd[i]) if v}
        assert wafer.kernel.arithmetic(affine) == wafer.kernel.arithmetic(direct)
        assert {k: affine[k] for k in (("instr",), ("ops",), ("task",))} == {
            k: direct[k] for k in (("instr",), ("ops",), ("task",))
        }
        assert math.isclose(shape["update"][i], cost.compute_cycles(MINI, direct))
