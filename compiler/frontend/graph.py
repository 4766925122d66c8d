"""Graph: the flat jaxpr's equations grouped into kernels, as the Cerebras compiler matches subgraphs of a model
against its kernel library (a dense layer with its bias and activation is one library kernel).

Grouping rule, in three passes over the equations in program order:

1. *Anchors* start a kernel. An anchor is an equation that reads activations (it depends on a graph input) and is
   one of: `dot_general` (kind "dense" when one operand is a weight, i.e. computed from parameters or constants
   only; "matmul" when both are activations, as attention scores), `conv_general_dilated` ("conv", grouped and
   depthwise included), `gather` from a weight table ("embed"; a gather from activations is ordinary data
   movement), `reduce_window_*` ("pool"), `scan` ("scan"). Every other activation equation (elementwise
   arithmetic, reductions, norms, softmax pieces, reshapes, residual adds, `cond`) joins the kernel opened by the
   most recent anchor: epilogue fusion. Activation equations before the first anchor form a kernel of their own,
   kind "elementwise" (also the only kernel of a program without anchors).
2. *Prologue*: a run of data-movement equations (reshape, transpose, broadcast, dtype change, slice, pad, ...) and
   of integer/boolean index arithmetic immediately before an anchor, each feeding that anchor, moves into the
   anchor's kernel: a flatten before a dense layer, or the index clamping of an embedding lookup, belongs to the
   kernel that consumes it. Equations of weights only (parameters and constants) are skipped over by the run.
3. *Weight-side* equations, which read no activation at all (a transposed or cast weight, BatchNorm's
   `scale * rsqrt(var + eps)`, an `iota`-built causal mask), join the first kernel that uses their result.

Every equation belongs to exactly one kernel. Kernels are numbered per kind (dense_0, dense_1, conv_0, ...), listed
in program order, and data only flows from earlier to later kernels. Edges carry the bytes of the values one
kernel defines and a later kernel reads.

Counts per kernel come from `wafer.kernel.count_jaxpr` on a jaxpr of the kernel's equations (one call, whole
batch): the machine's one table of instruction classes.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections import Counter
from collections.abc import Mapping

import numpy as np
from jax.extend import core as jcore

import wafer.kernel
from compiler.errors import UnsupportedOpError
from compiler.frontend.trace import DEBUG_INFO, Traced, user_source

_SHAPE_OPS = {
    "reshape",
    "transpose",
    "broadcast_in_dim",
    "squeeze",
    "expand_dims",
    "convert_element_type",
    "bitcast_convert_type",
    "reduce_precision",
    "copy",
    "copy_p",
    "slice",
    "dynamic_slice",
    "rev",
    "pad",
    "concatenate",
    "split",
    "iota",
}
_ELEMENTWISE = {
    # arithmetic
    "add",
    "add_any",
    "sub",
    "mul",
    "div",
    "rem",
    "neg",
    "abs",
    "sign",
    "max",
    "min",
    "clamp",
    "floor",
    "ceil",
    "round",
    "square",
    "integer_pow",
    "pow",
    "nextafter",
    # transcendental
    "exp",
    "exp2",
    "log",
    "log1p",
    "expm1",
    "sqrt",
    "rsqrt",
    "cbrt",
    "tanh",
    "logistic",
    "erf",
    "erfc",
    "erf_inv",
    "sin",
    "cos",
    "tan",
    "asin",
    "acos",
    "atan",
    "atan2",
    "sinh",
    "cosh",
    "asinh",
    "acosh",
    "atanh",
    "lgamma",
    "digamma",
    "is_finite",
    # comparison, logic, selection
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "and",
    "or",
    "not",
    "xor",
    "shift_left",
    "shift_right_logical",
    "shift_right_arithmetic",
    "population_count",
    "select_n",
    "stop_gradient",
}
_REDUCTIONS = {
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_prod",
    "reduce_and",
    "reduce_or",
    "argmax",
    "argmin",
    "cumsum",
    "cumprod",
    "cummax",
    "cummin",
    "cumlogsumexp",
    "sort",
}
_POOLS = {"reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"}
_MOVES = {"gather", "scatter", "scatter-add", "scatter_add", "dynamic_update_slice"}
_RANDOM = {"random_bits", "random_wrap", "random_unwrap", "random_seed", "random_split", "random_fold_in"}
_RANDOM |= {"threefry2x32"}
_CONTROL = {"scan", "cond"}

SUPPORTED_PRIMITIVES = frozenset(
    _SHAPE_OPS
    | _ELEMENTWISE
    | _REDUCTIONS
    | _POOLS
    | _MOVES
    | _RANDOM
    | _CONTROL
    | {"dot_general", "conv_general_dilated", "select_and_scatter_add", "select_and_gather_add"}
)
"""Primitives the compiler accepts (after `trace` has inlined calls)."""

ANCHORS = frozenset({"dot_general", "conv_general_dilated", "gather", "scan"} | _POOLS)
"""Primitives that open a kernel when they read activations (a gather only when its table is a weight)."""

KINDS = ("elementwise", "dense", "matmul", "conv", "embed", "pool", "scan")

_HINTS = {
    "while": "A data-dependent loop has no static cost or placement; use lax.scan, or lax.fori_loop with static "
    "Python bounds (which lowers to scan).",
}


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One library kernel: an anchor primitive with its prologue and epilogue.

    Attributes:
      name: f"{kind}_{i}", numbered per kind in program order.
      kind: one of `KINDS`.
      index: position in the graph (program order).
      eqns: the kernel's jaxpr equations, in program order.
      anchor: the anchor equation (None for an "elementwise" kernel).
      params: indices into the flat parameter leaves that the kernel reads.
      consts: indices into `traced.consts` that it reads.
      inputs: variables read from outside the kernel: graph inputs or other kernels' outputs (not params/consts).
      outputs: variables it defines that later kernels read or that are graph outputs.
      counts: what one call over the whole batch executes (wafer.kernel.count_jaxpr's keys).
      flops: FMACs counted twice, every other operation once.
      param_bytes: bytes of the parameters it reads (shared ones included; see `Graph.param_owner`).
      in_bytes, out_bytes: bytes of `inputs` and `outputs`.
      source: the user's "file:line" of the anchor (of the first equation for an elementwise kernel).
      preds: names of the kernels it reads values from, in graph order.
      batch: leading dimension of its first activation input (None without one).
      ops: primitive names of its equations, in order.
    """

    name: str
    kind: str
    index: int
    eqns: tuple = dataclasses.field(compare=False, repr=False)
    anchor: object = dataclasses.field(compare=False, repr=False)
    params: tuple[int, ...]
    consts: tuple[int, ...]
    inputs: tuple = dataclasses.field(compare=False, repr=False)
    outputs: tuple = dataclasses.field(compare=False, repr=False)
    counts: Mapping = dataclasses.field(hash=False, repr=False)
    flops: float
    param_bytes: int
    in_bytes: int
    out_bytes: int
    source: str
    preds: tuple[str, ...]
    batch: int | None
    ops: tuple[str, ...] = dataclasses.field(repr=False)

    @property
    def has_softmax(self) -> bool:
        """Whether the epilogue computes a softmax (max-subtracted exp, sum, divide); a heuristic."""
        ops = set(self.ops)
        return {"reduce_max", "exp", "reduce_sum", "div"} <= ops

    @property
    def has_norm(self) -> bool:
        """Whether the kernel normalises (LayerNorm, RMSNorm, BatchNorm all use rsqrt); a heuristic."""
        return "rsqrt" in self.ops

    @property
    def depthwise(self) -> bool:
        """Whether a conv kernel's convolution is grouped (depthwise when groups == channels)."""
        return self.kind == "conv" and self.anchor.params["feature_group_count"] > 1


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    """A traced program as kernels and the edges between them.

    Attributes:
      kernels: in program order (a topological order: values only flow to later kernels).
      traced: the `Traced` program.
      edges: (src kernel, dst kernel, bytes) for the values flowing between kernels, one per pair, in order of dst.
      edge_values: {(src, dst): the jaxpr variables that edge carries}: edges from one source carrying the same
        values are one multicast stream (compiler/plan/route.py).
      param_owner: flat parameter index -> the first kernel reading it (where it is stored).
      shared_params: flat parameter index -> the later kernels also reading it (only for shared parameters).
      unused_params: flat parameter indices no kernel reads (kept in the first kernel's SRAM: its `params` and
        `param_owner` list them).
    """

    kernels: tuple[Kernel, ...]
    traced: Traced = dataclasses.field(repr=False)
    edges: tuple[tuple[str, str, int], ...]
    param_owner: Mapping[int, str]
    shared_params: Mapping[int, tuple[str, ...]]
    unused_params: tuple[int, ...]
    edge_values: Mapping = dataclasses.field(default_factory=dict, repr=False)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.kernels)

    def kernel(self, name: str) -> Kernel:
        """The kernel called `name`.

        Raises:
          KeyError: no such kernel (the message suggests close names).
        """
        for k in self.kernels:
            if k.name == name:
                return k
        close = difflib.get_close_matches(name, self.names, n=3)
        hint = f" Perhaps you meant {', '.join(close)}?" if close else ""
        raise KeyError(f"no kernel '{name}' in the graph; kernels are {', '.join(self.names)}.{hint}")

    @property
    def sources(self) -> tuple[str, ...]:
        """Kernels that read graph inputs."""
        inputs = set(self.traced.input_vars)
        return tuple(k.name for k in self.kernels if any(v in inputs for v in k.inputs))

    @property
    def sinks(self) -> tuple[str, ...]:
        """Kernels that define graph outputs."""
        outs = {v for v in self.traced.jaxpr.outvars if isinstance(v, jcore.Var)}
        return tuple(k.name for k in self.kernels if any(v in outs for v in k.outputs))

    @property
    def flops(self) -> float:
        return float(sum(k.flops for k in self.kernels))

    def summary(self) -> str:
        """A table: kernel, kind, flops, parameter / input / output bytes, source."""
        rows = [("kernel", "kind", "flops", "param B", "in B", "out B", "source")]
        for k in self.kernels:
            rows.append(
                (k.name, k.kind, f"{k.flops:.4g}", str(k.param_bytes), str(k.in_bytes), str(k.out_bytes), k.source)
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def nbytes(aval) -> int:
    """Bytes of an abstract value (PRNG keys count their key data)."""
    return int(math.prod(aval.shape)) * int(aval.dtype.itemsize)


def check_supported(jaxpr: jcore.Jaxpr) -> None:
    """Raise `UnsupportedOpError` for the first equation (control-flow bodies included) outside the allow-list."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name not in SUPPORTED_PRIMITIVES:
            raise UnsupportedOpError(name, user_source(eqn), SUPPORTED_PRIMITIVES, hint=_HINTS.get(name, ""))
        for sub in wafer.kernel.sub_jaxprs(eqn):
            check_supported(sub)


def build_graph(traced: Traced) -> Graph:
    """Group the equations of `traced.jaxpr` into kernels (see the module docstring for the rule).

    Raises:
      UnsupportedOpError: the program uses a primitive outside `SUPPORTED_PRIMITIVES`.
    """
    jaxpr = traced.jaxpr
    check_supported(jaxpr)
    eqns = list(jaxpr.eqns)
    n = len(eqns)
    param_index = traced.param_index
    const_index = {v: i for i, v in enumerate(jaxpr.constvars)}
    graph_outs = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}

    # Activations: values that depend on a graph input. Everything else is weight-side.
    active = set(traced.input_vars)
    dependent = []
    producer, users = {}, {}
    for i, eqn in enumerate(eqns):
        reads = [v for v in eqn.invars if isinstance(v, jcore.Var)]
        dep = any(v in active for v in reads)
        dependent.append(dep)
        for v in reads:
            users.setdefault(v, []).append(i)
        for v in eqn.outvars:
            if not isinstance(v, jcore.DropVar):
                producer[v] = i
                if dep:
                    active.add(v)

    def is_anchor(i):
        eqn = eqns[i]
        if not dependent[i] or eqn.primitive.name not in ANCHORS:
            return False
        if eqn.primitive.name == "gather":
            return _is_weight(eqn.invars[0], active)
        return True

    anchors = [i for i in range(n) if is_anchor(i)]
    anchor_of = {p: k for k, p in enumerate(anchors)}

    # Pass 1: epilogue fusion by position. Group -1 holds activation equations before the first anchor.
    group = [-1] * n
    current = -1
    for i in range(n):
        current = anchor_of.get(i, current)
        group[i] = current

    # Pass 2: prologues.
    for k, p in enumerate(anchors):
        start = anchors[k - 1] if k else -1
        feeds = {v for v in eqns[p].invars if isinstance(v, jcore.Var)}
        q = p - 1
        while q > start:
            if dependent[q]:
                outs = [v for v in eqns[q].outvars if not isinstance(v, jcore.DropVar)]
                if not (_is_prologue_op(eqns[q]) and outs and any(v in feeds for v in outs)):
                    break
                group[q] = k
                feeds.update(v for v in eqns[q].invars if isinstance(v, jcore.Var))
            q -= 1

    # Pass 3: weight-side equations join the first kernel using their result.
    for i in reversed(range(n)):
        if dependent[i]:
            continue
        consumers = [group[j] for v in eqns[i].outvars if not isinstance(v, jcore.DropVar) for j in users.get(v, ())]
        if consumers:
            group[i] = min(consumers)

    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(group[i], []).append(i)
    order = sorted(members)
    group_of_var = {v: group[i] for v, i in producer.items()}

    # Names and kinds first, so that kernels can name their predecessors.
    kinds = {g: ("elementwise" if g < 0 else _kind(eqns[anchors[g]], active)) for g in order}
    per_kind: Counter = Counter()
    names = {}
    for g in order:
        names[g] = f"{kinds[g]}_{per_kind[kinds[g]]}"
        per_kind[kinds[g]] += 1

    kernels = []
    edge_bytes: dict[tuple[str, str], int] = {}
    edge_values: dict[tuple[str, str], list] = {}
    for index, g in enumerate(order):
        idx = members[g]
        keqns = tuple(eqns[i] for i in idx)
        defined = {v for e in keqns for v in e.outvars if not isinstance(v, jcore.DropVar)}
        # Dicts as ordered sets: first-read order.
        params, consts, inputs = {}, {}, {}
        for e in keqns:
            for v in e.invars:
                if not isinstance(v, jcore.Var) or v in defined:
                    continue
                if v in param_index:
                    params.setdefault(param_index[v])
                elif v in const_index:
                    consts.setdefault(const_index[v])
                else:
                    inputs.setdefault(v)
        outputs = [
            v
            for i in idx
            for v in eqns[i].outvars
            if not isinstance(v, jcore.DropVar) and (v in graph_outs or any(group[j] != g for j in users.get(v, ())))
        ]
        preds = set()
        for v in inputs:
            src = group_of_var.get(v)
            if src is not None:
                preds.add(src)
                key = (names[src], names[g])
                edge_bytes[key] = edge_bytes.get(key, 0) + nbytes(v.aval)
                edge_values.setdefault(key, []).append(v)
        counts = dict(_count(keqns, outputs))
        anchor = eqns[anchors[g]] if g >= 0 else None
        batch = next((v.aval.shape[0] for v in inputs if v in active and v.aval.ndim >= 1), None)
        kernels.append(
            Kernel(
                name=names[g],
                kind=kinds[g],
                index=index,
                eqns=keqns,
                anchor=anchor,
                params=tuple(params),
                consts=tuple(consts),
                inputs=tuple(inputs),
                outputs=tuple(outputs),
                counts=counts,
                flops=wafer.kernel.flops(counts),
                param_bytes=sum(nbytes(traced.param_avals[i]) for i in params),
                in_bytes=sum(nbytes(v.aval) for v in inputs),
                out_bytes=sum(nbytes(v.aval) for v in outputs),
                source=user_source(anchor if anchor is not None else keqns[0]),
                preds=tuple(names[s] for s in sorted(preds)),
                batch=int(batch) if batch is not None else None,
                ops=tuple(e.primitive.name for e in keqns),
            )
        )

    unused = tuple(i for i in range(traced.n_params) if not any(i in k.params for k in kernels))
    if unused and kernels:
        # a parameter the program never reads is still the user's: kept in the first kernel's SRAM (loaded, read
        # back, and updated by training as natively: a zero gradient, and whatever the optimizer does with it)
        k0 = kernels[0]
        kernels[0] = dataclasses.replace(
            k0,
            params=k0.params + unused,
            param_bytes=k0.param_bytes + sum(nbytes(traced.param_avals[i]) for i in unused),
        )
    param_owner: dict[int, str] = {}
    shared: dict[int, list[str]] = {}
    for k in kernels:
        for p in k.params:
            if p in param_owner:
                shared.setdefault(p, []).append(k.name)
            else:
                param_owner[p] = k.name
    position = {name: i for i, name in enumerate(names[g] for g in order)}
    edges = sorted(((s, d, b) for (s, d), b in edge_bytes.items()), key=lambda e: (position[e[1]], position[e[0]]))
    return Graph(
        kernels=tuple(kernels),
        traced=traced,
        edges=tuple(edges),
        edge_values={key: tuple(vs) for key, vs in edge_values.items()},
        param_owner=param_owner,
        shared_params={p: tuple(v) for p, v in shared.items()},
        unused_params=unused,
    )


def _is_weight(atom, active) -> bool:
    """A weight: a literal, or a value computed from parameters and constants only."""
    return not isinstance(atom, jcore.Var) or atom not in active


def _kind(anchor, active) -> str:
    name = anchor.primitive.name
    if name == "dot_general":
        return "dense" if any(_is_weight(v, active) for v in anchor.invars[:2]) else "matmul"
    if name == "conv_general_dilated":
        return "conv"
    if name == "gather":
        return "embed"
    if name == "scan":
        return "scan"
    return "pool"


def _is_prologue_op(eqn) -> bool:
    """Data movement, or index arithmetic (integer or boolean results) such as an embedding's index clamping."""
    name = eqn.primitive.name
    if name in _SHAPE_OPS:
        return True
    if name in _ELEMENTWISE:
        return all(np.dtype(v.aval.dtype).kind in "biu" for v in eqn.outvars)
    return False


def _count(eqns, outvars) -> Counter:
    """What one execution of `eqns`, whose `outvars` are used outside, executes (wafer.kernel.count_jaxpr)."""
    jaxpr = jcore.Jaxpr([], [], list(outvars), list(eqns), debug_info=DEBUG_INFO)
    return Counter(wafer.kernel.count_jaxpr(jaxpr, where="compiler"))
