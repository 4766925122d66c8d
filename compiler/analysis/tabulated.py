"""The cost model on integer placements, fast: the schedule's per-kernel figures tabulated over integer sides.

`compiler.schedule.program_figures` = `kernel_figures` (each kernel partitioned on its rectangle and charged), the
route terms (`route_hops`, `stream_cycles`, `tied_cycles`: where the rectangles lie) and `pipeline_figures` (the
kernels composed into a pipeline). On a perfect wafer a kernel's figures depend on its own height and width only:
not on where its rectangle is, nor on the other kernels (every rule of `kernel_figures` is elementwise over
kernels). So for a batch of placements whose sides are integers the kernel figures take few distinct values, and

    table = dense_table(feats, spec, H, W)      # kernel_figures at every (h, w) <= (H, W), every kernel
    out = evaluate(feats, layouts, spec)        # layouts [kernels, points]: gathers + route terms + pipeline

evaluates a placement as: a gather of each kernel's `PIPELINE_KEYS` figures from the table, then the schedule's own
route terms and `pipeline_figures` on the placement's layout, batched along a trailing axis ([kernels, points]: the
vectorised axis is the contiguous one). Nothing here restates a rule: the table is `kernel_figures` itself (jitted
and vmapped over side pairs exactly as `jax.vmap(costmodel.predict)` evaluates it, the features and the spec passed
as arguments), the rest is the schedule's functions called on the gathered figures. The figures equal
`jax.vmap(costmodel.predict)` at tau = 0 on the same integer layouts bit for bit (tests/compiler/test_tabulated.py;
sums over kernels are the same tree of adds in both: `relax.fold_sum`).

Where it does not apply, `compiler.analysis.sweep.evaluate_placements` uses `jax.vmap(costmodel.predict)`: a
positive temperature (relaxed maxima), non-integer sides (a relaxed layout), traced features, a defective wafer (a
kernel's lines then cross dead links where its rectangle lies: `schedule.defect_line_hops` depends on the position),
a batched spec (hardware leaves per point: a table per hardware point would cost as much as it saves), or a batch
with too few placements per distinct side pair for a table to pay (`evaluate` returns None; one placement).

Tables come in two forms:
  dense   every (h, w) in [1, H] x [1, W] (H, W: the batch's largest sides, rounded up to a multiple of 8), the
          index computed on the device from the sides; used when H x W is no more than the batch's placements, and
          cached per (program, spec, H, W), so repeated batches (a benchmark, a sweep in several calls) pay it once;
  sparse  the distinct (h, w) pairs of the batch (`np.unique` on the host, padded to a power of two), the index its
          inverse: batches with large sides but few distinct ones.
Rows and columns need not be integers (the route terms are evaluated as they come). A side that is not a whole
number in the table reads a last pair of NaNs, so its placement's figures come out NaN and `valid` False: the
caller re-evaluates those with the cost model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from compiler import schedule
from compiler.plan import features as ft
from compiler.schedule import Layout

# What a batch evaluation returns per placement (besides `valid`), as sweeps report it.
OUTPUTS = ("samples_per_s", "bottleneck_cycles", "latency_cycles", "cores", "peak_sram_bytes")

_DENSE_STEP = 8  # a dense table's sides are rounded up to a multiple of this (fewer distinct tables, compiles)


@dataclasses.dataclass(frozen=True, eq=False)
class SideTable:
    """A program's per-kernel figures at integer sides (module docstring).

    Attributes:
      feats: the program's features (NumPy float32).
      spec: the wafer (its leaves float32 scalars).
      figures: {key: [(pairs + 1) * n] float32} for the task's `PIPELINE_KEYS`: entry q * n + i is kernel i's
        figure at side pair q; pair `pairs` is NaN (where a side is not in the table).
      heights, widths: [pairs] the side pairs (NumPy float32).
      dense: (H, W) when the pairs are every (h, w) in [1, H] x [1, W], row-major; None for a sparse table.
    """

    feats: ft.Features
    spec: object
    figures: dict
    heights: np.ndarray
    widths: np.ndarray
    dense: tuple | None = None

    @property
    def pairs(self) -> int:
        return int(self.heights.shape[0])


def _keys(feats: ft.Features) -> tuple:
    """The PIPELINE_KEYS `kernel_figures` returns for this task."""
    if feats.task != "training":
        return ("cycles", "cores", "sram_bytes")
    return tuple(schedule.PIPELINE_KEYS)


@functools.partial(jax.jit, static_argnames=("keys",))
def _tabulate(feats, heights, widths, spec, *, keys):
    """kernel_figures at every side pair, every kernel: {key: [pairs, n]}; vmapped over the pairs with the features
    as arguments, as `jax.vmap(costmodel.predict)` evaluates a kernel's figures (so the values are its values)."""
    n = feats.anchor.shape[0]

    def one(h, w):
        zero = jnp.zeros((n,), jnp.float32)
        k = schedule.kernel_figures(feats, Layout(zero + h, zero + w, zero, zero), spec, 0.0)
        return {key: k[key] for key in keys}

    return jax.vmap(one)(heights, widths)


