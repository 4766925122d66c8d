"""Train a Flax model on an emulated wafer, check it against native Flax + optax, and predict the CS-2's throughput.

The main job of the project, end to end, as a CS-2 run goes: the compiler places the model's layers on the wafer
(`compiler.compile_train`); the host's input pipeline shuffles scikit-learn's digits (1,797 8 x 8 images, bundled
with scikit-learn, no download), cuts them into batches and prefetches them (`compiler.Batches`,
`compiler.prefetch`); the training loop (`compiler.fit`) streams them into the emulated wafer, shows its progress,
evaluates on the held-out images and, with --checkpoint-dir, keeps orbax checkpoints it resumes from.

Then the same model is trained natively with Flax + optax from the same initial params on the same batches, and
the two runs are compared with `compiler.compare_runs` (compiler/host/agreement.py; docs/fidelity.md): on CPU every
step is bit-identical to native; in general the first 20 steps' losses must agree within 1e-6 relative, the
learning curves (mean loss per window) within 5 % plus 1 % of the first loss, and the final test accuracy within
two points and test loss within the curve's bound, for any run length. The script exits non-zero otherwise.
Last come the compile reports: the one of the emulated wafer, and the same training step compiled for the full
WSE-2 (compiling is all a prediction needs).

    python experiments/train.py                          # MLP, Adam, 200 steps on a 32 x 32 mini wafer
    python experiments/train.py --model cnn --optimizer momentum
    python experiments/train.py --preset wse2 --steps 50 # train on the full 757 x 996 WSE-2 fabric
    python experiments/train.py --mode weight_streaming  # weights in the host store, streamed in layer by layer
    python experiments/train.py --checkpoint-dir /tmp/digits --steps 400   # run again to resume
    python experiments/train.py --wafers 2 --workers 2   # 2 wafers data-parallel, 2 input worker processes
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import compiler
import wafer

PRESETS = {"wse1": wafer.WSE1, "wse2": wafer.WSE2, "wse3": wafer.WSE3}
OPTIMIZERS = {"sgd": 0.1, "momentum": 0.05, "adam": 3e-3, "adamw": 3e-3}  # name -> default learning rate


class MLP(nn.Module):
    """Flatten, then dense layers with ReLU between them."""

    hidden: tuple[int, ...] = (128, 64)
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.classes)(x)


class CNN(nn.Module):
    """Two 3 x 3 convolutions, a 2 x 2 average pool and a dense classifier, for [batch, 8, 8, 1] images."""

    channels: tuple[int, ...] = (16, 32)
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        return nn.Dense(self.classes)(x.reshape(x.shape[0], -1))


MODELS = {"mlp": (MLP, "MLP (64-128-64-10)"), "cnn": (CNN, "CNN (conv 16, conv 32, avg-pool, dense 10)")}


def load_data(model: str, seed: int):
    """Digits scaled to [0, 1], split 80/20 (stratified): (x_train, y_train, x_test, y_test).

    Images are [n, 64] for the MLP and [n, 8, 8, 1] for the CNN; labels int32.
    """
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    if model == "cnn":
        x = x.reshape(-1, 8, 8, 1)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return x_train, y_train, x_test, y_test


def init_params(net: nn.Module, x, seed: int):
    """Params for `net` in Flax's default scale: kernels normal with variance 1 / fan_in (LeCun), biases zero.

    Drawn with NumPy from the shapes `net.init` gives under `jax.eval_shape`: running Flax's own initialisers
    compiles their PRNG, which takes seconds on CPU, longer than the training here.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        if getattr(path[-1], "key", None) != "kernel":
            return jnp.zeros(s.shape, s.dtype)
        fan_in = int(np.prod(s.shape[:-1]))
        return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, jax.eval_shape(net.init, jax.random.key(seed), x))


def make_optimizer(name: str, lr: float) -> optax.GradientTransformation:
    if name == "sgd":
        return optax.sgd(lr)
    if name == "momentum":
        return optax.sgd(lr, momentum=0.9)
    if name == "adam":
        return optax.adam(lr)
    if name == "adamw":
        return optax.adamw(lr, weight_decay=1e-4)
    raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")


