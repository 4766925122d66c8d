"""Pictures (compiler/plots.py) and Chrome/Perfetto traces (compiler/trace_export.py) of compiled programs: a mini
MLP, the same MLP on the full WSE-2 grid, and training programs (pipelined and weight streaming)."""

from __future__ import annotations

import json

import numpy as np
import optax
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

import compiler
import wafer
from compiler import examples, plots
from compiler.views.trace_export import chrome_trace

MINI = wafer.WaferSpec.mini(16, 16)


@pytest.fixture(scope="module")
def mini():
    """(program dict, exe, state after one call) of the example MLP on a 16 x 16 wafer."""
    prog = examples.mlp(batch=4, d_in=16, hidden=(24, 12), d_out=8)
    exe = compiler.compile(prog["fn"], prog["params"], *prog["inputs"], spec=MINI)
    _, state = exe(exe.load(prog["params"]), *prog["inputs"])
    return prog, exe, state


@pytest.fixture(scope="module")
def trainers():
    """{"pipelined": Trainer, "weight_streaming": Trainer} of the digits example's MLP on a 16 x 16 wafer."""
    prog = examples.digits(batch_size=8, hidden=(16,))
    args = (prog["loss_fn"], prog["params"], prog["batch"], optax.sgd(0.1))
    return {mode: compiler.compile_train(*args, spec=MINI, mode=mode) for mode in ("pipelined", "weight_streaming")}


def _png_size(path):
    """(width, height) in pixels of a PNG file."""
    image = imread(path)
    return image.shape[1], image.shape[0]


def _check_png(fig, path):
    assert isinstance(fig, Figure)
    assert path.stat().st_size > 5_000
    assert _png_size(path) == (round(fig.get_figwidth() * fig.dpi), round(fig.get_figheight() * fig.dpi))


# ---- pictures ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "draw",
    [
        pytest.param(lambda exe, state, path: plots.placement_map(exe, path=path), id="placement"),
        pytest.param(lambda exe, state, path: plots.placement_map(exe, routes=False, path=path), id="no-routes"),
        pytest.param(lambda exe, state, path: plots.sram_map(state, MINI, path=path), id="sram-bytes"),
        pytest.param(lambda exe, state, path: plots.sram_map(exe.memory, unit="percent", path=path), id="sram-pct"),
        pytest.param(lambda exe, state, path: plots.link_map(state, path=path), id="links-4"),
        pytest.param(lambda exe, state, path: plots.link_map(exe, "sum", path=path), id="links-sum"),
        pytest.param(lambda exe, state, path: plots.link_map(state, "E", path=path), id="links-E"),
        pytest.param(lambda exe, state, path: plots.kernel_cycles(exe.report, path=path), id="cycles"),
    ],
)
def test_pictures_are_pngs_of_the_figure_size(mini, tmp_path, draw):
    _, exe, state = mini
    path = tmp_path / "sub" / "picture.png"
    _check_png(draw(exe, state, path), path)


def test_drawing_into_a_given_axes_returns_its_figure(mini):
    _, exe, state = mini
    fig = Figure()
    axes = fig.subplots(2, 2).flat
    assert plots.placement_map(exe, ax=axes[0]) is fig
    assert not axes[0].child_axes  # no zoom needed: the kernels fill the mini wafer
    assert plots.sram_map(state, ax=axes[1]) is fig
    assert plots.link_map(state, ax=axes[2]) is fig  # with an ax: the sum of the four directions
    assert plots.kernel_cycles(exe, ax=axes[3]) is fig
    assert axes[0].get_title().startswith(f"{MINI.name}: 3 kernels")
    labels = {t.get_text() for t in axes[0].texts}
    assert set(exe.placement) <= labels


def test_save_all_writes_the_four_pictures(mini, tmp_path):
    _, exe, state = mini
    paths = plots.save_all(exe, state, tmp_path / "out")
    assert sorted(paths) == sorted(plots.FILES)
    for p in paths.values():
        assert _png_size(p)[0] > 300


def test_full_wse2_grid_pictures(tmp_path):
    prog = examples.mlp(batch=4, d_in=16, hidden=(24,), d_out=8)
    exe = compiler.compile(prog["fn"], prog["params"], *prog["inputs"], spec=wafer.WSE2)
    _, state = exe(exe.load(prog["params"]), *prog["inputs"])
    paths = plots.save_all(exe, state, tmp_path)
    for p in paths.values():
        w, h = _png_size(p)
        assert 500 < w <= 2000 and 300 < h <= 1500, (p, w, h)
    # a small model on the full wafer gets an inset magnifying its cores; on a mini wafer it fills the picture
    assert len(plots.placement_map(exe).axes[0].child_axes) == 1
    assert not plots.placement_map(exe, zoom=False).axes[0].child_axes


def test_training_pictures(trainers, tmp_path):
    for mode, tx in trainers.items():
        paths = plots.save_all(tx, tx.init(), tmp_path / mode)
        assert all(_png_size(p)[0] > 300 for p in paths.values())
    # one rectangle (the whole wafer) lists the layers that stream through it in turn
    fig = plots.placement_map(trainers["weight_streaming"])
    assert any("one at a time" in t.get_text() for t in fig.axes[0].texts)


