"""Per-core programs: a function written in plain JAX for one core, run on every core of a region.

`map_cores(fn, *xs)` vmaps `fn` over the two leading (core row, core column) axes of core-grid arrays and
counts what one core executes: the jaxpr of `fn` on one core's shapes is walked and each primitive is charged to
an instruction class (wafer/spec.py: fmac, alu, special) at the lanes its dtype gets. A multiply whose only use is
an add is fused with it into one FMAC, as the hardware's FMAC instruction does. Operands are streamed from SRAM
and results written back, so a kernel also moves its inputs' and outputs' bytes through SRAM. Cycles follow from
these counts with the rules in wafer/cost.py.

Data movement that the hardware's data-structure descriptors (DSDs) express for free (reshape, broadcast, slice,
squeeze, a change of dtype width at load) is not charged as arithmetic; copies that rearrange data
(transpose, concatenate, pad, gather, scatter, dynamic updates) are charged as ALU moves of their output.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from wafer import cost
from wafer.errors import UnsupportedPrimitiveError
from wafer.memory import Rect

_FREE = {
    "custom_lin",  # a linearised custom rule's placeholder: no work of its own
    "reshape",
    "broadcast_in_dim",
    "squeeze",
    "expand_dims",
    "slice",
    "convert_element_type",
    "copy_p",
    "stop_gradient",
    "iota",
    "bitcast_convert_type",
    "reduce_precision",
    "rev",
    "dynamic_slice",
    "split",
    "unstack",
}
_MOVE = {
    "transpose",
    "concatenate",
    "stack",
    "tile",
    "pad",
    "gather",
    "scatter",
    "scatter-add",
    "scatter_add",
    "scatter-sub",
    "scatter-mul",
    "scatter-min",
    "scatter-max",
    "dynamic_update_slice",
    "copy",
    "sort",
    "argsort",
    "cumsum",
    "cumprod",
    "cummax",
    "cummin",
    "cumlogsumexp",
}
_ALU = {
    "add",
    "sub",
    "mul",
    "neg",
    "abs",
    "max",
    "min",
    "sign",
    "floor",
    "ceil",
    "round",
    "select_n",
    "clamp",
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
    "add_any",
    "nextafter",
    "is_finite",
    "square",
    "integer_pow",
    "population_count",
}
_SPECIAL = {
    "div",
    "rem",
    "sqrt",
    "rsqrt",
    "cbrt",
    "exp",
    "exp2",
    "log",
    "log1p",
    "expm1",
    "tanh",
    "logistic",
    "sin",
    "cos",
    "tan",
    "atan2",
    "asin",
    "acos",
    "atan",
    "sinh",
    "cosh",
    "asinh",
    "acosh",
    "atanh",
    "erf",
    "erfc",
    "erf_inv",
    "pow",
    "lgamma",
    "digamma",
}
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "argmax", "argmin"}
_DOT = {"dot_general", "conv_general_dilated"}
# Keys of a count besides the arithmetic ones (op class, dtype class, read bytes, write bytes): vector instructions
# issued and task activations.
INSTRUCTIONS = ("instr",)
TASKS = ("task",)
# A tally of the vector operations issued (each one instruction at least; a matmul or a reduction more): what a
# partitioner needs to split a program's instructions over cores. It costs nothing of its own.
OPS = ("ops",)
OP_KINDS = ("fmac", "alu", "special")
# A special function (division, square root, transcendentals) is a software sequence of about this many vector
# instructions (a polynomial and a Newton step); its element cost is `WaferSpec.special_cycles`.
SPECIAL_INSTRUCTIONS = 16

# Call-like primitives: the body is evaluated in line; value: the equation parameter that holds it. The one
# table of them: the compiler's tracer inlines these bodies, its precision policy rewrites them, the counter
# walks them.
CALL_PRIMITIVES = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat2": "jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
}
# Windowed reductions (pooling) and their gradients: one ALU operation per output element per window element.
_WINDOW = {
    "reduce_window_sum",
    "reduce_window_max",
    "reduce_window_min",
    "reduce_window",
    "select_and_scatter_add",
    "select_and_gather_add",
}
# Pseudo-random bits: the threefry hash. 20 rounds of add, rotate (two shifts and an or) and xor over a pair of
# 32-bit words, plus 5 key injections, is about 110 ALU operations per pair: 55 per output word.
_RANDOM_BITS = {"random_bits", "random_split", "random_fold_in", "threefry2x32"}
THREEFRY_OPS_PER_WORD = 55
# Key bookkeeping: wrapping, unwrapping and seeding keys moves no data through the SIMD unit.
_KEYS = {"random_wrap", "random_unwrap", "random_seed"}
SUPPORTED_PRIMITIVES = tuple(
    sorted(
        _FREE
        | _MOVE
        | _ALU
        | _SPECIAL
        | _REDUCE
        | _DOT
        | _WINDOW
        | _RANDOM_BITS
        | _KEYS
        | set(CALL_PRIMITIVES)
        | {"scan", "cond", "while"}
    )
)


def dtype_class(dtype, accumulate=None) -> str:
    """Storage class of an operand dtype: "fp16" (fp16/bf16), "mixed" (16-bit in, fp32 out), "fp32", "int"."""
    dtype = np.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        if dtype.itemsize <= 2:
            if accumulate is not None and np.dtype(accumulate).itemsize >= 4:
                return "mixed"
            return "fp16"
        return "fp32"
    return "int"


def source_of(eqn) -> str:
    """The user's file:line that produced a jaxpr equation, or "unknown"."""
    try:
        from jax._src import source_info_util

        frame = source_info_util.user_frame(eqn.source_info.traceback)
        if frame is not None:
            return f"{frame.file_name}:{frame.start_line}"
    except Exception:  # source info is best-effort: never fail a count on it
        pass
    return "unknown"


