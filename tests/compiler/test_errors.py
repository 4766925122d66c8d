"""The bad-input catalogue (docs/errors.md): every bad input a user can give raises a named error that says what
was wrong and what would be right. One test per row of the table (the rows tested elsewhere are named there)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compiler
import wafer

SPEC = wafer.WaferSpec.mini(8, 8)


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.Dense(6)(x)))


@pytest.fixture(scope="module")
def setup():
    model = _MLP()
    x = jax.random.normal(jax.random.key(1), (4, 5))
    params = model.init(jax.random.key(0), x)
    exe = compiler.compile(model.apply, params, x, spec=SPEC)

    def loss(p, b):
        return jnp.mean((model.apply(p, b["x"]) - b["y"]) ** 2)

    batch = {"x": x, "y": jnp.zeros((4, 3))}
    tx = compiler.compile_train(loss, params, batch, optax.sgd(0.1), spec=SPEC, mode="pipelined")
    return model, params, x, exe, tx, batch


# ---- call-time inputs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["fast", "per_core"])
@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda x: x[:3], r"inputs\[0\] is float32\[3, 5\], but the program was compiled for float32\[4, 5\]"),
        (lambda x: x.astype(jnp.int32), r"inputs\[0\] is int32\[4, 5\].*compiled for float32\[4, 5\]"),
        (lambda x: (x, x), r"do not match the compiled example's structure"),
    ],
    ids=["shape", "dtype", "tree"],
)
def test_call_inputs_unlike_the_example(setup, path, bad, match):
    _, params, x, exe, _, _ = setup
    state = exe.load(params)
    with pytest.raises(compiler.InputMismatchError, match=match):
        exe(state, *((bad(x),) if not isinstance(bad(x), tuple) else bad(x)), path=path)


def test_training_batch_unlike_the_example(setup):
    *_, tx, batch = setup
    with pytest.raises(compiler.InputMismatchError, match=r"the batch: inputs\[0\]\['x'\] is float32\[2, 5\]"):
        tx.step(tx.init(), {"x": batch["x"][:2], "y": batch["y"][:2]})
    with pytest.raises(compiler.InputMismatchError, match="structure"):
        tx.step(tx.init(), {"x": batch["x"]})


# ---- params ----------------------------------------------------------------------------------------------------------


def test_params_tree_shape_or_dtype_differ_at_load(setup):
    _, params, _, exe, tx, _ = setup
    wrong_shape = jax.tree.map(lambda a: a, params)
    wrong_shape["params"]["Dense_1"]["kernel"] = jnp.ones((5, 7))
    for load in (exe.load, tx.init):
        with pytest.raises(compiler.ParamsMismatchError, match=r"params/Dense_1/kernel has shape \(5, 7\).*\(5, 6\)"):
            load(wrong_shape)
        with pytest.raises(compiler.ParamsMismatchError, match="params do not match the traced structure"):
            load({"params": {"Dense_0": params["params"]["Dense_0"]}})
    wrong_dtype = jax.tree.map(lambda a: a.astype(jnp.int32), params)
    with pytest.raises(compiler.ParamsMismatchError, match="integer values where floating ones were compiled"):
        exe.load(wrong_dtype)
    # a float64 NumPy leaf is the same kind: cast to the compiled float32, as jnp.asarray does
    as_f64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    np.testing.assert_array_equal(
        np.asarray(exe.read_params(exe.load(as_f64))["params"]["Dense_0"]["kernel"]),
        np.asarray(params["params"]["Dense_0"]["kernel"]),
    )


# ---- states ----------------------------------------------------------------------------------------------------------


def test_state_from_another_program_spec_or_task(setup):
    model, params, x, exe, tx, batch = setup
    other = compiler.compile(model.apply, params, x, spec=wafer.WaferSpec.mini(8, 10))
    with pytest.raises(compiler.StateMismatchError, match=r"8x10 wafer, but this program was compiled for 8x8"):
        exe(other.load(params), x)
    fn = lambda p, x: x @ p  # noqa: E731
    small = compiler.compile(fn, jnp.ones((5, 2)), x, spec=SPEC)
    with pytest.raises(compiler.StateMismatchError, match="holds no SRAM allocation") as info:
        exe(small.load(jnp.ones((5, 2))), x)
    assert info.value.allocation is not None
    with pytest.raises(compiler.StateMismatchError, match="given a TrainState"):
        exe(tx.init(), x)
    with pytest.raises(compiler.StateMismatchError, match="given a WaferState"):
        tx.step(exe.load(params), batch)


# ---- placements and specs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda p: {k: v for k, v in list(p.items())[1:]}, "have no rectangle in the placement"),
        (lambda p: {**p, "dense_9": (0, 0, 1, 1)}, "unknown kernels"),
        (lambda p: {**p, "dense_0": (7, 7, 3, 3)}, "not inside the 8x8 grid"),
        (lambda p: {**p, "dense_0": (0, 0, 0, 2)}, "height and width >= 1"),
        (lambda p: {**p, "dense_0": "top-left"}, "must be a Rect or 4 ints"),
        (lambda p: {**p, "dense_1": tuple(p["dense_0"])}, "overlap"),
    ],
    ids=["missing", "unknown", "out_of_bounds", "empty", "not_a_rect", "overlapping"],
)
def test_bad_hand_placement(setup, edit, match):
    model, params, x, exe, _, _ = setup
    placement = {k: tuple(v) for k, v in exe.placement.items()}
    with pytest.raises(compiler.PlacementError, match=match):
        compiler.compile(model.apply, params, x, spec=SPEC, placement=edit(placement))


def test_hand_placement_too_small_for_sram():
    model = nn.Dense(256)
    x = jnp.ones((2, 256))
    params = model.init(jax.random.key(0), x)
    with pytest.raises((compiler.PlacementError, wafer.SramCapacityError), match="dense_0"):
        compiler.compile(model.apply, params, x, spec=wafer.WaferSpec.mini(4, 4), placement={"dense_0": (0, 0, 1, 1)})


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(sram_banks=0), r"WaferSpec\.sram_banks must be an int in \[1, 1024\], got 0"),
        (dict(clock_hz=-1.0), r"WaferSpec\.clock_hz must be a number"),
        (dict(sram_bytes_per_core=1001), "multiple of 4"),
        (dict(reserved_colors=30), "reserved_colors must be less than router_colors"),
        (dict(clock_hs=1e9), "no field 'clock_hs' \\(perhaps you meant clock_hz\\)"),
    ],
    ids=["banks", "clock", "sram", "colors", "unknown_field"],
)
def test_spec_fields_out_of_range(overrides, match):
    with pytest.raises(wafer.SpecError, match=match):
        wafer.WaferSpec.mini(4, 4, **overrides)
