"""3D 7-point heat-diffusion stencil on the emulated wafer, checked against plain jnp.

The mapping is the one published wafer-scale stencil codes use (Rocki et al., "Fast stencil-code computation on
a wafer-scale processor", SC20): the X and Y axes of the domain lie on the core grid (one core per (x, y)), and
each core keeps its whole Z column in SRAM. One Jacobi step

    u' = u + alpha * (sum of the 6 neighbours - 6 u),   zero (Dirichlet) boundary,

is one superstep: every core exchanges its column with its four fabric neighbours (`wafer.halo_exchange`,
radius 1: Z words on every link), then runs the per-core update (`wafer.map_cores`), whose Z neighbours come from
its own column. The update is written as `c0 * u + alpha * s` with `c0 = 1 - 6 alpha` and `s` the neighbour sum:
5 adds, one multiply and one FMAC, the usual 8 FLOPs per point. The two shifts of the column that give each
point its Z neighbours are charged by the cost model as ALU moves (wafer/kernel.py charges `pad`), so the kernel's
counted operations are 10 per point; the hardware reads them with offset descriptors, so this is conservative.
Shifting with two pads, rather than one padded copy and two slices, also lets XLA fuse the whole step into one
loop: experiments/bench_stencil.py measured 1.05-1.16x the native step on the full WSE-2 grid, against 1.7-1.8x.
`wafer.run` scans the steps and charges the wafer's counters once.

    python experiments/stencil.py                      # 64 x 64 mini wafer, Z = 32, 20 steps
    python experiments/stencil.py --preset wse2        # the full 757 x 996 WSE-2 fabric
    python experiments/stencil.py --rows 16 --cols 16 --z 8 --steps 5 --no-overlap

The script exits non-zero if the emulated field differs from the plain-jnp one by more than 1e-5 of max |u|.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import wafer

PRESETS = {"wse1": wafer.WSE1, "wse2": wafer.WSE2, "wse3": wafer.WSE3}
FLOPS_PER_POINT = 8  # 5 adds for the neighbour sum, alpha * sum, then one FMAC c0 * u + (...)
RTOL = 1e-5  # float32, relative to max |u| (summation order may differ; here it does not)
ALLOCATION = "data"  # the name wafer.init gives its whole-grid allocation


def column_update(u, n, s, w, e, *, alpha):
    """One core's Jacobi update of its Z column.

    Args:
      u: [Z] this core's column; n, s, w, e: [Z] the columns of its north, south, west and east neighbours.
      alpha: diffusion number (stable for alpha <= 1/6).
    Returns:
      [Z] the new column. Z neighbours come from the core's own column, zero beyond its ends.
    """
    zero = jnp.zeros((), u.dtype)
    below = jax.lax.pad(u, zero, [(1, -1, 0)])  # below[k] = u[k - 1], 0 at k = 0
    above = jax.lax.pad(u, zero, [(-1, 1, 0)])  # above[k] = u[k + 1], 0 at k = Z - 1
    total = n + s + w + e + below + above
    return (1.0 - 6.0 * alpha) * u + alpha * total


def make_step(spec: wafer.WaferSpec, alpha: float, name: str = ALLOCATION):
    """A superstep `step(state) -> (state, wafer.Superstep)` of the stencil on allocation `name` [rows, cols, Z].

    Args:
      spec: the wafer (only its shape matters here; costs are evaluated from the returned record).
      alpha: diffusion number.
      name: the SRAM allocation holding the field, one Z column per core.
    """
    del spec  # the step is shape-polymorphic; kept in the signature so callers build steps per wafer

    def step(state):
        u = state.read(name)
        halo, traffic = wafer.halo_exchange(u, 1)
        new, kernel_cost = wafer.map_cores(
            lambda *cols: column_update(*cols, alpha=alpha), u, halo["N"], halo["S"], halo["W"], halo["E"]
        )
        return state.write(name, new), wafer.superstep(kernel_cost, traffic)

    return step


def native_step(u, alpha: float):
    """The same Jacobi step in plain jnp on an [X, Y, Z] array (the reference, and the benchmark baseline)."""
    p = jnp.pad(u, 1)
    total = (
        p[:-2, 1:-1, 1:-1]
        + p[2:, 1:-1, 1:-1]
        + p[1:-1, :-2, 1:-1]
        + p[1:-1, 2:, 1:-1]
        + p[1:-1, 1:-1, :-2]
        + p[1:-1, 1:-1, 2:]
    )
    return (1.0 - 6.0 * alpha) * u + alpha * total


def native_run(u, alpha: float, steps: int):
    """`steps` native steps with `lax.fori_loop`."""
    return jax.lax.fori_loop(0, steps, lambda _, v: native_step(v, alpha), u)


def make_run(spec: wafer.WaferSpec, alpha: float, steps: int):
    """(jitted `run(state) -> state` of `steps` supersteps with the state donated, `record()` of one step).

    `record()` returns the step's `wafer.Superstep` once `run` has been traced (it depends on shapes only).
    """
    step = make_step(spec, alpha)
    records = []

    def run(state):
        state, record = wafer.run(state, spec, step, steps)
        records.append(record)
        return state

    return jax.jit(run, donate_argnums=0), lambda: records[-1]


def initial_field(spec: wafer.WaferSpec, z: int, seed: int) -> np.ndarray:
    """A random field in [0, 1) of shape [rows, cols, z], float32, on the host."""
    key = jax.random.key(seed)
    return np.asarray(jax.random.uniform(key, (spec.rows, spec.cols, z), jnp.float32))


def run_experiment(spec: wafer.WaferSpec, z: int = 32, steps: int = 20, seed: int = 0, *, alpha: float = 0.1) -> dict:
    """Run the stencil on the emulated wafer and natively; return the figures of the report.

    Args:
      spec: the wafer; the domain is spec.rows x spec.cols x z.
      z: points per core column (words per core).
      steps: Jacobi steps.
      seed: seed of the random initial field.
      alpha: diffusion number.
    Returns:
      A JSON-serialisable dict (see `format_report` for the fields).
    """
    if z < 1 or steps < 1:
        raise ValueError(f"z and steps must be >= 1, got z={z}, steps={steps}")
    u0 = initial_field(spec, z, seed)

    t0 = time.perf_counter()
    state = wafer.init(spec, words=z, value=u0)  # raises SramCapacityError if Z columns do not fit
    run, record_of = make_run(spec, alpha, steps)
    emulated = run.lower(state).compile()
    t_compile = time.perf_counter() - t0
    native = jax.jit(lambda u: native_run(u, alpha, steps), donate_argnums=0).lower(jnp.asarray(u0)).compile()
    record = record_of()

    # One warm-up call each (first touches of fresh buffers are slow), then one timed call each from u0.
    jax.block_until_ready((emulated(wafer.init(spec, words=z, value=u0)), native(jnp.asarray(u0))))
    u = jnp.asarray(u0)
    t0 = time.perf_counter()
    state = jax.block_until_ready(emulated(state))
    t_emulated = time.perf_counter() - t0
    t0 = time.perf_counter()
    expected = jax.block_until_ready(native(u))
    t_native = time.perf_counter() - t0

    got = np.asarray(state.read(ALLOCATION))
    want = np.asarray(expected)
    max_err = float(np.max(np.abs(got - want)))
    scale = float(np.max(np.abs(want)))

    alloc = state.memory[ALLOCATION]
    compute = float(record.compute_cycles(spec))
    comm = float(record.comm_cycles(spec))
    cycles = float(record.cycles(spec))
    seconds = cycles / float(spec.clock_hz)
    points = spec.rows * spec.cols * z
    analytic = float(FLOPS_PER_POINT * points)
    peak = float(spec.peak_flops("fp32"))
    link_words = record.traffic.link_words(spec.rows, spec.cols)
    return {
        "spec": spec.name,
        "rows": spec.rows,
        "cols": spec.cols,
        "z": z,
        "steps": steps,
        "alpha": alpha,
        "overlap": spec.overlap,
        "words_per_core": alloc.words,
        "sram_bytes_per_core": alloc.nbytes,
        "sram_capacity_bytes": spec.sram_bytes_per_core,
        "sram_occupancy": alloc.nbytes / spec.sram_bytes_per_core,
        "compute_cycles": compute,
        "comm_cycles": comm,
        "cycles": cycles,
        "us_per_step": seconds * 1e6,
        "clock_hz": float(spec.clock_hz),
        "flops_counted": float(record.flops),
        "flops_analytic": analytic,
        "flops_per_s": analytic / seconds,
        "peak_flops_fp32": peak,
        "peak_fraction": analytic / seconds / peak,
        "busiest_link_words": float(link_words.max()),
        "total_link_words": float(record.traffic.words),
        "wafer_clock": float(state.clock),
        "wafer_steps": int(state.steps),
        "max_abs_err": max_err,
        "max_abs_u": scale,
        "rel_err": max_err / scale if scale else max_err,
        "ok": max_err <= RTOL * scale,
        "compile_s": t_compile,
        "emulated_s": t_emulated,
        "native_s": t_native,
    }


def _si(x: float, unit: str) -> str:
    for div, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def format_report(r: dict) -> str:
    """The report as readable lines."""
    mode = "overlapped" if r["overlap"] else "serialised"
    lines = [
        f"7-point stencil on {r['spec']}: {r['rows']} x {r['cols']} cores, Z = {r['z']}, {r['steps']} steps, "
        f"alpha = {r['alpha']:g}",
        f"  SRAM          {r['words_per_core']} words/core = {r['sram_bytes_per_core']} B of "
        f"{r['sram_capacity_bytes']} B ({100 * r['sram_occupancy']:.2f}% occupancy)",
        f"  cycles/step   compute {r['compute_cycles']:.1f}, comm {r['comm_cycles']:.1f}, "
        f"total {r['cycles']:.1f} ({mode})",
        f"  time/step     {r['us_per_step']:.4g} us at {r['clock_hz'] / 1e6:.0f} MHz",
        f"  FLOPs/step    {r['flops_analytic']:.4g} analytic ({FLOPS_PER_POINT}/point); "
        f"{r['flops_counted']:.4g} counted (+ 2 Z-shift moves/point)",
        f"  achieved      {_si(r['flops_per_s'], 'FLOP/s')} = {100 * r['peak_fraction']:.1f}% of fp32 peak "
        f"{_si(r['peak_flops_fp32'], 'FLOP/s')}",
        f"  busiest link  {r['busiest_link_words']:.0f} words/step "
        f"({r['total_link_words']:.4g} words/step over all links)",
        f"  wafer clock   {r['wafer_clock']:.0f} cycles after {r['wafer_steps']} supersteps",
        f"  check         max |emulated - jnp| = {r['max_abs_err']:.3g} (max |u| = {r['max_abs_u']:.3g}, "
        f"tolerance {RTOL:g} relative): {'OK' if r['ok'] else 'FAILED'}",
        f"  wall time     emulated {1e3 * r['emulated_s'] / r['steps']:.3g} ms/step "
        f"(compile {r['compile_s']:.2f} s), native jnp {1e3 * r['native_s'] / r['steps']:.3g} ms/step "
        f"(one call each)",
    ]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=("mini", *PRESETS), default="mini", help="wafer (default: mini)")
    p.add_argument("--rows", type=int, default=64, help="core rows of the mini wafer (default 64)")
    p.add_argument("--cols", type=int, default=64, help="core columns of the mini wafer (default 64)")
    p.add_argument("--z", type=int, default=32, help="points per core column, Z (default 32)")
    p.add_argument("--steps", type=int, default=20, help="Jacobi steps (default 20)")
    p.add_argument("--alpha", type=float, default=0.1, help="diffusion number, <= 1/6 for stability (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initial field (default 0)")
    p.add_argument(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="overlap compute and communication in a superstep (default: the spec's, on)",
    )
    return p.parse_args(argv)


def spec_from_args(args: argparse.Namespace) -> wafer.WaferSpec:
    spec = wafer.WaferSpec.mini(args.rows, args.cols) if args.preset == "mini" else PRESETS[args.preset]
    if args.overlap is not None:
        spec = spec.with_(overlap=args.overlap)
    return spec


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        spec = spec_from_args(args)
        report = run_experiment(spec, args.z, args.steps, args.seed, alpha=args.alpha)
    except (ValueError, wafer.SramCapacityError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
