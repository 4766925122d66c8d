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

from wafer import cost, defects
from wafer.kernel import KernelCost, dtype_class
from wafer.memory import Rect

DIRECTIONS = ("N", "E", "S", "W")
_DIR = {d: i for i, d in enumerate(DIRECTIONS)}
# (grid axis, sign): data moving east goes to higher column indices.
_AXIS = {"N": (0, -1), "S": (0, +1), "W": (1, -1), "E": (1, +1)}


# Channels of a phase part's load array: the four links, then the ramp between each core and its router (words
# delivered to the core, words it injects).
RAMP_IN, RAMP_OUT = 4, 5
CHANNELS = 6


@dataclasses.dataclass(frozen=True, eq=False)
class Phase:
    """Transfers that run at the same time: their link and ramp loads add up (contention), their cycles do not.

    Attributes:
      parts: ((row0, col0, words[6, h, w]), ...) loads of regions at their grid origins: words each core sends on
        its N, E, S, W links (forwarded words included), then words its ramp delivers to it and words it injects.
      hops: the longest single stream, in hops (a pipelined chain's streams each cross one link).
      depth: dependent stages on the critical path: a core taking data off its ramp, combining it and sending the
        result on (a chain of m cores: m - 1); 0 for plain routing (shifts, multicasts, all-to-all, streams).
      lanes: int array [k, 4] of (row0, col0, row1, col1), or None: the paths (X then Y) whose lengths set the
        phase's latency (a multicast's from its source to both ends of its lines, a reduction's from the far ends to
        its root, a shift's every k-hop stream). On a spec with defects the phase's hops grow by how much the
        longest of them grows on the physical grid (`wafer.defects.growth`); placed with the parts by `at`.
    """

    parts: tuple = ()
    hops: int = 0
    depth: int = 0
    lanes: np.ndarray | None = None

    def latency_hops(self, spec):
        """The phase's hops on `spec`: `hops`, plus the growth of its longest lane on a defective wafer."""
        rm = defects.remap_of(spec)
        if rm is None or self.lanes is None or not len(self.lanes):
            return self.hops
        lanes = self.lanes
        if lanes.min() < 0 or lanes[:, [0, 2]].max() >= rm.rows or lanes[:, [1, 3]].max() >= rm.cols:
            raise ValueError(
                f"traffic's lanes fall outside the {rm.rows}x{rm.cols} grid; place a region's traffic with "
                f"traffic.at(row, col) inside the grid"
            )
        return self.hops + defects.growth(rm, lanes)

    def loads(self, rows: int, cols: int) -> np.ndarray:
        """All six channels over a rows x cols grid, [6, rows, cols]."""
        out = np.zeros((CHANNELS, rows, cols), np.float64)
        for r0, c0, words in self.parts:
            _, h, w = words.shape
            if r0 < 0 or c0 < 0 or r0 + h > rows or c0 + w > cols:
                raise ValueError(f"traffic of a {h}x{w} region at ({r0},{c0}) falls outside the {rows}x{cols} grid")
            out[:, r0 : r0 + h, c0 : c0 + w] += words
        return out

    def link_words(self, rows: int, cols: int) -> np.ndarray:
        return self.loads(rows, cols)[:4]

    def _local(self) -> np.ndarray:
        """The loads over the bounding box of the parts (where the maxima are)."""
        if len(self.parts) == 1:
            return self.parts[0][2]
        r_hi = max(r0 + w.shape[1] for r0, _, w in self.parts)
        c_hi = max(c0 + w.shape[2] for _, c0, w in self.parts)
        r_lo = min(r0 for r0, _, _ in self.parts)
        c_lo = min(c0 for _, c0, _ in self.parts)
        shifted = Phase(tuple((r0 - r_lo, c0 - c_lo, w) for r0, c0, w in self.parts), self.hops, self.depth)
        return shifted.loads(r_hi - r_lo, c_hi - c_lo)

    @property
    def max_link_words(self) -> float:
        return float(self._local()[:4].max()) if self.parts else 0.0

    @property
    def max_ramp_words(self) -> float:
        """Words through the busiest ramp, either way."""
        return float(self._local()[4:].max()) if self.parts else 0.0

    @property
    def mean_link_words(self) -> float:
        """Words per link in use (E / N in Luczynski et al.'s model: every word's hops over the links that carry
        any)."""
        if not self.parts:
            return 0.0
        links = self._local()[:4]
        return float(links.sum() / max(1, np.count_nonzero(links)))

    def cycles(self, spec):
        """Cycles of the phase on `spec` (wafer/cost.py's transfer rule)."""
        if not self.parts:
            return 0.0
        return cost.transfer_cycles(
            spec,
            self.max_link_words,
            self.latency_hops(spec),
            ramp_words=self.max_ramp_words,
            mean_words=self.mean_link_words,
            depth=self.depth,
        )

    def __or__(self, other: Phase) -> Phase:
        if not other.parts:
            return self
        if not self.parts:
            return other
        return Phase(
            self.parts + other.parts,
            max(self.hops, other.hops),
            max(self.depth, other.depth),
            _join_lanes(self.lanes, other.lanes),
        )

    def at(self, row: int, col: int) -> Phase:
        parts = tuple((r0 + row, c0 + col, w) for r0, c0, w in self.parts)
        return Phase(parts, self.hops, self.depth, _move(self.lanes, row, col))


