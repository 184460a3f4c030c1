"""Training-step speed, side by side in one process: wsae_core vs SAELens vs sparsify, fp32 and bf16,
plus the language-model forward pass (fp32 vs bf16 autocast).

    .venv-bench/bin/python benchmarks/bench_train.py [--suites relu,topk,lm] [--precisions fp32,bf16]
        [--topk-shapes 768x24576,576x4608,576x18432] [--rounds 3] [--threads 2] [--json out.json]

Suites (one step = forward + loss + backward + Adam + the library's own decoder-norm handling):

* ``relu``: a dense ReLU + L1 SAE, d = 768 -> 6144 (``--relu-shape``): wsae_core (fused kernel) vs SAELens
  ``StandardTrainingSAE``. Nominal cost 12·d·m FLOPs per token.
* ``topk``: Top-k SAEs, k = 32, for every shape in ``--topk-shapes``: wsae_core (fused sparse step),
  sparsify ``SparseCoder`` (eai-sparsify) and SAELens ``TopKTrainingSAE`` (dense activations, its
  default; its sparse option fails in the backward on the CPU), and wsae_core's whole ``Trainer.fit`` step (data sampling, b_dec,
  dead-latent and AuxK bookkeeping, learning-rate schedule). Nominal cost 2·d·m + 10·k·d FLOPs per
  token (encoder GEMM + sparse decoder and backward). "GEMM floor" = the encoder's dense
  (batch, d) x (d, m) product alone, which every contender computes: no exact Top-k step can be
  faster, so sparsify's time over it bounds any speed-up over sparsify.
* ``lm``: SmolLM2-135M-Instruct (a substitute for Pythia-160M, 4-bit GGUF de-quantised to fp32)
  forward to block 27 over contexts of 128 tokens, fp32 vs bf16 autocast: tokens/s and the relative
  difference of the block-15 residual.

Fairness: all contenders run in one process, in interleaved rounds (each round runs every contender's
steps once, so machine load hits all alike; the table gives the median, and the speed-ups are also
given paired by round: each round's time of the other library over wsae_core's, whose median and
quartiles do not move with load that drifts over minutes), with the same
``MALLOC_MMAP_MAX_`` and ``MALLOC_TRIM_THRESHOLD_`` (the script re-executes itself with
``MALLOC_MMAP_MAX_=0`` and a trim threshold of 64 GiB unless ``--mmap-max`` / ``--trim-threshold`` say
otherwise: glibc reads them at start-up), the same ``torch.set_flush_denormal(True)`` (importing
``wsae_core.train`` sets it), the same thread count and the same optimiser (torch's fused Adam, the one
wsae_core's trainer uses). bf16 = ``torch.autocast("cpu", torch.bfloat16)`` around each forward, fp32
master weights; where bf16 is emulated (AVX2-only CPUs) the bf16 suites run at ``--bf16-batch``.
The dense matmul rate of each suite's shape is measured in the same run, in fp32 and bf16,
interleaved with the rounds: its best (the peak) and its median (what the steps saw under load).
Install: see benchmarks/README.md (a separate venv; SAELens and sparsify are never needed by the book).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


#: glibc's trim threshold while benchmarking: never give the heap's top back to the OS, so a freed
#: (batch, n_m) buffer is reused by the next step instead of being faulted in again.
TRIM_THRESHOLD = "68719476736"


def _reexec_with_mmap(value: str, trim: str = TRIM_THRESHOLD) -> None:
    """Re-execute this script with ``MALLOC_MMAP_MAX_=value`` and ``MALLOC_TRIM_THRESHOLD_=trim``
    (glibc reads them at start-up); every contender then runs under the same allocator settings."""
    want = {"MALLOC_MMAP_MAX_": value, "MALLOC_TRIM_THRESHOLD_": trim}
    if any(os.environ.get(k) != v for k, v in want.items()) and os.environ.get("_BENCH_REEXEC") != "1":
        env = dict(os.environ, **want, _BENCH_REEXEC="1")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_rate(batch: int, d: int, m: int, dtype, reps: int = 2) -> float:
    """Best GFLOP/s of ``reps`` (batch, d) x (d, m) matmuls in ``dtype`` into a preallocated output."""
    import torch

    a, b = torch.randn(batch, d).to(dtype), torch.randn(d, m).to(dtype)
    out = torch.empty(batch, m, dtype=dtype)
    torch.mm(a, b, out=out)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        best = max(best, 2 * batch * d * m / (time.perf_counter() - t) / 1e9)
    return best


def _autocast(bf16: bool):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def _training_step(params, loss_of, bf16: bool, before=None, after=None):
    """step(x): ``loss_of(x)`` under the precision's autocast, backward, ``before()``, fused Adam, ``after()``."""
    import torch

    opt = torch.optim.Adam(params, lr=1e-4, fused=True)

    def step(x):
        with _autocast(bf16):
            loss = loss_of(x)
        loss.backward()
        if before is not None:
            before()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after is not None:
            after()

    return step


