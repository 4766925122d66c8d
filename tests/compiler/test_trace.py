"""compiler.trace: flat jaxprs that compute exactly what the user's function computes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jcore
from model_zoo import MODELS, NNXNet, mlp

from compiler.frontend.trace import CALL_PRIMITIVES, Traced, trace, user_source

# Flat evaluation runs the same primitives as native JAX; only XLA's fusion decisions may differ.
RTOL = ATOL = 1e-6


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            subs = v if isinstance(v, tuple) else (v,)
            for sub in subs:
                if isinstance(sub, jcore.ClosedJaxpr):
                    yield from _all_eqns(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    yield from _all_eqns(sub)


def _assert_close(actual, expected):
    a, b = jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_flat_jaxpr_equals_native(model, name):
    case, traced, _ = model(name)
    jcore.check_jaxpr(traced.jaxpr)
    assert not [e.primitive.name for e in _all_eqns(traced.jaxpr) if e.primitive.name in CALL_PRIMITIVES]
    expected = jax.jit(case.run)()
    leaves = jax.tree_util.tree_leaves(traced.params), jax.tree_util.tree_leaves(case.inputs)
    flat = jax.jit(traced.eval_flat)(*leaves)
    _assert_close(jax.tree_util.tree_unflatten(traced.out_treedef, flat), expected)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_invars_are_params_then_inputs(model, name):
    case, traced, _ = model(name)
    params = traced.params
    assert traced.n_params == len(jax.tree_util.tree_leaves(params))
    assert len(traced.jaxpr.invars) == traced.n_params + len(jax.tree_util.tree_leaves(case.inputs))
    assert len(traced.param_paths) == traced.n_params == len(set(traced.param_paths))
    for aval, leaf in zip(traced.param_avals + traced.input_avals, jax.tree_util.tree_leaves((params, case.inputs))):
        assert aval.shape == jnp.shape(leaf) and aval.dtype == leaf.dtype
    out = jax.eval_shape(case.run)
    assert traced.out_treedef == jax.tree_util.tree_structure(out)
    assert [(a.shape, a.dtype) for a in traced.out_avals] == [
        (o.shape, o.dtype) for o in jax.tree_util.tree_leaves(out)
    ]


def test_linen_param_paths(model):
    _, traced, _ = model("mlp")
    assert traced.param_paths == tuple(f"params/Dense_{i}/{w}" for i in range(3) for w in ("bias", "kernel"))
    _, traced, _ = model("resnet_block")
    assert "batch_stats/BatchNorm_0/var" in traced.param_paths


def test_nnx_module_is_accepted_directly():
    module = NNXNet(10, 13, 8, rngs=nnx.Rngs(0))
    x = jnp.linspace(-1.0, 1.0, 30).reshape(3, 10)
    traced = trace(module, x)
    assert traced.module and traced.inputs == (x,)
    assert "fc1/kernel" in traced.param_paths and "norm/scale" in traced.param_paths
    _assert_close(traced.apply(traced.params, x), module(x))
    _assert_close(traced.eval(traced.params, x), module(x))


def test_abstract_inputs_trace_without_values():
    case = mlp()
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (case.params, case.inputs))
    traced = trace(case.fn, abstract[0], *abstract[1])
    assert [v.aval.shape for v in traced.input_vars] == [(4, 12)]
    _assert_close(traced.eval(case.params, *case.inputs), case.run())


def test_calls_are_inlined_with_fresh_variables():
    @jax.custom_vjp
    def clipped_sin(x):
        return jnp.sin(x)

    clipped_sin.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (jnp.clip(g * jnp.cos(x), -1, 1),))

    @jax.custom_jvp
    def twice_tanh(x):
        return 2 * jnp.tanh(x)

    twice_tanh.defjvp(lambda p, t: (twice_tanh(p[0]), 2 * t[0]))
    step = jax.jit(lambda x, w: jnp.tanh(x @ w))  # called twice: one cached jaxpr, inlined twice

    def fn(params, x):
        h = step(step(x, params["w"]), params["w"])
        h = jax.checkpoint(lambda z: clipped_sin(z) + twice_tanh(z))(h)
        return jax.nn.gelu(h) + jax.nn.softplus(h), jax.lax.fori_loop(0, 3, lambda i, c: step(c, params["w"]), h)

    params = {"w": jnp.eye(5) * 0.5 + 0.1}
    x = jnp.linspace(-2.0, 2.0, 15).reshape(3, 5)
    traced = trace(fn, params, x)
    jcore.check_jaxpr(traced.jaxpr)  # a variable defined twice would fail here
    names = [e.primitive.name for e in _all_eqns(traced.jaxpr)]
    assert not set(names) & set(CALL_PRIMITIVES)
    assert names.count("dot_general") == 3  # two inlined calls, and one inside the scan body
    assert "scan" in names
    _assert_close(traced.eval(params, x), fn(params, x))


def test_closed_over_constants_become_consts():
    table = np.arange(12.0, dtype=np.float32).reshape(3, 4)

    def fn(params, x):
        return x @ jnp.asarray(table) + params

    traced = trace(fn, jnp.ones(4), jnp.ones((2, 3)))
    assert len(traced.consts) == len(traced.jaxpr.constvars) == 1
    np.testing.assert_array_equal(np.asarray(traced.consts[0]), table)
    _assert_close(traced.eval(jnp.ones(4), jnp.ones((2, 3))), fn(jnp.ones(4), jnp.ones((2, 3))))


def test_pytree_inputs_and_outputs():
    def fn(params, batch, scale):
        return {"y": batch["x"] @ params + scale, "n": jnp.sum(batch["x"])}

    params, batch, scale = jnp.ones((3, 2)), {"x": jnp.ones((4, 3))}, jnp.float32(2.0)
    traced = trace(fn, params, batch, scale)
    assert traced.n_params == 1 and len(traced.input_avals) == 2
    out = traced.eval(params, batch, scale)
    assert set(out) == {"y", "n"}
    _assert_close(out, fn(params, batch, scale))


def test_mismatched_structure_is_a_value_error():
    case = mlp()
    traced = trace(*case.trace_args())
    bad = {"params": {k: v for k, v in case.params["params"].items() if k != "Dense_2"}}
    with pytest.raises(ValueError, match="params do not match the traced structure"):
        traced.eval(bad, *case.inputs)
    with pytest.raises(ValueError, match="inputs do not match"):
        traced.eval(case.params, case.inputs[0], case.inputs[0])
    with pytest.raises(TypeError, match="params are missing"):
        trace(case.fn)


def test_traced_is_a_frozen_dataclass():
    traced = trace(lambda p, x: p * x, jnp.float32(2.0), jnp.ones(3))
    assert isinstance(traced, Traced)
    with pytest.raises(AttributeError):
        traced.n_params = 3  # type: ignore[misc]


def test_flax_layer_source_points_at_user_code():
    """Equations from Flax layers carry the user's line, not a line inside Flax or JAX."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x)  # the line the kernel should report

    x = jnp.ones((2, 4))
    variables = jax.eval_shape(Net().init, jax.random.key(0), x)
    traced = trace(Net().apply, variables, x)

    (dot,) = [e for e in traced.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert user_source(dot).endswith(f"test_trace.py:{_line_of('the line the kernel should report')}")


def _line_of(marker: str) -> int:
    with open(__file__) as f:
        for i, line in enumerate(f, 1):
            if marker in line and "_line_of" not in line:
                return i
    raise AssertionError(marker)
