"""The Estimator: the programming model of TF's `tf.estimator` and of Cerebras' `CerebrasEstimator`, on the wafer.

    def model_fn(features, labels, mode, params):          # features, labels: the first batch (shapes)
        model = torch.nn.Sequential(...)                     # or a Keras model, an nnx.Module, or (fn, params)
        return compiler.EstimatorSpec(
            mode=mode, model=model,
            loss=lambda outputs, labels: optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean(),
            optimizer=optax.adam(params["lr"]),
            eval_metrics={"accuracy": lambda outputs, labels: (outputs.argmax(-1) == labels).mean()},
        )

    def input_fn(params):                                    # an iterable of (features, labels) batches
        return compiler.Batches.from_arrays(x, y, batch_size=params["batch_size"])

    est = compiler.Estimator(model_fn, params={"lr": 1e-3, "batch_size": 32}, model_dir="runs/m", spec=spec)
    est.train(input_fn, steps=100)          # or max_steps=; resumes from model_dir's latest checkpoint
    est.evaluate(input_fn, steps=10)        # {"loss", "accuracy", "global_step"}
    for p in est.predict(input_fn): ...     # one prediction per example

What is as in TF: `model_fn(features, labels, mode, params)` (any subset of those names, plus `config`, by name),
called once per mode with `ModeKeys.TRAIN`, `EVAL` or `PREDICT`; `input_fn(params)` (or `input_fn()`) called anew
by every train/evaluate/predict call; `train(input_fn, steps=N)` trains N more steps, `max_steps=N` up to step N;
checkpoints and resume in `model_dir`; `evaluate` reads the latest checkpoint and averages the loss and metrics
over the batches; `predict` yields per-example predictions. What differs, because the wafer runs JAX functions: the
spec holds functions, not tensors (`loss(outputs, labels)`, metrics likewise, `predictions(outputs)`), the model is
the framework's object and the optimizer an optax transformation (TF's `train_op`); `features`/`labels` given to
model_fn are the first batch's arrays, for shapes. A batch is a `(features, labels)` tuple or a dict with "x" and
"y" (what `compiler.Batches.from_arrays` gives).

How: TRAIN imports the model in train mode (compiler/frontend), wraps a torch or Keras model with
`compiler.stateful` so BatchNorm statistics are written back on the wafer, compiles the step with
`compile_train` and runs `compiler.fit` with orbax checkpoints in `model_dir/checkpoints`. Each batch carries a
raw PRNG key `[seed, step]` that drives dropout. EVAL and PREDICT restore the latest checkpoint (through the
training program's state, the template orbax restores into), import the model in inference mode and run it
compiled on the wafer (natively, with a note, if that forward program does not fit); one compile per batch shape.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compiler.frontend import frameworks
from compiler.host.fit import fit, latest_checkpoint, restore_checkpoint


class ModeKeys:
    """The modes model_fn is called with (TF's `tf.estimator.ModeKeys` values)."""

    TRAIN = "train"
    EVAL = "eval"
    PREDICT = "infer"


@dataclasses.dataclass(frozen=True)
class EstimatorSpec:
    """What `model_fn` returns.

    Attributes:
      mode: the mode model_fn was called with.
      model: a `torch.nn.Module`, a Keras 3 model (JAX backend), an `nnx.Module`, or `(fn, params)` with
        `fn(params, features) -> outputs`.
      loss: `loss(outputs, labels) -> scalar` in JAX (TRAIN and EVAL). A loss written in torch works through
        `compiler.from_torch` too: `lambda o, y: torch_loss_fn(torch_loss_params, o, y)`.
      optimizer: an optax transformation (TRAIN; TF's `train_op`).
      eval_metrics: `{name: metric(outputs, labels) -> scalar}`, averaged over the evaluation batches.
      predictions: `predictions(outputs) -> pytree` with the examples on axis 0 (PREDICT); default the outputs.
    """

    mode: str
    model: Any
    loss: Callable | None = None
    optimizer: optax.GradientTransformation | None = None
    eval_metrics: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    predictions: Callable | None = None


def _import(model, *, train: bool):
    """(fn, params, takes_rng): the model as `fn(params, features[, rng=])`; with train and a framework model,
    `fn` returns (outputs, new_params)."""
    if frameworks.is_torch_module(model):
        from compiler.frontend.torch_import import from_torch

        fn, params = from_torch(model, train=train)
        return fn, params, True
    if frameworks.is_keras_model(model):
        from compiler.frontend.keras_import import from_keras

        fn, params = from_keras(model, train=train)
        return fn, params, True
    from flax import nnx

    if isinstance(model, nnx.Module):
        from compiler.frontend.trace import split_module

        fn, params = split_module(model)
        return fn, params, False
    if isinstance(model, tuple) and len(model) == 2 and callable(model[0]):
        return model[0], model[1], False
    raise TypeError(
        f"EstimatorSpec.model must be a torch.nn.Module, a Keras model, an nnx.Module or (fn, params); got "
        f"{type(model).__name__}"
    )


def _split(item):
    """(features, labels) of one batch: a 2-tuple, or a dict with "x" (and "y")."""
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    if isinstance(item, Mapping) and "x" in item:
        return item["x"], item.get("y")
    return item, None


def _accepts(fn, names) -> dict:
    """The subset of {name: value} that `fn` takes by name."""
    sig = inspect.signature(fn)
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return dict(names)
    return {k: v for k, v in names.items() if k in sig.parameters}


def _arrays(tree):
    return jax.tree_util.tree_map(jnp.asarray, tree)


class _Stream:
    """An input_fn as the training loop's batches, started at global step `start`.

    TF's Estimator runs input_fn anew on every train call. `compiler.fit` replays a plain iterable from its start
    and skips the steps already taken (so that a resumed run sees the batches it would have seen); this iterable
    therefore gives `start` placeholders for fit to skip, then input_fn's batches from its beginning, each with the
    PRNG key of its global step.
    """

    def __init__(self, make: Callable[[], Any], seed: int, start: int):
        self.make, self.seed, self.start = make, seed, start

    def __iter__(self) -> Iterator:
        yield from (None for _ in range(self.start))
        for step, item in enumerate(self.make(), self.start):
            features, labels = _split(item)
            yield {"features": features, "labels": labels, "rng": np.array([self.seed, step], np.uint32)}


class Estimator:
    """Train, evaluate and predict with a `model_fn` on the emulated wafer. See the module docstring.

    Args:
      model_fn: `model_fn(features, labels, mode, params) -> EstimatorSpec` (it may take any of those names, and
        `config`).
      params: a dict handed to model_fn and input_fn (hyperparameters), as in TF and Cerebras.
      model_dir: checkpoints (`checkpoints/<step>`), `report.txt`, `history.json` and `eval.json`; a new
        temporary directory if None.
      spec: the wafer (`wafer.WaferSpec`); default a 32 x 32 mini wafer with WSE-2 figures.
      seed: drives the per-step dropout keys.
      checkpoint_every, keep: as for `compiler.fit`.
      progress: show fit's progress bar.
      mode: `compile_train`'s execution mode ("auto", "pipelined", "weight_streaming").
    """

    def __init__(
        self,
        model_fn: Callable,
        params: Mapping | None = None,
        model_dir=None,
        spec=None,
        *,
        config: Any = None,
        seed: int = 0,
        checkpoint_every: int | None = 100,
        keep: int | None = 3,
        progress: bool = False,
        mode: str = "auto",
    ):
        import wafer

        if not callable(model_fn):
            raise TypeError(f"Estimator: model_fn must be callable, got {type(model_fn).__name__}")
        self.model_fn, self.params, self.config = model_fn, dict(params or {}), config
        self.model_dir = os.fspath(model_dir) if model_dir is not None else tempfile.mkdtemp(prefix="wafer_est_")
        self.spec = spec if spec is not None else wafer.WaferSpec.mini(32, 32)
        self.seed, self.checkpoint_every, self.keep, self.progress, self.mode = (
            seed,
            checkpoint_every,
            keep,
            progress,
            mode,
        )
        self._trainer = None  # (tx, initial params), compiled on first need
        self._forward: dict = {}  # batch signature -> (executable or None, fn, note)

    # ---- public --------------------------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.model_dir, "checkpoints")

    def latest_checkpoint(self) -> int | None:
        """The global step of the latest checkpoint in model_dir (None: none yet)."""
        return latest_checkpoint(self.checkpoint_dir)

    def train(self, input_fn: Callable, steps: int | None = None, max_steps: int | None = None) -> Estimator:
        """Train `steps` more steps, or up to global step `max_steps`, resuming from model_dir. Returns self.

        Raises:
          ValueError: neither or both of steps and max_steps; the input ran out first; the loss became NaN or inf
          (`compiler.NonFiniteLossError`).
        """
        if (steps is None) == (max_steps is None):
            raise ValueError("Estimator.train: give steps=N (N more steps) or max_steps=N (up to global step N)")
        done = self.latest_checkpoint() or 0
        total = done + int(steps) if steps is not None else int(max_steps)
        if total <= done:
            return self
        make = self._input(input_fn)
        tx, params0 = self._compile_train(make)
        os.makedirs(self.model_dir, exist_ok=True)
        with open(os.path.join(self.model_dir, "report.txt"), "w") as f:
            f.write(str(tx.report) + "\n")
        _, history = fit(
            tx,
            tx.init(params0),
            _Stream(make, self.seed, done),
            steps=total,
            checkpoint_dir=self.checkpoint_dir,
            checkpoint_every=self.checkpoint_every,
            keep=self.keep,
            progress=self.progress,
        )
        with open(os.path.join(self.model_dir, "history.json"), "w") as f:
            json.dump(history, f)
        return self

    def trained_params(self, input_fn: Callable | None = None):
        """The params of the latest checkpoint (as the model's importer lays them out).

        `input_fn` gives the first batch model_fn is built with; needed only if this Estimator has not trained or
        evaluated yet in this process.
        """
        step = self._require_checkpoint("trained_params")
        if self._trainer is None:
            if input_fn is None:
                raise ValueError("trained_params: pass input_fn (model_fn is built on its first batch)")
            self._compile_train(self._input(input_fn))
        tx, params0 = self._trainer
        state, _ = restore_checkpoint(self.checkpoint_dir, tx.init(params0), step=step)
        return tx.read_params(state)

    def evaluate(self, input_fn: Callable, steps: int | None = None) -> dict:
        """Loss and metrics of the latest checkpoint, averaged over `steps` batches (all of input_fn's if None).

        Returns {"loss", <metric>..., "global_step", "on_wafer"} and writes it to model_dir/eval.json.
        Raises:
          ValueError: model_dir holds no checkpoint (train first); the spec has no loss.
        """
        step = self._require_checkpoint("evaluate")
        make = self._input(input_fn)
        params = self.trained_params(input_fn)
        sums: dict[str, float] = {}
        n, on_wafer = 0, True
        for item in make():
            if steps is not None and n >= steps:
                break
            features, labels = _split(item)
            spec, outputs, wafer_ran = self._run_forward(ModeKeys.EVAL, params, features, labels)
            on_wafer = on_wafer and wafer_ran
            if spec.loss is None:
                raise ValueError("Estimator.evaluate: model_fn's EstimatorSpec has no loss for mode EVAL")
            figures = {"loss": spec.loss(outputs, labels)}
            figures.update({k: m(outputs, labels) for k, m in spec.eval_metrics.items()})
            for k, v in figures.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        if n == 0:
            raise ValueError("Estimator.evaluate: input_fn gave no batches")
        result = {k: v / n for k, v in sums.items()}
        result.update(global_step=int(step), on_wafer=bool(on_wafer))
        with open(os.path.join(self.model_dir, "eval.json"), "w") as f:
            json.dump(result, f)
        return result

    def predict(self, input_fn: Callable) -> Iterator:
        """Predictions of the latest checkpoint, one per example (a pytree of arrays without the batch axis)."""
        self._require_checkpoint("predict")
        make = self._input(input_fn)
        params = self.trained_params(input_fn)
        for item in make():
            features, labels = _split(item)
            spec, outputs, _ = self._run_forward(ModeKeys.PREDICT, params, features, labels)
            preds = spec.predictions(outputs) if spec.predictions is not None else outputs
            leaves, treedef = jax.tree_util.tree_flatten(preds)
            leaves = [np.asarray(x) for x in leaves]
            for i in range(leaves[0].shape[0] if leaves else 0):
                yield jax.tree_util.tree_unflatten(treedef, [x[i] for x in leaves])

    # ---- internals -----------------------------------------------------------------------------------------

    def _input(self, input_fn) -> Callable[[], Any]:
        if not callable(input_fn):
            raise TypeError(f"input_fn must be callable, got {type(input_fn).__name__}")
        takes = len(inspect.signature(input_fn).parameters) > 0
        return (lambda: input_fn(self.params)) if takes else input_fn

    def _spec(self, mode, features, labels) -> EstimatorSpec:
        kwargs = {"features": features, "labels": labels, "mode": mode, "params": self.params, "config": self.config}
        spec = self.model_fn(**_accepts(self.model_fn, kwargs))
        if not isinstance(spec, EstimatorSpec):
            raise TypeError(f"model_fn must return a compiler.EstimatorSpec, got {type(spec).__name__}")
        return spec

    def _require_checkpoint(self, what) -> int:
        step = self.latest_checkpoint()
        if step is None:
            raise ValueError(f"Estimator.{what}: {self.model_dir} holds no checkpoint; train first")
        return step

    def _compile_train(self, make):
        if self._trainer is not None:
            return self._trainer
        import compiler

        first = next(iter(make()), None)
        if first is None:
            raise ValueError("Estimator: input_fn gave no batches")
        features, labels = _split(first)
        spec = self._spec(ModeKeys.TRAIN, features, labels)
        if spec.loss is None or spec.optimizer is None:
            raise ValueError("Estimator.train: model_fn's EstimatorSpec needs loss and optimizer in mode TRAIN")
        fn, params, framework = _import(spec.model, train=True)
        user_loss = spec.loss

        if framework:  # train mode: fn returns (outputs, new_params); dropout keyed by the batch

            def loss(p, batch):
                outputs, new = fn(p, batch["features"], rng=batch["rng"])
                return user_loss(outputs, batch["labels"]), new

            loss_fn, optimizer = compiler.stateful(loss, spec.optimizer)
        else:
            loss_fn = lambda p, batch: user_loss(fn(p, batch["features"]), batch["labels"])  # noqa: E731
            optimizer = spec.optimizer
        batch0 = {"features": features, "labels": labels, "rng": np.array([self.seed, 0], np.uint32)}
        tx = compiler.compile_train(loss_fn, params, batch0, optimizer, spec=self.spec, mode=self.mode)
        self._trainer = (tx, params)
        return self._trainer

    def _run_forward(self, mode, params, features, labels):
        """(spec, outputs, ran on the wafer) of the inference model on one batch."""
        import compiler
        import wafer

        sig = (mode, str(jax.tree_util.tree_map(lambda x: (np.shape(x), str(np.asarray(x).dtype)), features)))
        if sig not in self._forward:
            spec = self._spec(mode, features, labels)
            fn, fresh, _ = _import(spec.model, train=False)
            if jax.tree_util.tree_structure(fresh) != jax.tree_util.tree_structure(params):
                raise ValueError(
                    f"Estimator: model_fn's model for mode {mode!r} has params of another structure than the one "
                    "trained; build the same model in every mode"
                )
            try:
                exe = compiler.compile(fn, params, _arrays(features), spec=self.spec)
            except (wafer.SramCapacityError, compiler.PlacementError):
                exe = None  # does not fit as one forward program (trained by weight streaming): run natively
            self._forward[sig] = (spec, fn, exe)
        spec, fn, exe = self._forward[sig]
        if exe is None:
            return spec, fn(params, _arrays(features)), False
        state = exe.load(params)
        outputs, _ = exe(state, _arrays(features))
        return spec, outputs, True


# ---- the `wafer train` entry ---------------------------------------------------------------------------------------


def is_model_fn(obj) -> bool:
    """Whether `obj` looks like an Estimator model_fn: a callable taking `features` and `mode` by name."""
    try:
        names = set(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return False
    return {"features", "mode"} <= names


def cli_train(args, model_fn, settings: Mapping, spec) -> int:
    """`wafer train FILE:model_fn` (compiler/cli.py): an Estimator on the model_fn, with `input_fn` (and
    `eval_input_fn`, default input_fn) from the model_fn's module, the params file's `model:` section as params,
    --max-steps as max_steps, --mode train|eval|train_and_eval. Prints the evaluation as JSON."""
    import sys

    module = sys.modules.get(getattr(model_fn, "__module__", ""), None)
    input_fn = getattr(module, "input_fn", None)
    eval_input_fn = getattr(module, "eval_input_fn", None) or input_fn
    if input_fn is None:
        raise ValueError(
            f"{args.target} is a model_fn; its module must define input_fn(params) (and may define eval_input_fn)"
        )
    est = Estimator(
        model_fn,
        params=settings.get("model", {}),
        model_dir=args.model_dir,
        spec=spec,
        checkpoint_every=args.checkpoint_every or settings.get("train", {}).get("checkpoint_every", 100),
        keep=args.keep or settings.get("train", {}).get("keep", 3),
        progress=not args.quiet,
        mode=getattr(args, "execution", None) or settings.get("train", {}).get("execution", "auto"),
    )
    if args.mode in ("train", "train_and_eval"):
        if args.max_steps is None:
            raise ValueError(f"--mode {args.mode} needs --max-steps N (the step the run is to reach)")
        est.train(input_fn, max_steps=args.max_steps)
        print(f"trained to step {est.latest_checkpoint()}; checkpoints in {est.checkpoint_dir}")
    if args.mode in ("eval", "train_and_eval"):
        print(json.dumps(est.evaluate(eval_input_fn)))
    return 0
