"""Manufacturing defects and how the wafer hides them: a physical grid with spare cores, a defect map, a remap.

A real wafer is not perfect. Its fabric is a *physical* grid a little larger than the grid programs see: spare
columns (and here, optionally, spare rows) of cores. Cores that fail test are switched off and the fabric's
redundant links route around them, so programs see a whole *logical* rows x cols grid [HC31, CB25]. What the
programs do not see is that a logical link next to a dead core is physically longer; this module says how much.

    spec = wafer.WaferSpec.mini(8, 8).with_defects(rate=0.01, seed=0)          # random, deterministic from seed
    spec = wafer.WaferSpec.mini(8, 8).with_defects(dead_cores=[(2, 3)], dead_links=[(5, 1, "E")])
    rm = spec.remap                                                              # `Remap`: where each logical core is

The remap (our model of what the WSE does; docs/defects.md):
  - A dead link retires one of its two cores: its east (link "E"/"W") or south (link "N"/"S") end. The fabric's
    redundant links that bypass a dead core bypass this one too, so the dead link is never used.
  - Each physical row with at most `spare_cols` dead cores holds one logical row: its logical cores are its live
    cores in order, west to east (the row's cores east of a dead one move one position east, towards the spare
    columns, as [HC31] describes). A row with more dead cores than spare columns is retired whole, using up a spare
    row; the logical rows are the first `rows` physical rows that are not retired.
  - A logical link runs between the physical places of its two cores over the redundant links, which include
    diagonal ones [HC31]: its physical hops are the larger of the rows and the columns between them (ASSUMED: one
    hop per router passed, a diagonal step being one hop). A horizontal link past k dead cores spans k + 1 hops; a
    vertical link between two rows whose cores are displaced by d1 and d2 columns spans max(1, |d1 - d2|) hops
    (one more per retired row between them, when that is larger): a displacement of one is the diagonal link of
    [HC31], free; larger ones cost their extra columns.
  - Link bandwidth is not changed: every physical link of a remapped link carries the logical link's words once,
    over redundant links no other logical link uses (ASSUMED, as [HC31]'s "extra links").

The one rule that charges defects: a lane (a stream's dimension-ordered path, X then Y: from logical (r0, c0) along
row r0 to (r0, c1), then along column c1 to (r1, c1)) takes `lane_hops` physical hops: its logical hops plus the
extra hops of its row leg and of its column leg. Extra hops along a row or column are differences of prefix sums
(`Remap.row_prefix`, `Remap.col_prefix`), so a path's extra hops are two gathers: the fabric primitives' records
(wafer/fabric.py, `Phase.lanes`), the compiler's schedule and its differentiable cost model
(compiler/schedule.py, compiler/plan/route.py) all call the functions here.

Sources:
  [HC31] Sean Lie, "Wafer Scale Deep Learning", Hot Chips 31 (2019), as reported by WikiChip ("A look at Cerebras
        Wafer-Scale Engine: half square foot silicon chip", 2019): redundant cores and redundant fabric links; a
        defective core is replaced by shifting the cores of its row by one position towards a spare, the fabric
        routing diagonally around it; about 1-1.5 % of the cores are spares.
  [CB25] Cerebras blog, J. Wang, "100x Defect Tolerance: How Cerebras Solved the Yield Problem" (January 2025):
        WSE-3 has 970,000 physical cores of which 900,000 are enabled; a core is about 0.05 mm^2 and TSMC 5 nm's
        defect density about 0.001 per mm^2, so about 5e-5 of the cores are defective: 1 % defects is a stress
        case, far above a real wafer.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from wafer.errors import SpecError

LINK_DIRECTIONS = ("N", "E", "S", "W")
# Spare columns `with_defects` gives when none are asked for: 1.5 % of the columns, the top of [HC31]'s 1-1.5 %,
# and at least DEFAULT_MIN_SPARE_COLS (ASSUMED: so that a small test wafer hides a stress rate of 1 % defects).
DEFAULT_SPARE_FRACTION = 0.015
DEFAULT_MIN_SPARE_COLS = 2


class DefectError(SpecError):
    """A defect map the spares cannot hide (too many dead cores in too many rows), or a defect outside the physical
    grid. The message says which rows or defects, and how many spare rows or columns would be enough.

    Attributes: rows (physical rows that could not be used), needed_spare_cols, needed_spare_rows.
    """

    def __init__(self, msg: str, rows=(), needed_spare_cols: int = 0, needed_spare_rows: int = 0):
        self.rows, self.needed_spare_cols, self.needed_spare_rows = tuple(rows), needed_spare_cols, needed_spare_rows
        super().__init__(msg)


def _core(x, what):
    try:
        r, c = x
        if isinstance(r, bool) or isinstance(c, bool) or int(r) != r or int(c) != c:
            raise TypeError
        return int(r), int(c)
    except (TypeError, ValueError):
        raise DefectError(f"DefectMap: {what} must be a (row, col) pair of ints, got {x!r}") from None


def _link(x):
    """(row, col, direction) -> the same link named from its north / west core: (row, col, "E" or "S")."""
    try:
        r, c, d = x
    except (TypeError, ValueError):
        raise DefectError(f"DefectMap: a dead link must be (row, col, direction), got {x!r}") from None
    r, c = _core((r, c), "a dead link's core")
    if d not in LINK_DIRECTIONS:
        raise DefectError(f"DefectMap: a dead link's direction must be one of {LINK_DIRECTIONS}, got {d!r} in {x!r}")
    return {"E": (r, c, "E"), "S": (r, c, "S"), "W": (r, c - 1, "E"), "N": (r - 1, c, "S")}[d]


@dataclasses.dataclass(frozen=True)
class DefectMap:
    """Dead cores and dead links of a physical grid with spare rows and columns. Frozen and hashable (a static
    field of `WaferSpec`).

    Attributes:
      dead_cores: ((row, col), ...) physical coordinates, sorted, without repeats.
      dead_links: ((row, col, "E" | "S"), ...): the link from physical core (row, col) to its east or south
        neighbour (given as "W" or "N" from the other end, it is stored from this one).
      spare_rows, spare_cols: the physical grid is (rows + spare_rows) x (cols + spare_cols) of the spec's logical
        rows x cols.
    """

    dead_cores: tuple = ()
    dead_links: tuple = ()
    spare_rows: int = 0
    spare_cols: int = 1

    def __post_init__(self):
        for f in ("spare_rows", "spare_cols"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or not 0 <= v <= 100_000:
                raise DefectError(f"DefectMap.{f} must be an int in [0, 100000], got {v!r}")
            object.__setattr__(self, f, int(v))
        object.__setattr__(self, "dead_cores", tuple(sorted({_core(x, "a dead core") for x in self.dead_cores})))
        object.__setattr__(self, "dead_links", tuple(sorted({_link(x) for x in self.dead_links})))

    def physical_shape(self, rows: int, cols: int) -> tuple[int, int]:
        return rows + self.spare_rows, cols + self.spare_cols

    def retired(self) -> tuple:
        """Physical cores switched off: the dead ones and, for every dead link, its east or south core."""
        ends = {(r, c + 1) if d == "E" else (r + 1, c) for r, c, d in self.dead_links}
        return tuple(sorted(set(self.dead_cores) | ends))

    def describe(self) -> dict:
        """JSON-serialisable summary."""
        return dict(
            dead_cores=len(self.dead_cores),
            dead_links=len(self.dead_links),
            spare_rows=self.spare_rows,
            spare_cols=self.spare_cols,
        )

    @staticmethod
    def random(
        rows: int,
        cols: int,
        rate: float,
        seed: int = 0,
        *,
        spare_rows: int = 0,
        spare_cols=None,
        link_rate: float = 0.0,
    ) -> DefectMap:
        """Every physical core dead with probability `rate`, every physical link with probability `link_rate`,
        independently (NumPy's default generator seeded with `seed`: the same map for the same arguments).
        `spare_cols` defaults to `default_spare_cols(cols)`."""
        for name, v in (("rate", rate), ("link_rate", link_rate)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
                raise DefectError(f"with_defects: {name} must be a probability in [0, 1], got {v!r}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise DefectError(f"with_defects: seed must be an int, got {seed!r}")
        spare_cols = default_spare_cols(cols) if spare_cols is None else spare_cols
        pr, pc = rows + spare_rows, cols + spare_cols
        rng = np.random.default_rng(int(seed))
        dead = rng.random((pr, pc)) < rate
        east = rng.random((pr, max(pc - 1, 0))) < link_rate
        south = rng.random((max(pr - 1, 0), pc)) < link_rate
        links = [(int(r), int(c), "E") for r, c in zip(*np.nonzero(east))]
        links += [(int(r), int(c), "S") for r, c in zip(*np.nonzero(south))]
        return DefectMap(
            dead_cores=tuple((int(r), int(c)) for r, c in zip(*np.nonzero(dead))),
            dead_links=tuple(links),
            spare_rows=spare_rows,
            spare_cols=spare_cols,
        )


def default_spare_cols(cols: int) -> int:
    """Spare columns for a grid of `cols` logical columns when none are given: 1.5 % of them ([HC31]: about 1-1.5 %
    of the cores are spares), at least `DEFAULT_MIN_SPARE_COLS`."""
    return max(DEFAULT_MIN_SPARE_COLS, math.ceil(DEFAULT_SPARE_FRACTION * cols))


@dataclasses.dataclass(frozen=True, eq=False)
class Remap:
    """Where every logical core of a rows x cols grid lies on the physical grid of a `DefectMap` (`remap`).

    Attributes:
      defects: the map; rows, cols: the logical grid; phys_rows, phys_cols: the physical grid.
      dead: [phys_rows, phys_cols] bool, the cores switched off (`DefectMap.retired`).
      row_of: [rows] int, the physical row of each logical row.
      col_of: [rows, cols] int, the physical column of each logical core.
      retired_rows: physical rows retired whole (before the last logical row).
      row_prefix: [rows, cols] float, col_of[r, c] - c: the extra hops along logical row r from column a to b are
        row_prefix[r, b] - row_prefix[r, a] (b >= a).
      col_prefix: [rows, cols] float, the extra hops of the vertical links above each core summed down its column:
        the extra hops along logical column c from row a to b are col_prefix[b, c] - col_prefix[a, c] (b >= a).
      link_extra_e, link_extra_s: [rows, cols] extra hops of the logical link from each core east / south (0 where
        the grid ends).
    """

    defects: DefectMap
    rows: int
    cols: int
    phys_rows: int
    phys_cols: int
    dead: np.ndarray
    row_of: np.ndarray
    col_of: np.ndarray
    retired_rows: tuple
    row_prefix: np.ndarray
    col_prefix: np.ndarray
    link_extra_e: np.ndarray
    link_extra_s: np.ndarray

    @property
    def spare_rows_used(self) -> int:
        return len(self.retired_rows)

    @property
    def spare_cols_used(self) -> int:
        """The most spare columns any logical row reaches into."""
        return int((self.col_of[:, -1] - (self.cols - 1)).max()) if self.rows else 0

    @property
    def remapped_links(self) -> int:
        """Logical links that are physically longer than one hop."""
        return int(np.count_nonzero(self.link_extra_e) + np.count_nonzero(self.link_extra_s))

    @property
    def extra_link_hops(self) -> int:
        """Extra hops summed over every logical link."""
        return int(self.link_extra_e.sum() + self.link_extra_s.sum())

    def logical_of(self, row: int, col: int):
        """Where a physical core shows on the logical grid: (logical row, logical col - 0.5 for a switched-off core
        between two live ones), or None when its row is retired or beyond the logical rows, or its column beyond the
        row's last logical core. For pictures."""
        hit = np.nonzero(self.row_of == row)[0]
        if not len(hit):
            return None
        r = int(hit[0])
        c = int(np.searchsorted(self.col_of[r], col))
        if c >= self.cols:
            return None
        return (r, c if self.col_of[r, c] == col else c - 0.5)

    def describe(self) -> dict:
        """JSON-serialisable summary: the map's counts and what the remap used."""
        return dict(
            self.defects.describe(),
            retired_cores=int(self.dead.sum()),
            spare_rows_used=self.spare_rows_used,
            spare_cols_used=self.spare_cols_used,
            remapped_links=self.remapped_links,
            extra_link_hops=self.extra_link_hops,
        )


@functools.lru_cache(maxsize=64)
def remap(defects: DefectMap, rows: int, cols: int) -> Remap:
    """The remap of `defects` for a logical rows x cols grid (module docstring). Cached: a spec's remap is computed
    once.

    Raises:
      DefectError: a defect outside the physical grid, or more rows with more dead cores than spare columns than
        there are spare rows (the message names the rows and the spares that would be enough).
    """
    pr, pc = defects.physical_shape(rows, cols)
    for r, c in defects.dead_cores:
        if not (0 <= r < pr and 0 <= c < pc):
            raise DefectError(
                f"dead core ({r}, {c}) is outside the physical {pr} x {pc} grid ({rows} x {cols} logical + "
                f"{defects.spare_rows} spare rows, {defects.spare_cols} spare columns)"
            )
    for r, c, d in defects.dead_links:
        r1, c1 = (r, c + 1) if d == "E" else (r + 1, c)
        if not (0 <= r < pr and 0 <= c < pc and 0 <= r1 < pr and 0 <= c1 < pc):
            raise DefectError(f"dead link ({r}, {c}, {d!r}) does not join two cores of the physical {pr} x {pc} grid")
    dead = np.zeros((pr, pc), bool)
    for r, c in defects.retired():
        dead[r, c] = True
    per_row = dead.sum(axis=1)
    usable = np.nonzero(per_row <= defects.spare_cols)[0]
    if len(usable) < rows:
        bad = np.nonzero(per_row > defects.spare_cols)[0]
        worst = int(per_row.max())
        raise DefectError(
            f"the defects cannot be remapped: physical rows {bad.tolist()[:10]}{' ...' if len(bad) > 10 else ''} have "
            f"more dead cores (up to {worst}) than the {defects.spare_cols} spare columns, and retiring those "
            f"{len(bad)} rows needs more than the {defects.spare_rows} spare rows; give spare_cols >= {worst} or "
            f"spare_rows >= {len(bad)}, or fewer defects",
            rows=bad.tolist(),
            needed_spare_cols=worst,
            needed_spare_rows=len(bad),
        )
    row_of = usable[:rows].astype(np.int64)
    retired_rows = tuple(int(r) for r in range(int(row_of[-1]) + 1 if rows else 0) if r not in set(row_of.tolist()))
    col_of = np.stack([np.nonzero(~dead[r])[0][:cols] for r in row_of]).astype(np.int64)
    row_prefix = (col_of - np.arange(cols)[None, :]).astype(np.float64)
    extra_e = np.zeros((rows, cols))
    extra_e[:, :-1] = np.diff(col_of, axis=1) - 1
    extra_s = np.zeros((rows, cols))
    # a link's hops: the larger of its rows and columns (diagonal redundant links, module docstring)
    extra_s[:-1] = np.maximum(np.diff(row_of)[:, None], np.abs(np.diff(col_of, axis=0))) - 1
    col_prefix = np.zeros((rows, cols))
    col_prefix[1:] = np.cumsum(extra_s[:-1], axis=0)
    for a in (row_prefix, col_prefix, extra_e, extra_s, row_of, col_of, dead):
        a.setflags(write=False)
    return Remap(
        defects, rows, cols, pr, pc, dead, row_of, col_of, retired_rows, row_prefix, col_prefix, extra_e, extra_s
    )


def remap_of(spec) -> Remap | None:
    """The spec's remap, or None for a spec without a defect map."""
    dm = getattr(spec, "defects", None)
    return None if dm is None else remap(dm, spec.rows, spec.cols)


# ---- the rule: extra hops of paths ----------------------------------------------------------------------------------


def _ns(*xs):
    """jax.numpy if any argument is a JAX array or tracer, else NumPy (wafer/cost.py's test)."""
    if any(type(x).__module__.startswith("jax") for x in xs):
        import jax.numpy as jnp

        return jnp
    return np


def _index(x, n, ns):
    """Integer grid index of a (possibly float, possibly traced) coordinate, clipped into [0, n)."""
    return ns.clip(ns.round(ns.asarray(x, dtype=float) if ns is np else x), 0, n - 1).astype(np.int32)


def row_extra(rm: Remap, r, a, b):
    """Extra hops along logical row r from column a to column b (either order). Array-generic (NumPy or JAX, any
    broadcastable shapes; float coordinates are rounded to the grid)."""
    ns = _ns(r, a, b)
    r, a, b = _index(r, rm.rows, ns), _index(a, rm.cols, ns), _index(b, rm.cols, ns)
    p = ns.asarray(rm.row_prefix)
    return ns.abs(p[r, b] - p[r, a])


def col_extra(rm: Remap, c, a, b):
    """Extra hops along logical column c from row a to row b (either order). Array-generic, as `row_extra`."""
    ns = _ns(c, a, b)
    c, a, b = _index(c, rm.cols, ns), _index(a, rm.rows, ns), _index(b, rm.rows, ns)
    p = ns.asarray(rm.col_prefix)
    return ns.abs(p[b, c] - p[a, c])


def lane_extra(rm: Remap, r0, c0, r1, c1):
    """Extra hops of a lane from (r0, c0) along row r0 to (r0, c1), then along column c1 to (r1, c1): its row leg's
    and its column leg's. Array-generic."""
    return row_extra(rm, r0, c0, c1) + col_extra(rm, c1, r0, r1)


def lane_hops(rm: Remap | None, lanes) -> np.ndarray:
    """Physical hops of lanes [k, 4] (row0, col0, row1, col1): logical hops + `lane_extra` (logical hops alone
    without a remap). NumPy, [k]."""
    lanes = np.asarray(lanes, np.int64).reshape(-1, 4)
    r0, c0, r1, c1 = lanes.T
    logical = (np.abs(c1 - c0) + np.abs(r1 - r0)).astype(np.float64)
    if rm is None or not len(lanes):
        return logical
    return logical + lane_extra(rm, r0, c0, r1, c1)


def growth(rm: Remap | None, lanes) -> float:
    """How many hops the longest of `lanes` grows by on the physical grid: max(lane_hops) - max(logical hops).

    A fabric phase's latency term is its longest stream's hops (wafer/cost.py); `lanes` are the paths whose lengths
    set it (a multicast's lanes from its source to both ends of its line, a chain's whole line, a route's lanes), so
    the phase's hops on a defective wafer are its hops plus this."""
    lanes = np.asarray(lanes, np.int64).reshape(-1, 4)
    if rm is None or not len(lanes):
        return 0.0
    return float(lane_hops(rm, lanes).max() - lane_hops(None, lanes).max())


def line_extra(rm: Remap, axis: int, row, col, height, width):
    """The most extra hops of any line of a rectangle from end to end: along its rows (axis=1: from column col to
    col + width - 1, over rows row..row + height - 1) or down its columns (axis=0). Array-generic over rectangles
    (any broadcastable shapes of row, col, height, width; float values are rounded to the grid, so on a relaxed
    layout this is piecewise constant, without a gradient). What a line transfer spanning the rectangle (a
    multicast from an end, a reduction to an end) takes more than its logical hops."""
    ns = _ns(row, col, height, width)
    if axis == 1:
        lines = ns.arange(rm.rows)
        lo, n = row, height
        vals = row_extra(rm, lines, ns.asarray(col)[..., None], (ns.asarray(col) + width - 1)[..., None])
    else:
        lines = ns.arange(rm.cols)
        lo, n = col, width
        vals = col_extra(rm, lines, ns.asarray(row)[..., None], (ns.asarray(row) + height - 1)[..., None])
    lo = ns.asarray(lo)[..., None]
    inside = (lines >= lo - 0.5) & (lines < lo + ns.asarray(n)[..., None] - 0.5)
    return ns.max(ns.where(inside, vals, 0.0), axis=-1)


def line_lanes(h: int, w: int, axis: int, a: int, b: int) -> np.ndarray:
    """Lanes [lines, 4] from index a to index b along `axis` in every line of an h x w region at (0, 0)."""
    if axis == 1:
        r = np.arange(h)
        return np.stack([r, np.full(h, a), r, np.full(h, b)], axis=1).astype(np.int64)
    c = np.arange(w)
    return np.stack([np.full(w, a), c, np.full(w, b), c], axis=1).astype(np.int64)


def window_lanes(h: int, w: int, axis: int, span: int) -> np.ndarray:
    """Lanes of every stream `span` hops long along `axis` inside an h x w region at (0, 0) (a shift's, a halo's)."""
    n = (h, w)[axis]
    if span <= 0 or span >= n:
        return np.zeros((0, 4), np.int64)
    return np.concatenate([line_lanes(h, w, axis, s, s + span) for s in range(n - span)])