# ----------------------------------------------------------------------------- contenders
# Each maker returns step(x) running one full training step on the batch x.


def wsae_step(kind: str, d: int, m: int, k: int | None, bf16: bool, l1: float = 1e-3):
    from wsae_core.models import SAEConfig, build_sae

    kw = {"k": k} if kind == "topk" else {"l1_coeff": l1, "init_scale": 0.1}
    sae = build_sae(SAEConfig(n_p=d, n_m=m, kind=kind, seed=0, **kw))
    return _training_step(sae.parameters(), lambda x: sae(x).loss, bf16, sae.before_step, sae.after_step)


def wsae_trainer_step(d: int, m: int, k: int, batch: int, bf16: bool):
    """wsae_core's whole Trainer.fit step (one step per call) on a stored sample of activations."""
    import torch

    from wsae_core.data import TensorSource
    from wsae_core.models import SAEConfig, build_sae
    from wsae_core.train import TrainConfig, Trainer

    acts = torch.randn(16 * batch, d, generator=torch.Generator().manual_seed(1))
    sae = build_sae(SAEConfig(n_p=d, n_m=m, kind="topk", k=k, seed=0))
    cfg = TrainConfig(steps=10**6, batch_size=batch, warmup_steps=10, progress=False, log_every=10**6,
                      precision="bf16" if bf16 else "fp32")
    trainer = Trainer(sae, TensorSource(acts), cfg)

    def step(_x):
        trainer.fit(until=trainer.step + 1)

    return step


def _saelens_loss(sae, coefficients: dict):
    from sae_lens.saes.sae import TrainStepInput

    def loss_of(x):
        return sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=None,
                                                        n_training_steps=0, is_logging_step=False)).loss

    return loss_of


def saelens_relu_step(d: int, m: int, bf16: bool, l1: float = 1e-3):
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=m, l1_coefficient=l1, dtype="float32", device="cpu"))
    return _training_step(sae.parameters(), _saelens_loss(sae, {"l1": l1}), bf16)


def saelens_topk_step(d: int, m: int, k: int, bf16: bool):
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    # Its default dense activations: use_sparse_activations=True fails in the backward on the CPU
    # (sae-lens 6.54.12: aten::view has no SparseCPU kernel).
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=m, k=k, dtype="float32", device="cpu"))
    return _training_step(sae.parameters(), _saelens_loss(sae, {}), bf16)


def sparsify_step(d: int, m: int, k: int, bf16: bool):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=m, k=k))
    return _training_step(sae.parameters(), lambda x: sae(x).fvu, bf16,
                          sae.remove_gradient_parallel_to_decoder_directions, sae.set_decoder_norm_to_unit_norm)


def encoder_gemm(d: int, m: int, bf16: bool):
    """The dense encoder product every Top-k contender computes (the floor of its step)."""
    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32
    W, b = torch.randn(m, d).to(dtype), torch.zeros(m, dtype=dtype)

    def step(x):
        torch.addmm(b, x.to(dtype), W.T)

    return step


# ----------------------------------------------------------------------------- timing


def interleaved(contenders: dict, x, rounds: int, steps: int, warmup: int, peak_fn) -> tuple[dict, list]:
    """Median-able step times per contender and the matmul rates measured between rounds."""
    for step in contenders.values():
        for _ in range(warmup):
            step(x)
    times = {name: [] for name in contenders}
    peaks = [peak_fn()]
    for _ in range(rounds):
        for name, step in contenders.items():
            for _ in range(steps):
                t = time.perf_counter()
                step(x)
                times[name].append(time.perf_counter() - t)
        peaks.append(peak_fn())
    return times, peaks


def report(title: str, times: dict, peaks: list, flops_per_step: float, batch: int, ref: str) -> list[dict]:
    peak, typical = max(peaks), statistics.median(peaks)
    print(f"\n{title}")
    print(f"  dense matmul of this shape: peak {peak:.1f} GFLOP/s, median {typical:.1f} GFLOP/s ({len(peaks)} measurements)")
    print(f"  {'contender':22s} {'s/step':>8s} {'tokens/s':>9s} {'GFLOP/s':>8s} {'% peak':>7s} {'% median':>9s} {'time / ' + ref:>18s}")
    rows = []
    med_ref = statistics.median(times[ref])
    for name, ts in times.items():
        med = statistics.median(ts)
        g = flops_per_step / med / 1e9
        ratio = med / med_ref
        print(f"  {name:22s} {med:8.3f} {batch / med:9.0f} {g:8.1f} {100 * g / peak:6.1f}% {100 * g / typical:8.1f}% "
              f"{ratio:17.2f}x")
        rows.append({"contender": name, "s_per_step": med, "tokens_per_s": batch / med, "gflops": g,
                     "pct_peak": 100 * g / peak, "pct_median": 100 * g / typical, "time_vs_ref": ratio,
                     "all_times": ts})
    return rows


