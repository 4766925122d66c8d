"""Features: the static facts of every kernel that the partition rule and the schedule read.

A kernel's facts do not depend on where it is placed: its instruction counts over the whole batch, the shape of the
weight its anchor multiplies (the tile grid and the rows of data it can split), its other parameters, its
activation bytes, the optimizer update a core runs on its tiles (training) and the streams between kernels. The
partition rule (compiler/plan/partition.py) turns them and a rectangle into a tiling and per-core work; the schedule
(compiler/schedule.py) turns that into cycles. Both evaluate the same `Features` on a compiled plan's integer
placement (NumPy, exact) and on a relaxed continuous layout (JAX: the differentiable cost model), so `Features` is a
pytree of arrays over kernels `[n]` (parameters `[n, P]`, flows `[F]`) with its descriptive fields static.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wafer import kernel as wkernel
from wafer.memory import Rect

# The (op class, dtype class) columns of `Features.counts` (wafer/spec.py's instruction classes).
KEYS = tuple((c, d) for c in ("fmac", "alu", "special") for d in ("fp16", "mixed", "fp32", "int"))

# Anchor kinds (`Features.anchor`).
SPREAD = 0  # no weight anchor: the work spreads over the rectangle, at most one output word per core
WEIGHT = 1  # a dense or convolution anchor run on its weight's tile grid, rows of data split over grid copies
TILED = 2  # an anchor whose weight is a tiled matrix but not a plain [K, N] (attention projections, grouped conv)

# Parameter layouts (`Features.p_layout`), as partition.tile_param stores them.
NONE, SCALAR, VECTOR, MATRIX = -1, 0, 1, 2


def param_layout(shape) -> int:
    """How a parameter leaf is stored: SCALAR (one word), VECTOR (split flat) or MATRIX (last two axes tiled)."""
    if len(shape) == 0 or math.prod(shape) == 1:
        return SCALAR
    return VECTOR if len(shape) == 1 else MATRIX


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Features:
    """Per-kernel static facts, arrays over kernels in pipeline order (module docstring).

    Instruction counts:
      counts [n, K]: elements per (op class, dtype class) of the whole kernel per batch; columns `keys`.
      unit_counts [n, K]: counts / (m * a * b): per row of data and weight element of a WEIGHT kernel (its
        anchor's FMACs give the weight's elements per (a, b) entry, an exact small number in float32 too).
      flops [n]: FLOPs of the whole kernel per batch (an FMAC is two).
    The anchor's weight (anchor WEIGHT or TILED; 1 elsewhere):
      anchor [n]: SPREAD, WEIGHT or TILED.
      a, b [n]: its tiled dims (axes -2 and -1); lead [n]: elements per (a, b) entry (a convolution's window).
      m [n]: rows of data its grid copies can split (x's rows for dense, output rows for conv).
      n_in, in_s1, in_s0, in_full [n]: a core receives n_in * rows * ta input elements, rows = in_s1 * mt + in_s0
        when the rows are split over copies, in_full otherwise.
      n_out, out_full [n]: a core's partial result is n_out * rows * tb elements, rows = mt, or out_full when
        out_full > 0 (an anchor whose rows cannot be split).
      isz_in, isz_out, isz_w [n]: element bytes of its input, output and weight.
    Activations and spreading:
      in_bytes, out_bytes [n]: activation bytes per batch in SRAM (16-bit floats under a 16-bit policy).
      out_words [n]: output words as traced (a spread kernel uses at most one core per word).
    Parameters [n, P] (P: most parameters of any kernel; NONE pads):
      p_layout: NONE, SCALAR, VECTOR or MATRIX; p_a, p_b: MATRIX dims -2, -1 (VECTOR: p_a elements); p_lead:
      elements per (a, b) entry; p_isz: element bytes; p_anchor: 1.0 for the anchor's weight.
    Training (zeros in inference):
      upd_alpha [n, P, K], upd_beta [n, K]: a core's optimizer update on its tiles counts
        upd_beta + sum_p upd_alpha[p] * (elements of its tile of parameter p) instructions (an affine count,
        exact for optax's elementwise transformations and global-norm clipping).
      stream_bytes [n]: weight bytes streamed in per pass in weight streaming (and gradient bytes out).
    Streams:
      flow_src, flow_dst [F]: kernel indices of each stream's ends, -1 for the host (inputs enter, outputs leave).
      flow_words [F]: 32-bit words per sample.
    Program:
      batch: samples per call (scalar); io_bytes: bytes of the batch streamed in per step (training).
    Static: names, keys, task ("inference" or "training"), mode ("pipelined" or "weight_streaming"),
      weight_copies (weight-shaped arrays per tile: 1, or weights + gradient + optimizer slots), act_copies.
    """

    counts: jax.Array
    unit_counts: jax.Array
    flops: jax.Array
    anchor: jax.Array
    a: jax.Array
    b: jax.Array
    lead: jax.Array
    m: jax.Array
    n_in: jax.Array
    in_s1: jax.Array
    in_s0: jax.Array
    in_full: jax.Array
    n_out: jax.Array
    out_full: jax.Array
    isz_in: jax.Array
    isz_out: jax.Array
    isz_w: jax.Array
    in_bytes: jax.Array
    out_bytes: jax.Array
    out_words: jax.Array
    p_layout: jax.Array
    p_a: jax.Array
    p_b: jax.Array
    p_lead: jax.Array
    p_isz: jax.Array
    p_anchor: jax.Array
    upd_alpha: jax.Array
    upd_beta: jax.Array
    stream_bytes: jax.Array
    flow_src: jax.Array
    flow_dst: jax.Array
    flow_words: jax.Array
    batch: jax.Array
    io_bytes: jax.Array
    names: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    keys: tuple = dataclasses.field(default=KEYS, metadata=dict(static=True))
    task: str = dataclasses.field(default="inference", metadata=dict(static=True))
    mode: str = dataclasses.field(default="pipelined", metadata=dict(static=True))
    weight_copies: int = dataclasses.field(default=1, metadata=dict(static=True))
    act_copies: int = dataclasses.field(default=1, metadata=dict(static=True))

    @property
    def n(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def as_jax(self, dtype=jnp.float32) -> Features:
        """The same features as JAX arrays (the cost model's form)."""
        return jax.tree.map(lambda x: jnp.asarray(x, dtype), self)

    def compact(self) -> Features:
        """The same features without the instruction-count columns that are zero for every kernel.

        Figures are unchanged (a zero count costs nothing) and batched evaluation is several times faster: an MLP in
        fp32 uses 2 of the 12 (op class, dtype class) columns. Needs concrete (not traced) features.
        """
        counts = np.asarray(self.counts)
        used = np.any(counts != 0, axis=0) | np.any(np.asarray(self.upd_beta) != 0, axis=0)
        used |= np.any(np.asarray(self.upd_alpha) != 0, axis=(0, 1))
        keep = np.nonzero(used)[0]
        if len(keep) == 0:
            keep = np.array([0])
        take = lambda x, axis: jnp.take(x, keep, axis=axis) if isinstance(x, jax.Array) else np.take(x, keep, axis)
        return dataclasses.replace(
            self,
            counts=take(self.counts, 1),
            unit_counts=take(self.unit_counts, 1),
            upd_alpha=take(self.upd_alpha, 2),
            upd_beta=take(self.upd_beta, 1),
            keys=tuple(self.keys[int(i)] for i in keep),
        )


def _nbytes(aval) -> int:
    return int(np.prod(aval.shape)) * int(aval.dtype.itemsize)  # (PRNG keys count their key data)


def act_bytes(values, act_itemsize: int | None) -> int:
    """Bytes of activation values in SRAM: floating-point elements at `act_itemsize` bytes when given (a 16-bit
    precision policy stores activations in 2 bytes), at their dtype's otherwise."""
    total = 0
    for v in values:
        a = v.aval
        size = int(np.prod(a.shape)) * a.dtype.itemsize
        if act_itemsize is not None and jax.dtypes.issubdtype(a.dtype, jnp.floating):
            size = int(np.prod(a.shape)) * min(a.dtype.itemsize, act_itemsize)
        total += size
    return total


def graph_batch(graph) -> int:
    """Samples per call: the leading dimension of the first kernel input that has one (1 without)."""
    for k in graph.kernels:
        if k.batch:
            return int(k.batch)
    return 1


def flows(graph) -> list[tuple[str, str, float]]:
    """(src, dst, words per sample) of the activations between kernels, host input and output included."""
    batch = graph_batch(graph)
    out = [(src, dst, nbytes / 4 / batch) for src, dst, nbytes in graph.edges]
    first, last = graph.kernels[0], graph.kernels[-1]
    in_bytes = sum(_nbytes(a) for a in graph.traced.input_avals)
    out_bytes = sum(_nbytes(a) for a in graph.traced.out_avals)
    out.append(("host", first.name, in_bytes / 4 / batch))
    out.append((last.name, "host", out_bytes / 4 / batch))
    return out


def _anchor_facts(kernel, traced) -> dict:
    """The anchor weight's facts of one kernel (module docstring of `Features`)."""
    from compiler.plan import partition as part

    f = dict(anchor=SPREAD, a=1, b=1, lead=1, m=1, n_in=0, in_s1=0, in_s0=0, in_full=0, n_out=0, out_full=0)
    f.update(isz_in=4, isz_out=4, isz_w=4)
    eqn, widx = part.anchor_weight(kernel, traced)
    if widx is None:
        return f | dict(widx=None)
    aval = traced.param_avals[widx]
    shape = tuple(aval.shape)
    if param_layout(shape) != MATRIX:
        return f | dict(widx=None)
    tiling = part.tile_param(widx, "", aval, Rect(0, 0, shape[-2], shape[-1]))
    kind = part.per_core_kind(eqn, tiling)
    f.update(a=shape[-2], b=shape[-1])
    if kind is None:
        return f | dict(anchor=TILED, widx=widx)
    lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
    m = part.split_rows(eqn, kind)
    f.update(anchor=WEIGHT, widx=widx, m=m, lead=math.prod(shape[:-2]))
    f.update(isz_in=lhs.dtype.itemsize, isz_out=out.dtype.itemsize, isz_w=np.dtype(aval.dtype).itemsize)
    if kind == "dense":
        return f | dict(n_in=1, in_s1=1, in_s0=0, in_full=m, n_out=1, out_full=0)
    dn = eqn.params["dimension_numbers"]
    c_in, sp_in = dn.lhs_spec[1], dn.lhs_spec[2]
    c_out, sp_out = dn.out_spec[1], dn.out_spec[2]
    n_in = math.prod(d for ax, d in enumerate(lhs.shape) if ax not in (c_in, sp_in))
    n_out = math.prod(d for ax, d in enumerate(out.shape) if ax not in (c_out, sp_out))
    k = eqn.invars[1].aval.shape[dn.rhs_spec[2]]
    stride, dil = eqn.params["window_strides"][0], eqn.params["rhs_dilation"][0]
    # a group of mt output rows reads (mt - 1) * stride + (k - 1) * dil + 1 input rows (partition.conv_rows_span)
    f.update(n_in=n_in, in_s1=stride, in_s0=(k - 1) * dil + 1 - stride, in_full=lhs.shape[sp_in], n_out=n_out)
    if m == 1:  # rows not splittable: a core produces every output row
        f.update(out_full=out.shape[sp_out])
    return f


def _update_counts(optimizer, tiles) -> dict:
    """{(op class, dtype class): elements} of one core's optimizer update on tiles (ShapeDtypeStructs)."""

    def update(ts):
        state = optimizer.init(ts)
        updates, _ = optimizer.update(ts, state, ts)
        return optax.apply_updates(ts, updates)

    counts, _, _ = wkernel.count(update, list(tiles))
    return counts


def _update_affine(optimizer, params) -> tuple[np.ndarray, np.ndarray]:
    """(alpha [P, K], beta [K]) of the affine update count of one core holding tiles of `params`
    ([(layout, rank, dtype)]): counted on unit tiles, and with each tile in turn doubled."""

    def tiles(doubled=None):
        out = []
        for i, (layout, rank, dtype) in enumerate(params):
            shape = () if layout == SCALAR else (1,) * (rank - 1) + (2 if i == doubled else 1,)
            out.append(jax.ShapeDtypeStruct(shape, dtype))
        return out

    vec = lambda c: np.array([float(c.get(k, 0.0)) for k in KEYS])
    base = vec(_update_counts(optimizer, tiles()))
    alpha = np.zeros((len(params), len(KEYS)))
    for i, (layout, _, _) in enumerate(params):
        if layout != SCALAR:
            alpha[i] = vec(_update_counts(optimizer, tiles(i))) - base
    return alpha, base - alpha.sum(axis=0)


def features(
    graph,
    *,
    task: str = "inference",
    mode: str = "pipelined",
    act_itemsize: int | None = None,
    weight_copies: int = 1,
    act_copies: int = 1,
    optimizer=None,
    stream_itemsize: int | None = None,
) -> Features:
    """The features of a kernel graph (NumPy arrays; `Features.as_jax` for the cost model's form).

    Args:
      graph: a `compiler.Graph` (its `traced` program included).
      task, mode: what the schedule times: "inference" or "training"; "pipelined" or "weight_streaming".
      act_itemsize: bytes per floating-point activation element in SRAM (2 under a 16-bit policy; None: as traced).
      weight_copies, act_copies: weight-shaped arrays per weight tile and activation buffers per kernel.
      optimizer: the optax transformation a pipelined training step runs on every core's tiles.
      stream_itemsize: bytes per floating-point weight element streamed in weight streaming (16-bit under a
        16-bit policy; None: as stored).
    """
    traced = graph.traced
    kernels = graph.kernels
    n = len(kernels)
    P = max((len(k.params) for k in kernels), default=0) or 1
    rows = {key: [] for key in ("anchor", "a", "b", "lead", "m", "n_in", "in_s1", "in_s0", "in_full", "n_out")}
    rows.update({key: [] for key in ("out_full", "isz_in", "isz_out", "isz_w")})
    # padding entries (and scalars) get sides 1, so that no rule divides by zero (a NaN would poison gradients)
    p_arrays = {key: np.ones((n, P)) for key in ("p_a", "p_b", "p_lead")}
    p_arrays.update(p_isz=np.zeros((n, P)), p_anchor=np.zeros((n, P)))
    p_layout = np.full((n, P), float(NONE))
    upd_alpha, upd_beta = np.zeros((n, P, len(KEYS))), np.zeros((n, len(KEYS)))
    in_b, out_b, stream = np.zeros(n), np.zeros(n), np.zeros(n)
    for i, k in enumerate(kernels):
        facts = _anchor_facts(k, traced)
        for key in rows:
            rows[key].append(float(facts[key]))
        in_b[i], out_b[i] = act_bytes(k.inputs, act_itemsize), act_bytes(k.outputs, act_itemsize)
        upd_params = []
        for j, idx in enumerate(k.params):
            aval = traced.param_avals[idx]
            shape, itemsize = tuple(aval.shape), np.dtype(aval.dtype).itemsize
            layout = param_layout(shape)
            p_layout[i, j] = layout
            p_arrays["p_isz"][i, j] = itemsize
            p_arrays["p_anchor"][i, j] = float(idx == facts["widx"])
            if layout == MATRIX:
                p_arrays["p_a"][i, j], p_arrays["p_b"][i, j] = shape[-2], shape[-1]
                p_arrays["p_lead"][i, j] = math.prod(shape[:-2])
            elif layout == VECTOR:
                p_arrays["p_a"][i, j], p_arrays["p_b"][i, j], p_arrays["p_lead"][i, j] = shape[0], 1, 1
            upd_params.append((layout, len(shape), aval.dtype))
            floating = jnp.issubdtype(aval.dtype, jnp.floating)
            isz = stream_itemsize if (stream_itemsize is not None and floating) else itemsize
            stream[i] += math.prod(shape) * isz
        if optimizer is not None and upd_params and mode == "pipelined":
            alpha, beta = _update_affine(optimizer, upd_params)
            upd_alpha[i, : len(upd_params)], upd_beta[i] = alpha, beta
    names = [k.name for k in kernels]
    index = {name: i for i, name in enumerate(names)}
    counts = np.array([[float(k.counts.get(key, 0.0)) for key in KEYS] for k in kernels]).reshape(n, len(KEYS))
    work = np.array(rows["m"]) * np.array(rows["a"]) * np.array(rows["b"])
    fl = flows(graph) if mode == "pipelined" else []
    batch = graph_batch(graph)
    return Features(
        counts=counts,
        unit_counts=counts / work[:, None],
        flops=np.array([float(k.flops) for k in kernels]),
        **{key: np.array(v) for key, v in rows.items()},
        in_bytes=in_b,
        out_bytes=out_b,
        out_words=np.array([float(k.out_bytes // 4) for k in kernels]),
        p_layout=p_layout,
        **p_arrays,
        upd_alpha=upd_alpha,
        upd_beta=upd_beta,
        stream_bytes=stream,
        flow_src=np.array([float(index.get(s, -1)) for s, _, _ in fl]),
        flow_dst=np.array([float(index.get(d, -1)) for _, d, _ in fl]),
        flow_words=np.array([float(w) for _, _, w in fl]),
        batch=np.asarray(float(batch)),
        io_bytes=np.asarray(float(sum(_nbytes(a) for a in traced.input_avals))),
        names=tuple(names),
        task=task,
        mode=mode,
        weight_copies=int(weight_copies),
        act_copies=int(act_copies),
    )
