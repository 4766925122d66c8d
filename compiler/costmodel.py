"""The closed-form, differentiable cost model of a compiled program.

`features(exe)` extracts, once, the static facts of a compiled program's kernels (instruction counts, weight
matrix dims, rows of data, activation bytes) as arrays. `predict(feats, layout, spec)` then computes, with the
same rules as the emulator (wafer/cost.py, compiler/partition.py), every kernel's cycles, the pipeline's
bottleneck, samples/s and latency as a pure JAX function of continuous placement parameters (each kernel's
area, aspect ratio and position) and of the spec's leaves (clock, SIMD widths, link width, hop latency, SRAM
bandwidth). It is jittable, vmappable over placements and specs, and differentiable. For batched evaluation,
`compact(feats)` drops the instruction-count columns no kernel uses (same predictions, several times faster) and
`layout_of_placement(placement, names)` turns any `{kernel: Rect}` into a Layout; compiler/sweep.py batches
`predict` over many placements and hardware points, compiler/search.py optimises placements with it.

Relaxations (documented choices):
  ceil, floor   straight-through: the value is exact, the gradient is that of the identity. With integer areas
                and aspects that give whole rectangles, the model equals the emulator's figures.
  max           of cycles (compute vs SRAM vs communication in a kernel, the pipeline's bottleneck over kernels):
                log-sum-exp with temperature `tau` in cycles (`smax(x) = tau * log(sum(exp(x / tau)))`);
                `tau=0` (the default) is the exact max. A positive tau spreads the gradient over the
                near-bottleneck kernels, which is what gradient-based placement needs.
  min           of core counts (tile grids): exact (jnp.minimum has a gradient almost everywhere); smoothing
                small integers would distort the grid.
Per kernel, as compiler/partition.py does it: a weight kernel's tile grid is gh = min(h, a), gw = min(w, b) over
its weight [a, b]; its rows of data (m) are split over G = min(floor(h/gh) * floor(w/gw), m) copies of that grid;
each core does mt * ta * tb of the m * a * b multiply-accumulates (mt = ceil(m/G), ta = ceil(a/gh), ...); inputs
are multicast along rows (gw - 1 hops) and partial sums reduced along columns (gh - 1 hops). A weightless kernel
spreads its work over min(h * w, output elements) cores. Route latency uses Manhattan distances between
consecutive rectangles' facing edges and from/to the wafer's west/east edges (the router's dimension-ordered
lanes, compiler/route.py, have the same length up to lane spreading).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from compiler import partition as part
from wafer import cost

# ---- relaxations --------------------------------------------------------------------------------------------


# custom_jvp rather than `x + stop_gradient(ceil(x) - x)`: the value is exactly ceil(x) (no rounding of the
# add-back) and a forward pass costs one op instead of three, which matters in batched sweeps.
@jax.custom_jvp
def st_ceil(x):
    """ceil with a straight-through gradient (exact value, identity gradient)."""
    return jnp.ceil(x)


@st_ceil.defjvp
def _st_ceil_jvp(primals, tangents):
    return jnp.ceil(primals[0]), tangents[0]


@jax.custom_jvp
def st_floor(x):
    """floor with a straight-through gradient."""
    return jnp.floor(x)


@st_floor.defjvp
def _st_floor_jvp(primals, tangents):
    return jnp.floor(primals[0]), tangents[0]


@jax.custom_jvp
def st_round(x):
    """round (half to even) with a straight-through gradient."""
    return jnp.round(x)


@st_round.defjvp
def _st_round_jvp(primals, tangents):
    return jnp.round(primals[0]), tangents[0]


def smax(x, tau=0.0, axis=-1):
    """max over `axis`, or its log-sum-exp relaxation at temperature `tau` (> 0)."""
    if isinstance(tau, (int, float)) and tau == 0:
        return jnp.max(x, axis=axis)
    return tau * jax.nn.logsumexp(x / tau, axis=axis)


def smax2(a, b, tau=0.0):
    return smax(jnp.stack(jnp.broadcast_arrays(a, b), -1), tau)


def smin2(a, b, tau=0.0):
    return -smax2(-a, -b, tau)


# ---- features -----------------------------------------------------------------------------------------------

_KEYS = [(c, d) for c in ("fmac", "alu", "special") for d in ("fp16", "mixed", "fp32", "int")]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Features:
    """Static per-kernel facts of a compiled program, arrays over kernels [n].

    counts [n, 12]: elements per (op class, dtype class) of the whole kernel per batch, in the order of _KEYS.
    weight [n]: 1.0 for kernels whose anchor runs on weight tiles (dense, conv), else 0.
    tiled [n]: 1.0 for other kernels whose anchor reads a tiled weight matrix (they work on its tile grid).
    a, b [n]: the anchor weight's tiled dims; m: rows of data it can split; n_in, n_out, s1, s0: the input
    chunk a core receives is n_in * (s1 * mt + s0) * ta elements, its partial result n_out * mt * tb.
    isz_in, isz_out, isz_w: element bytes of input, output and weight. lead: weight elements per (a, b) entry
    (a conv's window). in_bytes, out_bytes: activation bytes per batch; other_bytes: bytes of the kernel's other
    weights (biases, norms). batch: samples per call (scalar).
    """

    counts: jax.Array
    weight: jax.Array
    tiled: jax.Array
    a: jax.Array
    b: jax.Array
    m: jax.Array
    n_in: jax.Array
    n_out: jax.Array
    s1: jax.Array
    s0: jax.Array
    isz_in: jax.Array
    isz_out: jax.Array
    isz_w: jax.Array
    lead: jax.Array
    in_bytes: jax.Array
    out_bytes: jax.Array
    other_bytes: jax.Array
    batch: jax.Array
    names: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    # The (op class, dtype class) of each column of `counts`: all of _KEYS, or those `compact` kept.
    keys: tuple = dataclasses.field(default=tuple(_KEYS), metadata=dict(static=True))

    @property
    def n(self) -> int:
        return len(self.names)


def compact(feats: Features) -> Features:
    """The same features without the instruction-count columns that are zero for every kernel.

    Predictions are unchanged (a zero count costs nothing) and batched evaluation is several times faster: an MLP
    in fp32 uses 2 of the 12 (op class, dtype class) columns. Needs concrete (not traced) features.
    """
    counts = np.asarray(feats.counts)
    keep = np.nonzero(np.any(counts != 0, axis=0))[0]
    if len(keep) == 0:
        keep = np.array([0])
    return dataclasses.replace(feats, counts=jnp.asarray(counts[:, keep]), keys=tuple(feats.keys[int(i)] for i in keep))


def features(exe) -> Features:
    """The static features of an Executable's (or Trainer's) kernels."""
    traced = exe.traced
    rows = {
        k: []
        for k in (
            "counts",
            "weight",
            "tiled",
            "a",
            "b",
            "m",
            "n_in",
            "n_out",
            "s1",
            "s0",
            "isz_in",
            "isz_out",
            "isz_w",
            "lead",
            "in_bytes",
            "out_bytes",
            "other_bytes",
        )
    }
    names = []
    for kernel in exe.graph.kernels:
        names.append(kernel.name)
        rows["counts"].append([float(kernel.counts.get(k, 0.0)) for k in _KEYS])
        anchor, widx = part.anchor_weight(kernel, traced)
        tiling = None
        if widx is not None:
            aval = traced.param_avals[widx]
            if len(aval.shape) >= 2:
                tiling = part.tile_param(widx, "", aval, part.Rect(0, 0, aval.shape[-2], aval.shape[-1]))
        kind = part.per_core_kind(anchor, tiling)
        other = 0.0
        for i in kernel.params:
            if i != widx or kind is None:
                av = traced.param_avals[i]
                other += float(np.prod(av.shape)) * np.dtype(av.dtype).itemsize
        f = dict(
            weight=0.0,
            tiled=0.0,
            a=1.0,
            b=1.0,
            m=1.0,
            n_in=0.0,
            n_out=0.0,
            s1=0.0,
            s0=0.0,
            isz_in=4.0,
            isz_out=4.0,
            isz_w=4.0,
            lead=1.0,
        )
        if kind is None and tiling is not None:
            f.update(tiled=1.0, a=tiling.shape[-2], b=tiling.shape[-1])
        if kind is not None:
            lhs, out = anchor.invars[0].aval, anchor.outvars[0].aval
            a, b = tiling.shape[-2:]
            m = part.split_rows(anchor, kind)
            f.update(
                weight=1.0,
                a=a,
                b=b,
                m=m,
                isz_in=lhs.dtype.itemsize,
                isz_out=out.dtype.itemsize,
                isz_w=np.dtype(tiling.dtype).itemsize,
                lead=float(np.prod(tiling.shape[:-2])),
            )
            if kind == "dense":
                f.update(n_in=1.0, n_out=1.0, s1=1.0, s0=0.0)
            else:
                dn = anchor.params["dimension_numbers"]
                c_in, sp_in = dn.lhs_spec[1], dn.lhs_spec[2]
                c_out, sp_out = dn.out_spec[1], dn.out_spec[2]
                n_in = np.prod([d for ax, d in enumerate(lhs.shape) if ax not in (c_in, sp_in)])
                n_out = np.prod([d for ax, d in enumerate(out.shape) if ax not in (c_out, sp_out)])
                if m > 1:
                    k = anchor.invars[1].aval.shape[dn.rhs_spec[2]]
                    stride, dil = anchor.params["window_strides"][0], anchor.params["rhs_dilation"][0]
                    f.update(n_in=n_in, n_out=n_out, s1=stride, s0=(k - 1) * dil + 1 - stride)
                else:  # no row split: a core receives all input rows and produces all output rows
                    f.update(n_in=n_in, n_out=n_out * out.shape[sp_out], s1=0.0, s0=lhs.shape[sp_in])
        for key, v in f.items():
            rows[key].append(float(v))
        rows["in_bytes"].append(float(kernel.in_bytes))
        rows["out_bytes"].append(float(kernel.out_bytes))
        rows["other_bytes"].append(other)
    arrays = {k: jnp.asarray(np.array(v, np.float32)) for k, v in rows.items()}
    batch = float(exe.record.batch)
    return Features(**arrays, batch=jnp.asarray(batch, jnp.float32), names=tuple(names))


# ---- layout -------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Layout:
    """Continuous placement parameters, arrays over kernels [n]: height and width in cores, and the top-left
    corner (row, col). Build one from a placement with `layout_of`."""

    height: jax.Array
    width: jax.Array
    row: jax.Array
    col: jax.Array

    @property
    def area(self):
        return self.height * self.width

    @staticmethod
    def from_area_aspect(area, aspect, row, col) -> Layout:
        """Rectangles of `area` cores and height/width ratio `aspect`."""
        h = jnp.sqrt(area * aspect)
        return Layout(h, area / h, row, col)


def layout_of(exe) -> Layout:
    """The Layout of an Executable's placement."""
    return layout_of_placement(exe.placement, [k.name for k in exe.graph.kernels])


