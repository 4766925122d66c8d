"""The fabric: moving data between cores over the 2D mesh, and what it costs.

Every core's router has four links (N, E, S, W), each carrying one 32-bit wavelet per cycle per direction
[SDK]. The primitives here work on *core-grid arrays*: arrays whose two leading axes are the core rows and
columns of a region, `[h, w, ...]`, the trailing axes being what each core holds. Each returns the moved data
and a `Traffic` record: how many words each core sends on each of its outgoing links (forwarded words
included), and how many hops the longest route takes. Traffic depends only on shapes, so it is computed with
NumPy while tracing and is free at run time; `wafer.step` charges it to the state once per step.

The data movement is plain array code (pad, slice, broadcast, sum), so every primitive is differentiable and,
when the state is placed on a device mesh, XLA's SPMD partitioner turns the shifts into collective permutes.

Directions name where data *goes*: `shift(x, "E")` moves every core's data one core east, so a core receives
what its west neighbour held. Cores that receive from outside the region get `fill`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from wafer import cost
from wafer.kernel import KernelCost, dtype_class
from wafer.memory import Rect

DIRECTIONS = ("N", "E", "S", "W")
_DIR = {d: i for i, d in enumerate(DIRECTIONS)}
# (grid axis, sign): data moving east goes to higher column indices.
_AXIS = {"N": (0, -1), "S": (0, +1), "W": (1, -1), "E": (1, +1)}


@dataclasses.dataclass(frozen=True, eq=False)
class Phase:
    """Transfers that run at the same time: their link loads add up (contention), their cycles do not.

    Attributes:
      parts: ((row0, col0, words[4, h, w]), ...) link loads of regions at their grid origins.
      hops: the longest route, in hops (for a pipelined chain of cores, the whole chain).
      depth: receive-combine-send stages on the critical path (a core that takes a stream off its ramp, adds
        its own data and sends the result on); 0 for pure routing (shifts, multicasts, all-to-all). Recorded
        for cost models that charge a per-stage latency (Luczynski et al.'s (2 T_R + 1) D term, HPDC'24);
        today's rules (wafer/cost.py) do not use it.
    """

    parts: tuple = ()
    hops: int = 0
    depth: int = 0

    def link_words(self, rows: int, cols: int) -> np.ndarray:
        out = np.zeros((4, rows, cols), np.float64)
        for r0, c0, words in self.parts:
            _, h, w = words.shape
            if r0 < 0 or c0 < 0 or r0 + h > rows or c0 + w > cols:
                raise ValueError(f"traffic of a {h}x{w} region at ({r0},{c0}) falls outside the {rows}x{cols} grid")
            out[:, r0 : r0 + h, c0 : c0 + w] += words
        return out

    @property
    def max_link_words(self) -> float:
        if not self.parts:
            return 0.0
        if len(self.parts) == 1:
            return float(self.parts[0][2].max())
        r_hi = max(r0 + w.shape[1] for r0, _, w in self.parts)
        c_hi = max(c0 + w.shape[2] for _, c0, w in self.parts)
        r_lo = min(r0 for r0, _, _ in self.parts)
        c_lo = min(c0 for _, c0, _ in self.parts)
        shifted = Phase(tuple((r0 - r_lo, c0 - c_lo, w) for r0, c0, w in self.parts), self.hops)
        return float(shifted.link_words(r_hi - r_lo, c_hi - c_lo).max())

    def __or__(self, other: Phase) -> Phase:
        return Phase(self.parts + other.parts, max(self.hops, other.hops), max(self.depth, other.depth))

    def at(self, row: int, col: int) -> Phase:
        return Phase(tuple((r0 + row, c0 + col, w) for r0, c0, w in self.parts), self.hops, self.depth)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, eq=False)
class Traffic:
    """The communication of a step: phases that run one after another.

    `a | b` runs a and b at the same time (phase by phase; shared links add up), `a + b` runs b after a.
    `traffic.at(row, col)` moves a region-local record to the region's place on the grid.
    """

    phases: tuple[Phase, ...] = ()

    @staticmethod
    def none() -> Traffic:
        return Traffic(())

    def __or__(self, other: Traffic) -> Traffic:
        n = max(len(self.phases), len(other.phases))
        a = self.phases + (Phase(),) * (n - len(self.phases))
        b = other.phases + (Phase(),) * (n - len(other.phases))
        return Traffic(tuple(p | q for p, q in zip(a, b)))

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.phases + other.phases)

    def at(self, row: int, col: int) -> Traffic:
        return Traffic(tuple(p.at(row, col) for p in self.phases))

    def replicate(self, offsets) -> Traffic:
        """The same traffic run at once by copies of a region at each (row, col) offset (e.g. groups of cores
        doing the same work on different data)."""
        offsets = [(int(r), int(c)) for r, c in offsets]
        return Traffic(
            tuple(
                Phase(tuple((r0 + r, c0 + c, w) for r, c in offsets for r0, c0, w in p.parts), p.hops, p.depth)
                for p in self.phases
            )
        )

    def link_words(self, rows: int, cols: int) -> np.ndarray:
        """Words sent per core per direction, `[4, rows, cols]`, over all phases."""
        out = np.zeros((4, rows, cols), np.float64)
        for p in self.phases:
            out += p.link_words(rows, cols)
        return out

    @property
    def words(self) -> float:
        """Total words crossing links (a word crossing k links counts k times)."""
        return float(sum(w.sum() for p in self.phases for _, _, w in p.parts))

    @property
    def hops(self) -> int:
        return sum(p.hops for p in self.phases)

    @property
    def depth(self) -> int:
        """Receive-combine-send stages on the critical path, over all phases (see `Phase.depth`)."""
        return sum(p.depth for p in self.phases)

    def cycles(self, spec):
        """Cycles on `spec`: per phase, busiest link x word time + longest route x hop latency; phases add."""
        total = 0.0
        for p in self.phases:
            if p.parts:
                total = total + cost.transfer_cycles(spec, p.max_link_words, p.hops)
        return total


def words_per_core(x) -> int:
    """32-bit words each core holds of a core-grid array `[h, w, ...]`."""
    return -(-math.prod(x.shape[2:]) * np.dtype(x.dtype).itemsize // 4)


def _check_grid(x, name):
    if jnp.ndim(x) < 2:
        raise ValueError(f"{name}: expected a core-grid array [h, w, ...], got shape {jnp.shape(x)}")


def _direction(d):
    if d not in _DIR:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {d!r}")
    return d


def _line_loads(n: int, src: np.ndarray, dst: np.ndarray, words: int) -> tuple[np.ndarray, np.ndarray]:
    """Loads of the + and - links along a line of n cores when each src[i] sends `words` to dst[i].

    A core's outgoing + link carries every transfer with src <= core < dst; its - link every one with
    dst < core <= src. Returns (plus[n], minus[n]).
    """
    plus = np.zeros(n + 1)
    minus = np.zeros(n + 1)
    fwd = dst > src
    np.add.at(plus, src[fwd], words)
    np.add.at(plus, dst[fwd], -words)
    bwd = dst < src
    np.add.at(minus, dst[bwd] + 1, words)
    np.add.at(minus, src[bwd] + 1, -words)
    return np.cumsum(plus)[:n], np.cumsum(minus)[:n]


def _phase_from_line(h, w, axis, plus, minus, hops, depth=0) -> Phase:
    """Broadcast per-line link loads over the other grid axis into a [4, h, w] record."""
    words = np.zeros((4, h, w))
    if axis == 0:
        words[_DIR["S"]] = plus[:, None]
        words[_DIR["N"]] = minus[:, None]
    else:
        words[_DIR["E"]] = plus[None, :]
        words[_DIR["W"]] = minus[None, :]
    return Phase(((0, 0, words),), int(hops), int(depth))


def _shift_data(x, axis, k, fill):
    """x moved k cores along `axis` (k > 0: towards higher indices), `fill` entering at the edge."""
    n = x.shape[axis]
    if abs(k) >= n:
        return jnp.full_like(x, fill)
    pad = [(0, 0)] * x.ndim
    if k > 0:
        kept = jax.lax.slice_in_dim(x, 0, n - k, axis=axis)
        pad[axis] = (k, 0)
    else:
        kept = jax.lax.slice_in_dim(x, -k, n, axis=axis)
        pad[axis] = (0, -k)
    return jnp.pad(kept, pad, constant_values=fill)


def _shift_traffic(shape, axis, k, words) -> Traffic:
    h, w = shape[:2]
    n = shape[axis]
    src = np.arange(n)
    dst = src + k
    ok = (dst >= 0) & (dst < n)
    if not ok.any():
        return Traffic.none()
    plus, minus = _line_loads(n, src[ok], dst[ok], words)
    return Traffic((_phase_from_line(h, w, axis, plus, minus, abs(k)),))


def shift(x, direction: str, k: int = 1, *, fill=0.0):
    """Move every core's data `k` hops in `direction`.

    Args:
      x: core-grid array [h, w, ...].
      direction: "N", "E", "S" or "W": where the data goes.
      k: hops (>= 0). Words from cores within k of the far edge leave the region and are dropped there
        (they are not charged); cores within k of the near edge receive `fill`.
    Returns:
      (y, traffic): y[r, c] = x[r - k, c] for "S" (and likewise), same shape as x.
    """
    _check_grid(x, "shift")
    _direction(direction)
    if int(k) != k or k < 0:
        raise ValueError(f"shift: k must be a non-negative int (hops), got {k!r}")
    k = int(k)
    if k == 0:
        return x, Traffic.none()
    axis, sign = _AXIS[direction]
    y = _shift_data(x, axis, sign * k, fill)
    return y, _shift_traffic(x.shape, axis, sign * k, words_per_core(x))


def _index(src, n, what):
    if isinstance(src, str):
        src = {"first": 0, "last": n - 1, "N": 0, "W": 0, "S": n - 1, "E": n - 1}.get(src, src)
    if isinstance(src, str) or int(src) != src or not -n <= src < n:
        raise ValueError(
            f"{what} must be a core index in [-{n}, {n - 1}] or 'first'/'last' "
            f"(or an edge 'N'/'S'/'W'/'E'), got {src!r}"
        )
    return int(src) % n


def _axis(axis):
    axis = {"col": 0, "column": 0, "row": 1, 0: 0, 1: 1}.get(axis, None)
    if axis is None:
        raise ValueError(
            "axis must be 0 / 'col' (along a column, data moves N-S) or 1 / 'row' (along a row, data moves E-W)"
        )
    return axis


def multicast(x, axis, *, src=0):
    """Send core `src`'s data to every core of its row (axis=1 / "row") or column (axis=0 / "col").

    The router at each core delivers the wavelet to its own core and forwards it, so one stream leaves `src`
    in each direction: every link between src and the ends of the line carries the data once.

    Args:
      x: core-grid array [h, w, ...]; only the slice at `src` along `axis` is read.
      axis: 0 / "col" or 1 / "row".
      src: index along `axis` (negative counts from the end, "first"/"last" name the edges).
    Returns:
      (y, traffic): y has x's shape and y[r, c] = x[r, src] for axis=1.
    """
    _check_grid(x, "multicast")
    axis = _axis(axis)
    n = x.shape[axis]
    s = _index(src, n, "multicast src")
    line = jax.lax.slice_in_dim(x, s, s + 1, axis=axis)
    y = jnp.broadcast_to(line, x.shape)
    words = words_per_core(x)
    idx = np.arange(n)
    plus = np.where(idx >= s, words, 0.0) * (idx < n - 1)
    minus = np.where(idx <= s, words, 0.0) * (idx > 0)
    hops = max(s, n - 1 - s)
    traffic = Traffic((_phase_from_line(*x.shape[:2], axis, plus, minus, hops),)) if n > 1 else Traffic.none()
    return y, traffic


# ---- reductions --------------------------------------------------------------------------------------------------
#
# A reduction along a line of n cores to core d runs as two concurrent one-sided reductions: cores 0..d send
# towards d on the + links (E / S), cores d..n-1 towards d on the - links (W / N), d combining both. Each side is a
# line of m cores whose root sits at its end; `j` below is a core's distance from the root (0 = root). The
# patterns are the ones Luczynski et al. compare on the WSE ("Near-Optimal Wafer-Scale Reduce", HPDC'24,
# arXiv 2404.15888; see docs/fidelity.md):
#   chain      every core adds what arrives from behind it to its own data and forwards the sum: one pipelined
#              stream, B words on every link, depth m - 1. This is the pattern `reduce` always used.
#   star       every core sends its data straight to the root, which adds the streams as they arrive: the link
#              next to the root carries (m - 1) B words; depth 1.
#   tree       binomial tree: in round k the cores at j = 2^k (mod 2^(k+1)) send to j - 2^k, which adds:
#              ceil(log2 m) rounds of B words on disjoint paths of 2^k hops; depth 1 per round.
#   two_phase  chains within groups of `group` consecutive cores towards each group's core nearest the root
#              (its leader), then one chain through the leaders to the root: B words per link in each phase.

REDUCE_PATTERNS = ("chain", "star", "tree", "two_phase")


def _check_pattern(pattern):
    if pattern not in REDUCE_PATTERNS:
        raise ValueError(f"reduce: pattern must be one of {REDUCE_PATTERNS}, got {pattern!r}")


def default_group(n: int) -> int:
    """The two-phase group size used when none is given: round(sqrt(n)) cores (at least 1), which balances the
    two chains' lengths (about n / group leaders against group cores)."""
    return max(1, int(round(math.sqrt(n))))


