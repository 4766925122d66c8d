"""Benchmark: the emulated forward pass of compiled Flax models against the same models run natively.

For each model (an MLP 784-512-512-10 at batch 256, a LeNet-style CNN on 28x28x1 at batch 128, a Transformer
encoder block with seq 64, d_model 128, 4 heads at batch 16) the program is compiled onto a mini wafer
(`compiler.compile`, layer-pipelined), its weights loaded into SRAM, and the emulated forward `exe(state, x)`
(jitted, the state donated and fed back in, fast path: weights read from their SRAM allocations every call,
stored blocked so with no copy, counters charged) is timed against the native `jax.jit(model.apply)(params, x)`
on the same batch in the same process.
Both are compiled before timing (compile times reported apart), warmed up, then timed interleaved (alternating
which goes first), each call ended by `block_until_ready`; medians are compared. The last line is
`emulated/native = X.XX`, the worst ratio over the models.

    python experiments/bench_forward.py [--repeats 30] [--warmup 3] [--rows 64 --cols 64] [--models mlp,cnn,encoder]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import compiler
import wafer
from compiler.examples import MLP, EncoderBlock, LeNet

MODELS = {
    "mlp": (lambda: MLP((512, 512, 10)), (256, 784)),
    "cnn": (lambda: LeNet(), (128, 28, 28, 1)),
    # attention with [d, d] Dense projections, which run per core (compiler.examples.EncoderBlock)
    "encoder": (lambda: EncoderBlock(), (16, 64, 128)),
}


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def bench(name: str, spec, repeats: int, warmup: int) -> dict:
    make, shape = MODELS[name]
    model = make()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), x)

    t0 = time.perf_counter()
    exe = compiler.compile(model.apply, params, x, spec=spec)
    t_build = time.perf_counter() - t0
    state = exe.load(params)
    native = jax.jit(model.apply)

    t0 = time.perf_counter()
    out, state = jax.block_until_ready(exe(state, x))
    t_compile_emu = time.perf_counter() - t0
    t0 = time.perf_counter()
    want = jax.block_until_ready(native(params, x))
    t_compile_nat = time.perf_counter() - t0
    err = float(jnp.max(jnp.abs(out - want)) / jnp.maximum(1.0, jnp.max(jnp.abs(want))))

    for _ in range(warmup):
        out, state = jax.block_until_ready(exe(state, x))
        jax.block_until_ready(native(params, x))
    t_emu, t_nat = [], []
    for i in range(repeats):
        # alternate which goes first, so neither always runs right after the other
        if i % 2:
            _, t = _timed(native, params, x)
            t_nat.append(t)
            (out, state), t = _timed(exe, state, x)
            t_emu.append(t)
        else:
            (out, state), t = _timed(exe, state, x)
            t_emu.append(t)
            _, t = _timed(native, params, x)
            t_nat.append(t)
    emu, nat = statistics.median(t_emu), statistics.median(t_nat)
    return {
        "name": name,
        "batch": shape[0],
        "kernels": len(exe.graph.kernels),
        "cores": exe.report.active_cores,
        "build": t_build,
        "compile_emu": t_compile_emu,
        "compile_nat": t_compile_nat,
        "emu": emu,
        "nat": nat,
        "ratio": emu / nat,
        "err": err,
        "steps": int(state.steps),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="emulated vs native forward pass of compiled Flax models")
    p.add_argument("--rows", type=int, default=64, help="core rows of the mini wafer")
    p.add_argument("--cols", type=int, default=64, help="core columns of the mini wafer")
    p.add_argument("--repeats", type=int, default=30, help="timed calls of each (>= 20)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    args = p.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    if args.repeats < 20:
        p.error("--repeats must be >= 20")
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        p.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    spec = wafer.WaferSpec.mini(args.rows, args.cols)

    rows = [bench(n, spec, args.repeats, args.warmup) for n in names]
    print(
        f"{spec.name}, fast path, state donated; median of {args.repeats} interleaved calls after {args.warmup} "
        f"warm-up (jax {jax.__version__}, {jax.default_backend()})"
    )
    head = (
        f"{'model':<9}{'batch':>6}{'kernels':>8}{'cores':>7}{'build s':>9}{'jit emu s':>10}{'jit nat s':>10}"
        f"{'emulated ms':>13}{'native ms':>11}{'ratio':>7}{'rel err':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['name']:<9}{r['batch']:>6}{r['kernels']:>8}{r['cores']:>7}{r['build']:>9.2f}{r['compile_emu']:>10.2f}"
            f"{r['compile_nat']:>10.2f}{1e3 * r['emu']:>13.3f}{1e3 * r['nat']:>11.3f}{r['ratio']:>7.2f}"
            f"{r['err']:>10.2g}"
        )
    print(f"emulated/native = {max(r['ratio'] for r in rows):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
