"""Training-step speed: wsae_core's practical ReLU SAE vs SAELens' StandardTrainingSAE, side by side.

    .venv-bench/bin/python benchmarks/bench_train.py [--d 768] [--expansion 8] [--batch 4096] [--rounds 3]

Same work for both: a dense ReLU + L1 SAE, d -> 8d latents, batch 4096, fp32, one step =
forward + loss + backward + Adam. The step is timed in interleaved rounds (wsae_core, SAELens,
wsae_core, ...) so that machine load hits both alike; the reported time is the median over all
timed steps. Achieved GFLOP/s uses the nominal 12·d·m FLOPs per token of a dense SAE step
(TOOLCHAIN.md) and is compared with the dense-matmul rate measured in the same process: its best
(the peak) and its median over matmuls interleaved with the rounds (what the machine gave while
the steps ran; the two differ when other jobs share the cores).

Both run in one process with the same ``MALLOC_MMAP_MAX_`` (the script re-executes itself with
``MALLOC_MMAP_MAX_=0`` unless ``--mmap-max`` says otherwise: glibc reads it at start-up) and the
same ``torch.set_flush_denormal(True)`` (set by importing ``wsae_core.train``) and thread count.
Install: see benchmarks/README.md (a separate venv; SAELens is never needed by the book).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _reexec_with_mmap(value: str) -> None:
    if os.environ.get("MALLOC_MMAP_MAX_") != value and os.environ.get("_BENCH_REEXEC") != "1":
        env = dict(os.environ, MALLOC_MMAP_MAX_=value, _BENCH_REEXEC="1")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def matmul_rates(d: int, m: int, batch: int, reps: int = 5) -> list[float]:
    """GFLOP/s of ``reps`` (batch, d) x (d, m) fp32 matmuls into a preallocated output."""
    import torch

    a, b = torch.randn(batch, d), torch.randn(d, m)
    out = torch.empty(batch, m)
    torch.mm(a, b, out=out)
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2 * batch * d * m / (time.perf_counter() - t) / 1e9)
    return rates


def make_wsae(d: int, m: int, l1: float):
    import torch

    from wsae_core.models import SAEConfig, build_sae

    sae = build_sae(SAEConfig(n_p=d, n_m=m, kind="relu", l1_coeff=l1, init_scale=0.1, seed=0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step(x):
        out = sae(x)
        out.loss.backward()
        sae.before_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.after_step()
        return out.loss

    return step


def make_saelens(d: int, m: int, l1: float):
    import torch
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=m, l1_coefficient=l1, dtype="float32", device="cpu"))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step(x):
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"l1": l1}, dead_neuron_mask=None,
                                                       n_training_steps=0, is_logging_step=False))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--l1", type=float, default=1e-3)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=4, help="timed steps per contender per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender before timing")
    p.add_argument("--mmap-max", default="0", help="MALLOC_MMAP_MAX_ for the process ('keep' = leave as is)")
    args = p.parse_args(argv)
    if args.mmap_max != "keep":
        _reexec_with_mmap(args.mmap_max)

    import torch

    import wsae_core.train  # noqa: F401  (sets torch.set_flush_denormal(True) for both contenders)

    d, m, B = args.d, args.d * args.expansion, args.batch
    torch.manual_seed(0)
    x = torch.randn(B, d)
    contenders = {"wsae_core": make_wsae(d, m, args.l1), "SAELens": make_saelens(d, m, args.l1)}
    peaks = matmul_rates(d, m, B)
    for name, step in contenders.items():
        for _ in range(args.warmup):
            step(x)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for name, step in contenders.items():
            for _ in range(args.steps):
                t = time.perf_counter()
                step(x)
                times[name].append(time.perf_counter() - t)
        peaks += matmul_rates(d, m, B)
    peak, typical = max(peaks), statistics.median(peaks)
    flops = 12 * d * m * B
    import sae_lens

    print(f"torch {torch.__version__}, sae-lens {sae_lens.__version__}, threads {torch.get_num_threads()}, "
          f"MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}, flush_denormal on")
    print(f"dense SAE d={d}, m={m}, batch={B}, fp32; {args.rounds} interleaved rounds x {args.steps} steps")
    print(f"dense matmul: peak (best of run) {peak:.1f} GFLOP/s, median {typical:.1f} GFLOP/s "
          f"({len(peaks)} matmuls interleaved with the rounds)")
    print(f"{'contender':12s} {'s/step':>8s} {'steps/s':>8s} {'GFLOP/s':>8s} {'% peak':>7s} {'% median':>9s}")
    med = {}
    for name, ts in times.items():
        med[name] = statistics.median(ts)
        g = flops / med[name] / 1e9
        print(f"{name:12s} {med[name]:8.3f} {1 / med[name]:8.3f} {g:8.1f} {100 * g / peak:6.1f}% {100 * g / typical:8.1f}%")
    print(f"speed-up wsae_core / SAELens: {med['SAELens'] / med['wsae_core']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