def layout_of_placement(placement, names) -> Layout:
    """The Layout of a placement `{kernel name: Rect or (row, col, height, width)}`, kernels in `names` order."""
    rects = np.asarray([tuple(placement[n]) for n in names], np.float32).reshape(-1, 4)
    f = lambda i: jnp.asarray(rects[:, i])
    return Layout(height=f(2), width=f(3), row=f(0), col=f(1))


# ---- the model ----------------------------------------------------------------------------------------------


def _words(elems, isz):
    return st_ceil(elems * isz / 4.0)


def kernel_costs(feats: Features, lay: Layout, spec, tau=0.0) -> dict:
    """Per-kernel figures [n] on `spec`: cores, compute, comm and total cycles per batch, SRAM bytes per core."""
    h, w = jnp.maximum(lay.height, 1.0), jnp.maximum(lay.width, 1.0)
    wt = feats.weight > 0
    gh = jnp.minimum(h, feats.a)
    gw = jnp.minimum(w, feats.b)
    copies = st_floor(h / gh) * st_floor(w / gw)
    groups = jnp.maximum(jnp.minimum(copies, feats.m), 1.0)
    # the partitioner fills copies row-major: floor(h/gh) rows of copies, then as many columns as rows allow
    rr = jnp.maximum(jnp.minimum(st_floor(h / gh), feats.m), 1.0)
    rc = jnp.maximum(jnp.minimum(st_floor(w / gw), st_floor(feats.m / rr)), 1.0)
    groups = jnp.where(wt, rr * rc, groups)
    mt = st_ceil(feats.m / groups)
    ta, tb = st_ceil(feats.a / gh), st_ceil(feats.b / gw)
    cores_w = groups * gh * gw
    pad = groups * mt * gh * ta * gw * tb / (feats.m * feats.a * feats.b)
    out_elems = jnp.maximum(st_floor(feats.out_bytes / 4.0), 1.0)
    cores_nw = jnp.minimum(h * w, out_elems)
    gw_nw = jnp.minimum(w, cores_nw)
    cores_nw = st_ceil(cores_nw / gw_nw) * gw_nw
    # a tiled weight that is not a plain matrix: its tile grid, the work spread over at least that grid
    cores_t = jnp.minimum(h * w, jnp.maximum(gh * gw, out_elems))
    gw_t = jnp.minimum(w, cores_t)
    cores_t = jnp.maximum(gh, st_ceil(cores_t / gw_t)) * gw_t
    cores = jnp.where(wt, cores_w, jnp.where(feats.tiled > 0, cores_t, cores_nw))
    # compute: elements per (class, dtype) per core; FMACs carry the padding of uneven tiles and row groups
    fmac = jnp.asarray([k[0] == "fmac" for k in feats.keys])
    per_core = st_ceil(feats.counts / cores[:, None] * jnp.where(fmac[None, :], jnp.where(wt, pad, 1.0)[:, None], 1.0))
    inv = jnp.stack(
        [
            jnp.asarray(spec.special_cycles, jnp.float32) if c == "special" else 1.0 / spec.simd_width(c, d)
            for c, d in feats.keys
        ]
    )
    arith = per_core @ inv
    w_bytes = jnp.where(wt, 4.0 * st_ceil(feats.lead * ta * tb * feats.isz_w / 4.0), 0.0)
    w_bytes = w_bytes + 4.0 * st_ceil(feats.other_bytes / 4.0 / cores)  # biases etc. split over the cores
    read = w_bytes + st_ceil(feats.in_bytes / cores)
    write = st_ceil(feats.out_bytes / cores)
    sram = smax2(read / spec.sram_read_bytes_per_cycle, write / spec.sram_write_bytes_per_cycle, tau)
    compute = smax2(arith, sram, tau)
    # communication of weight kernels: multicast of input chunks along rows, reduction along columns
    in_words = _words(feats.n_in * (feats.s1 * mt + feats.s0) * ta, feats.isz_in)
    out_words = _words(feats.n_out * mt * tb, feats.isz_out)
    mc = jnp.where(gw > 1, cost.transfer_cycles(spec, in_words, gw - 1.0), 0.0)
    rd = jnp.where(gh > 1, cost.transfer_cycles(spec, out_words, gh - 1.0), 0.0)
    comm = jnp.where(wt, mc + rd, 0.0)
    total = smax2(compute, comm, tau) if spec.overlap else compute + comm
    act = 4.0 * st_ceil((st_ceil(feats.in_bytes / 4.0) + st_ceil(feats.out_bytes / 4.0)) / cores)
    return dict(cores=cores, compute=compute, comm=comm, cycles=total, weight_bytes=w_bytes, act_bytes=act)


