"""Do two runs of one scenario agree within seed noise? (e.g. the same scenario in fp32 and with
``precision: auto``, or on two machines.)

Pairs the report rows of two stores by data set, model, attack, poison rate, quantization config and
defense, and per metric prints both means ± std over seeds, their difference, and Welch's t-test p-value
(mean and std over seeds, n seeds each). A difference is *beyond noise* when p < 0.05; with a handful of
metrics x settings some are expected by chance (about 1 in 20), so the summary line gives the count
against that expectation.

    python benchmarks/compare_runs.py RUN_A RUN_B [--metrics ba asr] [--alpha 0.05]
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from scipy import stats

from bench import runner

KEY = ("dataset", "model", "attack", "poison_rate", "quant", "defense")


def rows_by_setting(run: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The report rows of the run at ``run`` (a store folder), by setting."""
    rows, _ = runner.report_rows(runner.open_run(run))
    return {tuple(row.to_dict()[k] for k in KEY): row.to_dict() for row in rows}


def welch_p(m1: float, s1: float, n1: int, m2: float, s2: float, n2: int) -> float:
    """Two-sided p-value of Welch's t-test from means, stds and counts (1.0 when both have no spread)."""
    if n1 < 2 or n2 < 2:
        return float("nan")
    if s1 == 0 and s2 == 0:
        return 1.0 if m1 == m2 else 0.0
    return float(stats.ttest_ind_from_stats(m1, s1, n1, m2, s2, n2, equal_var=False).pvalue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--metrics", nargs="+", default=["ba", "asr"])
    parser.add_argument("--alpha", type=float, default=0.05)
    args = parser.parse_args()
    a, b = rows_by_setting(args.run_a), rows_by_setting(args.run_b)
    common = [k for k in a if k in b]
    print(f"{len(common)} settings in both runs ({len(a)} in A, {len(b)} in B)")
    tests = beyond = 0
    for key in common:
        label = " / ".join(str(v) for v in key[1:] if v not in ("-", None))
        for metric in args.metrics:
            ra, rb = a[key], b[key]
            if ra.get(f"{metric}_mean") is None or rb.get(f"{metric}_mean") is None:
                continue
            m1, s1, n1 = ra[f"{metric}_mean"], ra[f"{metric}_std"] or 0.0, ra[f"{metric}_n"]
            m2, s2, n2 = rb[f"{metric}_mean"], rb[f"{metric}_std"] or 0.0, rb[f"{metric}_n"]
            p = welch_p(m1, s1, n1, m2, s2, n2)
            tests += 1
            flag = ""
            if not math.isnan(p) and p < args.alpha:
                beyond += 1
                flag = "  <- beyond noise"
            print(f"{label:45s} {metric:4s} A {100 * m1:5.1f} ± {100 * s1:4.1f}  B {100 * m2:5.1f} ± {100 * s2:4.1f}"
                  f"  diff {100 * (m2 - m1):+5.1f}  p {p:.2f}{flag}")
    print(f"{beyond} of {tests} differences beyond noise at p < {args.alpha} "
          f"(about {args.alpha * tests:.1f} expected by chance)")


if __name__ == "__main__":
    main()
