"""Keras 3 on the wafer (compiler/frontend/keras_import.py, JAX backend): the imported function equals Keras'
forward and gradients; compiled on a mini wafer, both execution paths equal Keras; trained with compile_train,
every step's loss equals `model.train_on_batch` with the same optimizer; params go back with to_keras.

Tolerances as in test_torch.py: forward 1e-5, gradients 1e-4 (relative to scale), 20-step losses 1e-4.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

import compiler  # noqa: E402
import wafer  # noqa: E402

SPEC = wafer.WaferSpec.mini(16, 16)


def mlp():
    inp = keras.Input((12,))
    h = keras.layers.Dense(32, activation="gelu")(inp)
    h = keras.layers.Dense(32, activation="tanh")(h)
    return keras.Model(inp, keras.layers.Dense(5)(h)), (8, 12)


def cnn():
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same")(inp)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Conv2D(8, 3, padding="same")(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.AveragePooling2D(2)(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inp, keras.layers.Dense(10)(h)), (4, 8, 8, 3)


def encoder():
    """A transformer block: MultiHeadAttention and a GELU MLP, each residual with LayerNormalization."""
    inp = keras.Input((6, 16))
    a = keras.layers.MultiHeadAttention(num_heads=4, key_dim=4)(inp, inp)
    h = keras.layers.LayerNormalization()(inp + a)
    f = keras.layers.Dense(32, activation="gelu")(h)
    f = keras.layers.Dense(16)(f)
    h = keras.layers.LayerNormalization()(h + f)
    return keras.Model(inp, keras.layers.Dense(3)(h)), (2, 6, 16)


MODELS = {"mlp": mlp, "cnn": cnn, "encoder": encoder}


def build(name, seed=0):
    keras.utils.set_random_seed(seed)
    model, shape = MODELS[name]()
    for layer in model.layers:  # moving statistics away from (0, 1), so inference BatchNorm is really tested
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.random.default_rng(seed).normal(0, 0.5, layer.moving_mean.shape))
            layer.moving_variance.assign(np.random.default_rng(seed).uniform(0.5, 2.0, layer.moving_variance.shape))
    x = np.random.default_rng(seed + 1).normal(size=shape).astype(np.float32)
    return model, x


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("name", list(MODELS), ids=str)
def test_forward_and_gradients_equal_keras(name):
    model, x = build(name)
    fn, params = compiler.from_keras(model)
    assert rel(jax.jit(fn)(params, x), model(x, training=False)) < 1e-5
    proj = np.random.default_rng(7).normal(size=model(x).shape).astype(np.float32)
    g = jax.grad(lambda p: jnp.sum(fn(p, x) * proj))(params)

    # Keras' own gradient: its JAX backend differentiates stateless_call of the model's variables
    def keras_loss(tv):
        out, _ = model.stateless_call(tv, [v.value for v in model.non_trainable_variables], x, training=False)
        return jnp.sum(out * proj)

    ref = jax.grad(keras_loss)([v.value for v in model.trainable_variables])
    for name, r in zip(params["params"], ref):  # the importer's dict is in model order
        assert rel(g["params"][name], r) < 1e-4, name


@pytest.mark.parametrize("name", list(MODELS), ids=str)
def test_compiled_both_paths_equal_keras(name):
    model, x = build(name)
    ref = np.asarray(model(x, training=False))
    exe = compiler.compile(model, jnp.asarray(x), spec=SPEC)
    state = exe.load()
    for path in ("fast", "per_core"):
        out, state = exe(state, jnp.asarray(x), path=path)
        assert rel(out, ref) < 1e-5, path


def test_train_mode_updates_moving_statistics_and_dropout_takes_a_key():
    model, x = build("cnn")
    fn, params = compiler.from_keras(model, train=True)
    out, new = jax.jit(fn)(params, x)
    ref = model(x, training=True)  # updates the model's moving statistics: the reference for new["state"]
    assert rel(out, ref) < 1e-5
    for name, v in zip(params["state"], model.non_trainable_variables):  # in model order
        assert rel(new["state"][name], v.value) < 1e-6, name

    inp = keras.Input((100,))
    drop = keras.Model(inp, keras.layers.Dropout(0.25)(inp))
    fn, params = compiler.from_keras(drop, train=True)
    ones = jnp.ones((200, 100))
    with pytest.raises(ValueError, match="rng=jax.random.key"):
        fn(params, ones)
    out, _ = fn(params, ones, rng=jax.random.key(0))
    kept = np.asarray(out) != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(np.asarray(out)[kept], 1 / 0.75, rtol=1e-6)
    out2, _ = fn(params, ones, rng=jax.random.key(1))
    assert not np.array_equal(np.asarray(out), np.asarray(out2))


def test_round_trip_and_errors():
    model, x = build("cnn")
    _, params = compiler.from_keras(model)
    other, _ = build("cnn", seed=3)  # another instance: Keras numbers its layers anew, the names stay
    compiler.to_keras(other, params)
    np.testing.assert_array_equal(np.asarray(other(x)), np.asarray(model(x)))
    assert "conv2d/kernel#1" in params["params"] and "batch_normalization/moving_mean#1" in params["state"]
    with pytest.raises(KeyError, match="not a variable"):
        compiler.to_keras(model, {"params": {"nope/kernel": np.zeros(3)}, "state": {}})
    with pytest.raises(TypeError, match="Keras model"):
        compiler.from_keras(lambda x: x)
    with pytest.raises(ValueError, match="not built"):
        compiler.from_keras(keras.Sequential([keras.layers.Dense(3)]))


def test_predict_donation_does_not_touch_imported_params():
    """Keras' predict donates its variables' buffers; the importer's params are copies that stay valid."""
    model, x = build("mlp")
    fn, params = compiler.from_keras(model)
    before = np.asarray(fn(params, x))
    model.predict(x, verbose=0)
    np.testing.assert_array_equal(np.asarray(fn(params, x)), before)


def test_training_matches_keras_step_by_step():
    """CNN with BatchNorm, SGD with momentum: 20 steps on the wafer against `train_on_batch` with Keras' SGD."""
    model, x = build("cnn")
    reference, _ = build("cnn")
    reference.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(20, 8, 8, 8, 3)).astype(np.float32)
    ys = rng.integers(0, 10, size=(20, 8)).astype(np.int32)
    fn, params = compiler.from_keras(model, train=True)

    def loss(params, batch):
        logits, new = fn(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), new

    loss_fn, opt = compiler.stateful(loss, optax.sgd(0.05, momentum=0.9))
    tx = compiler.compile_train(loss_fn, params, {"x": xs[0], "y": ys[0]}, opt, spec=SPEC, mode="pipelined")
    state = tx.init(params)
    for i in range(20):
        state, metrics = tx.step(state, {"x": jnp.asarray(xs[i]), "y": jnp.asarray(ys[i])})
        ref_loss = float(reference.train_on_batch(xs[i], ys[i]))
        assert abs(float(metrics["loss"]) - ref_loss) <= 1e-4 * abs(ref_loss), i
    compiler.to_keras(model, tx.read_params(state))
    for a, b in zip(model.variables, reference.variables):
        # scale floored at 1e-2: a bias feeding a BatchNorm has a zero gradient in exact arithmetic, and both
        # trainings leave it at float noise (~1e-8), where a relative error means nothing
        scale = max(float(np.abs(np.asarray(b.value)).max()), 1e-2)
        assert float(np.abs(np.asarray(a.value) - np.asarray(b.value)).max()) <= 1e-4 * scale, a.path
