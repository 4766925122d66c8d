"""Property-based fuzzing in CI: a bounded, derandomised number of random models (compiler/fuzz.py) held to every
property: both paths equal native, read_params(load(p)) == p, SRAM and counters where the plan says, and (fp32)
training steps equal native optax. experiments/fuzz.py runs many more (`python experiments/fuzz.py -n 1000`)."""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, given, settings

from compiler import fuzz

# ~3 s a case on a 2-core machine: the suite's budget allows a handful; the derandomised draws are the same on
# every run (hypothesis's own database and shrinking are off, so a failure prints the case as drawn).
EXAMPLES = 5


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)
@given(fuzz.cases(max_layers=3))
def test_random_models_equal_native(draw):
    fuzz.check(fuzz.build(draw))
