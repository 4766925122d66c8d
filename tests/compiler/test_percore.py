"""The per-core path on every kind of weight kernel (compiler/run/percore.py), on mini wafers with random inputs.

Each case is compiled, its anchors are checked to run per core (not on reassembled weights), the per-core output is
held to native JAX under the same precision policy, and its traffic to the static record (the path itself raises
when they differ; the counters are compared here too). Shapes are odd and include size-1 axes. Hand counts of the
traffic on tiny cases pin each charge rule: the multicast of input chunks, indices or channel groups along rows, the
reduction down columns, and the tied weights' gradient sums.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compiler
import wafer
from compiler import fuzz
from compiler.plan import partition as part
from compiler.run.infer import read_leaves
from compiler.run.percore import run_per_core

SPECS = {"6x6": wafer.WaferSpec.mini(6, 6), "9x13": wafer.WaferSpec.mini(9, 13)}
# relative to max |native| (compiler/fuzz.py): float32 reassociation; 16-bit storage with float32 accumulation,
# summed in another order
TOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 2e-2}


def _rand(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _ids(seed, shape, vocab):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def _linen(module, *inputs):
    params = module.init(jax.random.key(7), *inputs)
    # biases start at zero: give every parameter random values so that each one is visible in the output
    params = jax.tree.map(
        lambda a: _rand(a.size, a.shape, a.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params
    )
    return module.apply, params, inputs


class _Einsum(nn.Module):
    """y[n, b, t] = sum_k W[n, k] x[b, t, k]: the weight as dot_general's left operand."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(), (5, x.shape[-1]))
        return jax.lax.dot_general(w, x, (((1,), (2,)), ((), ())))


class _Attend(nn.Module):
    """x @ E.T with E [V, D]: a transposed weight (a tied embedding's `attend`)."""

    @nn.compact
    def __call__(self, x):
        return nn.Embed(11, x.shape[-1]).attend(x)


class _Take(nn.Module):
    """jnp.take of table rows with a gather mode: out-of-range indices fill (NaN) or clip."""

    mode: str
    vocab: int = 11
    width: int = 7

    @nn.compact
    def __call__(self, ids):
        table = self.param("table", nn.initializers.normal(), (self.vocab, self.width))
        return jnp.take(table, ids, axis=0, mode=self.mode)


class _Heads(nn.Module):
    """A per-head einsum y[b, h, e] = sum_d x[b, h, d] W[h, d, e]: h is a batch axis of the dot (`lhs`: W the left
    operand, y[h, e, b])."""

    lhs: bool = False
    features: int = 5

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(), (x.shape[1], x.shape[2], self.features))
        if self.lhs:
            return jax.lax.dot_general(w, x, (((1,), (2,)), ((0,), (1,))))
        return jnp.einsum("bhd,hde->bhe", x, w)


