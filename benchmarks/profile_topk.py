"""Where the time of a Top-k SAE training step goes: torch.profiler tables for wsae_core and sparsify.

    .venv-bench/bin/python benchmarks/profile_topk.py [--d 768] [--m 24576] [--k 32] [--batch 4096] [--steps 2]
        [--precision fp32|bf16]

Profiles ``--steps`` steps of each library (forward + loss + backward + fused Adam + decoder-norm
handling, as in ``bench_train.py``) after one untimed step, and prints the operators by self CPU
time, grouped by input shape so that the dense ``(batch, n_m)`` work stands apart from the sparse
``(batch * k, d)`` work. Same process settings as ``bench_train.py`` (``MALLOC_MMAP_MAX_=0``,
flush-denormal). ``--only wsae_core`` or ``--only sparsify`` profiles one of them.
"""

from __future__ import annotations

import argparse
import sys

from bench_train import _reexec_with_mmap, sparsify_step, wsae_step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--m", type=int, default=24576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=18, help="operators shown per table")
    p.add_argument("--only", choices=("wsae_core", "sparsify"), default=None)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: the step under bf16 autocast")
    args = p.parse_args(argv)
    _reexec_with_mmap("0")

    import torch
    from torch.profiler import ProfilerActivity, profile

    import wsae_core.train  # noqa: F401  (flush-denormal, as for the benchmark)

    x = torch.randn(args.batch, args.d, generator=torch.Generator().manual_seed(0))
    bf16 = args.precision == "bf16"
    makers = {"wsae_core": lambda: wsae_step("topk", args.d, args.m, args.k, bf16),
              "sparsify": lambda: sparsify_step(args.d, args.m, args.k, bf16)}
    for name, make in makers.items():
        if args.only and name != args.only:
            continue
        step = make()
        step(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(args.steps):
                step(x)
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6 / args.steps
        print(f"\n{name}: Top-k {args.d} -> {args.m}, k = {args.k}, batch {args.batch}, {args.precision}, "
              f"{torch.get_num_threads()} threads; {total:.2f} s of self CPU time per step")
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                                                  max_name_column_width=40, max_shapes_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
