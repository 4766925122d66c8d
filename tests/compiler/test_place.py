"""Placement: the banded floorplan's invariants, every knob, errors, hand-given placements, bounds."""

import math
import time

import numpy as np
import pytest

import wafer
from compiler.plan.place import (
    KernelDemand,
    PlacementError,
    PlacementParams,
    balanced_bound,
    place,
    usable_region,
    validate_placement,
)
from wafer.memory import Rect

NO_IO = PlacementParams(reserve_io_columns=False)


def pipeline_cycles(demands, placement) -> dict[str, float]:
    """The balance oracle of these tests: each kernel's work over its cores (no more than its max_cores)."""
    out = {}
    for d in demands:
        if d.name not in placement:
            raise PlacementError(f"kernel {d.name!r} is not in the placement", d.name)
        cores = Rect(*placement[d.name]).cores
        out[d.name] = float(d.work) / (cores if d.max_cores is None else min(cores, d.max_cores))
    return out


def equal(n, work=1.0, **kw):
    return [KernelDemand(f"k{i}", work, **kw) for i in range(n)]


def mixed(n, seed=0):
    """Work spread over three orders of magnitude, as layer norms next to matmuls."""
    rng = np.random.default_rng(seed)
    return [KernelDemand(f"k{i}", float(w)) for i, w in enumerate(10 ** rng.uniform(0, 3, n))]


def gap(a: Rect, b: Rect) -> int:
    """Empty cores between two disjoint rectangles along the axis that separates them (0: touching)."""
    dx = max(b.col - (a.col + a.width), a.col - (b.col + b.width))
    dy = max(b.row - (a.row + a.height), a.row - (b.row + b.height))
    return max(dx, dy)


def touching(a: Rect, b: Rect) -> bool:
    """Share an edge of positive length."""
    cols = min(a.col + a.width, b.col + b.width) - max(a.col, b.col)
    rows = min(a.row + a.height, b.row + b.height) - max(a.row, b.row)
    return (gap(a, b) == 0) and (cols > 0 or rows > 0)


def check_invariants(demands, spec, params, p):
    """Disjoint, inside the usable grid, minimum sizes, total area within fraction."""
    assert list(p) == [d.name for d in demands]
    assert validate_placement(p, demands, spec, reserve_io_columns=params.reserve_io_columns) == p
    u = usable_region(spec, params)
    for d in demands:
        r = p[d.name]
        assert u.col <= r.col and r.col + r.width <= u.col + u.width and r.row + r.height <= u.row + u.height
        assert r.cores >= d.min_cores and r.height >= d.min_height and r.width >= d.min_width
    assert sum(r.cores for r in p.values()) <= int(params.fraction * u.cores + 1e-9)


