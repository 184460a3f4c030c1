"""Speed of ``wsae_core.data.sample_sparse`` vs the previous implementation (distinct positions by
oversampling + ``torch.unique`` below p = 0.25, a dense Bernoulli mask above).

    .venv/bin/python benchmarks/bench_sampler.py [--batch 1024] [--n 200]

Prints the median time per call (ms) for each S, interleaved to share machine load.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from wsae_core.data import VALUE_DISTRIBUTIONS, sample_sparse


def old_sample_sparse(batch: int, n: int, S: float, generator: torch.Generator) -> torch.Tensor:
    total, p = batch * n, 1.0 - S
    x = torch.zeros(total)
    if p >= 0.25:
        idx = (torch.rand(total, generator=generator) < p).nonzero().squeeze(1)
    else:
        k = int(torch.binomial(torch.tensor([float(total)]), torch.tensor([p]), generator=generator).item())
        chosen = torch.empty(0, dtype=torch.long)
        while chosen.numel() < k:
            need = k - chosen.numel()
            cand = torch.randint(total, (int(need * 1.1) + 16,), generator=generator)
            merged = torch.cat([chosen, cand])
            uniq, inverse = torch.unique(merged, return_inverse=True)
            first = torch.full((uniq.numel(),), merged.numel(), dtype=torch.long)
            first.scatter_reduce_(0, inverse, torch.arange(merged.numel()), reduce="amin")
            chosen = merged[torch.sort(first).values[:k]]
        idx = chosen
    x[idx] = VALUE_DISTRIBUTIONS["uniform"](idx.numel(), generator, torch.float32, torch.device("cpu"))
    return x.view(batch, n)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the trainer uses 1 for tiny SAEs)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    print(f"batch {a.batch} x n {a.n}, {torch.get_num_threads()} threads; median ms per call")
    print(f"{'S':>6s} {'old':>8s} {'new':>8s} {'speed-up':>9s}")
    for S in (0.0, 0.5, 0.8, 0.9, 0.97, 0.99, 0.999):
        t_old, t_new = [], []
        for _ in range(a.reps):
            t = time.perf_counter(); old_sample_sparse(a.batch, a.n, S, g); t_old.append(time.perf_counter() - t)
            t = time.perf_counter(); sample_sparse(a.batch, a.n, S, generator=g); t_new.append(time.perf_counter() - t)
        mo, mn = statistics.median(t_old) * 1e3, statistics.median(t_new) * 1e3
        print(f"{S:6g} {mo:8.3f} {mn:8.3f} {mo / mn:8.1f}x")


if __name__ == "__main__":
    main()
