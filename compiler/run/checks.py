"""What a program checks of what it is given: params at load, inputs at every call, the state it runs on.

The checks run in Python when a step is traced (shapes and dtypes are static), so a jitted step pays nothing for
them after its first call; a call with other shapes traces again and is checked again. Each failure is a named
`compiler.CompilerError` (compiler/errors.py) saying what was wrong and what would be right (docs/errors.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from compiler.errors import InputMismatchError, ParamsMismatchError, StateMismatchError


def _dtype(x) -> np.dtype:
    d = x.dtype if hasattr(x, "dtype") else np.result_type(x)
    if jax.dtypes.issubdtype(d, jax.dtypes.prng_key):
        return d
    return np.dtype(jax.dtypes.canonicalize_dtype(d))


def _kind(d) -> str:
    if jax.dtypes.issubdtype(d, jax.dtypes.prng_key):
        return "key"
    for kind in ("bool", "integer", "floating", "complexfloating"):
        if jnp.issubdtype(d, getattr(jnp, "bool_" if kind == "bool" else kind)):
            return kind
    return str(d)


def _paths(tree, prefix: str) -> list[str]:
    return [prefix + jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_params(traced, params) -> list:
    """The flat leaves of `params`, checked against the traced ones: the same tree, every leaf's shape, and its
    dtype's kind.

    Raises:
      ParamsMismatchError: naming the first leaf that differs, with the compiled shape and dtype.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if treedef != traced.param_treedef:
        raise ParamsMismatchError(
            f"params do not match the traced structure: expected {traced.param_treedef}, got {treedef}. "
            "Pass the same pytree (same keys, same nesting) that the program was traced with.",
            expected=traced.param_treedef,
            got=treedef,
        )
    for leaf, aval, path in zip(leaves, traced.param_avals, traced.param_paths):
        shape = tuple(np.shape(leaf))
        if shape != tuple(aval.shape):
            raise ParamsMismatchError(
                f"parameter {path} has shape {shape}, but the program was compiled for {tuple(aval.shape)}: load "
                "params of the compiled shapes, or compile again with these",
                path,
                tuple(aval.shape),
                shape,
            )
        got = _dtype(leaf)
        if _kind(got) != _kind(aval.dtype):
            raise ParamsMismatchError(
                f"parameter {path} has dtype {got}, but the program was compiled for {aval.dtype} ({_kind(got)} "
                f"values where {_kind(aval.dtype)} ones were compiled): load params of the compiled dtypes",
                path,
                str(aval.dtype),
                str(got),
            )
    return leaves


def check_inputs(traced, inputs: tuple, what: str = "inputs") -> None:
    """Inputs (a tuple, as `fn(params, *inputs)` takes them) against the compiled example: the same tree, every
    leaf's shape and dtype.

    Raises:
      InputMismatchError: naming the first leaf that differs.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tuple(inputs))
    if treedef != traced.input_treedef:
        raise InputMismatchError(
            f"{what} do not match the compiled example's structure: expected {traced.input_treedef}, got "
            f"{treedef}. Call the program with {what} of the example's tree, or compile again for these.",
            expected=traced.input_treedef,
            got=treedef,
        )
    for leaf, aval, path in zip(leaves, traced.input_avals, _paths(tuple(inputs), "inputs")):
        shape, dtype = tuple(np.shape(leaf)), _dtype(leaf)
        want = (tuple(aval.shape), np.dtype(aval.dtype) if not _kind(aval.dtype) == "key" else aval.dtype)
        if shape != want[0] or dtype != want[1]:
            raise InputMismatchError(
                f"{what}: {path} is {dtype}{list(shape)}, but the program was compiled for {want[1]}{list(want[0])} "
                "(its SRAM layout and cost are for the example's shapes): pass that shape and dtype (pad or split "
                "the batch to the compiled size), or compile again with an example of these",
                path,
                f"{want[1]}{list(want[0])}",
                f"{dtype}{list(shape)}",
            )


def check_state(state, expected, *, what: str) -> None:
    """A state against the one this program's `init` makes (`expected`, from `jax.eval_shape`): the same kind of
    state, the same grid, and every SRAM allocation the program reads present with its shape and dtype (other
    allocations may be there: several programs can share a wafer).

    Raises:
      StateMismatchError: naming what differs, and how to make a state of this program.
    """
    make = "exe.load(params)" if what == "inference" else "tx.init(params)"
    w, w_exp = _wafer(state), _wafer(expected)
    if type(state) is not type(expected) or w is None:
        raise StateMismatchError(
            f"this {what} program was given a {type(state).__name__}, not the {type(expected).__name__} its "
            f"steps take: make one with {make}"
        )
    if (w.rows, w.cols) != (w_exp.rows, w_exp.cols):
        raise StateMismatchError(
            f"the state is of a {w.rows}x{w.cols} wafer, but this program was compiled for {w_exp.rows}x{w_exp.cols} "
            f"(another spec): make a state with {make}"
        )
    for name, x in w_exp.sram.items():
        got = w.sram.get(name)
        if got is None:
            raise StateMismatchError(
                f"the state holds no SRAM allocation {name!r}, which this program reads: it was made by another "
                f"program; make one with {make}",
                name,
            )
        if tuple(got.shape) != tuple(x.shape) or got.dtype != x.dtype:
            raise StateMismatchError(
                f"SRAM allocation {name!r} of the state is {got.dtype}{list(got.shape)}, but this program's is "
                f"{x.dtype}{list(x.shape)}: the state was made by another program (or for another spec); make "
                f"one with {make}",
                name,
            )
    if what == "training":
        a, b = jax.tree_util.tree_structure(state.host), jax.tree_util.tree_structure(expected.host)
        shapes = [tuple(np.shape(x)) for x in jax.tree_util.tree_leaves(state.host)]
        want = [tuple(x.shape) for x in jax.tree_util.tree_leaves(expected.host)]
        if a != b or shapes != want:
            raise StateMismatchError(
                f"the state's host store (optimizer state off the wafer) is not this program's: {a} with shapes "
                f"{shapes}, expected {b} with {want}; make one with {make}"
            )


def _wafer(state):
    if hasattr(state, "sram") and hasattr(state, "memory"):
        return state
    inner = getattr(state, "wafer", None)
    return inner if hasattr(inner, "sram") else None
