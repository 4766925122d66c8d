"""Sweep placement knobs x hardware figures x model sizes with the batched cost model, and plot the results.

`compiler.sweep` evaluates every combination (compiler.place on the host per placement point, the hardware
leaves vmapped, static figures such as SRAM per core in an outer loop) and returns one DataFrame row per point;
this script saves it as CSV, draws throughput against each swept parameter, the Pareto fronts of throughput
against cores used and against peak SRAM per core, and maps of the best and worst placements
(`compiler.sweep_plots`), then asks `compiler.what_if` what would most speed up the middle model size.

Models (sizes are the swept widths):
  mlp          784 -> width -> width -> width -> 10 (relu), batch 64; sizes = width
  cnn          2 x (conv3x3 c) - pool - 2 x (conv3x3 2c) - pool - dense 256 - dense 10 on 32x32x3, batch 64; sizes = c
  transformer  2 encoder blocks, seq 128, 4 heads, MLP 4 x d_model, batch 8; sizes = d_model

    python experiments/sweep.py                                  # mlp on WSE-2, the default grid, out/sweep/
    python experiments/sweep.py --model transformer --sizes 128,256 --out out/sweep_tf
    python experiments/sweep.py --quick                          # a small grid (smoke test)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import pandas as pd

import compiler
import wafer
from compiler import sweep_plots
from compiler.analysis.sweep import sweep, what_if
from compiler.examples import MLP, VGG, Transformer


def make_model(name: str):
    """`model(size) -> (fn, params, x)` with ShapeDtypeStruct params, and the default sizes."""

    def build(module, shape):
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        return module.apply, jax.eval_shape(module.init, jax.random.key(0), x), x

    if name == "mlp":
        return (lambda w: build(MLP((w, w, w, 10)), (64, 784))), [512, 1024, 2048]
    if name == "cnn":
        return (lambda c: build(VGG(c), (64, 32, 32, 3))), [16, 32, 64]
    if name == "transformer":
        return (lambda d: build(Transformer(), (8, 128, d))), [128, 256]
    raise ValueError(f"unknown model {name!r}; choose mlp, cnn or transformer")


def grids(quick: bool):
    if quick:
        placement = {"area_exponent": [0.5, 1.0], "fraction": [0.5, 1.0]}
        hardware = {
            "clock_hz": [0.85e9, 1.1e9],
            "hop_latency_cycles": [1.0, 2.0],
            "sram_bytes_per_core": [32768, 49152],
        }
    else:
        placement = {"area_exponent": [0.5, 0.75, 1.0], "fraction": [0.5, 0.75, 1.0], "order": ["serpentine", "rows"]}
        hardware = {
            "clock_hz": [0.85e9, 1.1e9],
            "link_bits_per_cycle": [16.0, 32.0, 64.0],
            "hop_latency_cycles": [1.0, 2.0],
            "sram_bytes_per_core": [32768, 49152],
        }
    return placement, hardware


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlp", choices=("mlp", "cnn", "transformer"))
    p.add_argument("--sizes", default=None, help="comma-separated sizes (default per model)")
    p.add_argument("--spec", default="wse2", choices=("wse2", "wse3", "mini"), help="base wafer (mini: 64 x 64)")
    p.add_argument("--out", default="out/sweep", help="directory for the CSV and the figures (default out/sweep)")
    p.add_argument("--quick", action="store_true", help="a small grid")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    spec = {"wse2": wafer.WSE2, "wse3": wafer.WSE3, "mini": wafer.WaferSpec.mini(64, 64)}[args.spec]
    model, sizes = make_model(args.model)
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    placement, hardware = grids(args.quick)
    os.makedirs(args.out, exist_ok=True)
    csv = os.path.join(args.out, f"{args.model}.csv")

    t0 = time.perf_counter()
    df = sweep(
        model, spec, sizes=sizes, placement=placement, hardware=hardware, progress=not args.no_progress, path=csv
    )
    elapsed = time.perf_counter() - t0
    figs = sweep_plots.sweep_figures(df, spec, args.out, prefix=args.model)

    ok = df[df["feasible"]]
    pd.set_option("display.width", 160)
    print(f"\n{len(df):,} points ({len(ok):,} feasible) of {args.model} on {spec.name} in {elapsed:.1f} s -> {csv}")
    print("\nbest points:")
    cols = df.attrs["swept"] + ["samples_per_s", "cores", "peak_sram_bytes", "latency_s"]
    print(ok.sort_values("samples_per_s", ascending=False)[cols].head(8).to_string(index=False))
    print("\nbest predicted samples/s per value of each swept parameter:")
    for param in df.attrs["swept"]:
        best = ok.groupby(param)["samples_per_s"].max()
        print(f"  {param:22s} " + "  ".join(f"{v}: {t:,.0f}" for v, t in best.items()))
    mid = sizes[len(sizes) // 2]
    exe = compiler.compile(*model(mid), spec=spec)
    print(f"\nwhat would most speed up {args.model} size {mid} (compiler's default placement on {spec.name})?")
    wi = what_if(exe)
    print(wi[["parameter", "value", "elasticity", "direction", "method"]].head(8).to_string(index=False))
    print(f"\nfigures: {len(figs)} in {args.out}/")
    top = ok.loc[ok["samples_per_s"].idxmax()]
    print(f"best: {top['samples_per_s']:,.0f} samples/s at " + ", ".join(f"{c}={top[c]}" for c in df.attrs["swept"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
