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
FLOPS_PER_POINT = 8  # radius 1: 5 adds for the neighbour sum, alpha * sum, then one FMAC c0 * u + (...)
RTOL = 1e-5  # float32, relative to max |u| (summation order may differ; here it does not)
ALLOCATION = "data"  # the name wafer.init gives its whole-grid allocation


def flops_per_point(radius: int = 1) -> int:
    """FLOPs of one point's update: 6r - 1 adds for its 6r neighbours, alpha x the sum, one FMAC (two FLOPs)."""
    return 6 * radius + 2


def column_update(u, n, s, w, e, *, alpha, radius: int = 1):
    """One core's Jacobi update of its Z column with a star stencil of radius r ((6r + 1) points).

    Args:
      u: [Z] this core's column; n, s, w, e: the columns of its north, south, west and east neighbours, [Z] for
        radius 1, [r, Z] (1 .. r hops away) for larger radii.
      alpha: diffusion number (stable for alpha <= 1 / (6 r)).
    Returns:
      [Z] the new column, u + alpha (sum of the 6r neighbours - 6r u), written c0 u + alpha sum. Z neighbours come
      from the core's own column, zero beyond its ends.
    """
    zero = jnp.zeros((), u.dtype)
    total = None
    for j in range(1, radius + 1):
        below = jax.lax.pad(u, zero, [(j, -j, 0)])  # below[k] = u[k - j], 0 for k < j
        above = jax.lax.pad(u, zero, [(-j, j, 0)])  # above[k] = u[k + j], 0 for k >= Z - j
        side = [v if radius == 1 else v[j - 1] for v in (n, s, w, e)]
        part = side[0] + side[1] + side[2] + side[3] + below + above
        total = part if total is None else total + part
    return (1.0 - 6.0 * radius * alpha) * u + alpha * total


def make_step(spec: wafer.WaferSpec, alpha: float, name: str = ALLOCATION, radius: int = 1):
    """A superstep `step(state) -> (state, wafer.Superstep)` of the stencil on allocation `name` [rows, cols, Z].

    Args:
      spec: the wafer (only its shape matters here; costs are evaluated from the returned record).
      alpha: diffusion number.
      name: the SRAM allocation holding the field, one Z column per core.
      radius: the stencil's radius r ((6r + 1) points: 7 for r = 1, 25 for r = 4).
    """
    del spec  # the step is shape-polymorphic; kept in the signature so callers build steps per wafer

    def step(state):
        u = state.read(name)
        halo, traffic = wafer.halo_exchange(u, radius)
        # radius > 1 stacks the hops first, [r, h, w, Z]: each core takes its [r, Z]
        sides = [halo[k] if radius == 1 else jnp.moveaxis(halo[k], 0, 2) for k in ("N", "S", "W", "E")]
        new, kernel_cost = wafer.map_cores(lambda *cols: column_update(*cols, alpha=alpha, radius=radius), u, *sides)
        return state.write(name, new), wafer.superstep(kernel_cost, traffic)

    return step


def native_step(u, alpha: float, radius: int = 1):
    """The same Jacobi step in plain jnp on an [X, Y, Z] array (the reference, and the benchmark baseline)."""
    r = radius
    p = jnp.pad(u, r)
    X, Y, Z = u.shape
    total = None
    for j in range(1, r + 1):
        part = (
            p[r - j : r - j + X, r : r + Y, r : r + Z]
            + p[r + j : r + j + X, r : r + Y, r : r + Z]
            + p[r : r + X, r - j : r - j + Y, r : r + Z]
            + p[r : r + X, r + j : r + j + Y, r : r + Z]
            + p[r : r + X, r : r + Y, r - j : r - j + Z]
            + p[r : r + X, r : r + Y, r + j : r + j + Z]
        )
        total = part if total is None else total + part
    return (1.0 - 6.0 * r * alpha) * u + alpha * total


def native_run(u, alpha: float, steps: int, radius: int = 1):
    """`steps` native steps with `lax.fori_loop`."""
    return jax.lax.fori_loop(0, steps, lambda _, v: native_step(v, alpha, radius), u)


def make_run(spec: wafer.WaferSpec, alpha: float, steps: int, radius: int = 1):
    """(jitted `run(state) -> state` of `steps` supersteps with the state donated, `record()` of one step).

    `record()` returns the step's `wafer.Superstep` once `run` has been traced (it depends on shapes only).
    """
    step = make_step(spec, alpha, radius=radius)
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


def run_experiment(
    spec: wafer.WaferSpec, z: int = 32, steps: int = 20, seed: int = 0, *, alpha: float = 0.1, radius: int = 1
) -> dict:
    """Run the stencil on the emulated wafer and natively; return the figures of the report.

    Args:
      spec: the wafer; the domain is spec.rows x spec.cols x z.
      z: points per core column (words per core).
      steps: Jacobi steps.
      seed: seed of the random initial field.
      alpha: diffusion number.
      radius: the stencil's radius ((6 radius + 1) points).
    Returns:
      A JSON-serialisable dict (see `format_report` for the fields).
    """
    if z < 1 or steps < 1:
        raise ValueError(f"z and steps must be >= 1, got z={z}, steps={steps}")
    if radius < 1 or radius >= z:
        raise ValueError(f"radius must be >= 1 and below z (a core's column), got radius={radius}, z={z}")
    u0 = initial_field(spec, z, seed)

    t0 = time.perf_counter()
    state = wafer.init(spec, words=z, value=u0)  # raises SramCapacityError if Z columns do not fit
    run, record_of = make_run(spec, alpha, steps, radius)
    emulated = run.lower(state).compile()
    t_compile = time.perf_counter() - t0
    native = jax.jit(lambda u: native_run(u, alpha, steps, radius), donate_argnums=0)
    native = native.lower(jnp.asarray(u0)).compile()
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
    analytic = float(flops_per_point(radius) * points)
    peak = float(spec.peak_flops("fp32"))
    link_words = record.traffic.link_words(spec.rows, spec.cols)
    return {
        "spec": spec.name,
        "rows": spec.rows,
        "cols": spec.cols,
        "z": z,
        "steps": steps,
        "alpha": alpha,
        "radius": radius,
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
        f"{6 * r['radius'] + 1}-point stencil on {r['spec']}: {r['rows']} x {r['cols']} cores, Z = {r['z']}, "
        f"{r['steps']} steps, "
        f"alpha = {r['alpha']:g}",
        f"  SRAM          {r['words_per_core']} words/core = {r['sram_bytes_per_core']} B of "
        f"{r['sram_capacity_bytes']} B ({100 * r['sram_occupancy']:.2f}% occupancy)",
        f"  cycles/step   compute {r['compute_cycles']:.1f}, comm {r['comm_cycles']:.1f}, "
        f"total {r['cycles']:.1f} ({mode})",
        f"  time/step     {r['us_per_step']:.4g} us at {r['clock_hz'] / 1e6:.0f} MHz",
        f"  FLOPs/step    {r['flops_analytic']:.4g} analytic ({flops_per_point(r['radius'])}/point); "
        f"{r['flops_counted']:.4g} counted (+ {2 * r['radius']} Z-shift moves/point)",
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
    p.add_argument("--alpha", type=float, default=0.1, help="diffusion number, <= 1/(6 r) for stability (default 0.1)")
    p.add_argument("--radius", type=int, default=1, help="stencil radius r: 6r + 1 points (default 1; 4: 25-point)")
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
        report = run_experiment(spec, args.z, args.steps, args.seed, alpha=args.alpha, radius=args.radius)
    except (ValueError, wafer.SramCapacityError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
