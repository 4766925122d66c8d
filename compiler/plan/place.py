"""Placement: a rectangle of cores for every kernel, for layer-pipelined execution.

In layer-pipelined mode every kernel (a layer, or a fused group of ops) owns a rectangle of cores that holds its
weights in SRAM; activations stream from one rectangle to the next over the 2D mesh (../shared/DESIGN.md, "Place").
A pipeline runs at the pace of its slowest kernel, so a kernel's area should be proportional to its work: when
`work / cores` is the same for every kernel, no core waits. Placement decides those areas and the rectangles'
positions, from plain descriptors (`KernelDemand`), so it does not depend on how kernels were found.

The floorplan is made of *bands* (as in standard-cell row placement, and as the serpentine layouts of Cerebras's
layer-pipelined examples suggest): kernels, in pipeline order, are cut into consecutive groups; each group fills
one horizontal band of the usable grid; rectangles in a band share the band's height and their widths are
proportional to their target areas, so a band of height H gives kernel k a width of about `area_k / H`. With
`order="serpentine"` bands alternate west->east and east->west (boustrophedon), so the last kernel of one band
sits directly above the first of the next; `"rows"` lays every band west->east; `"columns"` is the same problem
transposed (bands of columns, each filled north->south).

Algorithm (deterministic, NumPy, about O(N * n_band^2) for N kernels and n_band kernels per band):
  1. Target areas: `weight_k` from `area_rule` (work ** area_exponent, 1, or min_cores), scaled so the areas sum
     to `fraction` x usable cores, each clipped to [min cores, max_cores] by water-filling (the areas a clipped
     kernel gives up or takes are shared by the others in proportion to their weights).
  2. Band partition: dynamic programming over the cut points. A band of kernels spanning the usable width W
     gets the least real height h at which every kernel has its target area within the aspect bounds: about
     sum(area) / W, so kernel k's aspect (height / width) is h^2 / area_k; a kernel that would be taller than
     max_aspect allows gets a rectangle lower than the band (at max_aspect, cores under it idle) and h is at
     least sqrt(area_k * min_aspect) so none is wider than allowed. The cost of a band is sum_k ln(aspect_k)^2
     (square is best) plus its idle cores as a fraction of all areas (throughput lost when the bands are
     squeezed onto the grid), plus heavy penalties for a band taller than the grid or too low to hold its
     kernels' minimum sizes. With `band_height` given: bands of that height, packed greedily in order, with the
     largest common area scale (<= 1) that fits them on the grid.
  3. Integer sizes: band heights apportioned (largest remainder, with lower bounds from minimum sizes) to the
     usable rows, all bands squeezed alike if they need more; widths within a band likewise. A rectangle lower
     than its band sits at the band's top, or at its bottom when it is the band's last (next to the next band's
     first). A kernel still too wide for `min_aspect` is cut to the widest allowed, its leftover width going to
     its band neighbours: aspect bounds hold wherever the grid and the minimum sizes allow (up to one core of
     rounding). Rounding overshoot beyond `fraction` is trimmed from the rectangles most over their targets.
  4. If the minimum sizes do not fit that banding, the most compact banding (least total height) is tried; if
     that does not fit either, `PlacementError` names the first kernel that does not fit.

Minimum sizes (min_cores, min_height, min_width) and a given `band_height` win over `fraction` and over aspect
bounds. Aspect bounds win over area: a lone kernel on a 4 x 100 strip gets 4 x 16 with min_aspect=0.25 (set
min_aspect=0, max_aspect=inf to turn the bounds off). `spacing`
leaves empty cores between neighbouring rectangles in a band and empty rows between bands. With
`reserve_io_columns`, the `spec.memcpy_cols_west` / `memcpy_cols_east` columns that Cerebras's memcpy framework
uses for host I/O are left free [SDK].
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np

from compiler.errors import PlacementError
from compiler.plan.bands import apportion, lay_bands, waterfill
from wafer.memory import Rect

AREA_RULES = ("work", "equal", "sram")
ORDERS = ("serpentine", "rows", "columns")

# DP cost weights: idle cores (per fraction of all target areas, per kernel: 1% idle costs as much as 0.2 of
# ln(aspect)^2 for every kernel, i.e. every kernel at aspect ~1.56 instead of 1); penalty multipliers for an
# aspect outside the bounds and for a band taller than the grid or lower than its kernels' minimum sizes.
_WASTE_WEIGHT = 20.0
_ASPECT_PENALTY = 10.0
_HEIGHT_PENALTY = 1000.0
# A band is not extended once it is this many times higher than the tallest shape any of its kernels may take.
_HOPELESS = 4.0
# Longest band the DP considers (kernels per band).
_MAX_BAND = 512


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class KernelDemand:
    """What placement needs to know of one kernel.

    Attributes:
      name: unique kernel name.
      work: cycles (or FLOPs) per sample if the kernel ran on one core; areas are balanced with it.
      min_cores: fewest cores whose SRAM holds the kernel (from the partitioner).
      max_cores: more cores than this give no speed-up (e.g. the number of weight tiles); None: unbounded.
      min_height, min_width: smallest rectangle sides the kernel's tiling accepts.
    """

    name: str
    work: float
    _: dataclasses.KW_ONLY
    min_cores: int = 1
    max_cores: int | None = None
    min_height: int = 1
    min_width: int = 1

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"KernelDemand.name must be a non-empty string, got {self.name!r}")
        where = f"KernelDemand {self.name!r}"
        if not _is_real(self.work) or not math.isfinite(self.work) or self.work < 0:
            raise ValueError(f"{where}: work must be a finite number >= 0 (cycles per sample), got {self.work!r}")
        for f in ("min_cores", "min_height", "min_width"):
            v = getattr(self, f)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{where}: {f} must be an int >= 1, got {v!r}")
        if self.max_cores is not None:
            need = max(self.min_cores, self.min_height * self.min_width)
            if not _is_int(self.max_cores) or self.max_cores < need:
                raise ValueError(
                    f"{where}: max_cores must be None or an int >= max(min_cores, min_height * min_width) = "
                    f"{need}, got {self.max_cores!r}"
                )

    @property
    def least_cores(self) -> int:
        """Fewest cores any rectangle of this kernel has: max(min_cores, min_height * min_width)."""
        return max(self.min_cores, self.min_height * self.min_width)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlacementParams:
    """Every placement knob a researcher sweeps.

    Attributes:
      area_rule: "work" (area proportional to work ** area_exponent: a balanced pipeline when the exponent is
        1), "equal" (same area for every kernel) or "sram" (area proportional to min_cores, scaled up).
      area_exponent: exponent of work under "work", in [0, 10].
      min_aspect, max_aspect: bounds of each rectangle's height / width; min_aspect in [0, 1], max_aspect in
        [1, inf] (0 and inf disable a bound).
      order: "serpentine" (bands alternate west->east and east->west: consecutive kernels adjacent), "rows"
        (every band west->east) or "columns" (bands of columns, each north->south, west to east).
      spacing: empty cores between neighbouring rectangles (and rows between bands), in [0, 1000].
      fraction: fraction of the usable cores to fill, in (0, 1].
      band_height: height of every band (width of every column band with order="columns"); None: chosen.
      reserve_io_columns: leave spec.memcpy_cols_west / memcpy_cols_east columns free for host I/O.
    """

    area_rule: str = "work"
    area_exponent: float = 1.0
    min_aspect: float = 0.25
    max_aspect: float = 4.0
    order: str = "serpentine"
    spacing: int = 0
    fraction: float = 1.0
    band_height: int | None = None
    reserve_io_columns: bool = True

    def __post_init__(self):
        if self.area_rule not in AREA_RULES:
            raise ValueError(f"PlacementParams.area_rule must be one of {AREA_RULES}, got {self.area_rule!r}")
        e = self.area_exponent
        if not _is_real(e) or not 0.0 <= e <= 10.0:
            raise ValueError(f"PlacementParams.area_exponent must be a number in [0, 10], got {e!r}")
        if not _is_real(self.min_aspect) or not 0.0 <= self.min_aspect <= 1.0:
            raise ValueError(
                f"PlacementParams.min_aspect must be a number in [0, 1] (height / width; 0 disables the bound), "
                f"got {self.min_aspect!r}"
            )
        if not _is_real(self.max_aspect) or math.isnan(self.max_aspect) or self.max_aspect < 1.0:
            raise ValueError(
                f"PlacementParams.max_aspect must be a number in [1, inf] (height / width; inf disables the "
                f"bound), got {self.max_aspect!r}"
            )
        if self.order not in ORDERS:
            raise ValueError(f"PlacementParams.order must be one of {ORDERS}, got {self.order!r}")
        if not _is_int(self.spacing) or not 0 <= self.spacing <= 1000:
            raise ValueError(f"PlacementParams.spacing must be an int in [0, 1000] (cores), got {self.spacing!r}")
        if not _is_real(self.fraction) or not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"PlacementParams.fraction must be a number in (0, 1], got {self.fraction!r}")
        if self.band_height is not None and (not _is_int(self.band_height) or self.band_height < 1):
            raise ValueError(f"PlacementParams.band_height must be None or an int >= 1, got {self.band_height!r}")
        if not isinstance(self.reserve_io_columns, bool):
            raise ValueError(
                f"PlacementParams.reserve_io_columns must be True or False, got {self.reserve_io_columns!r}"
            )


# ---- helpers shared by place / validate / bounds ------------------------------------------------------------


def _check_demands(demands) -> tuple[KernelDemand, ...]:
    demands = tuple(demands)
    seen = set()
    for d in demands:
        if not isinstance(d, KernelDemand):
            raise TypeError(f"demands must be KernelDemand instances, got {type(d).__name__}: {d!r}")
        if d.name in seen:
            raise PlacementError(f"kernel name {d.name!r} appears twice in the demands; names must be unique", d.name)
        seen.add(d.name)
    return demands


def usable_region(spec, params: PlacementParams = PlacementParams()) -> Rect:
    """The cores placement may use: the whole grid less the host-I/O columns when they are reserved."""
    west = spec.memcpy_cols_west if params.reserve_io_columns else 0
    east = spec.memcpy_cols_east if params.reserve_io_columns else 0
    cols = spec.cols - west - east
    if cols < 1:
        raise PlacementError(
            f"no usable columns: the {spec.rows}x{spec.cols} grid less {west} west and {east} east host-I/O "
            f"columns leaves {cols}; use PlacementParams(reserve_io_columns=False) or a wider spec"
        )
    return Rect(0, west, spec.rows, cols)


def _usable_cores(spec, params) -> int:
    u = usable_region(spec, params)
    return max(1, int(math.floor(params.fraction * u.cores + 1e-9)))


def balanced_bound(demands: Sequence[KernelDemand], spec, params: PlacementParams = PlacementParams()) -> float:
    """Upper bound on pipeline throughput, in samples per cycle: every usable core busy on an equal share.

    `floor(fraction * usable cores) / sum(work)`, and no more than `max_cores / work` of any kernel with
    `max_cores` (more cores give it no speed-up). Returns inf when there is no work.
    """
    demands = _check_demands(demands)
    total = float(sum(d.work for d in demands))
    bound = _usable_cores(spec, params) / total if total > 0 else math.inf
    for d in demands:
        if d.max_cores is not None and d.work > 0:
            bound = min(bound, d.max_cores / d.work)
    return bound


def validate_placement(
    placement: Mapping[str, Rect | tuple],
    demands: Sequence[KernelDemand],
    spec,
    *,
    reserve_io_columns: bool = False,
) -> dict[str, Rect]:
    """Check a hand-given placement and return it as `{name: Rect}` in demand order.

    Args:
      placement: kernel name -> `Rect` or 4-tuple `(row, col, height, width)`.
      demands: the kernels.
      spec: the wafer.
      reserve_io_columns: also require the host-I/O columns (spec.memcpy_cols_west/east) to be free.
    Raises:
      PlacementError: a kernel missing or unknown, a rectangle malformed or outside the grid, two rectangles
        overlapping, or a rectangle smaller than the kernel's min_cores / min_height / min_width.
    """
    demands = _check_demands(demands)
    names = [d.name for d in demands]
    missing = [n for n in names if n not in placement]
    if missing:
        raise PlacementError(f"kernels {missing} have no rectangle in the placement; place every kernel", missing[0])
    known = set(names)
    unknown = [n for n in placement if n not in known]
    if unknown:
        more = " ..." if len(names) > 20 else ""
        raise PlacementError(
            f"placement names unknown kernels {unknown}; the kernels are {names[:20]}{more}", unknown[0]
        )
    region = usable_region(spec, PlacementParams(reserve_io_columns=reserve_io_columns))
    rects: dict[str, Rect] = {}
    for d in demands:
        v = placement[d.name]
        try:
            vals = tuple(v)
        except TypeError:
            vals = ()
        if len(vals) != 4 or not all(_is_int(x) for x in vals):
            raise PlacementError(
                f"kernel {d.name!r}: rectangle must be a Rect or 4 ints (row, col, height, width), got {v!r}", d.name
            )
        r = Rect(*(int(x) for x in vals))
        if r.height < 1 or r.width < 1:
            raise PlacementError(f"kernel {d.name!r}: rectangle {r} must have height and width >= 1", d.name)
        if not r.inside(spec.rows, spec.cols):
            raise PlacementError(
                f"kernel {d.name!r}: rectangle {r} (rows {r.row}..{r.row + r.height - 1}, cols "
                f"{r.col}..{r.col + r.width - 1}) is not inside the {spec.rows}x{spec.cols} grid",
                d.name,
            )
        if r.col < region.col or r.col + r.width > region.col + region.width:
            raise PlacementError(
                f"kernel {d.name!r}: rectangle {r} uses host-I/O columns; with reserve_io_columns=True columns "
                f"{region.col}..{region.col + region.width - 1} are usable",
                d.name,
            )
        if r.cores < d.min_cores or r.height < d.min_height or r.width < d.min_width:
            raise PlacementError(
                f"kernel {d.name!r}: rectangle {r} has {r.cores} cores ({r.height}x{r.width}) but the kernel needs "
                f"at least {d.min_cores} cores, height >= {d.min_height} and width >= {d.min_width}",
                d.name,
            )
        rects[d.name] = r
    _check_overlaps(rects, spec.rows, spec.cols)
    return rects


def _check_overlaps(rects: Mapping[str, Rect], rows: int, cols: int) -> None:
    """Raise PlacementError naming both kernels if two rectangles overlap (paints an owner map)."""
    owner = np.full((rows, cols), -1, np.int32)
    names = list(rects)
    for i, n in enumerate(names):
        r = rects[n]
        view = owner[r.rows, r.cols]
        taken = view >= 0
        if taken.any():
            j = int(view[taken][0])
            other = names[j]
            raise PlacementError(
                f"rectangles of kernels {other!r} {rects[other]} and {n!r} {r} overlap; rectangles must be disjoint",
                n,
            )
        view[...] = i


# ---- target areas -------------------------------------------------------------------------------------------


def _target_areas(demands, cap: int, params: PlacementParams) -> np.ndarray:
    work = np.array([d.work for d in demands], np.float64)
    if params.area_rule == "work":
        weights = work**params.area_exponent
    elif params.area_rule == "equal":
        weights = np.ones_like(work)
    else:
        weights = np.array([d.min_cores for d in demands], np.float64)
    lo = np.array([d.least_cores for d in demands], np.float64)
    hi = np.array([np.inf if d.max_cores is None else d.max_cores for d in demands], np.float64)
    return waterfill(float(cap), weights, lo, hi)


# ---- the banded floorplan -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Frame:
    """The placement problem in band coordinates (transposed for order="columns")."""

    rows: int
    cols: int
    area: np.ndarray  # target areas (float)
    least: np.ndarray  # fewest cores (int)
    min_h: np.ndarray
    min_w: np.ndarray
    max_cores: np.ndarray  # float, inf when unbounded
    spacing: int
    min_aspect: float
    max_aspect: float
    cap: int  # cores placement may use: floor(fraction * usable cores)


def _ceil_div(a, b):
    return -(-a // b)


def _min_band_heights(f: _Frame, starts: np.ndarray, m: int, widths: np.ndarray) -> np.ndarray:
    """Least integer height [g, m] of each band i..i+n-1 (n = 1..m) that holds its kernels' minimum sizes, for
    each start i in `starts` (every band of the batch spans up to the same m kernels).

    Band n holds when sum_k max(min_w_k, ceil(least_k / H)) <= widths[n-1]; inf when no H <= rows does.
    """
    win = starts[:, None] + np.arange(m)[None, :]
    least = f.least[win]
    mw = f.min_w[win]
    tri = np.tril(np.ones((m, m), bool))
    need_h = np.maximum.accumulate(f.min_h[win], axis=1)
    lb = np.maximum(need_h, np.ceil(np.cumsum(least, axis=1) / np.maximum(widths, 1)))
    H = np.where(np.cumsum(mw, axis=1) <= widths, lb, np.inf)
    todo = np.isfinite(H) & (H <= f.rows)
    H[~todo] = np.inf
    while todo.any():
        Hs = np.where(todo, H, 1.0)[:, :, None]
        used = np.where(tri, np.maximum(mw[:, None, :], np.ceil(least[:, None, :] / Hs)), 0).sum(axis=2)
        bad = todo & (used > widths)
        H[bad] += 1
        over = bad & (H > f.rows)
        H[over] = np.inf
        todo = bad & ~over
    return H


def _groups(sizes: dict[int, int]):
    """{size: [keys]} of a {key: size} map: the batches of equally long bands, computed together."""
    out: dict[int, list[int]] = {}
    for k, s in sizes.items():
        out.setdefault(s, []).append(k)
    return out.items()


def _band_candidates(f: _Frame, *, shape: bool) -> list:
    """Bands starting at each kernel i: [(ends j, DP cost, real height, least integer height) for j = i+1, ...]
    (None where no band starts at i).

    A band spans the usable width. Its real height h is the least at which every kernel gets its target area
    within the aspect bounds: kernel k needs width area_k / min(h, c_k), where c_k = sqrt(area_k * max_aspect)
    is the tallest it may be (a kernel lower than the band leaves cores under it idle), and h >= sqrt(area_k *
    min_aspect) so that no kernel is wider than allowed. The cost (shape=True) is the kernels' ln(aspect)^2,
    plus the idle cores h * width - sum(area) as a fraction of all areas (weighted as throughput lost), plus
    penalties for bands taller than the grid or too low for their kernels' minimum sizes.
    With shape=False only the feasible ends and least heights are computed (for the compact fallback).

    The bands starting at different kernels are independent; those of equal length are computed together
    ([starts, ends, kernels] arrays), which gives each start exactly the figures it gets alone (the sums run
    over rows of the same length) in a fraction of the NumPy calls.
    """
    n_k = len(f.area)
    out: list = [None] * n_k
    lens: dict[int, int] = {}  # start -> kernels its bands may span (after the width and crowding limits)
    for i in range(n_k):
        m = min(n_k - i, _MAX_BAND, f.cols)
        n = np.arange(1, m + 1)
        widths = f.cols - f.spacing * (n - 1)
        ok = (widths >= n) & (np.cumsum(f.min_w[i : i + m]) <= widths)
        if not ok[0]:
            continue
        if not ok.all():  # bands only get harder as they grow
            m = int(np.argmin(ok))
        if shape and np.isfinite(f.max_aspect):
            a = f.area[i : i + m]
            c = np.sqrt(a * f.max_aspect)
            D = np.cumsum(a / c)  # widths if every kernel were as tall as allowed
            crowded = D > widths[:m] * (1 + 1e-9)
            crowded[0] = False  # a lone kernel always gets a band (its aspect relaxed if need be)
            if crowded.any():
                m = int(np.argmax(crowded))
        lens[i] = m
    if not shape:
        for m, starts in _groups(lens):
            n = np.arange(1, m + 1)
            widths = f.cols - f.spacing * (n - 1)
            st = np.array(starts)
            S = np.cumsum(f.area[st[:, None] + np.arange(m)[None, :]], axis=1)
            hmin = _min_band_heights(f, st, m, widths)
            for g, i in enumerate(starts):
                out[i] = (i + n, np.zeros(m), S[g] / widths, hmin[g])
        return out
    h_of: dict[int, np.ndarray] = {}
    for m, starts in _groups(lens):
        n = np.arange(1, m + 1)
        widths = f.cols - f.spacing * (n - 1)
        a = f.area[np.array(starts)[:, None] + np.arange(m)[None, :]]  # [g, m]
        S = np.cumsum(a, axis=1)
        c = np.sqrt(a * f.max_aspect) if np.isfinite(f.max_aspect) else np.full(a.shape, np.inf)
        D = np.cumsum(np.where(np.isfinite(c), a / c, 0.0), axis=1)
        tri = np.tril(np.ones((m, m), bool))
        # Least h with sum_k a_k / min(h, c_k) <= width: it lies in [S / width, min(S / (width - D), max c)], as
        # need(h) <= S / h + D and need(max c) = D; bisect in log h.
        lo = S / widths
        hi = np.minimum(
            np.where(D < widths, S / np.maximum(widths - D, 1e-300), np.inf), np.maximum.accumulate(c, axis=1)
        )
        hi = np.maximum(hi, lo)
        # need[g, n] = sum_k (k <= n) a_k / min(mid_n, c_k), in one buffer (the [g, m, m] terms dominate a place)
        terms = np.empty((len(starts), m, m))
        above = np.broadcast_to(~tri, terms.shape)
        for _ in range(30):
            mid = np.sqrt(lo * hi)
            np.minimum(mid[:, :, None], c[:, None, :], out=terms)
            np.divide(a[:, None, :], terms, out=terms)
            np.copyto(terms, 0.0, where=above)
            fits = terms.sum(axis=2) <= widths
            hi = np.where(fits, mid, hi)
            lo = np.where(fits, lo, mid)
        h = hi
        if f.min_aspect > 0:
            h = np.maximum(h, np.sqrt(np.maximum.accumulate(a, axis=1) * f.min_aspect))
        # Stop once every kernel is far lower than its band: longer bands only waste more.
        cap = f.max_aspect if np.isfinite(f.max_aspect) else 16.0
        stop = (h**2 > (_HOPELESS**2) * cap * np.maximum.accumulate(a, axis=1)) | (h > f.rows)
        stop[:, 0] = False
        for g, i in enumerate(starts):
            h_of[i] = h[g, : int(np.argmax(stop[g])) if stop[g].any() else m]
    total = f.area.sum()
    for m, starts in _groups({i: len(h) for i, h in h_of.items()}):
        n = np.arange(1, m + 1)
        widths = f.cols - f.spacing * (n - 1)
        st = np.array(starts)
        a = f.area[st[:, None] + np.arange(m)[None, :]]  # [g, m]
        S = np.cumsum(a, axis=1)
        h = np.stack([h_of[i] for i in starts])
        tri = np.tril(np.ones((m, m), bool))
        hmin = _min_band_heights(f, st, m, widths)
        x = 2 * np.log(h)[:, :, None] - np.log(a)[:, None, :]  # ln(aspect) of kernel k as high as band n
        if np.isfinite(f.max_aspect):
            x = np.minimum(x, math.log(f.max_aspect))  # lower kernels sit at max_aspect
        pen = x**2
        if f.min_aspect > 0:
            pen = pen + _ASPECT_PENALTY * np.maximum(0.0, math.log(f.min_aspect) - x) ** 2
        cost = np.where(tri, pen, 0.0).sum(axis=2)
        cost = cost + _WASTE_WEIGHT * n_k * (h * widths - S) / total
        over = h > f.rows  # only a lone kernel: it is cut to fit, losing area
        cost = cost + np.where(over, _HEIGHT_PENALTY * n * np.log(np.maximum(h, 1.0) / f.rows) ** 2, 0.0)
        low = np.isfinite(hmin) & (hmin > h)
        cost = cost + np.where(low, _HEIGHT_PENALTY * n * np.log(np.where(low, hmin, 1.0) / h) ** 2, 0.0)
        cost = np.where(np.isfinite(hmin), cost, np.inf)
        for g, i in enumerate(starts):
            out[i] = (i + n, cost[g], h[g], hmin[g])
    return out


def _partition(f: _Frame, cands, objective: str) -> list[int] | None:
    """Cut points [0, ..., N] minimising the summed band cost ("shape") or total least height ("compact")."""
    n_k = len(f.area)
    best = np.full(n_k + 1, np.inf)
    back = np.zeros(n_k + 1, np.int64)
    best[0] = 0.0
    for i in range(n_k):
        if not np.isfinite(best[i]) or cands[i] is None:
            continue
        js, cost, _, hmin = cands[i]
        c = cost if objective == "shape" else hmin + f.spacing
        new = best[i] + c
        better = new < best[js]
        best[js[better]] = new[better]
        back[js[better]] = i
    if not np.isfinite(best[n_k]):
        return None
    cuts = [n_k]
    while cuts[-1] > 0:
        cuts.append(int(back[cuts[-1]]))
    return cuts[::-1]


def _band_sizes(f: _Frame, ks: np.ndarray, H: int, fill: int, area: np.ndarray):
    """Widths and heights of the rectangles of kernels `ks` in a band of height H, widths summing to <= fill."""
    least, min_h, min_w, maxc = f.least[ks], f.min_h[ks], f.min_w[ks], f.max_cores[ks]
    lo = np.maximum(min_w, _ceil_div(least, H)).astype(np.float64)
    hi = np.where(np.isfinite(maxc), np.floor(maxc / H), np.inf)
    hi = np.maximum(hi, lo)
    if f.min_aspect > 0:  # too wide: cap at the widest allowed width
        hi = np.minimum(hi, np.maximum(np.floor(H / f.min_aspect + 1e-9), lo))
    t = area / H
    heights = np.full(len(ks), H, np.int64)
    fixed = np.zeros(len(ks), bool)
    fixed_w = np.zeros(len(ks), np.int64)
    if np.isfinite(f.max_aspect):
        # Too tall for the band: a rectangle lower than the band, about its target area, at max_aspect.
        for k in np.nonzero(H > f.max_aspect * t * (1 + 1e-9))[0]:
            ws = int(min(hi[k], max(lo[k], round(math.sqrt(area[k] / f.max_aspect)))))
            hs = int(min(H, max(min_h[k], _ceil_div(int(least[k]), ws), round(area[k] / ws))))
            if hs < H:
                fixed[k], fixed_w[k], heights[k] = True, ws, hs
        if fixed.any() and fixed_w[fixed].sum() + lo[~fixed].sum() > fill:
            fixed[:], heights[:] = False, H
    widths = fixed_w.copy()
    free = ~fixed
    if free.any():
        widths[free] = apportion(fill - int(fixed_w[fixed].sum()), t[free], lo[free], hi[free])
    return widths, heights


def _auto_bands(f: _Frame):
    """Band partition and integer sizes with band heights chosen by the DP. Returns bands or a failure."""
    fail = None
    for objective in ("shape", "compact"):
        cands = _band_candidates(f, shape=objective == "shape")
        cuts = _partition(f, cands, objective)
        if cuts is None:
            continue
        h = np.array([cands[a][2][b - a - 1] for a, b in zip(cuts[:-1], cuts[1:])])
        hmin = np.array([cands[a][3][b - a - 1] for a, b in zip(cuts[:-1], cuts[1:])])
        nb = len(h)
        avail = f.rows - f.spacing * (nb - 1)
        if hmin.sum() > avail:
            fail = (cuts, hmin, avail)
            continue
        total = max(int(hmin.sum()), min(avail, int(math.floor(h.sum() + 1e-9))))
        heights = apportion(total, h, hmin, np.full(nb, float(avail)))
        bands = []
        for (a, b), H in zip(zip(cuts[:-1], cuts[1:]), heights):
            ks = np.arange(a, b)
            fill = f.cols - f.spacing * (b - a - 1)
            bands.append((ks, int(H), *_band_sizes(f, ks, int(H), fill, f.area[ks])))
        return bands, None
    return None, fail


def _fixed_bands(f: _Frame, bh: int):
    """Bands of height bh packed greedily in order, with the largest area scale (<= 1) that fits the grid."""
    n_k = len(f.area)
    nb_max = (f.rows + f.spacing) // (bh + f.spacing)
    lo = np.maximum(f.min_w, _ceil_div(f.least, bh)).astype(np.float64)
    hi = np.where(np.isfinite(f.max_cores), np.floor(f.max_cores / bh), np.inf)
    hi = np.maximum(hi, lo)
    if f.min_aspect > 0:
        hi = np.minimum(hi, np.maximum(np.floor(bh / f.min_aspect + 1e-9), lo))
    hi = np.minimum(hi, np.maximum(lo, f.cols))

    def pack(s):
        tallest = np.minimum(bh, np.sqrt(s * f.area * f.max_aspect)) if np.isfinite(f.max_aspect) else bh
        real = np.clip(s * f.area / np.maximum(tallest, 1e-300), lo, hi)
        cuts, width = [0], 0.0
        for k in range(n_k):
            if k > cuts[-1] and width + f.spacing + real[k] > f.cols + 1e-9:
                cuts.append(k)
                width = real[k]
            else:
                width += real[k] + (f.spacing if k > cuts[-1] else 0)
        cuts.append(n_k)
        return cuts, real

    cuts, real = pack(0.0)
    if len(cuts) - 1 > nb_max:
        return None, (cuts, np.full(len(cuts) - 1, bh), f.rows - f.spacing * (nb_max - 1))
    s_lo, s_hi = 0.0, 1.0
    if len(pack(1.0)[0]) - 1 <= nb_max:
        s_lo = 1.0
    else:
        for _ in range(50):
            mid = 0.5 * (s_lo + s_hi)
            if len(pack(mid)[0]) - 1 <= nb_max:
                s_lo = mid
            else:
                s_hi = mid
    cuts, real = pack(s_lo)
    bands = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        ks = np.arange(a, b)
        room = f.cols - f.spacing * (b - a - 1)
        fill = int(min(room, max(lo[ks].sum(), round(real[ks].sum()))))
        bands.append((ks, bh, *_band_sizes(f, ks, bh, fill, s_lo * f.area[ks])))
    return bands, None


def _trim_to_cap(f: _Frame, bands) -> None:
    """Narrow rectangles (most over their target first) until the total area is within `fraction` of the grid.

    Rounding sizes to whole cores can overshoot `cap` by a few rows or columns when fraction < 1; minimum sizes
    are never cut (they win over `fraction`).
    """
    ks = np.concatenate([b[0] for b in bands])
    widths = np.concatenate([b[2] for b in bands])  # written back into the bands below
    heights = np.concatenate([b[3] for b in bands])
    excess = int((widths * heights).sum()) - f.cap
    if excess <= 0:
        return
    lo = np.maximum(f.min_w[ks], _ceil_div(f.least[ks], heights))
    while excess > 0:
        ratio = np.where(widths > lo, widths * heights / f.area[ks], -np.inf)
        k = int(np.argmax(ratio))
        if not np.isfinite(ratio[k]):
            break
        widths[k] -= 1
        excess -= int(heights[k])
    start = 0
    for b in bands:
        n = len(b[0])
        b[2][:] = widths[start : start + n]
        start += n


def _no_fit_error(demands, f: _Frame, fail, usable: Rect) -> PlacementError:
    """Name the first kernel whose band does not fit in the rows left."""
    if fail is None:  # not expected: single-kernel bands always exist once the core counts fit
        return PlacementError(f"the kernels' minimum sizes do not pack into the usable grid {usable}")
    cuts, hmin, avail = fail
    used = 0
    for b, (a, _) in enumerate(zip(cuts[:-1], cuts[1:])):
        if used + hmin[b] > avail:
            d = demands[a]
            left = max(0, (f.rows - used - f.spacing * b) * f.cols)
            return PlacementError(
                f"kernel {d.name!r} does not fit: it needs at least {d.least_cores} cores (min_cores="
                f"{d.min_cores}, min_height={d.min_height}, min_width={d.min_width}) but the {a} kernels before it "
                f"leave {left} of the {usable.cores} usable cores ({usable.height}x{usable.width}) in rectangles of "
                f"the shapes their minimum sizes need; use fewer kernels (fuse layers), a larger wafer, less "
                f"spacing, fraction=1 / reserve_io_columns=False, or weight-streaming mode for a model this large",
                d.name,
            )
        used += int(hmin[b])
    d = demands[cuts[-2]]
    return PlacementError(f"kernel {d.name!r} does not fit on the usable grid {usable}", d.name)


def place(demands: Sequence[KernelDemand], spec, params: PlacementParams = PlacementParams()) -> dict[str, Rect]:
    """Give every kernel a rectangle of cores (module docstring: the banded floorplan).

    Args:
      demands: the kernels, in pipeline order.
      spec: the wafer (a `WaferSpec`: rows, cols, memcpy_cols_west / east).
      params: the knobs.
    Returns:
      {kernel name: Rect} in demand order: disjoint, inside the usable grid, each with at least min_cores cores
      and min_height x min_width.
    Raises:
      PlacementError: the kernels' minimum sizes do not fit (names the kernel, the cores it needs and the
        cores left).
    """
    demands = _check_demands(demands)
    if not isinstance(params, PlacementParams):
        raise TypeError(f"params must be a PlacementParams, got {type(params).__name__}")
    if not demands:
        return {}
    usable = usable_region(spec, params)
    cap = _usable_cores(spec, params)
    for d in demands:
        if d.min_height > usable.height or d.min_width > usable.width:
            raise PlacementError(
                f"kernel {d.name!r} needs a rectangle at least {d.min_height}x{d.min_width} but the usable grid is "
                f"{usable.height}x{usable.width}; use a larger wafer or a tiling with smaller minimum sides",
                d.name,
            )
    used = 0
    for k, d in enumerate(demands):
        if used + d.least_cores > cap:
            raise PlacementError(
                f"kernel {d.name!r} does not fit: it needs at least {d.least_cores} cores but the {k} kernels before "
                f"it take {used} of the {cap} cores placement may use (fraction={params.fraction} of the "
                f"{usable.cores} usable cores), leaving {cap - used}; use fewer kernels (fuse layers), a larger "
                f"wafer, fraction=1 / reserve_io_columns=False, or weight-streaming mode for a model this large",
                d.name,
            )
        used += d.least_cores

    area = _target_areas(demands, cap, params)
    cols_frame = params.order == "columns"
    inv = lambda a: math.inf if a == 0 else 1.0 / a  # noqa: E731 - aspect bounds in the transposed frame
    f = _Frame(
        rows=usable.width if cols_frame else usable.height,
        cols=usable.height if cols_frame else usable.width,
        area=area,
        least=np.array([d.least_cores for d in demands], np.int64),
        min_h=np.array([d.min_width if cols_frame else d.min_height for d in demands], np.int64),
        min_w=np.array([d.min_height if cols_frame else d.min_width for d in demands], np.int64),
        max_cores=np.array([np.inf if d.max_cores is None else d.max_cores for d in demands], np.float64),
        spacing=params.spacing,
        min_aspect=inv(params.max_aspect) if cols_frame else params.min_aspect,
        max_aspect=inv(params.min_aspect) if cols_frame else params.max_aspect,
        cap=cap,
    )
    if params.band_height is not None:
        if params.band_height > f.rows:
            raise PlacementError(
                f"band_height={params.band_height} exceeds the {f.rows} usable "
                f"{'columns' if cols_frame else 'rows'}; use a band_height <= {f.rows} or None"
            )
        for d, mh in zip(demands, f.min_h):
            if mh > params.band_height:
                raise PlacementError(
                    f"kernel {d.name!r} needs bands at least {mh} cores high but band_height={params.band_height}; "
                    f"use band_height >= {mh} or None",
                    d.name,
                )
        bands, fail = _fixed_bands(f, params.band_height)
    else:
        bands, fail = _auto_bands(f)
    if bands is None:
        raise _no_fit_error(demands, f, fail, usable)
    _trim_to_cap(f, bands)

    rects = lay_bands(
        [([demands[k].name for k in ks], H, widths, heights) for ks, H, widths, heights in bands],
        usable,
        serpentine=params.order == "serpentine",
        spacing=f.spacing,
        transposed=cols_frame,
    )
    # Guard against a bug ever producing an invalid floorplan: never return overlaps or undersized rectangles.
    return validate_placement(rects, demands, spec, reserve_io_columns=params.reserve_io_columns)