def paired(times: dict, slow: str, fast: str) -> dict:
    """Speed-up of ``fast`` over ``slow`` step by step: ``slow``'s time over ``fast``'s within each
    round (the two ran back to back, so load that drifts over minutes cancels), median and quartiles
    over the rounds. Steadier than the ratio of the two medians on a shared host."""
    r = [a / b for a, b in zip(times[slow], times[fast])]
    q = statistics.quantiles(r, n=4, method="inclusive") if len(r) > 1 else [r[0]] * 3
    return {"median": statistics.median(r), "q1": q[0], "q3": q[2], "n": len(r), "ratios": r}


def paired_text(p: dict) -> str:
    return f"paired by round: median {p['median']:.2f}x, quartiles {p['q1']:.2f}-{p['q3']:.2f}x over {p['n']}"


# ----------------------------------------------------------------------------- suites


def suite_relu(args, bf16: bool) -> dict:
    import torch

    d, m = (int(v) for v in args.relu_shape.split("x"))
    B = args.bf16_batch if bf16 else args.batch
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(0))
    contenders = {"wsae_core": wsae_step("relu", d, m, None, bf16), "SAELens": saelens_relu_step(d, m, bf16)}
    dtype = torch.bfloat16 if bf16 else torch.float32
    times, peaks = interleaved(contenders, x, args.rounds, args.steps, args.warmup,
                               lambda: matmul_rate(B, d, m, dtype))
    prec = "bf16 autocast" if bf16 else "fp32"
    rows = report(f"dense ReLU SAE {d} -> {m}, batch {B}, {prec} (nominal 12·d·m FLOPs/token)",
                  times, peaks, 12 * d * m * B, B, "wsae_core")
    pair = paired(times, "SAELens", "wsae_core")
    print(f"  speed-up wsae_core over SAELens {paired_text(pair)}")
    return {"suite": "relu", "precision": prec, "d": d, "m": m, "batch": B, "peaks": peaks, "rows": rows,
            "paired_vs_saelens": pair}


