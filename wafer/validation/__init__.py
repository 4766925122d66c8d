"""Calibration programs: published wafer measurements as real programs on the wafer API, and the table that
compares them with what the emulator's cost rules predict (`wafer validate`, docs/fidelity.md).

    from wafer import validation
    df = validation.run()                       # pandas.DataFrame: case, size, published, predicted, unit, ...
    validation.main(["fft3d", "--tolerance", "0.5"])

Modules: `fft` (3D FFT as wsFFT maps it, Orenes-Vera et al. ICS'23), `bicgstab` (BiCGStab with a 7-point stencil as
Rocki et al. SC20 map it), `collectives` (Luczynski et al. HPDC'24's reduce patterns and performance model),
`cases` (the cases, their sources and how each predicted figure is obtained).
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from wafer.validation import bicgstab, cases, collectives, fft
from wafer.validation.cases import EXECUTE, TOLERANCE, Case, ValidationError, all_cases

COLUMNS = ("case", "size", "published", "predicted", "unit", "error", "within_tolerance")


def run(names=None, *, execute: str = "small", tolerance: float | None = None) -> pd.DataFrame:
    """Run the calibration cases and tabulate predicted against published figures.

    Args:
      names: case names or name prefixes (e.g. ["fft3d", "bicgstab-cs1"]); None for every case.
      execute: "small" (run data and check numerics at the small sizes, shapes only elsewhere), "all" (run
        data wherever feasible), "none" (shapes only: every record from jax.eval_shape of the step functions).
      tolerance: overrides every case's tolerance (relative; the cases' own is 0.10).
    Returns:
      DataFrame with columns case, size, published, predicted, unit, error (= predicted / published - 1),
      within_tolerance, in table order.
    Raises:
      ValueError: an unknown case name or execute mode; ValidationError: a program's numbers were wrong.
    """
    if execute not in EXECUTE:
        raise ValueError(f"execute must be one of {EXECUTE}, got {execute!r}")
    if tolerance is not None and not tolerance >= 0:
        raise ValueError(f"tolerance must be a relative error >= 0, got {tolerance!r}")
    rows = []
    for case in cases.select(all_cases(execute_all=execute == "all"), names):
        run_data = execute == "all" or (execute == "small" and case.small)
        predicted = float(case.predict(run_data))
        err = cases.error(predicted, case.published)
        tol = case.tolerance if tolerance is None else tolerance
        rows.append((case.name, case.size, case.published, predicted, case.unit, err, abs(err) <= tol))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wafer validate",
        description="Predicted against published figures for the calibration cases (docs/fidelity.md).",
    )
    p.add_argument("cases", nargs="*", metavar="CASE", help="case names or prefixes (default: every case)")
    p.add_argument("--execute", choices=EXECUTE, default="small", help="run data: small sizes (default), all, none")
    p.add_argument(
        "--tolerance", type=float, metavar="REL", help=f"override every case's tolerance (default {TOLERANCE})"
    )
    return p


def main(argv=None) -> int:
    """Print the validation table, then the mean and worst |error|; 1 if a case exceeds its tolerance, else 0."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    df = run(args.cases or None, execute=args.execute, tolerance=args.tolerance)
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_colwidth", 60):
        shown = df.assign(error=df.error.map(lambda e: f"{e:+.1%}"))
        print(shown.to_string(index=False, float_format=lambda v: f"{v:,.6g}"))
    worst = df.error.abs().idxmax()
    print(
        f"\n{len(df)} cases: mean |error| {df.error.abs().mean():.1%}, worst |error| {abs(df.error[worst]):.1%} "
        f"({df.case[worst]}); {int((~df.within_tolerance).sum())} outside tolerance"
    )
    return 0 if bool(df.within_tolerance.all()) else 1


__all__ = [
    "COLUMNS",
    "Case",
    "ValidationError",
    "all_cases",
    "bicgstab",
    "cases",
    "collectives",
    "fft",
    "main",
    "run",
]
