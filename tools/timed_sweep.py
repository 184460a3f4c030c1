"""Run a language-model sweep from an empty cache root the way the book's run is made, and time it.

    python tools/timed_sweep.py --profile book --cache-root /tmp/sweep --out book/results/lm_sweep_book_xeon.json

1. the activation cache (the LM forward, on every core; ``--list`` prepares the sweep);
2. the cells in ``--processes`` single-thread processes (``OMP_NUM_THREADS=1``), each taking whole
   layers (a layer's learned-oracle cells need its plain SAEs, so a layer never spans two
   processes);
3. ``--collect`` into ``--out``.

The results file is the CLI's, plus ``wall_seconds`` (cache, cells, collect, total: measured here
with a monotonic clock), ``machine`` (CPU model, cores, flags that choose the precision) and the SAE
folders written relative to the cache root (``lm_sweep/<sweep>/<cell>/sae``), so that the file names
no path of this machine; ``--cache-root`` of the readers (e.g. ``interp score``) relocates them.
Refuses a cache root that is not empty: the point is the time from nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_info() -> dict:
    """CPU model, logical cores, and the instruction sets that decide bf16."""
    model, flags = "unknown", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "logical_cores": os.cpu_count(),
            "flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="book", choices=["ci", "book", "paper"])
    p.add_argument("--cache-root", required=True, help="an empty or new folder")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.processes < 1:
        raise SystemExit(f"--processes must be at least 1, got {args.processes}")
    root = Path(args.cache_root).resolve()
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"--cache-root {root} is not empty: the run is timed from an empty cache")
    root.mkdir(parents=True, exist_ok=True)
    Path(args.out).resolve().parent.mkdir(parents=True, exist_ok=True)  # before the run, not after it
    sys.path.insert(0, str(ROOT))
    from wsae_core.experiments import lm as X

    layers = sorted(X.spec_for(args.profile).layers)
    groups = [layers[i::args.processes] for i in range(args.processes)]
    groups = [g for g in groups if g]
    cli = [sys.executable, "-m", "wsae_core.experiments", "lm", "--profile", args.profile, "--cache-root", str(root)]
    # The allocator settings of `make` (see the Makefile), unless the caller set others.
    env = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736", **os.environ, "HF_HUB_OFFLINE": "1"}
    log = root / "logs"
    log.mkdir()
    t0 = time.monotonic()
    subprocess.run([*cli, "--list"], env=env, cwd=ROOT, check=True, stdout=open(log / "list.txt", "w"),
                   stderr=open(log / "cache.err", "w"))
    t1 = time.monotonic()
    procs = []
    for i, g in enumerate(groups):
        cells = ",".join(f"L{l:02d}-*" for l in g)
        procs.append(subprocess.Popen([*cli, "--cells", cells, "--out", str(log / f"part{i}.json")],
                                      env=dict(env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"), cwd=ROOT,
                                      stdout=open(log / f"part{i}.log", "w"), stderr=subprocess.STDOUT))
    codes = [pr.wait() for pr in procs]
    t2 = time.monotonic()
    if any(codes):
        raise SystemExit(f"a cell process failed (exit codes {codes}); see {log}")
    out = Path(args.out)
    subprocess.run([*cli, "--collect", "--out", str(out)], env=env, cwd=ROOT, check=True,
                   stdout=open(log / "collect.log", "w"), stderr=subprocess.STDOUT)
    t3 = time.monotonic()
    res = json.loads(out.read_text())
    for r in res["records"]:
        if r.get("sae_dir", "").startswith(str(root)):
            r["sae_dir"] = str(Path(r["sae_dir"]).relative_to(root))
    for key in ("folder",):
        if str(res.get("cache", {}).get(key, "")).startswith(str(root)):
            res["cache"][key] = str(Path(res["cache"][key]).relative_to(root))
    if str(res.get("sweep_folder", "")).startswith(str(root)):
        res["sweep_folder"] = str(Path(res["sweep_folder"]).relative_to(root))
    res["wall_seconds"] = {"cache": round(t1 - t0, 1), "cells": round(t2 - t1, 1), "collect": round(t3 - t2, 1),
                           "total": round(t3 - t0, 1), "processes": len(groups), "threads_per_process": 1,
                           "layers_per_process": groups}
    res["machine"] = cpu_info()
    X.save_results(res, out)
    print(json.dumps(res["wall_seconds"]), res["machine"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
