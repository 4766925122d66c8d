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
from wafer import cost

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


def _hand_dense(spec, k, n, grid, batch, *, alu_ops):
    """Cycles per batch of a dense layer y = act(x @ W + b), W [k, n] on a gh x gw grid of cores (tiles divide
    evenly; rows of x not split): each core does batch * (k/gh) * (n/gw) FMACs and `alu_ops` elementwise ops
    per output element it owns; SRAM: its W tile, its bias slice and its share of x in, its share of y out;
    fabric: x chunks multicast east along rows, partial sums reduced south along columns (hop by hop)."""
    gh, gw = grid
    cores = gh * gw
    tk, tn = k // gh, n // gw
    fmac = batch * tk * tn
    alu = alu_ops * batch * n / cores
    compute = fmac / spec.simd_fmac_fp32 + alu / spec.simd_alu_fp32
    bias_tile = math.ceil(n / min(cores, n))
    weight_bytes = 4 * (tk * tn + bias_tile)
    read = weight_bytes + 4 * batch * k / cores
    write = 4 * batch * n / cores
    sram = max(read / spec.sram_read_bytes_per_cycle, write / spec.sram_write_bytes_per_cycle)
    word = 32 / spec.link_bits_per_cycle
    comm = 0.0
    if gw > 1:  # multicast: each core passes the [batch, tk] chunk one hop east
        comm += batch * tk * word + (gw - 1) * spec.hop_latency_cycles
    if gh > 1:  # column reduction: each core passes its running [batch, tn] sum one hop south
        comm += batch * tn * word + (gh - 1) * spec.hop_latency_cycles
    return {
        "compute": max(compute, sram),
        "comm": comm,
        "cycles": max(max(compute, sram), comm),  # spec.overlap: compute and communication overlap
        "weight_bytes": weight_bytes,
        "act_bytes": 4 * math.ceil((batch * k + batch * n) / cores),
        "flops": 2 * batch * k * n + alu_ops * batch * n,
    }


def test_report_matches_hand_computation(two_layer):
    x, params, exe = two_layer
    spec, report = MINI, exe.report
    assert spec.overlap
    hand = {
        "dense_0": _hand_dense(spec, K, H, (4, 4), B, alu_ops=2),  # bias add, relu
        "dense_1": _hand_dense(spec, H, N, (4, 1), B, alu_ops=1),  # bias add
    }
    for name, h in hand.items():
        plan, row, k = exe.plans[name], report.kernel(name), exe.schedule.kernel(name)
        assert plan.grid == (HAND[name][2], HAND[name][3])
        # the schedule's figures of the kernel
        assert k["compute"] == h["compute"]
        counts = dict(zip(exe.plan.features.keys, exe.schedule.kernels["counts"][exe.plan.features.index(name)]))
        assert float(cost.kernel_cycles(spec, counts, k["read_bytes"], k["write_bytes"])) == h["compute"]
        assert k["comm"] == h["comm"] == plan.traffic.cycles(spec)  # the closed form is the traffic's cost
        assert k["cycles"] == h["cycles"]
        # the report's row
        assert row.cycles_per_sample == k["cycles"] / B == h["cycles"] / B
        assert row.compute_cycles_per_sample == h["compute"] / B
        assert row.comm_cycles_per_sample == h["comm"] / B
        assert row.weight_bytes_per_core == h["weight_bytes"]
        assert row.act_bytes_per_core == h["act_bytes"]
        assert row.flops_per_sample == h["flops"] / B
        assert row.cores == plan.cores and row.rect == HAND[name]
    # dense_0: 128 FMACs + 8 ALU cycles on each of 16 cores; dense_1: 256 FMACs + 2 x 4 ALU ops on each of 4
    assert hand["dense_0"]["cycles"] == 136 and hand["dense_1"]["cycles"] == 260

    per_sample = {n: h["cycles"] / B for n, h in hand.items()}
    worst = max(per_sample, key=per_sample.get)
    assert report.bottleneck == worst == "dense_1"
    assert report.cycles_per_sample == per_sample[worst]
    assert report.samples_per_s == spec.clock_hz / per_sample[worst]
    # routes: host -> dense_0 enters at column 0 and runs to dense_0's west edge (column 3): 3 hops; dense_0 ->
    # dense_1 side by side: 1 hop; dense_1 -> host leaves from its east edge (column 7) to column 15: 8 hops
    assert exe.routes.hops == {("host", "dense_0"): 3, ("dense_0", "dense_1"): 1, ("dense_1", "host"): 8}
    latency = sum(per_sample.values()) + 8 * spec.hop_latency_cycles
    assert report.latency_cycles == latency == 107
    assert report.latency_s == latency / spec.clock_hz
    assert report.route_hops == 8
    assert report.active_cores == 16 + 4
    flops = sum(h["flops"] for h in hand.values()) / B
    assert report.compute_utilization == pytest.approx(flops / (20 * 2 * spec.simd_fmac_fp32 * per_sample[worst]))
    occ = exe.memory.occupancy()
    peak = max(h["weight_bytes"] + h["act_bytes"] for h in hand.values())
    assert report.peak_sram_bytes_per_core == occ.max() == peak
    # busiest link: the stream dense_0 -> dense_1 carries 32 words per sample over 4 lanes (8 on each east link
    # from dense_0's east edge); dense_0's reduction B x 8 words per batch on each of its south links (8 per sample)
    assert report.max_link_words_per_sample == H / 4 == B * (H // 4) / B

    # one call charges the pipeline: fill (latency) then one bottleneck interval per further sample
    state = exe.load(params)
    out, state = exe(state, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(TwoLayer().apply(params, x)), rtol=1e-5, atol=1e-6)
    assert float(state.clock) == latency + (B - 1) * per_sample[worst] == 302
    busy = np.asarray(state.busy)
    assert busy[0, 3] == hand["dense_0"]["compute"] and busy[0, 7] == hand["dense_1"]["compute"]
    assert busy.sum() == 16 * hand["dense_0"]["compute"] + 4 * hand["dense_1"]["compute"]


def test_report_table_and_json(two_layer):
    _, _, exe = two_layer
    report = exe.report
    text = str(report)
    lines = text.splitlines()
    assert lines[0].startswith("Compile report") and "mini-16x16" in lines[0] and "batch 4" in lines[0]
    row = next(line for line in lines if line.startswith("dense_1"))
    assert row.rstrip().endswith("<") and "4x1@(0,7)" in row  # the bottleneck is marked
    assert "dense_1 (65 cycles/sample)" in text
    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["kernels"][1]["rect"] == [0, 7, 4, 1]
    assert report.kernel("dense_0").cores == 16
    with pytest.raises(KeyError, match="dense_9"):
        report.kernel("dense_9")
