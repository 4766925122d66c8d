"""Bands of rectangles: sizes in proportion to targets, and the serpentine band layout.

The one apportioning and the one band layout of the compiler: its floorplan (compiler/plan/place.py) and the
legaliser of the placement searches (compiler/plan/legalise.py) both use them.
"""

from __future__ import annotations

import numpy as np

from wafer.memory import Rect

# ---- sizes ----------------------------------------------------------------------------------------------------


def waterfill(total: float, weights: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """x = clip(lam * weights, lo, hi) with sum(x) = total (or as close as the bounds allow).

    F(lam) = sum(clip(lam w, lo, hi)) is piecewise linear and non-decreasing; its breakpoints are lo/w and hi/w.
    """
    w = np.asarray(weights, np.float64)
    lo = np.asarray(lo, np.float64)
    hi = np.asarray(hi, np.float64)
    if lo.sum() >= total:
        return lo.copy()
    if w.sum() <= 0:
        w = np.ones_like(w)
    pos = w > 0
    if np.minimum(hi, np.where(pos, np.inf, lo)).sum() <= total:
        return np.where(pos, hi, lo)
    bps = np.concatenate([lo[pos] / w[pos], hi[pos] / w[pos]])
    bps = np.unique(bps[np.isfinite(bps)])
    vals = np.clip(bps[:, None] * w[None, :], lo, hi).sum(axis=1)
    k = int(np.searchsorted(vals, total))  # first breakpoint with F >= total
    if k == len(bps):  # beyond the last finite breakpoint F keeps rising (an unbounded hi)
        lam0 = bps[-1] if len(bps) else 0.0
        x0 = np.clip(lam0 * w, lo, hi)
        free = pos & (x0 < hi)
        lam = lam0 + (total - x0.sum()) / w[free].sum()
    elif k == 0:
        lam = bps[0]
    else:
        l0, l1, f0, f1 = bps[k - 1], bps[k], vals[k - 1], vals[k]
        lam = l0 + (l1 - l0) * (total - f0) / (f1 - f0) if f1 > f0 else l1
    return np.clip(lam * w, lo, hi)


def apportion(total: int, targets, lo, hi) -> np.ndarray:
    """Integers in [lo, hi] summing to min(total, sum(hi)), in proportion to targets (largest remainder)."""
    lo = np.asarray(lo, np.float64)
    hi = np.asarray(hi, np.float64)
    total = int(min(total, hi.sum()))
    x = waterfill(total, np.maximum(np.asarray(targets, np.float64), 0.0), lo, hi)
    base = np.maximum(np.floor(x + 1e-9), lo)
    left = int(round(total - base.sum()))
    if left > 0:
        frac = np.where(base < hi, x - base, -np.inf)
        for k in np.argsort(-frac, kind="stable")[:left]:
            if base[k] < hi[k]:
                base[k] += 1
    elif left < 0:  # x + 1e-9 rounded a value up past the total
        over = np.where(base > lo, base - x, -np.inf)
        for k in np.argsort(-over, kind="stable")[:-left]:
            if base[k] > lo[k]:
                base[k] -= 1
    return base.astype(np.int64)


# ---- bands ------------------------------------------------------------------------------------------------------


def lay_bands(bands, region: Rect, *, serpentine: bool = True, spacing: int = 0, transposed: bool = False):
    """Rectangles of bands laid out in `region`, top to bottom, each band west->east, or alternating with the
    band's direction when `serpentine` (boustrophedon: the last kernel of one band above the first of the next).

    Args:
      bands: [(names, band height H, widths [k], heights [k])] in order; a rectangle lower than its band sits at
        the band's top, or at its bottom when it is the band's last (next to the next band's first kernel).
      region: the usable rectangle (rows x cols), or, with `transposed`, the frame's axes swapped (bands of
        columns filled north->south, west to east).
      spacing: empty cores between neighbouring rectangles in a band and between bands.
    Returns:
      {name: Rect}.
    """
    cols = region.height if transposed else region.width
    rects: dict[str, Rect] = {}
    y = 0
    for b, (names, H, widths, heights) in enumerate(bands):
        east_to_west = serpentine and b % 2 == 1
        x = cols if east_to_west else 0
        for j, (name, w, h) in enumerate(zip(names, widths, heights)):
            w, h = int(w), int(h)
            dy = H - h if (j == len(names) - 1 and j > 0 and b < len(bands) - 1) else 0
            if east_to_west:
                x -= w
                fr = (y + dy, x)
                x -= spacing
            else:
                fr = (y + dy, x)
                x += w + spacing
            if transposed:
                rects[name] = Rect(region.row + fr[1], region.col + fr[0], w, h)
            else:
                rects[name] = Rect(region.row + fr[0], region.col + fr[1], h, w)
        y += int(H) + spacing
    return rects
