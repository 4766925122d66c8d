"""The input workers on grain (compiler/host/pipeline.py): order, worker processes, iterator state, throughput."""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import compiler
import wafer


@pytest.fixture(scope="module")
def setup():
    """(tx, params, batches): a small MLP with Adam on an 8 x 8 mini wafer (as tests/compiler/test_host.py)."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 12)).astype(np.float32), rng.integers(0, 10, 40).astype(np.int32)
    net = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(10)])
    shapes = jax.eval_shape(net.init, jax.random.key(0), x[:8])
    params = jax.tree_util.tree_map(lambda s: 0.3 * rng.standard_normal(s.shape).astype(s.dtype), shapes)

    def loss_fn(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(net.apply(p, batch["x"]), batch["y"]).mean()

    batches = compiler.Batches.from_arrays(x, y, 8, seed=3)
    spec = wafer.WaferSpec.mini(8, 8)
    return compiler.compile_train(loss_fn, params, batches.batch(0), optax.adam(0.05), spec=spec), params, batches


def _same(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(la, lb))


def _batches(n=40, batch=8, seed=3):
    rng = np.random.default_rng(0)
    return compiler.Batches.from_arrays(rng.standard_normal((n, 5)).astype(np.float32), np.arange(n), batch, seed=seed)


def _equal(a, b) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in ("x", "y"))


def test_pipeline_streams_the_batches_in_their_order():
    batches = _batches()
    it = compiler.Pipeline(batches).iterator(start=3)
    got = [next(it) for _ in range(9)]  # across epoch boundaries (5 batches an epoch)
    assert all(_equal(g, batches.batch(3 + i)) for i, g in enumerate(got))
    # a fresh iterator set to a saved state continues with the next batch
    state = it.get_state()
    assert state["next"] == 12 and state["workers"] == 0
    again = compiler.Pipeline(batches).iterator(state=state)
    assert _equal(next(again), batches.batch(12))
    it.close(), again.close()


def test_worker_processes_give_the_same_batches_and_resume_from_their_state():
    batches = _batches()
    pipe = compiler.Pipeline(batches, workers=2, prefetch=2)
    it = pipe.iterator()
    first = [next(it) for _ in range(5)]
    state = it.get_state()
    it.close()
    assert all(_equal(g, batches.batch(i)) for i, g in enumerate(first))
    assert "grain" in state and state["workers"] == 2
    resumed = compiler.Pipeline(batches, workers=2).iterator(state=state)
    assert [int(next(resumed)["y"][0]) for _ in range(2)] == [int(batches.batch(i)["y"][0]) for i in (5, 6)]
    resumed.close()
    # another worker count cannot take grain's state: it restarts the stream at the same batch
    other = compiler.Pipeline(batches, workers=0).iterator(state=state)
    assert _equal(next(other), batches.batch(5))
    other.close()
    stats = pipe.stats(predicted_samples_per_s=1.0)
    assert stats.batches == 5 and stats.workers == 2 and not stats.input_bound


def _slow(batch):
    time.sleep(0.02)
    return batch


def test_input_bound_is_measured_and_says_how_many_workers_would_keep_up(setup, capsys):
    tx, params, batches = setup
    pipe = compiler.Pipeline(batches, transform=_slow)
    compiler.fit(tx, tx.init(params), pipe, steps=4, log_every=2, progress=True)
    stats = pipe.stats(tx.report.samples_per_s)
    assert stats.seconds_per_batch >= 0.02 and stats.samples_per_s <= batches.batch_size / 0.02
    assert stats.input_bound
    need = stats.workers_needed
    assert need == int(np.ceil(tx.report.samples_per_s * stats.seconds_per_batch / batches.batch_size))
    out, err = capsys.readouterr()
    assert "input-bound" in err  # the progress bar
    assert f"input-bound; {need} workers would keep up" in out  # the summary
    fast = compiler.Pipeline(batches).stats(1.0)
    assert fast.batches == 0 and not fast.input_bound


def test_resume_restores_the_input_state_bit_exact(setup, tmp_path):
    tx, params, batches = setup
    want, want_history = compiler.fit(tx, tx.init(params), batches, steps=7, progress=False)
    compiler.fit(tx, tx.init(params), batches, steps=4, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    _, meta = compiler.restore_checkpoint(tmp_path, tx.init(params))
    assert meta["input"]["next"] == 4 and meta["input"]["grain"]
    got, history = compiler.fit(tx, tx.init(params), batches, steps=7, checkpoint_dir=tmp_path, progress=False)
    assert _same(got, want) and history == want_history


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(workers=-1), "workers must be an int >= 0"),
        (dict(prefetch=0), "prefetch must be an int >= 1"),
    ],
    ids=["workers", "prefetch"],
)
def test_pipeline_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compiler.Pipeline(_batches(), **kwargs)
    with pytest.raises(ValueError, match="needs a compiler.Batches"):
        compiler.Pipeline([1, 2])


def test_workers_need_batches(setup):
    tx, params, batches = setup
    with pytest.raises(ValueError, match="workers= needs a compiler.Batches"):
        compiler.fit(tx, tx.init(params), list(batches.iterate(0, 2)), steps=2, workers=2, progress=False)
