"""Benchmark: how long compiling a 24-layer, d_model 1024 language model onto the full WSE-2 takes.

The model is a GPT-style decoder (bench_train's pre-norm blocks of causal self-attention and a 4x gelu MLP, a
learned position table, a Dense head), 24 layers of d_model 1024 with 16 heads, vocabulary 32,768, sequence 1024,
batch 8: about 336M parameters (1.3 GB in float32), which fit the WSE-2's 40 GB of SRAM layer-pipelined. Compiling
needs only shapes, so the parameters are `jax.eval_shape` structures: nothing is materialised and the figure is
the compiler's own time (trace, graph, demands, place, partition, route, lay out; `compiler.compile`), not
XLA's. The first compile also pays Python's and JAX's one-off warm-up (imports, primitive registrations, cached
lowerings), so it is reported apart; the figure compared with the target is the median of the repeats after it.

    python experiments/bench_compile.py [--repeats 5] [--layers 24] [--d-model 1024] [--train]

`--train` also times `compiler.compile_train` (Adam, pipelined) of the same model's cross-entropy loss.
The last line is `compile s = X.XX` (the median inference compile).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train  # noqa: E402  (the benchmark next to this script: its pre-norm causal Transformer block)

import compiler  # noqa: E402
import wafer  # noqa: E402


class LM(nn.Module):
    vocab: int
    d_model: int
    heads: int
    layers: int
    max_len: int

    @nn.compact
    def __call__(self, tokens):
        pos = self.param("pos", nn.initializers.normal(0.02), (self.max_len, self.d_model))
        x = nn.Embed(self.vocab, self.d_model)(tokens) + pos[: tokens.shape[1]]
        for _ in range(self.layers):
            x = bench_train.Block(heads=self.heads, d_ff=4 * self.d_model)(x)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(x))


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="compile time of a 24-layer d1024 language model onto WSE-2")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed compiles after the first (>= 3)")
    p.add_argument("--train", action="store_true", help="also time compile_train (Adam, pipelined)")
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error("--repeats must be >= 3")
    spec = wafer.WSE2
    model = LM(args.vocab, args.d_model, args.heads, args.layers, args.seq)
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))

    # areas by SRAM need: by work (the default) the attention kernels take the wafer before the head is placed
    pp = compiler.PlacementParams(area_rule="sram")
    compile_fn = lambda: compiler.compile(model.apply, params, tokens, spec=spec, placement_params=pp)  # noqa: E731
    t0 = time.perf_counter()
    exe = compile_fn()
    first = time.perf_counter() - t0
    exe, times = _median_time(compile_fn, args.repeats)
    r = exe.report
    print(
        f"{args.layers}-layer d{args.d_model} LM ({n_params / 1e6:.0f}M parameters, batch {args.batch} x "
        f"{args.seq}) onto {spec.name}: {len(exe.graph.kernels)} kernels, {r.active_cores:,} active cores "
        f"(jax {jax.__version__}, {jax.default_backend()})"
    )
    print(
        f"compile (inference): first {first:.2f} s, then median {statistics.median(times):.2f} s "
        f"(range {min(times):.2f}-{max(times):.2f}) over {args.repeats}"
    )
    if args.train:

        def loss_fn(p, b):
            logits = model.apply(p, b["x"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()

        batch = {"x": tokens, "y": tokens}
        train_fn = lambda: compiler.compile_train(  # noqa: E731
            loss_fn, params, batch, optax.adam(1e-4), spec=spec, mode="pipelined", placement_params=pp
        )
        t0 = time.perf_counter()
        train_fn()
        first_t = time.perf_counter() - t0
        _, times_t = _median_time(train_fn, args.repeats)
        print(
            f"compile_train (adam, pipelined): first {first_t:.2f} s, then median {statistics.median(times_t):.2f} s "
            f"(range {min(times_t):.2f}-{max(times_t):.2f})"
        )
    print(f"compile s = {statistics.median(times):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
