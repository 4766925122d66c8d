"""Partitioning: how each kernel's tensors split over its rectangle of cores, and what each core holds.

Weights (parameter leaves) are tiled over a grid of `gh x gw` cores at the kernel's top-left corner:
  rank >= 2  axis -2 over the grid's rows, axis -1 over its columns (a dense kernel [K, N] gives tiles
             [ceil(K/gh), ceil(N/gw)]; a conv kernel [kh, kw, Cin, Cout] tiles Cin x Cout and keeps the window
             whole; an embedding table [V, D] tiles V x D). gh = min(h, dim -2), gw = min(w, dim -1): a grid
             never has empty rows or columns of tiles. A dense anchor's weight that is not a plain [K, N]
             (DenseGeneral's [d, heads, head_dim], an einsum's, a transposed one), and a weight a scan's body
             multiplies so (its first dot's, `kernel_views`), is tiled as the matrix [K, N] of its contracted and
             free axes (`weight_axes`), a view of the stored leaf. One whose leading axes are the dot's batch axes
             (a per-head or per-expert einsum's [*batch, K, N]) keeps them whole: every core holds its tile of
             every batch slice.
  rank 1     split flat over up to h x w cores in row-major order (a bias of N values on N cores or fewer).
  one value  one word on the kernel's first core.
Uneven shapes are zero-padded to whole tiles; the padding is counted in SRAM and in the per-core work.

The dense partitioning (DESIGN.md): the input's K axis is split into gh chunks, chunk i multicast along row i;
core (i, j) multiplies it by tile W[i, j]; the partial sums are reduced along each column to the bottom row (a
batched weight: the same for every batch slice at once, its chunks and partials B times as many). Convolutions
split input channels over rows and output channels over columns the same way (a grouped one: each row receives tk
channels of every group; a batch-grouped one: the whole batch, each output channel reading its group's samples).
An embedding lookup is the same program with the indices as every row's input: each core looks up the indices in
its rows of the table, the column sums are the rows looked up. Rows of data (x's rows for dense, lookups, output
rows for conv) are split over as many copies of the tile grid as the rectangle holds, each copy with its own
weights (`grid_copies`). Other kernels (elementwise epilogues, norms, softmax, attention score matmuls) follow their
producer's layout: their work is spread evenly over the kernel's cores.

Per-core SRAM = weight tiles (x `weight_copies` in training: gradient and optimizer slots) + activation buffers
(the kernel's input and output for one batch, spread over its cores, x `act_copies`). It is checked against the
spec: `wafer.SramCapacityError` names the kernel, the core and the bytes.

The rule is written once, `kernel_shape`, over arrays of kernels (compiler/plan/features.py) with the arithmetic of
compiler/relax.py: on a plan's integer rectangles (NumPy) it gives the tilings and SRAM the plan allocates; on a
relaxed continuous layout (JAX) the differentiable cost model's per-core work. `partition` builds the plan's
`KernelPlan`s from it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
from jax.extend import core as jcore

import wafer
from compiler import relax
from compiler.plan import features as ft
from wafer import kernel as wkernel
from wafer.memory import Rect, SramCapacityError


def _cdiv(a, b):
    return -(-a // b)


# ---- the rule ---------------------------------------------------------------------------------------------------


def param_grid(layout, a, b, h, w):
    """(gh, gw, ta, tb) of a parameter tiled on an h x w rectangle: its grid of cores and tile dims.

    MATRIX: axes (a, b) over gh = min(h, a) rows and gw = min(w, b) columns, tiles ta x tb (x the leading axes);
    VECTOR of a elements: split flat over min(h * w, a) cores, row-major, ta elements each (tb = 1); SCALAR: one
    core, one element. Array-generic (compiler/relax.py).
    """
    R = relax
    gh_m, gw_m = R.minimum(h, a), R.minimum(w, b)
    cores_v = R.minimum(h * w, a)
    gw_v = R.minimum(w, cores_v)
    gh_v = R.ceil(cores_v / gw_v)
    mat, vec = layout == ft.MATRIX, layout == ft.VECTOR
    one = 1.0
    gh = R.where(mat, gh_m, R.where(vec, gh_v, one))
    gw = R.where(mat, gw_m, R.where(vec, gw_v, one))
    ta = R.where(mat, R.ceil(a / gh_m), R.where(vec, R.ceil(a / (gh_v * gw_v)), one))
    tb = R.where(mat, R.ceil(b / gw_m), one)
    return gh, gw, ta, tb


def _param_grid_ints(layout, a: int, b: int, h: int, w: int) -> tuple[int, int, int, int]:
    """`param_grid` of one parameter on one rectangle, in integer arithmetic: the same figures (the rule's snapped
    ceil of a quotient of whole numbers this small is its exact ceiling) for a tenth of the cost of NumPy scalars;
    a compile tiles every weight on every placement it tries. Other sizes take the rule itself."""
    if not (0 < a < 2**31 and 0 < b < 2**31 and 0 < h < 2**20 and 0 < w < 2**20):
        return tuple(int(v) for v in param_grid(layout, a, b, h, w))
    if layout == ft.MATRIX:
        gh, gw = min(h, a), min(w, b)
        return gh, gw, _cdiv(a, gh), _cdiv(b, gw)
    cores = min(h * w, a)
    gw = min(w, cores)
    gh = _cdiv(cores, gw)
    return gh, gw, _cdiv(a, gh * gw), 1


def grid_copies(gh, gw, m, h, w):
    """(rr, rc): copies of a gh x gw tile grid in an h x w rectangle that `m` rows of data are split over.

    The rows of copies first (as many as fit, no more than m), then as many columns of copies as leave every copy a
    row of data: rr = max(1, min(floor(h / gh), m)), rc = max(1, min(floor(w / gw), floor(m / rr))).
    """
    R = relax
    rr = R.maximum(R.minimum(R.floor(h / gh), m), 1.0)
    rc = R.maximum(R.minimum(R.floor(w / gw), R.floor(m / rr)), 1.0)
    return rr, rc


def per_core_counts(f: ft.Features, counts, cores, runs):
    """Per-core counts [n, K] of whole-kernel `counts` [n, K] (one call's batch) spread over `cores` [n], each core
    running the kernel's program `runs` [n] times a call (once per sample it holds data of): elements divide
    (rounded up); every run issues each operation once, over the run's share (a vector instruction), the
    instructions beyond one per operation (a matmul's loop) divide; every run is a task."""
    ns = relax.xp(counts, cores)
    keys = f.keys
    element = ns.asarray([len(k) >= 4 for k in keys])
    instr = ns.asarray([k == ft.INSTR for k in keys])
    task = ns.asarray([k == ft.TASK for k in keys])
    ops_col = [j for j, k in enumerate(keys) if k == ft.OPS]
    ops = counts[:, ops_col[0]] if ops_col else 0.0 * cores
    c, r = cores[:, None], runs[:, None]
    loop = relax.ceil(relax.maximum(counts - ops[:, None], 0.0) / c)
    out = relax.where(instr[None, :], ops[:, None] * r + loop, counts)
    out = relax.where(task[None, :], counts * r, out)
    return relax.where(element[None, :], relax.ceil(counts / c), out)


def spread_runs(f: ft.Features, cores, out_words):
    """Runs a call of a kernel spread over `cores` makes on each core: one per sample whose outputs it holds
    (min(batch, its output words), at least 1): layer-pipelined execution streams the samples one at a time;
    weight streaming runs each layer once on the whole batch."""
    if f.mode == "weight_streaming":
        return 1.0 + 0.0 * cores
    return relax.maximum(relax.minimum(f.batch, relax.ceil(out_words / cores)), 1.0)


def kernel_shape(f: ft.Features, h, w) -> dict:
    """The partition of every kernel on an h x w rectangle ([n] arrays), and what each of its cores holds and does.

    Returns a dict of [n] arrays (per-core counts [n, K]):
      gh, gw, ta, tb: the anchor weight's tile grid and tile dims (WEIGHT and TILED kernels);
      rr, rc, groups, mt: grid copies, row groups (rr * rc) and rows of data per group (WEIGHT kernels);
      pad: work per useful work of a WEIGHT kernel's anchor (uneven tiles and row groups), 1 elsewhere;
      grid_h, grid_w, cores: the cores that do the kernel's work (top-left of the rectangle);
      runs: runs a call of the kernel's program makes on each core (`spread_runs`); samples: the samples a WEIGHT
        kernel's core works on per call, one run of its anchor each (`runs` for other kernels);
      counts, bwd_counts: per-core counts of the kernel's forward and backward programs per call, its WEIGHT anchor
        apart (`per_core_counts`);
      mm_p, mm_c, mm_d: one run of a WEIGHT anchor on a core: out[mm_p, mm_c] += in[mm_p, mm_d] W[mm_d, mm_c]
        (a sample's rows x positions (x a batched weight's slices), the weight tile's columns, its rows x the
        window; 1 for an embedding lookup, a masked copy of a table row per index), padding included; mm_pin:
        the input positions a run's input cotangent covers (training: in[mm_pin, ta] from out[., tb] W^T);
      weight_bytes, act_bytes: SRAM bytes per core (the fullest core: the first, which holds a tile of every
        parameter; a WEIGHT kernel's cores each hold their input chunk and their partial result; per-sample
        buffers x act_copies, and training's stash);
      tile_elems [n, P]: elements of a core's tile of each parameter;
      rows_in, rows_out: rows of its input chunk a core of a WEIGHT kernel receives, rows of the partial result it
        produces (the window's halo included for a convolution's row groups);
      in_words, out_words: words per core a WEIGHT kernel multicasts along rows and reduces along columns;
      in_chunk: elements of a core's input chunk per row of data (ta; G x ta for G feature groups; 1, the index,
        for an embedding lookup);
      out_elems, tile_words: elements of a core's partial result (its reduction's adds), words of its weight tile
        (the gradient summed over grid copies in training);
      s_gh, s_gw, s_in_words, s_out_words, s_in_elems, s_out_elems [n, P]: a scan's weight dot on parameter p's
        tile grid (`scan_runs`; one core and no words for other parameters): the grid, the words per core of one
        run's multicast along rows and of its reduction down columns, and the elements of a core's input chunk and
        partial result (what the reductions' adds add: down the columns forward, along the rows backward) (the
        kernel's grid covers every such grid).
    """
    R = relax
    ns = relax.xp(f.counts, h, w)
    h, w = R.maximum(h, 1.0), R.maximum(w, 1.0)
    weight, tiled = f.anchor == ft.WEIGHT, f.anchor == ft.TILED
    gh, gw = R.minimum(h, f.a), R.minimum(w, f.b)
    rr, rc = grid_copies(gh, gw, f.m, h, w)
    groups = rr * rc
    mt = R.ceil(f.m / groups)
    ta, tb = R.ceil(f.a / gh), R.ceil(f.b / gw)
    # padding of uneven tiles and of uneven row groups is real work
    pad = R.where(weight, groups * mt * gh * ta * gw * tb / (f.m * f.a * f.b), 1.0)
    # a tiled weight that is not a plain matrix: its tiles on their grid, the work spread over at least that grid
    cores_t = R.minimum(h * w, R.maximum(gh * gw, f.out_words))
    gw_t = R.minimum(w, cores_t)
    gh_t = R.maximum(gh, R.ceil(cores_t / gw_t))
    # weightless kernels and epilogues: spread over the rectangle, at most one output word per core
    cores_s = R.minimum(h * w, R.maximum(f.out_words, 1.0))
    gw_s = R.minimum(w, cores_s)
    gh_s = R.ceil(cores_s / gw_s)
    # weight tiles: every parameter has a tile on the kernel's first core
    pl = f.p_layout
    pgh, pgw, pta, ptb = param_grid(pl, f.p_a, f.p_b, h[:, None], w[:, None])
    # a scan's weight dots run on their weights' tile grids (Features.p_trips): the kernel's grid covers them all
    scan = f.p_trips > 0
    zero_p = 0.0 * pgh
    gh_s = R.maximum(gh_s, ns.max(R.where(scan, pgh, zero_p), axis=1))
    gw_s = R.maximum(gw_s, ns.max(R.where(scan, pgw, zero_p), axis=1))
    grid_h = R.where(weight, rr * gh, R.where(tiled, gh_t, gh_s))
    grid_w = R.where(weight, rc * gw, R.where(tiled, gw_t, gw_s))
    cores = grid_h * grid_w
    elems = R.where(
        pl == ft.MATRIX, f.p_lead * pta * ptb, R.where(pl == ft.VECTOR, pta, R.where(pl == ft.SCALAR, 1.0, 0.0))
    )
    single = 4.0 * ns.sum(R.ceil(elems * f.p_isz / 4.0), axis=1)
    in_words_all, out_words_all = R.ceil(f.in_bytes / 4.0), R.ceil(f.out_bytes / 4.0)
    rows_in = R.where(groups > 1, f.in_s1 * mt + f.in_s0, f.in_full)
    rows_out = R.where(f.out_full > 0, f.out_full, mt)
    # a core's input chunk per row: ta elements of x's K (of each feature group of a grouped convolution); an
    # embedding lookup's is its index
    chunk = R.where(f.gather > 0, 1.0, ta * f.in_groups)
    in_words = R.ceil(f.n_in * rows_in * chunk * f.isz_in / 4.0)
    out_elems = f.n_out * rows_out * tb
    out_words = R.ceil(out_elems * f.isz_out / 4.0)
    runs = spread_runs(f, cores, f.out_words)
    # samples a WEIGHT kernel's core works on per call: its rows' samples (a dense anchor's rows hold the batch),
    # every sample for a convolution (its rows are spatial); one run per sample in layer-pipelined execution
    if f.mode == "weight_streaming":
        samples = 1.0 + 0.0 * cores
    else:
        samples = R.where(f.psr > 0, R.minimum(R.maximum(mt / R.maximum(f.psr, 1e-9), 1.0), f.batch), f.batch)
        samples = R.where(weight, samples, runs)
    # SRAM: per-sample buffers (x act_copies) of a core's input chunk and partial result (a WEIGHT kernel's core
    # holds its own in layer-pipelined execution: the multicast puts the chunk on every core of its row), an even
    # share elsewhere; in training also the inputs of the samples between its forward and its backward (its stash)
    # (weight streaming streams the weights past activations that stay spread over the whole wafer: an even share)
    chunks = weight & (f.mode == "pipelined")
    in_core = R.where(chunks, in_words, R.ceil(in_words_all / cores))
    out_core = R.where(chunks, out_words, R.ceil(out_words_all / cores))
    per_sample = (in_core + out_core) / samples
    stash = R.minimum(f.in_flight, samples) * in_core / samples
    act_words = R.ceil(f.act_copies * per_sample + stash)
    return dict(
        gh=gh,
        gw=gw,
        ta=ta,
        tb=tb,
        rr=rr,
        rc=rc,
        groups=groups,
        mt=mt,
        pad=pad,
        grid_h=grid_h,
        grid_w=grid_w,
        cores=cores,
        runs=runs,
        samples=samples,
        counts=per_core_counts(f, f.counts, cores, runs),
        bwd_counts=per_core_counts(f, f.bwd_counts, cores, runs),
        mm_p=R.maximum(f.n_out * rows_out, 1.0) / samples,
        mm_c=tb,
        mm_d=R.where(f.gather > 0, 1.0, ta * f.window),
        mm_pin=R.maximum(f.n_in * rows_in, 1.0) / samples,
        weight_bytes=f.weight_copies * single,
        act_bytes=4.0 * act_words,
        tile_elems=elems,
        rows_in=rows_in,
        rows_out=rows_out,
        in_words=in_words,
        in_chunk=chunk,
        out_words=out_words,
        out_elems=out_elems,
        tile_words=R.ceil(ta * tb * f.lead * f.isz_w / 4.0),
        s_gh=R.where(scan, pgh, 1.0 + zero_p),
        s_gw=R.where(scan, pgw, 1.0 + zero_p),
        s_in_words=R.where(scan, R.ceil(f.p_rows * pta * f.p_sin / 4.0), zero_p),
        s_out_words=R.where(scan, R.ceil(f.p_rows * ptb * f.p_sout / 4.0), zero_p),
        s_in_elems=R.where(scan, f.p_rows * pta, zero_p),
        s_out_elems=R.where(scan, f.p_rows * ptb, zero_p),
    )


def update_counts(f: ft.Features, shape: dict):
    """Per-core counts [n, K] of a training step's optimizer update on each core's tiles."""
    ns = relax.xp(f.upd_alpha, shape["tile_elems"])
    return f.upd_beta + ns.sum(f.upd_alpha * shape["tile_elems"][:, :, None], axis=1)


# ---- a kernel's partition on its rectangle --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamTiling:
    """How one parameter leaf is stored: tiles `[gh, gw, *tile]` on `rect`.

    Attributes:
      index: position among the flat parameter leaves.
      path: readable path, e.g. "params/Dense_0/kernel".
      shape, dtype: the leaf's shape and dtype.
      layout: "matrix" (axes -2, -1 tiled), "vector" (flat split) or "scalar".
      rect: the cores holding it (a sub-rectangle of the kernel's).
      tile: per-core array shape.
      replicas: (rows, cols) copies of the tile grid side by side from `rect`'s corner: a weight kernel whose
        rows of data are split over groups of cores keeps one copy of its weights per group. The emulator keeps
        the data of the first copy only (`rect`); the others take their room in SRAM as reservations, since
        every copy is updated with the same summed gradient and so always holds the same values.
      axes: a matrix tiled as a view (rows, cols) of its axes (`weight_axes`: an attention projection as the
        matrix [K, N] its matmul multiplies), or None: its last two axes, leading axes whole.
    """

    index: int
    path: str
    shape: tuple[int, ...]
    dtype: str
    layout: str
    rect: Rect
    tile: tuple[int, ...]
    replicas: tuple[int, int] = (1, 1)
    axes: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    @property
    def grid(self) -> tuple[int, int]:
        """Cores of one copy of the tile grid, (gh, gw)."""
        return self.rect.height, self.rect.width

    @property
    def replica_rect(self) -> Rect:
        """The cores holding all copies."""
        r = self.rect
        return Rect(r.row, r.col, r.height * self.replicas[0], r.width * self.replicas[1])

    def replica_reservations(self) -> tuple[Rect, ...]:
        """The cores of the copies other than the first: the part right of it and the part below it."""
        r, (gh, gw), (rr, rc) = self.rect, self.grid, self.replicas
        out = []
        if rc > 1:
            out.append(Rect(r.row, r.col + gw, gh, (rc - 1) * gw))
        if rr > 1:
            out.append(Rect(r.row + gh, r.col, (rr - 1) * gh, rc * gw))
        return tuple(out)

    def replicated(self, rows: int, cols: int) -> ParamTiling:
        return dataclasses.replace(self, replicas=(rows, cols))

    @property
    def tile_bytes(self) -> int:
        return wafer.memory.words_for(self.tile, self.dtype) * 4

    @property
    def blocked(self) -> wafer.layout.Blocked:
        """How its SRAM allocations store it: the whole leaf, core (i, j) owning block (i, j) (wafer/layout.py)."""
        return wafer.layout.Blocked(self.shape, self.layout, self.axes)

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """The shape its tiles cut: `[*lead, a, b]`, or a view's `[K, N]`."""
        return self.blocked.matrix_shape if self.layout == "matrix" else self.shape

    def tile_array(self, x):
        """[*shape] -> [gh, gw, *tile] (zero padding): the per-core view."""
        return self.blocked.to_cores(x, self.grid, self.tile)

    def untile(self, t):
        """[gh, gw, *tile] -> [*shape] (padding dropped)."""
        return self.blocked.from_cores(t)


def matrix_dims(shape, axes=None) -> tuple[int, int, int]:
    """(lead, a, b) of a matrix parameter: elements per (a, b) entry and its tiled dims, axes -2 and -1 or a view's
    [K, N] (`weight_axes`; lead 1)."""
    if axes is not None:
        rows, cols = axes
        return 1, math.prod(shape[i] for i in rows), math.prod(shape[i] for i in cols)
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def tile_param(index, path, aval, rect: Rect, axes=None) -> ParamTiling:
    """The tiling of one parameter leaf over a kernel's rectangle (`param_grid`); a matrix tiled as the view `axes`
    of its axes when given (`weight_axes`)."""
    shape, dtype = tuple(aval.shape), np.dtype(aval.dtype).name
    layout = ft.param_layout(shape)
    if layout == ft.SCALAR:
        return ParamTiling(index, path, shape, dtype, "scalar", Rect(rect.row, rect.col, 1, 1), ())
    if layout == ft.VECTOR:
        a, b = shape[0], 1
    else:
        lead, a, b = matrix_dims(shape, axes)
    gh, gw, ta, tb = _param_grid_ints(layout, a, b, rect.height, rect.width)
    if layout == ft.VECTOR:
        return ParamTiling(index, path, shape, dtype, "vector", Rect(rect.row, rect.col, gh, gw), (ta,))
    tile = (ta, tb) if axes is not None else (*shape[:-2], ta, tb)
    return ParamTiling(index, path, shape, dtype, "matrix", Rect(rect.row, rect.col, gh, gw), tile, axes=axes)


@dataclasses.dataclass(frozen=True, eq=False)
class KernelPlan:
    """One kernel's partition on its rectangle (what `partition` decides; its cost is the schedule's).

    Attributes:
      name, kind: from the kernel graph.
      rect: the placed rectangle; grid: (rows, cols) of the cores that do its work (top-left of rect).
      params: the ParamTilings of the weights it holds.
      weight_bytes, act_bytes: SRAM bytes per core (the fullest core).
      traffic: fabric traffic inside the kernel per batch (multicast of inputs, reduction of partial sums), at
        the kernel's place on the grid.
      flops: FLOPs of the whole kernel per batch.
      batch: samples per call.
      reduce_pattern: how a WEIGHT kernel sums its partial results down its columns (one of
        compiler.schedule.PATTERNS, the cheapest for its shape by the schedule).
      backward_traffic: training's traffic inside the kernel per batch (the output cotangent multicast up the
        columns, the input cotangent's partials reduced along the rows in `backward_pattern`; a scan kernel's
        weight dots' the same at every iteration, `scan_backward_traffic`); none in inference.
    """

    name: str
    kind: str
    rect: Rect
    grid: tuple[int, int]
    params: tuple[ParamTiling, ...]
    weight_bytes: int
    act_bytes: int
    traffic: wafer.Traffic
    flops: float
    batch: int
    reduce_pattern: str = "chain"
    backward_pattern: str = "chain"
    backward_traffic: wafer.Traffic = dataclasses.field(default_factory=wafer.Traffic.none)

    @property
    def cores(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def grid_rect(self) -> Rect:
        """The cores that do the work."""
        return Rect(self.rect.row, self.rect.col, *self.grid)

    @property
    def sram_bytes(self) -> int:
        return self.weight_bytes + self.act_bytes


def embedding_gather(eqn) -> bool:
    """Whether `eqn` is an embedding lookup: a gather of whole rows of a 2-D table `[V, D]` by indices `[..., 1]`
    (`jnp.take(table, ids, axis=0)`, `table[ids]`, Flax's Embed), giving `[..., D]`."""
    if eqn is None or eqn.primitive.name != "gather":
        return False
    dn, (table, idx) = eqn.params["dimension_numbers"], (v.aval for v in eqn.invars)
    return (
        table.ndim == 2
        and idx.ndim >= 1
        and idx.shape[-1] == 1
        and tuple(dn.offset_dims) == (idx.ndim - 1,)
        and tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and not tuple(getattr(dn, "operand_batching_dims", ()))
        and tuple(eqn.params["slice_sizes"]) == (1, table.shape[1])
    )


def anchor_operand(kernel, traced):
    """(anchor eqn, flat param index of its weight, the weight's operand position, perm) of a weight kernel, else
    (None, None, None, None). The anchor is the kernel's first dot_general with a weight operand (the right one
    preferred, `x @ W`; the left one, `W @ x`, too), convolution with a weight kernel, or embedding lookup from a
    weight table (`embedding_gather`). The operand may be the weight cast (a precision policy's 16-bit copy) or
    transposed (`x @ E.T`, a tied embedding's `attend`): perm is the transposition (operand axis a is the weight's
    axis perm[a]), None for none."""
    param_vars = traced.param_index
    # A cast weight is still the weight: a precision policy reads a 16-bit copy of float32 master weights; a
    # transposed one is the weight read along other axes.
    views = {}
    for e in kernel.eqns:
        if e.primitive.name == "convert_element_type":
            views[e.outvars[0]] = (e.invars[0], None)
        elif e.primitive.name == "transpose":
            views[e.outvars[0]] = (e.invars[0], tuple(e.params["permutation"]))
    for eqn in kernel.eqns:
        name = eqn.primitive.name
        if name == "dot_general" and len(eqn.invars) == 2:
            positions = (1, 0)
        elif name == "conv_general_dilated" and len(eqn.invars) == 2:
            positions = (1,)
        elif embedding_gather(eqn):
            positions = (0,)
        else:
            continue
        for pos in positions:
            w = eqn.invars[pos]
            perm = list(range(w.aval.ndim)) if isinstance(w, jcore.Var) else []
            while isinstance(w, jcore.Var) and w not in param_vars and w in views:
                w, p = views[w]
                if p is not None:  # w_out axis j is w_in axis p[j]
                    perm = [p[a] for a in perm]
            if isinstance(w, jcore.Var) and w in param_vars and param_vars[w] in kernel.params:
                perm = None if perm == sorted(perm) else tuple(perm)
                return eqn, param_vars[w], pos, perm
    return None, None, None, None


def _weight_views(eqns) -> dict:
    """var -> (the var it views, perm or None) for the casts and transposes among `eqns` (`anchor_operand`)."""
    views = {}
    for e in eqns:
        if e.primitive.name == "convert_element_type":
            views[e.outvars[0]] = (e.invars[0], None)
        elif e.primitive.name == "transpose":
            views[e.outvars[0]] = (e.invars[0], tuple(e.params["permutation"]))
    return views


def _resolve(w, views, perm):
    """Follow `w` through `views` to the var it is a view of; (that var, the composed perm)."""
    while isinstance(w, jcore.Var) and w in views:
        w, p = views[w]
        if p is not None:  # w_out axis j is w_in axis p[j]
            perm = [p[a] for a in perm]
    return w, perm


@dataclasses.dataclass(frozen=True, eq=False)
class ScanDot:
    """A `dot_general` in a scan's body whose operand `pos` is (a cast or transpose, `perm`, of) the kernel's
    parameter `widx`, passed into the scan as a constant: the per-core path runs it on the weight's tiles at every
    one of its `trips` iterations (compiler/run/percore.py). `scan` is the kernel's (top-level) scan; `nest` the
    scans between its body and the dot's, outermost first (a scan in a scan's body, its weight passed down as a
    constant at every level), and `trips` the product of all their lengths."""

    scan: object
    dot: object
    widx: int
    pos: int
    perm: tuple[int, ...] | None
    trips: int
    nest: tuple = ()

    @property
    def path(self) -> tuple:
        """The scans from the kernel's to the one whose body holds the dot."""
        return (self.scan, *self.nest)


def scan_dots(kernel, traced) -> list[ScanDot]:
    """The weight dots of every scan at the top level of `kernel` (`ScanDot`), in program order: a recurrent cell's
    matmuls by its weights (Flax `nn.RNN` of an LSTMCell, GRUCell or SimpleCell, or a hand-written `lax.scan`),
    those of scans nested in its body included (their weight a constant of every scan down to it)."""
    param_vars = traced.param_index
    outer = _weight_views(kernel.eqns)

    def top(v, perm):  # a kernel-level var -> (parameter index, perm) when it is (a view of) a kernel parameter
        w, perm = _resolve(v, outer, perm)
        if isinstance(w, jcore.Var) and w in param_vars and param_vars[w] in kernel.params:
            return param_vars[w], perm
        return None

    out = []
    for eqn in kernel.eqns:
        if eqn.primitive.name == "scan":
            _body_dots(eqn, eqn, (), int(eqn.params["length"]), top, out)
    return out


def _body_dots(scan, eqn, nest, trips, resolve, out):
    """Append to `out` the weight dots of the body of `eqn` (a scan `nest` deep in the kernel's `scan`, run `trips`
    times in all) and of the scans in it; `resolve` maps a var of the enclosing level to its parameter."""
    body, nc = eqn.params["jaxpr"].jaxpr, eqn.params["num_consts"]
    consts = dict(zip(body.invars[:nc], eqn.invars[:nc]))
    inner = _weight_views(body.eqns)

    def here(v, perm):
        v, perm = _resolve(v, inner, perm)
        if not isinstance(v, jcore.Var) or v not in consts or not isinstance(consts[v], jcore.Var):
            return None
        return resolve(consts[v], perm)

    for e in body.eqns:
        if e.primitive.name == "scan":
            _body_dots(scan, e, (*nest, e), trips * int(e.params["length"]), here, out)
        if e.primitive.name != "dot_general" or len(e.invars) != 2:
            continue
        for pos in (1, 0):
            w = e.invars[pos]
            hit = here(w, list(range(w.aval.ndim))) if isinstance(w, jcore.Var) else None
            if hit is not None:
                widx, perm = hit
                perm = None if perm == sorted(perm) else tuple(perm)
                out.append(ScanDot(scan, e, widx, pos, perm, trips, nest))
                break


def scan_runs(kernel, traced, tilings) -> list[ScanDot]:
    """The `scan_dots` the per-core path runs on their weights' `tilings` (ParamTilings by parameter index):
    those `per_core_kind` runs as "dense" on the weight as tiled (the matrix [K, N] of its first use,
    `kernel_views`: either operand, transposed or not), all uses of a weight with the same rows and dtypes as its
    first (the partition rule charges one shape per weight: `Features.p_trips`), and whose results' dtype class is
    the first run's (the kernel's one class of adds, `Features.acc_class`). The others, and why, are
    `scan_left_off`'s."""
    return _scan_split(kernel, traced, tilings)[0]


def scan_left_off(kernel, traced, tilings) -> list[tuple[ScanDot, str]]:
    """The `scan_dots` by a weight tiled as a matrix that the per-core path does not run on its tiles (they run
    on the assembled weight, uncharged), each with the reason (`scan_runs`)."""
    return _scan_split(kernel, traced, tilings)[1]


def _scan_split(kernel, traced, tilings):
    runs, left, first, acc = [], [], {}, None
    for d in scan_dots(kernel, traced):
        tiling = tilings.get(d.widx)
        if tiling is None or tiling.layout != "matrix":  # one element or a vector: nothing to tile
            continue
        if per_core_kind(d.dot, tiling, d.pos, d.perm) != "dense":
            (lb, rb) = d.dot.params["dimension_numbers"][1]
            if lb or rb:
                # an anchor's batched rule runs such a weight per core, but the scan program, its record and its
                # charges carry one [K, N] tile grid per weight (compiler/run/percore.py)
                left.append((d, "batch dimensions (a batched weight: the scan program has one [K, N] grid per weight)"))
            else:
                left.append((d, f"multiplied as another matrix than the one it is tiled as {tiling.axes}"))
            continue
        sig = (split_rows(d.dot, "dense", d.pos), *scan_dot_itemsizes(d))
        cls = scan_dot_class(d)
        if first.setdefault(d.widx, sig) != sig:
            left.append((d, f"rows and dtypes {sig} unlike its first use's {first[d.widx]} (one shape per weight)"))
        elif (acc := acc or cls) != cls:
            left.append((d, f"partial sums of class {cls}, the kernel's first dot's being {acc}"))
        else:
            runs.append(d)
    return runs, left


def scan_dot_class(d: ScanDot) -> str:
    """The dtype class of a scan weight dot's partial sums, which its reductions add (`wkernel.dtype_class`)."""
    return wkernel.dtype_class(d.dot.outvars[0].aval.dtype)


def kernel_views(kernel, traced) -> dict:
    """{parameter index: the matrix view its tiles cut (`weight_axes`, None for its plain layout)} of the weights
    a kernel multiplies as a dense matrix: its anchor's (`anchor_operand`), and each weight a scan's body multiplies
    (`scan_dots`), as its first use does (`x @ W.T` contracts W's last axis: W is tiled as [K, N] = W.T)."""
    eqn, widx, pos, perm = anchor_operand(kernel, traced)
    views = {widx: weight_axes(eqn, pos, perm)} if widx is not None else {}
    for d in scan_dots(kernel, traced):
        views.setdefault(d.widx, weight_axes(d.dot, d.pos, d.perm))
    return views


def scan_dot_itemsizes(d: ScanDot) -> tuple[int, int]:
    """(input, output) element bytes of a scan's weight dot."""
    x, y = d.dot.invars[1 - d.pos].aval, d.dot.outvars[0].aval
    return np.dtype(x.dtype).itemsize, np.dtype(y.dtype).itemsize


def scan_traffic(runs: list[ScanDot], tilings) -> wafer.Traffic:
    """Region-local traffic of a scan kernel's weight dots run per core (`scan_runs`): each one's multicast of
    input chunks along rows and chained reduction down columns (`anchor_traffic`, one copy of the tile grid), once
    per iteration, one after another."""
    out = wafer.Traffic.none()
    for d in runs:
        m = split_rows(d.dot, "dense", d.pos)
        t = anchor_traffic(d.dot, tilings[d.widx], m, m, "chain", d.pos, d.perm)
        for _ in range(d.trips):
            out = out + t
    return out


def scan_backward_traffic(runs: list[ScanDot], tilings) -> wafer.Traffic:
    """Region-local traffic of the backward of a scan kernel's weight dots (`scan_runs`): each one's output
    cotangent multicast up its weight's columns from the bottom row and its input's cotangent partials reduced along
    the rows to the west edge in a chain (`anchor_backward_traffic`, one copy of the tile grid), once per iteration,
    one after another (the schedule's `scan_bwd_comm`)."""
    out = wafer.Traffic.none()
    for d in runs:
        m = split_rows(d.dot, "dense", d.pos)
        t = anchor_backward_traffic(d.dot, tilings[d.widx], m, m, "chain", True, d.pos, d.perm)
        for _ in range(d.trips):
            out = out + t
    return out


def row_broadcasts(kernel, traced, tilings) -> dict:
    """{eqn: flat parameter index} of the broadcasts in `kernel` of (a cast of) a one-row weight [1, D] tiled as the
    matrix [1, D] on one row of cores (`tilings`: {parameter index: ParamTiling}), with D the output's last axis:
    Flax's `nn.Embed(1, D)`, which broadcasts its single row for every index and looks nothing up. The per-core path
    has each core of that row broadcast its own tile (compiler/run/percore.py): no input reaches the kernel's cores
    and nothing is summed, so nothing crosses the fabric (no record, no schedule charge)."""
    param_vars = traced.param_index
    views = _weight_views(kernel.eqns)
    out = {}
    for eqn in kernel.eqns:
        if eqn.primitive.name != "broadcast_in_dim" or not isinstance(eqn.invars[0], jcore.Var):
            continue
        w = eqn.invars[0]
        nd_out = eqn.outvars[0].aval.ndim
        if w.aval.ndim != 2 or w.aval.shape[0] != 1 or tuple(eqn.params["broadcast_dimensions"])[-1] != nd_out - 1:
            continue
        w, perm = _resolve(w, views, [0, 1])
        idx = param_vars.get(w) if isinstance(w, jcore.Var) else None
        tiling = tilings.get(idx)
        if perm == [0, 1] and tiling is not None and tiling.layout == "matrix" and tiling.axes is None:
            out[eqn] = idx
    return out


def anchor_weight(kernel, traced):
    """(anchor eqn, flat param index of its weight) of a weight kernel (`anchor_operand`), else (None, None)."""
    return anchor_operand(kernel, traced)[:2]


def weight_axes(eqn, pos: int, perm=None):
    """The matrix a dense anchor multiplies its weight (operand `pos`) as, when that is not the weight's plain
    layout: (rows, cols), its contracted axes (in axis order) flattened into the matrix's rows K and its free axes
    into its columns N (an attention projection's `[d, heads, head_dim]` is `[d, heads * head_dim]`, its output
    projection's `[heads, head_dim, d]` is `[heads * head_dim, d]`, a tied embedding's `attend` contracts a table
    `[V, D]` on D: `[D, V]`), in the weight's own axes when the operand is it transposed by `perm`
    (`anchor_operand`). None for a 2-D `[K, N]` contracted on its first axis, and for anything else."""
    if eqn is None or eqn.primitive.name != "dot_general":
        return None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    nd = eqn.invars[pos].aval.ndim
    wc = tuple(sorted(rc if pos == 1 else lc))
    if lb or rb or not wc or len(wc) == nd:
        return None
    perm = tuple(range(nd)) if perm is None else perm
    # the output holds the operand's free axes in order: the matrix's columns follow them
    rows, cols = tuple(perm[a] for a in wc), tuple(perm[a] for a in range(nd) if a not in wc)
    return None if (nd == 2 and rows == (0,) and cols == (1,)) else (rows, cols)


def batch_dims(eqn, pos: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the weight operand `pos`'s batch axes, the data operand's) of a dot_general, pairwise in the dot's order."""
    _, (lb, rb) = eqn.params["dimension_numbers"]
    return (tuple(rb), tuple(lb)) if pos == 1 else (tuple(lb), tuple(rb))


def per_core_kind(eqn, tiling, pos: int | None = None, perm=None) -> str | None:
    """How the per-core path runs this anchor literally on its weight (operand `pos`; default: the right operand of
    a dot or conv, the table of a gather; transposed by `perm`, `anchor_operand`) tiles: "dense", "batched", "conv"
    or "gather"; None when it cannot (the weight not tiled as the matrix it multiplies, a batched weight whose batch
    axes do not lead or whose matrix is not its last two axes [K, N], a transposed convolution kernel or table).

      dense    dot_general(x, W) with no batch dimensions, W tiled as the matrix [K, N] of its contracted and free
               axes (`weight_axes`; Flax Dense and DenseGeneral, einsums with weights, either operand);
      batched  dot_general(x, W) with batch dimensions, W [*batch, K, N] (per-head or per-expert einsums,
               `bhd,hde->bhe`): its leading axes are the dot's batch axes in order, then one contracted and one free
               axis; tiled as a stack of [K, N] matrices (every core holds its tile of every batch slice, the
               matrix layout's leading axes whole);
      conv     conv_general_dilated(x, W), W [*window, in, out] per group (feature groups: grouped and depthwise
               convolutions; batch groups: each output channel reads its group's slice of the batch);
      gather   an embedding lookup of rows of W [V, D] (`embedding_gather`).
    """
    if eqn is None or tiling is None or tiling.layout != "matrix":
        return None
    name = eqn.primitive.name
    pos = (0 if name == "gather" else 1) if pos is None else pos
    if name == "dot_general":
        (lc, rc), _ = eqn.params["dimension_numbers"]
        wb, _ = batch_dims(eqn, pos)
        nd = eqn.invars[pos].aval.ndim
        wc = rc if pos == 1 else lc
        if wb:
            plain = tuple(wb) == tuple(range(len(wb))) and tuple(wc) == (nd - 2,) and nd == len(wb) + 2
            return "batched" if plain and perm is None and tiling.axes is None else None
        if not wc or len(wc) == nd:
            return None
        axes = weight_axes(eqn, pos, perm)
        if tiling.axes == axes and (axes is not None or len(tiling.shape) == 2):
            return "dense"
        return None
    if perm is not None:
        return None
    if name == "conv_general_dilated" and pos == 1:
        dn = eqn.params["dimension_numbers"]
        nd = len(tiling.shape)
        if (
            tiling.axes is None
            and tuple(dn.rhs_spec[:2]) == (nd - 1, nd - 2)
            and tuple(dn.rhs_spec[2:]) == tuple(range(nd - 2))
        ):
            return "conv"
    if name == "gather" and pos == 0 and embedding_gather(eqn) and tiling.axes is None:
        return "gather"
    return None


def split_rows(eqn, kind, pos: int = 1) -> int:
    """Rows of data an anchor can split over groups of cores: the rows of x for dense and batched (x's free axes,
    flattened: x[M, K], of every batch slice), the lookups of a gather, the output's first spatial axis for conv
    (input rows with their window halo go to each group); 1 if not splittable."""
    if kind in ("dense", "batched"):
        (lc, rc), _ = eqn.params["dimension_numbers"]
        x = eqn.invars[1 - pos].aval
        xc = lc if pos == 1 else rc
        _, xb = batch_dims(eqn, pos)
        return math.prod(d for a, d in enumerate(x.shape) if a not in xc and a not in xb)
    if kind == "gather":
        return math.prod(eqn.invars[1].aval.shape[:-1])
    if kind == "conv" and all(d == 1 for d in eqn.params["lhs_dilation"]) and len(eqn.params["padding"]):
        dn = eqn.params["dimension_numbers"]
        return eqn.outvars[0].aval.shape[dn.out_spec[2]]
    return 1


def conv_rows_span(eqn, rows_per_group: int) -> int:
    """Input rows (first spatial axis, after padding) one group of `rows_per_group` output rows reads."""
    dn = eqn.params["dimension_numbers"]
    k = eqn.invars[1].aval.shape[dn.rhs_spec[2]]
    stride, dil = eqn.params["window_strides"][0], eqn.params["rhs_dilation"][0]
    return (rows_per_group - 1) * stride + (k - 1) * dil + 1


def group_offsets(tiling: ParamTiling):
    gh, gw = tiling.grid
    rr, rc = tiling.replicas
    return [(p * gh, q * gw) for p in range(rr) for q in range(rc)]


def _anchor_shapes(eqn, tiling: ParamTiling, rows_in: int, rows_out: int, pos: int | None = None, perm=None):
    """Per-core (input chunk, partial result) ShapeDtypeStructs of a per-core anchor on its grid [gh, gw, ...]:
    dense, rows of x's K chunk and of the partial [rows, tn]; batched, the same for each of the weight's B batch
    slices, [B, rows, tk] and [B, rows, tn]; gather, the indices (one per row) and the partial
    [rows, tn]; conv, the image with its tk input channels of every feature group (G x tk) and the partial with tn
    output channels."""
    kind = per_core_kind(eqn, tiling, pos, perm)
    gh, gw = tiling.grid
    tk, tn = tiling.tile[-2:]
    out = eqn.outvars[0].aval
    if kind == "dense":
        lhs = eqn.invars[0 if pos == 1 or pos is None else 1].aval
        in_shape, out_shape = (rows_in, tk), (rows_out, tn)
    elif kind == "batched":
        lhs = eqn.invars[0 if pos == 1 or pos is None else 1].aval
        nb = math.prod(tiling.shape[:-2])
        in_shape, out_shape = (nb, rows_in, tk), (nb, rows_out, tn)
    elif kind == "gather":
        lhs = eqn.invars[1].aval
        in_shape, out_shape = (rows_in,), (rows_out, tn)
    else:
        lhs = eqn.invars[0].aval
        dn = eqn.params["dimension_numbers"]
        sp_in, sp_out = dn.lhs_spec[2], dn.out_spec[2]
        # every core of a row receives tk channels of each feature group (its columns' output channels may belong
        # to any group) and picks those of its own columns' groups
        tkg = tk * eqn.params["feature_group_count"]
        in_shape = tuple(
            tkg if a == dn.lhs_spec[1] else (rows_in if a == sp_in else d) for a, d in enumerate(lhs.shape)
        )
        out_shape = tuple(
            tn if a == dn.out_spec[1] else (rows_out if a == sp_out else d) for a, d in enumerate(out.shape)
        )
    x = jax.ShapeDtypeStruct((gh, gw, *in_shape), lhs.dtype)
    p = jax.ShapeDtypeStruct((gh, gw, *out_shape), out.dtype)
    return x, p


def anchor_traffic(
    eqn,
    tiling: ParamTiling,
    rows_in: int,
    rows_out: int,
    pattern: str = "chain",
    pos: int | None = None,
    perm=None,
) -> wafer.Traffic:
    """Region-local traffic of a per-core anchor: in every group, input chunks multicast along rows and partial
    sums reduced along columns in `pattern`. Shapes are exactly those the per-core path moves
    (compiler/run/percore.py): a core receives `rows_in` rows of its input chunk and produces `rows_out` rows of its
    partial result."""
    if per_core_kind(eqn, tiling, pos, perm) is None:
        return wafer.Traffic.none()
    x, p = _anchor_shapes(eqn, tiling, rows_in, rows_out, pos, perm)
    return _forward_group_traffic(_key(x), _key(p), pattern).replicate(group_offsets(tiling))


def anchor_backward_traffic(
    eqn,
    tiling: ParamTiling,
    rows_in: int,
    rows_out: int,
    pattern: str = "chain",
    dx: bool = True,
    pos: int | None = None,
    perm=None,
) -> wafer.Traffic:
    """Region-local traffic of a per-core anchor's backward: in every group, the output cotangent multicast up each
    column from the bottom row, and (`dx`) the input cotangent's partials reduced along each row to the west edge
    in `pattern`."""
    if per_core_kind(eqn, tiling, pos, perm) is None:
        return wafer.Traffic.none()
    x, p = _anchor_shapes(eqn, tiling, rows_in, rows_out, pos, perm)
    return _backward_group_traffic(_key(x), _key(p), pattern, bool(dx)).replicate(group_offsets(tiling))


# The traffic of one tile grid depends only on the shapes it moves and the pattern, and a deep model repeats the
# same few kernels layer after layer: tracing the fabric primitives once per distinct shape (jax.eval_shape, ~5 ms
# each) instead of once per kernel took a 24-layer LM's partition from ~1 s to ~0.1 s. Traffic is immutable.
def _key(s: jax.ShapeDtypeStruct) -> tuple:
    return tuple(s.shape), np.dtype(s.dtype).name


@functools.lru_cache(maxsize=1024)
def _forward_group_traffic(x, p, pattern: str) -> wafer.Traffic:
    _, t_in = jax.eval_shape(lambda a: wafer.multicast(a, "row", src=0), jax.ShapeDtypeStruct(*x))
    _, t_out = jax.eval_shape(
        lambda a: wafer.reduce(a, "col", "sum", to="last", pattern=pattern), jax.ShapeDtypeStruct(*p)
    )
    return t_in + t_out


@functools.lru_cache(maxsize=1024)
def _backward_group_traffic(x, p, pattern: str, dx: bool) -> wafer.Traffic:
    _, t = jax.eval_shape(lambda a: wafer.multicast(a, "col", src="last"), jax.ShapeDtypeStruct(*p))
    if dx:
        _, t_dx = jax.eval_shape(
            lambda a: wafer.reduce(a, "row", "sum", to="first", pattern=pattern), jax.ShapeDtypeStruct(*x)
        )
        t = t + t_dx
    return t


def partition(graph, placement, feats: ft.Features, spec) -> dict[str, KernelPlan]:
    """Every kernel's `KernelPlan` on its rectangle of `placement`, by `kernel_shape`, with the reduction patterns
    the schedule picks (`compiler.schedule.kernel_figures`).

    Raises:
      wafer.SramCapacityError: a kernel's fullest core holds more than the spec's data bytes per core (its SRAM
        less the code's reservation); the message names the kernel, its source line, its cores and its bytes.
    """
    from compiler.schedule import PATTERNS, kernel_figures, layout_of

    traced = graph.traced
    rects = [Rect(*(int(v) for v in placement[k.name])) for k in graph.kernels]
    shape = kernel_figures(feats, layout_of(placement, feats.names), spec)
    training = feats.task == "training"
    capacity = spec.data_bytes_per_core
    # the SRAM check first, on the schedule's figures alone: an automatic placement that overflows is placed again
    # (compiler/plan/plan.py partition_pass), so a failed attempt should not pay for tilings and traffic
    for i, (kernel, rect) in enumerate(zip(graph.kernels, rects)):
        weight_bytes, act_bytes = int(shape["weight_bytes"][i]), int(shape["act_bytes"][i])
        if weight_bytes + act_bytes > capacity:
            g = int(shape["grid_h"][i]), int(shape["grid_w"][i])
            raise SramCapacityError(
                kernel.name,
                (rect.row, rect.col),
                weight_bytes + act_bytes,
                capacity,
                capacity,
                detail=(
                    f"kernel {kernel.name!r} ({kernel.kind}, {kernel.source}) on {g[0]}x{g[1]} cores holds "
                    f"{weight_bytes} B of weights (x{feats.weight_copies} copies) and {act_bytes} B of "
                    f"activations per core, {capacity} B being free for data ({spec.code_bytes_per_core} B of "
                    f"{spec.sram_bytes_per_core} kept for code); give it more cores (a larger rectangle or wafer), a "
                    f"smaller batch, or use weight streaming"
                ),
            )
    plans = {}
    for i, (kernel, rect) in enumerate(zip(graph.kernels, rects)):
        eqn, widx, opos, perm = anchor_operand(kernel, traced)
        view = kernel_views(kernel, traced)
        tilings = [
            tile_param(j, traced.param_paths[j], traced.param_avals[j], rect, view.get(j)) for j in kernel.params
        ]
        traffic = backward = wafer.Traffic.none()
        pattern = PATTERNS[int(shape["reduce_pattern"][i])]
        b_pattern = PATTERNS[int(shape["bwd_pattern"][i])] if training else "chain"
        if feats.anchor[i] == ft.WEIGHT:
            pos = kernel.params.index(widx)
            tilings[pos] = tilings[pos].replicated(int(shape["rr"][i]), int(shape["rc"][i]))
            rows = int(shape["rows_in"][i]), int(shape["rows_out"][i])
            traffic = anchor_traffic(eqn, tilings[pos], *rows, pattern, opos, perm).at(rect.row, rect.col)
            if training:
                dx = bool(feats.dx[i])
                backward = anchor_backward_traffic(eqn, tilings[pos], *rows, b_pattern, dx, opos, perm)
                backward = backward.at(rect.row, rect.col)
        else:
            pattern = b_pattern = "chain"
            # a scan's weight dots, per core on their weights' tiles at every iteration; in training their backward's
            # multicasts and reductions on the same tiles (the schedule's scan_comm and scan_bwd_comm)
            by_index = {t.index: t for t in tilings}
            runs = scan_runs(kernel, traced, by_index)
            traffic = scan_traffic(runs, by_index).at(rect.row, rect.col)
            if training:
                backward = scan_backward_traffic(runs, by_index).at(rect.row, rect.col)
        plan = KernelPlan(
            kernel.name,
            kernel.kind,
            rect,
            (int(shape["grid_h"][i]), int(shape["grid_w"][i])),
            tuple(tilings),
            int(shape["weight_bytes"][i]),
            int(shape["act_bytes"][i]),
            traffic,
            float(kernel.flops),
            ft.graph_batch(graph),
            pattern,
            b_pattern,
            backward,
        )
        plans[kernel.name] = plan
    return plans


# ---- sizes for placement ----------------------------------------------------------------------------------------


def sram_need(
    kernel, traced, *, weight_copies: int = 1, act_copies: int = 1, act_itemsize: int | None = None
) -> tuple[int, int]:
    """(weight bytes, activation bytes) a kernel keeps in SRAM over all its cores (before tiling granularity)."""
    weights = weight_copies * sum(
        int(np.prod(traced.param_avals[i].shape)) * np.dtype(traced.param_avals[i].dtype).itemsize
        for i in kernel.params
    )
    acts = ft.act_bytes(kernel.inputs, act_itemsize) + ft.act_bytes(kernel.outputs, act_itemsize)
    return int(weights), int(act_copies * acts)


def min_cores(
    kernel,
    traced,
    spec,
    *,
    headroom: float = 0.9,
    weight_copies: int = 1,
    act_copies: int = 1,
    act_itemsize: int | None = None,
) -> int:
    """Fewest cores whose SRAM could hold a kernel's weights and activations (before tiling granularity)."""
    total = sum(
        sram_need(kernel, traced, weight_copies=weight_copies, act_copies=act_copies, act_itemsize=act_itemsize)
    )
    return max(1, _cdiv(int(total), int(spec.data_bytes_per_core * headroom)))


def max_cores(kernel, traced) -> int:
    """More cores than this do not help a kernel: a weight kernel's tiles times the rows of data it can split
    (one weight element and one row per core); a weightless kernel's output elements."""
    anchor, widx, pos, perm = anchor_operand(kernel, traced)
    if widx is not None:
        shape = traced.param_avals[widx].shape
        if len(shape) >= 2:
            axes = weight_axes(anchor, pos, perm)
            _, a, b = matrix_dims(shape, axes)
            tiling = tile_param(widx, "", traced.param_avals[widx], Rect(0, 0, a, b), axes)
            kind = per_core_kind(anchor, tiling, pos, perm)
            rows = split_rows(anchor, kind, pos) if kind else 1
            return max(1, int(a * b * rows))
    return max(1, kernel.out_bytes // 4)
