"""Property-based fuzzing in CI: a bounded, derandomised number of random models (compiler/fuzz.py) held to every
property: both paths equal native, read_params(load(p)) == p, SRAM and counters where the plan says, and (fp32)
training steps equal native optax. experiments/fuzz.py runs many more (`python experiments/fuzz.py -n 1000`).

Four tests of different draws (hypothesis derandomises each from its own name and source, so each test sees its own
cases, the same on every run; its database and shrinking are off, so a failure prints the case as drawn): 14 cases,
~3 s of CPU each on a 2-core machine, spread over the suite's workers."""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, given, settings

from compiler import fuzz

SETTINGS = dict(
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)


@settings(max_examples=4, **SETTINGS)
@given(fuzz.cases(max_layers=3))
def test_random_models_equal_native(draw):
    fuzz.check(fuzz.build(draw))


@settings(max_examples=4, **SETTINGS)
@given(fuzz.cases(max_layers=3, policies=("fp32",)))
def test_random_fp32_models_train_like_native_optax(draw):
    fuzz.check(fuzz.build(draw))


@settings(max_examples=3, **SETTINGS)
@given(fuzz.cases(max_layers=3, policies=("bf16", "fp16")))
def test_random_16bit_models_equal_native(draw):
    fuzz.check(fuzz.build(draw))


@settings(max_examples=3, **SETTINGS)
@given(fuzz.cases(max_layers=5))
def test_deeper_random_models_equal_native(draw):
    fuzz.check(fuzz.build(draw))
