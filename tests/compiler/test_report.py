"""Compile reports: every zoo model compiled onto the WSE-2 preset, the MLP and LeNet emulated on the full
757 x 996 grid, and a 2-layer MLP's report figures checked against a hand computation from the cost rules."""

from __future__ import annotations

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_zoo import MODELS, init_like

import compiler
import wafer

NAMES = tuple(MODELS)


@pytest.fixture(scope="module")
def wse2():
    """`wse2(name) -> (case, exe)` compiled onto wafer.WSE2 once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            case = MODELS[name]()
            cache[name] = (case, compiler.compile(*case.trace_args(), spec=wafer.WSE2))
        return cache[name]

    return get


# ---- WSE-2 reports ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_wse2_report(wse2, name):
    _, exe = wse2(name)
    spec, report = wafer.WSE2, exe.report
    text = str(report)
    assert "bottleneck" in text and "WSE-2" in text
    for k in exe.graph.kernels:
        assert k.name in text
    d = json.loads(json.dumps(report.to_dict()))
    assert d["bottleneck"] == report.bottleneck and len(d["kernels"]) == len(exe.graph.kernels)
    assert [k["name"] for k in d["kernels"]] == list(exe.graph.names)

    assert 0 < report.samples_per_s < math.inf
    assert 0 < report.active_cores <= spec.cores and report.total_cores == spec.cores
    assert report.active_cores == sum(p.cores for p in exe.plans.values())
    worst = max(report.kernels, key=lambda r: r.cycles_per_sample)
    assert report.bottleneck == worst.name
    assert report.cycles_per_sample == worst.cycles_per_sample
    assert report.samples_per_s == pytest.approx(spec.clock_hz / worst.cycles_per_sample, rel=1e-12)
    assert 0 < report.compute_utilization <= 1
    assert 0 < report.peak_sram_bytes_per_core <= spec.sram_bytes_per_core


@pytest.mark.parametrize("name", NAMES)
def test_wse2_placement_inside_grid_and_disjoint(wse2, name):
    _, exe = wse2(name)
    spec = wafer.WSE2
    owner = np.full((spec.rows, spec.cols), -1)
    assert list(exe.placement) == list(exe.graph.names)
    for i, (kname, r) in enumerate(exe.placement.items()):
        assert r.height >= 1 and r.width >= 1
        assert 0 <= r.row and r.row + r.height <= spec.rows and 0 <= r.col and r.col + r.width <= spec.cols, kname
        block = owner[r.rows, r.cols]
        assert (block < 0).all(), f"{kname} overlaps {exe.graph.names[block.max()]}"
        block[...] = i
        # the kernel's working grid lies in its rectangle
        gh, gw = exe.plans[kname].grid
        assert gh <= r.height and gw <= r.width


FULL_GRID = [(n, "fast") for n in NAMES] + [("mlp", "per_core"), ("lenet", "per_core")]


@pytest.mark.parametrize("name, path", FULL_GRID, ids=[f"{n}-{p}" for n, p in FULL_GRID])
def test_wse2_full_grid_emulation(wse2, name, path):
    """The whole 757 x 996 wafer's state (about 15 MB of counters) runs the compiled program."""
    case, exe = wse2(name)
    spec = wafer.WSE2
    state = exe.load() if case.is_module else exe.load(case.params)
    assert state.links.shape == (4, spec.rows, spec.cols)
    out, state = exe(state, *case.inputs, path=path)
    for g, w in zip(jax.tree.leaves(out), jax.tree.leaves(case.run())):
        scale = max(1.0, float(np.max(np.abs(w))))
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6 * scale)
    assert float(state.clock) == pytest.approx(float(exe.record.cycles(spec)), rel=1e-6)
    # traffic only on kernels and their routes; compute only on kernels' grids
    sent = np.asarray(state.links).sum(axis=0) > 0
    allowed = np.zeros(sent.shape, bool)
    for r in exe.placement.values():
        allowed[r.rows, r.cols] = True
    for lanes in exe.routes.paths.values():
        for lane in lanes:
            rr, cc = np.asarray(lane).T
            allowed[rr, cc] = True
    assert sent.any() and not (sent & ~allowed).any()
    busy = np.asarray(state.busy) > 0
    assert busy.sum() == exe.report.active_cores
    params = exe.read_params(state)
    for g, w in zip(jax.tree.leaves(params), jax.tree.leaves(exe.traced.params)):
        assert np.array_equal(np.asarray(g), np.asarray(w))


# ---- the report by hand -----------------------------------------------------------------------------------------


class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8)(nn.relu(nn.Dense(32)(x)))


B, K, H, N = 4, 16, 32, 8
MINI = wafer.WaferSpec.mini(16, 16)
# dense_0's W [16, 32] on a 4x4 grid: tiles 4x8; dense_1's W [32, 8] on a 4x1 grid: tiles 8x8. No padding.
HAND = {"dense_0": (0, 3, 4, 4), "dense_1": (0, 7, 4, 1)}


