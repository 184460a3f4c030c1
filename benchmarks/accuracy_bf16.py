"""Accuracy of bf16 training against fp32: the same runs in both precisions, compared with the
seed-to-seed spread.

    .venv/bin/python benchmarks/accuracy_bf16.py [--parts synthetic,lm] [--json out.json]

* Synthetic (chapter *WSAE on synthetic data*, book-profile settings: n = 200, n_p = 20, n_m = 200,
  800 steps of batch 512): theory and Top-k SAEs, plain SAE and WSAE α = 1, at a few sparsities and
  seeds, trained with ``precision="fp32"`` and ``precision="bf16"`` (bf16 autocast, fp32 master
  weights); metrics on held-out data in fp32: L_GT and FVU.
* Language model: residual stream after block ``--layer`` of SmolLM2-135M-Instruct (the offline
  substitute for Pythia-160M: instruct-tuned, 4-bit GGUF de-quantised to fp32) on Wikipedia
  contexts. The fp32 arm stores the activation cache in fp32 and trains in fp32; the bf16 arm stores
  it in bf16 and trains under bf16 autocast. Top-k SAEs (k = 32) are evaluated on held-out contexts:
  FVU and CE-loss recovered (splicing the reconstruction into the fp32 model).

A difference "within the spread" means |mean_bf16 - mean_fp32| < the standard deviation over seeds
of the fp32 runs; "paired SE" is the standard error of the per-seed differences (a seed's two runs
share initialisation and data). Where bf16 is emulated (AVX2-only CPUs: about 40x slower than fp32) the runs are
sized to finish in minutes, not to the book's full grid.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np


def compare(rows: list[dict], keys: tuple[str, ...], metrics: tuple[str, ...]) -> list[dict]:
    """Per group ``keys``: mean and seed std of every metric in each precision, and the verdict."""
    out = []
    groups = sorted({tuple(r[k] for k in keys) for r in rows}, key=str)
    for g in groups:
        sel = [r for r in rows if tuple(r[k] for k in keys) == g]
        for metric in metrics:
            # runs of one seed share initialisation and data in both precisions: paired by seed
            v = {p: np.array([r[metric] for r in sorted(sel, key=lambda r: r["seed"]) if r["precision"] == p])
                 for p in ("fp32", "bf16")}
            spread = float(v["fp32"].std(ddof=1))
            diff = float(abs(v["bf16"].mean() - v["fp32"].mean()))
            paired = v["bf16"] - v["fp32"]
            out.append({**dict(zip(keys, g)), "metric": metric, "fp32": float(v["fp32"].mean()),
                        "bf16": float(v["bf16"].mean()), "abs_diff": diff, "seed_std": spread,
                        "paired_se": float(paired.std(ddof=1) / np.sqrt(paired.size)),
                        "n_seeds": int(v["fp32"].size), "within_spread": diff < spread})
    return out


def print_table(title: str, table: list[dict], keys: tuple[str, ...]) -> None:
    print(f"\n{title}")
    head = " | ".join([*keys, "metric", "fp32 mean", "bf16 mean", "|diff|", "seed std (fp32)", "paired SE",
                       "within spread"])
    print(f"| {head} |")
    print("|" + "---|" * (len(keys) + 7))
    for r in table:
        cells = [str(r[k]) for k in keys] + [r["metric"], f"{r['fp32']:.4g}", f"{r['bf16']:.4g}",
                                             f"{r['abs_diff']:.2g}", f"{r['seed_std']:.2g}", f"{r['paired_se']:.2g}",
                                             "yes" if r["within_spread"] else "no"]
        print("| " + " | ".join(cells) + " |")


def synthetic(args) -> dict:
    """The synthetic chapter's setting (its ``book`` sizes), each run trained alone with the Trainer
    in fp32 and under bf16 autocast: the chapter itself trains its runs stacked, in fp32 only."""
    import torch

    from wsae_core.data import SparseSource, synthetic_superposition
    from wsae_core.experiments.synthetic import _record, gammas_for, spec_for, topk_k
    from wsae_core.models import SAEConfig, build_sae
    from wsae_core.train import TrainConfig, Trainer

    S_grid = tuple(float(s) for s in args.S.split(","))
    seeds = tuple(range(args.seeds))
    methods = ("SAE", "WSAE α=1")
    spec = spec_for("book", S_grid=S_grid, seeds=seeds, methods=methods, steps=args.synthetic_steps)
    W_p = synthetic_superposition(spec.superposition, spec.n, spec.n_p, seed=spec.W_p_seed)
    rows, seconds = [], {"fp32": 0.0, "bf16": 0.0}
    for model in spec.models:
        for S in S_grid:
            for seed in seeds:
                gammas = gammas_for(W_p, S, seed, spec.eval_samples, methods=methods)
                x, _ = SparseSource(W_p, S).sample_pair(spec.eval_samples, torch.Generator().manual_seed(20_000 + seed))
                k = topk_k(spec.n, S, spec.n_m) if model == "topk" else None
                for method in methods:
                    for precision in ("fp32", "bf16"):
                        cfg = TrainConfig(steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr,
                                          warmup_steps=min(50, spec.steps // 10), seed=seed, log_every=spec.log_every,
                                          dead_steps=spec.dead_steps, progress=False, threads=1, precision=precision)
                        sae = build_sae(SAEConfig(n_p=spec.n_p, n_m=spec.n_m, kind=model, k=k, seed=seed))
                        g = None if method == "SAE" else torch.as_tensor(gammas[method], dtype=torch.float32)
                        t = time.perf_counter()
                        trainer = Trainer(sae, SparseSource(W_p, S), cfg, gamma=g)
                        hist = trainer.fit()
                        seconds[precision] += time.perf_counter() - t
                        with torch.no_grad():
                            rec = _record(sae, x, W_p, hist, trainer.steps_since_fired, cfg,
                                          {"S": S, "seed": seed, "model": model, "method": method}, gammas[method])
                        rows.append({key: rec[key] for key in ("S", "seed", "model", "method", "l_gt", "fvu")}
                                    | {"precision": precision})
    table = compare(rows, ("model", "S", "method"), ("l_gt", "fvu"))
    print_table(f"Synthetic (n = {spec.n}, n_p = {spec.n_p}, n_m = {spec.n_m}, {spec.steps} steps, batch "
                f"{spec.batch_size}; {len(seeds)} seeds; fp32 {seconds['fp32']:.0f} s, bf16 {seconds['bf16']:.0f} s)",
                table, ("model", "S", "method"))
    return {"rows": rows, "table": table, "seconds": seconds}


def language_model(args) -> dict:
    import torch

    from wsae_core import activations as A
    from wsae_core import corpus as C
    from wsae_core import lm as L
    from wsae_core.models import SAEConfig, build_sae
    from wsae_core.train import Trainer, TrainConfig

    lm = L.load_lm(None, precision="fp32")
    ctx = C.tokenize_contexts(C.wiki_documents(), lm.tokenizer, context_len=args.context_len,
                              n_contexts=args.lm_contexts, seed=0, source="wiki")
    n_train = int(0.8 * args.lm_contexts)
    train_ctx, eval_ctx = range(0, n_train), range(n_train, args.lm_contexts)
    root = tempfile.mkdtemp(prefix="wsae-accuracy-")
    caches = {p: A.build_activation_cache(lm, ctx, [args.layer], root=root, dtype=dt)
              for p, dt in (("fp32", "float32"), ("bf16", "bfloat16"))}
    x_train = caches["fp32"].activations(args.layer, 1, train_ctx)
    scale = A.norm_scale(x_train)
    x_eval = caches["fp32"].activations(args.layer, 1, eval_ctx) / scale
    read = {p: c.read_speed(args.layer, batch_size=4096, n_batches=8, dtype=torch.float32) for p, c in caches.items()}
    rows, fns, seconds = [], {}, {"fp32": 0.0, "bf16": 0.0}
    d = lm.d_model
    for seed in range(args.seeds):
        for precision in ("fp32", "bf16"):
            src = A.CacheSource(caches[precision], args.layer, skip_first=1, scale=scale, contexts=train_ctx,
                                dtype=torch.float32 if precision == "fp32" else torch.bfloat16)
            sae = build_sae(SAEConfig(n_p=d, n_m=args.lm_width, kind="topk", k=32, seed=seed))
            cfg = TrainConfig(steps=args.lm_steps, batch_size=args.lm_batch, seed=seed, precision=precision,
                              warmup_steps=args.lm_steps // 10, log_every=args.lm_steps, progress=False)
            t = time.perf_counter()
            trainer = Trainer(sae, src, cfg)
            hist = trainer.fit()
            seconds[precision] += time.perf_counter() - t
            with torch.no_grad():
                fvu = float(sae(x_eval).fvu)
            name = f"{precision}/{seed}"
            fns[name] = lambda h, sae=sae: sae(h / scale).reconstruction * scale
            rows.append({"precision": precision, "seed": seed, "fvu": fvu, "dead": hist[-1]["dead_fraction"],
                         "train_fvu": hist[-1]["fvu"], "name": name})
    ids = torch.from_numpy(ctx.tokens[eval_ctx.start: eval_ctx.stop])
    with torch.no_grad():
        res = L.splice_metrics(lm, ids, args.layer, fns)
    for r in rows:
        r["ce_recovered"] = res[r["name"]].ce_recovered
    table = compare(rows, (), ("fvu", "ce_recovered"))
    tokens = len(train_ctx) * (args.context_len - 1)
    print_table(f"Language model: {lm.name} (substitute for Pythia-160M), block {args.layer}, {tokens:,} training "
                f"tokens, Top-k {d} -> {args.lm_width}, k = 32, {args.lm_steps} steps of {args.lm_batch}; "
                f"{args.seeds} seeds; training fp32 {seconds['fp32']:.0f} s, bf16 {seconds['bf16']:.0f} s", table, ())
    nbytes = {p: c.nbytes for p, c in caches.items()}
    print(f"cache bytes fp32 {nbytes['fp32']:,}, bf16 {nbytes['bf16']:,}; shuffled reads as fp32 "
          f"{read['fp32']:,.0f} tokens/s from the fp32 cache, {read['bf16']:,.0f} tokens/s from the bf16 cache")
    return {"rows": rows, "table": table, "seconds": seconds, "cache_bytes": nbytes, "read_tokens_per_s": read}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="synthetic,lm")
    p.add_argument("--S", default="0.5,0.9,0.99", help="sparsities of the synthetic runs")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--synthetic-steps", type=int, default=800)
    p.add_argument("--layer", type=int, default=8)
    p.add_argument("--context-len", type=int, default=64)
    p.add_argument("--lm-contexts", type=int, default=320)
    p.add_argument("--lm-width", type=int, default=1152)
    p.add_argument("--lm-steps", type=int, default=200)
    p.add_argument("--lm-batch", type=int, default=512)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    import wsae_core.train  # noqa: F401  (flush-denormal before the first parallel op)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    out = {}
    if "synthetic" in args.parts:
        out["synthetic"] = synthetic(args)
    if "lm" in args.parts:
        out["lm"] = language_model(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
