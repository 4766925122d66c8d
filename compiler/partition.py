"""Partitioning: how each kernel's tensors split over its rectangle of cores, and what each core holds.

Weights (parameter leaves) are tiled over a grid of `gh x gw` cores at the kernel's top-left corner:
  rank >= 2  axis -2 over the grid's rows, axis -1 over its columns (a dense kernel [K, N] gives tiles
             [ceil(K/gh), ceil(N/gw)]; a conv kernel [kh, kw, Cin, Cout] tiles Cin x Cout and keeps the window
             whole; an embedding table [V, D] tiles V x D). gh = min(h, dim -2), gw = min(w, dim -1): a grid
             never has empty rows or columns of tiles.
  rank 1     split flat over up to h x w cores in row-major order (a bias of N values on N cores or fewer).
  rank 0     one word on the kernel's first core.
Uneven shapes are zero-padded to whole tiles; the padding is counted in SRAM and in the per-core work.

The dense partitioning (DESIGN.md): the input's K axis is split into gh chunks, chunk i multicast along row i;
core (i, j) multiplies it by tile W[i, j]; the partial sums are reduced along each column to the bottom row.
Convolutions split input channels over rows and output channels over columns the same way; embedding lookups
split the vocabulary over rows and the features over columns (a core contributes rows it holds; partial
results are summed along columns). Other kernels (elementwise epilogues, norms, softmax, attention score
matmuls) follow their producer's layout: their work is spread evenly over the kernel's cores.

Per-core SRAM = weight tiles + activation buffers (the kernel's input and output for one batch, spread over its
cores). It is checked against the spec: `wafer.SramCapacityError` names the kernel, the core and the bytes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

import wafer
from wafer import cost
from wafer.memory import Rect, SramCapacityError


def _cdiv(a, b):
    return -(-a // b)


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
    """

    index: int
    path: str
    shape: tuple[int, ...]
    dtype: str
    layout: str
    rect: Rect
    tile: tuple[int, ...]
    replicas: tuple[int, int] = (1, 1)

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

    def tile_array(self, x):
        """[*shape] -> [gh, gw, *tile] (zero padding)."""
        gh, gw = self.grid
        if self.layout == "scalar":
            return jnp.reshape(x, (1, 1))
        if self.layout == "vector":
            (t,) = self.tile
            flat = jnp.pad(jnp.ravel(x), (0, gh * gw * t - x.size))
            return flat.reshape(gh, gw, t)
        *lead, a, b = self.shape
        ta, tb = self.tile[-2:]
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, gh * ta - a), (0, gw * tb - b)])
        x = x.reshape(*lead, gh, ta, gw, tb)
        n = len(lead)
        perm = (n, n + 2, *range(n), n + 1, n + 3)
        return jnp.transpose(x, perm)

    def untile(self, t):
        """[gh, gw, *tile] -> [*shape] (padding dropped)."""
        gh, gw = self.grid
        if self.layout == "scalar":
            return jnp.reshape(t, ())
        if self.layout == "vector":
            return jnp.ravel(t)[: math.prod(self.shape)].reshape(self.shape)
        *lead, a, b = self.shape
        ta, tb = self.tile[-2:]
        n = len(lead)
        # [gh, gw, *lead, ta, tb] -> [*lead, gh, ta, gw, tb]
        perm = (*range(2, 2 + n), 0, 2 + n, 1, 3 + n)
        x = jnp.transpose(t, perm).reshape(*lead, gh * ta, gw * tb)
        return x[..., :a, :b]


def tile_param(index, path, aval, rect: Rect) -> ParamTiling:
    """The tiling of one parameter leaf over a kernel's rectangle."""
    shape, dtype = tuple(aval.shape), np.dtype(aval.dtype).name
    h, w = rect.height, rect.width
    if len(shape) == 0 or math.prod(shape) == 1:
        return ParamTiling(index, path, shape, dtype, "scalar", Rect(rect.row, rect.col, 1, 1), ())
    if len(shape) == 1:
        n = shape[0]
        cores = min(h * w, n)
        gw = min(w, cores)
        gh = _cdiv(cores, gw)
        t = _cdiv(n, gh * gw)
        return ParamTiling(index, path, shape, dtype, "vector", Rect(rect.row, rect.col, gh, gw), (t,))
    *lead, a, b = shape
    gh, gw = min(h, a), min(w, b)
    tile = (*lead, _cdiv(a, gh), _cdiv(b, gw))
    return ParamTiling(index, path, shape, dtype, "matrix", Rect(rect.row, rect.col, gh, gw), tile)


