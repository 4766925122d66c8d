"""Arithmetic that is exact on numbers and relaxed on JAX arrays: the one vocabulary of the compiler's rules.

The partition rule (compiler/plan/partition.py), the route geometry (compiler/plan/route.py) and the schedule
(compiler/schedule.py) are written once with these functions. Evaluated on Python numbers or NumPy arrays (a
compiled plan) they are plain NumPy in float64: the report's exact figures. Evaluated on JAX arrays or tracers (the
differentiable cost model, sweeps, gradient placement) they are the same formulas in JAX, with

  ceil, floor, round   straight-through: the exact value, an identity gradient (so a rectangle's height that
                       feeds ceil(rows / height) still gets a gradient). ceil and floor take a value within a few
                       ulps of an integer as that integer, so that a quotient that is whole in exact arithmetic
                       does not jump by one on a division's rounding (XLA divides by a reciprocal);
  smax(x, tau)         the maximum at tau = 0, its log-sum-exp relaxation tau * logsumexp(x / tau) at tau > 0
                       (an upper bound, within tau * log(n) of the maximum).

So at tau = 0 on a compiled plan's own integer layout the cost model returns the report's figures, up to the
float32 rounding of JAX arrays (float64 where JAX's x64 mode is on).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_jax(*xs) -> bool:
    """Whether any argument is a JAX array or tracer (then the JAX forms are used)."""
    return any(isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer) for x in xs)


def xp(*xs):
    """The array namespace for these arguments: jax.numpy if any is a JAX value, else NumPy."""
    return jnp if is_jax(*xs) else np


def _snap(x, ns):
    """x, with values within a few ulps of an integer set to it: a quotient of whole numbers that is whole in exact
    arithmetic comes out of floating-point division (XLA divides by a reciprocal) up to an ulp off, and ceil or floor
    of it must not jump by one."""
    eps = ns.finfo(x.dtype).eps if ns.issubdtype(ns.asarray(x).dtype, ns.floating) else 0.0
    r = ns.round(x)
    return ns.where(ns.abs(x - r) <= 8 * eps * ns.maximum(ns.abs(x), 1.0), r, x)


# custom_jvp rather than `x + stop_gradient(ceil(x) - x)`: the value is exactly ceil(x) (no rounding of the
# add-back) and a forward pass costs one op instead of three, which matters in batched sweeps.
@jax.custom_jvp
def _st_ceil(x):
    return jnp.ceil(_snap(x, jnp))


@_st_ceil.defjvp
def _st_ceil_jvp(primals, tangents):
    return _st_ceil(primals[0]), tangents[0]


@jax.custom_jvp
def _st_floor(x):
    return jnp.floor(_snap(x, jnp))


@_st_floor.defjvp
def _st_floor_jvp(primals, tangents):
    return _st_floor(primals[0]), tangents[0]


@jax.custom_jvp
def _st_round(x):
    return jnp.round(x)


@_st_round.defjvp
def _st_round_jvp(primals, tangents):
    return jnp.round(primals[0]), tangents[0]


def ceil(x):
    """ceil, of values within a few ulps of an integer that integer; on JAX values with a straight-through (identity)
    gradient."""
    if is_jax(x):
        return _st_ceil(x)
    return np.ceil(_snap(np.asarray(x, np.float64), np))


def floor(x):
    """floor, of values within a few ulps of an integer that integer; on JAX values with a straight-through
    gradient."""
    if is_jax(x):
        return _st_floor(x)
    return np.floor(_snap(np.asarray(x, np.float64), np))


def round(x):  # noqa: A001 - the rounding of this vocabulary, as ceil and floor
    """round half to even; on JAX values with a straight-through gradient."""
    return _st_round(x) if is_jax(x) else np.round(x)


def minimum(a, b):
    return xp(a, b).minimum(a, b)


def maximum(a, b):
    return xp(a, b).maximum(a, b)


def where(c, a, b):
    return xp(c, a, b).where(c, a, b)


def _fold(op, x):
    """op (elementwise, binary) over axis 0 of a JAX array: a balanced tree of elementwise ops on its rows, pairs in
    a fixed order. XLA's CPU reduce over a leading axis measured several times slower than the same elementwise ops,
    which fuse with their producers (compiler/analysis/tabulated.py reduces [kernels, points] arrays this way; a
    tree that concatenates odd rows back measured slower still); and the order is the same whether the array has
    trailing batch axes or is vmapped."""

    def tree(lo, hi):
        if hi - lo == 1:
            return x[lo]
        mid = (lo + hi) // 2
        return op(tree(lo, mid), tree(mid, hi))

    return tree(0, x.shape[0])


def fold_sum(x):
    """The sum over axis 0 (a tree of adds on JAX arrays, `_fold`)."""
    if is_jax(x) and x.shape[0] > 0:
        return _fold(jnp.add, x)
    return xp(x).sum(x, axis=0)


def smax(x, tau=0.0, axis=-1):
    """max over `axis`, or its log-sum-exp relaxation at temperature `tau` > 0 (along axis 0 of a JAX array at
    tau = 0, a tree of maxima: `_fold`)."""
    if not is_jax(tau) and float(tau) == 0.0:
        if axis == 0 and is_jax(x) and x.shape[0] > 0:
            return _fold(jnp.maximum, x)
        return xp(x).max(x, axis=axis)
    if is_jax(x, tau):
        return tau * jax.nn.logsumexp(x / tau, axis=axis)
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + tau * np.log(np.sum(np.exp((x - m) / tau), axis=axis))


def smax2(a, b, tau=0.0):
    """max(a, b) elementwise, or its relaxation at temperature `tau`."""
    if not is_jax(tau) and float(tau) == 0.0:
        return maximum(a, b)
    ns = xp(a, b, tau)
    return smax(ns.stack(ns.broadcast_arrays(a, b), -1), tau)


def smin2(a, b, tau=0.0):
    return -smax2(-a, -b, tau)
