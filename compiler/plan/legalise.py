"""Legalisation: from target sizes to a valid placement, for the placement searches (compiler/analysis/search.py),
with the compiler's own apportioning and band layout (compiler/plan/bands.py) and one tile-grid snap.

  legalise              a target (areas [n], or a `BandedPlan` within a band structure) to a valid placement:
                        areas by `compiler.place`'s floorplan, a BandedPlan by apportioning its band heights and
                        widths; optionally tile-grid snapped.

Tile-grid snapping (`snap=True`): a weight kernel (dense, conv) speeds up only at whole numbers of rows of data per
copy of its tile grid, ceil(m / groups), groups by the partition rule's `grid_copies` for its a x b grid: a step
function, not monotone in the rectangle's height (a conv with m = 32 has 30 groups at rr = 6 but 32 at rr = 4 or
8), that rounding a continuous target to the nearest rectangle rarely lands on. So after rounding, each weight
kernel whose full grid fits its band is reshaped, within the cores its rounded rectangle has and the band's height,
to the smallest rectangle of whole grid copies (rr * a) x (rc * b) that needs fewer rows of data per copy, or as many
with fewer cores (narrowest first; such a kernel may then read slightly more activation bytes per core), taking its
width from the band's other kernels (snaps that only save cores are dropped first when the widths do not fit).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from compiler.plan.bands import apportion, lay_bands
from compiler.plan.partition import grid_copies
from compiler.plan.place import PlacementParams, place, validate_placement
from wafer.memory import Rect

# ---- the legaliser ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Floor:
    """What legalisation needs to know of a program on a wafer.

    Attributes:
      demands: one `KernelDemand` per kernel, in pipeline order.
      spec: the wafer.
      region: the usable rectangle of the grid (host-I/O columns reserved or not).
      reserve_io_columns: whether placements must leave the host-I/O columns free.
      grids: for tile-grid snapping, (weight [n] bool, a [n], b [n], m [n]): which kernels run on a weight's tile
        grid, its full sides a x b and the rows of data m split over its copies (compiler/plan/features.py).
    """

    demands: tuple
    spec: object
    region: Rect
    reserve_io_columns: bool = True
    grids: tuple | None = None

    @property
    def n(self) -> int:
        return len(self.demands)

    @property
    def names(self) -> tuple:
        return tuple(d.name for d in self.demands)

    @property
    def usable(self) -> int:
        return self.region.cores

    @functools.cached_property
    def least(self) -> np.ndarray:
        return np.array([d.least_cores for d in self.demands], np.float64)


@dataclasses.dataclass(frozen=True)
class Bands:
    """A band structure: the kernels (indices, pipeline order) of each horizontal band, top to bottom."""

    groups: tuple

    def band_ids(self, n: int) -> np.ndarray:
        out = np.zeros(n, np.int32)
        for b, g in enumerate(self.groups):
            out[list(g)] = b
        return out


def bands_of(rects) -> Bands:
    """The bands of a banded floorplan (rectangles in pipeline order): a new band starts where a rectangle's rows
    do not overlap the rows of the band so far."""
    groups, lo, hi = [], 0, 0
    for k, r in enumerate(rects):
        if groups and r.row < hi and r.row + r.height > lo:
            groups[-1].append(k)
            lo, hi = min(lo, r.row), max(hi, r.row + r.height)
        else:
            groups.append([k])
            lo, hi = r.row, r.row + r.height
    return Bands(tuple(tuple(g) for g in groups))


@dataclasses.dataclass(frozen=True)
class BandedPlan:
    """A continuous placement within a band structure: each band's height, each kernel's width and the fraction
    of its band's height it fills (a kernel lower than its band leaves cores idle under it). Rounding it is
    `legalise_banded`; `banded_plan` reads it back from a legal placement.

    Attributes:
      bands: the structure.
      band_heights: [bands] rows.
      widths: [n] columns.
      fill: [n] in (0, 1].
    """

    bands: Bands
    band_heights: np.ndarray
    widths: np.ndarray
    fill: np.ndarray

    @property
    def areas(self) -> np.ndarray:
        h = self.band_heights[self.bands.band_ids(len(self.widths))] * self.fill
        return h * self.widths


def banded_plan(floor: Floor, rects, bands: Bands) -> BandedPlan:
    """The BandedPlan of a banded placement."""
    rs = [rects[n] for n in floor.names]
    H = np.array([max(rs[k].row + rs[k].height for k in g) - min(rs[k].row for k in g) for g in bands.groups])
    ids = bands.band_ids(floor.n)
    widths = np.array([r.width for r in rs], np.float64)
    fill = np.array([r.height for r in rs], np.float64) / H[ids]
    return BandedPlan(bands, H.astype(np.float64), widths, np.clip(fill, 1e-3, 1.0))


def tile_shape(floor: Floor, k: int, h: int, w: int, H: int, W: int):
    """The smallest rectangle, of at most h * w cores, at most H high and W wide, made of whole copies of kernel
    k's full tile grid (a x b) in as many row groups as the partitioner can use, that needs the fewest rows of
    data per group (the exact model's ceil(m / groups)); None when it needs more rows per group than (h, w) does,
    or the grid does not fit."""
    weight, a_, b_, m_ = floor.grids
    if not weight[k]:
        return None
    a, b, m = int(a_[k]), int(b_[k]), int(m_[k])
    if a > H or b > W:
        return None
    rr, rc = (int(v) for v in grid_copies(min(h, a), min(w, b), m, h, w))
    now = (math.ceil(m / (rr * rc)), h * w, w)
    best = None
    least, d = floor.least[k], floor.demands[k]
    for rr in range(1, min(H // a, m) + 1):
        for rc in range(1, min(W // b, m // rr) + 1):
            area = rr * a * rc * b
            if area > h * w or area < least or rr * a < d.min_height or rc * b < d.min_width:
                continue
            key = (math.ceil(m / (rr * rc)), area, rc * b)
            if key < now and (best is None or key < best[0]):
                best = (key, rr * a, rc * b)
    return None if best is None else (*best[1:], best[0][0] < now[0])


def used_width(floor: Floor, k: int, h: int, w: int) -> int:
    """The columns a weight kernel's copies of its tile grid use in an h x w rectangle (0 for other kernels)."""
    weight, a, b, m = floor.grids
    if not weight[k]:
        return 0
    gw = min(w, int(b[k]))
    return int(grid_copies(min(h, int(a[k])), gw, int(m[k]), h, w)[1]) * gw


def legalise_banded(floor: Floor, plan: BandedPlan, snap: bool = False) -> dict | None:
    """Round a BandedPlan to a valid placement: band heights apportioned (largest remainder) to the usable rows,
    kernels' heights to their fill of their band, widths within each band apportioned to the usable width with
    lower bounds from the minimum sizes; bands serpentine; with `snap`, weight kernels snapped to whole copies of
    their tile grid (module docstring). None when the minimum sizes do not fit."""
    R, W = floor.region.height, floor.region.width
    least = floor.least
    min_h = np.array([d.min_height for d in floor.demands], np.float64)
    min_w = np.array([d.min_width for d in floor.demands], np.float64)
    groups = [list(g) for g in plan.bands.groups]
    lb = np.array([min_h[g].max() for g in groups])
    if lb.sum() > R:
        return None
    heights = apportion(R, np.maximum(plan.band_heights, 1e-9), lb, np.full(len(groups), float(R)))
    laid = []
    for g, H in zip(groups, heights):
        h = np.clip(np.round(plan.fill[g] * H), np.maximum(min_h[g], 1), H)
        lo = np.maximum(min_w[g], np.ceil(least[g] / h))
        if lo.sum() > W:
            return None
        # No upper bound from max_cores: a rectangle larger than the cores a kernel can use may still be the shape
        # that lets it use them all (a conv's tile grid copies need whole multiples of the grid's sides).
        widths = apportion(W, np.maximum(plan.widths[g], 1e-9), lo, np.full(len(g), float(W)))
        if snap:
            # tile-grid snapping: each weight kernel reshaped, within its cores, to whole copies of its tile grid
            # when that needs fewer rows of data per copy (`_tile_shape`); the band's other kernels share the rest
            shapes = [tile_shape(floor, k, int(h[j]), int(widths[j]), int(H), W) for j, k in enumerate(g)]
            # when the snapped widths do not fit, drop first the snaps that only save cores, then the narrowest
            order = sorted(
                (j for j, sh in enumerate(shapes) if sh is not None), key=lambda j: (shapes[j][2], shapes[j][1])
            )
            while True:
                h2, hi2 = h.copy(), np.full(len(g), float(W))
                # an unsnapped weight kernel keeps the columns its grid copies use
                lo2 = np.maximum(lo, [used_width(floor, k, int(h[j]), int(widths[j])) for j, k in enumerate(g)])
                for j in order:
                    h2[j], lo2[j], hi2[j] = shapes[j][0], shapes[j][1], shapes[j][1]
                if lo2.sum() <= W or not order:
                    break
                order = order[1:]
            free = hi2 > lo2
            if order and lo2.sum() <= W and (free.any() or lo2.sum() == W):
                if free.any():
                    widths = apportion(W, np.maximum(plan.widths[g], 1e-9), lo2, hi2)
                else:
                    widths = lo2.astype(np.int64)
                h = h2
        laid.append(([floor.demands[k].name for k in g], int(H), widths, h))
    return lay_bands(laid, floor.region)


def legalise(floor: Floor, target, snap: bool = False) -> tuple[dict, Bands]:
    """A valid placement for a target: an array of areas [n] (cores per kernel), legalised by `compiler.place`, or a
    `BandedPlan`, rounded within its structure (by `compiler.place` on its areas when its minimum sizes do not fit);
    with `snap`, tile-grid snapped (module docstring; an areas target is snapped within compiler.place's bands).

    Returns:
      ({kernel name: Rect}, Bands), validated by `compiler.validate_placement`.
    Raises:
      PlacementError: the kernels' minimum sizes do not fit.
    """
    if isinstance(target, BandedPlan):
        rects = legalise_banded(floor, target, snap)
        if rects is not None:
            validate_placement(rects, floor.demands, floor.spec, reserve_io_columns=floor.reserve_io_columns)
            return rects, target.bands
        target = target.areas
    areas = np.maximum(np.asarray(target, np.float64), floor.least)
    ds = [dataclasses.replace(d, work=float(a)) for d, a in zip(floor.demands, areas)]
    fraction = float(np.clip(areas.sum() / floor.usable, 1e-6, 1.0))
    params = PlacementParams(
        area_rule="work", area_exponent=1.0, fraction=fraction, reserve_io_columns=floor.reserve_io_columns
    )
    rects = place(ds, floor.spec, params)
    bands = bands_of([rects[n] for n in floor.names])
    if snap:
        snapped = legalise_banded(floor, banded_plan(floor, rects, bands), snap=True)
        if snapped is not None:
            validate_placement(snapped, floor.demands, floor.spec, reserve_io_columns=floor.reserve_io_columns)
            return snapped, bands
    return rects, bands