def _move(lanes, row, col):
    return None if lanes is None else lanes + np.array([row, col, row, col], np.int64)


def _join_lanes(a, b):
    if a is None or b is None:
        return b if a is None else a
    return np.concatenate([a, b])


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
                Phase(
                    tuple((r0 + r, c0 + c, w) for r, c in offsets for r0, c0, w in p.parts),
                    p.hops,
                    p.depth,
                    None if p.lanes is None else np.concatenate([_move(p.lanes, r, c) for r, c in offsets]),
                )
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
        return float(sum(w[:4].sum() for p in self.phases for _, _, w in p.parts))

    @property
    def hops(self) -> int:
        return sum(p.hops for p in self.phases)

    @property
    def depth(self) -> int:
        """Receive-combine-send stages on the critical path, over all phases (see `Phase.depth`)."""
        return sum(p.depth for p in self.phases)

    def ramp_words(self, rows: int, cols: int) -> np.ndarray:
        """Words per core through its ramp, [2, rows, cols] (delivered to it, injected by it), over all phases."""
        out = np.zeros((2, rows, cols), np.float64)
        for p in self.phases:
            out += p.loads(rows, cols)[4:]
        return out

    def cycles(self, spec):
        """Cycles on `spec`: each phase by wafer/cost.py's transfer rule (busiest link and ramp, longest stream,
        dependent stages); phases add."""
        total = 0.0
        for p in self.phases:
            total = total + p.cycles(spec)
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


