"""Two runs of the same language-model sweep (same spec, same cells), e.g. fp32 on one CPU type and bf16
autocast on another: does a metric move by more than its seed-to-seed spread, and does any verdict of
the chapter (a rule better or worse than the plain SAE, paired 95 % interval) change?

    .venv/bin/python benchmarks/compare_sweeps.py book/results/lm_sweep_book.json other.json [--names fp32,bf16]

Per (rule, layer) and metric: the mean over seeds in each run, |difference|, the standard deviation
over seeds of the first run and the standard error of the per-seed differences (a seed's two runs
share initialisation, data order and held-out tokens; they differ by CPU rounding and precision).
Then the verdicts of :func:`wsae_core.experiments.lm.verdicts` in both runs, and where they differ
(:func:`wsae_core.experiments.lm.compare_runs`, :func:`~wsae_core.experiments.lm.changed_verdicts`).
Prints markdown; asserts nothing (a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = ("fvu", "ce_recovered", "kl", "l0", "dead", "topic_consistency", "embedding_coherence")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="first sweep results JSON")
    p.add_argument("b", help="second sweep results JSON (same spec)")
    p.add_argument("--names", default="a,b", help="labels of the two runs, comma-separated")
    args = p.parse_args(argv)
    from wsae_core.experiments import lm as X

    a, b = (json.loads(Path(f).read_text()) for f in (args.a, args.b))
    if a["spec"] != b["spec"]:
        diff = {k: (a["spec"].get(k), b["spec"].get(k)) for k in set(a["spec"]) | set(b["spec"])
                if a["spec"].get(k) != b["spec"].get(k)}
        print(f"note: the specs differ in {diff}")
    na, nb = args.names.split(",")
    rows = X.compare_runs(a, b, METRICS)
    common = {r["cell"] for r in a["records"]} & {r["cell"] for r in b["records"]}
    prec = lambda res: sorted({(r.get("train_precision", "?"), r.get("lm_precision", "?")) for r in res["records"]})  # noqa: E731
    print(f"{len(common)} cells in both runs; (training, LM forward) precision: {na} {prec(a)}, {nb} {prec(b)}\n")
    print(f"| rule | layer | metric | {na} | {nb} | abs diff | seed std ({na}) | paired SE | within spread |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['layer']} | {r['metric']} | {r['a']:.4g} | {r['b']:.4g} | {r['abs_diff']:.2g} | "
              f"{r['seed_std_a']:.2g} | {r['paired_se']:.2g} | {'yes' if r['within_spread'] else 'no'} |")
    inside = [r for r in rows if r["within_spread"] is not None]
    print(f"\nwithin the seed spread: {sum(r['within_spread'] for r in inside)} of {len(inside)} (rule, layer, metric)")
    for m in ("fvu", "ce_recovered"):
        sub = [r for r in inside if r["metric"] == m]
        print(f"  {m}: {sum(r['within_spread'] for r in sub)} of {len(sub)}")
    changed = X.changed_verdicts(a, b, METRICS)
    for m, n in changed["_compared"]:
        print(f"verdicts on {m}: {n - len(changed[m])} of {n} the same")
    for m in METRICS:
        for method, layer, x, y in changed[m]:
            print(f"  changed: {m}, {method}, layer {layer}: {na} {x!r}, {nb} {y!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
