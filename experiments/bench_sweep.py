"""Benchmark: placements evaluated per second by the batched cost model, and through the emulator for scale.

The program is a 24-kernel MLP (784 -> 23 x Dense(1024, relu) -> Dense(10), batch 64) compiled onto WSE-2. Its
cost-model features are extracted once; then `compiler.analysis.sweep.placements_per_second` scores batches of
65,536 random placements (integer sides 1-64 cores, corners on the grid, arrays [kernels, points]) with
`evaluate_placements`: at temperature 0 with integer sides that is the side table (compiler/analysis/tabulated.py:
each kernel's figures tabulated by the schedule's own `kernel_figures` over the sides 1-64, then per placement the
gathers, the schedule's route terms and its pipeline, in chunks of 8,192), the same figures as
`jax.vmap(costmodel.predict)`. XLA compilation and the table are built in a first untimed call; the rate is the
median of the timed repeats, each ended when its results are on the host (samples/s, bottleneck, latency, cores and
peak SRAM of every placement). The table's build is timed apart and also charged to every batch ("cold": a batch
that needed a table of its own).

For scale, the emulator path: for a few random *legal* placements (random areas legalised by
`compiler.legalise`), `compiler.compile(..., placement=...)`, `exe.load(params)` and one `exe(state, x)`
call, blocked on; its rate is placements / total seconds (XLA compile of each placement's program included, as a
sweep through the emulator would pay it).

    python experiments/bench_sweep.py [--points 65536] [--chunk 8192] [--repeats 7] [--emulated 3]

The last line is `placements/s = N` (the batched cost model's rate, table built, an integer).
"""

from __future__ import annotations

import argparse
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import compiler
import wafer
from compiler import costmodel as cm
from compiler.analysis.search import placement_problem
from compiler.analysis.sweep import placements_per_second
from compiler.plan.legalise import legalise


class MLP(nn.Module):
    features: tuple = (1024,) * 23 + (10,)

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.Dense(f)(x)
            if i < len(self.features) - 1:
                x = nn.relu(x)
        return x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, default=65536, help="placements per timed batch (default 65536)")
    p.add_argument("--chunk", type=int, default=8192, help="placements per vmapped call (default 8192)")
    p.add_argument("--repeats", type=int, default=7, help="timed batches (default 7)")
    p.add_argument("--emulated", type=int, default=3, help="placements run through the emulator (default 3; 0: skip)")
    args = p.parse_args(argv)
    spec = wafer.WSE2
    model = MLP()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 784)), jnp.float32)

    t0 = time.perf_counter()
    exe = compiler.compile(model.apply, jax.eval_shape(model.init, jax.random.key(0), x), x, spec=spec)
    feats = cm.features(exe)
    t_build = time.perf_counter() - t0
    print(f"program: {feats.n} kernels on {spec.name}; compile + features {t_build:.2f} s")

    r = placements_per_second(feats, spec, points=args.points, chunk=args.chunk, repeats=args.repeats)
    print(
        f"cost model: {r['points']:,} placements per batch, chunks of {args.chunk:,}; first call (XLA compile, side "
        f"table) {r['compile_s']:.2f} s; median batch {r['median_s'] * 1e3:.1f} ms -> {r['placements_per_s']:,.0f} "
        f"placements/s"
    )
    print(
        f"side table (sides 1-64, {feats.n} kernels): built in {r['tabulate_s'] * 1e3:.1f} ms; charged to every "
        f"batch: {r['placements_per_s_cold']:,.0f} placements/s"
    )

    if args.emulated > 0:
        params = jax.jit(model.init)(jax.random.key(0), x)
        prob = placement_problem(exe)
        rng = np.random.default_rng(0)
        free = prob.usable - prob.least.sum()
        t0 = time.perf_counter()
        for _ in range(args.emulated):
            rects, _ = legalise(prob, prob.least + free * rng.dirichlet(np.ones(prob.n)))
            e = compiler.compile(model.apply, params, x, spec=spec, placement=rects)
            state = e.load(params)
            out, state = e(state, x)
            jax.block_until_ready((out, state))
        t_emu = time.perf_counter() - t0
        ratio = r["placements_per_s"] * t_emu / args.emulated
        print(
            f"emulator: {args.emulated} placements (compile, load, one forward call each) in {t_emu:.2f} s -> "
            f"{args.emulated / t_emu:.3f} placements/s; the cost model is {ratio:,.0f}x faster"
        )
    print(f"placements/s = {int(r['placements_per_s'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
