"""Trace: a JAX or Flax program as one flat jaxpr of primitive equations.

`trace(fn, params, *inputs)` runs `jax.make_jaxpr` on the function of flat leaves (parameter leaves first, then
input leaves) and inlines every call-like sub-jaxpr recursively, so the result is a single `Jaxpr` whose equations
are primitives only:

- `jit` / `pjit`, `closed_call`, `core_call`: the called jaxpr;
- `custom_jvp_call`: its primal `call_jaxpr` (the custom derivative rule does not change the forward value);
- `custom_vjp_call` / `custom_vjp_call_jaxpr`: the primal function's jaxpr;
- `remat2` / `checkpoint` / `remat`: the rematerialised jaxpr (rematerialisation is a backward-pass policy).

Control flow (`scan`, `cond`, `while`) stays one equation each; the calls inside their bodies are inlined too.
The Cerebras compiler sees the same thing: a graph of library-kernel candidates, not Python functions.

An `nnx.Module` is accepted in place of `fn`: `trace(module, *inputs)` splits it with `nnx.split` into a graph
definition and its state; the state (every variable, parameters and batch statistics alike) plays the part of
`params`, and `fn(state, *xs) = nnx.merge(graphdef, state)(*xs)`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend import core as jcore

import wafer.kernel
from compiler.frontend import batch as batching
from compiler.frontend import frameworks, precision

# Call-like primitives whose body is inlined, and the parameter that holds it: the machine's one table.
CALL_PRIMITIVES = wafer.kernel.CALL_PRIMITIVES
is_call = wafer.kernel.is_call


# For jaxprs the compiler builds itself (JAX deprecates jaxprs without one).
DEBUG_INFO = jcore.DebugInfo("compiler", None, None, None)


@dataclasses.dataclass(frozen=True, eq=False)
class Traced:
    """A traced program: the user's function, its flat jaxpr, and how pytrees map to the jaxpr's variables.

    The jaxpr's invars are the `n_params` parameter leaves followed by the input leaves; its outvars are the output
    leaves. Equations are primitives only (calls inlined); `scan`/`cond`/`while` remain single equations.

    Attributes:
      fn: callable(params, *inputs) -> outputs (for an nnx module: merges the module and calls it).
      params: the parameters the trace was made with (for an nnx module: its `nnx.State`).
      inputs: the example inputs (a tuple).
      jaxpr: the flat `jax.extend.core.Jaxpr`.
      consts: values of `jaxpr.constvars` (closed-over arrays).
      n_params: how many leading invars are parameter leaves.
      param_treedef, param_avals, param_paths: the params pytree's structure, leaf avals and readable leaf paths
        ("params/Dense_0/kernel").
      input_treedef, input_avals: the same for the tuple of inputs.
      out_treedef, out_avals: the same for the outputs.
      module: whether `fn` came from an `nnx.Module`.
      batch: samples per call, from the inputs' batch axes (compiler/frontend/batch.py).
    """

    fn: Callable = dataclasses.field(repr=False)
    params: Any = dataclasses.field(repr=False)
    inputs: tuple = dataclasses.field(repr=False)
    jaxpr: jcore.Jaxpr = dataclasses.field(repr=False)
    consts: tuple = dataclasses.field(repr=False)
    n_params: int
    param_treedef: Any = dataclasses.field(repr=False)
    param_avals: tuple = dataclasses.field(repr=False)
    param_paths: tuple[str, ...]
    input_treedef: Any = dataclasses.field(repr=False)
    input_avals: tuple
    out_treedef: Any = dataclasses.field(repr=False)
    out_avals: tuple
    module: bool = False
    batch: int = 1

    # Cached (functions of the frozen fields): the passes look parameters up once per kernel and placement.
    @functools.cached_property
    def param_vars(self) -> tuple:
        """The jaxpr invars holding the parameter leaves, in flat order."""
        return tuple(self.jaxpr.invars[: self.n_params])

    @functools.cached_property
    def param_index(self) -> dict:
        """{jaxpr invar: flat index} of the parameter leaves."""
        return {v: i for i, v in enumerate(self.param_vars)}

    @property
    def input_vars(self) -> tuple:
        """The jaxpr invars holding the input leaves, in flat order."""
        return tuple(self.jaxpr.invars[self.n_params :])

    def apply(self, params, *inputs):
        """The user's function: `fn(params, *inputs)` (works for nnx modules too)."""
        return self.fn(params, *inputs)

    def flatten_params(self, params) -> list:
        """Flat leaves of `params`, checked against the traced structure.

        Raises:
          ValueError: `params` has a different tree structure from the one traced.
        """
        leaves, treedef = jax.tree_util.tree_flatten(params)
        if treedef != self.param_treedef:
            raise ValueError(
                f"params do not match the traced structure: expected {self.param_treedef}, got {treedef}. "
                "Pass the same pytree (same keys, same nesting) that the program was traced with."
            )
        return leaves

    def flatten_inputs(self, *inputs) -> list:
        """Flat leaves of `inputs`, checked against the traced structure.

        Raises:
          ValueError: `inputs` have a different tree structure from the ones traced.
        """
        leaves, treedef = jax.tree_util.tree_flatten(tuple(inputs))
        if treedef != self.input_treedef:
            raise ValueError(f"inputs do not match the traced structure: expected {self.input_treedef}, got {treedef}.")
        return leaves

    def eval_flat(self, param_leaves: Sequence, input_leaves: Sequence) -> list:
        """Evaluate the flat jaxpr on flat leaves; returns the flat output leaves."""
        if len(param_leaves) != self.n_params or len(input_leaves) != len(self.input_avals):
            raise ValueError(
                f"eval_flat expects {self.n_params} parameter leaves and {len(self.input_avals)} input leaves, "
                f"got {len(param_leaves)} and {len(input_leaves)}"
            )
        return jcore.jaxpr_as_fun(jcore.ClosedJaxpr(self.jaxpr, list(self.consts)))(*param_leaves, *input_leaves)

    def eval(self, params, *inputs):
        """Evaluate the flat jaxpr on pytrees; equals `apply(params, *inputs)`."""
        out = self.eval_flat(self.flatten_params(params), self.flatten_inputs(*inputs))
        return jax.tree_util.tree_unflatten(self.out_treedef, out)


