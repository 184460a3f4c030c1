"""Run a language-model sweep from an empty cache root the way the book's run is made, and time it.

    python tools/timed_sweep.py --profile book --cache-root /tmp/sweep --out book/results/lm_sweep_book_xeon.json
    python tools/timed_sweep.py --profile book --cache-root /tmp/full --out book/results/lm_sweep_full_L03_L09.json \
        -- --full --layers 3 9 --methods SAE "WSAE α=1"      # options after -- go to the sweep's command line

1. the activation cache (the LM forward, on every core; ``--list`` prepares the sweep);
2. the cells in ``--processes`` single-thread processes (``OMP_NUM_THREADS=1``), each taking whole
   layers (a layer's learned-oracle cells need its plain SAEs, so a layer never spans two
   processes);
3. ``--collect`` into ``--out``.

The results file is the CLI's (its SAE, cache and sweep folders relative to the cache root, e.g.
``lm_sweep/<sweep>/<cell>/sae``, so that it names no path of this machine; readers resolve them
below ``--cache-root`` or the default root), plus ``wall_seconds`` (cache, cells, collect, total:
measured here with a monotonic clock) and ``machine`` (CPU model, cores, flags that choose the
precision).
Refuses a cache root that is not empty (the point is the time from nothing) unless ``--resume``: then
the cache and the finished cells in it are reused, the times cover only what this call did, and
``wall_seconds`` says ``"resumed": true``.
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
    p.add_argument("--resume", action="store_true", help="reuse a cache root that is not empty (its cache and finished cells)")
    p.add_argument("sweep_args", nargs=argparse.REMAINDER,
                   help="after --: options of `python -m wsae_core.experiments lm` that choose the sweep "
                        "(--full, --layers, --methods, --seeds, --model); the cells, output and cache root are this tool's")
    args = p.parse_args(argv)
    if args.processes < 1:
        raise SystemExit(f"--processes must be at least 1, got {args.processes}")
    sweep_args = args.sweep_args[1:] if args.sweep_args[:1] == ["--"] else args.sweep_args
    taken = sorted({a.split("=")[0] for a in sweep_args} & {"--profile", "--cells", "--out", "--cache-root", "--list", "--collect"})
    if taken:
        raise SystemExit(f"{', '.join(taken)}: set by this tool, not to be passed to the sweep (got {sweep_args})")
    root = Path(args.cache_root).resolve()
    if root.exists() and any(root.iterdir()) and not args.resume:
        raise SystemExit(f"--cache-root {root} is not empty: the run is timed from an empty cache (--resume to reuse it)")
    root.mkdir(parents=True, exist_ok=True)
    Path(args.out).resolve().parent.mkdir(parents=True, exist_ok=True)  # before the run, not after it
    sys.path.insert(0, str(ROOT))
    from wsae_core.experiments import lm as X

    parsed = X.build_parser().parse_args(["--profile", args.profile, *sweep_args])
    layers = sorted(X.args_spec(parsed).layers)
    groups = [layers[i::args.processes] for i in range(args.processes)]
    groups = [g for g in groups if g]
    cli = [sys.executable, "-m", "wsae_core.experiments", "lm", "--profile", args.profile, *sweep_args, "--cache-root", str(root)]
    # The allocator settings of `make` (see the Makefile), unless the caller set others.
    env = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736", **os.environ, "HF_HUB_OFFLINE": "1"}
    log = root / "logs"
    log.mkdir(exist_ok=args.resume)
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
    res = json.loads(out.read_text())  # folders already relative to the cache root (lm.save_results)
    res["wall_seconds"] = {"cache": round(t1 - t0, 1), "cells": round(t2 - t1, 1), "collect": round(t3 - t2, 1),
                           "total": round(t3 - t0, 1), "processes": len(groups), "threads_per_process": 1,
                           "layers_per_process": groups, **({"resumed": True} if args.resume else {})}
    res["machine"] = cpu_info()
    X.save_results(res, out)
    print(json.dumps(res["wall_seconds"]), res["machine"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