def _phase_from_line(h, w, axis, plus, minus, hops, depth=0, ramp_in=None, ramp_out=None, lanes=None) -> Phase:
    """Broadcast per-line loads over the other grid axis into a [6, h, w] record: plus / minus on the + (E / S) and
    - (W / N) links, ramp_in / ramp_out the words each core of the line takes off / puts on its ramp."""
    words = np.zeros((CHANNELS, h, w))
    line = (lambda v: v[:, None]) if axis == 0 else (lambda v: v[None, :])
    if axis == 0:
        words[_DIR["S"]] = plus[:, None]
        words[_DIR["N"]] = minus[:, None]
    else:
        words[_DIR["E"]] = plus[None, :]
        words[_DIR["W"]] = minus[None, :]
    if ramp_in is not None:
        words[RAMP_IN] = line(np.asarray(ramp_in, np.float64))
    if ramp_out is not None:
        words[RAMP_OUT] = line(np.asarray(ramp_out, np.float64))
    return Phase(((0, 0, words),), int(hops), int(depth), lanes)


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
    received, sent = np.zeros(n), np.zeros(n)
    received[dst[ok]], sent[src[ok]] = words, words
    lanes = defects.window_lanes(h, w, axis, abs(k))
    return Traffic((_phase_from_line(h, w, axis, plus, minus, abs(k), 0, received, sent, lanes),))


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
    # the source injects its data once (each router forwards and delivers it); every other core takes it in
    received, sent = np.where(idx != s, float(words), 0.0), np.where(idx == s, float(words), 0.0)
    h, w = x.shape[:2]
    lanes = np.concatenate([defects.line_lanes(h, w, axis, s, 0), defects.line_lanes(h, w, axis, s, n - 1)])
    phase = _phase_from_line(h, w, axis, plus, minus, hops, 0, received, sent, lanes)
    traffic = Traffic((phase,)) if n > 1 else Traffic.none()
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
#              ceil(log2 m) rounds of B words on disjoint paths of 2^k hops, one phase of that many dependent
#              stages (their streams overlap in flight, as Luczynski et al. model them).
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

    Returns a list of (load[m], recv[m], send[m], hops, depth), in units of one core's data: load[j] on the link
    from the core at distance j to the one at j - 1 (load[0] unused), recv[j] / send[j] what core j takes off /
    puts on its ramp, hops the longest single stream, depth the dependent stages.
    """
    if m <= 1:
        return []
    j = np.arange(m)
    one = lambda c: np.where(c, 1.0, 0.0)  # noqa: E731
    if pattern == "chain":  # each core receives from j + 1, adds, sends to j - 1: streams of one hop, pipelined
        return [(one(j >= 1), one(j < m - 1), one(j >= 1), 1, m - 1)]
    if pattern == "star":  # every core streams straight to the root, which takes them all in
        return [(np.where(j >= 1, (m - j).astype(float), 0.0), np.where(j == 0, m - 1.0, 0.0), one(j >= 1), m - 1, 1)]
    if pattern == "tree":  # binomial rounds, dependent stages of one phase (their streams overlap, as in LGI24)
        load, recv, send = np.zeros(m), np.zeros(m), np.zeros(m)
        k = 0
        while (1 << k) < m:
            step = 1 << k
            for src in range(step, m, 2 * step):  # senders at j = step (mod 2 step), each to j - step
                load[src - step + 1 : src + 1] += 1.0
                send[src] += 1.0
                recv[src - step] += 1.0
            k += 1
        return [(load, recv, send, 1 << (k - 1), k)]
    # two_phase: chains within groups towards each group's leader (j = 0 mod s), then a chain through the leaders
    s = group
    phases = []
    inner = one(j % s != 0)
    if inner.any():
        recv = one(((j + 1) % s != 0) & (j + 1 < m))
        phases.append((inner, recv, inner, 1, min(s, m) - 1))
    leaders = -(-m // s)
    if leaders > 1:
        far = (leaders - 1) * s
        lead = j % s == 0
        load = one((j >= 1) & (j <= far))
        phases.append((load, one(lead & (j + s < m)), one(lead & (j >= 1)), s, leaders - 1))
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
    """Phases of a reduction along a line of n cores to core d, as (plus[n], minus[n], recv[n], send[n], hops,
    depth) in units of one core's data, and receives[n]: incoming partials each core adds."""
    left = _side_phases(d + 1, pattern, group)  # cores d, d-1, ..., 0 at j = 0, 1, ..., d: + links
    right = _side_phases(n - d, pattern, group)  # cores d, d+1, ..., n-1: - links
    phases = []
    for k in range(max(len(left), len(right))):
        plus, minus, recv, send, hops, depth = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n), 0, 0
        if k < len(left):
            load, r, s_, h, dep = left[k]
            plus[d - np.arange(1, d + 1)] = load[1:]  # the link from j to j - 1 leaves core d - j eastwards
            recv[d::-1] += r
            send[d::-1] += s_
            hops, depth = max(hops, h), max(depth, dep)
        if k < len(right):
            load, r, s_, h, dep = right[k]
            minus[d + np.arange(1, n - d)] = load[1:]
            recv[d:] += r
            send[d:] += s_
            hops, depth = max(hops, h), max(depth, dep)
        phases.append((plus, minus, recv, send, hops, depth))
    receives = np.zeros(n)
    receives[d::-1] += _side_receives(d + 1, pattern, group)
    receives[d:] += _side_receives(n - d, pattern, group)
    return phases, receives


