"""Compiled programs run on a mini wafer: every model of the zoo, both execution paths, counters, SRAM, gradients.

Each model is compiled once onto `SPEC` and run once per path (module-scoped caches); the tests then check the
outputs against native JAX, the two paths against each other, the link and busy counters against the placement
and routes, the weights held in SRAM against the params, and gradients through the emulated forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_zoo import MODELS

import compiler
import wafer

SPEC = wafer.WaferSpec.mini(16, 16)
PATHS = ("fast", "per_core")
NAMES = tuple(MODELS)
RTOL = 1e-5  # float32, summation order may differ (DESIGN.md "Numerics")


def assert_close(got, want, rtol=RTOL):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(got_leaves, want_leaves):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype
        scale = max(1.0, float(np.max(np.abs(w)))) if w.size else 1.0
        np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-6 * scale)


def native_params(case):
    """The params pytree the executable stores: the linen params, or an nnx module's state."""
    return nnx.split(case.fn)[1] if case.is_module else case.params


def load(exe, case):
    return exe.load() if case.is_module else exe.load(case.params)


@pytest.fixture(scope="module")
def compiled():
    """`compiled(name) -> (case, exe)`, compiled once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            case = MODELS[name]()
            cache[name] = (case, compiler.compile(*case.trace_args(), spec=SPEC))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def ran(compiled):
    """`ran(name, path) -> (case, exe, out, state)`: one jitted call on a freshly loaded wafer, cached."""
    cache = {}

    def get(name, path):
        if (name, path) not in cache:
            case, exe = compiled(name)
            out, state = exe(load(exe, case), *case.inputs, path=path)
            cache[name, path] = (case, exe, jax.block_until_ready(out), state)
        return cache[name, path]

    return get


# ---- outputs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", NAMES)
def test_output_equals_native(ran, name, path):
    case, _, out, _ = ran(name, path)
    assert_close(out, case.run())


@pytest.mark.parametrize("name", NAMES)
def test_paths_agree(ran, name):
    _, _, fast, s_fast = ran(name, "fast")
    _, _, per_core, s_core = ran(name, "per_core")
    assert_close(per_core, fast)
    np.testing.assert_array_equal(np.asarray(s_fast.links), np.asarray(s_core.links))
    np.testing.assert_array_equal(np.asarray(s_fast.busy), np.asarray(s_core.busy))
    assert float(s_fast.clock) == float(s_core.clock) > 0
    assert int(s_fast.steps) == int(s_core.steps) == 1


# ---- counters -----------------------------------------------------------------------------------------------


def _route_mask(exe, rows, cols):
    """Cores on any route lane, and cores that send on one (every lane core but its last)."""
    on, senders = np.zeros((rows, cols), bool), np.zeros((rows, cols), bool)
    for lanes in exe.routes.paths.values():
        for lane in lanes:
            for k, (r, c) in enumerate(lane):
                on[r, c] = True
                senders[r, c] |= k < len(lane) - 1
    return on, senders


def _rect_mask(rects, rows, cols):
    m = np.zeros((rows, cols), bool)
    for r in rects:
        m[r.row : r.row + r.height, r.col : r.col + r.width] = True
    return m


def _grid_rect(plan):
    return wafer.Rect(plan.rect.row, plan.rect.col, *plan.grid)


@pytest.mark.parametrize("name", NAMES)
def test_links_only_on_kernels_and_routes(ran, name):
    _, exe, _, state = ran(name, "per_core")
    links = np.asarray(state.links)
    assert links.shape == (4, SPEC.rows, SPEC.cols)
    np.testing.assert_array_equal(links, exe.record.link_words(SPEC.rows, SPEC.cols).astype(np.float32))
    sent = links.sum(axis=0) > 0
    on_route, senders = _route_mask(exe, SPEC.rows, SPEC.cols)
    in_kernel = _rect_mask(exe.placement.values(), SPEC.rows, SPEC.cols)
    stray = sent & ~(on_route | in_kernel)
    assert not stray.any(), f"link traffic outside kernels and routes at cores {np.argwhere(stray)[:5].tolist()}"
    # every route lane carries words: each of its cores but the last sends
    quiet = senders & ~sent
    assert not quiet.any(), f"route cores without traffic: {np.argwhere(quiet)[:5].tolist()}"


@pytest.mark.parametrize("name", NAMES)
def test_per_core_kernels_move_words_inside_their_rectangle(ran, name):
    """Every weight kernel runs per core (dense, DenseGeneral, conv, grouped conv, embedding lookup) and has
    traffic in its rectangle; its own multicast and reduction stay on its grid."""
    _, exe, _, state = ran(name, "per_core")
    links = np.asarray(state.links).sum(axis=0)
    n = 0
    for plan in exe.plans.values():
        kernel = exe.graph.kernel(plan.name)
        anchor, widx, pos, perm = compiler.plan.partition.anchor_operand(kernel, exe.traced)
        tiling = next((t for t in plan.params if t.index == widx), None)
        tilings = {t.index: t for t in plan.params}
        scan = compiler.plan.partition.scan_runs(kernel, exe.traced, tilings)
        if compiler.plan.partition.per_core_kind(anchor, tiling, pos, perm) is None and not scan:
            # the only weight kernels left off the per-core path: weights of one element
            assert tiling is None or tiling.layout != "matrix", plan.name
            continue
        if kernel.kind == "scan":  # a recurrent cell: every weight dot of its body runs per core
            assert {d.widx for d in scan} == {t.index for t in plan.params if t.layout == "matrix"}, plan.name
        n += 1
        r = plan.rect
        assert links[r.rows, r.cols].sum() > 0, f"{plan.name}: no link traffic inside {r}"
        own = plan.traffic.link_words(SPEC.rows, SPEC.cols).sum(axis=0)
        assert not own[~_rect_mask([_grid_rect(plan)], SPEC.rows, SPEC.cols)].any()
        if plan.grid != (1, 1):
            assert own.sum() > 0, f"{plan.name}: a {plan.grid} grid moves nothing"
    assert n > 0, f"{name}: no kernel runs per core"


@pytest.mark.parametrize("name", NAMES)
def test_busy_exactly_on_kernel_grids(ran, name):
    _, exe, _, state = ran(name, "fast")
    busy = np.asarray(state.busy)
    grids = _rect_mask([_grid_rect(p) for p in exe.plans.values()], SPEC.rows, SPEC.cols)
    np.testing.assert_array_equal(busy > 0, grids)
    for plan in exe.plans.values():
        g = _grid_rect(plan)
        np.testing.assert_allclose(busy[g.rows, g.cols], exe.schedule.kernel(plan.name)["compute"], rtol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "lenet", "decoder_lm"])
def test_charge_in_box_equals_wafer_charge(ran, name):
    """The executables charge only the bounding box of the cores a call uses; the counters are wafer.charge's."""
    _, exe, _, state = ran(name, "fast")  # counters already nonzero
    want = wafer.charge(state, SPEC, exe.record)
    got = jax.jit(compiler.run.program.charge, static_argnums=(1, 2))(state, SPEC, exe.record)
    for a, b in ((got.links, want.links), (got.busy, want.busy), (got.clock, want.clock), (got.steps, want.steps)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- SRAM ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_read_params_bit_exact(ran, name):
    case, exe, _, state = ran(name, "fast")
    want = native_params(case)
    for s in (load(exe, case), state):  # freshly loaded, and after a forward call
        got = exe.read_params(s)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            g, w = np.asarray(g), np.asarray(w)
            assert g.dtype == w.dtype and np.array_equal(g, w)


def test_fast_path_reads_weights_with_no_copy(compiled):
    """Weights are stored blocked (the leaf itself): reading them for the fast path is no computation at all, the
    per-core tiles being a view the per-core path takes."""
    from compiler.run.infer import read_leaves

    case, exe = compiled("mlp")
    state = load(exe, case)
    jaxpr = jax.make_jaxpr(lambda s: read_leaves(exe.plan, s))(state).jaxpr
    assert not jaxpr.eqns
    assert any(t.tile != t.shape for p in exe.plans.values() for t in p.params)  # they are tiled over cores


def test_zoo_has_uneven_tiles(compiled):
    """The zoo's widths 10 and 13 do not divide the tile grids: padding is exercised."""
    _, exe = compiled("mlp")
    uneven = [
        t.path
        for p in exe.plans.values()
        for t in p.params
        if t.layout == "matrix" and any(d % g for d, g in zip(t.shape[-2:], t.grid))
    ]
    assert uneven


@pytest.mark.parametrize("name", ["mlp", "lenet", "nnx_mlp"])
def test_sram_image_holds_the_tiles(ran, name):
    _, exe, _, state = ran(name, "fast")
    image = np.asarray(state.sram_image())
    words = int(state.memory.high_water().max())
    assert image.shape == (SPEC.rows, SPEC.cols, words)
    covered = np.zeros(image.shape, bool)
    for a in state.memory.allocations:
        block = image[a.rect.rows, a.rect.cols, a.offset : a.end]
        covered[a.rect.rows, a.rect.cols, a.offset : a.end] = True
        if a.name in state.sram:
            data = np.asarray(state.read(a.name)).reshape(a.rect.height, a.rect.width, -1)  # per-core view
            np.testing.assert_array_equal(block[..., : data.shape[-1]].view(np.uint32), data.view(np.uint32))
        else:  # reserved buffers (activations) read as zeros
            assert not block.any()
    assert not image[~covered].any()


@pytest.mark.parametrize("name", NAMES)
def test_occupancy_within_capacity(ran, name):
    _, exe, _, state = ran(name, "fast")
    occ = state.occupancy()
    np.testing.assert_array_equal(occ, exe.memory.occupancy())
    assert occ.max() <= SPEC.sram_bytes_per_core
    assert occ.max() == exe.report.peak_sram_bytes_per_core
    for plan in exe.plans.values():
        g = _grid_rect(plan)
        # the kernel's corner core holds a tile of every weight and its activation buffer
        assert occ[g.row, g.col] == occ[g.rows, g.cols].max() == plan.sram_bytes
    # nothing outside the kernels' rectangles
    assert not occ[~_rect_mask(exe.placement.values(), SPEC.rows, SPEC.cols)].any()


# ---- differentiability and tracing --------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_input_gradient_equals_native(compiled, name, path):
    case, exe = compiled(name)
    state = load(exe, case)
    loss = lambda y: jnp.sum(jnp.sin(y) * y)
    x = case.inputs[0]
    step = exe.apply if path == "fast" else exe.per_core  # (state, *inputs) -> (state, out)
    got = jax.jit(jax.grad(lambda x: loss(step(state, x)[1])))(x)
    want = jax.grad(lambda x: loss(case.fn(case.params, x)))(x)
    assert float(jnp.max(jnp.abs(want))) > 0
    assert_close(got, want)


def test_forward_does_not_retrace(compiled):
    """A second call with the returned (donated) state and new inputs of the same shape reuses the trace."""
    case, _ = compiled("mlp")
    traces = []

    def fn(params, x):
        traces.append(1)
        return case.fn(params, x)

    exe = compiler.compile(fn, case.params, *case.inputs, spec=SPEC)
    x = case.inputs[0]
    state = exe.load(case.params)
    n0 = len(traces)
    out, state = exe(state, x)
    assert len(traces) == n0 + 1
    out2, state = exe(state, x + 1.0)
    out3, state = exe(state, x)
    assert len(traces) == n0 + 1, "the fast path retraced"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out3))
    assert int(state.steps) == 3


def test_per_core_does_not_retrace(compiled, monkeypatch):
    import compiler.run.percore as percore

    case, exe = compiled("lenet")
    calls = []
    run = percore.run_per_core
    monkeypatch.setattr(percore, "run_per_core", lambda *a: calls.append(1) or run(*a))
    exe = compiler.compile(*case.trace_args(), spec=SPEC)  # a fresh jit cache
    state = exe.load(case.params)
    for k in range(3):
        _, state = exe(state, case.inputs[0] * (k + 1), path="per_core")
    assert len(calls) == 1, "the per-core path retraced"
    assert int(state.steps) == 3