@pytest.fixture(scope="module")
def two_layer():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, K)), jnp.float32)
    params = init_like(jax.eval_shape(TwoLayer().init, jax.random.key(0), x))
    return x, params, compiler.compile(TwoLayer().apply, params, x, spec=MINI, placement=HAND)


def _hand_dense(spec, k, n, grid, batch, *, epilogue):
    """Cycles per batch of a dense layer y = act(x @ W + b), W [k, n] on a gh x gw grid of cores (tiles divide
    evenly; one row of x per sample, rows not split over copies of the grid), by the cost rules (wafer/cost.py):
      epilogue: [(read, write) SRAM bytes per element] of its elementwise operations (the bias add, the relu),
        spread over the cores: each core's even share of the batch x n outputs at max(1 / fp32 ALU lanes, read /
        16, write / 8) cycles per element, every operation one instruction (14.3 cycles) per sample the core holds
        outputs of, and a task (10 cycles) per sample;
      anchor: per sample, the core's [1, k/gh] @ [k/gh, n/gw] in the loop order with fewer instructions: min(k/gh,
        n/gw) of them (along the free axis, or n/gw dot products), one fp32 FMAC a cycle (it reads at most 8 bytes
        and writes at most 4 per FMAC: under 16 and 8 a cycle);
      adds: the partial sums reduced down each column in a chain: a core adds the one partial that arrives from
        above, batch x n/gw elements, at a word a cycle off its ramp (slower than the ALU's 1/2 cycle);
      comm: x's chunks of B = batch x k/gh words multicast east along the rows: max(B, B + (gw - 1) hops); the
        chain of B = batch x n/gw words south down the columns: B + 1 hop + (gh - 1) dependent stages of
        2 T_R + 1 cycles.
    SRAM: the W tile and the bias slice, and per sample the core's input chunk and partial result."""
    gh, gw = grid
    cores = gh * gw
    tk, tn = k // gh, n // gw
    outs = batch * n / cores
    runs = min(batch, math.ceil(batch * n / cores))  # samples whose outputs a core holds
    lanes, read, write = spec.simd_alu_fp32, spec.sram_read_bytes_per_cycle, spec.sram_write_bytes_per_cycle
    elementwise = sum(outs * max(1 / lanes, r / read, w / write) for r, w in epilogue)
    epi = elementwise + len(epilogue) * runs * spec.instr_startup_cycles + runs * spec.task_cycles
    anchor = batch * (min(tk, tn) * spec.instr_startup_cycles + tk * tn / spec.simd_fmac_fp32)
    word = 32 / spec.ramp_bits_per_cycle
    adds = batch * tn * word if gh > 1 else 0.0
    hop, stage = spec.hop_latency_cycles, 2 * spec.ramp_latency_cycles + 1
    multicast = batch * tk + (gw - 1) * hop if gw > 1 else 0.0
    reduction = batch * tn + hop + (gh - 1) * stage if gh > 1 else 0.0
    compute = epi + anchor + adds
    comm = multicast + reduction
    return {
        "compute": compute,
        "comm": comm,
        "cycles": max(compute, comm),  # spec.overlap: compute and communication overlap
        "anchor": anchor,
        "adds": adds,
        "multicast": multicast,
        "reduction": reduction,
        "weight_bytes": 4 * (tk * tn + math.ceil(n / min(cores, n))),
        "act_bytes": 4 * (tk + tn),
        "flops": 2 * batch * k * n + len(epilogue) * batch * n,
    }


