"""Fuzz the compiler against native JAX: N random Flax models on random mini wafers (compiler/fuzz.py).

Each case is a random model (dense, conv, depthwise, pooling, norms, attention, embeddings, recurrent cells,
residuals, dropout, tied weights; odd and size-1 shapes; fp32 / bf16 / fp16), compiled onto a random mini wafer
with the automatic placement, random PlacementParams or a random valid hand placement, and held to every property
of `compiler.fuzz.check`: both paths equal native, read_params(load(p)) == p, the report's SRAM equals the
allocations, counters only on kernels and routes, and (fp32) two compile_train steps equal native optax.

    python experiments/fuzz.py                 # 1000 cases, seed 0
    python experiments/fuzz.py -n 50 --seed 3  # prints passed/failed; each failure with the case that rebuilds it
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections import Counter

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from compiler import fuzz


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=1000, help="cases to run (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    p.add_argument("--no-train", action="store_true", help="skip the training property")
    p.add_argument("--quiet", action="store_true", help="print only the summary and failures")
    args = p.parse_args(argv)
    passed, failed, trained, skipped, kinds, literal = 0, [], 0, Counter(), Counter(), Counter()
    t0 = time.perf_counter()

    @settings(
        max_examples=args.n,
        derandomize=False,
        database=None,
        deadline=None,
        phases=[Phase.generate],  # every case runs once; no shrinking (a failure prints its case)
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def run(data):
        nonlocal passed, trained
        draw = data.draw(fuzz.cases())
        case = fuzz.build(draw)
        i = passed + len(failed) + sum(skipped.values()) + 1
        try:
            ran = fuzz.check(case, train=not args.no_train)
        except Exception as e:  # every failure is recorded, the run goes on
            failed.append((draw, f"{type(e).__name__}: {e}", traceback.format_exc()))
            print(f"[{i}] FAILED {case!r}\n    {type(e).__name__}: {str(e)[:400]}", flush=True)
            return
        if ran["skipped"]:
            skipped[ran["skipped"]] += 1
            return
        passed += 1
        trained += ran["train"]
        kinds.update(layer[0] for layer in draw[0][3])
        literal.update(ran["per_core"].values())
        if not args.quiet and i % 25 == 0:
            print(f"[{i}] {passed} passed, {len(failed)} failed ({time.perf_counter() - t0:.0f} s)", flush=True)

    seed(args.seed)(run)()
    total = passed + len(failed) + sum(skipped.values())
    print(
        f"\nfuzz: {total} models, {passed} passed, {len(failed)} failed ({trained} also trained); "
        f"{sum(skipped.values())} did not fit their drawn wafer ({dict(skipped)}); {time.perf_counter() - t0:.0f} s"
    )
    print("layers drawn: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    print("anchors run per core: " + ", ".join(f"{k} {v}" for k, v in sorted(literal.items())))
    for draw, message, _ in failed:
        print(f"\nFAILED {draw!r}\n  {message[:1000]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
