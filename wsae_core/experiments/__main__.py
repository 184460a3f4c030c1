"""``python -m wsae_core.experiments {synthetic,theory} --profile {ci,book,paper} [--out FILE]``;
``python -m wsae_core.experiments lm --profile {ci,book,paper}`` (see ``experiments/lm.py``);
``python -m wsae_core.experiments interp [calibration|sweep] --profile ...`` (``experiments/interp.py``)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import output_file, positive_int


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm"]:  # the language-model layer sweep has its own options (experiments/lm.py)
        from .lm import main as lm_main

        return lm_main(argv[1:])
    if argv[:1] == ["interp"]:  # auto-interpretability: calibration and sweep (experiments/interp.py)
        from .interp import main as interp_main

        return interp_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m wsae_core.experiments", description=__doc__)
    # lm and interp are dispatched above (they have options of their own: `... lm --help`).
    parser.add_argument("experiment", choices=["synthetic", "theory", "lm", "interp"])
    parser.add_argument("--profile", choices=["ci", "book", "paper"], default=None,
                        help="run size (default: WSAE_PROFILE or 'book')")
    parser.add_argument("--workers", type=positive_int, default=None, help="worker processes (default: CPU count, <= 4)")
    parser.add_argument("--out", type=output_file, default=None, help="write all records as JSON to this file")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.experiment == "synthetic":
        from .synthetic import change_table, dead_table, run_synthetic, spec_for

        spec = spec_for(args.profile)
        records = run_synthetic(spec, workers=args.workers)
        for model in spec.models:
            print(change_table(records, "l_gt_nonzero", model))
            print(change_table(records, "recon_x_p", model))
            print(dead_table(records, model))
    else:
        from .theory import run_theory, spec_for, summary_table

        spec = spec_for(args.profile)
        records = run_theory(spec, workers=args.workers)
        print(summary_table(records))
    print(f"{len(records)} runs in {time.perf_counter() - t0:.1f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
