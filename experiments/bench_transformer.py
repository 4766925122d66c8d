"""Benchmark: one training step of a 12-layer Transformer language model, emulated against native.

The model: token embedding (vocabulary 512) plus a learned position table, 12 pre-norm blocks of causal 4-head
self-attention and a gelu MLP (`bench_train.Block`, d_model 128, d_ff 512), a final LayerNorm and a Dense head;
batch 4 x 64 tokens, next-token cross-entropy, Adam. It is compiled layer-pipelined onto a mini wafer (256 x 256
cores by default, areas by SRAM need: the early blocks stash the activations of every sample in flight, which on
128 x 128 cores do not fit) and timed exactly as experiments/bench_train.py times its models (same run,
interleaved, medians after warm-up, both sides jitted and donated).
The last line is `emulated/native = X.XX`.

    python experiments/bench_transformer.py [--repeats 20] [--warmup 3] [--rows 256 --cols 256] [--layers 12]
"""

from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train  # noqa: E402  (the benchmark next to this script: its Block and its timing)

import compiler  # noqa: E402
import wafer  # noqa: E402

VOCAB, SEQ, BATCH, D = 512, 64, 4, 128


class LM(nn.Module):
    layers: int = 12

    @nn.compact
    def __call__(self, tokens):
        pos = self.param("pos", nn.initializers.normal(0.02), (SEQ, D))
        x = nn.Embed(VOCAB, D)(tokens) + pos[: tokens.shape[1]]
        for _ in range(self.layers):
            x = bench_train.Block()(x)
        return nn.Dense(VOCAB, name="head")(nn.LayerNorm()(x))


def _lm(layers, seed=3):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (BATCH, SEQ + 1))
    batch = {"x": jnp.asarray(tokens[:, :-1], jnp.int32), "y": jnp.asarray(tokens[:, 1:], jnp.int32)}
    model = LM(layers)

    def loss_fn(params, b):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, b["x"]), b["y"]).mean()

    return model, batch, loss_fn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="emulated vs native training step of a 12-layer Transformer LM")
    ap.add_argument("--rows", type=int, default=256, help="core rows of the mini wafer")
    ap.add_argument("--cols", type=int, default=256, help="core columns of the mini wafer")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=20, help="timed steps of each (>= 20)")
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    if args.repeats < 20:
        ap.error("--repeats must be >= 20")
    name = f"lm{args.layers}"
    title = f"Transformer LM {args.layers}x(d{D} h4), T={SEQ}, batch {BATCH}"
    bench_train.MODELS[name] = (title, lambda: _lm(args.layers))
    spec = wafer.WaferSpec.mini(args.rows, args.cols)
    print(
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), wafer {spec.name}, adam, "
        f"median of {args.repeats} steps after {args.warmup} warm-up"
    )
    # areas by SRAM need: the early blocks stash the activations of every sample in flight
    pp = compiler.PlacementParams(area_rule="sram")
    r = bench_train.bench(name, spec, args.repeats, args.warmup, placement_params=pp)
    ratio = r["emu_ms"] / r["nat_ms"]
    print(
        f"{title}: {r['params']:,} params, {r['kernels']} kernels; emulated {r['emu_ms']:.2f} ms, native "
        f"{r['nat_ms']:.2f} ms; compile s (emu/nat) {r['compile_emu_s']:.2f} / {r['compile_nat_s']:.2f}; "
        f"param diff {r['param_diff']:.2g}"
    )
    print(f"emulated/native = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