def tabulate(feats: ft.Features, spec, heights, widths, *, dense: tuple | None = None) -> SideTable:
    """The table of `feats`' kernel figures on `spec` at the side pairs (heights[q], widths[q]).

    Args:
      feats: the program's features (concrete arrays).
      spec: a WaferSpec with scalar leaves.
      heights, widths: [pairs] integer sides.
      dense: (H, W) when the pairs are the whole grid [1, H] x [1, W], row-major (`dense_table`).
    """
    if getattr(spec, "defects", None) is not None:
        raise ValueError(
            "a side table needs a perfect wafer: with a defect map a kernel's figures depend on where its rectangle "
            "lies (schedule.defect_line_hops); evaluate such placements with costmodel.predict"
        )
    feats = jax.tree.map(lambda x: np.asarray(x, np.float32), feats)
    spec = jax.tree.map(lambda x: np.float32(x), spec)
    heights, widths = np.asarray(heights, np.float32), np.asarray(widths, np.float32)
    figs = _tabulate(feats, heights, widths, spec, keys=_keys(feats))
    # a last pair of NaNs: where a placement's side is not in the table, its figures come out NaN
    sentinel = jnp.full((1, feats.n), jnp.nan, jnp.float32)
    figures = {key: jnp.reshape(jnp.concatenate([v, sentinel]), (-1,)) for key, v in figs.items()}
    return SideTable(feats, spec, figures, heights, widths, dense)


def dense_table(feats: ft.Features, spec, max_height: int, max_width: int) -> SideTable:
    """The table at every (h, w) in [1, max_height] x [1, max_width]."""
    h, w = np.meshgrid(np.arange(1, max_height + 1), np.arange(1, max_width + 1), indexing="ij")
    return tabulate(feats, spec, h.reshape(-1), w.reshape(-1), dense=(int(max_height), int(max_width)))


def distinct_pairs(heights, widths) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct integer (h, w) pairs of `heights`, `widths` (any shape, e.g. [kernels, points]).

    Returns (heights [pairs], widths [pairs], index [same shape] int32): the pair of each entry, -1 where its sides
    are not whole numbers >= 1."""
    h, w = np.asarray(heights, np.float64), np.asarray(widths, np.float64)
    ok = (h == np.floor(h)) & (w == np.floor(w)) & (h >= 1) & (w >= 1)
    wmax = float(np.max(np.where(ok, w, 1.0), initial=1.0)) + 1.0
    uniq, inverse = np.unique(np.where(ok, h * wmax + w, -1.0), return_inverse=True)
    inverse = inverse.reshape(h.shape)
    if uniq.size and uniq[0] < 0:  # the entries that are not pairs
        uniq, inverse = uniq[1:], inverse - 1
    th = np.floor(uniq / wmax)
    return th, uniq - th * wmax, np.where(ok, inverse, -1).astype(np.int32)


# ---- evaluating placements ----------------------------------------------------------------------------------------


def _compose(feats, spec, k: dict, lay: Layout) -> dict:
    """The schedule's pipeline on gathered kernel figures [n, points] and the layout [n, points]: OUTPUTS [points]."""
    hops = schedule.route_hops(feats, lay, spec)
    streams = schedule.stream_cycles(feats, lay, spec)
    tied = schedule.tied_cycles(feats, lay, spec) if feats.task == "training" and feats.mode == "pipelined" else None
    out = schedule.pipeline_figures(feats, k, hops, streams, spec, 0.0, tied=tied)
    return {key: out[key] for key in OUTPUTS}


