"""Precision policies: 16-bit storage with float32 accumulation, as the wafer runs it, and its cb16 format.

    policy = compiler.Policy.BF16                      # or FP32 (the default), FP16, CB16, Policy.of("bf16")
    y = compiler.apply_policy(fn, policy)(params, x)   # fn under the policy, in plain JAX (jit/grad/vmap work)
    exe = compiler.compile(fn, params, x, spec=spec, policy=policy)
    tx = compiler.compile_train(loss_fn, params, batch, optimizer, spec=spec, policy=policy)

The wafer's FMAC instructions take 16-bit operands from SRAM and accumulate in float32 ("fp16-in, fp32-acc",
2 lanes per cycle on WSE-2 against 4 for pure fp16 [SDK SIMD appendix]; see wafer/spec.py). A *policy* says in
which 16-bit format weights and activations are stored: IEEE float16, bfloat16, or Cerebras's cb16
(cbfloat16: 1 sign bit, 6 exponent bits, 9 mantissa bits). Accumulation is always float32.

What `apply_policy(fn, policy)` rounds (everything else runs in float32):
  - every floating-point leaf of the first argument (the parameters) on entry: weights are stored in the 16-bit
    format in SRAM (in training: the 16-bit working copy of the float32 master weights);
  - both operands of every `dot_general` and `conv_general_dilated` whose operands are float32: they are read
    from SRAM in the storage format, and the products are accumulated in float32
    (`preferred_element_type=float32`; products of two 16-bit values are exact in float32);
  - the result of every such op: the activation written back to SRAM in the storage format.
  Elementwise epilogues (bias, activation functions), norms, softmax and the loss run in float32 on these
  values, as the wafer's fp32 ALU does; their results are rounded only where they next enter a matmul. Inputs
  (the batch) are not rounded on entry: they are rounded where they enter a matmul. Why here and nowhere else:
  these are the points where the hardware converts (16-bit SRAM operands of the mixed FMAC, 16-bit stores of its
  results); rounding every elementwise result as well would model a pure-fp16 ALU, which the policy does not use.

Representation and gradients. In the running program a stored value is float32 on the storage grid, made by
`policy.round` (`round_to`: the values of `x.astype(float16 or bfloat16).astype(float32)`, or `round_cb16`;
built on `lax.reduce_precision`, which XLA keeps, where its GPU backend drops a float32 -> bfloat16 -> float32
pair of casts as "excess precision"), and matmuls take float32 operands with `preferred_element_type=float32`.
That is exact: products of two 16-bit values fit float32's 24-bit significand (bf16 8+8 bits, fp16 11+11, cb16
10+10), so only the float32 accumulation rounds, as on the wafer. Under `jax.grad` each rounding point rounds
its cotangent the same way: that is what JAX gives for the astype round trip (its transpose casts the cotangent
through bfloat16: *not* an identity gradient), and `round_to` is a `jax.custom_vjp` doing the same for all three
formats, which so behave alike: the backward pass stores activation and weight gradients in the storage format
and accumulates its matmuls in float32, mirroring the forward. A value read by several matmuls (a weight used at
every step of a `scan`, a shared embedding) is rounded once, so its gradient contributions are summed in float32
and rounded once. Forward-mode `jax.jvp` through the rounding is not available (custom_vjp has no JVP). There is
no loss scaling: with fp16, gradients below 2**-24 flush to zero; scale the loss yourself if that matters.

Master weights. Training keeps float32 master weights and float32 optimizer state in SRAM (the usual mixed-
precision recipe, and Cerebras's automatic mixed precision): the step reads the master weights, rounds them to
the storage format on entry (the 16-bit working copy), takes gradients through the policy's forward, and
the optax update runs in float32 on the master weights. The native reference does the same: `optax` on float32
params, the loss written with the same rounding. So in training the weight-side SRAM (weights, gradient,
optimizer slots) is what float32 training holds; activations (stream buffer and backward stash) are counted at
2 bytes, and matmul FMACs run at the mixed SIMD width. In inference (`compile`), weights are stored in SRAM in
the 16-bit format: float16/bfloat16 arrays, and cb16 as its 16-bit bit patterns (uint16), so weight SRAM halves.

cb16 (`round_cb16`, `encode_cb16`, `decode_cb16`), IEEE-like, documented choices:
  - value of a normal number (biased exponent e in 1..62): (-1)^s * (1 + m / 2**9) * 2**(e - 31);
  - subnormals (e = 0): (-1)^s * (m / 2**9) * 2**-30, so gradual underflow down to 2**-39; signed zeros;
  - e = 63: infinity (m = 0) or NaN (m != 0; NaNs are encoded as quiet NaN 0x7f00 | sign);
  - largest finite `CB16_MAX` = (2 - 2**-9) * 2**31 ~ 4.29e9, smallest normal `CB16_MIN_NORMAL` = 2**-30
    ~ 9.3e-10, smallest subnormal `CB16_MIN_SUBNORMAL` = 2**-39 ~ 1.8e-12;
  - rounding: to nearest, ties to even (the even mantissa, as IEEE 754 roundTiesToEven), over normals and
    subnormals alike; a magnitude at or beyond CB16_MAX + half an ulp (2**32 - 2**21) overflows to infinity with
    its sign; magnitudes at or below half the smallest subnormal round to zero with their sign; NaN stays NaN.
  Values are kept as float32 on the cb16 grid inside programs and counted as 2 bytes of SRAM; a compiled
  inference program stores the 16-bit encodings.

In the compiler's own traced program (used for the kernel graph, SRAM layout and cost), the storage format
appears as a 16-bit JAX dtype, so the machine's counter (`wafer.kernel.dtype_class`) classes each policy matmul
as "mixed" (16-bit operands, float32 `preferred_element_type`) and the casts as free conversions at load and
store. cb16 has no JAX dtype, so it is *counted* with float16 as a stand-in of the same width (the cost is the
same: 2 bytes, mixed FMAC lanes) while the program *runs* with exact cb16 rounding (see `apply_policy`'s
`stand_in`). The per-core execution path evaluates that traced program literally, so for cb16 it is not
available; for fp16 and bf16 it computes the same values as the running program (16-bit typed operands and
float32 operands on the grid give the same exact products).

Sources: Cerebras SDK documentation, CSL "SIMD mode" appendix (fp16 FMAC 4 lanes, fp16-in/fp32-accumulate 2
lanes on WSE-2); Cerebras documentation of cbfloat16 (6-bit exponent, 9-bit mantissa). The exponent bias 31,
subnormals and the rounding mode are not published: they are our IEEE-like choices above.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import source_info_util
from jax.extend import core as jcore

from wafer.formats import (  # noqa: F401 - the formats' names are part of this module's API
    CB16_BIAS,
    CB16_EXPONENT_BITS,
    CB16_MANTISSA_BITS,
    CB16_MAX,
    CB16_MIN_NORMAL,
    CB16_MIN_SUBNORMAL,
    FORMATS,
    cb16_values,
    decode_cb16,
    encode_cb16,
    round_cb16,
    round_to,
)
from wafer.kernel import CALL_PRIMITIVES, is_call, sub_jaxprs

STORAGE_FORMATS = ("float32", "float16", "bfloat16", "cb16")
_ALIASES = {
    "fp32": "float32",
    "f32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "float16": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "cb16": "cb16",
    "cbfloat16": "cb16",
}
_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "cb16": "cb16"}

# ---- policies ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Policy:
    """A precision policy: the format weights and activations are stored in, and float32 accumulation.

    Attributes:
      storage: "float32" (the default: everything float32), "float16", "bfloat16" or "cb16".
      accumulate: "float32" (the only accumulation the wafer's FMACs offer with 16-bit inputs in this model).

    Presets: `Policy.FP32`, `Policy.FP16`, `Policy.BF16`, `Policy.CB16` (also module constants FP32, ...).
    """

    storage: str = "float32"
    accumulate: str = "float32"

    FP32: ClassVar[Policy]
    FP16: ClassVar[Policy]
    BF16: ClassVar[Policy]
    CB16: ClassVar[Policy]

    def __post_init__(self):
        if self.storage not in STORAGE_FORMATS:
            close = _ALIASES.get(str(self.storage).lower())
            hint = f" Perhaps you meant {close!r}?" if close else ""
            raise ValueError(f"Policy.storage must be one of {STORAGE_FORMATS}, got {self.storage!r}.{hint}")
        if self.accumulate != "float32":
            raise ValueError(
                f"Policy.accumulate must be 'float32' (the wafer accumulates in fp32), got {self.accumulate!r}"
            )

    @classmethod
    def of(cls, policy: Policy | str | None) -> Policy:
        """A Policy from a Policy, None (float32) or a name: "fp32", "fp16", "bf16", "cb16" (or full names)."""
        if policy is None:
            return FP32
        if isinstance(policy, Policy):
            return policy
        if isinstance(policy, str) and policy.lower() in _ALIASES:
            return cls(_ALIASES[policy.lower()])
        raise ValueError(f"policy must be a compiler.Policy, None or one of {sorted(_ALIASES)}; got {policy!r}")

    @property
    def name(self) -> str:
        """Short name: "fp32", "fp16", "bf16" or "cb16"."""
        return _SHORT[self.storage]

    @property
    def mixed(self) -> bool:
        """Whether storage is 16-bit (with float32 accumulation)."""
        return self.storage != "float32"

    @property
    def storage_bytes(self) -> int:
        """SRAM bytes per stored element: 4 for float32, 2 for the 16-bit formats."""
        return 2 if self.mixed else 4

    @property
    def dtype_class(self) -> str:
        """The SIMD dtype class of the policy's matmuls (wafer/spec.py): "fp32", or "mixed" (16-bit in, fp32 acc)."""
        return "mixed" if self.mixed else "fp32"

    @property
    def stand_in_dtype(self):
        """The JAX dtype standing for the storage format in the compiler's traced program (float16 for cb16)."""
        return {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "cb16": jnp.float16}.get(self.storage, jnp.float32)

    @property
    def sram_dtype(self):
        """The dtype of a compiled inference program's weight tiles in SRAM (cb16: uint16 bit patterns)."""
        return {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "cb16": jnp.uint16}.get(self.storage, jnp.float32)

    def round(self, x) -> jax.Array:
        """Round to the storage format; returns float32 (identity for float32 storage).

        The values of `x.astype(fmt).astype(float32)` for float16/bfloat16 (round to nearest even, IEEE
        subnormals, overflow to inf), `round_cb16` for cb16; made with `round_to`, which XLA cannot drop as excess
        precision. Gradient: the cotangent rounded the same way.
        """
        x = jnp.asarray(x)
        if not self.mixed:
            return x
        return round_to(x, self.storage)

    def store(self, x) -> jax.Array:
        """A floating-point array as stored in SRAM (`sram_dtype`): rounded and cast, cb16 encoded."""
        x = jnp.asarray(x)
        if self.storage == "cb16":
            return encode_cb16(x)
        return x.astype(self.sram_dtype)

    def load(self, s, dtype=jnp.float32) -> jax.Array:
        """An SRAM array written by `store`, back as `dtype` (float32 by default)."""
        s = jnp.asarray(s)
        if self.storage == "cb16":
            return decode_cb16(s).astype(dtype)
        return s.astype(dtype)

    def __str__(self) -> str:
        if not self.mixed:
            return "fp32"
        return f"{self.name} storage, fp32 accumulation"


FP32 = Policy("float32")
FP16 = Policy("float16")
BF16 = Policy("bfloat16")
CB16 = Policy("cb16")
Policy.FP32, Policy.FP16, Policy.BF16, Policy.CB16 = FP32, FP16, BF16, CB16


# ---- apply_policy: a jaxpr interpreter ---------------------------------------------------------------------------

_MATMULS = ("dot_general", "conv_general_dilated")
# Control flow whose bodies are rewritten under the policy.
_CONTROL = ("scan", "while", "cond")


def apply_policy(fn: Callable, policy: Policy | str | None, *, stand_in: bool = False, params_argnum: int | None = 0):
    """`fn` run under `policy`, as the wafer runs it (see the module docstring for what is rounded).

    The returned function traces `fn` to a jaxpr (`jax.make_jaxpr`) on every call and evaluates it with the
    policy's rounding around every float32 `dot_general`/`conv_general_dilated`, which then accumulate in
    float32. Calls (pjit, custom_jvp/vjp, remat) that contain a matmul are evaluated in line, so their custom
    derivative rules give way to differentiating the rounded body; calls without one are bound unchanged, keeping
    their rules (e.g. `jax.nn.relu`'s). `scan`, `while` and `cond` bodies are rewritten the same way. Every
    other primitive is bound as it is, random ones included, so dropout draws the same masks from the same keys.
    Works under jit, grad and vmap. Every value keeps its dtype: the program's results are float32.

    Args:
      fn: any JAX-traceable function.
      policy: a Policy, a name ("bf16") or None; float32 storage returns `fn` itself.
      stand_in: build the compiler's view of the program: the storage format as a 16-bit JAX dtype
        (`policy.stand_in_dtype`; float16 for cb16, which then rounds as float16, not exactly). For the kernel
        graph and cost only.
      params_argnum: the positional argument holding the parameters (rounded on entry); None for none. Its
        floating leaves may come in any float dtype (a compiled program passes its 16-bit SRAM tiles); `fn` is
        traced with them as float32.
    """
    policy = Policy.of(policy)
    if not policy.mixed:
        return fn
    ctx = _Ctx(policy, stand_in)

    def wrapped(*args, **kwargs):
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        is_param = [False] * len(leaves)
        if params_argnum is not None and params_argnum < len(args):
            before = len(jax.tree_util.tree_leaves(args[:params_argnum]))
            n = len(jax.tree_util.tree_leaves(args[params_argnum]))
            is_param[before : before + n] = [True] * n
        values, avals, twins = [], [], []
        for leaf, p in zip(leaves, is_param):
            x = leaf if isinstance(leaf, jax.Array | np.ndarray | np.generic) else jnp.asarray(leaf)
            if p and _is_float(x.dtype):
                values.append(None)  # made from the stored form when a non-matmul use needs it
                twins.append(ctx.enter(x))
                avals.append(jax.ShapeDtypeStruct(x.shape, jnp.float32))
            else:
                values.append(x)
                twins.append(None)
                avals.append(x)
        out_tree = []

        def flat_fn(*flat):
            a, k = jax.tree_util.tree_unflatten(treedef, flat)
            out, tree = jax.tree_util.tree_flatten(fn(*a, **k))
            out_tree.append(tree)
            return out

        closed = jax.make_jaxpr(flat_fn)(*avals)
        outs = _eval(closed.jaxpr, closed.consts, values, ctx, twins)
        return jax.tree_util.tree_unflatten(out_tree[-1], outs)

    wrapped.__wrapped__ = fn
    wrapped.__name__ = getattr(fn, "__name__", "fn") + f"_{policy.name}"
    return wrapped


@dataclasses.dataclass(frozen=True)
class _Ctx:
    policy: Policy
    stand_in: bool

    @property
    def typed(self):
        """The 16-bit JAX dtype of stored values in the compiler's view; None when running: stored values are
        float32 on the storage grid, made by `policy.round`."""
        return self.policy.stand_in_dtype if self.stand_in else None

    def enter(self, x):
        """A parameter leaf -> its stored form."""
        if self.typed is not None and x.dtype == self.typed:
            return x
        return self.store(x.astype(jnp.float32))

    def store(self, y):
        """A float32 value written to SRAM -> its stored form (what matmuls read)."""
        return self.policy.round(y) if self.typed is None else y.astype(self.typed)

    def load(self, s):
        """A stored form -> its float32 value."""
        return s if self.typed is None else s.astype(jnp.float32)

    def operand(self, x):
        """A float32 matmul operand as read from SRAM."""
        return self.store(x)


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def _applies(eqn) -> bool:
    """Whether the policy rewrites this matmul: two float32 operands."""
    if eqn.primitive.name not in _MATMULS or len(eqn.invars) != 2:
        return False
    return all(np.dtype(v.aval.dtype) == np.float32 for v in eqn.invars)


def _has_matmul(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if _applies(eqn) or any(_has_matmul(sub) for sub in sub_jaxprs(eqn)):
            return True
    return False


def _eval(jaxpr, consts, args, ctx: _Ctx, twins=None) -> list:
    """Evaluate `jaxpr` under the policy. `twins[i]`: the stored (16-bit) form of argument i, if known."""
    env: dict = {}
    stored: dict = {}  # var -> its stored form, for values on the storage grid

    def read(a):
        if isinstance(a, jcore.Literal):
            return a.val
        if a not in env:
            # float32 form made on first use only: a value read by matmuls alone leaves no dead cast behind
            env[a] = ctx.load(stored[a])
        return env[a]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for i, (v, x) in enumerate(zip(jaxpr.invars, args)):
        if twins is not None and twins[i] is not None:
            stored[v] = twins[i]
        else:
            env[v] = x

    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        with source_info_util.user_context(eqn.source_info.traceback), eqn.ctx.manager:
            if _applies(eqn):
                ops = [
                    stored[a] if isinstance(a, jcore.Var) and a in stored else ctx.operand(read(a)) for a in eqn.invars
                ]
                params = dict(eqn.params, preferred_element_type=np.dtype(np.float32))
                stored[eqn.outvars[0]] = ctx.store(eqn.primitive.bind(*ops, **params))
                continue
            subs = list(sub_jaxprs(eqn))
            inline = bool(subs) and any(_has_matmul(s) for s in subs)
            if inline and is_call(eqn):  # a call-like primitive: its body evaluated in line, with the policy
                body = eqn.params[CALL_PRIMITIVES[name]]
                sub, sub_consts = (body.jaxpr, body.consts) if isinstance(body, jcore.ClosedJaxpr) else (body, ())
                sub_twins = [stored.get(a) if isinstance(a, jcore.Var) else None for a in eqn.invars]
                sub_args = [None if t is not None else read(a) for a, t in zip(eqn.invars, sub_twins)]
                outs = _eval(sub, sub_consts, sub_args, ctx, sub_twins)
            elif inline:
                invals = [read(a) for a in eqn.invars]
                if name in _CONTROL:
                    fixed = _fixed_operands(eqn) if ctx.typed is None else ()
                    # loop-invariant operands on the storage grid enter the bodies as stored: not rounded again
                    # per iteration, so the gradient of a weight used in every step is summed in float32 and
                    # rounded once, as at top level
                    known = [i in fixed and isinstance(a, jcore.Var) and a in stored for i, a in enumerate(eqn.invars)]
                    invals = [stored[a] if k else x for a, x, k in zip(eqn.invars, invals, known)]
                    params = _rewrite_bodies(eqn, ctx, known)
                    outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
                    outs = outs if eqn.primitive.multiple_results else [outs]
                else:
                    raise NotImplementedError(
                        f"apply_policy: primitive '{name}' holds a matmul in a body the policy cannot rewrite"
                    )
            else:
                invals = [read(a) for a in eqn.invars]
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
                outs = outs if eqn.primitive.multiple_results else [outs]
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = x
    return [read(a) for a in jaxpr.outvars]


def _fixed_operands(eqn) -> set[int]:
    """Operand positions of a control-flow equation whose body sees the same value (or a slice of it) on every
    iteration: scan's consts and xs, while's body consts, cond's operands."""
    p, n = eqn.params, len(eqn.invars)
    if eqn.primitive.name == "scan":
        return set(range(p["num_consts"])) | set(range(p["num_consts"] + p["num_carry"], n))
    if eqn.primitive.name == "while":
        return set(range(p["cond_nconsts"], p["cond_nconsts"] + p["body_nconsts"]))
    if eqn.primitive.name == "cond":
        return set(range(1, n))
    return set()


def _rewrite_closed(closed: jcore.ClosedJaxpr, ctx: _Ctx, known=None) -> jcore.ClosedJaxpr:
    """A closed jaxpr with the policy applied; same input and output types. `known[i]`: input i is stored."""
    if not _has_matmul(closed.jaxpr):
        return closed
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=v.aval.weak_type) for v in closed.jaxpr.invars]
    known = known or [False] * len(avals)

    def body(*a):
        twins = [x if k else None for x, k in zip(a, known)]
        return _eval(closed.jaxpr, closed.consts, [None if k else x for x, k in zip(a, known)], ctx, twins)

    return jax.make_jaxpr(body)(*avals)


def _rewrite_bodies(eqn, ctx: _Ctx, known) -> dict:
    """The equation's params with its bodies rewritten; `known[i]`: operand i is passed in its stored form."""
    params = dict(eqn.params)
    name = eqn.primitive.name
    if name == "scan":
        params["jaxpr"] = _rewrite_closed(params["jaxpr"], ctx, known)
    elif name == "while":
        nc, nb = params["cond_nconsts"], params["body_nconsts"]
        params["cond_jaxpr"] = _rewrite_closed(params["cond_jaxpr"], ctx)
        params["body_jaxpr"] = _rewrite_closed(params["body_jaxpr"], ctx, known[nc : nc + nb] + known[nc + nb :])
    else:  # cond: the branches take the operands after the index
        params["branches"] = tuple(_rewrite_closed(b, ctx, known[1:]) for b in params["branches"])
    return params