def _size(aval) -> int:
    return math.prod(aval.shape)


def sub_jaxprs(eqn):
    """The jaxprs an equation holds (call bodies, scan/while bodies, cond branches), open, in parameter order.

    The one walker of sub-jaxprs: counting, the compiler's support check and its precision policy use it.
    """
    for v in eqn.params.values():
        for b in v if isinstance(v, tuple) else (v,):
            if isinstance(b, jcore.ClosedJaxpr):
                yield b.jaxpr
            elif isinstance(b, jcore.Jaxpr):
                yield b


def map_closed_jaxprs(params: Mapping, fn) -> dict:
    """`params` with every closed jaxpr (alone or in a tuple, as cond's branches) replaced by `fn(closed)`."""
    out = {}
    for k, v in params.items():
        if isinstance(v, jcore.ClosedJaxpr):
            v = fn(v)
        elif isinstance(v, tuple) and v and all(isinstance(b, jcore.ClosedJaxpr) for b in v):
            v = tuple(fn(b) for b in v)
        out[k] = v
    return out


def is_call(eqn) -> bool:
    """Whether `eqn` is a call-like equation with its body in the parameter CALL_PRIMITIVES names."""
    return eqn.primitive.name in CALL_PRIMITIVES and CALL_PRIMITIVES[eqn.primitive.name] in eqn.params


def _is_key(aval) -> bool:
    return _is_key_dtype(aval.dtype)


# By dtype (a handful in a program; counting asks for every operand of every equation).
@functools.cache
def _is_key_dtype(dtype) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.extended)


@functools.cache
def _isz_dtype(dtype) -> int:
    return int(np.dtype(dtype).itemsize) if not _is_key_dtype(dtype) else 4


def _isz(aval) -> int:
    return _isz_dtype(aval.dtype)


def _operand_bytes(atoms) -> int:
    """SRAM bytes per element of the vector operands among `atoms` (a literal or a one-element value is a scalar
    in a register; a broadcast value is read element by element through a stride-0 descriptor)."""
    return sum(_isz(a.aval) for a in atoms if _size(a.aval) > 1)


def _arith(counts, op_class, dtype, n, read, write, instructions=1) -> None:
    """Charge `n` elements of one instruction class reading `read` and writing `write` SRAM bytes per element."""
    if n <= 0:
        return
    counts[(op_class, dtype_class(dtype) if not isinstance(dtype, str) else dtype, int(read), int(write))] += n
    counts[INSTRUCTIONS] += instructions
    counts[OPS] += 1


