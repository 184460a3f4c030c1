"""Mutation score per module from mutmut's results (``mutants/wsae_core/<module>.py.meta``).

Usage: ``python tools/mutation_score.py [module ...]`` (default: every module mutmut has results for).
Killed = a test failed (or the mutant timed out or crashed); survived = every covering test passed;
no tests = no selected test calls the mutated function. The score is killed / (killed + survived +
no tests); mutants not yet run (or interrupted) are counted apart. Survivors are listed by name
(``mutmut show NAME``), and so are the timed-out mutants among the killed: on a loaded machine a
slow survivor could time out, so each one is worth a look (a loop that no longer ends is a kill).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mutants" / "wsae_core"
TIMEOUT = {36, 24, -24, 152, 255}
KILLED = {1, 3, -11, -9, 37} | TIMEOUT
SURVIVED = {0}
NO_TESTS = {5, 33}


def tally(module: str) -> tuple[Counter, list[str]]:
    meta = ROOT / f"{module}.py.meta"
    if not meta.is_file():
        raise SystemExit(f"no mutmut results for {module!r} at {meta}: run `make mutation MUTATE={module}` first")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    count: Counter = Counter()
    survivors = []
    for name, code in sorted(codes.items()):
        kind = ("not run" if code in (None, 2) else "killed" if code in KILLED else "survived" if code in SURVIVED
                else "no tests" if code in NO_TESTS else f"other ({code})")
        count[kind] += 1
        if code in TIMEOUT:
            count["timeout"] += 1
        if kind in ("survived", "no tests") or code in TIMEOUT:
            survivors.append(f"{name} ({'timeout' if code in TIMEOUT else kind})")
    return count, survivors


def main(modules: list[str]) -> None:
    modules = modules or sorted(p.name[: -len(".py.meta")] for p in ROOT.glob("*.py.meta"))
    print(f"{'module':<10} {'mutants':>7} {'killed':>7} {'timeout':>7} {'survived':>8} {'no tests':>8} {'not run':>7} "
          f"{'score':>6}")
    for m in modules:
        c, survivors = tally(m)
        done = c["killed"] + c["survived"] + c["no tests"]
        score = f"{100 * c['killed'] / done:.1f}%" if done else "-"
        print(f"{m:<10} {sum(c.values()) - c['timeout']:>7} {c['killed']:>7} {c['timeout']:>7} {c['survived']:>8} "
              f"{c['no tests']:>8} {c['not run']:>7} {score:>6}")
        for s in survivors:
            print(f"    {s}")


if __name__ == "__main__":
    main(sys.argv[1:])