def run_experiment(
    spec: wafer.WaferSpec,
    *,
    model: str = "mlp",
    optimizer: str = "adam",
    lr: float | None = None,
    batch: int = 32,
    steps: int = 200,
    mode: str = "auto",
    seed: int = 0,
    eval_every: int = 50,
    checkpoint_dir=None,
    checkpoint_every: int = 50,
    progress: bool = True,
    predict_on: wafer.WaferSpec | None = wafer.WSE2,
    wafers: int = 1,
    workers: int = 0,
) -> dict:
    """Train on the emulated wafer and natively; return the figures of the report.

    Args:
      spec: the emulated wafer. model: "mlp" or "cnn". optimizer: a key of OPTIMIZERS; lr: its learning rate
        (default: OPTIMIZERS[optimizer]). batch, steps: batch size and training steps. mode: as for
        `compiler.compile_train`. seed: seeds the params, the data split and the batch order.
      eval_every: steps between test-set evaluations. checkpoint_dir, checkpoint_every: as for `compiler.fit`.
      progress: show the progress bar. predict_on: also compile the training step for this wafer (None: skip).
      wafers: wafers training data-parallel, each on batch / wafers samples of every batch.
      workers: input worker processes of the grain pipeline (0: a thread).
    Returns:
      A dict; "tx" and "predicted" hold the compiled trainers (their `.report`s are printed).
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    lr = OPTIMIZERS.get(optimizer, 0.0) if lr is None else lr
    opt = make_optimizer(optimizer, lr)
    x_train, y_train, x_test, y_test = load_data(model, seed)
    batches = compiler.Batches.from_arrays(x_train, y_train, batch, seed=seed)
    pipeline = compiler.Pipeline(batches, workers=workers)
    net = MODELS[model][0]()
    params = init_params(net, batches.batch(0)["x"], seed)

    def loss_fn(params, batch):
        logits = net.apply(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    @jax.jit
    def test_metrics(params):
        logits = net.apply(params, x_test)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_test).mean()
        return {"loss": loss, "accuracy": jnp.mean(logits.argmax(-1) == y_test)}

    t0 = time.perf_counter()
    tx = compiler.compile_train(loss_fn, params, batches.batch(0), opt, spec=spec, mode=mode, wafers=wafers)
    t_compile = time.perf_counter() - t0

    # Emulated: the host loop streams the batches into the wafer; evaluation reads the params back from SRAM.
    times = []
    read_params = jax.jit(tx.read_params)  # one compiled untiling instead of an op-by-op one
    state, history = compiler.fit(
        tx,
        jax.jit(tx.init)(params),
        pipeline,
        steps=steps,
        eval_fn=jax.jit(lambda state: test_metrics(read_params(state))),
        eval_every=eval_every,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        progress=progress,
        on_step=lambda *_: times.append(time.perf_counter()),
    )
    emulated = read_params(state)

    # Native: the same params, batches and optimizer, with Flax + optax.
    @jax.jit
    def native_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    native, opt_state, native_losses, native_times = params, opt.init(params), [], []
    for b in batches.iterate(0, steps):
        native, opt_state, loss = native_step(native, opt_state, b)
        native_losses.append(float(loss))
        native_times.append(time.perf_counter())

    losses = np.array([row["loss"] for row in history], np.float32)
    want = np.array(native_losses, np.float32)
    loss_rel = float(np.max(np.abs(losses - want) / np.maximum(np.abs(want), 1e-30)))
    pairs = list(zip(jax.tree_util.tree_leaves(emulated), jax.tree_util.tree_leaves(native)))
    param_err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in pairs)
    param_scale = max(float(np.max(np.abs(np.asarray(b)))) for _, b in pairs)
    emulated_test = {k: float(v) for k, v in test_metrics(emulated).items()}
    native_test = {k: float(v) for k, v in test_metrics(native).items()}
    agreement = compiler.compare_runs(
        losses,
        want,
        {f"test {k}": v for k, v in emulated_test.items()},
        {f"test {k}": v for k, v in native_test.items()},
    )

    predicted = None
    if predict_on is not None and predict_on != spec:
        predicted = compiler.compile_train(
            loss_fn, params, batches.batch(0), opt, spec=predict_on, mode=mode, wafers=wafers
        )

    def per_step(ts):  # the median step: not the first, which compiles, nor those that evaluate or save
        return float(np.median(np.diff(ts))) if len(ts) > 1 else math.nan

    return {
        "model": MODELS[model][1],
        "params": int(sum(np.size(p) for p in jax.tree_util.tree_leaves(params))),
        "train_samples": len(x_train),
        "test_samples": len(x_test),
        "optimizer": optimizer,
        "lr": lr,
        "batch": batch,
        "steps": steps,
        "epochs": steps / batches.steps_per_epoch,
        "seed": seed,
        "tx": tx,
        "predicted": predicted,
        "history": history,
        "losses": losses,
        "native_losses": want,
        "loss_rel_diff": loss_rel,
        "param_abs_diff": param_err,
        "param_scale": param_scale,
        "params_identical": param_err == 0.0,
        "agreement": agreement,
        "ok": agreement.ok,
        "emulated_test": emulated_test,
        "native_test": native_test,
        "compile_s": t_compile,
        "emulated_s_per_step": per_step(times),  # nan when resumed with nothing left to run
        "native_s_per_step": per_step(native_times),
        "wafer_clock": float(np.max(state.wafer.clock)),  # every wafer's clock, the same
        "wafers": wafers,
        "input": pipeline.stats(tx.report.samples_per_s),
        "input_cs2": None if predicted is None else pipeline.stats(predicted.report.samples_per_s),
    }


def _ms(seconds: float) -> str:
    return "- (no step ran: resumed at the end)" if math.isnan(seconds) else f"{1e3 * seconds:.3g} ms/step"


def format_report(r: dict) -> str:
    """The report as readable lines (the compile reports included)."""
    tx, report = r["tx"], r["tx"].report
    spec = tx.spec
    kernels = len(report.kernels)
    several = "" if r["wafers"] == 1 else f"{r['wafers']} x "
    title = f"Predicted on the emulated wafer ({spec.name}):"
    if spec == wafer.WSE2:
        title = "Predicted on the CS-2 (the emulated wafer is the full WSE-2):"
    lines = [
        "",
        f"Trained {r['model']}, {r['params']:,} params, on scikit-learn digits ({r['train_samples']:,} training, "
        f"{r['test_samples']} test images)",
        f"  wafer         {several}{spec.name}: {spec.rows} x {spec.cols} cores, {report.mode}: {kernels} "
        f"kernels on {report.active_cores:,} cores (compiled in {r['compile_s']:.2f} s)",
        f"  optimizer     {r['optimizer']}, lr {r['lr']:g}, batch {r['batch']}, {r['steps']} steps "
        f"({r['epochs']:.1f} epochs), seed {r['seed']}",
        f"  wafer time    {r['wafer_clock']:,.0f} cycles on the wafer's clock = "
        f"{1e3 * r['wafer_clock'] / float(spec.clock_hz):.3g} ms predicted for the whole run",
        "",
        "Check against native Flax + optax training (same initial params, batches and optimizer):",
        f"  loss          {r['losses'][0]:.4f} at step 1 -> {r['losses'][-1]:.4f} at step {r['steps']}; "
        f"max relative difference over {len(r['losses'])} steps {r['loss_rel_diff']:.2g}",
        f"  params        max |emulated - native| = {r['param_abs_diff']:.2g} (largest |param| {r['param_scale']:.3g})",
        *(f"  check         {line}" for line in r["agreement"].lines()),
        f"  verdict       {'OK' if r['ok'] else 'FAILED'}",
        f"  test accuracy emulated {100 * r['emulated_test']['accuracy']:.2f}%, "
        f"native {100 * r['native_test']['accuracy']:.2f}% "
        f"(test loss {r['emulated_test']['loss']:.4f} and {r['native_test']['loss']:.4f})",
        f"  wall time     emulated {_ms(r['emulated_s_per_step'])}, native {_ms(r['native_s_per_step'])} (median step)",
        f"  input         {r['input'].summary()}",
        "",
        title,
        str(report),
    ]
    if r["predicted"] is not None:
        p = r["predicted"].report
        lines += [
            "",
            f"Predicted on the CS-2 ({r['predicted'].spec.name}, {r['predicted'].spec.rows} x "
            f"{r['predicted'].spec.cols} cores): the same training step, compiled only",
            str(p),
            "",
            f"{r['steps']} steps of batch {r['batch']}: {r['steps'] * r['batch'] / p.samples_per_s * 1e3:.3g} ms "
            f"on the CS-2 ({p.samples_per_s:,.0f} samples/s) against "
            f"{r['steps'] * r['batch'] / report.samples_per_s * 1e3:.3g} ms on {spec.name} "
            f"({report.samples_per_s:,.0f} samples/s)",
        ]
        if r["input_cs2"] is not None and r["input_cs2"].batches:
            lines.append(f"CS-2 {r['input_cs2'].summary()}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=("mini", *PRESETS), default="mini", help="emulated wafer (default: mini)")
    p.add_argument("--rows", type=int, default=32, help="core rows of the mini wafer (default 32)")
    p.add_argument("--cols", type=int, default=32, help="core columns of the mini wafer (default 32)")
    p.add_argument("--model", choices=sorted(MODELS), default="mlp", help="model (default mlp)")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam", help="optax optimizer (default adam)")
    p.add_argument("--lr", type=float, default=None, help=f"learning rate (default per optimizer: {OPTIMIZERS})")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    p.add_argument("--mode", choices=compiler.run.train.MODES, default="auto", help="execution mode (default auto)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between test evaluations (default 50)")
    p.add_argument("--checkpoint-dir", default=None, help="keep orbax checkpoints here, and resume from them")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the params, data split and batch order (default 0)")
    p.add_argument("--wafers", type=int, default=1, help="wafers training data-parallel on each batch (default 1)")
    p.add_argument("--workers", type=int, default=0, help="input worker processes (default 0: a thread)")
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar (default on)"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = wafer.WaferSpec.mini(args.rows, args.cols) if args.preset == "mini" else PRESETS[args.preset]
    try:
        r = run_experiment(
            spec,
            model=args.model,
            optimizer=args.optimizer,
            lr=args.lr,
            batch=args.batch,
            steps=args.steps,
            mode=args.mode,
            seed=args.seed,
            eval_every=args.eval_every,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            progress=args.progress,
            wafers=args.wafers,
            workers=args.workers,
        )
    except compiler.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ValueError, wafer.SramCapacityError, compiler.PlacementError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(r))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