def _reduce_traffic(shape, axis, d, words, pattern="chain", group=None) -> Traffic:
    n = shape[axis]
    phases, _ = _line_reduce(n, d, pattern, _group(group, n))
    h, w = shape[0], shape[1]
    # every pattern's critical path runs from the line's far ends to the root: its last phase (a two-phase
    # reduction's chain through the leaders) carries the extra hops of a defective wafer along those lanes
    lanes = np.concatenate([defects.line_lanes(h, w, axis, 0, d), defects.line_lanes(h, w, axis, d, n - 1)])
    last = len(phases) - 1
    return Traffic(
        tuple(
            _phase_from_line(
                h, w, axis, p * words, m * words, hops, dep, r * words, s_ * words, lanes if i == last else None
            )
            for i, (p, m, r, s_, hops, dep) in enumerate(phases)
        )
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
    the farthest adds once, in a star the root adds n - 1 partial results, in a tree the cores at even positions
    add once per round. Put these records in the superstep of the reduction, next to its traffic:
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
        # `@fadds(mem, mem, fabin)`: its own operand read from SRAM, the result written, the other from the ramp
        # (a fabric operand: at most a wavelet a cycle). Its start-up is not charged: the instruction is set up
        # while the core waits for the partial, and the transfer's dependent stage (2 T_R + 1 cycles, wafer/cost.py)
        # already holds the receive-add-send of Luczynski et al.'s model, which the calibration checks
        counts = {("alu", cls, itemsize, itemsize, itemsize / 4): ops}
        out.append(KernelCost(Rect(0, 0, h, w), counts, mask))
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
    # a core takes in the streams of the sources up to `radius` behind it; it injects its own once (routers deliver
    # it to each of the `radius` cores ahead and forward it)
    received = sum(np.where((idx - sign * j >= 0) & (idx - sign * j < n), words, 0.0) for j in range(1, radius + 1))
    sent = np.where((idx + sign >= 0) & (idx + sign < n), float(words), 0.0)
    lanes = defects.window_lanes(shape[0], shape[1], axis, min(radius, n - 1))
    return Traffic(
        (_phase_from_line(shape[0], shape[1], axis, plus, minus, min(radius, n - 1), 0, received, sent, lanes),)
    )


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
    # every core takes in the n - 1 blocks addressed to it (routers' filters keep the rest off its ramp); it puts
    # on its ramp the n - 1 blocks it sends, or n - 1 per direction padded
    received = np.full(n, (n - 1.0) * block)
    sent = received * (2.0 if pattern == "relay_padded" else 1.0)
    h, w = x.shape[0], x.shape[1]
    lanes = defects.line_lanes(h, w, axis, 0, n - 1)
    phase = _phase_from_line(h, w, axis, plus * block, minus * block, n - 1, 0, received, sent, lanes)
    return y, Traffic((phase,))


# ---- closed forms ------------------------------------------------------------------------------------------------
#
# Cycles of each pattern under the cost rules (wafer/cost.py), from the line's length n, the words each core
# contributes (or each block holds) and a spec, without building a record: equal to `traffic.cycles(spec)` of the
# primitive (tests/wafer/test_fabric_patterns.py holds them equal). Written with array arithmetic only, so n and
# words may be Python numbers, NumPy arrays or JAX tracers (a compiler comparing patterns per kernel, a sweep, a
# gradient over spec leaves); the pattern and `to` are static choices.


def _mod(*xs):
    return jnp if any(cost._is_jax(x) for x in xs) else np


def _ind(c):
    """1.0 where a condition holds, else 0.0 (array-generic)."""
    return _mod(c).where(c, 1.0, 0.0)


def _phase_cycles(spec, link_words, ramp_words, hops, depth, mean_words):
    """wafer/cost.py's transfer rule for one phase (link and ramp words in 32-bit words; `mean_words` per link in
    use)."""
    return cost.transfer_cycles(spec, link_words, hops, ramp_words=ramp_words, mean_words=mean_words, depth=depth)


def _sides(n, to):
    """(cores left of the root and the root, cores right of it and the root): m_L, m_R."""
    xp = _mod(n, to)
    if isinstance(to, str):
        if to == "all":
            d = xp.floor((n - 1) / 2)
        elif to in ("first", "N", "W"):
            d = 0.0 * n
        elif to in ("last", "S", "E"):
            d = n - 1.0
        else:
            raise ValueError(f"to must be 'first', 'last', an edge name, 'all' or a core index, got {to!r}")
    else:
        d = to + 0.0 * n
    return d + 1.0, n - d


_MAX_ROUNDS = 24  # tree rounds considered: 2**24 cores is beyond any wafer


def _tree_energy(m):
    """Link hops of a one-sided binomial reduction of m cores, in units of one core's data: sum over rounds of
    2^k x its senders, ceil((m - 2^k) / 2^(k + 1))."""
    xp = _mod(m)
    total = 0.0
    for k in range(_MAX_ROUNDS):
        step = 2.0**k
        total = total + _ind(step < m) * step * xp.ceil(xp.maximum(m - step, 0.0) / (2 * step))
    return total


def _reduce_phases_cycles(m_l, m_r, words, spec, pattern, group, extra=0.0):
    """Cycles of a reduction whose root has m_l - 1 cores on one side and m_r - 1 on the other (phases by side);
    `extra`: the growth of its longest lane on a defective wafer, added to its last phase's hops (as `reduce`'s
    records carry it)."""
    xp = _mod(m_l, m_r, words, group, extra)
    b = words
    big = xp.maximum(m_l, m_r)
    links = m_l + m_r - 2.0  # links in use, both sides
    if pattern == "chain":  # one phase: every link b, every core b in and out, the root from both sides
        root = _ind(m_l > 1) + _ind(m_r > 1)
        return _ind(big > 1) * _phase_cycles(spec, b, b * xp.maximum(root, 1.0), 1.0 + extra, big - 1.0, b)
    if pattern == "star":  # the root takes in every other core's data; the link next to it carries a side's
        energy = b * ((m_l - 1.0) * m_l + (m_r - 1.0) * m_r) / 2.0
        mean = energy / xp.maximum(links, 1.0)
        return _ind(big > 1) * _phase_cycles(spec, b * (big - 1.0), b * links, big - 1.0 + extra, 1.0, mean)
    if pattern == "tree":  # one phase of ceil(log2) rounds; the link next to the root carries every round
        rounds_l, rounds_r = _ceil_log2(m_l), _ceil_log2(m_r)
        rounds = xp.maximum(rounds_l, rounds_r)
        mean = b * (_tree_energy(m_l) + _tree_energy(m_r)) / xp.maximum(links, 1.0)
        hops = 2.0 ** xp.maximum(rounds - 1.0, 0.0) + extra
        return _ind(big > 1) * _phase_cycles(spec, b * rounds, b * (rounds_l + rounds_r), hops, rounds, mean)
    # two_phase
    s = group
    leaders = xp.ceil(big / s)
    inner_root = _ind((m_l > 1) & (s > 1)) + _ind((m_r > 1) & (s > 1))
    inner = _ind((big > 1) & (s > 1)) * _phase_cycles(
        spec, b, b * xp.maximum(inner_root, 1.0), 1.0 + extra * _ind(leaders <= 1), xp.minimum(s, big) - 1.0, b
    )
    lead_root = _ind(s < m_l) + _ind(s < m_r)
    outer = _ind(leaders > 1) * _phase_cycles(spec, b, b * xp.maximum(lead_root, 1.0), s + extra, leaders - 1.0, b)
    return inner + outer


def _ceil_log2(m):
    """ceil(log2(m)) for m >= 1 (0 for m = 1), exact for whole m."""
    xp = _mod(m)
    total = 0.0
    for k in range(_MAX_ROUNDS):
        total = total + _ind(2.0**k < m)
    return total + 0.0 * xp.asarray(m)


def multicast_cycles(n, words, spec, *, src=0, extra_hops=0.0):
    """Cycles of `multicast` along a line of n cores from index `src` ("first"/"last" or a number), each core
    receiving `words` words; `extra_hops`: the growth of its longest lane on a defective wafer
    (`wafer.defects.growth`; for a multicast from an end, `wafer.defects.line_extra`)."""
    xp = _mod(n, words, src)
    far = n - 1.0 if isinstance(src, str) else xp.maximum(src, n - 1.0 - src)
    return _ind(n > 1) * _phase_cycles(spec, words, words, far + extra_hops, 0.0, words)


def reduce_cycles(n, words, spec, *, pattern: str = "chain", to="last", group=None, extra_hops=0.0):
    """Cycles of `reduce(x, axis, op, to=to, pattern=pattern, group=group)` along a line of n cores holding
    `words` words each.

    Args:
      n: cores along the line; words: 32-bit words per core (`words_per_core`).
      spec: a WaferSpec.
      pattern: one of REDUCE_PATTERNS.
      to: "first" / "last" (an end), "all" (allreduce: to the middle core, then multicast back) or a core index.
      group: two-phase group size; default round(sqrt(n)), as the primitive chooses it.
      extra_hops: on a defective wafer, how many hops the reduction's longest lane (from the far ends of the line to
        the root) grows by (`wafer.defects.growth`; to an end: `wafer.defects.line_extra`); "all" adds it to the
        multicast back as well.
    """
    _check_pattern(pattern)
    xp = _mod(n, words)
    if group is None:
        group = xp.maximum(xp.round(xp.sqrt(n)), 1.0)
    m_l, m_r = _sides(n, to)
    out = _reduce_phases_cycles(m_l, m_r, words, spec, pattern, group, extra_hops)
    if to == "all":
        out = out + multicast_cycles(n, words, spec, src=xp.floor((n - 1) / 2), extra_hops=extra_hops)
    return out


def reduce_receives(n, *, pattern: str = "chain", to="last", group=None):
    """Incoming partial results the busiest core of `reduce(..., pattern=pattern, to=to)` along a line of n cores
    adds to its own (`reduce_adds`): array-generic, equal to the records' largest count."""
    _check_pattern(pattern)
    xp = _mod(n)
    if group is None:
        group = xp.maximum(xp.round(xp.sqrt(n)), 1.0)
    m_l, m_r = _sides(n, xp.floor((n - 1) / 2) if to == "all" else to)  # (an allreduce reduces to the middle)
    if pattern == "chain":  # the root takes one stream per side; every other core but the ends one
        return xp.maximum(_ind(m_l > 1) + _ind(m_r > 1), _ind(xp.maximum(m_l, m_r) > 2))
    if pattern == "star":  # the root takes all of them
        return n - 1.0
    if pattern == "tree":  # the root adds once per round on each side
        return _ceil_log2(m_l) + _ceil_log2(m_r)
    s = group
    side_root = lambda m: _ind((s > 1) & (m > 1)) + _ind(s < m)  # noqa: E731  from its group, from the next leader
    root = side_root(m_l) + side_root(m_r)
    big = xp.maximum(m_l, m_r)
    leader = _ind((s > 1) & (s + 1 < big)) + _ind(2 * s < big)  # the first leader out: its group and the next
    member = _ind((s > 2) & (2 < big))  # a group member between its neighbours
    return xp.maximum(root, xp.maximum(leader, member))


def reduce_adds_cycles(
    n, elements, spec, *, dtype_class: str = "fp32", itemsize=4, pattern: str = "chain", to="last", group=None
):
    """Cycles the busiest core of a reduction along n cores spends adding what it takes in (`reduce_adds`): a
    `@fadds(mem, mem, fabin)` over `elements` elements per incoming partial, at its element rate."""
    k = reduce_receives(n, pattern=pattern, to=to, group=group)
    return k * elements * cost.element_cycles(spec, "alu", dtype_class, itemsize, itemsize, itemsize / 4.0)


def strided_allreduce_cycles(n, stride, words, spec, *, extra_hops=0.0):
    """Cycles of `stride` interleaved chain allreduces, each over n cores `stride` apart along a line (core i of
    every block of `stride` consecutive cores with core i of the other blocks: the gradient sum over the copies of
    a weight kernel's tile grid, compiler/schedule.py): each stream crosses `stride` links, every link carries
    `stride` streams of `words`; reduce to the middle block, then multicast back. `extra_hops`: on a defective
    wafer, the growth of the longest path along the line, added to both phases' hops."""
    xp = _mod(n, stride, words)
    m_l, m_r = _sides(n, xp.floor((n - 1) / 2))
    big = xp.maximum(m_l, m_r)
    root = _ind(m_l > 1) + _ind(m_r > 1)
    link = stride * words
    up = _phase_cycles(spec, link, words * xp.maximum(root, 1.0), stride + extra_hops, big - 1.0, link)
    down = _phase_cycles(spec, link, words, stride * (big - 1.0) + extra_hops, 0.0, link)
    return _ind(n > 1) * (up + down)


def allreduce_cycles(n, words, spec, *, pattern: str = "chain", group=None):
    """`reduce_cycles(..., to="all")`."""
    return reduce_cycles(n, words, spec, pattern=pattern, to="all", group=group)


def all_to_all_cycles(n, block_words, spec, *, pattern: str = "relay"):
    """Cycles of `all_to_all` along a line of n cores whose blocks hold `block_words` words each."""
    if pattern not in ALL_TO_ALL_PATTERNS:
        raise ValueError(f"all_to_all: pattern must be one of {ALL_TO_ALL_PATTERNS}, got {pattern!r}")
    xp = _mod(n, block_words)
    if pattern == "direct":  # energy: 2 sum_i i (n - i)
        busiest, energy = xp.floor(n / 2) * xp.ceil(n / 2), n * (n - 1.0) * (n + 1.0) / 3.0
    elif pattern == "relay":  # each direction: sum_i sum_{s <= i} (n - 1 - s)
        busiest, energy = n * (n - 1) / 2, n * (n - 1.0) * (2.0 * n - 1.0) / 3.0
    else:
        busiest, energy = (n - 1) ** 2, n * (n - 1.0) ** 2
    mean = energy / xp.maximum(2.0 * (n - 1.0), 1.0)  # over the 2 (n - 1) directed links of the line
    ramp = (n - 1) * (2.0 if pattern == "relay_padded" else 1.0)
    return _ind(n > 1) * _phase_cycles(
        spec, busiest * block_words, ramp * block_words, n - 1.0, 0.0, mean * block_words
    )
