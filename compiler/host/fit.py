"""The host's training loop, as the CS-2's CPU cluster runs it: `fit`, checkpoints, and the non-finite-loss stop.

    tx = compiler.compile_train(loss_fn, params, example_batch, optax.adam(1e-3), spec=spec)
    batches = compiler.Batches.from_arrays(x, y, batch_size=32, seed=0)
    state, history = compiler.fit(tx, tx.init(params), batches, steps=1000, eval_fn=evaluate, eval_every=100,
                                  checkpoint_dir="runs/mlp", checkpoint_every=100)

`fit` reads a `Batches` with grain input workers (compiler/host/pipeline.py; `workers=N` processes, or a thread),
moves each batch to the device ahead of its step on a background thread (compiler/host/data.py), calls the
compiled step, and shows a progress bar with the step, the loss, the compiled program's predicted samples/s on its
wafer (`tx.report`), the emulator's own steps/s and, when the workers make fewer samples/s than the wafer would
consume, "input-bound"; at the end it prints the pipeline's measured throughput against the wafer's.
`history` is a list of dicts, one per step: {"step", "loss"} and, at evaluation steps,
"eval_<name>" for every figure `eval_fn(state)` returns (`pandas.DataFrame(history)` makes a table of it).

Steps count from 1: step k consumes batch k - 1 of the pipeline and leaves `state.step == k`.

Checkpoints are orbax's (`orbax.checkpoint.CheckpointManager`, PyTree handler): each is written to a temporary
directory and renamed when complete, so a run killed mid-write leaves the previous checkpoint as the latest. One
holds the whole `TrainState` (every SRAM allocation that holds data, the wafer's counters, the host store, the
step) and, as JSON, the history so far, a description of the input pipeline and its iterator state (grain's,
restored when the run resumes with the same number of workers). The SRAM layout
(`state.wafer.memory`) is a static field: it is not saved but comes from the compiled program, so restoring
needs a state of the same program as a template (`tx.init(params)`). Because `Batches` is a pure function of
(seed, step), the step number is the data iterator's position: a run resumed from a checkpoint sees the same
batches and ends with the same params, bit for bit, as one never interrupted.

The loss is read back every step (the one host sync of a step; the batch for the next step is already being
prepared meanwhile). A NaN or inf stops the run with `NonFiniteLossError` naming the step; a non-finite state is
never saved, so the last checkpoint stays good.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from compiler.errors import CheckpointError, CompilerError
from compiler.host.data import Batches, prefetch
from compiler.host.pipeline import Pipeline, stream


class NonFiniteLossError(CompilerError, FloatingPointError):
    """The training loss became NaN or inf.

    Attributes:
      step: the step whose loss was not finite (counting from 1; it consumed batch step - 1).
      loss: the loss (nan, inf or -inf).
      checkpoint_step: the latest checkpoint, all saved before `step` (None if there is none).
      checkpoint_dir: where it is (None if the run kept no checkpoints).
    """

    def __init__(self, step: int, loss: float, checkpoint_step: int | None = None, checkpoint_dir=None):
        self.step, self.loss = step, loss
        self.checkpoint_step, self.checkpoint_dir = checkpoint_step, checkpoint_dir
        message = f"training loss is {loss} at step {step} (batch {step - 1} of the input pipeline); stopped there. "
        if checkpoint_step is not None:
            message += (
                f"The last good checkpoint is step {checkpoint_step} in {checkpoint_dir}: "
                "restore it with compiler.restore_checkpoint(checkpoint_dir, tx.init(params)). "
            )
        elif checkpoint_dir is not None:
            message += f"No checkpoint was saved in {checkpoint_dir} before it. "
        else:
            message += "No checkpoints were kept (pass checkpoint_dir= to fit to keep them). "
        message += "Try a lower learning rate or gradient clipping, and check the batch for NaN or inf."
        self.args = (message,)


# ---- checkpoints -----------------------------------------------------------------------------------------------


def _manager(directory, keep: int | None = None, *, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=create,
        # Synchronous: the next step donates the state's buffers, so a save must be done with them before it.
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=options)


def _abstract(like):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)


def _save(manager: ocp.CheckpointManager, step: int, state, meta: dict):
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    manager.save(step, args=args, force=True)
    manager.wait_until_finished()


def _restore(manager: ocp.CheckpointManager, step: int, like):
    args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(like)), meta=ocp.args.JsonRestore())
    out = manager.restore(step, args=args)
    return out.state, dict(out.meta)


def _restore_latest_good(manager: ocp.CheckpointManager, directory, like, warn=None):
    """(step, state, meta) of the latest checkpoint that restores, newest first: a checkpoint whose files were
    corrupted or cut short (a disk filled, a copy interrupted) is skipped with a warning. (Orbax writes each
    checkpoint to a temporary directory and renames it when complete, so one killed mid-write is never listed.)

    Raises:
      CheckpointError: checkpoints exist but none restores.
    """
    failures = {}
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state, meta = _restore(manager, step, like)
        except Exception as e:  # orbax raises many kinds (ValueError, OSError, KeyError, ...)
            failures[step] = e
            continue
        if failures:
            # moved aside (never deleted), so that the resumed run can save those steps again
            root = manager.directory
            for k in failures:
                src = os.path.join(os.fspath(root), str(k))
                if os.path.isdir(src):
                    os.replace(src, _aside(src))
            manager.reload()
            if warn is not None:
                skipped = ", ".join(f"step {k} ({type(e).__name__}: {str(e)[:120]})" for k, e in failures.items())
                warn(
                    f"skipped unreadable checkpoints in {directory}: {skipped}; moved aside as <step>.unreadable; "
                    f"resuming from step {step}"
                )
        return step, state, meta
    listed = ", ".join(f"step {k}: {type(e).__name__}: {str(e)[:200]}" for k, e in failures.items())
    raise CheckpointError(
        f"no checkpoint in {directory} can be restored ({listed}). They are corrupted or of another program (restore "
        "needs a state of the program that saved them, tx.init(params), as the template); move the directory "
        "away to start afresh",
        directory,
        failures,
    )


def latest_checkpoint(directory) -> int | None:
    """The step of the latest complete checkpoint in `directory`, or None if it holds none."""
    if not os.path.isdir(directory):
        return None
    with _manager(directory, create=False) as manager:
        return manager.latest_step()


def save_checkpoint(directory, state, *, meta: Mapping | None = None, keep: int | None = None) -> int:
    """Save `state` (a `TrainState`) as the checkpoint of its step; returns the step. `meta`: JSON-able extras."""
    step = int(state.step)
    with _manager(directory, keep) as manager:
        _save(manager, step, state, {"step": step, **(meta or {})})
    return step


def restore_checkpoint(directory, like, *, step: int | None = None) -> tuple[Any, dict]:
    """A saved training state and its metadata.

    Args:
      directory: the checkpoint directory `fit` wrote.
      like: a state of the same compiled program, e.g. `tx.init(params)`: it gives the tree, shapes, dtypes and
        the static SRAM layout (its values are not used).
      step: which checkpoint; the latest by default.
    Returns:
      (state, meta): meta holds "step", "history" (the rows of `fit`'s history up to that step) and "data" (the
      input pipeline's description).
    Raises:
      FileNotFoundError: no checkpoint (or not that step) in `directory`.
      CheckpointError: (the latest by default) no checkpoint restores; a corrupted latest one is skipped for the
        latest good one, with a warning.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    with _manager(directory, create=False) as manager:
        steps = manager.all_steps()
        if step is None and steps:
            _, state, meta = _restore_latest_good(manager, directory, like, warn=_warn)
            return state, meta
        if step is None or step not in steps:
            raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; it holds steps {sorted(steps)}")
        return _restore(manager, step, like)


def _aside(path: str) -> str:
    """A free name beside `path` for an unreadable checkpoint: path.unreadable, path.unreadable.1, ..."""
    out, n = f"{path}.unreadable", 0
    while os.path.exists(out):
        n += 1
        out = f"{path}.unreadable.{n}"
    return out


def _warn(message: str):
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=3)