@dataclasses.dataclass(frozen=True, eq=False)
class KernelPlan:
    """One kernel's partitioning on its rectangle, and its static cost per batch.

    Attributes:
      name, kind: from the kernel graph.
      rect: the placed rectangle; grid: (gh, gw) cores that do its work (top-left of rect).
      params: the ParamTilings of the weights it holds.
      weight_bytes, act_bytes: SRAM bytes per core (the fullest core).
      counts: {(op_class, dtype_class): elements} per core per batch.
      read_bytes, write_bytes: SRAM traffic per core per batch.
      traffic: fabric traffic inside the kernel per batch (multicast of inputs, reduction of partial sums),
        at the kernel's place on the grid.
      flops: FLOPs of the whole kernel per batch.
      batch: samples per call.
    """

    name: str
    kind: str
    rect: Rect
    grid: tuple[int, int]
    params: tuple[ParamTiling, ...]
    weight_bytes: int
    act_bytes: int
    counts: dict
    read_bytes: float
    write_bytes: float
    traffic: wafer.Traffic
    flops: float
    batch: int

    @property
    def cores(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def sram_bytes(self) -> int:
        return self.weight_bytes + self.act_bytes

    def compute_cycles(self, spec):
        return cost.kernel_cycles(spec, self.counts, self.read_bytes, self.write_bytes)

    def comm_cycles(self, spec):
        return self.traffic.cycles(spec)

    def cycles(self, spec):
        """Cycles per batch on `spec`."""
        return cost.superstep_cycles(spec, self.compute_cycles(spec), self.comm_cycles(spec))

    def kernel_cost(self) -> wafer.KernelCost:
        return wafer.KernelCost(
            Rect(self.rect.row, self.rect.col, *self.grid), self.counts, self.read_bytes, self.write_bytes
        )


def anchor_weight(kernel, traced):
    """(anchor eqn, flat param index of its weight operand) for dot_general/conv kernels, else (None, None)."""
    param_vars = {v: i for i, v in enumerate(traced.jaxpr.invars[: traced.n_params])}
    # A cast weight is still the weight: a precision policy reads a 16-bit copy of float32 master weights.
    casts = {e.outvars[0]: e.invars[0] for e in kernel.eqns if e.primitive.name == "convert_element_type"}
    for eqn in kernel.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated") and len(eqn.invars) == 2:
            w = eqn.invars[1]
            while isinstance(w, jcore.Var) and w not in param_vars and w in casts:
                w = casts[w]
            if w in param_vars and param_vars[w] in kernel.params:
                return eqn, param_vars[w]
    return None, None


def per_core_kind(eqn, tiling) -> str | None:
    """ "dense" or "conv" when the per-core path runs this anchor literally on its weight tiles, else None."""
    if eqn is None or tiling is None or tiling.layout != "matrix":
        return None
    if eqn.primitive.name == "dot_general" and len(tiling.shape) == 2:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval
        if tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb:
            return "dense"
    if eqn.primitive.name == "conv_general_dilated" and eqn.params["feature_group_count"] == 1:
        dn = eqn.params["dimension_numbers"]
        nd = len(tiling.shape)
        if tuple(dn.rhs_spec[:2]) == (nd - 1, nd - 2) and tuple(dn.rhs_spec[2:]) == tuple(range(nd - 2)):
            return "conv"
    return None


def split_rows(eqn, kind) -> int:
    """Rows of data an anchor can split over groups of cores: the rows of x[M, K] for dense, the output's first
    spatial axis for conv (input rows with their window halo go to each group); 1 if not splittable."""
    if kind == "dense":
        return math.prod(eqn.invars[0].aval.shape[:-1])
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


def anchor_traffic(eqn, tiling: ParamTiling, rows_per_group: int) -> wafer.Traffic:
    """Region-local traffic of a per-core anchor: in every group, input chunks multicast along rows and partial
    sums reduced along columns. Shapes are exactly those the per-core path moves (compiler/percore.py)."""
    kind = per_core_kind(eqn, tiling)
    if kind is None:
        return wafer.Traffic.none()
    gh, gw = tiling.grid
    tk, tn = tiling.tile[-2:]
    lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
    mt = rows_per_group
    if kind == "dense":
        in_shape, out_shape = (mt, tk), (mt, tn)
    else:
        dn = eqn.params["dimension_numbers"]
        sp_in, sp_out = dn.lhs_spec[2], dn.out_spec[2]
        split = tiling.replicas != (1, 1)
        span = conv_rows_span(eqn, mt)
        in_shape = tuple(
            tk if a == dn.lhs_spec[1] else (span if split and a == sp_in else d) for a, d in enumerate(lhs.shape)
        )
        out_shape = tuple(tn if a == dn.out_spec[1] else (mt if a == sp_out else d) for a, d in enumerate(out.shape))
    x = jax.ShapeDtypeStruct((gh, gw, *in_shape), lhs.dtype)
    p = jax.ShapeDtypeStruct((gh, gw, *out_shape), out.dtype)
    _, t_in = jax.eval_shape(lambda a: wafer.multicast(a, "row", src=0), x)
    _, t_out = jax.eval_shape(lambda a: wafer.reduce(a, "col", "sum", to="last"), p)
    return (t_in + t_out).replicate(group_offsets(tiling))


def plan_kernel(
    kernel,
    rect: Rect,
    traced,
    spec,
    *,
    weight_copies: int = 1,
    act_copies: int = 1,
    act_itemsize: int | None = None,
) -> KernelPlan:
    """Partition one kernel over `rect` and compute its per-core SRAM and cost.

    Args:
      weight_copies: weight-shaped arrays each core holds per weight tile (1 for inference; in training also
        the gradient and every optimizer slot, e.g. 4 for Adam: weights, gradient, mu, nu).
      act_copies: activation buffers (1 for inference; 2 in training: the stream buffer and the activations
        stashed for the backward pass).
      act_itemsize: bytes per floating-point activation element in SRAM (2 under a 16-bit precision policy,
        compiler/precision.py); None: as traced.
    """
    in_bytes, out_bytes = act_bytes_of(kernel, act_itemsize)
    h, w = rect.height, rect.width
    tilings = [tile_param(i, traced.param_paths[i], traced.param_avals[i], rect) for i in kernel.params]
    anchor, widx = anchor_weight(kernel, traced)
    pos = {t.index: n for n, t in enumerate(tilings)}
    wt = tilings[pos[widx]] if widx in pos else None
    pad = 1.0
    traffic = wafer.Traffic.none()
    kind = per_core_kind(anchor, wt)
    if kind is not None:
        # The anchor weight's tile grid does the work. Rows of data (x's rows for dense, output rows for conv)
        # are split over as many copies of that grid as the rectangle holds, each copy with its own weights.
        gh, gw = wt.grid
        m = split_rows(anchor, kind)
        rr = max(1, min(h // gh, m))
        rc = max(1, min(w // gw, m // rr))
        mt = _cdiv(m, rr * rc)
        wt = wt.replicated(rr, rc)
        tilings[pos[widx]] = wt
        grid = (rr * gh, rc * gw)
        a, b = wt.shape[-2:]
        ta, tb = wt.tile[-2:]
        # padding of uneven tiles and of uneven row groups is real work
        pad = (rr * rc * mt * gh * ta * gw * tb) / (m * a * b)
        traffic = anchor_traffic(anchor, wt, mt)
    elif wt is not None and wt.layout == "matrix":
        # A weight that is not a plain [K, N] matrix (e.g. attention projections [d, heads, head_dim]): its
        # tiles sit on their grid; the work and activations spread over the rectangle, at least that grid.
        gh, gw = wt.grid
        cores = min(h * w, max(gh * gw, kernel.out_bytes // 4))
        gw = min(w, cores)
        grid = (max(gh, _cdiv(cores, gw)), gw)
    else:
        # Weightless kernels and epilogues follow their producer's layout: work spread over the rectangle,
        # at most one output element per core.
        out_elems = max(1, kernel.out_bytes // 4)
        cores = min(h * w, out_elems)
        gw = min(w, cores)
        grid = (_cdiv(cores, gw), gw)
    tilings = tuple(tilings)
    cores = grid[0] * grid[1]
    counts = {}
    for key, n in kernel.counts.items():
        per = n / cores
        if key[0] == "fmac":
            per *= pad
        counts[key] = float(math.ceil(per))
    weight_bytes = weight_copies * max(_core_bytes(tilings, r, c) for r, c in ((0, 0), (grid[0] - 1, grid[1] - 1)))
    act_bytes = act_copies * 4 * _cdiv(_cdiv(in_bytes, 4) + _cdiv(out_bytes, 4), cores)
    read_bytes = float(weight_bytes // weight_copies + _cdiv(in_bytes, cores))
    write_bytes = float(_cdiv(out_bytes, cores))
    plan = KernelPlan(
        kernel.name,
        kernel.kind,
        rect,
        grid,
        tilings,
        int(weight_bytes),
        int(act_bytes),
        counts,
        read_bytes,
        write_bytes,
        traffic.at(rect.row, rect.col),
        float(kernel.flops),
        int(kernel.batch or 1),
    )
    need = plan.sram_bytes
    if need > spec.sram_bytes_per_core:
        raise SramCapacityError(
            kernel.name,
            (rect.row, rect.col),
            need,
            spec.sram_bytes_per_core,
            spec.sram_bytes_per_core,
            detail=(
                f"kernel {kernel.name!r} ({kernel.kind}, {kernel.source}) on {grid[0]}x{grid[1]} cores holds "
                f"{weight_bytes} B of weights (x{weight_copies} copies) and {act_bytes} B of activations per core; "
                f"give it more cores "
                f"(a larger rectangle or wafer), a smaller batch, or use weight streaming"
            ),
        )
    return plan


def _core_bytes(tilings, r, c) -> int:
    """Weight bytes held by core (r, c) relative to the kernel's origin."""
    return sum(t.tile_bytes for t in tilings if r < t.rect.height and c < t.rect.width)


def act_bytes_of(kernel, act_itemsize: int | None = None) -> tuple[int, int]:
    """(input bytes, output bytes) of a kernel's activations, floating-point elements counted at `act_itemsize`
    bytes when given (a 16-bit precision policy stores activations in 2 bytes) and at their dtype's otherwise."""
    if act_itemsize is None:
        return int(kernel.in_bytes), int(kernel.out_bytes)

    def nbytes(vs):
        total = 0
        for v in vs:
            a = v.aval
            size = int(np.prod(a.shape)) * a.dtype.itemsize
            if jax.dtypes.issubdtype(a.dtype, jnp.floating):
                size = int(np.prod(a.shape)) * min(a.dtype.itemsize, act_itemsize)
            total += size
        return total

    return nbytes(kernel.inputs), nbytes(kernel.outputs)


def sram_need(
    kernel, traced, *, weight_copies: int = 1, act_copies: int = 1, act_itemsize: int | None = None
) -> tuple[int, int]:
    """(weight bytes, activation bytes) a kernel keeps in SRAM over all its cores (before tiling granularity)."""
    weights = weight_copies * sum(
        int(np.prod(traced.param_avals[i].shape)) * np.dtype(traced.param_avals[i].dtype).itemsize
        for i in kernel.params
    )
    return int(weights), int(act_copies * sum(act_bytes_of(kernel, act_itemsize)))


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
    return max(1, _cdiv(int(total), int(spec.sram_bytes_per_core * headroom)))


def max_cores(kernel, traced) -> int:
    """More cores than this do not help a kernel: a weight kernel's tiles times the rows of data it can split
    (one weight element and one row per core); a weightless kernel's output elements."""
    anchor, widx = anchor_weight(kernel, traced)
    if widx is not None:
        shape = traced.param_avals[widx].shape
        if len(shape) >= 2:
            tiling = tile_param(widx, "", traced.param_avals[widx], Rect(0, 0, shape[-2], shape[-1]))
            kind = per_core_kind(anchor, tiling)
            rows = split_rows(anchor, kind) if kind else 1
            return max(1, int(shape[-2] * shape[-1] * rows))
    return max(1, kernel.out_bytes // 4)