class _BatchGrouped(nn.Module):
    """A convolution with batch_group_count 2 (as the weight gradient of a grouped convolution has): output channels
    0-2 read the first half of the batch, 3-5 the second."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(), (3, 2, x.shape[-1], 6))
        dn = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn, batch_group_count=2)


# name -> (fn, params, inputs), the per-core kind its anchor must run as
CASES = {
    "qkv": (lambda: _linen(nn.DenseGeneral((3, 5)), _rand(1, (2, 3, 7))), "dense"),
    "qkv_one_head": (lambda: _linen(nn.DenseGeneral((1, 1)), _rand(2, (2, 1, 7))), "dense"),
    "qkv_d1": (lambda: _linen(nn.DenseGeneral((3, 5)), _rand(3, (2, 3, 1))), "dense"),
    "out_proj": (lambda: _linen(nn.DenseGeneral(6, axis=(-2, -1)), _rand(4, (2, 3, 3, 5))), "dense"),
    "weight_lhs": (lambda: _linen(_Einsum(), _rand(5, (2, 3, 7))), "dense"),
    "attend": (lambda: _linen(_Attend(), _rand(6, (2, 3, 4))), "dense"),
    "grouped": (lambda: _linen(nn.Conv(6, (3, 3), feature_group_count=3), _rand(7, (2, 7, 9, 6))), "conv"),
    "depthwise_x2": (
        lambda: _linen(nn.Conv(8, (3, 2), strides=2, feature_group_count=4), _rand(8, (2, 9, 7, 4))),
        "conv",
    ),
    "depthwise_1x1": (lambda: _linen(nn.Conv(5, (1, 1), feature_group_count=5), _rand(9, (1, 1, 5, 5))), "conv"),
    "embed": (lambda: _linen(nn.Embed(11, 7), _ids(10, (3, 5), 11)), "gather"),
    "embed_d1": (lambda: _linen(nn.Embed(13, 1), _ids(11, (2, 4), 13)), "gather"),
    # (Flax's Embed of one row broadcasts it: no lookup; a take from a one-row table is one)
    "take_v1": (lambda: _linen(_Take("clip", vocab=1, width=4), jnp.array([[0, 2, 0]], jnp.int32)), "gather"),
    "take_fill": (lambda: _linen(_Take("fill"), jnp.array([[0, 11, 3], [15, 10, 2]], jnp.int32)), "gather"),
    "take_clip": (lambda: _linen(_Take("clip"), jnp.array([[0, 11, 3], [-4, 10, 2]], jnp.int32)), "gather"),
    "heads": (lambda: _linen(_Heads(), _rand(12, (4, 3, 7))), "batched"),
    "heads_lhs": (lambda: _linen(_Heads(lhs=True), _rand(13, (2, 3, 7))), "batched"),
    "batch_grouped": (lambda: _linen(_BatchGrouped(), _rand(14, (4, 5, 3, 3))), "conv"),
    # Flax's Embed of one row: no lookup, each core of the row broadcasts its tile (partition.row_broadcasts)
    "embed_v1": (lambda: _linen(nn.Embed(1, 7), jnp.zeros((2, 3), jnp.int32)), "broadcast"),
}


def _kinds(exe):
    """The per-core kind of every kernel's anchor ({kernel: kind or None}; "broadcast" for a one-row weight's)."""
    out = {}
    for kernel in exe.graph.kernels:
        eqn, widx, pos, perm = part.anchor_operand(kernel, exe.traced)
        tilings = {t.index: t for t in exe.plans[kernel.name].params}
        out[kernel.name] = part.per_core_kind(eqn, tilings.get(widx), pos, perm)
        if eqn is None and part.row_broadcasts(kernel, exe.traced, tilings):
            out[kernel.name] = "broadcast"
    return out


def _close(got, want, rtol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape
        scale = max(1.0, float(np.nanmax(np.abs(w)))) if w.size else 1.0
        np.testing.assert_allclose(g, w, rtol=0, atol=rtol * scale, equal_nan=True)


def _run_per_core(fn, params, inputs, spec, policy="fp32", placement=None):
    exe = compiler.compile(fn, params, *inputs, spec=spec, policy=policy, placement=placement)
    out, state = exe(exe.load(params), *inputs, path="per_core")  # raises if its traffic is not the record's
    native = jax.jit(compiler.apply_policy(fn, policy))(params, *inputs)
    _close(out, native, TOL[policy])
    np.testing.assert_array_equal(
        np.asarray(state.links), exe.record.link_words(spec.rows, spec.cols).astype(np.float32)
    )
    return exe, out


@pytest.mark.parametrize("spec", list(SPECS), ids=list(SPECS))
@pytest.mark.parametrize("name", list(CASES))
def test_every_kind_runs_per_core_and_equals_native(name, spec):
    build, kind = CASES[name]
    fn, params, inputs = build()
    exe, out = _run_per_core(fn, params, inputs, SPECS[spec])
    assert list(_kinds(exe).values()) == [kind]
    assert np.all(np.isfinite(np.asarray(out))) == (name != "take_fill")  # fill: NaN rows where out of range


@pytest.mark.parametrize("policy", ["bf16", "fp16"])
@pytest.mark.parametrize(
    "name", ["qkv", "out_proj", "weight_lhs", "attend", "grouped", "depthwise_x2", "embed", "heads"]
)
def test_every_kind_per_core_under_16_bit_policy(name, policy):
    build, kind = CASES[name]
    fn, params, inputs = build()
    exe, _ = _run_per_core(fn, params, inputs, SPECS["9x13"], policy)
    assert list(_kinds(exe).values()) == [kind]


@pytest.mark.parametrize(
    "name", ["qkv", "out_proj", "weight_lhs", "attend", "grouped", "embed", "heads", "batch_grouped", "embed_v1"]
)
def test_weight_gradients_through_per_core_equal_native(name):
    """The gradient of a loss with respect to the weights' SRAM allocations, taken through the per-core path, is
    the native gradient (summed over a tied weight's copies)."""
    _check_weight_gradients(*CASES[name][0](), nonzero=True)


def _check_weight_gradients(fn, params, inputs, *, nonzero: bool):
    """d loss / d (the weights' SRAM allocations) through the per-core path on a 9 x 13 wafer == the native
    gradient (summed over a tied weight's copies); `nonzero`: every native gradient must be non-zero too."""
    exe = compiler.compile(fn, params, *inputs, spec=SPECS["9x13"])
    plan, state = exe.plan, exe.load(params)
    loss = lambda y: jnp.sum(jnp.sin(y) * y)  # noqa: E731

    def through_per_core(sram):
        st = state.replace(sram=sram)
        return loss(run_per_core(plan, read_leaves(plan, st), st, inputs)[0])

    got = jax.jit(jax.grad(through_per_core))(dict(state.sram))
    want = jax.tree.leaves(jax.grad(lambda p: loss(fn(p, *inputs)))(params))
    for i, w in enumerate(want):
        g = sum(got[name] for name, _ in plan.weight_copies[i])
        if nonzero:
            assert float(jnp.max(jnp.abs(w))) > 0
        _close(g, w, TOL["fp32"])


# ---- recurrent cells: a scan's weight dots per core at every iteration ------------------------------------------


def _transposed_cell():
    """h <- tanh(x Wx^T + (Wh h^T)^T): a transposed weight (`x @ W.T`) and a weight as the left operand contracting
    its last axis, both tiled as the matrix [K, N] they multiply (`partition.kernel_views`)."""

    def fn(p, xs):
        def cell(h, x):
            h = jnp.tanh(x @ p["wx"].T + jax.lax.dot_general(p["wh"], h, (((1,), (1,)), ((), ()))).T)
            return h, h

        return jax.lax.scan(cell, jnp.zeros((2, 5)), xs)[0]

    return fn, {"wx": _rand(33, (5, 3)), "wh": _rand(34, (5, 5))}, (_rand(35, (4, 2, 3)),)


def _nested_cell():
    """Each step, two inner steps g <- tanh(g Wh^T + x Wx) of a scan in the cell's body: Wh's dot runs 2 x 3
    times, on its tiles, its weight passed down as a constant of both scans."""

    def fn(p, xs):
        def cell(h, x):
            u = x @ p["wx"]
            h, _ = jax.lax.scan(lambda g, _: (jnp.tanh(g @ p["wh"].T + u), None), h, None, length=2)
            return h, h

        return jax.lax.scan(cell, jnp.zeros((1, 4)), xs)[0]

    return fn, {"wx": _rand(36, (3, 4)), "wh": _rand(37, (4, 4))}, (_rand(38, (3, 1, 3)),)


# name -> (fn, params, inputs), the weights the cell's body multiplies by (every one runs per core)
CELLS = {
    "simple": lambda: _linen(nn.RNN(nn.SimpleCell(5)), _rand(30, (2, 4, 3))),
    "gru": lambda: _linen(nn.RNN(nn.GRUCell(4)), _rand(31, (3, 3, 5))),
    "lstm": lambda: _linen(nn.RNN(nn.LSTMCell(3)), _rand(32, (1, 5, 2))),
    "transposed": _transposed_cell,
    "nested": _nested_cell,
}


def _scan_dots(exe):
    """{scan kernel: its weight dots run per core} (`partition.scan_runs`)."""
    out = {}
    for kernel in exe.graph.kernels:
        if kernel.kind == "scan":
            tilings = {t.index: t for t in exe.plans[kernel.name].params}
            out[kernel.name] = part.scan_runs(kernel, exe.traced, tilings)
    return out


@pytest.mark.parametrize("spec", list(SPECS), ids=list(SPECS))
@pytest.mark.parametrize("name", list(CELLS))
def test_recurrent_cells_run_per_core_and_equal_native(name, spec):
    """nn.RNN of a SimpleCell, GRUCell or LSTMCell: every matrix weight of the cell is multiplied per core at every
    step; the output is native's and the traffic (all steps) the record's, which the schedule charges."""
    fn, params, inputs = CELLS[name]()
    exe, _ = _run_per_core(fn, params, inputs, SPECS[spec])
    (dots,) = _scan_dots(exe).values()
    (kernel,) = [k for k in exe.graph.kernels if k.kind == "scan"]
    matrices = {t.index for t in exe.plans[kernel.name].params if t.layout == "matrix"}
    assert dots and {d.widx for d in dots} == matrices
    assert fuzz.per_core_kinds(exe)[kernel.name] == "scan"
    plan, fig = exe.plans[kernel.name], exe.schedule.kernel(kernel.name)
    assert plan.traffic.words > 0 and fig["scan_comm"] > 0 and fig["comm"] >= fig["scan_comm"]


def test_scan_views_and_nesting_are_what_the_dots_multiply():
    """The transposed cell's weights are tiled as the matrices they multiply ([3, 5] of Wx [5, 3], [5, 5] of Wh read
    along its columns), the nested cell's inner dot runs 2 x 3 times, and a batched weight in a body is reported
    as not run per core, with its reason."""
    spec = SPECS["9x13"]
    exe = compiler.compile(*_flat(_transposed_cell()), spec=spec)
    assert {t.path: t.axes for t in exe.plans["scan_0"].params} == {"wx": ((1,), (0,)), "wh": ((1,), (0,))}
    exe = compiler.compile(*_flat(_nested_cell()), spec=spec)
    (dots,) = _scan_dots(exe).values()
    assert sorted((d.trips, len(d.nest)) for d in dots) == [(3, 0), (6, 1)]

    def batched(p, xs):  # h[b, n] <- tanh(sum_k h[b, k] W[b, k, n]): the weight batched over the samples
        cell = lambda h, x: (jnp.tanh(jnp.einsum("bk,bkn->bn", h, p["w"]) + x),) * 2  # noqa: E731
        return jax.lax.scan(cell, jnp.zeros((2, 3)), xs)[0]

    exe = compiler.compile(batched, {"w": _rand(39, (2, 3, 3))}, _rand(40, (4, 2, 3)), spec=spec)
    with pytest.raises(AssertionError, match="batch dimensions"):
        fuzz.per_core_kinds(exe)


def _flat(case):
    fn, params, inputs = case
    return fn, params, *inputs


@pytest.mark.parametrize("policy", ["bf16", "fp16"])
def test_recurrent_cell_per_core_under_16_bit_policy(policy):
    fn, params, inputs = CELLS["lstm"]()
    exe, _ = _run_per_core(fn, params, inputs, SPECS["9x13"], policy)
    assert all(_scan_dots(exe).values())


@pytest.mark.parametrize("name", list(CELLS))
def test_recurrent_weight_gradients_through_per_core_equal_native(name):
    _check_weight_gradients(*CELLS[name](), nonzero=False)


def test_scan_traffic_by_hand():
    """h <- tanh(x Wx + h Wh) over 3 steps, batch 1, Wx [2, 4] and Wh [4, 4] on a 2x2 rectangle (tiles [1, 2] and
    [2, 2]): each step, Wx's rows send their 1-element chunk east (2 x 1 words) and its columns their 2-word partial
    south (2 x 2); Wh's the same with 2-element chunks (2 x 2 east, 2 x 2 south). Three steps: 3 x that.
    Adds: each step, each dot's bottom row adds the 2-element partial it receives: 3 x (2 + 2) elements at the
    ALU's fp32 element rate (1 cycle on the mini wafer), in compute."""
    spec = SPECS["6x6"]

    def fn(p, xs):
        cell = lambda h, x: (jnp.tanh(x @ p["wx"] + h @ p["wh"]),) * 2  # noqa: E731
        return jax.lax.scan(cell, jnp.zeros((1, 4)), xs)[0]

    params = {"wx": _rand(40, (2, 4)), "wh": _rand(41, (4, 4))}
    plan, fig = _one_kernel(fn, params, (_rand(42, (3, 1, 2)),), "scan_0", (0, 0, 2, 2), spec)
    assert plan.grid == (2, 2) and [t.tile for t in plan.params if t.path == "wh"] == [(2, 2)]
    links = _words(plan.traffic, spec)
    want = np.zeros_like(links)
    want[1, 0:2, 0] = 3 * (1 + 2)  # E: Wx's and Wh's chunks along each row
    want[2, 0, 0:2] = 3 * (2 + 2)  # S: both partials down each column
    np.testing.assert_array_equal(links, want)
    assert fig["scan_comm"] > 0
    assert fig["scan_adds"] == 3 * (2 + 2) * wafer.cost.element_cycles(spec, "alu", "fp32", 4, 4, 1.0) == 12.0
    exe = compiler.compile(fn, params, _rand(42, (3, 1, 2)), spec=spec, placement={"scan_0": (0, 0, 2, 2)})
    assert fig["compute"] == _counts_cycles(exe.schedule, "scan_0", "counts") + 12.0


def test_scan_backward_traffic_and_cycles_by_hand():
    """Training the scan above (3 steps, Wx [2, 4] and Wh [4, 4] on a 2x2 rectangle of the 8x8 mini wafer): each
    step's backward multicasts each weight's 2-word output cotangent up its columns from the bottom row (2 x (2 + 2)
    words north) and reduces its input's cotangent partials along the rows to the west edge (Wx's 1 word, Wh's 2: 2 x
    (1 + 2) words west). Three steps: 3 x that, in the kernel's backward record, which the step's counters hold.
    Cycles: a 1-hop multicast of b words is b words + 1 hop; a 2-core chain reduction b words + 1 hop + a stage
    (2 ramp latencies + 1): per step 7 words + 4 hops + 2 stages, 3 x (7 + 4 + 2 x 5) = 63 on the mini wafer. Adds:
    each step, each west core adds the input cotangent partial it receives, 3 x (1 + 2) elements at 1 cycle, in the
    backward's compute; the forward's, 3 x (2 + 2), in its compute (`test_scan_traffic_by_hand`)."""
    spec = wafer.WaferSpec.mini(8, 8)

    def fn(p, xs):
        cell = lambda h, x: (jnp.tanh(x @ p["wx"] + h @ p["wh"]),) * 2  # noqa: E731
        return jax.lax.scan(cell, jnp.zeros((1, 4)), xs)[0]

    params = {"wx": _rand(40, (2, 4)), "wh": _rand(41, (4, 4))}
    xs = _rand(42, (3, 1, 2))
    loss = lambda p, b: jnp.sum(fn(p, b) ** 2)  # noqa: E731
    rects = {"scan_0": (0, 0, 2, 2)}
    tx = compiler.compile_train(loss, params, xs, optax.sgd(0.1), spec=spec, mode="pipelined", placement=rects)
    plan = tx.plan.kernels["scan_0"]
    links = _words(plan.backward_traffic, spec)
    want = np.zeros_like(links)
    want[0, 1, 0:2] = 3 * (2 + 2)  # N: both output cotangents up each column
    want[3, 0:2, 1] = 3 * (1 + 2)  # W: both input cotangents' partials along each row
    np.testing.assert_array_equal(links, want)
    word, hop = 32 / spec.link_bits_per_cycle, spec.hop_latency_cycles
    stage = 2 * spec.ramp_latency_cycles + 1
    by_hand = 3 * (7 * word + 4 * hop + 2 * stage)
    assert by_hand == 63.0
    fig = tx.schedule.kernel("scan_0")
    assert fig["scan_bwd_comm"] == by_hand and fig["bwd_comm"] == by_hand
    assert fig["backward"] == max(fig["bwd_compute"], by_hand)
    assert fig["scan_bwd_adds"] == 3 * (1 + 2) and fig["scan_adds"] == 3 * (2 + 2)
    assert fig["bwd_compute"] == _counts_cycles(tx.schedule, "scan_0", "bwd_counts") + 9.0
    assert fig["compute"] == _counts_cycles(tx.schedule, "scan_0", "counts") + 12.0
    state, _ = tx.step(tx.init(params), xs)
    np.testing.assert_array_equal(
        np.asarray(state.wafer.links), compiler.schedule.link_words(tx.plan).astype(np.float32)
    )
    assert float(state.wafer.clock) == pytest.approx(tx.schedule.step_cycles, rel=1e-6)
    assert compiler.estimate(tx).to_dict() == tx.report.to_dict()


def _counts_cycles(sched, name, which):
    """A kernel's compute of its per-core `counts` or `bwd_counts` alone (no anchor, no reduction adds)."""
    i, f = sched.plan.features.index(name), sched.plan.features
    counts = np.asarray(sched.kernels[which])[i]
    return float(wafer.cost.compute_cycles(sched.spec, {key: counts[j] for j, key in enumerate(f.keys)}))


# ---- charge rules by hand count ------------------------------------------------------------------------------


def _one_kernel(fn, params, inputs, name, rect, spec=SPECS["6x6"]):
    """A one-kernel program on a hand-placed rectangle, run per core: (its KernelPlan, its schedule figures)."""
    exe, _ = _run_per_core(fn, params, inputs, spec, placement={name: rect})
    return exe.plans[name], exe.schedule.kernel(name)


def _words(traffic, spec):
    return traffic.link_words(spec.rows, spec.cols)  # [N, E, S, W] per core


def test_dense_general_traffic_by_hand():
    """q = x W, W [3, 2, 2] tiled as [3, 4] on a 3x2 rectangle, one row of x: each row's west core sends its
    1-element chunk east (3 words), and each column chains its 2-word partials down two hops (2 x 2 x 2 words)."""
    spec = SPECS["6x6"]
    fn, params, inputs = _linen(nn.DenseGeneral((2, 2), use_bias=False), _rand(20, (1, 3)))
    plan, fig = _one_kernel(fn, params, inputs, "dense_0", (0, 0, 3, 2))
    (t,) = plan.params
    assert t.axes == ((0,), (1, 2)) and t.grid == (3, 2) and t.tile == (1, 2) and plan.reduce_pattern == "chain"
    links = _words(plan.traffic, spec)
    want = np.zeros_like(links)
    want[1, 0:3, 0] = 1  # E: the multicast along each row
    want[2, 0:2, 0:2] = 2  # S: the chain of partial sums down each column
    np.testing.assert_array_equal(links, want)
    assert fig["in_words"] == 1 and fig["out_words"] == 2 and fig["mm_d"] == 1 and fig["mm_c"] == 2


def test_batched_traffic_by_hand():
    """y = einsum("bhd,hde->bhe") of x [3, 2, 2] by W [2, 2, 2] (2 heads of [2, 2]) on a 2x2 rectangle of the 8x8
    mini wafer: tiles [2, 1, 1] (every core its tile of both heads), one copy. Each row's west core sends its chunk,
    3 rows x 1 element of both heads, east (2 x 6 words); each column its 6-word partial one hop south (2 x 6). A
    core's matmul per sample: 2 rows (one per head) x 1 x 1. Training: each column's bottom core sends the 6-word
    output cotangent north (x is the program's input: no input cotangent); the step's counters and clock are the
    schedule's."""
    spec = wafer.WaferSpec.mini(8, 8)
    fn, params, inputs = _linen(_Heads(features=2), _rand(24, (3, 2, 2)))
    plan, fig = _one_kernel(fn, params, inputs, "dense_0", (0, 0, 2, 2), spec)
    (t,) = plan.params
    assert t.grid == (2, 2) and t.tile == (2, 1, 1) and t.replicas == (1, 1) and t.axes is None
    links = _words(plan.traffic, spec)
    want = np.zeros_like(links)
    want[1, 0:2, 0] = 6  # E: both heads' chunks along each row
    want[2, 0, 0:2] = 6  # S: both heads' partials down each column
    np.testing.assert_array_equal(links, want)
    assert fig["in_words"] == 6 and fig["out_words"] == 6 and fig["comm"] > 0
    assert (fig["mm_p"], fig["mm_c"], fig["mm_d"]) == (2, 1, 1)
    loss = lambda p, b: jnp.sum(fn(p, b) ** 2)  # noqa: E731
    rects = {"dense_0": (0, 0, 2, 2)}
    tx = compiler.compile_train(loss, params, inputs[0], optax.sgd(0.1), spec=spec, mode="pipelined", placement=rects)
    links = _words(tx.plan.kernels["dense_0"].backward_traffic, spec)
    want = np.zeros_like(links)
    want[0, 1, 0:2] = 6  # N: the output cotangent up each column
    np.testing.assert_array_equal(links, want)
    state, _ = tx.step(tx.init(params), inputs[0])
    np.testing.assert_array_equal(
        np.asarray(state.wafer.links), compiler.schedule.link_words(tx.plan).astype(np.float32)
    )
    assert float(state.wafer.clock) == pytest.approx(tx.schedule.step_cycles, rel=1e-6)


def test_embedding_traffic_by_hand():
    """Lookups of 3 indices in a table [4, 2] on a 2x2 rectangle (tiles [2, 1]): each row receives the 3 indices
    and sends them east (2 x 3 words); each column sends its 3-word partial (a row or zeros per index) one hop
    south (2 x 3 words). The schedule counts the same words and one multiply-add per output element."""
    spec = SPECS["6x6"]
    fn, params, inputs = _linen(nn.Embed(4, 2), jnp.array([3, 0, 2], jnp.int32))
    plan, fig = _one_kernel(fn, params, inputs, "embed_0", (0, 0, 2, 2))
    (t,) = plan.params
    assert t.grid == (2, 2) and t.tile == (2, 1) and t.replicas == (1, 1)
    links = _words(plan.traffic, spec)
    want = np.zeros_like(links)
    want[1, 0:2, 0] = 3
    want[2, 0, 0:2] = 3
    np.testing.assert_array_equal(links, want)
    assert fig["in_words"] == 3 and fig["out_words"] == 3 and fig["mm_d"] == 1 and fig["mm_p"] == 1
    # training: the indices carry no gradient, so the backward only multicasts the output cotangent up the columns
    loss = lambda p, b: jnp.sum(fn(p, b) ** 2)  # noqa: E731
    tx = compiler.compile_train(loss, params, inputs[0], optax.sgd(0.1), spec=spec, placement={"embed_0": (0, 0, 2, 2)})
    assert tx.plan.features.dx.tolist() == [0.0]
    links = _words(tx.plan.kernels["embed_0"].backward_traffic, spec)
    want = np.zeros_like(links)
    want[0, 1, 0:2] = 3
    np.testing.assert_array_equal(links, want)


def test_depthwise_traffic_by_hand():
    """A depthwise 1x1 conv of 2 channels on a 1x2 rectangle (tiles [1, 1, 1, 1], one row of tiles): the row
    receives 1 channel of each of the 2 groups at 3 positions and sends them east (6 words); one row of tiles
    reduces nothing."""
    spec = SPECS["6x6"]
    conv = nn.Conv(2, (1, 1), feature_group_count=2, use_bias=False)
    fn, params, inputs = _linen(conv, _rand(21, (1, 1, 3, 2)))
    plan, fig = _one_kernel(fn, params, inputs, "conv_0", (0, 0, 1, 2))
    (t,) = plan.params
    assert t.grid == (1, 2) and t.tile == (1, 1, 1, 1)
    links = _words(plan.traffic, spec)
    want = np.zeros_like(links)
    want[1, 0, 0] = 6
    np.testing.assert_array_equal(links, want)
    assert fig["in_words"] == 6 and fig["in_chunk"] == 2


class _Tied(nn.Module):
    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(5)
        return nn.Dense(3)(shared(nn.tanh(shared(x))))


def test_tied_weights_gradient_sum_by_hand():
    """A Dense(5) called twice keeps a copy of its kernel [5, 5] and bias [5] (30 words) in both kernels. A training
    step sends the first copy's gradient to the second's kernel and the sum back: side by side on rows 0-1, two
    lanes of 15 words each way, 3 hops (cols 1 -> 4 east, 4 -> 1 west), and in between the second kernel's two
    lane-end cores add the 15 fp32 elements each received (an `@fadds` per element: its ramp word, 1 cycle on the
    mini wafer, the slowest of ALU 1/2, SRAM reads 4/16 and writes 4/8). The schedule puts 2 x (15 words + 3 hops)
    + 15 adds = 51 cycles (36 before the adds were charged) on the step, before the update; the counters get the
    words."""
    spec = wafer.WaferSpec.mini(8, 8)
    model = _Tied()
    x = _rand(22, (4, 5))
    params = model.init(jax.random.key(0), x)
    loss = lambda p, b: jnp.mean(model.apply(p, b) ** 2)  # noqa: E731
    rects = {"dense_0": (0, 0, 2, 2), "dense_1": (0, 4, 2, 2), "dense_2": (4, 0, 2, 2)}
    tx = compiler.compile_train(loss, params, x, optax.sgd(0.1), spec=spec, mode="pipelined", placement=rects)
    f = tx.plan.features
    assert f.tie_src.tolist() == [0.0] and f.tie_dst.tolist() == [1.0] and f.tie_words.tolist() == [30.0]
    assert f.tie_elems.tolist() == [30.0] and f.tie_isz.tolist() == [4.0]
    word = 32 / spec.link_bits_per_cycle
    add = max(1 / spec.simd_width("alu", "fp32"), 4 / spec.sram_read_bytes_per_cycle)
    add = max(add, 4 / spec.sram_write_bytes_per_cycle, 32 / spec.ramp_bits_per_cycle)
    assert add == 1.0
    tied = 2 * (15 * word + 3 * spec.hop_latency_cycles) + 15 * add
    assert tied == 51.0
    assert tx.schedule.figures["tied_cycles"] == pytest.approx(tied, rel=1e-12)
    want = np.zeros((4, spec.rows, spec.cols))
    want[1, 0:2, 1:4] = 15  # E, cols 1, 2, 3 send to the next
    want[3, 0:2, 2:5] = 15  # W, cols 4, 3, 2 send to the previous
    np.testing.assert_array_equal(compiler.schedule.tied_routes(tx.plan).link_words(), want)
    # the step's record holds them; the clock adds the figure; the estimate is the report
    without = compiler.schedule.link_words(tx.plan) - want
    base = sum(
        p.traffic.link_words(spec.rows, spec.cols) + p.backward_traffic.link_words(spec.rows, spec.cols)
        for p in tx.plan.kernels.values()
    )
    np.testing.assert_array_equal(without, base + 2 * tx.plan.batch * tx.plan.routes.link_words())
    state, _ = tx.step(tx.init(params), x)
    np.testing.assert_array_equal(
        np.asarray(state.wafer.links), compiler.schedule.link_words(tx.plan).astype(np.float32)
    )
    assert float(state.wafer.clock) == pytest.approx(tx.schedule.step_cycles, rel=1e-6)
    assert compiler.estimate(tx).to_dict() == tx.report.to_dict()
    for copies in tx.plan.weight_copies.values():  # the copies stay equal
        values = [np.asarray(state.wafer.sram[name]) for name, _ in copies]
        for v in values[1:]:
            np.testing.assert_array_equal(v, values[0])


def test_tied_weights_gradient_sum_on_a_defective_wafer():
    """As above with physical core (0, 2) dead: row 0's logical columns 2.. sit one physical column further east,
    so the lane of row 0 from column 1 to column 4 spans 4 physical hops (row 1's still 3): each way pays the
    longest lane's 4 hops (the adds as above, 15 cycles: 53, 38 before), and the report is still the estimate and
    the emulator's clock."""
    spec = wafer.WaferSpec.mini(8, 8).with_defects(dead_cores=[(0, 2)])
    model = _Tied()
    x = _rand(22, (4, 5))
    params = model.init(jax.random.key(0), x)
    loss = lambda p, b: jnp.mean(model.apply(p, b) ** 2)  # noqa: E731
    rects = {"dense_0": (0, 0, 2, 2), "dense_1": (0, 4, 2, 2), "dense_2": (4, 0, 2, 2)}
    tx = compiler.compile_train(loss, params, x, optax.sgd(0.1), spec=spec, mode="pipelined", placement=rects)
    word = 32 / spec.link_bits_per_cycle
    tied = 2 * (15 * word + 4 * spec.hop_latency_cycles) + 15 * 1.0
    assert tied == 53.0
    assert tx.schedule.figures["tied_cycles"] == pytest.approx(tied, rel=1e-12)
    state, _ = tx.step(tx.init(params), x)
    assert float(state.wafer.clock) == pytest.approx(tx.schedule.step_cycles, rel=1e-6)
    assert compiler.estimate(tx).to_dict() == tx.report.to_dict()


def test_no_tie_charge_without_shared_weights_or_in_inference():
    spec = SPECS["6x6"]
    fn, params, inputs = CASES["qkv"][0]()
    assert compiler.compile(fn, params, *inputs, spec=spec).plan.features.tie_src.shape == (0,)
    tx = compiler.compile_train(
        lambda p, b: jnp.mean(fn(p, b) ** 2), params, inputs[0], optax.sgd(0.1), spec=spec, mode="pipelined"
    )
    assert tx.plan.features.tie_src.shape == (0,) and tx.schedule.figures["tied_cycles"] == 0


def test_cost_model_charges_the_tied_sums():
    """The differentiable cost model is the same schedule: at temperature 0 it charges the tied sums as the report
    and the emulator do, and gives them gradients with respect to the placement."""
    from compiler import costmodel as cm

    spec = wafer.WaferSpec.mini(8, 8)
    model = _Tied()
    x = _rand(23, (4, 5))
    params = model.init(jax.random.key(0), x)
    loss = lambda p, b: jnp.mean(model.apply(p, b) ** 2)  # noqa: E731
    tx = compiler.compile_train(loss, params, x, optax.sgd(0.1), spec=spec, mode="pipelined")
    state, _ = tx.step(tx.init(params), x)
    feats, lay = cm.features(tx), cm.layout_of(tx)
    pred = jax.jit(cm.predict, static_argnums=2)(feats, lay, spec)
    assert float(tx.schedule.figures["tied_cycles"]) > 0
    np.testing.assert_allclose(float(pred["tied_cycles"]), tx.schedule.figures["tied_cycles"], rtol=2e-6)
    np.testing.assert_allclose(float(pred["call_cycles"]), float(state.wafer.clock), rtol=2e-6)
    g = jax.grad(lambda row: cm.predict(feats, lay.__class__(lay.height, lay.width, row, lay.col), spec)["tied_cycles"])
    assert np.all(np.isfinite(np.asarray(g(lay.row))))
