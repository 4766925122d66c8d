"""Does an emulated training run agree with the native one? A check that says something true for any run length.

On CPU, an emulated training step computes what native JAX computes bit for bit (compiler/run/train.py: the
gradient is complete before the optimizer reads it), so the losses of every step and the final params are equal
and the check below passes trivially. Where they are not bit-identical (another backend, a model whose XLA
fusions differ), float32 summation-order differences of ~1e-7 are amplified by training's chaos: after a thousand
Adam steps, at a loss of 1e-4, two runs that differ only in rounding have per-step losses differing by percents
and params by 1e-3, and are equally good. A per-step relative-loss tolerance then measures float32 chaos, not
correctness. The check is therefore in three parts, each with a stated bound:

  early   the first `EARLY_STEPS` steps' losses agree within `EARLY_RTOL` relative (before chaos has room to grow:
          a wrong gradient, optimizer or update shows at once);
  curve   the learning curves agree: the mean loss over each window of `window` steps (a twentieth of the run, at
          least 10 steps) agrees within `CURVE_RTOL` of the larger, plus `CURVE_ATOL_OF_FIRST` of the first step's
          loss (the scale of the curve: a loss of 1e-4 against 2e-4 at the end of a curve that began at 2.3 is
          agreement);
  final   the final metrics agree: each within `FINAL_ATOL[name]` if given (accuracy: 0.02, two points), else
          within `CURVE_RTOL` relative plus `CURVE_ATOL_OF_FIRST` of the first step's loss.

Bit-identity (every step's loss equal) is reported as well.
"""

from __future__ import annotations

import dataclasses

import numpy as np

EARLY_STEPS = 20
EARLY_RTOL = 1e-6
CURVE_RTOL = 0.05
CURVE_ATOL_OF_FIRST = 0.01
FINAL_ATOL = {"accuracy": 0.02, "test accuracy": 0.02}


@dataclasses.dataclass(frozen=True)
class Agreement:
    """How an emulated run agrees with the native one (module docstring).

    Attributes:
      steps: steps compared. identical_steps: leading steps whose losses are bitwise equal. identical: all are.
      early_steps, early_rel: the first steps checked and their largest relative loss difference.
      window, curve_excess: the curve's window and its largest difference over its bound (<= 0 when within).
      final: {name: (emulated, native, bound)}.
      ok: every part within its bound.
    """

    steps: int
    identical_steps: int
    identical: bool
    early_steps: int
    early_rel: float
    window: int
    curve_excess: float
    final: dict
    ok: bool

    def lines(self) -> list[str]:
        if self.identical:
            head = f"bit-identical: every one of the {self.steps} steps' losses equals native's exactly"
        else:
            head = (
                f"bit-identical for the first {self.identical_steps} of {self.steps} steps; then agreement within "
                "the stated bounds (docs/fidelity.md, 'Training runs against native')"
            )
        early = "OK" if self.early_rel <= EARLY_RTOL else "FAILED"
        curve = "OK" if self.curve_excess <= 0 else "FAILED"
        out = [
            head,
            f"first {self.early_steps} steps: max relative loss difference {self.early_rel:.2g} "
            f"(bound {EARLY_RTOL:.0e}): {early}",
            f"learning curve (mean loss per {self.window} steps): within {CURVE_RTOL:g} relative + "
            f"{CURVE_ATOL_OF_FIRST:g} of the first loss: {curve}",
        ]
        for name, (a, b, bound) in self.final.items():
            verdict = "OK" if abs(a - b) <= bound else "FAILED"
            out.append(
                f"final {name}: emulated {a:.4g}, native {b:.4g}, |difference| {abs(a - b):.2g} (bound "
                f"{bound:.2g}): {verdict}"
            )
        return out


def compare_runs(losses, native_losses, final=None, native_final=None) -> Agreement:
    """Compare an emulated run's per-step losses (and final metrics {name: value}) with a native run's.

    Raises:
      ValueError: the runs have different lengths or metric names.
    """
    a, b = np.asarray(losses, np.float64), np.asarray(native_losses, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"compare_runs needs two equally long, non-empty loss curves; got {a.shape} and {b.shape}")
    final, native_final = dict(final or {}), dict(native_final or {})
    if set(final) != set(native_final):
        raise ValueError(f"final metrics differ in names: {sorted(final)} and {sorted(native_final)}")
    n = a.size
    equal = np.asarray(losses) == np.asarray(native_losses)
    identical_steps = n if equal.all() else int(np.argmin(equal))
    early = min(EARLY_STEPS, n)
    rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-30)
    early_rel = float(np.max(rel[:early]))
    window = max(10, n // 20)
    windows = [slice(i, min(i + window, n)) for i in range(0, n, window)]
    scale = CURVE_ATOL_OF_FIRST * abs(b[0])
    excess = max(
        abs(a[w].mean() - b[w].mean()) - (CURVE_RTOL * max(abs(a[w].mean()), abs(b[w].mean())) + scale) for w in windows
    )
    checked = {}
    for name in final:
        x, y = float(final[name]), float(native_final[name])
        bound = FINAL_ATOL.get(name, CURVE_RTOL * max(abs(x), abs(y)) + scale)
        checked[name] = (x, y, bound)
    ok = early_rel <= EARLY_RTOL and excess <= 0 and all(abs(x - y) <= bd for x, y, bd in checked.values())
    return Agreement(n, identical_steps, identical_steps == n, early, early_rel, window, float(excess), checked, ok)
