"""compiler.Estimator (compiler/host/estimator.py): TF / Cerebras Estimator programming model on the wafer with a
torch and a Keras model_fn: train with checkpoints, resume, evaluate, predict; and `wafer train` on a model_fn."""

from __future__ import annotations

import json
import os
import textwrap

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import compiler  # noqa: E402
import wafer  # noqa: E402

SPEC = wafer.WaferSpec.mini(16, 16)
DIGITS = load_digits()
X, Y = (DIGITS.data / 16).astype(np.float32), DIGITS.target.astype(np.int32)


def input_fn(params):
    return compiler.Batches.from_arrays(X[:1024], Y[:1024], batch_size=params["batch_size"], seed=0)


def eval_input_fn(params):
    return [(X[1024 + i : 1024 + i + 64], Y[1024 + i : 1024 + i + 64]) for i in range(0, 256, 64)]


def ce(outputs, labels):
    return optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean()


def accuracy(outputs, labels):
    return (outputs.argmax(-1) == labels).mean()


def torch_model_fn(features, labels, mode, params):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(features.shape[-1], 32),
        torch.nn.BatchNorm1d(32),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(32, 10),
    )
    return compiler.EstimatorSpec(
        mode=mode,
        model=model,
        loss=ce,
        optimizer=optax.adam(params["lr"]),
        eval_metrics={"accuracy": accuracy},
        predictions=lambda outputs: {"class": outputs.argmax(-1), "logits": outputs},
    )


def keras_model_fn(features, labels, mode, params):
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input(features.shape[1:])
    h = keras.layers.Dense(32, activation="relu")(inp)
    h = keras.layers.Dropout(0.1)(h)
    model = keras.Model(inp, keras.layers.Dense(10)(h))
    return compiler.EstimatorSpec(mode=mode, model=model, loss=ce, optimizer=optax.adam(params["lr"]))


PARAMS = {"lr": 1e-2, "batch_size": 32}


def test_torch_estimator_trains_resumes_evaluates_and_predicts(tmp_path):
    est = compiler.Estimator(torch_model_fn, params=PARAMS, model_dir=tmp_path, spec=SPEC, checkpoint_every=10)
    with pytest.raises(ValueError, match="no checkpoint"):
        est.evaluate(eval_input_fn)
    est.train(input_fn, steps=30)
    assert est.latest_checkpoint() == 30
    first = est.evaluate(eval_input_fn)
    assert first["global_step"] == 30 and first["on_wafer"]
    # a new Estimator on the same model_dir continues from step 30, as after a restart
    again = compiler.Estimator(torch_model_fn, params=PARAMS, model_dir=tmp_path, spec=SPEC, checkpoint_every=10)
    again.train(input_fn, max_steps=60)
    result = again.evaluate(eval_input_fn, steps=2)
    assert result["global_step"] == 60 and result["accuracy"] > 0.8, result
    assert result["loss"] < first["loss"]
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 61))
    preds = list(again.predict(lambda: [X[1024:1040]]))
    assert len(preds) == 16 and preds[0]["logits"].shape == (10,)
    # the same numbers as the trained params run natively in eval mode
    params = again.trained_params()
    fn, _ = compiler.from_torch(torch_model_fn(X[:2], None, "infer", PARAMS).model.eval())
    logits = np.asarray(fn(params, X[1024:1040]))
    np.testing.assert_allclose(np.stack([p["logits"] for p in preds]), logits, rtol=1e-5, atol=1e-5)


def test_keras_estimator_trains_and_evaluates(tmp_path):
    est = compiler.Estimator(keras_model_fn, params=PARAMS, model_dir=tmp_path, spec=SPEC)
    est.train(input_fn, steps=40)
    result = est.evaluate(eval_input_fn)
    assert result["global_step"] == 40 and result["loss"] < 1.0, result


def test_bad_calls_are_named_errors(tmp_path):
    est = compiler.Estimator(torch_model_fn, params=PARAMS, model_dir=tmp_path, spec=SPEC)
    with pytest.raises(ValueError, match="steps=N"):
        est.train(input_fn)
    bad = compiler.Estimator(lambda features, labels, mode: 3, model_dir=tmp_path, spec=SPEC)
    with pytest.raises(TypeError, match="EstimatorSpec"):
        bad.train(input_fn=lambda: [(X[:8], Y[:8])], steps=1)


def test_wafer_train_runs_a_model_fn(tmp_path, capsys):
    from compiler import cli

    src = tmp_path / "est_model.py"
    src.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {os.path.dirname(__file__)!r})
            from test_estimator import torch_model_fn as model_fn, input_fn, eval_input_fn
            """
        )
    )
    params = tmp_path / "params.yaml"
    params.write_text("model:\n  lr: 0.01\n  batch_size: 32\n")
    args = ["train", f"{src}:model_fn", "--preset", "mini", "--rows", "16", "--cols", "16", "--params", str(params)]
    args += ["--model-dir", str(tmp_path / "run"), "--mode", "train_and_eval", "--max-steps", "20", "--quiet"]
    assert cli.main(args) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["global_step"] == 20 and json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