def _group(group, n):
    if group is None:
        return default_group(n)
    if isinstance(group, bool) or int(group) != group or group < 1:
        raise ValueError(f"reduce: group must be an int >= 1 (cores per two-phase group), got {group!r}")
    return int(group)


def _side_phases(m: int, pattern: str, group: int):
    """Per-phase loads of a one-sided reduction of m cores towards its root at j = 0.

    Returns a list of (load[m], hops, depth): load[j] is the words, in units of one core's data, on the link
    from the core at distance j to the one at j - 1 (load[0] is unused).
    """
    if m <= 1:
        return []
    j = np.arange(m)
    if pattern == "chain":
        return [(np.where(j >= 1, 1.0, 0.0), m - 1, m - 1)]
    if pattern == "star":
        return [(np.where(j >= 1, (m - j).astype(float), 0.0), m - 1, 1)]
    if pattern == "tree":
        phases = []
        k = 0
        while (1 << k) < m:
            step = 1 << k
            load = np.zeros(m)
            for src in range(step, m, 2 * step):  # senders at j = step (mod 2 step), each to j - step
                load[src - step + 1 : src + 1] += 1.0
            phases.append((load, step, 1))
            k += 1
        return phases
    # two_phase
    s = group
    phases = []
    inner = np.where(j % s != 0, 1.0, 0.0)
    if inner.any():
        phases.append((inner, min(s, m) - 1, min(s, m) - 1))
    leaders = -(-m // s)
    if leaders > 1:
        far = (leaders - 1) * s
        phases.append((np.where((j >= 1) & (j <= far), 1.0, 0.0), far, leaders - 1))
    return phases


def _side_receives(m: int, pattern: str, group: int) -> np.ndarray:
    """How many incoming partial results the core at distance j (0..m-1) from the root adds to its own."""
    j = np.arange(m)
    if m <= 1:
        return np.zeros(m)
    if pattern == "chain":
        return np.where(j < m - 1, 1.0, 0.0)
    if pattern == "star":
        return np.where(j == 0, float(m - 1), 0.0)
    if pattern == "tree":
        out = np.zeros(m)
        k = 0
        while (1 << k) < m:
            step = 1 << k
            out += np.where((j % (2 * step) == 0) & (j + step < m), 1.0, 0.0)
            k += 1
        return out
    s = group
    first = np.where(((j + 1) % s != 0) & (j + 1 < m), 1.0, 0.0)  # from j + 1 in the same group
    second = np.where((j % s == 0) & (j + s < m), 1.0, 0.0)  # a leader, from the next leader out
    return first + second


def _line_reduce(n: int, d: int, pattern: str, group: int):
    """Phases of a reduction along a line of n cores to core d, as (plus[n], minus[n], hops, depth) in units of
    one core's data, and receives[n]: incoming partials each core adds."""
    left = _side_phases(d + 1, pattern, group)  # cores d, d-1, ..., 0 at j = 0, 1, ..., d: + links
    right = _side_phases(n - d, pattern, group)  # cores d, d+1, ..., n-1: - links
    phases = []
    for k in range(max(len(left), len(right))):
        plus, minus, hops, depth = np.zeros(n), np.zeros(n), 0, 0
        if k < len(left):
            load, h, dep = left[k]
            plus[d - np.arange(1, d + 1)] = load[1:]  # the link from j to j - 1 leaves core d - j eastwards
            hops, depth = max(hops, h), max(depth, dep)
        if k < len(right):
            load, h, dep = right[k]
            minus[d + np.arange(1, n - d)] = load[1:]
            hops, depth = max(hops, h), max(depth, dep)
        phases.append((plus, minus, hops, depth))
    receives = np.zeros(n)
    receives[d::-1] += _side_receives(d + 1, pattern, group)
    receives[d:] += _side_receives(n - d, pattern, group)
    return phases, receives


def _reduce_traffic(shape, axis, d, words, pattern="chain", group=None) -> Traffic:
    n = shape[axis]
    phases, _ = _line_reduce(n, d, pattern, _group(group, n))
    return Traffic(
        tuple(_phase_from_line(shape[0], shape[1], axis, p * words, m * words, h, dep) for p, m, h, dep in phases)
    )


_REDUCE_OPS = {"sum": jnp.sum, "max": jnp.max, "min": jnp.min}


def _root(to, n):
    return (n - 1) // 2 if to == "all" else _index(to, n, "reduce `to`")


def reduce_adds(shape, dtype, axis, op: str = "sum", *, to=0, pattern: str = "chain", group=None):
    """The arithmetic a reduction performs, as cost records of the cores that do it.

    A reduction is not free for the cores it passes through: each core that takes a partial result off the
    fabric adds (or maxes) it into its own data, one ALU operation per element, reading its own operand from
    SRAM and writing the result back while the other operand streams in from the fabric (the SDK's reductions
    are `@fadds(mem, mem, fabin)` instructions). The count depends on the pattern: in a chain every core but
    the farthest adds once, in a star the root adds n - 1 times, in a tree the cores at even positions add once
    per round. Put these records in the superstep of the reduction, next to its traffic:
    `wafer.superstep(*adds, traffic)` (or `reduce(..., return_adds=True)` gives them with the data).

    Args:
      shape: the core-grid shape [h, w, ...] being reduced; dtype: its element type.
      axis, op, to, pattern, group: as in `reduce`.
    Returns:
      tuple of KernelCost, one per distinct number of adds, each on the region at (0, 0) with a `mask` of the
      cores that do that many (`.at(row, col)` places them, like `Traffic.at`); empty when nothing is added.
    """
    axis = _axis(axis)
    if op not in _REDUCE_OPS:
        raise ValueError(f"reduce: op must be one of {tuple(_REDUCE_OPS)}, got {op!r}")
    _check_pattern(pattern)
    h, w = int(shape[0]), int(shape[1])
    n = (h, w)[axis]
    _, receives = _line_reduce(n, _root(to, n), pattern, _group(group, n))
    elements = math.prod(shape[2:])
    itemsize = np.dtype(dtype).itemsize
    cls = dtype_class(dtype)
    out = []
    for count in sorted(set(receives[receives > 0].tolist())):
        line = receives == count
        mask = np.broadcast_to(line[:, None] if axis == 0 else line[None, :], (h, w)).copy()
        ops = count * elements
        out.append(KernelCost(Rect(0, 0, h, w), {("alu", cls): ops}, ops * itemsize, ops * itemsize, mask))
    return tuple(out)


def reduce(x, axis, op: str = "sum", *, to=0, pattern: str = "chain", group=None, return_adds: bool = False):
    """Reduce along a row or column, to one core or to every core (allreduce).

    Args:
      x: core-grid array [h, w, ...].
      axis: 0 / "col" (reduce each column) or 1 / "row" (reduce each row).
      op: "sum", "max" or "min".
      to: index along `axis` of the core that receives the result ("first"/"last" or an edge name allowed),
        or "all": the result is reduced to the middle core and multicast back, so every core holds it.
      pattern: how the partial results travel (Luczynski et al., HPDC'24): "chain" (the default, and what this
        primitive always did), "star", "tree" or "two_phase"; see `REDUCE_PATTERNS` and the comment above it.
      group: cores per group of the "two_phase" pattern (default `default_group(n)`); ignored otherwise.
      return_adds: also return the cost records of the adds (`reduce_adds`).
    Returns:
      (y, traffic), or (y, traffic, adds) with return_adds: with `to` an index, y has size 1 along `axis` (the
      value at core `to`); with "all", y has x's shape. The values do not depend on the pattern beyond
      floating-point summation order.
    """
    _check_grid(x, "reduce")
    axis = _axis(axis)
    if op not in _REDUCE_OPS:
        raise ValueError(f"reduce: op must be one of {tuple(_REDUCE_OPS)}, got {op!r}")
    _check_pattern(pattern)
    n = x.shape[axis]
    words = words_per_core(x)
    d = _root(to, n)
    y = _REDUCE_OPS[op](x, axis=axis, keepdims=True)
    traffic = _reduce_traffic(x.shape, axis, d, words, pattern, group) if n > 1 else Traffic.none()
    if to == "all":
        y, back = multicast(jnp.broadcast_to(y, x.shape), axis, src=d)
        traffic = traffic + back
    if not return_adds:
        return y, traffic
    return y, traffic, reduce_adds(x.shape, x.dtype, axis, op, to=to, pattern=pattern, group=group)


def allreduce(x, axis, op: str = "sum", *, pattern: str = "chain", group=None, return_adds: bool = False):
    """`reduce(x, axis, op, to="all", pattern=..., group=..., return_adds=...)`: reduce to the middle core in
    the given pattern, then multicast the result back along the line."""
    return reduce(x, axis, op, to="all", pattern=pattern, group=group, return_adds=return_adds)


def halo_exchange(x, radius: int = 1, *, fill=0.0):
    """Every core receives the data of its neighbours up to `radius` hops away in each direction.

    Each core sends one stream in each of the four directions; routers deliver it at every core it passes
    for `radius` hops, so each link carries `radius` streams (its own and those passing through).

    Args:
      x: core-grid array [h, w, ...].
      radius: hops (>= 1).
    Returns:
      (halo, traffic): halo = {"N": ..., "S": ..., "E": ..., "W": ...}, where halo["N"] holds what the
      neighbours to the north hold: halo["N"][r, c] = x[r - 1, c] (`fill` beyond the region). With radius 1
      each value has x's shape; with radius > 1 it is stacked [radius, h, w, ...], entry j being j+1 hops away.
    """
    _check_grid(x, "halo_exchange")
    if int(radius) != radius or radius < 1:
        raise ValueError(f"halo_exchange: radius must be an int >= 1, got {radius!r}")
    radius = int(radius)
    # "N" is what comes from the north, i.e. data moving south.
    moving = {"N": "S", "S": "N", "E": "W", "W": "E"}
    halo = {}
    traffic = Traffic.none()
    words = words_per_core(x)
    for side, d in moving.items():
        axis, sign = _AXIS[d]
        vals = [_shift_data(x, axis, sign * j, fill) for j in range(1, radius + 1)]
        halo[side] = vals[0] if radius == 1 else jnp.stack(vals)
        traffic = traffic | _halo_traffic(x.shape, axis, sign, radius, words)
    return halo, traffic


def _halo_traffic(shape, axis, sign, radius, words) -> Traffic:
    n = shape[axis]
    # core i's outgoing link towards `sign` carries the streams of sources i-radius+1..i (in the direction of
    # travel) that still have a destination inside the region.
    idx = np.arange(n)
    load = np.zeros(n)
    for j in range(radius):  # source j hops behind core i, still travelling
        src = idx - sign * j
        ok = (src >= 0) & (src < n) & (idx + sign >= 0) & (idx + sign < n)
        load += np.where(ok, words, 0.0)
    plus, minus = (load, np.zeros(n)) if sign > 0 else (np.zeros(n), load)
    if not load.any():
        return Traffic.none()
    return Traffic((_phase_from_line(shape[0], shape[1], axis, plus, minus, min(radius, n - 1)),))


# ---- all-to-all ----------------------------------------------------------------------------------------------------
#
# The personalized exchange along a line that a distributed transpose needs (the 3D FFT's redistributions,
# Orenes-Vera et al., ICS'23): core s holds one block for every core d of its line and sends block d to core d.
# Patterns:
#   relay         the WSE way, as Cerebras's published 2D FFT (csl-examples benchmarks/FFT, ucode_2d.csl) routes
#                 its transposes: one colour per direction; the cores take turns, each streaming the blocks for
#                 the cores beyond it, and every router both forwards the stream to the end of the line and
#                 delivers it to its own core, whose filter keeps the block addressed to it. Streams run to the
#                 line's end, so the link into the last core carries n (n - 1) / 2 blocks.
#   relay_padded  the same, with every core sending n - 1 blocks in each direction, as that code does (its
#                 comment: a filter-update limitation of CSL at the time): (n - 1)^2 blocks on the last link.
#   direct        every block takes its own shortest route and stops at its destination (a routing the WSE's 24
#                 colours cannot give a long line; a lower bound): the middle link carries floor(n/2) ceil(n/2).

ALL_TO_ALL_PATTERNS = ("relay", "relay_padded", "direct")


def _all_to_all_line(n: int, pattern: str):
    """(plus[n], minus[n]) link loads, in blocks, of an all-to-all along a line of n cores."""
    idx = np.arange(n, dtype=float)
    if pattern == "direct":
        return (idx + 1) * (n - 1 - idx), idx * (n - idx)
    if pattern == "relay":
        east = np.cumsum(n - 1 - idx)  # sources 0..i each send the blocks for the n - 1 - s cores east of them
        west = np.cumsum(idx[::-1])[::-1]  # sources i..n-1 each send s blocks westwards
        return east * (idx < n - 1), west * (idx > 0)
    return (idx + 1) * (n - 1) * (idx < n - 1), (n - idx) * (n - 1) * (idx > 0)


def all_to_all(x, axis, *, pattern: str = "relay"):
    """Personalized all-to-all along every row (axis=1 / "row") or column (axis=0 / "col") of a region.

    Core i of a line holds n blocks, `x[..., b, ...]` for b = 0..n-1 along the first per-core axis; block b goes
    to core b of the same line, which stores it at position i. Over a region this transposes the core axis with
    that per-core axis: the redistribution between the passes of a pencil-decomposed FFT.

    Args:
      x: core-grid array [h, w, n, *block] with n equal to the line's length (x.shape[axis]).
      axis: 1 / "row" (exchange along each row: y[r, c, b] = x[r, b, c]) or 0 / "col" (along each column:
        y[r, c, b] = x[b, c, r]).
      pattern: "relay" (default: as Cerebras's FFT transposes route it), "relay_padded" or "direct"; see
        `ALL_TO_ALL_PATTERNS` and the comment above it.
    Returns:
      (y, traffic): y has x's shape.
    """
    _check_grid(x, "all_to_all")
    axis = _axis(axis)
    if pattern not in ALL_TO_ALL_PATTERNS:
        raise ValueError(f"all_to_all: pattern must be one of {ALL_TO_ALL_PATTERNS}, got {pattern!r}")
    n = x.shape[axis]
    if x.ndim < 3 or x.shape[2] != n:
        raise ValueError(
            f"all_to_all along axis {axis}: every core must hold one block per core of its line, i.e. x of shape "
            f"[h, w, {n}, *block]; got {tuple(x.shape)}"
        )
    y = jnp.swapaxes(x, axis, 2)
    if n == 1:
        return y, Traffic.none()
    block = -(-math.prod(x.shape[3:]) * np.dtype(x.dtype).itemsize // 4)
    plus, minus = _all_to_all_line(n, pattern)
    return y, Traffic((_phase_from_line(x.shape[0], x.shape[1], axis, plus * block, minus * block, n - 1),))


# ---- closed forms ------------------------------------------------------------------------------------------------
#
# Cycles of each pattern under the cost rules (wafer/cost.py), from the line's length n, the words each core
# contributes (or each block holds) and a spec, without building a record: equal to `traffic.cycles(spec)` of the
# primitive (tests/wafer/test_fabric_patterns.py holds them equal). Written with array arithmetic only, so n and
# words may be Python numbers, NumPy arrays or JAX tracers (a compiler comparing patterns per kernel, a sweep, a
# gradient over spec leaves); the pattern and `to` are static choices.


def _mod(*xs):
    return jnp if any(cost._is_jax(x) for x in xs) else np


def _ind(v):
    """1 where an integer-valued v >= 0 is positive, else 0."""
    return _mod(v).minimum(v, 1)


def _ceil_log2(m):
    """ceil(log2(m)) for m >= 1 (0 for m = 1)."""
    xp = _mod(m)
    return xp.ceil(xp.log2(xp.maximum(m, 1)) - 1e-9)


def _word_time(spec):
    return cost.WORD_BITS / spec.link_bits_per_cycle


def _side_cycles(m, words, spec, pattern, group):
    """Cycles of a one-sided reduction of m cores (root at its end) under the cost rules; m >= 1."""
    xp = _mod(m, words, group)
    b = words * _word_time(spec)
    lat = spec.hop_latency_cycles
    if pattern == "chain":
        return _ind(m - 1) * b + (m - 1) * lat
    if pattern == "star":
        return (m - 1) * b + (m - 1) * lat
    if pattern == "tree":
        k = _ceil_log2(m)
        return k * b + (2.0**k - 1) * lat
    s = xp.minimum(group, m)
    leaders = xp.ceil(m / group)
    first = _ind(s - 1) * b + (s - 1) * lat
    second = _ind(leaders - 1) * (b + (leaders - 1) * group * lat)
    return first + second


def _root_side(n, to):
    """Cores on the longer side of the root, the root included."""
    if isinstance(to, str):
        if to == "all":
            return n - _mod(n).floor((n - 1) / 2)
        if to not in ("first", "last", "N", "W", "S", "E"):
            raise ValueError(f"to must be 'first', 'last', an edge name, 'all' or a core index, got {to!r}")
        return n
    return _mod(n, to).maximum(to + 1, n - to)


def multicast_cycles(n, words, spec, *, src=0):
    """Cycles of `multicast` along a line of n cores from index `src` ("first"/"last" or a number), each core
    receiving `words` words."""
    xp = _mod(n, words, src)
    if isinstance(src, str):
        far = n - 1
    else:
        far = xp.maximum(src, n - 1 - src)
    return _ind(n - 1) * words * _word_time(spec) + far * spec.hop_latency_cycles


def reduce_cycles(n, words, spec, *, pattern: str = "chain", to="last", group=None):
    """Cycles of `reduce(x, axis, op, to=to, pattern=pattern, group=group)` along a line of n cores holding
    `words` words each.

    Args:
      n: cores along the line; words: 32-bit words per core (`words_per_core`).
      spec: a WaferSpec.
      pattern: one of REDUCE_PATTERNS.
      to: "first" / "last" (an end), "all" (allreduce: to the middle core, then multicast back) or a core index.
      group: two-phase group size; default round(sqrt(n)), as the primitive chooses it.
    """
    _check_pattern(pattern)
    if group is None:
        group = _mod(n).maximum(_mod(n).round(_mod(n).sqrt(n)), 1)
    m = _root_side(n, to)  # per phase, the longer side of the root sets the cost (every term grows with m)
    out = _side_cycles(m, words, spec, pattern, group)
    if to == "all":
        out = out + multicast_cycles(n, words, spec, src=_mod(n).floor((n - 1) / 2))
    return out


def allreduce_cycles(n, words, spec, *, pattern: str = "chain", group=None):
    """`reduce_cycles(..., to="all")`."""
    return reduce_cycles(n, words, spec, pattern=pattern, to="all", group=group)


def all_to_all_cycles(n, block_words, spec, *, pattern: str = "relay"):
    """Cycles of `all_to_all` along a line of n cores whose blocks hold `block_words` words each."""
    if pattern not in ALL_TO_ALL_PATTERNS:
        raise ValueError(f"all_to_all: pattern must be one of {ALL_TO_ALL_PATTERNS}, got {pattern!r}")
    xp = _mod(n, block_words)
    if pattern == "direct":
        busiest = xp.floor(n / 2) * xp.ceil(n / 2)
    elif pattern == "relay":
        busiest = n * (n - 1) / 2
    else:
        busiest = (n - 1) ** 2
    return busiest * block_words * _word_time(spec) + (n - 1) * spec.hop_latency_cycles