@dataclasses.dataclass(frozen=True, eq=False)
class _Holder:
    """Carries an unhashable value through lru_cache, which hashes and compares the key beside it instead."""

    value: object

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, _Holder)


@functools.partial(jax.jit, static_argnames=("pairs", "dense"))
def _flat_index(height, width, index, *, pairs: int, dense: tuple | None):
    """Where each kernel's figures lie in the table's flat arrays, [n, points]: at the pairs `index` (sparse) or at
    (h - 1) * W + (w - 1) (dense: (H, W)); the NaN pair `pairs` where a side is not in the table. One call for the
    whole batch, apart from `_run`: computed in each chunk's program it cost ~1 ms more per 65,536 placements (~5%)."""
    n = height.shape[0]
    if index is None:
        H, W = dense
        hi, wi = height.astype(jnp.int32), width.astype(jnp.int32)
        ok = (height == hi) & (width == wi) & (hi >= 1) & (wi >= 1) & (hi <= H) & (wi <= W)
        index = jnp.where(ok, (hi - 1) * W + (wi - 1), pairs)
    else:
        index = jnp.where(index >= 0, index, pairs)
    return index * n + jnp.arange(n, dtype=jnp.int32)[:, None]


@functools.partial(jax.jit, static_argnames=("chunk",))
def _run(feats, spec, figures, layouts: Layout, flat, start, *, chunk: int):
    """OUTPUTS [chunk] of placements [start, start + chunk) of layouts [n, points] (a start past points - chunk is
    clamped to it: XLA's dynamic_slice), their kernel figures read from the table `figures` at `flat` [n, points]
    (`_flat_index`). The features and the spec are arguments, as in `jax.vmap(costmodel.predict)`'s program:
    constants would let XLA fold and reassociate the pipeline's arithmetic differently (an ulp of samples/s)."""
    lay = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1), layouts)
    flat = jax.lax.dynamic_slice_in_dim(flat, start, chunk, axis=1)
    # gathered once and kept (else XLA repeats the gathers in every fusion that reads them: ~20% slower)
    k = jax.lax.optimization_barrier({key: v.at[flat].get(mode="promise_in_bounds") for key, v in figures.items()})
    return _compose(feats, spec, k, lay)


@functools.lru_cache(maxsize=16)
def _dense(key: str, feats: _Holder, spec: _Holder, max_height: int, max_width: int) -> SideTable:
    return dense_table(feats.value, spec.value, max_height, max_width)


def program_key(feats: ft.Features, spec) -> str:
    """A digest of the features' arrays and static fields and the spec's values: tables are cached under it."""
    digest = hashlib.blake2b(digest_size=16)
    leaves, treedef = jax.tree_util.tree_flatten(feats)
    digest.update(repr(treedef).encode())
    for leaf in leaves:
        a = np.ascontiguousarray(np.asarray(leaf, np.float32))
        digest.update(str(a.shape).encode())
        digest.update(a.tobytes())
    sleaves, sdef = jax.tree_util.tree_flatten(spec)
    digest.update(repr(sdef).encode())
    digest.update(np.asarray([np.float32(x) for x in sleaves], np.float32).tobytes())
    return digest.hexdigest()


def _largest_sides(h, w) -> tuple[int, int]:
    """The largest finite height and width of a batch (whole numbers, at least 1)."""
    out = []
    for x in (h, w):
        x = np.asarray(x)  # a CPU jax.Array: no copy
        m = float(np.max(x)) if x.size else 1.0
        if not np.isfinite(m):  # a NaN or an infinity (their placements are not valid): the largest finite side
            m = float(np.max(x[np.isfinite(x)], initial=1.0))
        out.append(max(1, int(np.ceil(m))))
    return out[0], out[1]