def _pair_hops(sr, sc, sh, sw, dr, dc, dh, dw):
    """Longest lane between consecutive rectangles under compiler/route.py's "auto" lanes (straight lanes
    between rectangles sharing rows or columns; corner lanes, spread over both edges, between diagonal ones)."""
    east, west = dc >= sc + sw, dc + dw <= sc
    south, north = dr >= sr + sh, dr + dh <= sr
    cs = jnp.where(east, sc + sw - 1, sc)
    # side by side / one above the other: straight lanes across the gap
    side = jnp.abs(jnp.where(east, dc, dc + dw - 1) - cs)
    rs_v = jnp.where(south, sr + sh - 1, sr)
    rd = jnp.where(south, dr, dr + dh - 1)
    vert = jnp.abs(rd - rs_v)
    # diagonal: the outermost corner lane (offsets floor((i + 1/2) * extent / n) on both edges)
    n = jnp.minimum(sh, dw)
    first = lambda start, extent: start + st_floor(0.5 * extent / n)
    last = lambda start, extent: start + st_floor((n - 0.5) * extent / n)
    x_far = jnp.where(east, last(dc, dw) - cs, cs - first(dc, dw))
    y_far = jnp.where(south, rd - first(sr, sh), last(sr, sh) - rd)
    diag = x_far + y_far
    return jnp.where((east | west) & (north | south), diag, jnp.where(east | west, side, vert))


