"""The calibration cases: what was published, and how the emulator predicts it.

Every predicted figure comes from the emulator's own cost records: the `wafer.Superstep` records that the
programs' step functions return, as `wafer.step` charges them, evaluated with `record.cycles(spec)`. When the cost
rules change, the predictions change with them; nothing here is fitted.

Execution modes (`execute`): "none" takes every record from `jax.eval_shape` of the step functions (cycles are
fixed by shapes, so no data needs to move); "small" also runs the programs on data at the small sizes and checks
their numerics against plain JAX (FFT 32^3 against jnp.fft.fftn, BiCGStab on an 8 x 8 x 16 mesh against a plain-jnp
BiCGStab, the 64-core collectives against jnp.sum), raising `ValidationError` when they disagree; "all" runs data
at every size where that is feasible on a host (the FFT up to 512^3, which needs a few GB; BiCGStab on a
32 x 32 x 128 mesh: the paper's 600 x 595 x 1536 mesh is always taken from shapes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import wafer
from wafer.errors import WaferError
from wafer.validation import bicgstab, collectives, fft

TOLERANCE = 0.10  # relative; the Fidelity issue's target for every case
EXECUTE = ("small", "all", "none")
FFT_RTOL = 1e-5  # complex64: max |error| / max |X| of a 3-pass radix-2 FFT (measured ~2e-7 at n = 32)
# iterates vs the reference, relative to max |x|: float32 differs only in the dots' summation order (measured ~1e-7);
# in float16 a scalar a few fp32 ulps apart can flip single fp16 roundings: about an fp16 ulp (2^-10) per iteration
BICGSTAB_RTOL = {"float32": 1e-5, "float16": 1e-2}
COLLECTIVE_RTOL = 1e-5  # float32 sums of up to 512 terms, in a different order


class ValidationError(WaferError):
    """A calibration program computed the wrong numbers (its cost figures would then mean nothing)."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One calibration case.

    Attributes:
      name: unique id, e.g. "fft3d-n512".
      size: the problem size, in words.
      published: the published figure; unit: its unit.
      source: where it was published (and, for model references, what was assumed).
      how: how the predicted figure is obtained from the emulator's records.
      predict: `predict(run_data: bool) -> float`, the predicted figure; with run_data it also runs the program
        on data and checks its numerics.
      small: whether execute="small" runs data for this case.
      tolerance: relative error allowed.
    """

    name: str
    size: str
    published: float
    unit: str
    source: str
    how: str
    predict: Callable[[bool], float]
    small: bool = False
    tolerance: float = TOLERANCE


# ---- FFT -----------------------------------------------------------------------------------------------------------


def _fft_predict(n: int) -> Callable[[bool], float]:
    def predict(run_data: bool) -> float:
        spec = wafer.WSE2
        if not run_data:
            return fft.predicted_cycles(spec, n)
        k1, k2 = jax.random.split(jax.random.key(n))
        x = (jax.random.normal(k1, (n, n, n)) + 1j * jax.random.normal(k2, (n, n, n))).astype(jnp.complex64)
        y, _, recs = fft.run(spec, x)
        ref = jnp.fft.fftn(x)
        err = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
        if not err <= FFT_RTOL:
            raise ValidationError(f"fft3d n={n}: emulated FFT differs from jnp.fft.fftn by {err:.2e} > {FFT_RTOL}")
        return fft.predicted_cycles(spec, n, recs=recs)

    return predict


def _fft_cases():
    return [
        Case(
            name=f"fft3d-n{n}",
            size=f"{n}^3 complex fp32 on {n}x{n} cores (CS-2)",
            published=float(cycles),
            unit="cycles",
            source=fft.SOURCE,
            how="sum over the 5 supersteps (3 pencil FFTs, 2 relay all-to-alls) of record.cycles(WSE2)",
            predict=_fft_predict(n),
            small=n <= 32,
        )
        for n, cycles in fft.PUBLISHED_CYCLES.items()
    ]


# ---- BiCGStab ------------------------------------------------------------------------------------------------------


def _bicgstab_check(mesh, spec, iterations=3):
    """Run the solver on a small mesh in both precisions against the plain-jnp reference (ValidationError when they
    differ); return the float16 run's records, checked equal to those `jax.eval_shape` gives."""
    recs = None
    for dtype, rtol in BICGSTAB_RTOL.items():
        coef, b = bicgstab.problem(jax.random.key(1), mesh, dtype)
        xs, _, recs_d = bicgstab.run(spec, coef, b, iterations, dtype=dtype)
        ref = bicgstab.reference(coef, b, iterations).astype(jnp.float32)
        err = float(jnp.max(jnp.abs(xs.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
        if not err <= rtol:
            raise ValidationError(f"bicgstab {mesh} {dtype}: iterates differ from the reference by {err:.2e} > {rtol}")
        if dtype == "float16":
            recs = recs_d
    # the records of a run on data are the ones eval_shape gives: cycles are fixed by shapes
    shaped = bicgstab.records(spec, mesh)
    for name, rec in recs.items():
        if float(rec.cycles(spec)) != float(shaped[name].cycles(spec)):
            raise ValidationError(f"bicgstab {mesh}: superstep {name!r} costs differently with and without data")
    return recs


def _bicgstab_predict(execute_all: bool) -> Callable[[bool], float]:
    def predict(run_data: bool) -> float:
        if run_data:
            mesh = (32, 32, 128) if execute_all else (8, 8, 16)
            _bicgstab_check(mesh, wafer.WaferSpec.mini(*mesh[:2]))
        return bicgstab.predicted_pflops(wafer.WSE1, bicgstab.PAPER_MESH)

    return predict


def _bicgstab_cases(execute_all: bool):
    x, y, z = bicgstab.PAPER_MESH
    return [
        Case(
            name="bicgstab-cs1",
            size=f"{x}x{y}x{z} mesh on {x}x{y} cores (CS-1), fp16 with fp32 dots",
            published=bicgstab.PUBLISHED_PFLOPS,
            unit="PFLOP/s",
            source=bicgstab.SOURCE,
            how=f"{bicgstab.FLOPS_PER_POINT} FLOPs/point x mesh / (sum over one iteration's 6 supersteps of "
            "record.cycles(WSE1) / clock)",
            predict=_bicgstab_predict(execute_all),
            small=True,
        )
    ]


# ---- collectives ---------------------------------------------------------------------------------------------------


def _collective_predict(pattern, n, b, kind):
    def predict(run_data: bool) -> float:
        if run_data:
            err = collectives.check_numerics(pattern, n, b, kind=kind)
            if not err <= COLLECTIVE_RTOL:
                raise ValidationError(f"{kind} {pattern} n={n} b={b}: differs from jnp.sum by {err:.2e}")
        return collectives.emulated_cycles(wafer.WSE2, pattern, n, b, kind=kind)

    return predict


def _collective_cases():
    out = []
    for kind, sizes in (("reduce", collectives.REDUCE_SIZES), ("allreduce", collectives.ALLREDUCE_SIZES)):
        for pattern in collectives.PATTERNS:
            for n, b in sizes:
                out.append(
                    Case(
                        name=f"{kind}-{pattern}-n{n}-b{b}",
                        size=f"{n} cores in a row, {b} fp32 words each (CS-2)",
                        published=collectives.model_cycles(pattern, n, b, kind=kind),
                        unit="cycles (model)",
                        source=collectives.SOURCE + f"; T_R = {collectives.T_R_ASSUMED:g} ASSUMED",
                        how=f"wafer.{kind}(pattern={pattern!r}) traffic + its adds in one superstep: "
                        "record.cycles(WSE2)",
                        predict=_collective_predict(pattern, n, b, kind),
                        small=n <= 64,
                    )
                )
    return out


def all_cases(*, execute_all: bool = False) -> list[Case]:
    """Every calibration case, in table order."""
    return _fft_cases() + _bicgstab_cases(execute_all) + _collective_cases()


def select(cases, names):
    """The cases whose names equal or start with one of `names` (all when names is empty or None)."""
    if not names:
        return list(cases)
    wanted = set()
    for k in names:  # an exact name selects that case; otherwise the name is a prefix
        exact = [c.name for c in cases if c.name == k]
        wanted.update(exact or [c.name for c in cases if c.name.startswith(k)])
    chosen = [c for c in cases if c.name in wanted]
    unknown = [k for k in names if not any(c.name.startswith(k) for c in cases)]
    if unknown:
        raise ValueError(
            f"unknown validation case(s) {unknown}; the cases are {[c.name for c in cases]} "
            "(a prefix such as 'fft3d' or 'reduce-tree' selects several)"
        )
    return chosen


def error(predicted: float, published: float) -> float:
    """predicted / published - 1."""
    return float(np.float64(predicted) / np.float64(published) - 1.0)