def matmul_loop(rows, cols, depth, lhs_isz, rhs_isz, acc_isz, batch=1):
    """How a core runs a matmul out[batch, rows, cols] = sum over depth of lhs[batch, rows, depth] rhs[batch,
    depth, cols]: (vector instructions, SRAM read bytes per element, write bytes per element), in the loop order
    that issues fewer instructions:
      along the longer free axis (`@fmacs`): y[r, :] += x[r, k] * W[k, :], one instruction per (batch, shorter-axis
        index, depth index), reading the vector operand and the accumulator and writing the accumulator, the other
        factor a scalar;
      along the depth (dot products): y[r, c] = x[r, :] . W[:, c], one instruction per output element, reading both
        vector operands, accumulating in a register.
    The one statement of the rule: counting (Python numbers) and the compiler's per-core tiles (NumPy arrays or JAX
    tracers) both call it."""
    along_free = batch * depth * _min(rows, cols)
    along_depth = batch * rows * cols
    free = along_free <= along_depth
    vector_isz = _where(cols >= rows, rhs_isz, lhs_isz)
    instructions = _where(free, along_free, along_depth)
    read = _where(free, vector_isz + acc_isz, lhs_isz + rhs_isz)
    write = _where(free, acc_isz, 0 * acc_isz)
    return instructions, read, write


def _xp(*xs):
    if any(cost._is_jax(x) for x in xs):
        return jnp
    return np if any(isinstance(x, np.ndarray) for x in xs) else None


def _min(a, b):
    xp = _xp(a, b)
    return min(a, b) if xp is None else xp.minimum(a, b)


def _where(c, a, b):
    xp = _xp(c, a, b)
    return (a if c else b) if xp is None else xp.where(c, a, b)


def _matmul(counts, lhs_isz, rhs_isz, acc_isz, cls, batch, rows, cols, depth) -> None:
    """Charge a matmul as vector FMAC instructions (`matmul_loop`)."""
    n = batch * rows * cols * depth
    if n == 0:
        return
    instructions, read, write = matmul_loop(rows, cols, depth, lhs_isz, rhs_isz, acc_isz, batch)
    counts[("fmac", cls, int(read), int(write))] += n
    counts[INSTRUCTIONS] += instructions
    counts[OPS] += 1