CASES = {
    "mini4x4-3": (wafer.WaferSpec.mini(4, 4), 3, NO_IO),
    "mini8x13-4": (wafer.WaferSpec.mini(8, 13), 4, PlacementParams()),
    "mini32x48-10": (wafer.WaferSpec.mini(32, 48), 10, PlacementParams()),
    "wse2-1": (wafer.WSE2, 1, PlacementParams()),
    "wse2-3": (wafer.WSE2, 3, PlacementParams()),
    "wse2-10": (wafer.WSE2, 10, PlacementParams()),
    "wse2-100": (wafer.WSE2, 100, PlacementParams()),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_balanced_placement(case):
    spec, n, params = CASES[case]
    demands = equal(n)
    p = place(demands, spec, params)
    check_invariants(demands, spec, params, p)
    u = usable_region(spec, params)
    target = u.cores / n
    for r in p.values():
        assert abs(r.cores - target) <= max(0.2 * target, 3), (r, target)
        assert 0.25 <= r.height / r.width <= 4.0, r
    # Serpentine: consecutive kernels share an edge.
    rects = list(p.values())
    assert all(touching(a, b) for a, b in zip(rects, rects[1:]))
    if params.reserve_io_columns:  # the host-I/O columns stay free
        used = np.zeros(spec.cols, bool)
        for r in rects:
            used[r.cols] = True
        assert not used[: spec.memcpy_cols_west].any() and not used[spec.cols - spec.memcpy_cols_east :].any()


def test_one_kernel_takes_the_usable_grid():
    p = place([KernelDemand("all", 5.0)], wafer.WSE2)
    assert p == {"all": Rect(0, 3, 757, 991)}
    p = place([KernelDemand("all", 5.0)], wafer.WSE2, NO_IO)
    assert p == {"all": Rect(0, 0, 757, 996)}


@pytest.mark.parametrize("n", [10, 100], ids=["10", "100"])
def test_mixed_work_is_balanced(n):
    demands = mixed(n)
    p = place(demands, wafer.WSE2)
    check_invariants(demands, wafer.WSE2, PlacementParams(), p)
    work = np.array([d.work for d in demands])
    cores = np.array([r.cores for r in p.values()])
    target = work / work.sum() * cores.sum()
    big = target > 2000  # tiny kernels round to whole rows and columns
    # No kernel is short-changed (one next to a kernel capped by min_aspect may get more than its share).
    assert np.all(cores[big] / target[big] > 0.9)
    assert np.median(np.abs(cores[big] / target[big] - 1)) < 0.05
    # The pipeline runs within 15% of the every-core-busy bound.
    slowest = max(pipeline_cycles(demands, p).values())
    assert slowest * balanced_bound(demands, wafer.WSE2) < 1.15
    for r in p.values():  # aspect bounds hold up to one core of rounding
        assert 0.25 * (1 - 1 / r.width) <= r.height / r.width <= 4.0 * (1 + 1 / r.width), r
    # Consecutive kernels stay close: nearly all share an edge, none is far.
    rects = list(p.values())
    gaps = np.array([gap(a, b) for a, b in zip(rects, rects[1:])])
    assert np.mean([touching(a, b) for a, b in zip(rects, rects[1:])]) >= 0.9
    assert gaps.max() < 100


def test_deterministic():
    assert place(mixed(40), wafer.WSE2) == place(mixed(40), wafer.WSE2)


def test_hundred_kernels_fast():
    demands = mixed(100, seed=3)
    place(demands, wafer.WSE2)  # warm up NumPy
    t = time.perf_counter()
    place(demands, wafer.WSE2)
    place(equal(100), wafer.WSE2)
    assert (time.perf_counter() - t) / 2 < 0.5


# ---- knobs ------------------------------------------------------------------------------------------------


def test_order_rows_always_west_to_east():
    p = place(equal(30), wafer.WSE2, PlacementParams(order="rows"))
    rects = list(p.values())
    for a, b in zip(rects, rects[1:]):
        assert b.col > a.col or b.row >= a.row + a.height  # east in the band, or the next band starting west
    starts = [b for a, b in zip(rects, rects[1:]) if b.row > a.row]
    assert starts and all(r.col == 3 for r in starts)


def test_order_serpentine_alternates():
    p = place(equal(30), wafer.WSE2)
    rects = list(p.values())
    bands = sorted({r.row for r in rects})
    assert len(bands) >= 3
    for k, row in enumerate(bands):
        cols = [r.col for r in rects if r.row == row]
        assert cols == sorted(cols, reverse=k % 2 == 1)


def test_order_columns_transposes():
    spec, params = wafer.WSE2, PlacementParams(order="columns")
    demands = equal(30)
    p = place(demands, spec, params)
    check_invariants(demands, spec, params, p)
    rects = list(p.values())
    for a, b in zip(rects, rects[1:]):
        if b.col == a.col:  # same column band: same width, going south
            assert b.width == a.width and b.row == a.row + a.height
        else:  # next column band starts at the top
            assert b.col >= a.col + a.width and b.row == 0


@pytest.mark.parametrize("spacing", [1, 3], ids=["1", "3"])
def test_spacing(spacing):
    params = PlacementParams(spacing=spacing)
    demands = mixed(25)
    p = place(demands, wafer.WSE2, params)
    check_invariants(demands, wafer.WSE2, params, p)
    rects = list(p.values())
    assert min(gap(a, b) for i, a in enumerate(rects) for b in rects[i + 1 :]) >= spacing
    p0 = place(demands, wafer.WSE2)
    assert min(gap(a, b) for i, a in enumerate(p0.values()) for b in list(p0.values())[i + 1 :]) == 0


@pytest.mark.parametrize("fraction", [0.5, 0.2], ids=["half", "fifth"])
def test_fraction(fraction):
    params = PlacementParams(fraction=fraction)
    demands = equal(12)
    p = place(demands, wafer.WSE2, params)
    check_invariants(demands, wafer.WSE2, params, p)
    total = sum(r.cores for r in p.values())
    assert 0.9 * fraction * 757 * 991 <= total <= fraction * 757 * 991


def test_band_height():
    params = PlacementParams(band_height=50, min_aspect=0.0)
    demands = equal(40)
    p = place(demands, wafer.WSE2, params)
    check_invariants(demands, wafer.WSE2, params, p)
    assert {r.height for r in p.values()} == {50}
    assert {r.row % 50 for r in p.values()} == {0}
    auto = place(demands, wafer.WSE2)
    assert {r.height for r in auto.values()} != {50}


def test_area_rules():
    demands = [KernelDemand("a", 1.0, min_cores=1), KernelDemand("b", 4.0, min_cores=3), KernelDemand("c", 16.0)]
    spec = wafer.WSE2

    def ratio(x, y, **kw):
        # Aspect bounds off, so that the areas are the rule's alone.
        p = place(demands, spec, PlacementParams(min_aspect=0.0, max_aspect=float("inf"), **kw))
        return p[x].cores / p[y].cores

    assert ratio("c", "a") == pytest.approx(16, rel=0.02)
    assert ratio("c", "a", area_exponent=0.5) == pytest.approx(4, rel=0.02)
    assert ratio("c", "a", area_exponent=0.0) == pytest.approx(1, rel=0.02)
    assert ratio("c", "b", area_rule="equal") == pytest.approx(1, rel=0.02)
    assert ratio("b", "a", area_rule="sram") == pytest.approx(3, rel=0.02)
    # With the default bounds the pipeline stays balanced: no kernel gets less than its share.
    p = place(demands, spec)
    assert max(pipeline_cycles(demands, p).values()) * balanced_bound(demands, spec) < 1.03


def test_reserve_io_columns():
    p = place(equal(6), wafer.WSE2, NO_IO)
    assert min(r.col for r in p.values()) == 0
    assert max(r.col + r.width for r in p.values()) == 996
    spec = wafer.WaferSpec.mini(8, 16, memcpy_cols_west=2, memcpy_cols_east=1)
    p = place(equal(3), spec)
    assert min(r.col for r in p.values()) == 2 and max(r.col + r.width for r in p.values()) == 15


def test_aspect_bounds():
    spec = wafer.WaferSpec.mini(4, 100)
    # A 4x100 strip is too flat for min_aspect=0.25: the rectangle is cut to 4x16 rather than break the bound.
    assert place([KernelDemand("a", 1.0)], spec, NO_IO)["a"] == Rect(0, 0, 4, 16)
    loose = PlacementParams(reserve_io_columns=False, min_aspect=0.0)
    assert place([KernelDemand("a", 1.0)], spec, loose)["a"] == Rect(0, 0, 4, 100)
    # A square bound makes square rectangles of an equal split.
    p = place(equal(4), wafer.WaferSpec.mini(64, 64), PlacementParams(reserve_io_columns=False, max_aspect=1.0))
    assert all(r.height == r.width == 32 for r in p.values())


def test_small_kernel_keeps_its_area_in_a_tall_band():
    # A kernel 1000x lighter than its neighbours sits lower than the band, near its target area, within bounds.
    demands = [KernelDemand("big1", 1000.0), KernelDemand("tiny", 1.0), KernelDemand("big2", 1000.0)]
    p = place(demands, wafer.WSE2)
    check_invariants(demands, wafer.WSE2, PlacementParams(), p)
    t = p["tiny"]
    assert t.height / t.width <= 4.2
    assert t.cores == pytest.approx(757 * 991 / 2001, rel=0.2)
    assert p["big1"].cores == pytest.approx(757 * 991 * 1000 / 2001, rel=0.05)


def test_min_and_max_cores():
    demands = [
        KernelDemand("wide", 1.0, min_cores=50_000),
        KernelDemand("capped", 1000.0, max_cores=1000),
        KernelDemand("tall", 1.0, min_height=300, min_width=2),
        KernelDemand("rest", 1000.0),
    ]
    p = place(demands, wafer.WSE2)
    check_invariants(demands, wafer.WSE2, PlacementParams(), p)
    assert p["capped"].cores <= 1000 and p["capped"].cores >= 900
    assert p["rest"].cores > 600_000


def test_tiny_grid_one_core_each():
    spec = wafer.WaferSpec.mini(4, 4)
    p = place(equal(16), spec, NO_IO)
    assert sorted((r.row, r.col) for r in p.values()) == [(r, c) for r in range(4) for c in range(4)]
    assert all(r.cores == 1 for r in p.values())


def test_empty():
    assert place([], wafer.WSE2) == {}


# ---- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("area_rule", "flops"),
        ("area_exponent", -1.0),
        ("min_aspect", 2.0),
        ("max_aspect", 0.5),
        ("order", "spiral"),
        ("spacing", -1),
        ("spacing", 1.5),
        ("fraction", 0.0),
        ("fraction", 1.5),
        ("band_height", 0),
        ("reserve_io_columns", "yes"),
    ],
    ids=lambda v: str(v),
)
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"PlacementParams.{field} must be"):
        PlacementParams(**{field: value})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="", work=1.0), "name"),
        (dict(name="a", work=-1.0), "work"),
        (dict(name="a", work=float("nan")), "work"),
        (dict(name="a", work=1.0, min_cores=0), "min_cores"),
        (dict(name="a", work=1.0, min_height=0), "min_height"),
        (dict(name="a", work=1.0, min_cores=4, max_cores=3), "max_cores"),
        (dict(name="a", work=1.0, min_height=2, min_width=2, max_cores=3), "max_cores"),
    ],
    ids=["name", "negative-work", "nan-work", "min-cores", "min-height", "max-below-min", "max-below-sides"],
)
def test_bad_demands(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KernelDemand(**kwargs)


def test_too_many_cores_names_the_kernel():
    demands = [KernelDemand("a", 1.0, min_cores=700_000), KernelDemand("b", 1.0, min_cores=70_000)]
    with pytest.raises(PlacementError, match="kernel 'b'.*70000 cores.*leaving 50187.*weight-streaming") as e:
        place(demands, wafer.WSE2)
    assert e.value.kernel == "b" and "b" in e.value.reason
    with pytest.raises(PlacementError, match="kernel 'k16'.*leaving 0"):
        place(equal(17), wafer.WaferSpec.mini(4, 4), NO_IO)
    # fraction limits the cores placement may take.
    with pytest.raises(PlacementError, match="kernel 'k1'.*fraction=0.1"):
        place(equal(2, min_cores=40_000), wafer.WSE2, PlacementParams(fraction=0.1))


def test_shapes_that_do_not_pack():
    # 3x3 and 2x2 minimum sides: 13 cores of 16, but no two such rectangles fit side by side on a 4x4 grid.
    demands = [KernelDemand("a", 1.0, min_height=3, min_width=3), KernelDemand("b", 1.0, min_height=2, min_width=2)]
    with pytest.raises(PlacementError, match="kernel 'b' does not fit") as e:
        place(demands, wafer.WaferSpec.mini(4, 4), NO_IO)
    assert e.value.kernel == "b"
    with pytest.raises(PlacementError, match="kernel 'a' needs a rectangle at least 5x1"):
        place([KernelDemand("a", 1.0, min_height=5)], wafer.WaferSpec.mini(4, 4), NO_IO)


def test_placement_errors_without_a_kernel():
    with pytest.raises(PlacementError, match="no usable columns.*reserve_io_columns=False") as e:
        place(equal(2), wafer.WaferSpec.mini(4, 4))
    assert e.value.kernel is None
    with pytest.raises(PlacementError, match="band_height=800 exceeds the 757"):
        place(equal(2), wafer.WSE2, PlacementParams(band_height=800))
    with pytest.raises(PlacementError, match="appears twice"):
        place([KernelDemand("a", 1.0), KernelDemand("a", 2.0)], wafer.WSE2)


# ---- hand-given placements ------------------------------------------------------------------------------


SPEC = wafer.WaferSpec.mini(8, 8)
DEMANDS = [KernelDemand("a", 1.0, min_cores=4), KernelDemand("b", 1.0, min_height=2)]


def test_validate_accepts_and_normalises():
    out = validate_placement({"b": (4, 0, 2, 8), "a": Rect(0, 0, 2, 2)}, DEMANDS, SPEC)
    assert out == {"a": Rect(0, 0, 2, 2), "b": Rect(4, 0, 2, 8)}
    assert list(out) == ["a", "b"] and all(isinstance(r, Rect) for r in out.values())


@pytest.mark.parametrize(
    "placement,match,kernel",
    [
        ({"a": (0, 0, 2, 2)}, r"kernels \['b'\] have no rectangle", "b"),
        ({"a": (0, 0, 2, 2), "b": (4, 0, 2, 2), "c": (6, 6, 1, 1)}, r"unknown kernels \['c'\]", "c"),
        ({"a": (0, 0, 2, 2), "b": (7, 0, 2, 2)}, r"'b'.*not inside the 8x8 grid", "b"),
        ({"a": (0, 0, 2, 2), "b": (0, -1, 2, 2)}, r"'b'.*not inside", "b"),
        ({"a": (0, 0, 2, 2), "b": (1, 1, 2, 2)}, r"'a' 2x2@\(0,0\) and 'b' 2x2@\(1,1\) overlap", "b"),
        ({"a": (0, 0, 1, 3), "b": (4, 0, 2, 2)}, r"'a'.*3 cores.*at least 4 cores", "a"),
        ({"a": (0, 0, 2, 2), "b": (4, 0, 1, 8)}, r"'b'.*height >= 2", "b"),
        ({"a": (0, 0, 2, 2), "b": (4, 0, 2)}, r"'b'.*4 ints", "b"),
        ({"a": (0, 0, 2, 2), "b": (4, 0, 0, 2)}, r"'b'.*height and width >= 1", "b"),
    ],
    ids=["missing", "unknown", "outside", "negative", "overlap", "too-few-cores", "too-low", "malformed", "empty"],
)
def test_validate_rejects(placement, match, kernel):
    with pytest.raises(PlacementError, match=match) as e:
        validate_placement(placement, DEMANDS, SPEC)
    assert e.value.kernel == kernel


def test_validate_io_columns():
    p = {"a": (0, 0, 2, 2), "b": (4, 3, 2, 2)}
    assert validate_placement(p, DEMANDS, wafer.WaferSpec.mini(8, 12))
    with pytest.raises(PlacementError, match="'a'.*host-I/O columns"):
        validate_placement(p, DEMANDS, wafer.WaferSpec.mini(8, 12), reserve_io_columns=True)


# ---- bounds -----------------------------------------------------------------------------------------------


def test_balanced_bound_and_pipeline_cycles():
    demands = [KernelDemand("a", 100.0), KernelDemand("b", 300.0, max_cores=10)]
    spec = wafer.WaferSpec.mini(10, 10)
    assert balanced_bound(demands, spec, NO_IO) == pytest.approx(min(100 / 400, 10 / 300))
    assert balanced_bound(demands[:1], spec, NO_IO) == pytest.approx(100 / 100)
    assert balanced_bound(demands[:1], spec, PlacementParams(reserve_io_columns=False, fraction=0.5)) == 0.5
    assert balanced_bound(demands[:1], spec) == pytest.approx(50 / 100)  # 5 I/O columns reserved
    assert balanced_bound([KernelDemand("z", 0.0)], spec) == float("inf")
    cyc = pipeline_cycles(demands, {"a": (0, 0, 5, 10), "b": Rect(5, 0, 5, 10)})
    assert cyc == {"a": 2.0, "b": 30.0}  # b's 50 cores count as its max_cores=10
    with pytest.raises(PlacementError, match="'b' is not in the placement"):
        pipeline_cycles(demands, {"a": (0, 0, 5, 10)})


def test_balanced_placement_reaches_the_bound():
    demands = [KernelDemand(f"k{i}", float(w)) for i, w in enumerate([1, 2, 3, 4, 5, 6])]
    p = place(demands, wafer.WSE2)
    slowest = max(pipeline_cycles(demands, p).values())
    assert 1.0 <= slowest * balanced_bound(demands, wafer.WSE2) < 1.02


def _band_candidates_one(f, i, *, shape):
    """The bands starting at kernel i alone, written plainly (the banded floorplan as it was before its starts
    were batched): the reference `place._band_candidates` must match bit for bit, or placements would change."""
    from compiler.plan import place as pl

    def min_heights(m, widths):
        least, mw = f.least[i : i + m], f.min_w[i : i + m]
        tri = np.tril(np.ones((m, m), bool))
        lb = np.maximum(np.maximum.accumulate(f.min_h[i : i + m]), np.ceil(np.cumsum(least) / np.maximum(widths, 1)))
        H = np.where(np.cumsum(mw) <= widths, lb, np.inf)
        todo = np.isfinite(H) & (H <= f.rows)
        H[~todo] = np.inf
        while todo.any():
            Hs = np.where(todo, H, 1.0)[:, None]
            used = np.where(tri, np.maximum(mw[None, :], np.ceil(least[None, :] / Hs)), 0).sum(axis=1)
            bad = todo & (used > widths)
            H[bad] += 1
            over = bad & (H > f.rows)
            H[over] = np.inf
            todo = bad & ~over
        return H

    n_k = len(f.area)
    m = min(n_k - i, pl._MAX_BAND, f.cols)
    n = np.arange(1, m + 1)
    widths = f.cols - f.spacing * (n - 1)
    ok = (widths >= n) & (np.cumsum(f.min_w[i : i + m]) <= widths)
    if not ok[0]:
        return None
    if not ok.all():
        m = int(np.argmin(ok))
    n, widths = n[:m], widths[:m]
    a = f.area[i : i + m]
    S = np.cumsum(a)
    if not shape:
        return i + n, np.zeros(m), S / widths, min_heights(m, widths)
    c = np.sqrt(a * f.max_aspect) if np.isfinite(f.max_aspect) else np.full(m, np.inf)
    D = np.cumsum(np.where(np.isfinite(c), a / c, 0.0))
    crowded = D > widths * (1 + 1e-9)
    crowded[0] = False
    if crowded.any():
        m = int(np.argmax(crowded))
        n, widths, a, S, c, D = n[:m], widths[:m], a[:m], S[:m], c[:m], D[:m]
    tri = np.tril(np.ones((m, m), bool))
    lo = S / widths
    hi = np.minimum(np.where(D < widths, S / np.maximum(widths - D, 1e-300), np.inf), np.maximum.accumulate(c))
    hi = np.maximum(hi, lo)
    for _ in range(30):
        mid = np.sqrt(lo * hi)
        fits = np.where(tri, a[None, :] / np.minimum(mid[:, None], c[None, :]), 0.0).sum(axis=1) <= widths
        hi, lo = np.where(fits, mid, hi), np.where(fits, lo, mid)
    h = hi if f.min_aspect <= 0 else np.maximum(hi, np.sqrt(np.maximum.accumulate(a) * f.min_aspect))
    cap = f.max_aspect if np.isfinite(f.max_aspect) else 16.0
    stop = (h**2 > (pl._HOPELESS**2) * cap * np.maximum.accumulate(a)) | (h > f.rows)
    stop[0] = False
    if stop.any():
        m = int(np.argmax(stop))
        n, widths, a, S, c, h, tri = n[:m], widths[:m], a[:m], S[:m], c[:m], h[:m], tri[:m, :m]
    hmin = min_heights(m, widths)
    x = 2 * np.log(h)[:, None] - np.log(a)[None, :]
    if np.isfinite(f.max_aspect):
        x = np.minimum(x, math.log(f.max_aspect))
    pen = x**2
    if f.min_aspect > 0:
        pen = pen + pl._ASPECT_PENALTY * np.maximum(0.0, math.log(f.min_aspect) - x) ** 2
    cost = np.where(tri, pen, 0.0).sum(axis=1) + pl._WASTE_WEIGHT * n_k * (h * widths - S) / f.area.sum()
    over = h > f.rows
    cost = cost + np.where(over, pl._HEIGHT_PENALTY * n * np.log(np.maximum(h, 1.0) / f.rows) ** 2, 0.0)
    low = np.isfinite(hmin) & (hmin > h)
    cost = cost + np.where(low, pl._HEIGHT_PENALTY * n * np.log(np.where(low, hmin, 1.0) / h) ** 2, 0.0)
    return i + n, np.where(np.isfinite(hmin), cost, np.inf), h, hmin


@pytest.mark.parametrize("seed", range(2), ids=lambda s: f"seed{s}")
def test_batched_band_candidates_match_one_start_at_a_time(seed):
    from compiler.plan import place as pl

    rng = np.random.default_rng(seed)
    for t in range(16):
        n = int(rng.integers(1, 70))
        rows, cols = int(rng.integers(4, 400)), int(rng.integers(4, 400))
        area = rng.lognormal(3 + 3 * rng.random(), 1.5, n) * rows * cols / (n * 400)
        f = pl._Frame(
            rows=rows,
            cols=cols,
            area=area,
            least=np.maximum(1, (area * rng.random(n) * 0.8).astype(np.int64)),
            min_h=rng.integers(1, 4, n),
            min_w=rng.integers(1, 4, n),
            max_cores=np.full(n, np.inf),
            spacing=int(rng.integers(0, 3)),
            min_aspect=(0.25, 0.0, 0.5, 1 / 16)[t % 4],
            max_aspect=(4.0, 2.0, np.inf, 16.0)[(t // 4) % 4],
            cap=rows * cols,
        )
        for shape in (True, False):
            got = pl._band_candidates(f, shape=shape)
            for i in range(n):
                want = _band_candidates_one(f, i, shape=shape)
                if want is None:
                    assert got[i] is None, (t, shape, i)
                    continue
                for g, w in zip(got[i], want):
                    np.testing.assert_array_equal(g, w, err_msg=f"frame {t}, shape={shape}, start {i}")
