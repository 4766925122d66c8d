"""Routing: which links the activation streams between kernels cross, and how many words each link carries.

In layer-pipelined mode every kernel owns a rectangle of cores (compiler/place.py) and activations stream from
one rectangle to the next over the 2D mesh. The wafer's routers forward wavelets along statically configured
routes, one 32-bit wavelet per cycle per link direction [SDK] (../shared/DESIGN.md, "Route"). This module turns
a placement and a list of flows (source kernel, destination kernel, words per sample) into per-link loads, as a
`wafer.fabric.Traffic` the cost model (`Traffic.cycles`) understands.

The stream model (our choice; the real compiler's routes are not published):
  - A stream between two rectangles runs as parallel *lanes*, each from a core on the source's edge facing the
    destination to a core on the destination's edge facing the source.
  - Side by side (sharing at least one row): from the source's east (west) edge to the destination's west (east) edge.
    `lanes="auto"`: one straight lane per shared row. `lanes="min"`: min(source height, destination height)
    lanes spread evenly over both edges (lane i at offset floor((i + 1/2) * extent / lanes) on each), each
    running along its source row, then along the destination's edge column to its destination row (those
    column legs may share links). `lanes="single"`: one straight lane in the middle of the shared rows.
  - One above the other (sharing at least one column): the same with south/north edges and columns.
  - Diagonal (neither shared): corner lanes, min(source height, destination width) of them (one for
    "single"): out of the source's east (west) edge along distinct rows, then into the destination's north
    (south) edge along distinct columns, the lane farthest from the destination in Y turning farthest from
    the source in X, so that no two lanes share a link.
  - The words of a flow are divided evenly over its lanes.
  - Each lane is dimension-ordered (X then Y, as the wafer's static routes are): from its source core along its
    row to the destination core's column, then along that column to the destination core.
  - `"host"` as a source is the host-I/O input: data enters at the wafer's west edge (column 0, through the
    memcpy columns Cerebras reserves there [SDK]) and runs east along every row of the destination to its west
    edge. `"host"` as a destination is the output: from the source's east edge along every row to the east
    edge (column cols - 1). The off-wafer hop is not counted (it uses the edge I/O, `wafer.cost.io_cycles`).
A word crossing from core A to its east neighbour counts on A's E link (index 1 of [N, E, S, W]); every link
a lane crosses carries the lane's words once. All flows of a pipeline stream at the same time, so the result is
ONE phase: loads of flows sharing a link add up (contention), and its hops are the longest lane's.

Loads are counted per flow on the flow's bounding box with difference arrays (lanes counted as integers, then
scaled by words per lane, so sums are exact), so routing 100 flows on the full 757 x 996 grid takes milliseconds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np

from compiler import relax
from compiler.errors import ColorError, RouteError
from wafer import defects
from wafer.fabric import CHANNELS, RAMP_IN, RAMP_OUT, Phase, Traffic
from wafer.memory import Rect

HOST = "host"
LANE_MODES = ("auto", "min", "single")
_N, _E, _S, _W = range(4)


@dataclasses.dataclass(frozen=True, eq=False)
class Routes:
    """The routes of a pipeline's flows and the load they put on every link (all flows concurrent).

    Attributes:
      traffic: a `Traffic` with one phase (bounding-box part per flow); `traffic.cycles(spec)` is the cost.
      hops: {(src, dst): hops of the flow's longest lane}.
      lanes: {(src, dst): int array [lanes, 4] of (row0, col0, row1, col1)}: a lane runs from (row0, col0)
        along row0 to (row0, col1), then along col1 to (row1, col1).
      lane_words: {(src, dst): words per sample on each of the flow's lanes}.
      max_link_words: words per sample on the busiest link.
      rows, cols: the grid.
    """

    traffic: Traffic
    hops: dict
    lanes: dict
    lane_words: dict
    max_link_words: float
    rows: int
    cols: int

    @functools.cached_property
    def paths(self) -> dict[tuple[str, str], list[list[tuple[int, int]]]]:
        """{(src, dst): [lane, ...]}, each lane the list of (row, col) cores it visits, source first."""
        return {key: [_lane_path(*(int(v) for v in lane)) for lane in ends] for key, ends in self.lanes.items()}

    def link_words(self, rows: int | None = None, cols: int | None = None) -> np.ndarray:
        """Words per sample sent per core per direction, `[4, rows, cols]` (N, E, S, W); default: the grid."""
        return self.traffic.link_words(self.rows if rows is None else rows, self.cols if cols is None else cols)

    @property
    def max_hops(self) -> int:
        return max(self.hops.values(), default=0)

    def cycles(self, spec):
        """Cycles per sample of the streams on `spec`: busiest link x word time + longest lane x hop latency."""
        return self.traffic.cycles(spec)


def _lane_path(r0: int, c0: int, r1: int, c1: int) -> list[tuple[int, int]]:
    dc = 1 if c1 >= c0 else -1
    dr = 1 if r1 >= r0 else -1
    path = [(r0, c) for c in range(c0, c1 + dc, dc)]
    path += [(r, c1) for r in range(r0 + dr, r1 + dr, dr)]
    return path


def spread_fraction(i, n, size):
    """(i + 1/2) * size / n: where lane i of n lies past the start of a side of `size` cores, before `spread` takes
    its floor. Array-generic (compiler/relax.py)."""
    return (2 * i + 1) * size / (2 * n)


def spread(i, n, start, size):
    """Offset of lane i of n spread evenly over [start, start + size): start + floor((i + 1/2) * size / n).
    Array-generic (compiler/relax.py)."""
    return start + relax.floor(spread_fraction(i, n, size))


def _spread(n: int, start: int, size: int) -> np.ndarray:
    """n offsets spread evenly over [start, start + size) (`spread` of lanes 0..n-1), as ints."""
    return np.asarray(spread(np.arange(n), n, start, size), np.int64)


def _span(a0: int, alen: int, b0: int, blen: int) -> tuple[int, int]:
    """Overlap [lo, hi) of two intervals (hi <= lo when they do not overlap)."""
    return max(a0, b0), min(a0 + alen, b0 + blen)


def _cross(s0, slen, d0, dlen, mode):
    """Lane offsets along the shared axis: (source offsets, destination offsets)."""
    lo, hi = _span(s0, slen, d0, dlen)
    if mode == "single":
        if hi > lo:
            m = np.array([(lo + hi - 1) // 2])
            return m, m
        return np.array([s0 + (slen - 1) // 2]), np.array([d0 + (dlen - 1) // 2])
    if mode == "auto" and hi > lo:
        m = np.arange(lo, hi)
        return m, m
    n = min(slen, dlen)
    return _spread(n, s0, slen), _spread(n, d0, dlen)


def flow_lanes(src: Rect, dst: Rect, *, lanes: str = "auto") -> np.ndarray:
    """Lanes of a stream from rectangle `src` to rectangle `dst`: int array [lanes, 4] (row0, col0, row1, col1).

    See the module docstring for the model. Raises RouteError if the rectangles overlap.
    """
    if src.overlaps(dst):
        raise RouteError(f"rectangles {src} and {dst} overlap; a stream needs disjoint rectangles")
    east = dst.col >= src.col + src.width
    west = dst.col + dst.width <= src.col
    south = dst.row >= src.row + src.height
    north = dst.row + dst.height <= src.row
    cs = src.col + src.width - 1 if east else src.col  # the source's east / west edge column
    if (east or west) and (north or south):
        # Diagonal: out of the source's east/west edge, X then Y into the destination's north/south edge.
        n = 1 if lanes == "single" else min(src.height, dst.width)
        rs = np.array([src.row + (src.height - 1) // 2]) if n == 1 else _spread(n, src.row, src.height)
        cd = np.array([dst.col + (dst.width - 1) // 2]) if n == 1 else _spread(n, dst.col, dst.width)
        # The lane farthest from dst in Y turns farthest from src in X, so that no two lanes share a link.
        rs = rs if south else rs[::-1]
        cd = cd[::-1] if east else cd
        rd = dst.row if south else dst.row + dst.height - 1
        return np.stack([rs, np.full(n, cs), np.full(n, rd), cd], axis=1).astype(np.int64)
    if east or west:  # side by side, sharing rows: east/west edges, lanes along rows
        cd = dst.col if east else dst.col + dst.width - 1
        rs, rd = _cross(src.row, src.height, dst.row, dst.height, lanes)
        n = len(rs)
        return np.stack([rs, np.full(n, cs), rd, np.full(n, cd)], axis=1).astype(np.int64)
    # One above the other, sharing columns: south/north edges, lanes along columns.
    rs = src.row + src.height - 1 if south else src.row
    rd = dst.row if south else dst.row + dst.height - 1
    cs, cd = _cross(src.col, src.width, dst.col, dst.width, lanes)
    n = len(cs)
    return np.stack([np.full(n, rs), cs, np.full(n, rd), cd], axis=1).astype(np.int64)


def flow_hops(sr, sc, sh, sw, dr, dc, dh, dw, *, cols=None):
    """Hops of the longest lane of the stream from rectangle s to rectangle d under "auto" lanes (`flow_lanes`).

    Array-generic over flows (compiler/relax.py), so the schedule evaluates it on a plan's rectangles and on a
    relaxed layout alike. Straight lanes (rectangles sharing rows or columns) all cross the gap between the facing
    edges; of diagonal corner lanes the first is the longest (it leaves the source's row farthest from the
    destination and turns in at the destination's column farthest from the source).
    """
    R = relax
    east, west = dc >= sc + sw, dc + dw <= sc
    south, north = dr >= sr + sh, dr + dh <= sr
    cs = R.where(east, sc + sw - 1, sc)
    side = abs(R.where(east, dc, dc + dw - 1) - cs)
    rs = R.where(south, sr + sh - 1, sr)
    rd = R.where(south, dr, dr + dh - 1)
    vert = abs(rd - rs)
    n = R.minimum(sh, dw)
    one = n == 1  # a single corner lane runs through the middle row and column
    # the farthest lanes: going east the destination's last column (west: its first), going south the source's
    # first row (north: its last). A lane's offset is start + floor(middle or `spread_fraction`): the lane index and
    # the single lane's middle are chosen before the one floor, so that each axis takes one floor (a floor with its
    # ulp snap is ~10 operations per flow and placement in batched sweeps; the values are `spread`'s)
    lane = lambda i, start, size: start + R.floor(R.where(one, (size - 1) / 2, spread_fraction(i, n, size)))  # noqa: E731
    x_lane = lane(R.where(east, n - 1, 0.0), dc, dw)
    y_lane = lane(R.where(south, 0.0, n - 1), sr, sh)
    x_far = R.where(east, x_lane - cs, cs - x_lane)
    y_far = R.where(south, rd - y_lane, y_lane - rd)
    diagonal = (east | west) & (north | south)
    return R.where(diagonal, x_far + y_far, R.where(east | west, side, vert))


def flow_physical_hops(rm, sr, sc, sh, sw, dr, dc, dh, dw):
    """Physical hops of the longest lane of the stream from rectangle s to rectangle d under "auto" lanes on a
    defective wafer's remap `rm` (`wafer.defects`): the most, over the stream's lanes, of a lane's logical hops plus
    its extra hops (`wafer.defects.lane_extra`), the lanes being `flow_lanes`'. Array-generic over flows, as
    `flow_hops` (lanes are masked over a static [flows, max(rows, cols)] index, so it jits and vmaps)."""
    R = relax
    ns = relax.xp(sr, sc, sh, sw, dr, dc, dh, dw)
    east, west = dc >= sc + sw, dc + dw <= sc
    south, north = dr >= sr + sh, dr + dh <= sr
    cs = R.where(east, sc + sw - 1, sc)
    cd_side = R.where(east, dc, dc + dw - 1)
    rs = R.where(south, sr + sh - 1, sr)
    rd = R.where(south, dr, dr + dh - 1)
    col = lambda x: ns.asarray(x)[..., None]  # noqa: E731  a flow's value against the lane index
    # side by side: a lane along every shared row, from the source's edge column to the destination's
    lines = ns.arange(rm.rows)
    shared = (lines >= col(R.maximum(sr, dr)) - 0.5) & (lines < col(R.minimum(sr + sh, dr + dh)) - 0.5)
    side = ns.max(ns.where(shared, defects.row_extra(rm, lines, col(cs), col(cd_side)), 0.0), axis=-1)
    side = abs(cd_side - cs) + side
    # one above the other: a lane down every shared column
    lines = ns.arange(rm.cols)
    shared = (lines >= col(R.maximum(sc, dc)) - 0.5) & (lines < col(R.minimum(sc + sw, dc + dw)) - 0.5)
    vert = ns.max(ns.where(shared, defects.col_extra(rm, lines, col(rs), col(rd)), 0.0), axis=-1)
    vert = abs(rd - rs) + vert
    # diagonal: corner lane i of n leaves the source's row rs_i and turns into the destination's column cd_i
    n = R.minimum(sh, dw)
    i = ns.arange(min(rm.rows, rm.cols))
    one = col(n == 1)
    rows_i = ns.where(one, col(sr + R.floor((sh - 1) / 2)), spread(i, col(n), col(sr), col(sh)))
    rows_rev = ns.where(one, col(sr + R.floor((sh - 1) / 2)), spread(col(n) - 1 - i, col(n), col(sr), col(sh)))
    cols_i = ns.where(one, col(dc + R.floor((dw - 1) / 2)), spread(i, col(n), col(dc), col(dw)))
    cols_rev = ns.where(one, col(dc + R.floor((dw - 1) / 2)), spread(col(n) - 1 - i, col(n), col(dc), col(dw)))
    r_i = ns.where(col(south), rows_i, rows_rev)
    c_i = ns.where(col(east), cols_rev, cols_i)
    lane = abs(c_i - col(cs)) + abs(col(rd) - r_i) + defects.lane_extra(rm, r_i, col(cs), col(rd), c_i)
    diag = ns.max(ns.where(i < col(n) - 0.5, lane, 0.0), axis=-1)
    diagonal = (east | west) & (north | south)
    return R.where(diagonal, diag, R.where(east | west, side, vert))


def host_physical_hops(rm, row, col, height, width, *, inbound):
    """Physical hops of the host streams on a defective wafer's remap `rm`: `host_hops` plus the most extra hops of
    any of the rectangle's rows between the west edge (column 0) and its west edge, or its east edge and the east
    edge (`wafer.defects.line_extra`)."""
    if inbound:
        return col + defects.line_extra(rm, 1, row, 0.0 * col, height, col + 1)
    last = col + width - 1
    return rm.cols - col - width + defects.line_extra(rm, 1, row, last, height, rm.cols - last)


def flow_lane_count(sr, sc, sh, sw, dr, dc, dh, dw):
    """Lanes of the stream from rectangle s to rectangle d under "auto" lanes (`flow_lanes`): the rows (columns)
    the rectangles share when side by side (one above the other), min(source height, destination width) corner
    lanes when diagonal. Array-generic (compiler/relax.py), as `flow_hops`."""
    R = relax
    east, west = dc >= sc + sw, dc + dw <= sc
    south, north = dr >= sr + sh, dr + dh <= sr
    rows = R.minimum(sr + sh, dr + dh) - R.maximum(sr, dr)
    cols = R.minimum(sc + sw, dc + dw) - R.maximum(sc, dc)
    side = R.where(rows > 0, rows, R.minimum(sh, dh))
    vert = R.where(cols > 0, cols, R.minimum(sw, dw))
    diagonal = (east | west) & (north | south)
    return R.where(diagonal, R.minimum(sh, dw), R.where(east | west, side, vert))


def host_hops(col, width, *, inbound, cols):
    """Hops of the host streams: input from column 0 along the rows to the rectangle's west edge, output from its
    east edge to column cols - 1 (the off-wafer hop is the edge I/O's)."""
    return col if inbound else cols - col - width


def _host_lanes(rect: Rect, cols: int, inbound: bool, mode: str) -> np.ndarray:
    rows = (
        np.array([rect.row + (rect.height - 1) // 2])
        if mode == "single"
        else np.arange(rect.rows.start, rect.rows.stop)
    )
    n = len(rows)
    if inbound:
        c0, c1 = 0, rect.col
    else:
        c0, c1 = rect.col + rect.width - 1, cols - 1
    return np.stack([rows, np.full(n, c0), rows, np.full(n, c1)], axis=1).astype(np.int64)


def lane_loads(ends: np.ndarray) -> tuple[int, int, np.ndarray]:
    """Lanes crossing each link of the lanes' bounding box: (row0, col0, counts[4, h, w]) (N, E, S, W)."""
    r0, c0, r1, c1 = (ends[:, i] for i in range(4))
    top, left = int(min(r0.min(), r1.min())), int(min(c0.min(), c1.min()))
    h = int(max(r0.max(), r1.max())) - top + 1
    w = int(max(c0.max(), c1.max())) - left + 1
    r0, r1, c0, c1 = r0 - top, r1 - top, c0 - left, c1 - left
    out = np.zeros((4, h, w), np.int64)
    # X leg along row r0: cores c0..c1-1 send E (c1 > c0), cores c1+1..c0 send W (c1 < c0).
    diff = np.zeros((h, w + 1), np.int64)
    m = c1 > c0
    np.add.at(diff, (r0[m], c0[m]), 1)
    np.add.at(diff, (r0[m], c1[m]), -1)
    out[_E] = np.cumsum(diff, axis=1)[:, :w]
    diff[:] = 0
    m = c1 < c0
    np.add.at(diff, (r0[m], c1[m] + 1), 1)
    np.add.at(diff, (r0[m], c0[m] + 1), -1)
    out[_W] = np.cumsum(diff, axis=1)[:, :w]
    # Y leg along column c1: rows r0..r1-1 send S (r1 > r0), rows r1+1..r0 send N (r1 < r0).
    diff = np.zeros((h + 1, w), np.int64)
    m = r1 > r0
    np.add.at(diff, (r0[m], c1[m]), 1)
    np.add.at(diff, (r1[m], c1[m]), -1)
    out[_S] = np.cumsum(diff, axis=0)[:h]
    diff[:] = 0
    m = r1 < r0
    np.add.at(diff, (r1[m] + 1, c1[m]), 1)
    np.add.at(diff, (r0[m] + 1, c1[m]), -1)
    out[_N] = np.cumsum(diff, axis=0)[:h]
    return top, left, out


def _rect(placement, name) -> Rect:
    try:
        return Rect(*(int(v) for v in placement[name]))
    except KeyError:
        names = list(placement)
        raise RouteError(
            f"flow names kernel {name!r}, which is not in the placement; kernels are "
            f"{names[:20]}{' ...' if len(names) > 20 else ''} (or {HOST!r} for host I/O)"
        ) from None


def route(
    placement: Mapping[str, Rect | tuple],
    flows: Sequence[tuple[str, str, float]],
    spec,
    *,
    lanes: str = "auto",
    groups: Sequence | None = None,
) -> Routes:
    """Route every flow of a pipeline and count the words per sample on every link.

    Args:
      placement: kernel name -> `Rect` (or 4-tuple (row, col, height, width)).
      flows: (src, dst, words per sample); src may be "host" (input at the west edge), dst "host" (output at
        the east edge). A pair given twice is one flow carrying the sum.
      spec: the wafer (rows, cols).
      lanes: "auto", "min" or "single" (module docstring).
      groups: a multicast group per flow (hashable keys, `features.flow_groups`): flows of one group carry the same
        words from one source, so a link their lanes share carries them once (the router forwards the stream and
        delivers it to each reader) and the source injects them once; None: every flow its own.
    Returns:
      Routes (one concurrent phase).
    Raises:
      RouteError: unknown kernel, a kernel named "host", host to host, a flow from a kernel to itself,
        words negative or not finite, overlapping or out-of-grid rectangles.
    """
    return _route(placement, flows, spec, lanes=lanes, groups=groups)[0]


def route_with_shares(placement, flows, spec, *, lanes: str = "auto", groups=None) -> tuple[Routes, np.ndarray]:
    """`route` and the `flow_shares` of its flows, in order, from the one count of each flow's lanes and of the
    grid's loads (the plan's route pass needs both)."""
    routes, own, total = _route(placement, flows, spec, lanes=lanes, groups=groups)
    return routes, _shares(routes, [(src, dst) for src, dst, _ in flows], own, total)


def _route(placement, flows, spec, *, lanes, groups):
    """`route`, and each flow's lane counts `{(src, dst): (top, left, counts)}` and the grid's link loads [4, rows,
    cols] (None without flows)."""
    if lanes not in LANE_MODES:
        raise ValueError(f"route: lanes must be one of {LANE_MODES}, got {lanes!r}")
    if HOST in placement:
        raise RouteError(f"a kernel is named {HOST!r}, which flows reserve for host I/O; rename the kernel")
    merged: dict[tuple[str, str], float] = {}
    group_of: dict[tuple[str, str], object] = {}
    if groups is not None and len(groups) != len(flows):
        raise RouteError(f"route: groups must give one group per flow, got {len(groups)} for {len(flows)} flows")
    for n_flow, flow in enumerate(flows):
        try:
            src, dst, words = flow
        except (TypeError, ValueError):
            raise RouteError(f"a flow must be (src, dst, words per sample), got {flow!r}") from None
        if isinstance(words, bool) or not isinstance(words, int | float | np.number) or not math.isfinite(words):
            raise RouteError(f"flow {src!r} -> {dst!r}: words must be a finite number >= 0, got {words!r}")
        if words < 0:
            raise RouteError(f"flow {src!r} -> {dst!r}: words must be >= 0, got {words!r}")
        if src == dst:
            raise RouteError(f"flow {src!r} -> {dst!r} goes from a kernel to itself; flows join different kernels")
        merged[(src, dst)] = merged.get((src, dst), 0.0) + float(words)
        group_of[(src, dst)] = (src, dst) if groups is None else groups[n_flow]

    parts, hops, all_lanes, lane_words, own = [], {}, {}, {}, {}
    for (src, dst), words in merged.items():
        rects = [None if n == HOST else _rect(placement, n) for n in (src, dst)]
        for n, r in zip((src, dst), rects):
            if r is not None and not r.inside(spec.rows, spec.cols):
                raise RouteError(f"kernel {n!r}: rectangle {r} is not inside the {spec.rows}x{spec.cols} grid")
        s, d = rects
        if s is None:
            ends = _host_lanes(d, spec.cols, True, lanes)
        elif d is None:
            ends = _host_lanes(s, spec.cols, False, lanes)
        else:
            ends = flow_lanes(s, d, lanes=lanes)
        per_lane = words / len(ends)
        top, left, counts = lane_loads(ends)
        own[(src, dst)] = (top, left, counts)
        load = np.zeros((CHANNELS, *counts.shape[1:]))
        load[:4] = counts * per_lane
        # ramps: a kernel's core puts each of its lanes' words on its ramp, the destination's core takes them off
        # (the host's side is the edge I/O)
        if s is not None:
            np.add.at(load[RAMP_OUT], (ends[:, 0] - top, ends[:, 1] - left), per_lane)
        if d is not None:
            np.add.at(load[RAMP_IN], (ends[:, 2] - top, ends[:, 3] - left), per_lane)
        parts.append((top, left, load))
        hops[(src, dst)] = int((np.abs(ends[:, 1] - ends[:, 3]) + np.abs(ends[:, 0] - ends[:, 2])).max())
        all_lanes[(src, dst)] = ends
        lane_words[(src, dst)] = per_lane
    parts = _multicast(parts, [group_of[key] for key in merged])
    # the lanes set the phase's latency: on a defective wafer the longest grows by its extra hops (Phase.lanes)
    ends = np.concatenate(list(all_lanes.values())) if all_lanes else None
    phase = Phase(tuple(parts), max(hops.values(), default=0), 0, ends)
    # the loads on the whole grid: the busiest link (the same maximum as over the parts' bounding box, the loads
    # being >= 0) and what flow_shares reads
    total = phase.loads(spec.rows, spec.cols)[:4] if parts else None
    routes = Routes(
        traffic=Traffic((phase,)) if parts else Traffic.none(),
        hops=hops,
        lanes=all_lanes,
        lane_words=lane_words,
        max_link_words=float(total.max()) if parts else 0.0,
        rows=spec.rows,
        cols=spec.cols,
    )
    return routes, own, total


def _multicast(parts: list, groups: list) -> list:
    """Per-flow parts with each multicast group's link loads and source ramp merged: on every link and at the source,
    the most any of its flows puts there (one stream), kept on the group's first flow; the others keep only what
    their own destination takes off its ramp."""
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out = list(parts)
    for idx in members.values():
        if len(idx) < 2:
            continue
        top = min(parts[i][0] for i in idx)
        left = min(parts[i][1] for i in idx)
        bottom = max(parts[i][0] + parts[i][2].shape[1] for i in idx)
        right = max(parts[i][1] + parts[i][2].shape[2] for i in idx)
        merged = np.zeros((CHANNELS, bottom - top, right - left))
        for i in idx:
            t, lft, load = parts[i]
            _, h, w = load.shape
            view = merged[:, t - top : t - top + h, lft - left : lft - left + w]
            channels = [c for c in range(CHANNELS) if c != RAMP_IN]
            view[channels] = np.maximum(view[channels], load[channels])
            if i != idx[0]:
                only_in = np.zeros_like(load)
                only_in[RAMP_IN] = load[RAMP_IN]
                out[i] = (t, lft, only_in)
        for i in idx:
            t, lft, load = parts[i]
            _, h, w = load.shape
            merged[RAMP_IN, t - top : t - top + h, lft - left : lft - left + w] += load[RAMP_IN] * (i == idx[0])
        out[idx[0]] = (top, left, merged)
    return out


# ---- what the routes occupy ---------------------------------------------------------------------------------------

# Colours a WEIGHT kernel's own transfers take at each of its routers (ASSUMED; the SDK's collectives library
# uses one colour for a multicast and alternates two along a chain so that a core's receive and send differ; a
# two-phase reduction's groups and leaders alternate two each): see docs/fidelity.md.
KERNEL_COLORS = {"multicast": 1, "chain": 2, "tree": 2, "two_phase": 4}


def flow_shares(routes: Routes, keys) -> np.ndarray:
    """For each flow of `keys` ((src, dst) pairs), the busiest link on its lanes carries this many times one lane's
    words (1 when no other stream shares its links): `Features.flow_share`, measured on the plan's routes."""
    if not routes.lanes:
        return np.ones(len(keys))
    (phase,) = routes.traffic.phases
    return _shares(routes, keys, {}, phase.loads(routes.rows, routes.cols)[:4])


def _shares(routes: Routes, keys, own: dict, total) -> np.ndarray:
    """flow_shares, with the flows' lane counts `own` (`lane_loads` of those missing) and the grid's link loads."""
    out = np.ones(len(keys))
    for j, key in enumerate(keys):
        key = tuple(key)
        if key not in routes.lanes or routes.lane_words[key] <= 0:
            continue
        # the flow's own lanes (a multicast's part is shared)
        top, left, counts = own[key] if key in own else lane_loads(routes.lanes[key])
        _, h, w = counts.shape
        mine = counts > 0
        busiest = float(total[:, top : top + h, left : left + w][mine].max(initial=0.0))
        out[j] = max(busiest / routes.lane_words[key], 1.0)
    return out


def streams_through(routes: Routes) -> tuple[np.ndarray, list]:
    """(count [rows, cols], parts): how many streams' lanes pass each router (endpoints included; a stream's lanes
    share one colour), and each stream's (key, top, left, mask) for naming them."""
    count = np.zeros((routes.rows, routes.cols), np.int64)
    parts = []
    if not routes.lanes:
        return count, parts
    (phase,) = routes.traffic.phases
    for key, (top, left, load) in zip(routes.lanes, phase.parts):
        mask = np.any(load > 0, axis=0)
        _, h, w = load.shape
        count[top : top + h, left : left + w] += mask
        parts.append((key, top, left, mask))
    return count, parts


def check_colors(routes: Routes | None, kernel_rects: Mapping, kernel_colors: Mapping, spec) -> np.ndarray:
    """Colours in use at every router [rows, cols]: the streams passing it and the transfers of the kernel whose
    cores it serves (`kernel_colors`: {kernel: colours}).

    Raises:
      ColorError: a router would need more than spec.router_colors - spec.reserved_colors.
    """
    available = spec.router_colors - spec.reserved_colors
    used, parts = streams_through(routes) if routes is not None else (np.zeros((spec.rows, spec.cols), np.int64), [])
    owner = np.full((spec.rows, spec.cols), -1)
    names = list(kernel_rects)
    own = np.zeros((spec.rows, spec.cols), np.int64)
    for i, name in enumerate(names):
        r = kernel_rects[name]
        own[r.row : r.row + r.height, r.col : r.col + r.width] = kernel_colors.get(name, 0)
        owner[r.row : r.row + r.height, r.col : r.col + r.width] = i
    total = used + own
    if total.size and total.max() > available:
        row, col = np.unravel_index(int(np.argmax(total)), total.shape)
        streams = [key for key, top, left, mask in parts if _covers(mask, top, left, row, col)]
        kernel = names[owner[row, col]] if owner[row, col] >= 0 else None
        raise ColorError((int(row), int(col)), int(total[row, col]), available, streams, kernel, int(own[row, col]))
    return total


def _covers(mask, top, left, row, col) -> bool:
    h, w = mask.shape
    return top <= row < top + h and left <= col < left + w and bool(mask[row - top, col - left])