def count_jaxpr(jaxpr, *, where: str = "per-core kernel") -> Counter:
    """What one core executes running `jaxpr`: instruction counts (module docstring).

    Returns a Counter of
      (op_class, dtype_class, read, write): elements, op_class "fmac", "alu" or "special", `read` and `write` the
        SRAM bytes per element of its vector instructions (memory-to-memory: operands from SRAM, results to it);
      ("instr",): vector instructions issued (each pays a start-up: `WaferSpec.instr_startup_cycles`);
      ("ops",): the vector operations among them (each at least one instruction), a tally for partitioning.
    """
    counts: Counter = Counter()
    # FMA fusion: a mul whose single use is an add/sub becomes part of that add's FMAC.
    uses: Counter = Counter()
    producer = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if isinstance(v, jcore.Var):
                uses[v] += 1
        for v in eqn.outvars:
            producer[v] = eqn
    for v in jaxpr.outvars:
        if isinstance(v, jcore.Var):
            uses[v] += 1
    fused = {}  # id(add) -> the mul it absorbs
    absorbed = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("add", "sub", "add_any"):
            for v in eqn.invars:
                p = producer.get(v) if isinstance(v, jcore.Var) else None
                if (
                    p is not None
                    and p.primitive.name == "mul"
                    and uses[v] == 1
                    and id(p) not in absorbed
                    and p.outvars[0].aval.shape == eqn.outvars[0].aval.shape
                ):
                    absorbed.add(id(p))
                    fused[id(eqn)] = (p, v)
                    break
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = eqn.outvars[0].aval if eqn.outvars else None
        if id(eqn) in absorbed:
            continue
        if id(eqn) in fused:
            mul, product = fused[id(eqn)]
            others = [a for a in eqn.invars if a is not product]
            read = _operand_bytes([*mul.invars, *others])
            _arith(counts, "fmac", out.dtype, _size(out), read, _isz(out))
        elif name in _RANDOM_BITS:
            words = sum(_size(o.aval) * max(1, _isz(o.aval) // 4) for o in eqn.outvars)
            # one vector ALU instruction per operation of the hash, over all words: two operands in, one out
            _arith(counts, "alu", "int", words * THREEFRY_OPS_PER_WORD, 8, 4, THREEFRY_OPS_PER_WORD)
        elif name in _FREE or name in _KEYS or any(_is_key(v.aval) for v in eqn.outvars):
            continue  # descriptor views, width changes at load, key bookkeeping
        elif name in _ALU:
            times = 1
            if name == "integer_pow":  # square-and-multiply: x**2 is one multiply, x**3 and x**4 two
                y = abs(int(eqn.params["y"]))
                times = max(1, y.bit_length() - 1 + bin(y).count("1") - 1)
            elif name == "clamp":
                times = 2
            read = _operand_bytes(eqn.invars)
            _arith(counts, "alu", out.dtype, times * _size(out), read, _isz(out), times)
        elif name in _MOVE:
            n = sum(_size(o.aval) for o in eqn.outvars)
            _arith(counts, "alu", out.dtype, n, _isz(out), _isz(out))
        elif name in _SPECIAL:
            # a software sequence per element (no hardware unit): `special_cycles` per element, as many vector
            # instructions as a start-up each (the sequence's instructions), operands read and the result written
            read = _operand_bytes(eqn.invars)
            counts[("special", dtype_class(out.dtype), int(read), _isz(out))] += _size(out)
            counts[INSTRUCTIONS] += SPECIAL_INSTRUCTIONS
            counts[OPS] += 1
        elif name in _REDUCE:
            x = eqn.invars[0].aval
            n, m = _size(x), max(1, _size(out))
            if m == 1 or m * m <= n:  # one instruction per output element, accumulating a scalar
                _arith(counts, "alu", x.dtype, n, _isz(x), 0, m)
            else:  # acc[:] += x[i, :]: one instruction per reduced index, over the outputs
                _arith(counts, "alu", x.dtype, n, 2 * _isz(x), _isz(x), max(1, n // m))
        elif name in _WINDOW:
            window = math.prod(eqn.params["window_dimensions"])
            _arith(counts, "alu", out.dtype, _size(out) * window, 2 * _isz(out), _isz(out), window)
        elif name == "dot_general":
            lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            depth = math.prod(lhs.shape[d] for d in lc)
            batch = math.prod(lhs.shape[d] for d in lb)
            rows = math.prod(d for i, d in enumerate(lhs.shape) if i not in lc and i not in lb)
            cols = math.prod(d for i, d in enumerate(rhs.shape) if i not in rc and i not in rb)
            cls = dtype_class(lhs.dtype, out.dtype)
            _matmul(counts, _isz(lhs), _isz(rhs), _isz(out), cls, batch, rows, cols, depth)
        elif name == "conv_general_dilated":
            lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
            dn = eqn.params["dimension_numbers"]
            groups = eqn.params["feature_group_count"] * eqn.params["batch_group_count"]
            depth = rhs.shape[dn.rhs_spec[1]] * math.prod(rhs.shape[d] for d in dn.rhs_spec[2:])
            cout = out.shape[dn.out_spec[1]] // groups
            positions = _size(out) // (cout * groups)
            cls = dtype_class(lhs.dtype, out.dtype)
            _matmul(counts, _isz(lhs), _isz(rhs), _isz(out), cls, groups, positions, cout, depth)
        elif name == "scan":
            body = count_jaxpr(eqn.params["jaxpr"].jaxpr, where=where)
            for key, n in body.items():
                counts[key] += n * eqn.params["length"]
        elif name == "cond":
            branches = [count_jaxpr(b.jaxpr, where=where) for b in eqn.params["branches"]]
            worst = max(branches, key=lambda c: sum(v for k, v in c.items() if k[0] in OP_KINDS))
            counts.update(worst)
        elif name == "while":
            raise UnsupportedPrimitiveError(
                "while",
                source_of(eqn),
                where + " (a data-dependent loop has no static cost; use lax.scan or fori_loop with static bounds)",
            )
        elif name in CALL_PRIMITIVES:
            for sub in sub_jaxprs(eqn):
                counts.update(count_jaxpr(sub, where=where))
        else:
            raise UnsupportedPrimitiveError(name, source_of(eqn), where)
    return counts


def arithmetic(counts: Mapping) -> dict:
    """{(op_class, dtype_class): elements} of a count, whatever SRAM bytes its instructions move."""
    out: Counter = Counter()
    for key, n in counts.items():
        if key[0] in OP_KINDS:
            out[key[:2]] += n
    return dict(out)


def flops(counts: Mapping) -> float:
    """FLOPs of a count: an FMAC is two, other arithmetic one."""
    return float(sum(n * (2 if key[0] == "fmac" else 1) for key, n in counts.items() if key[0] in OP_KINDS))


def sram_bytes(counts: Mapping) -> tuple[float, float]:
    """(read, write) SRAM bytes the instructions of a count move."""
    read = sum(n * key[2] for key, n in counts.items() if key[0] in OP_KINDS and len(key) >= 4)
    write = sum(n * key[3] for key, n in counts.items() if key[0] in OP_KINDS and len(key) >= 4)
    return float(read), float(write)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, eq=False)
class KernelCost:
    """What one per-core program costs on each core of its region.

    Attributes:
      rect: the region on the grid.
      counts: per-core instruction counts (`count_jaxpr`), with ("task",): task activations.
      mask: optional [h, w] bool of the cores that run it (None: all of `rect`).
    """

    rect: Rect
    counts: Mapping
    mask: np.ndarray | None = None

    def cycles(self, spec):
        """Cycles per core on `spec` (the cost rules of wafer/cost.py)."""
        return cost.compute_cycles(spec, self.counts)

    @property
    def flops(self) -> float:
        """FLOPs per core (an FMAC is two, other arithmetic one)."""
        return flops(self.counts)

    @property
    def sram_bytes(self) -> tuple[float, float]:
        """(read, write) SRAM bytes per core."""
        return sram_bytes(self.counts)

    def at(self, row: int, col: int) -> KernelCost:
        r = self.rect
        return dataclasses.replace(self, rect=Rect(r.row + row, r.col + col, r.height, r.width))


def count(fn, *per_core_args, where: str = "per-core kernel") -> dict:
    """Instruction counts of `fn` run once on one core's arguments (arrays or ShapeDtypeStructs) as one task."""
    closed = jax.make_jaxpr(fn)(*per_core_args)
    counts = count_jaxpr(closed.jaxpr, where=where)
    counts[TASKS] += 1
    return dict(counts)


def map_cores(fn, *xs, origin: tuple[int, int] = (0, 0)):
    """Run the per-core program `fn` on every core of a region.

    Args:
      fn: a function of per-core arrays, written in plain JAX (any pytree in and out).
      *xs: core-grid arrays [h, w, ...] (pytrees of them), all with the same h and w.
      origin: the region's top-left core on the grid, for charging.
    Returns:
      (outputs, KernelCost): outputs stacked [h, w, ...] like the inputs.
    Raises:
      UnsupportedPrimitiveError: `fn` uses a primitive without a cost rule.
    """
    leaves = jax.tree_util.tree_leaves(xs)
    if not leaves:
        raise ValueError("map_cores needs at least one core-grid array argument")
    hw = {tuple(jnp.shape(leaf)[:2]) for leaf in leaves}
    if len(hw) != 1 or any(jnp.ndim(leaf) < 2 for leaf in leaves):
        raise ValueError(
            f"map_cores: every argument must be a core-grid array [h, w, ...] with the same h and w; "
            f"got leading shapes {sorted(hw)}"
        )
    ((h, w),) = hw
    per_core = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[2:], a.dtype), xs)
    counts = count(fn, *per_core)
    out = jax.vmap(jax.vmap(fn))(*xs)
    return out, KernelCost(Rect(origin[0], origin[1], h, w), counts)