# ---- the loop --------------------------------------------------------------------------------------------------


def _batches(train_batches, start: int, stop: int, state: dict | None) -> Iterable:
    """(batch, the input pipeline's state after it) for batches start .. stop - 1."""
    if isinstance(train_batches, Pipeline):  # random access: start where the run left off (or at its saved state)
        if state is not None and int(state.get("next", -1)) != start:
            state = None
        return stream(train_batches, start, stop, state)
    plain = itertools.islice(iter(train_batches), start, stop)  # replay a plain iterable up to the same place
    return ((jax.device_put(b), None) for b in plain)


def _describe(train_batches):
    return train_batches.batches.describe() if isinstance(train_batches, Pipeline) else None


def _header(tx) -> str:
    spec, report = tx.spec, tx.report
    line = f"training on {spec.name} ({report.mode}), batch {report.batch}: "
    line += f"predicted {report.samples_per_s:,.0f} samples/s"
    io, cycles = report.io_cycles_per_step, report.latency_cycles
    line += (
        f"\n  each batch streams in over the edge I/O in {io:,.0f} of the step's {cycles:,.0f} cycles "
        f"({100 * io / cycles:.1f}%); a step is {report.bound}-bound"
    )
    return line


def _check_positive(**kwargs):
    for name, v in kwargs.items():
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def fit(
    tx,
    state,
    train_batches,
    *,
    steps: int,
    eval_fn: Callable[[Any], Mapping[str, Any]] | None = None,
    eval_every: int | None = 100,
    checkpoint_dir=None,
    checkpoint_every: int | None = 100,
    keep: int | None = 3,
    resume: bool = True,
    progress: bool = True,
    log_every: int = 10,
    prefetch_size: int = 2,
    workers: int = 0,
    on_step: Callable[[int, Any, Mapping], None] | None = None,
) -> tuple[Any, list[dict]]:
    """Train until `state.step == steps`.

    Args:
      tx: a compiled training step (`compiler.compile_train`): `tx.step(state, batch) -> (state, metrics)`.
      state: the starting state (`tx.init(params)`); when resuming, only its structure is used.
      train_batches: a `compiler.Batches` (read by grain input workers, compiler/host/pipeline.py, and resumed at
        its saved iterator state), a `compiler.Pipeline` (the same, with your own workers and transform), or any
        iterable of batches (replayed from its start and skipped up to the resumed step, so it must give the same
        batches again).
      steps: the total number of steps the run is to reach (a resumed run trains the remaining ones).
      eval_fn: `eval_fn(state) -> {name: number}`, called every `eval_every` steps and after the last one;
        figures go into the history as "eval_<name>". It must not keep `state`: the next step donates it.
      eval_every: steps between evaluations (None: after the last step only).
      checkpoint_dir: where to keep checkpoints (None: keep none).
      checkpoint_every: steps between checkpoints; the last step is always saved (None: the last step only).
      keep: how many checkpoints to keep (None: all).
      resume: continue from the latest checkpoint in `checkpoint_dir` if there is one. With False, a directory
        that holds checkpoints is an error (nothing is overwritten).
      progress: show a progress bar (and a header and eval lines on stdout).
      log_every: steps between progress-bar updates.
      prefetch_size: batches prepared ahead (by each input worker, and on the device by the loop's thread).
      workers: input worker processes for a `Batches` (0: read on a thread in this process); a `Pipeline` keeps
        its own. The progress bar says "input-bound" when they make fewer samples/s than the wafer is predicted
        to consume, and how many would keep up (`Pipeline.stats`).
      on_step: `on_step(step, state, metrics)` after every step (and its checkpoint, if any); `state` is donated by
        the next step.
    Returns:
      (state, history): the final state and one dict per step since step 1 (resumed runs included).
    Raises:
      NonFiniteLossError: the loss became NaN or inf; nothing from that step on was saved.
      CheckpointError: resuming, no checkpoint in `checkpoint_dir` restores (a corrupted latest one is skipped for
        the latest good one).
      ValueError: bad arguments, `train_batches` ran out before `steps`, or a resumed run's input pipeline
        differs from the checkpoint's.
    """
    _check_positive(steps=steps, eval_every=eval_every, checkpoint_every=checkpoint_every, keep=keep)
    _check_positive(log_every=log_every, prefetch_size=prefetch_size)
    if isinstance(train_batches, Batches):
        train_batches = Pipeline(train_batches, workers=workers, prefetch=prefetch_size)
    elif not isinstance(train_batches, Pipeline) and workers:
        raise ValueError("workers= needs a compiler.Batches (or a compiler.Pipeline): a plain iterable is read as is")
    eval_every = eval_every or steps
    checkpoint_every = checkpoint_every or steps
    data = _describe(train_batches)
    history: list[dict] = []
    start = int(state.step)
    input_state = None  # the input pipeline's iterator state at `start` (from a checkpoint)
    manager = None if checkpoint_dir is None else _manager(checkpoint_dir, keep)
    bar = None
    try:
        if manager is not None and (last := manager.latest_step()) is not None:
            if not resume:
                raise ValueError(
                    f"{checkpoint_dir} already holds checkpoints (up to step {last}); pass resume=True to continue "
                    "from them, or give an empty checkpoint_dir"
                )
            last, state, meta = _restore_latest_good(
                manager, checkpoint_dir, state, warn=tqdm.write if progress else _warn
            )
            if data is not None and meta.get("data") not in (None, data):
                raise ValueError(
                    f"the input pipeline differs from the checkpoint's: {data} now, {meta['data']} when saved; "
                    "resuming would not see the same batches"
                )
            history, start = list(meta.get("history", [])), last
            input_state = meta.get("input")
            if progress:
                tqdm.write(f"resumed from the checkpoint of step {last} in {checkpoint_dir}")
        if start >= steps:
            return state, history
        if progress:
            tqdm.write(_header(tx))
        bar = tqdm(
            total=steps,
            initial=start,
            disable=not progress,
            desc=tx.spec.name,
            unit="step",
            bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| [{elapsed}<{remaining}{postfix}]",
            dynamic_ncols=True,
        )
        predicted = float(tx.report.samples_per_s)
        pipeline = train_batches if isinstance(train_batches, Pipeline) else None
        busy, timed = 0.0, 0  # wall time and count of steps since the first (which compiles), evals and saves apart
        items = _batches(train_batches, start, steps, input_state)
        with prefetch(items, prefetch_size, to_device=False) as it:
            for step in range(start + 1, steps + 1):
                t0 = time.perf_counter()
                item = next(it, None)
                if item is None:
                    raise ValueError(f"train_batches ran out after {step - 1} steps; fit needs {steps}")
                batch, input_state = item
                if pipeline is not None and step > start + 1:
                    pipeline.wait_s += time.perf_counter() - t0
                state, metrics = tx.step(state, batch)
                loss = float(metrics["loss"])  # the step's one host sync
                if step > start + 1:
                    busy, timed = busy + time.perf_counter() - t0, timed + 1
                if not math.isfinite(loss):
                    last = None if manager is None else manager.latest_step()
                    raise NonFiniteLossError(step, loss, last, checkpoint_dir)
                row = {"step": step, "loss": loss}
                if eval_fn is not None and (step % eval_every == 0 or step == steps):
                    figures = {f"eval_{k}": float(v) for k, v in eval_fn(state).items()}
                    row.update(figures)
                    if progress:
                        shown = ", ".join(f"{k} {v:.4g}" for k, v in figures.items())
                        tqdm.write(f"step {step}: loss {loss:.4g}, {shown}")
                history.append(row)
                if manager is not None and (step % checkpoint_every == 0 or step == steps):
                    meta = {"step": step, "history": history, "data": data, "input": input_state}
                    _save(manager, step, state, meta)
                if on_step is not None:
                    on_step(step, state, metrics)
                if step % log_every == 0 or step == steps:
                    rate = f"{timed / busy:,.1f}" if busy > 0 else "-"
                    text = f"loss {loss:.4f}, predicted {predicted:,.0f} samples/s, emulated {rate} steps/s"
                    if pipeline is not None and (stats := pipeline.stats(predicted)).input_bound:
                        text += f", input-bound ({stats.samples_per_s:,.0f} samples/s in)"
                    bar.set_postfix_str(text, refresh=False)
                    bar.update(step - bar.n)
        if progress and pipeline is not None:
            tqdm.write(pipeline.stats(predicted).summary())
        return state, history
    finally:
        if bar is not None:
            bar.close()
        if manager is not None:
            manager.close()
