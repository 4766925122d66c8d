"""Several wafers data-parallel (compiler/run/cluster.py, wafer/cluster.py): numerics against native training on
the global batch, the interconnect's time in the schedule and the report, errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import compiler
import wafer
from wafer import cluster as wcluster

GLOBAL = 16
RTOL = 1e-5


def _problem():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((48, 12)).astype(np.float32), rng.integers(0, 10, 48).astype(np.int32)
    net = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(10)])
    shapes = jax.eval_shape(net.init, jax.random.key(0), x[:GLOBAL])
    params = jax.tree_util.tree_map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)

    def loss_fn(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(net.apply(p, batch["x"]), batch["y"]).mean()

    return loss_fn, params, compiler.Batches.from_arrays(x, y, GLOBAL, seed=1)


SPEC = wafer.WaferSpec.mini(8, 8)


@pytest.fixture(scope="module")
def problem():
    return _problem()


@pytest.fixture(scope="module")
def trainers(problem):
    loss_fn, params, batches = problem
    opt = optax.adam(0.05)
    out = {}
    for mode in ("pipelined", "weight_streaming"):
        for n in (1, 2):
            out[mode, n] = compiler.compile_train(
                loss_fn, params, batches.batch(0), opt, spec=SPEC, mode=mode, wafers=n
            )
    return out, opt


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("mode", ["pipelined", "weight_streaming"])
def test_wafers_train_as_native_on_the_global_batch(problem, trainers, mode):
    loss_fn, params, batches = problem
    (txs, opt) = trainers
    tx = txs[mode, 2]
    state = tx.init(params)
    native, opt_state = params, opt.init(params)
    for i in range(4):
        state, metrics = tx.step(state, batches.batch(i))
        loss, grads = jax.value_and_grad(loss_fn)(native, batches.batch(i))
        updates, opt_state = opt.update(grads, opt_state, native)
        native = optax.apply_updates(native, updates)
        assert _rel(metrics["loss"], loss) <= RTOL
    for got, want in zip(jax.tree_util.tree_leaves(tx.read_params(state)), jax.tree_util.tree_leaves(native)):
        assert _rel(got, want) <= RTOL
    assert int(state.step) == 4 and np.shape(state.wafer.clock) == (2,)
    if mode == "pipelined":  # every wafer keeps its own copy, and the copies stay equal bit for bit
        for leaf in jax.tree_util.tree_leaves(state.wafer.sram):
            assert leaf.shape[0] == 2 and np.array_equal(leaf[0], leaf[1])
    else:  # one host store (MemoryX) for both wafers
        shapes = lambda t: [np.shape(x) for x in jax.tree_util.tree_leaves(t)]  # noqa: E731
        assert shapes(state.host["params"]) == shapes(params)


@pytest.mark.parametrize("mode", ["pipelined", "weight_streaming"])
def test_the_interconnect_is_in_the_schedule_and_the_report(problem, trainers, mode):
    loss_fn, params, batches = problem
    (txs, opt) = trainers
    one, two = txs[mode, 1], txs[mode, 2]
    fig = two.schedule.figures
    cluster = two.plan.cluster
    assert cluster.wafers == 2 and cluster.levels == 1
    clock = float(SPEC.clock_hz)
    grad_bytes = float(np.sum(two.plan.features.stream_bytes))
    if mode == "pipelined":
        want = wcluster.allreduce_seconds(cluster, grad_bytes) * clock
        assert float(fig["interconnect_cycles"]) == pytest.approx(want, rel=1e-12)
        assert want == pytest.approx((2 * 5e-6 + grad_bytes * 8 / 1.2e12) * clock)
        # the same per-wafer step as one wafer on 8 samples, plus the all-reduce before the update
        half = jax.tree_util.tree_map(lambda x: x[: GLOBAL // 2], batches.batch(0))
        single = compiler.compile_train(loss_fn, params, half, opt, spec=SPEC, mode=mode)
        assert two.schedule.step_cycles == pytest.approx(single.schedule.step_cycles + want, rel=1e-9)
        assert two.report.samples_per_s == pytest.approx(clock * GLOBAL / two.schedule.step_cycles, rel=1e-9)
    else:
        io = wcluster.stream_seconds(cluster, two.plan.features.stream_bytes, SPEC.edge_io_bits_per_s) * clock
        np.testing.assert_allclose(two.schedule.kernels["io"], io, rtol=1e-12)
        assert float(fig["interconnect_cycles"]) == pytest.approx(3 * float(np.sum(io)), rel=1e-12)
    r = two.report
    assert r.wafers == 2 and r.batch == GLOBAL and r.batch_per_wafer == GLOBAL // 2
    assert r.interconnect_cycles_per_step == pytest.approx(float(fig["interconnect_cycles"]))
    assert "2 x mini-8x8" in str(r) and "interconnect" in str(r) and "wafers data-parallel" in str(r)
    d = r.to_dict()
    assert d["wafers"] == 2 and d["interconnect_cycles_per_step"] > 0
    assert one.report.wafers == 1 and one.report.interconnect_cycles_per_step == 0.0
    # what the emulator charges is the schedule's step, on every wafer's clock
    state, _ = two.step(two.init(), batches.batch(0))
    np.testing.assert_allclose(np.asarray(state.wafer.clock), two.schedule.step_cycles, rtol=1e-6)
    names = {s.track for s in two.schedule.events(1)}
    assert mode != "pipelined" or "interconnect" in names


def test_interconnect_closed_forms():
    c = wafer.ClusterSpec(wafers=5)
    assert c.levels == 3 and wafer.ClusterSpec(wafers=1).levels == 0 and wafer.ClusterSpec(wafers=4).levels == 2
    assert wcluster.allreduce_seconds(wafer.ClusterSpec(wafers=1), 1e6) == 0.0
    assert wcluster.allreduce_seconds(c, 1e6) == pytest.approx(6 * 5e-6 + 8e6 / 1.2e12)
    assert wcluster.stream_seconds(c, 1e6, 1e11) == pytest.approx(3 * 5e-6 + 8e6 / 1e11)  # the slower link
    # bandwidth and latency are pytree leaves: the time is differentiable in them
    g = jax.grad(lambda c: wcluster.allreduce_seconds(c, 1e6))(c)
    assert float(g.interconnect_latency_s) == pytest.approx(6.0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(wafers=3), compiler.WaferSplitError, "16 samples does not split over 3 wafers"),
        (dict(wafers=0), compiler.WaferSplitError, "wafers must be a positive int"),
        (dict(wafers=2, cluster=wafer.ClusterSpec(wafers=4)), ValueError, "wafers=2 but cluster has 4"),
    ],
    ids=["indivisible", "zero", "conflict"],
)
def test_bad_wafer_counts_are_named_errors(problem, kwargs, error, match):
    loss_fn, params, batches = problem
    with pytest.raises(error, match=match):
        compiler.compile_train(loss_fn, params, batches.batch(0), optax.sgd(0.1), spec=SPEC, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(wafers=0), "ClusterSpec.wafers"), (dict(interconnect_latency_s=-1.0), "interconnect_latency_s")],
    ids=["wafers", "latency"],
)
def test_cluster_spec_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        wafer.ClusterSpec(**kwargs)


def test_fit_and_resume_on_two_wafers(problem, trainers, tmp_path):
    _, params, batches = problem
    (txs, _) = trainers
    tx = txs["pipelined", 2]
    want, want_history = compiler.fit(tx, tx.init(params), batches, steps=4, progress=False)
    compiler.fit(tx, tx.init(params), batches, steps=2, checkpoint_dir=tmp_path, progress=False)
    got, history = compiler.fit(tx, tx.init(params), batches, steps=4, checkpoint_dir=tmp_path, progress=False)
    assert history == want_history
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