@functools.lru_cache(maxsize=16)
def _on_device(key: str, feats: _Holder, spec: _Holder):
    """The features and the spec as device arrays, once per program (a transfer per leaf per call measured ~1 ms)."""
    return jax.tree.map(jnp.asarray, feats.value), jax.tree.map(jnp.asarray, spec.value)


def table_sides(max_height: int, max_width: int) -> tuple[int, int]:
    """The (H, W) of the dense table for a batch whose largest sides are these: rounded up to a multiple of 8."""
    up = lambda x: max(_DENSE_STEP, -(-int(x) // _DENSE_STEP) * _DENSE_STEP)  # noqa: E731
    return up(max_height), up(max_width)


def evaluate(feats: ft.Features, layouts: Layout, spec, *, chunk: int = 8192, key: str | None = None) -> dict:
    """The figures of a batch of placements at tau = 0 through a side table (module docstring).

    Args:
      feats: the program's features (concrete).
      layouts: a Layout with arrays [kernels, points] (kernels first: the fast layout).
      spec: a WaferSpec with scalar leaves.
      chunk: placements per jitted call (a chunk's intermediates stay in cache).
      key: `program_key(feats, spec)` when the caller has it (dense tables are cached under it).
    Returns:
      {name: np.ndarray [points]} for OUTPUTS, and "valid" [points]: the placement's sides were whole numbers the
      table covers (other entries are meaningless; evaluate them with `costmodel.predict`). None when no table
      pays: a batch with at least half as many distinct side pairs as placements (a table costs a placement's kernel
      figures per pair; the cost model is as fast).
    """
    n, points = np.shape(layouts.height)
    max_h, max_w = _largest_sides(layouts.height, layouts.width)
    H, W = table_sides(max_h, max_w)
    key = program_key(feats, spec) if key is None else key
    feats_np = jax.tree.map(lambda x: np.asarray(x, np.float32), feats)
    spec_np = jax.tree.map(lambda x: np.float32(x), spec)
    index = None
    if H * W <= max(points, 64):
        table = _dense(key, _Holder(feats_np), _Holder(spec_np), H, W)
    else:
        th, tw, index = distinct_pairs(layouts.height, layouts.width)
        if 2 * len(th) > points:  # a table would cost about what it saves (one placement: more)
            return None
        size = 1 << max(3, (max(len(th), 1) - 1).bit_length())  # pairs padded to a power of two: few shapes
        pad = lambda x: np.concatenate([x, np.ones(size - len(x))])  # noqa: E731
        table = tabulate(feats_np, spec_np, pad(th), pad(tw))
    lays = Layout(layouts.height, layouts.width, layouts.row, layouts.col)
    if points < chunk:  # one call, padded to a power of two (few shapes to compile)
        chunk = 1 << max(3, (points - 1).bit_length())
        pad = lambda x: np.pad(np.asarray(x), ((0, 0), (0, chunk - points)), mode="edge")  # noqa: E731
        lays = jax.tree.map(pad, lays)
        index = None if index is None else pad(index)
        size = chunk
    else:
        size = points
    feats_j, spec_j = _on_device(key, _Holder(feats_np), _Holder(spec_np))
    # on the device once: a NumPy argument is converted again by every call (measured ~1 ms a call at 65,536)
    lays, index = jax.device_put((lays, index))
    pairs = table.figures[next(iter(table.figures))].shape[0] // n - 1  # the last pair is the NaN sentinel
    flat = _flat_index(lays.height, lays.width, index, pairs=pairs, dense=table.dense)
    starts = list(range(0, size, chunk))
    run = functools.partial(_run, feats_j, spec_j, table.figures, lays, flat, chunk=chunk)
    outs = jax.device_get([run(np.int32(start)) for start in starts])
    # the last call's start was clamped to size - chunk: keep its placements past the previous call's
    parts = {k: [] for k in OUTPUTS}
    for start, out in zip(starts, outs):
        skip = start - min(start, size - chunk)
        for k in parts:
            parts[k].append(out[k][skip:])
    out = {k: np.concatenate(v)[:points] for k, v in parts.items()}
    # a side outside the table reads the NaN pair, and the NaN reaches the outputs (sums and XLA's maxima propagate it)
    out["valid"] = ~np.any([np.isnan(out[k]) for k in OUTPUTS], axis=0)
    return out