def test_kernel_cycles_from_a_loaded_report_json(mini):
    _, exe, _ = mini
    d = json.loads(json.dumps(exe.report.to_dict()))
    fig = plots.kernel_cycles(d)
    bars = [p for p in fig.axes[0].patches]
    assert len(bars) == len(d["kernels"])
    red = [b for b in bars if b.get_facecolor()[:3] == pytest.approx((0.839, 0.153, 0.157), abs=1e-2)]
    assert len(red) == 1  # the bottleneck
    worst = max(d["kernels"], key=lambda k: k["cycles_per_sample"])
    assert red[0].get_height() == pytest.approx(worst["cycles_per_sample"])


@pytest.mark.parametrize(
    "call, error",
    [
        pytest.param(lambda exe, state: plots.link_map(state, "up"), ValueError, id="direction"),
        pytest.param(lambda exe, state: plots.sram_map(np.ones((4, 4)), unit="percent"), ValueError, id="capacity"),
        pytest.param(lambda exe, state: plots.sram_map(state, unit="kB"), ValueError, id="unit"),
        pytest.param(lambda exe, state: plots.placement_map(state), TypeError, id="not-a-program"),
        pytest.param(lambda exe, state: plots.link_map(np.ones((3, 4, 4))), TypeError, id="link-shape"),
        pytest.param(lambda exe, state: plots.kernel_cycles({"kernels": []}), ValueError, id="empty-report"),
    ],
)
def test_bad_arguments(mini, call, error):
    _, exe, state = mini
    with pytest.raises(error):
        call(exe, state)


def test_downsample_max_pools_large_maps():
    a = np.zeros((2100, 900))
    a[2099, 5] = 7.0
    small = plots.downsample(a, 1000)
    assert small.shape == (700, 300)  # factor 3
    assert small.max() == 7.0 and small[699, 1] == 7.0
    same = np.arange(12.0).reshape(3, 4)
    assert plots.downsample(same) is same


# ---- traces --------------------------------------------------------------------------------------------------------


def _spans(trace):
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


def _check_nesting(trace):
    """Every track's spans nest properly (Perfetto draws them as a stack) and have the fields a trace needs."""
    eps = 1e-6
    by_tid = {}
    for e in _spans(trace):
        assert {"name", "ph", "ts", "dur", "pid", "tid"} <= set(e)
        assert e["dur"] > 0 and e["ts"] >= 0
        by_tid.setdefault(e["tid"], []).append(e)
    for spans in by_tid.values():
        stack = []
        for e in sorted(spans, key=lambda e: (e["ts"], -e["dur"])):
            while stack and e["ts"] >= stack[-1]["ts"] + stack[-1]["dur"] - eps:
                stack.pop()
            if stack:
                assert e["ts"] + e["dur"] <= stack[-1]["ts"] + stack[-1]["dur"] + eps, (e, stack[-1])
            stack.append(e)


def test_inference_trace_follows_the_pipeline(mini, tmp_path):
    _, exe, _ = mini
    path = tmp_path / "trace.json"
    chrome_trace(exe, path, steps=2)
    trace = json.loads(path.read_text())
    _check_nesting(trace)
    spec, rec = exe.spec, exe.record
    us = lambda cycles: float(cycles) / spec.clock_hz * 1e6
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    tids = {name: tid for tid, name in names.items()}
    assert list(exe.placement) == [n for n in names.values() if n in exe.placement]
    steps = [e for e in _spans(trace) if e["cat"] == "step"]
    assert [e["name"] for e in steps] == ["step 0", "step 1"]
    assert steps[0]["dur"] == pytest.approx(us(rec.cycles(spec)))
    assert steps[1]["ts"] == pytest.approx(steps[0]["ts"] + steps[0]["dur"])
    first = []
    for name in exe.placement:
        samples = [e for e in _spans(trace) if e["tid"] == tids[name] and e["cat"] == "sample"]
        assert len(samples) == 2 * exe.plan.batch
        first.append(samples[0])
        parts = {e["cat"] for e in _spans(trace) if e["tid"] == tids[name]}
        assert {"compute", "sample"} <= parts
    # kernel i starts on sample 0 when kernel i - 1 is done with it
    for a, b in zip(first, first[1:]):
        assert b["ts"] == pytest.approx(a["ts"] + a["dur"])
    end = max(e["ts"] + e["dur"] for e in _spans(trace) if e["ts"] < steps[0]["dur"] and e["cat"] == "sample")
    assert end == pytest.approx(steps[0]["dur"])


def test_training_traces(trainers):
    tx = trainers["pipelined"]
    trace = chrome_trace(tx)
    _check_nesting(trace)
    spans = _spans(trace)
    cats = {e["cat"] for e in spans}
    assert {"forward", "backward", "update", "io", "step"} <= cats
    last_sample = max(e["ts"] + e["dur"] for e in spans if e["cat"] == "sample")
    assert all(e["ts"] >= last_sample - 1e-9 for e in spans if e["cat"] == "update")
    step = next(e for e in spans if e["cat"] == "step")
    assert step["args"]["cycles"] == pytest.approx(float(tx.record.cycles(tx.spec)))

    tx = trainers["weight_streaming"]
    trace = chrome_trace(tx)
    _check_nesting(trace)
    spans = _spans(trace)
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    order = [
        (e["cat"], names[e["tid"]]) for e in sorted(spans, key=lambda e: e["ts"]) if e["cat"] in ("forward", "backward")
    ]
    kernels = list(tx.placement)
    assert order == [("forward", k) for k in kernels] + [("backward", k) for k in reversed(kernels)]


def test_trace_rejects_bad_arguments(mini):
    _, exe, _ = mini
    with pytest.raises(TypeError):
        chrome_trace(object())
    with pytest.raises(ValueError):
        chrome_trace(exe, steps=0)
