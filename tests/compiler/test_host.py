"""The host side: the input pipeline (compiler/data.py) and the training loop with checkpoints (compiler/host.py).

Run as a script, this module is the worker the resume test starts in fresh processes:
    python tests/compiler/test_host.py CHECKPOINT_DIR STEPS KILL_AT OUT.npz
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compiler
import wafer

N, D, CLASSES, BATCH = 40, 12, 10, 8


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(CLASSES)(nn.relu(nn.Dense(16)(x)))


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, D)).astype(np.float32), rng.integers(0, CLASSES, N).astype(np.int32)


def _make(mode: str = "pipelined", lr: float = 0.05):
    """(tx, params, batches): a small MLP with Adam, compiled for an 8 x 8 mini wafer; values from NumPy."""
    net = _MLP()
    x, y = _data()
    shapes = jax.eval_shape(net.init, jax.random.key(0), x[:BATCH])
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)

    def loss_fn(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(net.apply(p, batch["x"]), batch["y"]).mean()

    batches = compiler.Batches.from_arrays(x, y, BATCH, seed=3)
    spec = wafer.WaferSpec.mini(8, 8)
    tx = compiler.compile_train(loss_fn, params, batches.batch(0), optax.adam(lr), spec=spec, mode=mode)
    return tx, params, batches


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def _same(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(np.array_equal(u, v) for u, v in zip(la, lb))


@pytest.fixture(scope="module")
def setup():
    return {mode: _make(mode) for mode in ("pipelined", "weight_streaming")}


# ---- input pipeline --------------------------------------------------------------------------------------------


def test_batches_are_a_function_of_seed_and_step():
    x, y = _data()
    a = compiler.Batches.from_arrays(x, y, BATCH, seed=5)
    b = compiler.Batches.from_arrays(x, y, BATCH, seed=5)
    stream = list(a.iterate(0, 12))
    assert all(_same(s, b.batch(i)) for i, s in enumerate(stream))
    assert all(_same(s, t) for s, t in zip(stream[7:], a.iterate(7, 12)))  # resuming at step 7
    # every epoch visits each sample once, in a new order
    spe = a.steps_per_epoch
    assert spe == N // BATCH
    epochs = [np.concatenate([a.indices(e * spe + k) for k in range(spe)]) for e in range(2)]
    assert all(sorted(e.tolist()) == list(range(N)) for e in epochs)
    assert not np.array_equal(epochs[0], epochs[1])
    np.testing.assert_array_equal(stream[0]["x"], x[a.indices(0)])
    other = compiler.Batches.from_arrays(x, y, BATCH, seed=6)
    assert not np.array_equal(other.indices(0), a.indices(0))


@pytest.mark.parametrize("drop,sizes", [(True, [4, 4]), (False, [4, 4, 2])], ids=["drop", "keep"])
def test_batches_remainder(drop, sizes):
    b = compiler.Batches({"x": np.arange(10)}, 4, shuffle=False, drop_remainder=drop)
    assert [len(t["x"]) for t in b.iterate(0, b.steps_per_epoch)] == sizes
    assert [len(t["x"]) for t in b.epoch()] == [4, 4, 2]
    assert b.describe() == {"samples": 10, "batch_size": 4, "seed": 0, "shuffle": False, "drop_remainder": drop}


@pytest.mark.parametrize(
    "data,batch,match",
    [
        ({"x": np.zeros(4), "y": np.zeros(5)}, 2, "same leading"),
        ({"x": np.zeros(4)}, 5, "no full batch"),
        ({"x": np.zeros(4)}, 0, "batch_size must be >= 1"),
    ],
    ids=["sizes", "too-big", "zero"],
)
def test_batches_validate(data, batch, match):
    with pytest.raises(ValueError, match=match):
        compiler.Batches(data, batch)


def test_prefetch_keeps_order_and_puts_on_device():
    items = [{"x": np.full(3, i, np.float32)} for i in range(7)]
    with compiler.prefetch(items, size=2) as it:
        got = list(it)
    assert [int(g["x"][0]) for g in got] == list(range(7))
    assert all(isinstance(g["x"], jax.Array) for g in got)
    assert [int(v) for v in compiler.prefetch(range(3), to_device=False)] == [0, 1, 2]


def test_prefetch_is_bounded_and_stops():
    made = []

    def source():
        for i in range(1000):
            made.append(i)
            yield i

    it = compiler.prefetch(source(), size=2, to_device=False)
    assert next(it) == 0
    time.sleep(0.2)
    assert len(made) <= 1 + 2 + 1  # the one taken, a full queue, and the one the thread holds
    it.close()
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(StopIteration):
        next(it)


def test_prefetch_raises_at_the_failing_item():
    def source():
        yield 1
        raise RuntimeError("bad batch")

    it = compiler.prefetch(source(), to_device=False)
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="bad batch"):
        next(it)
    with pytest.raises(ValueError, match="size"):
        compiler.prefetch([], size=0)


# ---- the loop ----------------------------------------------------------------------------------------------------


def test_fit_steps_the_compiled_step(setup):
    tx, params, batches = setup["pipelined"]
    state, history = compiler.fit(tx, tx.init(params), batches, steps=9, progress=False)
    assert [row["step"] for row in history] == list(range(1, 10))
    assert int(state.step) == 9 and int(state.wafer.steps) == 9
    assert float(state.wafer.clock) == pytest.approx(9 * tx.report.latency_cycles, rel=1e-6)
    # the same as calling the step by hand on the same batches
    manual, losses = tx.init(params), []
    for i in range(9):
        manual, metrics = tx.step(manual, batches.batch(i))
        losses.append(float(metrics["loss"]))
    assert [row["loss"] for row in history] == losses
    assert _same(tx.read_params(state), tx.read_params(manual))
    assert history[-1]["loss"] < history[0]["loss"]
    # continuing in process: state.step says where the pipeline is
    more, rest = compiler.fit(tx, state, batches, steps=11, progress=False)
    assert [row["step"] for row in rest] == [10, 11] and int(more.step) == 11


def test_eval_runs_every_eval_every_steps_and_at_the_end(setup):
    tx, params, batches = setup["pipelined"]
    calls = []

    def evaluate(state):
        calls.append(int(state.step))
        return {"norm": jnp.sum(jnp.abs(tx.read_params(state)["params"]["Dense_0"]["kernel"]))}

    _, history = compiler.fit(tx, tx.init(params), batches, steps=12, eval_fn=evaluate, eval_every=5, progress=False)
    assert calls == [5, 10, 12]
    assert [row["step"] for row in history if "eval_norm" in row] == [5, 10, 12]
    assert all(isinstance(row.get("eval_norm", 0.0), float) for row in history)


def test_progress_shows_the_prediction_and_edge_streaming(setup, capsys):
    tx, params, batches = setup["pipelined"]
    compiler.fit(tx, tx.init(params), batches, steps=4, log_every=2, progress=True)
    out, err = capsys.readouterr()
    assert "predicted" in out and "streams in over the edge" in out and "cycles" in out
    assert "4/4" in err and "loss" in err and "samples/s" in err and "emulated" in err and "steps/s" in err


@pytest.mark.parametrize("mode", ["pipelined", "weight_streaming"])
def test_resume_from_checkpoint_is_bit_exact(setup, tmp_path, mode):
    tx, params, batches = setup[mode]
    want, want_history = compiler.fit(tx, tx.init(params), batches, steps=10, progress=False)
    _, first = compiler.fit(
        tx, tx.init(params), batches, steps=6, checkpoint_dir=tmp_path, checkpoint_every=4, progress=False
    )
    assert compiler.latest_checkpoint(tmp_path) == 6
    got, history = compiler.fit(
        tx, tx.init(params), batches, steps=10, checkpoint_dir=tmp_path, checkpoint_every=4, progress=False
    )
    assert _same(tx.read_params(got), tx.read_params(want))
    assert _same(got, want)  # optimizer state, counters, step: the whole TrainState
    assert history == want_history and history[:6] == first
    restored, meta = compiler.restore_checkpoint(tmp_path, tx.init(params), step=8)
    assert int(restored.step) == 8 and meta["step"] == 8 and len(meta["history"]) == 8
    assert meta["data"] == batches.describe()


def test_checkpoint_guards(setup, tmp_path):
    tx, params, batches = setup["pipelined"]
    compiler.fit(tx, tx.init(params), batches, steps=2, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        compiler.fit(tx, tx.init(params), batches, steps=4, checkpoint_dir=tmp_path, resume=False, progress=False)
    x, y = _data()
    reshuffled = compiler.Batches.from_arrays(x, y, BATCH, seed=4)
    with pytest.raises(ValueError, match="input pipeline differs"):
        compiler.fit(tx, tx.init(params), reshuffled, steps=4, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        compiler.restore_checkpoint(tmp_path, tx.init(params), step=1)
    with pytest.raises(ValueError, match="ran out after 3 steps"):
        compiler.fit(tx, tx.init(params), list(batches.iterate(0, 3)), steps=5, progress=False)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        compiler.fit(tx, tx.init(params), batches, steps=0, progress=False)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    tx, params, batches = setup["pipelined"]
    stream = list(batches.iterate(0, 10))
    stream[6] = {"x": np.where(np.arange(D) == 0, np.nan, stream[6]["x"]).astype(np.float32), "y": stream[6]["y"]}
    with pytest.raises(compiler.NonFiniteLossError, match="at step 7 ") as info:
        compiler.fit(tx, tx.init(params), stream, steps=10, checkpoint_dir=tmp_path, checkpoint_every=3, progress=False)
    err = info.value
    assert err.step == 7 and np.isnan(err.loss) and err.checkpoint_step == 6
    assert "last good checkpoint is step 6" in str(err)
    assert compiler.latest_checkpoint(tmp_path) == 6  # nothing was saved from step 7 on
    restored, _ = compiler.restore_checkpoint(tmp_path, tx.init(params))
    assert int(restored.step) == 6
    assert all(np.isfinite(leaf).all() for leaf in _leaves(restored))
    clean, _ = compiler.fit(tx, tx.init(params), batches, steps=6, progress=False)
    assert _same(restored, clean)
    with pytest.raises(compiler.NonFiniteLossError, match="No checkpoints were kept"):
        compiler.fit(tx, tx.init(params), stream, steps=10, progress=False)


def _corrupt(step_dir):
    """Overwrite every file of a checkpoint with garbage, as a disk error or a cut-short copy leaves it."""
    for root, _, files in os.walk(step_dir):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"\x00garbage")


def test_corrupted_latest_checkpoint_resumes_from_the_last_good_one(setup, tmp_path):
    """A corrupted latest checkpoint is skipped with a warning (and moved aside, not deleted); the run resumes from
    the one before and ends bit-identical to an uninterrupted run. With every checkpoint corrupted, resuming raises
    compiler.CheckpointError naming the directory."""
    tx, params, batches = setup["pipelined"]
    want, want_history = compiler.fit(tx, tx.init(params), batches, steps=6, progress=False)
    compiler.fit(tx, tx.init(params), batches, steps=4, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    _corrupt(tmp_path / "4")
    with pytest.warns(RuntimeWarning, match="skipped unreadable checkpoints.*resuming from step 2"):
        restored, _ = compiler.restore_checkpoint(tmp_path, tx.init(params))
    assert int(restored.step) == 2 and (tmp_path / "4.unreadable").is_dir()
    got, history = compiler.fit(
        tx, tx.init(params), batches, steps=6, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False
    )
    assert _same(got, want) and history == want_history
    for step in (2, 4, 6):
        _corrupt(tmp_path / str(step))
    with pytest.raises(compiler.CheckpointError, match="no checkpoint in .* can be restored") as info:
        compiler.fit(tx, tx.init(params), batches, steps=8, checkpoint_dir=tmp_path, progress=False)
    assert sorted(info.value.failures) == [2, 4, 6]


def test_nan_in_params_stops_at_step_one(setup, tmp_path):
    """NaN params (the batch is clean) stop the run at its first step, with nothing saved."""
    tx, params, batches = setup["pipelined"]
    bad = jax.tree_util.tree_map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), params)
    with pytest.raises(compiler.NonFiniteLossError, match="at step 1 ") as info:
        compiler.fit(tx, tx.init(bad), batches, steps=4, checkpoint_dir=tmp_path, progress=False)
    assert info.value.checkpoint_step is None and compiler.latest_checkpoint(tmp_path) is None
    assert isinstance(info.value, compiler.CompilerError)


def test_killed_run_resumed_in_a_new_process_ends_bit_identical(setup, tmp_path):
    tx, params, batches = setup["pipelined"]
    want, want_history = compiler.fit(tx, tx.init(params), batches, steps=14, progress=False)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.npz"
    worker = [sys.executable, os.path.abspath(__file__), str(ckpt), "14"]
    killed = subprocess.run([*worker, "10", str(out)], capture_output=True, text=True, timeout=120)
    assert killed.returncode == 17, killed.stderr  # os._exit at step 10: no cleanup, like a kill
    assert compiler.latest_checkpoint(ckpt) == 8 and not out.exists()
    resumed = subprocess.run([*worker, "0", str(out)], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    got = np.load(out)
    want_leaves = _leaves(tx.read_params(want))
    assert len(got.files) - 1 == len(want_leaves)
    for i, w in enumerate(want_leaves):
        assert np.array_equal(got[f"p{i}"], w), f"param leaf {i} differs"
    assert got["losses"].tolist() == [row["loss"] for row in want_history]


def _worker(directory: str, steps: int, kill_at: int, out: str):
    tx, params, batches = _make()

    def on_step(step, state, metrics):
        if step == kill_at:
            os._exit(17)

    state, history = compiler.fit(
        tx, tx.init(params), batches, steps=steps, checkpoint_dir=directory, checkpoint_every=4, on_step=on_step
    )
    arrays = {f"p{i}": leaf for i, leaf in enumerate(_leaves(tx.read_params(state)))}
    np.savez(out, losses=np.array([row["loss"] for row in history]), **arrays)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
