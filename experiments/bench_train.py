"""Benchmark: one emulated training step against the same step in native Flax + optax.

For each model, the same loss, batch and optimizer (Adam) on both sides, in the same process:
  emulated  `state, metrics = tx.step(state, batch)` of `compiler.compile_train(..., mode="pipelined")` on a mini
            wafer (jitted, TrainState donated): weights and Adam slots read from their SRAM allocations (blocked:
            no copy), gradient with respect to them, optimizer on them, written back, counters charged;
  native    `jax.jit(value_and_grad + optimizer.update + optax.apply_updates)`, params and optimizer state
            donated too, for fairness.
Both are compiled before timing (compile times reported apart), warmed up, then timed interleaved (alternating
which goes first), each call ended by `block_until_ready`; the medians are compared. The last line is
`emulated/native = X.XX`, the worst ratio over the models.

    python experiments/bench_train.py [--repeats 30] [--warmup 3] [--rows 64 --cols 64] [--models mlp,cnn,block]

Where the time went before weights were stored blocked (CPU, jax.profiler over 30 steps of the MLP on
mini-64x64, whose first weight [784, 512] sits on 31x59 cores as tiles [26, 9]): the matmuls cost the same on
both sides; the extra (1.36-1.6x native) was (1) reassembling each weight from its [gh, gw, ta, tb] tiles for the
forward matmul (a transpose fused with the slice that drops the padding) and (2) Adam's elementwise fusions over
the tile-shaped arrays, reading the gradient through the pad-and-transpose that tiled it. Weights, gradients and
Adam's slots are now blocked allocations (wafer/layout.py: the leaf itself, core (i, j) owning block (i, j)), so
the step is native's program plus the counters: ~1.0x (docs/performance.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import compiler
import wafer
from compiler.examples import MLP, LeNet

# ---- models ---------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm Transformer block with causal multi-head self-attention and a gelu MLP."""

    heads: int = 4
    d_ff: int = 512

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        dh = d // self.heads
        h = nn.LayerNorm()(x)
        # no key bias: softmax cancels it, so its gradient is float32 rounding noise that Adam blows up into full
        # steps on any change of summation order, which would hide real differences in the param check below
        q, k, v = (nn.Dense(d, use_bias=n != "k", name=n)(h).reshape(b, t, self.heads, dh) for n in ("q", "k", "v"))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.float32(np.sqrt(dh))
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, jnp.finfo(s.dtype).min)
        a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, d)
        x = x + nn.Dense(d, name="out")(a)
        return x + nn.Dense(d)(nn.gelu(nn.Dense(self.d_ff)(nn.LayerNorm()(x))))


def _classifier(model, x_shape, seed):
    rng = np.random.default_rng(seed)
    batch = {
        "x": jnp.asarray(rng.standard_normal(x_shape), jnp.float32),
        "y": jnp.asarray(rng.integers(0, 10, x_shape[0]), jnp.int32),
    }

    def loss_fn(params, b):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, b["x"]), b["y"]).mean()

    return model, batch, loss_fn


def _block(seed):
    rng = np.random.default_rng(seed)
    model = Block()
    batch = {
        "x": jnp.asarray(rng.standard_normal((8, 64, 128)), jnp.float32),
        "y": jnp.asarray(rng.standard_normal((8, 64, 128)), jnp.float32),
    }

    def loss_fn(params, b):
        return jnp.mean((model.apply(params, b["x"]) - b["y"]) ** 2)

    return model, batch, loss_fn


MODELS = {
    "mlp": ("MLP 784-512-512-10, batch 128", lambda: _classifier(MLP((512, 512, 10)), (128, 784), 0)),
    "cnn": ("LeNet 28x28x1, batch 64", lambda: _classifier(LeNet(), (64, 28, 28, 1), 1)),
    "block": ("Transformer block T=64 d=128 h=4, batch 8", lambda: _block(2)),
}