def suite_topk(args, bf16: bool, d: int, m: int) -> dict:
    import torch

    k = args.k
    B = args.bf16_batch if bf16 else args.batch
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(0))
    contenders = {
        "wsae_core": wsae_step("topk", d, m, k, bf16),
        "wsae_core Trainer.fit": wsae_trainer_step(d, m, k, B, bf16),
        "sparsify": sparsify_step(d, m, k, bf16),
    }
    if not args.skip_saelens_topk:
        contenders["SAELens"] = saelens_topk_step(d, m, k, bf16)
    contenders["GEMM floor"] = encoder_gemm(d, m, bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    times, peaks = interleaved(contenders, x, args.rounds, args.steps, args.warmup,
                               lambda: matmul_rate(B, d, m, dtype))
    prec = "bf16 autocast" if bf16 else "fp32"
    flops = (2 * d * m + 10 * k * d) * B
    rows = report(f"Top-k SAE {d} -> {m}, k = {k}, batch {B}, {prec} (nominal 2·d·m + 10·k·d FLOPs/token)",
                  times, peaks, flops, B, "wsae_core")
    med = {r["contender"]: r["s_per_step"] for r in rows}
    print(f"  speed-up wsae_core over sparsify {med['sparsify'] / med['wsae_core']:.2f}x "
          f"(at most {med['sparsify'] / med['GEMM floor']:.2f}x for any step that computes the encoder GEMM)")
    pair = paired(times, "sparsify", "wsae_core")
    print(f"  speed-up wsae_core over sparsify {paired_text(pair)}")
    return {"suite": "topk", "precision": prec, "d": d, "m": m, "k": k, "batch": B, "peaks": peaks, "rows": rows,
            "paired_vs_sparsify": pair}


def suite_lm(args) -> dict:
    import torch

    from wsae_core import corpus as C
    from wsae_core import lm as L

    lm = L.load_lm(None, precision="fp32")
    ctx = C.tokenize_contexts(C.wiki_documents(), lm.tokenizer, context_len=128, n_contexts=args.lm_contexts, seed=0,
                              source="wiki")
    ids = torch.from_numpy(ctx.tokens)
    last = min(27, lm.n_layers - 1)
    rates = {"fp32": [], "bf16 autocast": []}
    resid = {}
    for _ in range(args.lm_rounds):
        for name, dtype in (("fp32", torch.float32), ("bf16 autocast", torch.bfloat16)):
            lm.compute_dtype = dtype
            n = ids.shape[0] if dtype == torch.float32 else args.lm_bf16_contexts
            t = time.perf_counter()
            out = L.capture_residuals(lm, ids[:n], [15, last])
            rates[name].append(ids[:n].numel() / (time.perf_counter() - t))
            resid[name] = out[15][: args.lm_bf16_contexts]
    rel = float((resid["bf16 autocast"] - resid["fp32"]).norm() / resid["fp32"].norm())
    print(f"\nLM forward: {lm.name} (substitute for Pythia-160M; instruct-tuned, 4-bit GGUF de-quantised to fp32) "
          f"to block {last}, context 128")
    for name, r in rates.items():
        print(f"  {name:14s} {statistics.median(r):8.1f} tokens/s  ({len(r)} rounds)")
    print(f"  bf16/fp32 speed {statistics.median(rates['bf16 autocast']) / statistics.median(rates['fp32']):.3f}x; "
          f"block-15 residual relative difference {100 * rel:.2f} %")
    return {"suite": "lm", "model": lm.name, "last_block": last, "rates": rates, "rel_diff_block15": rel}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", default="relu,topk,lm")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--relu-shape", default="768x6144", help="d x n_m of the ReLU suite")
    p.add_argument("--topk-shapes", default="768x24576,576x4608,576x18432", help="d x n_m of the Top-k suite")
    p.add_argument("--bf16-topk-shapes", default="768x24576", help="Top-k shapes also run in bf16")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--bf16-batch", type=int, default=4096,
                   help="batch of the bf16 suites (lower it where bf16 is emulated)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=1, help="timed steps per contender per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per contender before timing")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skip-saelens-topk", action="store_true", help="leave SAELens out of the Top-k suite")
    p.add_argument("--lm-contexts", type=int, default=8, help="contexts of the fp32 LM forward")
    p.add_argument("--lm-bf16-contexts", type=int, default=8, help="contexts of the bf16 LM forward")
    p.add_argument("--lm-rounds", type=int, default=3)
    p.add_argument("--mmap-max", default="0", help="MALLOC_MMAP_MAX_ for the process ('keep' = leave both as they are)")
    p.add_argument("--trim-threshold", default=TRIM_THRESHOLD, help="MALLOC_TRIM_THRESHOLD_ for the process (bytes)")
    p.add_argument("--json", default=None, help="also write every timing to this file")
    args = p.parse_args(argv)
    if args.mmap_max != "keep":
        _reexec_with_mmap(args.mmap_max, args.trim_threshold)

    import torch

    import wsae_core.train  # noqa: F401  (sets torch.set_flush_denormal(True) for every contender)
    from wsae_core.models import choose_precision

    if args.threads:
        torch.set_num_threads(args.threads)
    versions = {"torch": torch.__version__}
    for mod, dist in (("sae_lens", "sae-lens"), ("sparsify", "eai-sparsify")):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:  # noqa: BLE001  (a missing contender is reported, not fatal)
            versions[dist] = "missing"
    auto = choose_precision("auto", "cpu")
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores), torch capability "
          f"{torch.backends.cpu.get_cpu_capability()}; {', '.join(f'{k} {v}' for k, v in versions.items())}")
    print(f"threads {torch.get_num_threads()}, MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}, "
          f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}, "
          f"flush_denormal on, load average at start {os.getloadavg()[0]:.1f}")
    print(f'precision="auto" here: {"bf16" if auto.dtype == torch.bfloat16 else "fp32"} ({auto.reason})')
    print(f"{args.rounds} interleaved rounds x {args.steps} step(s) per contender, median reported")

    results = {"cpu": cpu_model(), "versions": versions, "threads": torch.get_num_threads(),
               "auto_precision": auto.reason, "load_start": os.getloadavg()[0], "suites": []}
    suites = args.suites.split(",")
    precisions = args.precisions.split(",")
    for prec in precisions:
        bf16 = prec == "bf16"
        if "relu" in suites:
            results["suites"].append(suite_relu(args, bf16))
        if "topk" in suites:
            shapes = args.bf16_topk_shapes if bf16 else args.topk_shapes
            for shape in filter(None, shapes.split(",")):
                d, m = (int(v) for v in shape.split("x"))
                results["suites"].append(suite_topk(args, bf16, d, m))
    if "lm" in suites:
        results["suites"].append(suite_lm(args))
    results["load_end"] = os.getloadavg()[0]
    print(f"\nload average at end {results['load_end']:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
