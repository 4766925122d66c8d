"""The compiler's cost rules (compiler/schedule.py, compiler/plan/partition.py, compiler/plan/route.py), one by one,
by hand on tiny programs and mini wafers.

The machine's figures (wafer/spec.py, WSE-2): a vector instruction starts in 14.3 cycles, a task in 10; an element
costs max(1 / SIMD lanes, SRAM read bytes / 16, write bytes / 8, fabric words x 32 / ramp bits) cycles (fp32: 1 FMAC
lane, 2 ALU lanes); a fabric phase max(busiest ramp, busiest link, mean link words + hops) + dependent stages x
(2 T_R + 1 = 5) cycles at a word a cycle per link; the edge I/O moves 1.2 Tb/s at 850 MHz.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compiler
import wafer
from compiler import schedule
from compiler.frontend.graph import build_graph
from compiler.frontend.trace import trace
from compiler.plan import features as ft
from compiler.plan import partition as part
from compiler.plan import plan as planning
from compiler.plan.route import HOST
from wafer import fabric

SPEC = wafer.WSE2
SPEC_8 = wafer.WaferSpec.mini(8, 8)
T_I, T_TASK = SPEC.instr_startup_cycles, SPEC.task_cycles  # 14.3, 10
STAGE = 2 * SPEC.ramp_latency_cycles + 1  # a dependent receive-add-send stage: 5 cycles
assert (T_I, T_TASK, STAGE, SPEC.simd_fmac_fp32, SPEC.simd_alu_fp32) == (14.3, 10.0, 5.0, 1.0, 2.0)


def _close(a, b):
    assert float(a) == pytest.approx(float(b), rel=1e-12, abs=1e-12)


def _mse(fn):
    return lambda p, b: jnp.mean((fn(p, b["x"]) - b["y"]) ** 2)


# ---- 1. a WEIGHT kernel's anchor and its reduction -------------------------------------------------------------


def test_weight_anchor_per_core_and_cheapest_reduction():
    """x [2, 128] @ W [128, 2] on a 32 x 1 rectangle: a 32 x 1 tile grid of 4 x 2 tiles, the 2 rows of x (one per
    sample) on every core."""
    spec = wafer.WaferSpec.mini(32, 6)
    params = {"w": jnp.ones((128, 2))}
    x = jnp.ones((2, 128))
    exe = compiler.compile(lambda p, x: x @ p["w"], params, x, spec=spec, placement={"dense_0": (0, 3, 32, 1)})
    k, plan = exe.schedule.kernel("dense_0"), exe.plans["dense_0"]
    assert (k["gh"], k["gw"], k["ta"], k["tb"], k["rr"], k["rc"], k["samples"]) == (32, 1, 4, 2, 1, 1, 2)
    # per sample a core computes [1, 4] @ [4, 2]: 2 dot products (fewer than 4 instructions along the 2 columns),
    # reading both operands (4 + 4 bytes: 8 / 16 a cycle) and writing nothing: one fp32 FMAC lane, a cycle each
    per_sample = 2 * T_I + 1 * 2 * 4 * 1.0
    _close(schedule.matmul_cycles(spec, ("fp32",), 1, 2, 4, 4, 4, 4), per_sample)
    _close(k["anchor"], 2 * per_sample)  # 2 samples: 73.2
    rest = T_TASK + 2 * per_sample  # and one task (a core holds outputs of one sample): 83.2
    # its 2 x 2 = 4 words of partial sums reduced down the 32 cores of its column to the bottom core:
    #   chain      4 + 1 hop + 31 stages x 5 = 160; the busiest core adds 1 incoming partial: 4 elements, a word a
    #              cycle off its ramp: 4
    #   tree       5 rounds: 5 x 4 words into the root, mean 4 x 80 / 31 link words + 16 hops (more), 5 stages: 51.3;
    #              the root adds 5 partials: 20
    #   two_phase  groups of round(sqrt(32)) = 6: 4 + 1 + 5 x 5 = 30 within them, 4 + 6 hops + 5 x 5 = 35 through the
    #              6 leaders: 65; the busiest core adds 2 partials: 8
    hand = {"chain": (160.0, 4.0), "tree": (320 / 31 + 16 + 5 * 5, 20.0), "two_phase": (65.0, 8.0)}
    for pattern, (comm, adds) in hand.items():
        _close(fabric.reduce_cycles(32, 4, spec, pattern=pattern, to="last"), comm)
        _close(fabric.reduce_adds_cycles(32, 4, spec, pattern=pattern, to="last"), adds)
    # the kernel's superstep max(compute, comm) with each: chain max(87.2, 160), tree max(103.2, 51.3), two-phase
    # max(91.2, 65): two-phase is the cheapest (a plain sum of transfer and adds would pick the tree)
    assert plan.reduce_pattern == "two_phase" == schedule.PATTERNS[int(k["reduce_pattern"])]
    assert k["reduction"] == fabric.reduce_cycles(32, 4, spec, pattern="two_phase", to="last") == 65
    assert k["adds"] == 8 and k["multicast"] == 0  # (one column: nothing to multicast)
    assert k["comm"] == 65 == plan.traffic.cycles(spec)  # the traffic the per-core path runs, in that pattern
    _close(k["compute"], rest + 8)
    _close(k["cycles"], rest + 8)


# ---- 2. per-core counts ---------------------------------------------------------------------------------------


def test_per_core_counts_divide_elements_not_operations():
    """exp(x) * p on x [4, 6]: exp is a special function (16 instructions of its sequence, one operation), the
    multiply by the scalar p one instruction; a kernel of 2 operations, 17 instructions and one task per call."""
    graph = build_graph(trace(lambda p, x: jnp.exp(x) * p, jnp.float32(2.0), jnp.ones((4, 6))))
    f = ft.features(graph)
    counts = dict(zip(f.keys, f.counts[0]))
    assert counts == {
        ("alu", "fp32", 4, 4): 24,
        ("special", "fp32", 4, 4): 24,
        ("instr",): 17,
        ("ops",): 2,
        ("task",): 1,
    }
    # on 5 cores running the program 3 times a call: elements ceil(24 / 5) = 5; instructions: every run issues each
    # operation once (2 x 3), the 15 beyond one per operation divide (ceil(15 / 5) = 3); a task per run
    got = part.per_core_counts(f, f.counts, np.array([5.0]), np.array([3.0]))
    assert dict(zip(f.keys, got[0])) == {
        ("alu", "fp32", 4, 4): 5,
        ("special", "fp32", 4, 4): 5,
        ("instr",): 2 * 3 + 3,
        ("ops",): 2,
        ("task",): 3,
    }
    # a 2 x 3 rectangle: its 6 cores each hold outputs of min(4 samples, ceil(24 / 6)) = 4 samples: 4 runs
    shape = part.kernel_shape(f, np.array([2.0]), np.array([3.0]))
    assert (shape["cores"][0], shape["runs"][0]) == (6, 4)
    per_core = dict(zip(f.keys, shape["counts"][0]))
    assert per_core[("special", "fp32", 4, 4)] == per_core[("alu", "fp32", 4, 4)] == 4
    assert (per_core[("instr",)], per_core[("task",)]) == (2 * 4 + math.ceil(15 / 6), 4)
    # its compute: 4 x 16 (special) + 4 x 1/2 (2 ALU lanes; 4 bytes read / 16, written / 8) + 11 x 14.3 + 4 x 10
    k = schedule.kernel_figures(f, schedule.Layout(*np.array([[2.0], [3.0], [0.0], [0.0]])), SPEC)
    _close(k["compute"][0], 4 * 16 + 4 * 0.5 + 11 * T_I + 4 * T_TASK)
    # a 4 x 8 rectangle: at most one output word per core, 24 cores, each holding one sample's: one run
    shape = part.kernel_shape(f, np.array([4.0]), np.array([8.0]))
    assert (shape["cores"][0], shape["runs"][0]) == (24, 1)
    assert dict(zip(f.keys, shape["counts"][0]))[("instr",)] == 2 * 1 + math.ceil(15 / 24)


# ---- 3. the backward program is the VJP's ----------------------------------------------------------------------


def _two_layer(p, x):
    return jax.nn.relu(x @ p["w0"] + p["b0"]) @ p["w1"]


def _two_layer_data():
    params = {"w0": jnp.ones((16, 8)) / 16, "b0": jnp.zeros(8), "w1": jnp.ones((8, 2)) / 8}
    return params, {"x": jnp.ones((4, 16)), "y": jnp.zeros((4, 2))}


def test_backward_counts_come_from_the_vjp():
    params, batch = _two_layer_data()
    hand = {"dense_0": (0, 3, 2, 2), "dense_1": (0, 5, 2, 1)}
    tx = compiler.compile_train(_mse(_two_layer), params, batch, optax.sgd(0.1), spec=SPEC_8, placement=hand)
    f = tx.plan.features
    i = f.index("dense_0")
    # dense_0 = relu(x @ W0 + b0) reads the data: its input needs no cotangent
    assert f.dx.tolist() == [0.0, 1.0]
    # its backward beside the anchor's matmuls, from the output cotangent g [4, 8]: g x relu's mask (one instruction
    # over 32 elements, reading 2 vectors, writing 1); b0's cotangent, the sum of g's 4 rows (acc[:] += g[i, :]: 4
    # instructions over 32 elements, reading the accumulator and a row, writing the accumulator) and the sum over
    # the bias's broadcast [1, 8] (one instruction over 8); one task
    assert dict((key, v) for key, v in zip(f.keys, f.bwd_counts[i]) if v) == {
        ("alu", "fp32", 8, 4): 32 + 32 + 8,
        ("instr",): 1 + 4 + 1,
        ("ops",): 3,
        ("task",): 1,
    }
    k = tx.schedule.kernel("dense_0")
    # W0 [16, 8] on 2 x 2 cores: tiles 8 x 4, every core a share of the 4 samples' 32 outputs (8: 4 runs)
    assert (k["ta"], k["tb"], k["samples"], k["runs"], k["cores"]) == (8, 4, 4, 4, 4)
    # per core: 72 / 4 = 18 elements at 1/2 cycle; 3 operations x 4 runs + ceil(3 / 4) instructions; 4 tasks
    rest = 18 * 0.5 + (3 * 4 + 1) * T_I + 4 * T_TASK
    # W0's cotangent x^T g per sample on the core's tile: [8, 1] @ [1, 4], one instruction per column (4, fewer than
    # 32 dot products) of 8 FMACs down it, reading x's chunk and the accumulator and writing the accumulator: a cycle
    # each
    dw = 4 * (4 * T_I + 8 * 4 * 1.0)
    _close(k["bwd_compute"], rest + dw)
    # g's 4 x 4 words multicast up the 2 cores of each column: 16 + 1 hop
    assert k["bwd_comm"] == 17
    _close(k["backward"], rest + dw)
    # the forward: the bias add and relu (8 elements each, 2 x 4 instructions, 4 tasks), x's [1, 8] @ [8, 4] per
    # sample (4 dot products), the chain of 16 words over 2 cores adding 16 elements a word a cycle
    forward = 8 * 0.5 + 8 * 0.5 + 8 * T_I + 4 * T_TASK + 4 * (4 * T_I + 32) + 16
    _close(k["forward"], forward)
    assert k["backward"] < 2 * k["forward"]  # not the old rule's 2 x forward


# ---- 4. the weight gradient's sum over the copies of a tile grid -------------------------------------------------


def test_grad_sum_over_tile_grid_copies():
    """x [4, 4] @ W [4, 16] on an 8 x 4 rectangle: a 4 x 4 grid of 1 x 4 tiles, two copies of it (one above the
    other), each with 2 of the 4 rows of x."""
    params = {"w": jnp.ones((4, 16)) / 4}
    batch = {"x": jnp.ones((4, 4)), "y": jnp.zeros((4, 16))}
    spec = wafer.WaferSpec.mini(8, 9)
    tx = compiler.compile_train(
        _mse(lambda p, x: x @ p["w"]), params, batch, optax.sgd(0.1), spec=spec, placement={"dense_0": (0, 3, 8, 4)}
    )
    k = tx.schedule.kernel("dense_0")
    assert (k["gh"], k["gw"], k["ta"], k["tb"], k["rr"], k["rc"], k["tile_words"]) == (4, 4, 1, 4, 2, 1, 4)
    (tiling,) = tx.plans["dense_0"].params
    assert tiling.replicas == (2, 1)
    # the formula: a strided chain allreduce along the rows of copies and one along the columns, and their adds
    want = 0.0
    for copies, stride in ((k["rr"], k["gh"]), (k["rc"], k["gw"])):
        want += fabric.strided_allreduce_cycles(copies, stride, k["tile_words"], spec)
        want += fabric.reduce_adds_cycles(copies, 4, spec, pattern="chain", to="all")
    assert k["grad_sum"] == want
    # by hand: 4 streams of a 4-word tile, each over 4 links (from a core to the one 4 rows below), to the middle
    # copy: 16 words on a link, + 4 hops, + 1 stage = 25; back: 16 + 4 hops = 20; the receiving core adds 4
    # elements, a word a cycle: 4. One column of copies: nothing.
    assert k["grad_sum"] == 25 + 20 + 4 == 49
    # the update: SGD on the 1 x 4 tile (4 FMACs, one instruction, a task), after the sum
    _close(k["update"], 4 * 1.0 + T_I + T_TASK + 49)


# ---- 5. streams between kernels ---------------------------------------------------------------------------------


def _skip(p, x):
    h = x @ p["w0"]
    return h @ p["w1"] + h @ p["w2"]


def test_stream_cycles_count_shared_links():
    """dense_0 feeds dense_1 and dense_2 (which adds dense_1's output): three 1 x 1 kernels on one row, so that
    dense_0 -> dense_2 runs over the links of dense_0 -> dense_1 and of dense_1 -> dense_2."""
    params = {f"w{i}": jnp.ones((8, 8)) / 8 for i in range(3)}
    x = jnp.ones((4, 8))
    spec = wafer.WaferSpec.mini(1, 12)
    hand = {"dense_0": (0, 3, 1, 1), "dense_1": (0, 5, 1, 1), "dense_2": (0, 7, 1, 1)}
    exe = compiler.compile(_skip, params, x, spec=spec, placement=hand)
    f, fig = exe.plan.features, exe.schedule.figures
    flows = [(int(s), int(d)) for s, d in zip(f.flow_src, f.flow_dst)]
    assert flows == [(0, 1), (0, 2), (1, 2), (-1, 0), (2, -1)]
    np.testing.assert_array_equal(f.flow_words, [8, 8, 8, 8, 8])  # 4 samples x 8 floats per call: 8 words a sample
    # east links: host -> dense_0 over columns 0-2; dense_0 -> dense_1 and dense_0 -> dense_2 carry the same value
    # h, one multicast stream: columns 3-4 carry it once; dense_0 -> dense_2 and dense_1 -> dense_2 share columns
    # 5-6; dense_2 -> host columns 7-10
    east = exe.routes.link_words()[1, 0]
    np.testing.assert_array_equal(east, [8, 8, 8, 8, 8, 16, 16, 8, 8, 8, 8, 0])
    # share: the busiest link on a stream's lanes carries 2 streams' words where the multicast meets dense_1's
    np.testing.assert_array_equal(f.flow_share, [1, 2, 2, 1, 1])
    # a stream's cycles per sample: its words over its lanes (one: the kernels are one row high) x its share
    np.testing.assert_array_equal(fig["stream_cycles"], [8, 8 / 1 * 2, 8 / 1 * 2, 8, 8])
    assert fig["pace"][len(f.names)] == 16  # the busiest stream's entry of the pace
    # dense_0 injects h once (its ramp), and each reader takes it off its own
    ramps = exe.routes.traffic.phases[0].loads(1, 12)
    assert ramps[wafer.fabric.RAMP_OUT, 0, 3] == 8 and ramps[wafer.fabric.RAMP_IN, 0, 5] == 8
    assert ramps[wafer.fabric.RAMP_IN, 0, 7] == 16  # dense_2 takes h and dense_1's output


def test_a_narrow_route_bounds_the_pipeline():
    """x [4, 4] @ W [4, 256] on a 1 x 64 row of cores: 256 output words a sample leave over one lane."""
    spec = wafer.WaferSpec.mini(1, 69)
    exe = compiler.compile(
        lambda p, x: x @ p["w"],
        {"w": jnp.ones((4, 256))},
        jnp.ones((4, 4)),
        spec=spec,
        placement={"dense_0": (0, 3, 1, 64)},
    )
    sched = exe.schedule
    k = sched.kernel("dense_0")
    # per sample a core multiplies [1, 4] by its 4 x 4 tile (4 instructions of 4 FMACs along the 4 columns), one
    # task per sample: 4 x (4 x 14.3 + 16 + 10) per call; x's 16-word chunks cross 63 links
    _close(k["compute"], 4 * (4 * T_I + 16 + T_TASK))
    assert k["comm"] == 16 + 63
    np.testing.assert_array_equal(sched.figures["stream_cycles"], [4 / 1, 256 / 1])  # in, out: one lane each
    pace = sched.figures["pace"]
    _close(pace[0], k["cycles"] / 4)  # 83.2 cycles a sample
    assert sched.figures["bottleneck_cycles"] == pace.max() == 256 > pace[0]
    assert sched.bound() == "fabric" and exe.report.bound == "fabric"
    assert exe.report.cycles_per_sample == 256 and exe.report.samples_per_s == spec.clock_hz / 256


# ---- 6. the edge I/O ----------------------------------------------------------------------------------------------


def test_edge_io_bounds_a_large_input_with_little_compute():
    """x [4, 4096] * p on a 64 x 8 rectangle: 64 KB in and out per call, 32 multiplies per core."""
    spec = wafer.WaferSpec.mini(64, 16)
    x = jnp.ones((4, 4096))
    exe = compiler.compile(
        lambda p, x: x * p, jnp.float32(2.0), x, spec=spec, placement={"elementwise_0": (0, 3, 64, 8)}
    )
    fig, k = exe.schedule.figures, exe.schedule.kernel("elementwise_0")
    # compute: 16384 products over 512 cores, 32 each at 1/2 cycle, one instruction and one task per sample
    _close(k["compute"], 32 * 0.5 + 4 * T_I + 4 * T_TASK)
    # streams: 4096 words a sample in over the kernel's 64 rows, and out
    np.testing.assert_array_equal(fig["stream_cycles"], [64, 64])
    # the edge I/O: inputs in and outputs out at once, 4 x 4096 x 4 bytes a call at 1.2 Tb/s and 850 MHz
    io = 4 * 4096 * 4 * 8 / spec.edge_io_bits_per_s * spec.clock_hz / 4
    assert io == pytest.approx(92.84, rel=1e-4)
    _close(fig["io_sample_cycles"], io)
    _close(fig["bottleneck_cycles"], io)
    assert exe.schedule.bound() == "I/O" and exe.report.bound == "I/O"
    _close(exe.report.cycles_per_sample, io)
    _close(exe.report.samples_per_s, spec.edge_io_bits_per_s / (4096 * 4 * 8))


# ---- 7. colours -----------------------------------------------------------------------------------------------------


def _heads(p, x):
    h = x @ p["w0"]
    return tuple(h @ p[f"w{i}"] for i in range(1, 5))


def test_too_many_streams_through_a_router_raise_color_error():
    """dense_0 feeds four heads placed east of it on one row: two streams pass dense_0's core."""
    params = {f"w{i}": jnp.ones((8, 8)) for i in range(5)}
    x = jnp.ones((4, 8))
    hand = {"dense_0": (0, 3, 1, 1), "dense_1": (0, 6, 1, 1), "dense_2": (0, 8, 1, 1)}
    hand |= {"dense_3": (0, 10, 1, 1), "dense_4": (0, 12, 1, 1)}
    # 8 colours, 6 kept by the runtime: 2 for the program
    spec = wafer.WaferSpec.mini(1, 16, router_colors=8, reserved_colors=6)
    with pytest.raises(compiler.ColorError) as info:
        compiler.compile(_heads, params, x, spec=spec, placement=hand)
    e = info.value
    assert isinstance(e, compiler.RouteError)
    # dense_0's router: the host's stream in and h out to the four heads -- one multicast stream, one colour (the
    # routers deliver it to each head and forward it) -- and dense_0's own multicast (1) and chain (2): 5.
    assert (e.core, e.needed, e.available, e.kernel) == ((0, 3), 2 + 3, 2, "dense_0")
    assert set(e.streams) == {(HOST, "dense_0"), ("dense_0", "dense_1")}  # the multicast named by its first flow
    assert "(0, 3)" in str(e) and "dense_0" in str(e)
    # with the WSE-2's 24 - 6 colours the same placement routes
    exe = compiler.compile(_heads, params, x, spec=wafer.WaferSpec.mini(1, 16), placement=hand)
    assert exe.routes is not None


# ---- 8. SRAM --------------------------------------------------------------------------------------------------------


def test_weight_kernel_activation_bytes_and_data_capacity():
    # training, x [4, 4] @ W [4, 16] on 8 x 4 (two copies of a 4 x 4 grid, 2 rows of x each: 2 samples per core)
    params = {"w": jnp.ones((4, 16)) / 4}
    batch = {"x": jnp.ones((4, 4)), "y": jnp.zeros((4, 16))}
    tx = compiler.compile_train(
        _mse(lambda p, x: x @ p["w"]),
        params,
        batch,
        optax.sgd(0.1),
        spec=wafer.WaferSpec.mini(8, 9),
        placement={"dense_0": (0, 3, 8, 4)},
    )
    k, f = tx.schedule.kernel("dense_0"), tx.plan.features
    assert (f.act_copies, f.in_flight[0], k["samples"]) == (2, 1, 2)
    # a core's input chunk: 2 rows x 1 column, its partial result 2 rows x 4 columns: per sample (2 + 8) / 2 words,
    # in 2 buffers, and the stash of the 1 sample between its forward and backward: 2 / 2 words
    assert (k["in_words"], k["out_words"]) == (2, 8)
    assert k["act_bytes"] == 4 * math.ceil(2 * (2 + 8) / 2 + 1 * 2 / 2) == 44
    assert tx.report.kernel("dense_0").act_bytes_per_core == 44
    # inference, x [1, 1000] @ W [1000, 1] + b on one core: the weight column and the bias (1001 words), and the
    # sample's 1000 inputs and 1 output (1001 words): 8008 bytes, within 8 KB of SRAM but not 8 KB less 256 of code
    fn = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
    params = {"w": jnp.ones((1000, 1)), "b": jnp.ones(1)}
    x = jnp.ones((1, 1000))
    roomy = wafer.WaferSpec.mini(4, 8, sram_bytes_per_core=8192, code_bytes_per_core=0)
    exe = compiler.compile(fn, params, x, spec=roomy, placement={"dense_0": (0, 3, 1, 1)})
    assert exe.report.kernel("dense_0").weight_bytes_per_core + exe.report.kernel("dense_0").act_bytes_per_core == 8008
    tight = roomy.with_(code_bytes_per_core=256)
    with pytest.raises(wafer.SramCapacityError) as info:
        compiler.compile(fn, params, x, spec=tight, placement={"dense_0": (0, 3, 1, 1)})
    e = info.value
    assert (e.bytes_needed, e.capacity, e.core) == (8008, 8192 - 256, (0, 3))
    assert "256 B of 8192 kept for code" in str(e)


# ---- 9. useful cores ------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


def test_a_tiny_mlp_uses_only_the_cores_that_help():
    """A 64-64-10 MLP on 8 samples on the WSE-2: a tile per weight element and a row per sample (the most cores a
    weight kernel can split its work over) would be 64 x 64 x 8 and 64 x 10 x 8 cores; past a few thousand, more cores
    only add instructions, tasks and longer reductions."""
    x = jnp.ones((8, 64))
    params = jax.eval_shape(MLP().init, jax.random.key(0), x)
    exe = compiler.compile(MLP().apply, params, x, spec=SPEC)
    most = {k.name: part.max_cores(k, exe.traced) for k in exe.graph.kernels}
    assert most == {"dense_0": 64 * 64 * 8, "dense_1": 64 * 10 * 8}
    fewest, useful = planning.area_scan(exe.plan.features, SPEC)
    for d in exe.plan.demands:
        assert d.max_cores == min(most[d.name], useful[exe.plan.features.index(d.name)])
    assert sum(d.max_cores for d in exe.plan.demands) < sum(most.values()) / 4
    assert exe.plan.demands[0].max_cores < most["dense_0"] / 4
    # the placement uses well under the old spread-everything rule's cores (and a tiny fraction of the wafer) ...
    assert exe.report.active_cores <= sum(d.max_cores for d in exe.plan.demands) < 200_000
    assert exe.report.active_cores < SPEC.cores / 100
    # ... and the whole usable wafer would not make either kernel faster
    f, n = exe.plan.features, exe.plan.features.n
    usable = SPEC.cols - SPEC.memcpy_cols_west - SPEC.memcpy_cols_east
    whole = schedule.Layout(np.full(n, float(SPEC.rows)), np.full(n, float(usable)), np.zeros(n), np.zeros(n))
    placed = schedule.kernel_figures(f, exe.plan.layout, SPEC)["cycles"]
    assert (placed <= schedule.kernel_figures(f, whole, SPEC)["cycles"]).all()


def test_integer_tiling_equals_the_rule():
    """tile_param's integer arithmetic gives param_grid's figures (the rule's snapped float ceil)."""
    rng = np.random.default_rng(0)
    for t in range(3000):
        layout = (ft.MATRIX, ft.VECTOR)[t % 2]
        a = int(rng.integers(1, (10, 1000, 100_000, 2**30)[t % 4]))
        b = 1 if layout == ft.VECTOR else int(rng.integers(1, (10, 5000, 100_000)[t % 3]))
        h, w = (int(rng.integers(1, (4, 100, 1200)[(t // k) % 3])) for k in (1, 3))
        want = tuple(int(v) for v in part.param_grid(layout, a, b, h, w))
        assert part._param_grid_ints(layout, a, b, h, w) == want, (layout, a, b, h, w)
