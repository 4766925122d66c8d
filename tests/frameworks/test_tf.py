"""TensorFlow on the wafer (compiler/frontend/tf_import.py, through tf2jax): a `tf.function` with variables equals
TF's forward and gradients; TF-backend Keras models (MLP, CNN with BatchNorm and pooling, MultiHeadAttention block)
compiled on a mini wafer equal Keras-on-TF on both execution paths.

Keras picks its backend once per process and this test session runs Keras on JAX, so the TF-backend Keras models
run in a child process with KERAS_BACKEND=tensorflow (`tf_keras_case.py`), which prints its errors as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

import compiler  # noqa: E402
import wafer  # noqa: E402

SPEC = wafer.WaferSpec.mini(16, 16)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_tf_function_forward_gradients_and_wafer():
    rng = np.random.default_rng(0)
    w1 = tf.Variable(rng.normal(size=(12, 32)).astype(np.float32) * 0.3, name="w1")
    b1 = tf.Variable(np.zeros(32, np.float32), name="b1")
    w2 = tf.Variable(rng.normal(size=(32, 5)).astype(np.float32) * 0.3, name="w2")
    scale = tf.Variable(np.full(5, 2.0, np.float32), name="scale", trainable=False)

    @tf.function
    def mlp(x):
        return tf.matmul(tf.nn.gelu(tf.matmul(x, w1) + b1, approximate=False), w2) * scale

    x = rng.normal(size=(8, 12)).astype(np.float32)
    fn, params = compiler.from_tf(mlp, x)
    assert sorted(params["params"]) == ["b1", "w1", "w2"] and sorted(params["state"]) == ["scale"]
    assert rel(jax.jit(fn)(params, x), mlp(x).numpy()) < 1e-5
    proj = rng.normal(size=(8, 5)).astype(np.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(mlp(x) * proj)
    ref = dict(zip(["w1", "b1", "w2"], tape.gradient(loss, [w1, b1, w2])))
    g = jax.grad(lambda p: jnp.sum(fn(p, x) * proj))(params)
    for name, r in ref.items():
        assert rel(g["params"][name], r.numpy()) < 1e-4, name
    exe = compiler.compile(fn, params, jnp.asarray(x), spec=SPEC)
    state = exe.load(params)
    for path in ("fast", "per_core"):
        out, state = exe(state, jnp.asarray(x), path=path)
        assert rel(out, mlp(x).numpy()) < 1e-5, path


def test_missing_example_inputs_is_a_named_error():
    with pytest.raises(ValueError, match="example inputs"):
        compiler.from_tf(tf.function(lambda x: x))


def test_tf_backend_keras_models_compile_and_equal_keras():
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    root = Path(__file__).resolve().parents[2]
    script = Path(__file__).with_name("tf_keras_case.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(errors) == {"mlp", "cnn", "encoder"}
    for name, e in errors.items():
        for key, value in e.items():
            assert value < 1e-5, (name, key, value)