def split_module(module: nnx.Module) -> tuple[Callable, Any]:
    """An nnx module as `(fn, state)` with `fn(state, *xs) == module(*xs)`."""
    graphdef, state = nnx.split(module)
    return (lambda state, *xs: nnx.merge(graphdef, state)(*xs)), state


def path_str(path) -> str:
    """A readable "a/b/0/c" for a pytree key path; nnx's trailing ".value" is dropped."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    if len(parts) > 1 and parts[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        parts.pop()
    return "/".join(parts)


def trace(fn, *args, policy=None, stored_params: bool = True, batch_axis=batching.AUTO) -> Traced:
    """Trace `fn(params, *inputs)` (or an nnx module: `trace(module, *inputs)`) into a flat jaxpr.

    Args:
      fn: a function of (params, *inputs), e.g. a linen `model.apply`; or an `nnx.Module`, a `torch.nn.Module` or
        a Keras 3 model (compiler/frontend: their params are the importer's).
      *args: `params, *inputs` for a function; `*inputs` for a module or model. Leaves may be arrays or
        `jax.ShapeDtypeStruct`s. Python flags (e.g. `train=False`) must be closed over, not passed: every input leaf
        becomes a traced array.
      policy: a 16-bit precision policy (compiler/frontend/precision.py), or None / "fp32". Under a 16-bit
        policy the traced jaxpr is `apply_policy(fn, policy, stand_in=True)`: the kernel graph, SRAM layout and cost
        come from it (16-bit matmul operands count as "mixed" FMACs, casts are free), while the returned
        `Traced.fn` is the exact `apply_policy(fn, policy)`, which is what runs, and `Traced.params` are the
        caller's params.
      stored_params: under a 16-bit policy, trace the floating parameter leaves in the 16-bit stand-in dtype, so
        weight tiles are laid out as 2-byte SRAM arrays (inference); False keeps them float32 (training's master
        weights).
      batch_axis: which axis of each input holds the samples: "auto", None (one sample), an int, or a prefix of
        the inputs' tree (compiler/frontend/batch.py).
    Returns:
      A `Traced` whose jaxpr has no call-like equations left.
    Raises:
      compiler.BatchError: the inputs disagree on the batch size, or a bad `batch_axis`.
    """
    policy = precision.Policy.of(policy)
    if policy.mixed:
        return _trace_policy(fn, *args, policy=policy, stored_params=stored_params, batch_axis=batch_axis)
    if isinstance(fn, nnx.Module):
        fn, params = split_module(fn)
        inputs, module = tuple(args), True
    elif (imported := frameworks.as_function(fn)) is not None:  # a torch module or Keras model
        fn, params = imported
        inputs, module = tuple(args), True
    else:
        if not callable(fn):
            raise TypeError(f"trace: expected a function or an nnx.Module, got {type(fn).__name__}")
        if not args:
            raise TypeError("trace(fn, params, *inputs): params are missing (pass {} for a function without any)")
        params, inputs, module = args[0], tuple(args[1:]), False

    param_leaves_paths, param_treedef = jax.tree_util.tree_flatten_with_path(params)
    param_leaves = [leaf for _, leaf in param_leaves_paths]
    input_leaves, input_treedef = jax.tree_util.tree_flatten(inputs)
    n_params = len(param_leaves)
    out_tree = []

    def flat_fn(*leaves):
        p = jax.tree_util.tree_unflatten(param_treedef, leaves[:n_params])
        xs = jax.tree_util.tree_unflatten(input_treedef, leaves[n_params:])
        out_leaves, treedef = jax.tree_util.tree_flatten(fn(p, *xs))
        out_tree.append(treedef)
        return out_leaves

    closed = jax.make_jaxpr(flat_fn)(*param_leaves, *input_leaves)
    jaxpr, consts = flatten_jaxpr(closed.jaxpr, closed.consts)
    avals = [v.aval for v in jaxpr.invars]
    batch = batching.input_batch(jaxpr, jaxpr.invars[n_params:], inputs, batch_axis)
    return Traced(
        fn=fn,
        params=params,
        inputs=inputs,
        jaxpr=jaxpr,
        consts=tuple(consts),
        n_params=n_params,
        param_treedef=param_treedef,
        param_avals=tuple(avals[:n_params]),
        param_paths=tuple(path_str(path) for path, _ in param_leaves_paths),
        input_treedef=input_treedef,
        input_avals=tuple(avals[n_params:]),
        out_treedef=out_tree[-1],
        out_avals=tuple(v.aval for v in jaxpr.outvars),
        module=module,
        batch=batch,
    )


def flatten_jaxpr(jaxpr: jcore.Jaxpr, consts: Sequence) -> tuple[jcore.Jaxpr, list]:
    """`jaxpr` with every call-like sub-jaxpr inlined, recursively (also inside control-flow bodies).

    Every variable is fresh: a jitted function called twice shares one cached jaxpr, and its two inlined copies
    must not share variables. Constants of inlined closed jaxprs become constvars of the result.

    Returns:
      (flat jaxpr, its consts).
    """
    constvars, new_consts = [], list(consts)
    env = {}
    for v in jaxpr.constvars:
        env[v] = jcore.Var(v.aval)
        constvars.append(env[v])
    invars = []
    for v in jaxpr.invars:
        env[v] = jcore.Var(v.aval)
        invars.append(env[v])
    eqns: list = []
    _inline(jaxpr, env, eqns, constvars, new_consts)
    flat = jcore.Jaxpr(
        constvars,
        invars,
        [_read(env, v) for v in jaxpr.outvars],
        eqns,
        effects=jaxpr.effects,
        debug_info=jaxpr.debug_info or DEBUG_INFO,
    )
    return flat, new_consts


def _read(env, atom):
    return atom if isinstance(atom, jcore.Literal) else env[atom]


def _inline(jaxpr, env, eqns, constvars, consts, call_site=None) -> None:
    """Append `jaxpr`'s equations, calls inlined, to `eqns`.

    `call_site` is the traceback of the innermost enclosing call that has a user frame. A jitted function's jaxpr is
    traced once and cached, so its equations' tracebacks stop at the function (`jnp.take`'s body knows nothing of
    the `nn.Embed` that called it); such equations take the call site's traceback instead.
    """
    for eqn in jaxpr.eqns:
        invals = [_read(env, a) for a in eqn.invars]
        if is_call(eqn):
            tb = eqn.source_info.traceback
            inner_site = tb if _user_frame(tb) is not None else call_site
            body = eqn.params[CALL_PRIMITIVES[eqn.primitive.name]]
            sub, sub_consts = (body.jaxpr, body.consts) if isinstance(body, jcore.ClosedJaxpr) else (body, ())
            if len(sub.invars) != len(invals) or len(sub.outvars) != len(eqn.outvars):
                raise RuntimeError(
                    f"trace: cannot inline '{eqn.primitive.name}': its body takes {len(sub.invars)} arguments "
                    f"and returns {len(sub.outvars)}, the call passes {len(invals)} and expects {len(eqn.outvars)}"
                )
            sub_env = dict(zip(sub.invars, invals))
            for v, c in zip(sub.constvars, sub_consts):
                sub_env[v] = jcore.Var(v.aval)
                constvars.append(sub_env[v])
                consts.append(c)
            _inline(sub, sub_env, eqns, constvars, consts, inner_site)
            for out, sub_out in zip(eqn.outvars, sub.outvars):
                if not isinstance(out, jcore.DropVar):
                    env[out] = _read(sub_env, sub_out)
            continue
        outvars = []
        for out in eqn.outvars:
            if isinstance(out, jcore.DropVar):
                outvars.append(jcore.DropVar(out.aval))
            else:
                env[out] = jcore.Var(out.aval)
                outvars.append(env[out])
        source_info = eqn.source_info
        if call_site is not None and _user_frame(source_info.traceback) is None:
            source_info = source_info.replace(traceback=call_site)
        eqns.append(
            eqn.replace(invars=invals, outvars=outvars, params=_flatten_params(eqn.params), source_info=source_info)
        )


def _flatten_closed(closed: jcore.ClosedJaxpr) -> jcore.ClosedJaxpr:
    if not any(is_call(e) or any(True for _ in wafer.kernel.sub_jaxprs(e)) for e in closed.jaxpr.eqns):
        return closed
    jaxpr, consts = flatten_jaxpr(closed.jaxpr, closed.consts)
    return jcore.ClosedJaxpr(jaxpr, consts)


def _flatten_params(params: dict) -> dict:
    """Control-flow bodies (closed jaxprs, or tuples of them as `cond` branches) with their calls inlined."""
    return wafer.kernel.map_closed_jaxprs(params, _flatten_closed)


# Files of libraries and of this project: a user's source line is the innermost frame outside them.
_OWN_DIRS = tuple(
    os.path.dirname(os.path.abspath(f)) + os.sep for f in (wafer.kernel.__file__, os.path.dirname(__file__))
)
_LIBRARY_MARKERS = (f"{os.sep}site-packages{os.sep}", f"{os.sep}dist-packages{os.sep}")


def _user_frame(traceback):
    """The innermost frame of `traceback` outside JAX, installed libraries and this project (or None)."""
    try:
        from jax._src import source_info_util

        for frame in source_info_util.user_frames(traceback):
            name = frame.file_name
            if not name.startswith(_OWN_DIRS) and not any(m in name for m in _LIBRARY_MARKERS):
                return frame
    except Exception:  # source info is best-effort: never fail a trace on it
        pass
    return None


def user_source(eqn) -> str:
    """The user's "file:line" that produced `eqn`.

    `wafer.kernel.source_of` gives the innermost frame outside JAX, which for a Flax layer is a line inside Flax
    (`flax/linen/linear.py`); here frames of installed libraries and of this project are skipped too, so the line
    is the user's model code (`nn.Dense(10)(x)`). Falls back to `source_of`.
    """
    frame = _user_frame(eqn.source_info.traceback)
    if frame is not None:
        return f"{frame.file_name}:{frame.start_line}"
    return wafer.kernel.source_of(eqn)


def _trace_policy(fn, *args, policy, stored_params: bool, batch_axis=batching.AUTO):
    """`trace` under a 16-bit policy (see `trace`)."""
    module = isinstance(fn, nnx.Module)
    if module:
        fn, state = split_module(fn)
        args = (state, *args)
    if not args:
        raise TypeError("trace(fn, params, *inputs): params are missing")
    params, inputs = args[0], args[1:]
    example = params
    if stored_params:
        dtype = policy.stand_in_dtype

        def as_stored(x):
            if jnp.issubdtype(x.dtype if hasattr(x, "dtype") else jnp.result_type(x), jnp.floating):
                return jax.ShapeDtypeStruct(jnp.shape(x), dtype)
            return x

        example = jax.tree_util.tree_map(as_stored, params)
    traced = trace(precision.apply_policy(fn, policy, stand_in=True), example, *inputs, batch_axis=batch_axis)
    return dataclasses.replace(traced, fn=precision.apply_policy(fn, policy), params=params, module=module)
