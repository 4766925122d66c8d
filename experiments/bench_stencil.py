"""Benchmark: the emulated 7-point stencil on the full WSE-2 grid against the same stencil in bare jnp.

Both sides run the same number of Jacobi steps per call on the same [757, 996, 32] float32 field: the emulated
side as `wafer.run` (lax.scan of supersteps: halo exchange, per-core update, counters charged once per call) on a
donated `WaferState`, the native side as `lax.fori_loop` of `experiments.stencil.native_step` (one zero pad and
six slices, what one would write in jnp) on a donated array. Both are compiled before timing (compile times are
reported apart), warmed up, then timed interleaved, each call ended by `block_until_ready`, and the medians are
compared. It also prints the emulation rate in core-cycles per wall second (every core of the grid times the
wafer cycles a step takes, over the emulated step's wall time), the unit of cycle-level many-core simulators.
The last line is `emulated/native = X.XX`.

    python experiments/bench_stencil.py [--repeats 9] [--steps 10] [--z 32] [--preset wse2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import stencil  # noqa: E402  (the experiment next to this script)

import wafer  # noqa: E402


def _timed(fn, x):
    t0 = time.perf_counter()
    y = jax.block_until_ready(fn(x))
    return y, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="emulated vs native 7-point stencil")
    p.add_argument("--preset", choices=("mini", *stencil.PRESETS), default="wse2")
    p.add_argument("--rows", type=int, default=64, help="core rows of the mini wafer")
    p.add_argument("--cols", type=int, default=64, help="core columns of the mini wafer")
    p.add_argument("--z", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="steps per timed call")
    p.add_argument("--repeats", type=int, default=9, help="timed calls of each (>= 7)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.1)
    args = p.parse_args(argv)
    if args.repeats < 7 or args.steps < 1:
        p.error("--repeats must be >= 7 and --steps >= 1")
    spec = wafer.WaferSpec.mini(args.rows, args.cols) if args.preset == "mini" else stencil.PRESETS[args.preset]

    u0 = stencil.initial_field(spec, args.z, seed=0)
    state = wafer.init(spec, words=args.z, value=u0)
    emulated, _ = stencil.make_run(spec, args.alpha, args.steps)
    native = jax.jit(lambda u: stencil.native_run(u, args.alpha, args.steps), donate_argnums=0)
    u = jnp.asarray(u0)

    t0 = time.perf_counter()
    emulated = emulated.lower(state).compile()
    t_compile_emu = time.perf_counter() - t0
    t0 = time.perf_counter()
    native = native.lower(u).compile()
    t_compile_nat = time.perf_counter() - t0

    for _ in range(args.warmup):
        state = jax.block_until_ready(emulated(state))
        u = jax.block_until_ready(native(u))
    t_emu, t_nat = [], []
    for i in range(args.repeats):
        # Alternate which goes first, so neither always runs right after the other.
        if i % 2:
            u, t = _timed(native, u)
            t_nat.append(t)
            state, t = _timed(emulated, state)
            t_emu.append(t)
        else:
            state, t = _timed(emulated, state)
            t_emu.append(t)
            u, t = _timed(native, u)
            t_nat.append(t)

    err = float(jnp.max(jnp.abs(state.read(stencil.ALLOCATION) - u)))
    emu = statistics.median(t_emu) / args.steps
    nat = statistics.median(t_nat) / args.steps
    # the wafer's clock advanced by every step run (warm-up included): cycles per step, times every core of the grid
    cycles_per_step = float(state.clock) / ((args.warmup + args.repeats) * args.steps)
    core_cycles = spec.rows * spec.cols * cycles_per_step / emu
    print(
        f"{spec.name}: {spec.rows} x {spec.cols} cores x Z = {args.z} ({spec.rows * spec.cols * args.z:,} points), "
        f"{args.steps} steps per call, median of {args.repeats} interleaved calls after {args.warmup} warm-up"
    )
    print(f"compile: emulated {t_compile_emu:.2f} s, native {t_compile_nat:.2f} s")
    print(f"emulated: {1e3 * emu:.2f} ms/step (min {1e3 * min(t_emu) / args.steps:.2f})")
    print(f"native:   {1e3 * nat:.2f} ms/step (min {1e3 * min(t_nat) / args.steps:.2f})")
    print(
        f"emulated core-cycles per wall second: {core_cycles:.3g} ({spec.rows * spec.cols:,} cores x "
        f"{cycles_per_step:,.0f} cycles per step in {1e3 * emu:.2f} ms)"
    )
    print(f"max |emulated - native| after {(args.warmup + args.repeats) * args.steps} steps: {err:.3g}")
    print(f"emulated/native = {emu / nat:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