def test_report_matches_hand_computation(two_layer):
    x, params, exe = two_layer
    spec, report = MINI, exe.report
    assert spec.overlap
    hand = {
        "dense_0": _hand_dense(spec, K, H, (4, 4), B, epilogue=[(8, 4), (4, 4)]),  # bias add, relu max(h, 0.0)
        "dense_1": _hand_dense(spec, H, N, (4, 1), B, epilogue=[(8, 4)]),  # bias add
    }
    for name, h in hand.items():
        plan, row, k = exe.plans[name], report.kernel(name), exe.schedule.kernel(name)
        assert plan.grid == (HAND[name][2], HAND[name][3])
        assert plan.reduce_pattern == "chain"  # (tree and two-phase cost more on 4 cores: wafer/fabric.py)
        # the schedule's figures of the kernel
        for figure in ("compute", "anchor", "adds", "multicast", "reduction", "comm", "cycles"):
            assert k[figure] == pytest.approx(h[figure], rel=1e-12, abs=1e-12), figure
        assert k["comm"] == plan.traffic.cycles(spec)  # the closed forms are the traffic's cost
        # the report's row
        assert row.cycles_per_sample == k["cycles"] / B == pytest.approx(h["cycles"] / B, rel=1e-12)
        assert row.compute_cycles_per_sample == pytest.approx(h["compute"] / B, rel=1e-12)
        assert row.comm_cycles_per_sample == h["comm"] / B
        assert row.weight_bytes_per_core == h["weight_bytes"]
        assert row.act_bytes_per_core == h["act_bytes"]
        assert row.flops_per_sample == h["flops"] / B
        assert row.cores == plan.cores and row.rect == HAND[name]
    # dense_0: 8 x 0.5 + 8 x 0.5 + 8 x 14.3 + 4 x 10 (epilogue) + 4 x (4 x 14.3 + 32) (anchor) + 32 (adds);
    # dense_1: 8 x 0.5 + 4 x 14.3 + 4 x 10 + 4 x (8 x 14.3 + 64) + 32
    assert hand["dense_0"]["cycles"] == pytest.approx(551.2) and hand["dense_1"]["cycles"] == pytest.approx(846.8)

    per_sample = {n: h["cycles"] / B for n, h in hand.items()}
    worst = max(per_sample, key=per_sample.get)
    # the pace: the slowest of the kernels, the streams (32 words per sample from dense_0 to dense_1 over 4 lanes, the
    # host's 16 in and 8 out over 4 rows each: a word a cycle on a link) and the edge I/O (the 256 B of x in, at once
    # with the 128 B of y out, per sample)
    np.testing.assert_array_equal(exe.schedule.figures["stream_cycles"], [32 / 4, 16 / 4, 8 / 4])
    io = B * K * 4 * 8 / spec.edge_io_bits_per_s * spec.clock_hz / B
    assert exe.schedule.figures["io_sample_cycles"] == pytest.approx(io, rel=1e-12)
    assert report.bottleneck == worst == "dense_1" and report.bound == "compute"
    assert report.cycles_per_sample == pytest.approx(per_sample[worst], rel=1e-12)
    assert report.samples_per_s == pytest.approx(spec.clock_hz / per_sample[worst], rel=1e-12)
    # routes: host -> dense_0 enters at column 0 and runs to dense_0's west edge (column 3): 3 hops; dense_0 ->
    # dense_1 side by side: 1 hop; dense_1 -> host leaves from its east edge (column 7) to column 15: 8 hops
    assert exe.routes.hops == {("host", "dense_0"): 3, ("dense_0", "dense_1"): 1, ("dense_1", "host"): 8}
    # a call's first sample: its I/O, every kernel, the longest route
    latency = io + sum(per_sample.values()) + 8 * spec.hop_latency_cycles
    assert report.latency_cycles == pytest.approx(latency, rel=1e-12)
    assert latency == pytest.approx(0.3626667 + 137.8 + 211.7 + 8, rel=1e-7)
    assert report.latency_s == report.latency_cycles / spec.clock_hz
    assert report.route_hops == 8
    assert report.active_cores == 16 + 4
    flops = sum(h["flops"] for h in hand.values()) / B
    assert report.compute_utilization == pytest.approx(flops / (20 * 2 * spec.simd_fmac_fp32 * per_sample[worst]))
    occ = exe.memory.occupancy()
    peak = max(h["weight_bytes"] + h["act_bytes"] for h in hand.values())
    assert report.peak_sram_bytes_per_core == occ.max() == peak == 4 * (8 * 8 + 2) + 4 * (8 + 8)
    assert report.sram_bytes_per_core == spec.data_bytes_per_core  # the SRAM less the code's reservation
    # busiest link: the stream dense_0 -> dense_1 carries 32 words per sample over 4 lanes (8 on each east link
    # from dense_0's east edge); dense_0's reduction B x 8 words per batch on each of its south links (8 per sample)
    assert report.max_link_words_per_sample == H / 4 == B * (H // 4) / B

    # one call charges the pipeline: fill (latency) then one pace per further sample
    state = exe.load(params)
    out, state = exe(state, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(TwoLayer().apply(params, x)), rtol=1e-5, atol=1e-6)
    assert float(state.clock) == pytest.approx(latency + (B - 1) * per_sample[worst], rel=1e-6)
    busy = np.asarray(state.busy)
    assert busy[0, 3] == pytest.approx(hand["dense_0"]["compute"], rel=1e-6)
    assert busy[0, 7] == pytest.approx(hand["dense_1"]["compute"], rel=1e-6)
    assert busy.sum() == pytest.approx(16 * hand["dense_0"]["compute"] + 4 * hand["dense_1"]["compute"], rel=1e-6)


def test_report_table_and_json(two_layer):
    _, _, exe = two_layer
    report = exe.report
    text = str(report)
    lines = text.splitlines()
    assert lines[0].startswith("Compile report") and "mini-16x16" in lines[0] and "batch 4" in lines[0]
    row = next(line for line in lines if line.startswith("dense_1"))
    assert row.rstrip().endswith("<") and "4x1@(0,7)" in row  # the bottleneck is marked
    assert "bottleneck            dense_1; pace 211.7 cycles/sample" in text
    assert "bound by              compute (the slowest of kernels, streams and edge I/O)" in text
    assert "of 45,056 bytes for data" in text  # 48 KB less the code's 4 KB
    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["kernels"][1]["rect"] == [0, 7, 4, 1]
    assert report.kernel("dense_0").cores == 16
    with pytest.raises(KeyError, match="dense_9"):
        report.kernel("dense_9")
