"""TF-backend Keras models through `compiler.from_tf`, compiled on a mini wafer (run by test_tf.py in a child process
with KERAS_BACKEND=tensorflow). Prints one JSON line: {model: {"forward"|"fast"|"per_core": relative error}}."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import keras
import numpy as np

import compiler
import wafer

assert keras.backend.backend() == "tensorflow", "run with KERAS_BACKEND=tensorflow"
SPEC = wafer.WaferSpec.mini(16, 16)


def mlp():
    inp = keras.Input((12,))
    h = keras.layers.Dense(32, activation="gelu")(inp)
    return keras.Model(inp, keras.layers.Dense(5)(h)), (8, 12)


def cnn():
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same")(inp)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.AveragePooling2D(2)(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inp, keras.layers.Dense(10)(h)), (4, 8, 8, 3)


def encoder():
    inp = keras.Input((6, 16))
    a = keras.layers.MultiHeadAttention(num_heads=4, key_dim=4)(inp, inp)
    h = keras.layers.LayerNormalization()(inp + a)
    f = keras.layers.Dense(16)(keras.layers.Dense(32, activation="gelu")(h))
    h = keras.layers.LayerNormalization()(h + f)
    return keras.Model(inp, keras.layers.Dense(3)(h)), (2, 6, 16)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def main():
    keras.utils.set_random_seed(0)
    errors = {}
    for name, make in {"mlp": mlp, "cnn": cnn, "encoder": encoder}.items():
        model, shape = make()
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.moving_mean.assign(np.random.default_rng(0).normal(0, 0.5, layer.moving_mean.shape))
                layer.moving_variance.assign(np.random.default_rng(1).uniform(0.5, 2, layer.moving_variance.shape))
        x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
        ref = np.asarray(model(x, training=False))
        fn, params = compiler.from_tf(model, x)
        e = {"forward": rel(fn(params, jnp.asarray(x)), ref)}
        exe = compiler.compile(fn, params, jnp.asarray(x), spec=SPEC)
        state = exe.load(params)
        for path in ("fast", "per_core"):
            out, state = exe(state, jnp.asarray(x), path=path)
            e[path] = rel(out, ref)
        errors[name] = e
    print(json.dumps(errors))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
