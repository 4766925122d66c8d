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

DIRECTIONS = ("N", "E", "S", "W")
_DIR = {d: i for i, d in enumerate(DIRECTIONS)}
# (grid axis, sign): data moving east goes to higher column indices.
_AXIS = {"N": (0, -1), "S": (0, +1), "W": (1, -1), "E": (1, +1)}


@dataclasses.dataclass(frozen=True, eq=False)
class Phase:
    """Transfers that run at the same time: their link loads add up (contention), their cycles do not.

    Attributes:
      parts: ((row0, col0, words[4, h, w]), ...) link loads of regions at their grid origins.
      hops: the longest route, in hops.
    """

    parts: tuple = ()
    hops: int = 0

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
        return Phase(self.parts + other.parts, max(self.hops, other.hops))

    def at(self, row: int, col: int) -> Phase:
        return Phase(tuple((r0 + row, c0 + col, w) for r0, c0, w in self.parts), self.hops)


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
                Phase(tuple((r0 + r, c0 + c, w) for r, c in offsets for r0, c0, w in p.parts), p.hops)
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


def _phase_from_line(h, w, axis, plus, minus, hops) -> Phase:
    """Broadcast per-line link loads over the other grid axis into a [4, h, w] record."""
    words = np.zeros((4, h, w))
    if axis == 0:
        words[_DIR["S"]] = plus[:, None]
        words[_DIR["N"]] = minus[:, None]
    else:
        words[_DIR["E"]] = plus[None, :]
        words[_DIR["W"]] = minus[None, :]
    return Phase(((0, 0, words),), int(hops))


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


def _reduce_traffic(shape, axis, d, words) -> Phase:
    n = shape[axis]
    idx = np.arange(n)
    # Partial results flow towards d along a chain: each core adds what arrives to its own and passes it on,
    # so each link towards d carries one stream of `words`.
    plus = np.where(idx < d, float(words), 0.0)
    minus = np.where(idx > d, float(words), 0.0)
    return _phase_from_line(shape[0], shape[1], axis, plus, minus, max(d, n - 1 - d))


_REDUCE_OPS = {"sum": jnp.sum, "max": jnp.max, "min": jnp.min}


def reduce(x, axis, op: str = "sum", *, to=0):
    """Reduce along a row or column, to one core or to every core (allreduce).

    Args:
      x: core-grid array [h, w, ...].
      axis: 0 / "col" (reduce each column) or 1 / "row" (reduce each row).
      op: "sum", "max" or "min".
      to: index along `axis` of the core that receives the result ("first"/"last" or an edge name allowed),
        or "all": the result is reduced to the middle core and multicast back, so every core holds it.
    Returns:
      (y, traffic): with `to` an index, y has size 1 along `axis` (the value at core `to`); with "all", y has
      x's shape.
    """
    _check_grid(x, "reduce")
    axis = _axis(axis)
    if op not in _REDUCE_OPS:
        raise ValueError(f"reduce: op must be one of {tuple(_REDUCE_OPS)}, got {op!r}")
    n = x.shape[axis]
    words = words_per_core(x)
    y = _REDUCE_OPS[op](x, axis=axis, keepdims=True)
    if to == "all":
        d = (n - 1) // 2
        traffic = Traffic((_reduce_traffic(x.shape, axis, d, words),)) if n > 1 else Traffic.none()
        out, back = multicast(jnp.broadcast_to(y, x.shape), axis, src=d)
        return out, traffic + back
    d = _index(to, n, "reduce `to`")
    traffic = Traffic((_reduce_traffic(x.shape, axis, d, words),)) if n > 1 else Traffic.none()
    return y, traffic


def allreduce(x, axis, op: str = "sum"):
    """`reduce(x, axis, op, to="all")`."""
    return reduce(x, axis, op, to="all")


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