# ---- timing ---------------------------------------------------------------------------------------------------


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def bench(name, spec, repeats, warmup, placement_params=None):
    _, make = MODELS[name]
    model, batch, loss_fn = make()
    params = model.init(jax.random.key(0), batch["x"])
    optimizer = optax.adam(1e-3)

    t0 = time.perf_counter()
    tx = compiler.compile_train(
        loss_fn, params, batch, optimizer, spec=spec, mode="pipelined", placement_params=placement_params
    )
    state = tx.init(params)
    emulated = tx.step.lower(state, batch).compile()
    t_compile_emu = time.perf_counter() - t0

    def native_step(p, o, b):
        loss, grads = jax.value_and_grad(loss_fn)(p, b)
        updates, o = optimizer.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    p = jax.tree_util.tree_map(jnp.array, params)
    o = optimizer.init(p)
    t0 = time.perf_counter()
    native = jax.jit(native_step, donate_argnums=(0, 1)).lower(p, o, batch).compile()
    t_compile_nat = time.perf_counter() - t0

    for _ in range(warmup):
        state, _ = jax.block_until_ready(emulated(state, batch))
        p, o, _ = jax.block_until_ready(native(p, o, batch))
    t_emu, t_nat = [], []
    for i in range(repeats):
        if i % 2:
            (p, o, _), t = _timed(native, p, o, batch)
            t_nat.append(t)
            (state, _), t = _timed(emulated, state, batch)
            t_emu.append(t)
        else:
            (state, _), t = _timed(emulated, state, batch)
            t_emu.append(t)
            (p, o, _), t = _timed(native, p, o, batch)
            t_nat.append(t)
    # both sides took the same steps from the same params: a cheap check that the timed programs agree
    diff = max(
        float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))
        for a, b in zip(jax.tree_util.tree_leaves(tx.read_params(state)), jax.tree_util.tree_leaves(p))
    )
    return {
        "name": name,
        "emu_ms": 1e3 * statistics.median(t_emu),
        "nat_ms": 1e3 * statistics.median(t_nat),
        "compile_emu_s": t_compile_emu,
        "compile_nat_s": t_compile_nat,
        "params": sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)),
        "kernels": len(tx.plans),
        "tile": max(
            ((t.tile, t.grid) for pl in tx.plans.values() for t in pl.params),
            key=lambda x: np.prod(x[1]) * np.prod(x[0]),
        ),
        "param_diff": diff,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="emulated vs native training step")
    ap.add_argument("--rows", type=int, default=64, help="core rows of the mini wafer")
    ap.add_argument("--cols", type=int, default=64, help="core columns of the mini wafer")
    ap.add_argument("--repeats", type=int, default=30, help="timed steps of each (>= 20)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    args = ap.parse_args(argv)
    if args.repeats < 20:
        ap.error("--repeats must be >= 20")
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    spec = wafer.WaferSpec.mini(args.rows, args.cols)
    print(
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), wafer {spec.name}, adam, "
        f"median of {args.repeats} steps after {args.warmup} warm-up"
    )
    rows = [bench(n, spec, args.repeats, args.warmup) for n in names]
    head = (
        f"{'model':<44}{'params':>10}{'kernels':>8}{'largest weight: cores / tile':>30}{'emulated ms':>13}"
        f"{'native ms':>11}{'ratio':>7}{'compile s (emu/nat)':>21}{'param diff':>12}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = r["emu_ms"] / r["nat_ms"]
        tile = "x".join(map(str, r["tile"][1])) + " / " + "x".join(map(str, r["tile"][0]))
        print(
            f"{MODELS[r['name']][0]:<44}{r['params']:>10,}{r['kernels']:>8}{tile:>30}{r['emu_ms']:>13.3f}{r['nat_ms']:>11.3f}"
            f"{ratio:>7.2f}{r['compile_emu_s']:>11.2f} / {r['compile_nat_s']:<7.2f}{r['param_diff']:>12.2g}"
        )
    worst = max(r["emu_ms"] / r["nat_ms"] for r in rows)
    print(f"emulated/native = {worst:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