def route_hops(lay: Layout, spec):
    """Longest route in hops: consecutive kernels' lanes (as compiler/route.py lays them), host input from
    column 0 to the first kernel's west edge, output from the last kernel's east edge to column cols - 1."""
    r, c, h, w = lay.row, lay.col, lay.height, lay.width
    host = jnp.maximum(c[0], spec.cols - c[-1] - w[-1])
    if r.shape[0] < 2:
        return host
    inner = _pair_hops(r[:-1], c[:-1], h[:-1], w[:-1], r[1:], c[1:], h[1:], w[1:])
    return jnp.maximum(jnp.max(inner), host)


def predict(feats: Features, lay: Layout, spec, tau=0.0) -> dict:
    """Predicted figures of one forward call (layer-pipelined inference).

    Returns a dict of: per-kernel `cycles_per_sample` [n], `bottleneck_cycles` (per sample), `samples_per_s`,
    `latency_cycles`, `call_cycles` (what the emulator charges its clock for one call), `cores` (active),
    `peak_sram_bytes`.
    """
    k = kernel_costs(feats, lay, spec, tau)
    s = k["cycles"] / feats.batch
    worst = smax(s, tau)
    latency = jnp.sum(s) + route_hops(lay, spec) * spec.hop_latency_cycles
    return dict(
        cycles_per_sample=s,
        bottleneck_cycles=worst,
        samples_per_s=spec.clock_hz / worst,
        latency_cycles=latency,
        call_cycles=latency + (feats.batch - 1) * worst,
        cores=jnp.sum(k["cores"]),
        peak_sram_bytes=jnp.max(k["weight_bytes"] + k["act_bytes"]),
        kernel=k,
    )
