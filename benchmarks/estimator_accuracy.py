"""Estimated vs measured training memory per configuration, on CPU with Paddle's host allocator.

    python benchmarks/estimator_accuracy.py            # every case (tiny and 48M Llama), ~5 minutes on 2 cores
    python benchmarks/estimator_accuracy.py --only tiny-llama

Prints a table and writes benchmarks/results/estimator_accuracy.json. Each case trains 3 steps in its own subprocess
(see paddle_llm/estimator/measure.py for what is measured and how).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from importlib.metadata import version

from paddle_llm.estimator.measure import compare, standard_cases

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "estimator_accuracy.json")
MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run only cases whose name contains this text")
    args = parser.parse_args()
    cases = [c for c in standard_cases() if not args.only or args.only in c.name]

    header = f"{'case':31} {'states est':>11} {'measured':>11} {'error':>7}   {'peak est':>11} {'measured':>11} {'error':>7}"
    print(header)
    print("-" * len(header))
    rows = []
    for case in cases:
        r = compare(case)
        print(
            f"{r.name:31} {r.estimated_states / MIB:9.2f}Mi {r.measured_states / MIB:9.2f}Mi {r.states_error:+7.2%}"
            f"   {r.estimated_total / MIB:9.2f}Mi {r.measured_total / MIB:9.2f}Mi {r.total_error:+7.2%}",
            flush=True,
        )
        rows.append({
            "case": r.name,
            "knobs": case.knobs,
            "estimated_states_bytes": r.estimated_states,
            "measured_states_bytes": r.measured_states,
            "states_error": r.states_error,
            "estimated_peak_bytes": r.estimated_total,
            "measured_peak_bytes": r.measured_total,
            "peak_error": r.total_error,
        })
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    environment = {"paddlepaddle": version("paddlepaddle"), "paddlenlp": version("paddlenlp"), "machine": platform.machine()}
    with open(RESULTS, "w", encoding="utf-8") as f:
        json.dump({"environment": environment, "cases": rows}, f, indent=2)
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
