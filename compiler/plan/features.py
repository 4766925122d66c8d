"""Features: the static facts of every kernel that the partition rule and the schedule read.

A kernel's facts do not depend on where it is placed: its instruction counts over the whole batch (apart from its
anchor's, which the partition rule counts on each core's tiles), the shape of the weight its anchor multiplies (the
tile grid and the rows of data it can split), its other parameters, its activation bytes, its backward program's
counts and the optimizer update a core runs on its tiles (training), and the streams between kernels. The
partition rule (compiler/plan/partition.py) turns them and a rectangle into a tiling and per-core work; the schedule
(compiler/schedule.py) turns that into cycles. Both evaluate the same `Features` on a compiled plan's integer
placement (NumPy, exact) and on a relaxed continuous layout (JAX: the differentiable cost model), so `Features` is a
pytree of arrays over kernels `[n]` (parameters `[n, P]`, count keys `[n, K]`, flows `[F]`) with its descriptive
fields static.

Counts are wafer/kernel.py's: keys (op class, dtype class, SRAM read bytes, write bytes) count elements of vector
instructions, ("instr",) the instructions, ("ops",) the operations among them (a matmul or a reduction is one
operation of several instructions). Spread over c cores, a kernel's elements divide by c and so do its instructions
beyond one per operation: every core issues each operation at least once (`partition.kernel_shape`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jcore

from wafer import kernel as wkernel
from wafer.memory import Rect

INSTR, OPS, TASK = wkernel.INSTRUCTIONS, wkernel.OPS, wkernel.TASKS

# Anchor kinds (`Features.anchor`).
SPREAD = 0  # no weight anchor: the work spreads over the rectangle, at most one output word per core
WEIGHT = 1  # a dense, convolution or embedding anchor run on its weight's tile grid, rows split over grid copies
TILED = 2  # an anchor whose weight is a tiled matrix the per-core path cannot run (partition.per_core_kind)

# Parameter layouts (`Features.p_layout`), as partition.tile_param stores them.
NONE, SCALAR, VECTOR, MATRIX = -1, 0, 1, 2

# Per-kernel fields (arrays with a leading kernel axis), for `Features.take`.
_PER_KERNEL = (
    "counts",
    "bwd_counts",
    "flops",
    "anchor",
    "a",
    "b",
    "lead",
    "window",
    "m",
    "n_in",
    "in_groups",
    "gather",
    "in_s1",
    "in_s0",
    "in_full",
    "n_out",
    "out_full",
    "isz_in",
    "isz_out",
    "isz_w",
    "dx",
    "psr",
    "in_flight",
    "in_bytes",
    "out_bytes",
    "out_words",
    "p_layout",
    "p_a",
    "p_b",
    "p_lead",
    "p_isz",
    "p_anchor",
    "p_trips",
    "p_rows",
    "p_sin",
    "p_sout",
    "upd_alpha",
    "upd_beta",
    "stream_bytes",
)


def key_order(key) -> tuple:
    """A total order on count keys (they mix strings and numbers)."""
    return tuple(str(x) for x in key)


def param_layout(shape) -> int:
    """How a parameter leaf is stored: SCALAR (one word), VECTOR (split flat) or MATRIX (last two axes tiled)."""
    if len(shape) == 0 or math.prod(shape) == 1:
        return SCALAR
    return VECTOR if len(shape) == 1 else MATRIX


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Features:
    """Per-kernel static facts, arrays over kernels in pipeline order (module docstring).

    Instruction counts (columns `keys`, wafer/kernel.py's count keys):
      counts [n, K]: what the whole kernel executes per batch, its anchor's matmul apart for WEIGHT kernels.
      bwd_counts [n, K]: the same of its backward program (the jaxpr of its VJP: the cotangents of its inputs and
        parameters from those of its outputs), its anchor's two matmuls apart for WEIGHT kernels; zeros in inference.
      flops [n]: FLOPs of the whole kernel's forward per batch (an FMAC is two).
    The anchor's weight (anchor WEIGHT or TILED; 1 elsewhere):
      anchor [n]: SPREAD, WEIGHT or TILED.
      a, b [n]: its tiled dims (axes -2 and -1); lead [n]: elements per (a, b) entry (a convolution's window, a
        batched weight's batch slices).
      window [n]: elements its contraction runs over per row of the matrix (a convolution's window, its lead; 1 for
        dense, batched and gather anchors: a batched weight's slices are each its own matrix, contracted apart).
      m [n]: rows of data its grid copies can split (x's rows for dense, output rows for conv).
      n_in, in_s1, in_s0, in_full [n]: a core receives n_in * rows * ta input elements, rows = in_s1 * mt + in_s0
        when the rows are split over copies, in_full otherwise (x in_groups; n_in * rows for a gather; n_in the
        batch slices of a batched anchor, the other positions of a convolution).
      in_groups [n]: a grouped convolution's feature groups G: a core receives ta input channels of each (its
        columns' output channels may belong to any group); 1 elsewhere.
      gather [n]: 1.0 for an embedding lookup: its input is the indices, one per row of data, and a core's lookup
        of its table rows is one multiply-add per element of its partial result (a masked copy); 0 elsewhere.
      n_out, out_full [n]: a core's partial result is n_out * rows * tb elements, rows = mt, or out_full when
        out_full > 0 (an anchor whose rows cannot be split).
      isz_in, isz_out, isz_w [n]: element bytes of its input, output and weight.
      fmac_class, acc_class (static, per kernel): the dtype classes of its FMACs and of its partial sums' adds (a
        scan kernel's: its weight dots' partial sums, `partition.scan_runs`).
      dx [n]: 1.0 when its input carries a gradient, so that training's backward computes the input's cotangent
        (not for a first layer reading the program's data).
      psr [n]: rows of m per sample (a dense anchor's rows hold the batch: m / batch); 0 when every row holds every
        sample (a convolution's rows are spatial).
    Samples (layer-pipelined execution streams them through the kernels one at a time):
      in_flight [n]: samples whose inputs a kernel keeps for its backward (training): those between its forward and
        its backward, min(batch, 2 x kernels after it + 1); the whole batch in weight streaming; 0 in inference.
    Activations and spreading:
      in_bytes, out_bytes [n]: activation bytes per batch in SRAM (16-bit floats under a 16-bit policy).
      out_words [n]: output words as traced (a spread kernel uses at most one core per word).
    Parameters [n, P] (P: most parameters of any kernel; NONE pads):
      p_layout: NONE, SCALAR, VECTOR or MATRIX; p_a, p_b: MATRIX dims -2, -1 (VECTOR: p_a elements); p_lead:
      elements per (a, b) entry; p_isz: element bytes; p_anchor: 1.0 for the anchor's weight.
    A scan's weight dots (`partition.scan_runs`: a recurrent cell's matmuls, run per core at every iteration on the
    weight's own tile grid, `param_grid`, one copy; p_a, p_b the matrix its first dot multiplies,
    `partition.kernel_views`), per parameter [n, P] (zeros for others):
      p_trips: runs per call (iterations x uses; a nested scan's, the product of the lengths); p_rows: rows of x
        per run (x[M, K], M not split);
      p_sin, p_sout: element bytes of x and of the result.
    Training (zeros in inference):
      upd_alpha [n, P, K], upd_beta [n, K]: a core's optimizer update on its tiles counts
        upd_beta + sum_p upd_alpha[p] * (elements of its tile of parameter p) (an affine count, exact for optax's
        elementwise transformations and global-norm clipping).
      stream_bytes [n]: weight bytes streamed in per pass in weight streaming (and gradient bytes out).
    Streams:
      flow_src, flow_dst [F]: kernel indices of each stream's ends, -1 for the host (inputs enter, outputs leave).
      flow_words [F]: 32-bit words per sample.
      flow_share [F]: the busiest link on the stream's lanes carries flow_share times one lane's words (streams
        sharing links; 1 until the route pass measures it on the plan's routes).
    Tied weights (training in layer-pipelined mode; empty otherwise):
      tie_src, tie_dst [T]: kernel indices of a pair of kernels holding copies of the same parameters: every kernel
        reading a parameter keeps a copy (`Plan.weight_copies`), the last one's being the copy the step reads back
        (`Plan.weights`); each other copy's kernel (tie_src) sends its gradient of them to that kernel (tie_dst),
        which sums them and sends the sum back, so that every copy takes the same update and all stay equal.
      tie_words [T]: 32-bit words of those gradients each way per step.
      tie_elems, tie_isz [T]: their elements, which the copy read back adds to its own, and element bytes (the
        widest of the pair's parameters: exact for one dtype, as a tied weight is one parameter).
    Program:
      batch: samples per call (scalar); io_bytes: bytes of the inputs streamed in per call or step; io_out_bytes:
      bytes of the outputs streamed out per call (inference).
    Static: names, keys, fmac_class, acc_class, task ("inference" or "training"), mode ("pipelined" or
      "weight_streaming"), weight_copies (weight-shaped arrays per tile: 1, or weights + gradient + optimizer
      slots), act_copies.
    """

    counts: jax.Array
    bwd_counts: jax.Array
    flops: jax.Array
    anchor: jax.Array
    a: jax.Array
    b: jax.Array
    lead: jax.Array
    window: jax.Array
    m: jax.Array
    n_in: jax.Array
    in_groups: jax.Array
    gather: jax.Array
    in_s1: jax.Array
    in_s0: jax.Array
    in_full: jax.Array
    n_out: jax.Array
    out_full: jax.Array
    isz_in: jax.Array
    isz_out: jax.Array
    isz_w: jax.Array
    dx: jax.Array
    psr: jax.Array
    in_flight: jax.Array
    in_bytes: jax.Array
    out_bytes: jax.Array
    out_words: jax.Array
    p_layout: jax.Array
    p_a: jax.Array
    p_b: jax.Array
    p_lead: jax.Array
    p_isz: jax.Array
    p_anchor: jax.Array
    p_trips: jax.Array
    p_rows: jax.Array
    p_sin: jax.Array
    p_sout: jax.Array
    upd_alpha: jax.Array
    upd_beta: jax.Array
    stream_bytes: jax.Array
    flow_src: jax.Array
    flow_dst: jax.Array
    flow_words: jax.Array
    flow_share: jax.Array
    tie_src: jax.Array
    tie_dst: jax.Array
    tie_words: jax.Array
    tie_elems: jax.Array
    tie_isz: jax.Array
    batch: jax.Array
    io_bytes: jax.Array
    io_out_bytes: jax.Array
    names: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    keys: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    fmac_class: tuple = dataclasses.field(default=(), metadata=dict(static=True))
    acc_class: tuple = dataclasses.field(default=(), metadata=dict(static=True))
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

    def take(self, idx) -> Features:
        """The features of kernels `idx` (a sequence of kernel indices, repeats allowed), without the streams:
        what the partition rule and the per-kernel figures need to try one kernel on many rectangles at once."""
        idx = np.asarray(idx, np.int64)
        arrays = {f: np.asarray(getattr(self, f))[idx] for f in _PER_KERNEL}
        rows = idx.tolist()  # Python ints: indexing a tuple by NumPy integers costs a conversion each
        pick = lambda t: tuple(map(t.__getitem__, rows))  # noqa: E731
        empty = np.zeros(0)
        return dataclasses.replace(
            self,
            **arrays,
            flow_src=empty,
            flow_dst=empty,
            flow_words=empty,
            flow_share=empty,
            tie_src=empty,
            tie_dst=empty,
            tie_words=empty,
            tie_elems=empty,
            tie_isz=empty,
            names=pick(self.names),
            fmac_class=pick(self.fmac_class),
            acc_class=pick(self.acc_class),
        )

    def compact(self) -> Features:
        """The same features without the count columns that are zero for every kernel (the update's included).

        Figures are unchanged (a zero count costs nothing) and batched evaluation is faster. Needs concrete (not
        traced) features.
        """
        used = np.any(np.asarray(self.counts) != 0, axis=0) | np.any(np.asarray(self.bwd_counts) != 0, axis=0)
        used |= np.any(np.asarray(self.upd_beta) != 0, axis=0) | np.any(np.asarray(self.upd_alpha) != 0, axis=(0, 1))
        keep = np.nonzero(used)[0]
        take = lambda x, axis: jnp.take(x, keep, axis=axis) if isinstance(x, jax.Array) else np.take(x, keep, axis)
        return dataclasses.replace(
            self,
            counts=take(self.counts, 1),
            bwd_counts=take(self.bwd_counts, 1),
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
    """Samples per call: the traced program's batch, from its inputs' batch axes (compiler/frontend/batch.py)."""
    return int(graph.traced.batch)


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


def tied_pairs(graph) -> dict[tuple[int, int], tuple[int, int, int]]:
    """{(kernel index of a copy, kernel index of the copy read back): (32-bit words, elements, widest element bytes)
    of the parameters they share}: the gradients a training step sums between copies of tied weights
    (`Features.tie_words`, `tie_elems`, `tie_isz`). The copy read back is the last kernel's in pipeline order
    (`Plan.weights`)."""
    users: dict[int, list[int]] = {}
    for i, k in enumerate(graph.kernels):
        for idx in dict.fromkeys(k.params):
            users.setdefault(idx, []).append(i)
    out: dict[tuple[int, int], tuple[int, int, int]] = {}
    for idx, ks in users.items():
        aval = graph.traced.param_avals[idx]
        elems, isz = math.prod(aval.shape), np.dtype(aval.dtype).itemsize
        words = -(-elems * isz // 4)
        for k in ks[:-1]:
            w, e, z = out.get((k, ks[-1]), (0, 0, 0))
            out[k, ks[-1]] = (w + words, e + elems, max(z, isz))
    return out


def flow_groups(graph) -> list:
    """A multicast group per flow of `flows(graph)`: flows from one kernel carrying the same values (an activation
    read by several kernels, as q, k and v read their input) are one stream that routers deliver to every reader
    and forward; each host flow is its own."""
    out = []
    for src, dst, _ in flows(graph):
        values = graph.edge_values.get((src, dst))
        out.append((src, frozenset(id(v) for v in values)) if values else (src, dst))
    return out


def _anchor_facts(kernel, traced, batch: int = 1) -> dict:
    """The anchor weight's facts of one kernel (module docstring of `Features`), with its equation ("eqn", None
    without a WEIGHT anchor), its weight's parameter index ("widx") and the matrix view its tiles cut ("axes",
    `partition.weight_axes`)."""
    from compiler.plan import partition as part

    f = dict(anchor=SPREAD, a=1, b=1, lead=1, window=1, m=1, n_in=0, in_s1=0, in_s0=0, in_full=0, n_out=0, out_full=0)
    f.update(isz_in=4, isz_out=4, isz_w=4, fmac_class="fp32", acc_class="fp32", eqn=None, psr=0.0)
    f.update(in_groups=1, gather=0, axes=None, x_pos=0)
    eqn, widx, pos, perm = part.anchor_operand(kernel, traced)
    if widx is None:
        return f | dict(widx=None)
    aval = traced.param_avals[widx]
    shape = tuple(aval.shape)
    if param_layout(shape) != MATRIX:
        return f | dict(widx=None)
    axes = part.weight_axes(eqn, pos, perm)
    lead, a, b = part.matrix_dims(shape, axes)
    tiling = part.tile_param(widx, "", aval, Rect(0, 0, a, b), axes)
    kind = part.per_core_kind(eqn, tiling, pos, perm)
    f.update(a=a, b=b, axes=axes)
    if kind is None:
        return f | dict(anchor=TILED, widx=widx)
    x = eqn.invars[1 if kind == "gather" else 1 - pos].aval
    out = eqn.outvars[0].aval
    m = part.split_rows(eqn, kind, pos)
    # the data operand: a dot's other one (the weight may be the left, `W @ x`), a lookup's indices
    f.update(anchor=WEIGHT, widx=widx, m=m, lead=lead, eqn=eqn, x_pos=1 if kind == "gather" else 1 - pos)
    f.update(isz_in=x.dtype.itemsize, isz_out=out.dtype.itemsize, isz_w=np.dtype(aval.dtype).itemsize)
    f.update(fmac_class=wkernel.dtype_class(x.dtype, out.dtype), acc_class=wkernel.dtype_class(out.dtype))
    if kind == "gather":
        # the lookup copies table rows (a multiply-add's class of the table's dtype), the indices are words
        f.update(fmac_class=wkernel.dtype_class(aval.dtype, out.dtype), gather=1)
    if kind in ("dense", "batched", "gather"):
        # a batched anchor's core receives and produces its rows of every batch slice (partition._anchor_shapes)
        nb = lead if kind == "batched" else 1
        return f | dict(n_in=nb, in_s1=1, in_s0=0, in_full=m, n_out=nb, out_full=0, psr=m / max(batch, 1))
    dn = eqn.params["dimension_numbers"]
    c_in, sp_in = dn.lhs_spec[1], dn.lhs_spec[2]
    c_out, sp_out = dn.out_spec[1], dn.out_spec[2]
    n_in = math.prod(d for ax, d in enumerate(x.shape) if ax not in (c_in, sp_in))
    n_out = math.prod(d for ax, d in enumerate(out.shape) if ax not in (c_out, sp_out))
    k = eqn.invars[1].aval.shape[dn.rhs_spec[2]]
    stride, dil = eqn.params["window_strides"][0], eqn.params["rhs_dilation"][0]
    # a group of mt output rows reads (mt - 1) * stride + (k - 1) * dil + 1 input rows (partition.conv_rows_span)
    f.update(n_in=n_in, in_s1=stride, in_s0=(k - 1) * dil + 1 - stride, in_full=x.shape[sp_in], n_out=n_out)
    f.update(in_groups=eqn.params["feature_group_count"], window=lead)
    if m == 1:  # rows not splittable: a core produces every output row
        f.update(out_full=out.shape[sp_out])
    return f


# ---- counting a kernel's programs ---------------------------------------------------------------------------------


def _floating(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.floating)


def _struct(aval):
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype)


def _jaxpr(eqns, invars, outvars, constvars=()) -> jcore.Jaxpr:
    from compiler.frontend.trace import DEBUG_INFO

    return jcore.Jaxpr(list(constvars), list(invars), list(outvars), list(eqns), debug_info=DEBUG_INFO)


def _differentiated(kernel, traced) -> set:
    """The kernel's values that carry a gradient: its floating-point parameters and inputs other than the program's
    own inputs (data and labels get no cotangent), and what it computes from them."""
    graph_inputs = set(traced.jaxpr.invars[traced.n_params :])
    params = [traced.param_vars[i] for i in kernel.params]
    out = {v for v in [*kernel.inputs, *params] if v not in graph_inputs and _floating(v.aval)}
    for e in kernel.eqns:
        if any(isinstance(v, jcore.Var) and v in out for v in e.invars):
            out.update(v for v in e.outvars if _floating(v.aval))
    return out


def _backward_count(jaxpr: jcore.Jaxpr, consts, diff) -> Counter:
    """What the backward program of `jaxpr` executes: the equations of the jaxpr of its VJP (the cotangents of the
    invars marked in `diff` from those of its floating-point outvars) that depend on the output cotangents; the
    forward recomputation the VJP's trace also holds is the forward's, counted there."""
    out_fl = [_floating(v.aval) for v in jaxpr.outvars]
    if not any(diff) or not any(out_fl):
        return Counter()

    def f(*args):
        outs = jcore.jaxpr_as_fun(jcore.ClosedJaxpr(jaxpr, list(consts)))(*args)
        return [o for o, fl in zip(outs, out_fl) if fl]

    def backward(args, cts):
        def g(*d):
            it = iter(d)
            return f(*[next(it) if m else a for a, m in zip(args, diff)])

        _, pull = jax.vjp(g, *[a for a, m in zip(args, diff) if m])
        return pull(cts)

    args = [_struct(v.aval) for v in jaxpr.invars]
    cts = [_struct(v.aval) for v, fl in zip(jaxpr.outvars, out_fl) if fl]
    bj = jax.make_jaxpr(backward)(args, cts).jaxpr
    tainted = set(bj.invars[len(args) :])
    keep = []
    for e in bj.eqns:
        if any(isinstance(v, jcore.Var) and v in tainted for v in e.invars):
            keep.append(e)
            tainted.update(e.outvars)
    outs = [v for v in bj.outvars if isinstance(v, jcore.Var)]
    return Counter(wkernel.count_jaxpr(_jaxpr(keep, [], outs), where="compiler (backward)"))


def kernel_counts(kernel, traced, anchor_eqn=None, *, backward: bool = False, x_pos: int = 0) -> tuple[Counter, float]:
    """(counts, dx) of a kernel's forward program per batch (`backward`: of its backward program), its WEIGHT
    anchor's equation `anchor_eqn` left out (the partition rule counts that on each core's tiles); dx: 1.0 when the
    anchor's input (its operand `x_pos`: the one that is not the weight) carries a gradient (its backward computes
    the input's cotangent), else 0.0."""
    keep = [e for e in kernel.eqns if e is not anchor_eqn]
    if not backward:
        jaxpr = _jaxpr(keep, [], kernel.outputs)
        return Counter(wkernel.count_jaxpr(jaxpr, where="compiler")), 0.0
    diff_vars = _differentiated(kernel, traced)
    constvars = [traced.jaxpr.constvars[i] for i in kernel.consts]
    consts = [traced.consts[i] for i in kernel.consts]
    invars = [*kernel.inputs, *(traced.param_vars[i] for i in kernel.params)]
    full = _jaxpr(kernel.eqns, invars, kernel.outputs, constvars)
    counts = _backward_count(full, consts, [v in diff_vars for v in invars])
    if anchor_eqn is None:
        return counts, 0.0
    a_in = list(dict.fromkeys(v for v in anchor_eqn.invars if isinstance(v, jcore.Var)))
    a_diff = [v in diff_vars for v in a_in]
    anchor = _backward_count(_jaxpr([anchor_eqn], a_in, anchor_eqn.outvars), [], a_diff)
    x = anchor_eqn.invars[x_pos]
    return counts - anchor, float(isinstance(x, jcore.Var) and x in diff_vars)


def _update_counts(optimizer, tiles) -> Counter:
    """What one core's optimizer update on its tiles (ShapeDtypeStructs) executes, as one task."""

    def update(ts):
        state = optimizer.init(ts)
        updates, _ = optimizer.update(ts, state, ts)
        return optax.apply_updates(ts, updates)

    return Counter(wkernel.count(update, list(tiles)))


# Elements of the tiles the affine update count is measured on: a one-element operand is a scalar in a register
# (wafer/kernel.py counts no SRAM bytes for it), so tiles of two elements and more are the vectors the rule extends.
_BASE_TILE = 2


def _update_affine(optimizer, params) -> tuple[list[Counter], Counter]:
    """(alpha, beta) of the affine update count of one core holding tiles of `params` ([(layout, rank, dtype)]):
    counted on tiles of `_BASE_TILE` elements, and with each tile in turn one element longer; alpha[p] per element
    of tile p, beta the rest (a one-element tile is counted as a vector one: its SRAM bytes at most overestimated)."""

    def tiles(longer=None):
        out = []
        for i, (layout, rank, dtype) in enumerate(params):
            size = _BASE_TILE + (i == longer)
            shape = () if layout == SCALAR else (1,) * (rank - 1) + (size,)
            out.append(jax.ShapeDtypeStruct(shape, dtype))
        return out

    base = _update_counts(optimizer, tiles())
    alpha = []
    for i, (layout, _, _) in enumerate(params):
        a = Counter()
        if layout != SCALAR:
            longer = _update_counts(optimizer, tiles(i))
            a = Counter({k: longer.get(k, 0) - base.get(k, 0) for k in set(longer) | set(base)})
        alpha.append(a)
    beta = Counter({k: base.get(k, 0) - _BASE_TILE * sum(a.get(k, 0) for a in alpha) for k in base})
    return alpha, beta


def _in_flight(n: int, batch: int, task: str, mode: str) -> np.ndarray:
    """`Features.in_flight` of n kernels in pipeline order."""
    if task != "training":
        return np.zeros(n)
    if mode == "weight_streaming":
        return np.full(n, float(batch))
    return np.minimum(float(batch), 2.0 * (n - 1 - np.arange(n)) + 1.0)


def _matrix(rows: list, keys: tuple) -> np.ndarray:
    """[len(rows), len(keys)] of count dicts."""
    return np.array([[float(r.get(k, 0.0)) for k in keys] for r in rows], np.float64).reshape(len(rows), len(keys))


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
    from compiler.plan import partition as part

    traced = graph.traced
    kernels = graph.kernels
    n = len(kernels)
    P = max((len(k.params) for k in kernels), default=0) or 1
    # the anchor's facts, as `_PER_KERNEL` lists them ("anchor" .. "out_full")
    names = _PER_KERNEL[_PER_KERNEL.index("anchor") : _PER_KERNEL.index("out_full") + 1]
    rows = {key: [] for key in (*names, "isz_in", "isz_out", "isz_w", "dx", "psr")}
    fmac_class, acc_class = [], []
    # padding entries (and scalars) get sides 1, so that no rule divides by zero (a NaN would poison gradients)
    p_arrays = {key: np.ones((n, P)) for key in ("p_a", "p_b", "p_lead")}
    p_arrays.update(p_isz=np.zeros((n, P)), p_anchor=np.zeros((n, P)))
    p_arrays.update({key: np.zeros((n, P)) for key in ("p_trips", "p_rows", "p_sin", "p_sout")})
    p_layout = np.full((n, P), float(NONE))
    fwd, bwd, alphas, betas = [], [], [], []
    in_b, out_b, stream = np.zeros(n), np.zeros(n), np.zeros(n)
    training = task == "training"
    for i, k in enumerate(kernels):
        facts = _anchor_facts(k, traced, graph_batch(graph))
        counts, _ = kernel_counts(k, traced, facts["eqn"])
        counts[wkernel.TASKS] = 1  # one task per call: its share of the batch
        fwd.append(counts)
        dx = 0.0
        if training:
            counts, dx = kernel_counts(k, traced, facts["eqn"], backward=True, x_pos=facts["x_pos"])
            counts[wkernel.TASKS] = 1
            bwd.append(counts)
        else:
            bwd.append(Counter())
        facts["dx"] = dx
        for key in rows:
            rows[key].append(float(facts[key]))
        fmac_class.append(facts["fmac_class"])
        acc_class.append(facts["acc_class"])
        in_b[i], out_b[i] = act_bytes(k.inputs, act_itemsize), act_bytes(k.outputs, act_itemsize)
        upd_params = []
        views = part.kernel_views(k, traced)
        for j, idx in enumerate(k.params):
            aval = traced.param_avals[idx]
            shape, itemsize = tuple(aval.shape), np.dtype(aval.dtype).itemsize
            layout = param_layout(shape)
            p_layout[i, j] = layout
            p_arrays["p_isz"][i, j] = itemsize
            p_arrays["p_anchor"][i, j] = float(idx == facts["widx"])
            if layout == MATRIX:
                # the weight as the matrix its tiles cut (partition.tile_param): the anchor's or a scan's view
                lead, a, b = part.matrix_dims(shape, views.get(idx))
                p_arrays["p_a"][i, j], p_arrays["p_b"][i, j], p_arrays["p_lead"][i, j] = a, b, lead
            elif layout == VECTOR:
                p_arrays["p_a"][i, j], p_arrays["p_b"][i, j], p_arrays["p_lead"][i, j] = shape[0], 1, 1
            upd_params.append((layout, len(shape), aval.dtype))
            floating = jnp.issubdtype(aval.dtype, jnp.floating)
            isz = stream_itemsize if (stream_itemsize is not None and floating) else itemsize
            stream[i] += math.prod(shape) * isz
        if facts["anchor"] == SPREAD:
            # a scan's weight dots run on their weights' tiles (partition.scan_runs), one shape per weight
            tilings = {
                idx: part.tile_param(idx, "", traced.param_avals[idx], Rect(0, 0, 1, 1), views.get(idx))
                for idx in k.params
            }
            for d in part.scan_runs(k, traced, tilings):
                # its partial sums' adds are of the runs' one class (partition.scan_runs)
                acc_class[-1] = part.scan_dot_class(d)
                j = k.params.index(d.widx)
                sin, sout = part.scan_dot_itemsizes(d)
                p_arrays["p_trips"][i, j] += d.trips
                p_arrays["p_rows"][i, j] = part.split_rows(d.dot, "dense", d.pos)
                p_arrays["p_sin"][i, j], p_arrays["p_sout"][i, j] = sin, sout
        alpha, beta = [Counter()] * P, Counter()
        if optimizer is not None and upd_params and mode == "pipelined":
            alpha, beta = _update_affine(optimizer, upd_params)
            alpha = alpha + [Counter()] * (P - len(alpha))
        alphas.append(alpha)
        betas.append(beta)
    keys = set()
    for c in (*fwd, *bwd, *betas, *(a for al in alphas for a in al)):
        keys.update(c)
    keys = tuple(sorted(keys, key=key_order))
    upd_alpha = np.stack([_matrix(al, keys) for al in alphas]) if n else np.zeros((0, P, len(keys)))
    kernel_names = [k.name for k in kernels]
    index = {name: i for i, name in enumerate(kernel_names)}
    fl = flows(graph) if mode == "pipelined" else []
    ties = tied_pairs(graph) if training and mode == "pipelined" else {}
    batch = graph_batch(graph)
    return Features(
        counts=_matrix(fwd, keys),
        bwd_counts=_matrix(bwd, keys),
        flops=np.array([float(k.flops) for k in kernels]),
        **{key: np.array(v) for key, v in rows.items()},
        in_bytes=in_b,
        out_bytes=out_b,
        out_words=np.array([float(k.out_bytes // 4) for k in kernels]),
        p_layout=p_layout,
        **p_arrays,
        upd_alpha=upd_alpha,
        upd_beta=_matrix(betas, keys),
        stream_bytes=stream,
        in_flight=_in_flight(n, batch, task, mode),
        flow_src=np.array([float(index.get(s, -1)) for s, _, _ in fl]),
        flow_dst=np.array([float(index.get(d, -1)) for _, d, _ in fl]),
        flow_words=np.array([float(w) for _, _, w in fl]),
        flow_share=np.ones(len(fl)),
        tie_src=np.array([float(a) for a, _ in ties]),
        tie_dst=np.array([float(b) for _, b in ties]),
        tie_words=np.array([float(w) for w, _, _ in ties.values()]),
        tie_elems=np.array([float(e) for _, e, _ in ties.values()]),
        tie_isz=np.array([float(z) for _, _, z in ties.values()]),
        batch=np.asarray(float(batch)),
        io_bytes=np.asarray(float(sum(_nbytes(a) for a in traced.input_avals))),
        io_out_bytes=np.asarray(float(sum(_nbytes(a) for a in traced.out_avals))),
        names=tuple(kernel_names),
        keys=keys,
        fmac_class=tuple(fmac_class),
        acc_class=tuple(acc_class),
        task=task,
        mode=mode,
        weight_copies=int(weight_copies),
        act_copies=int(act_copies),
    )
