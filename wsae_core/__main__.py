"""``python -m wsae_core COMMAND [options]``: every experiment and tool of the library, one command line.

A thin dispatcher: the experiments keep their own runners (``python -m wsae_core.experiments ...``
works as before and takes the same options); ``export``, ``import`` and ``browser`` are defined here
over :mod:`wsae_core.interop` and :mod:`wsae_core.browser`.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from .profile import PROFILES

PROG = "python -m wsae_core"
ROOT = Path(__file__).resolve().parents[1]

HELP = f"""usage: {PROG} COMMAND [options]     ({PROG} COMMAND --help for a command's options)

Experiments (sized by --profile ci | book | paper, default $WSAE_PROFILE or book):
  synthetic    the paper's synthetic experiment (Figure 3): SAE vs WSAEs over sparsity and seeds
  theory       closed form, extreme sparsity and identifiability reached by gradient descent
  lm           the language-model layer sweep (Table 1's layout): per layer a Top-k SAE and WSAEs,
               FVU, L0, dead latents, CE-loss recovered, offline interpretability proxies
  interp       auto-interpretability scoring: `interp calibration` (planted and random latents),
               `interp sweep` (explain, detect and fuzz sampled latents of the sweep's SAEs)

Tools:
  export       write trained SAEs (any format) for SAELens or EleutherAI sparsify
  import       read SAELens / sparsify SAEs into this library's format (metrics, splicing, scorers)
  browser      build the latent browser's data (top and quantile contexts, histograms, explanations,
               nearest latents) from the sweep's SAEs and activation cache
  benchmark    speed benchmarks (`benchmark train` vs SAELens and sparsify, `benchmark sampler`; benchmarks/)

Options shared by the commands that take them:
  --profile {{{",".join(PROFILES)}}}   run size (ci: seconds, book: the book's runs, paper: the paper's sizes)
  --device cpu|cuda            where models run (same code on both)
  --out PATH                   where results, SAEs or data are written
  --workers N                  worker processes for grids of small runs
"""


def _experiments(name: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        from .experiments.__main__ import main

        return main([name, *argv])

    return run


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.replace("α=", "alpha")).strip("_") or "sae"


def _export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{PROG} export", description=(
        "Write SAEs for SAELens (cfg.json + sae_weights.safetensors) or sparsify (cfg.json + "
        "sae.safetensors per hook point). Each SAE goes to OUT/<method>/<hook>, so a sparsify run "
        "folder OUT/<method> opens with sparsify.Sae.load_many(..., local=True)."))
    p.add_argument("paths", nargs="*", help="SAE folders (this library's, SAELens's or sparsify's)")
    p.add_argument("--format", required=True, choices=["saelens", "sparsify"])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sweep", default=None, help="a layer sweep's results JSON: export every SAE it trained")
    p.add_argument("--model-name", default=None, help="the model's name (default: from the SAE's metadata)")
    p.add_argument("--hook-name", default=None, help="SAELens hook name / sparsify hook point (default: from the layer)")
    args = p.parse_args(argv)
    from tqdm.auto import tqdm

    from . import interop as X

    paths = [Path(s) for s in args.paths] + ([Path(r["sae_dir"]) for r in _sweep(args.sweep, None)[1]] if args.sweep else [])
    if not paths:
        p.error("give SAE folders or --sweep RESULTS.json")
    if args.hook_name and len(paths) > 1:
        p.error(f"--hook-name names one SAE's hook; got {len(paths)} SAEs")
    out = Path(args.out)
    for path in tqdm(paths, desc="export", unit="SAE", disable=len(paths) < 2):
        sae = X.load(path)
        group = out / _slug(str(sae.meta.get("method") or path.name))
        if args.format == "saelens":
            hook = args.hook_name or (X.saelens_hook_name(sae.layer) if sae.layer is not None else path.name)
            dest = X.to_saelens(sae, group / hook, model_name=args.model_name, hook_name=hook)
        else:
            dest = X.to_sparsify(sae, group, hookpoint=args.hook_name, model_name=args.model_name)
        print(f"{path} -> {dest}")
    return 0


def _import(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{PROG} import", description=(
        "Read SAEs saved by SAELens or sparsify (or by this library) and save them in this library's "
        "format (model.safetensors + cfg.json with scale and Γ), which load_sae, the metrics, splicing "
        "and the scorers read."))
    p.add_argument("paths", nargs="+", help="SAE folders")
    p.add_argument("--out", required=True, help="output folder (one subfolder per SAE)")
    p.add_argument("--scale", type=float, default=None,
                   help="scale the SAE divides raw activations by (default: from its metadata, else 1)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from . import interop as X

    for path in map(Path, args.paths):
        sae = X.load(path, scale=args.scale, device=args.device)
        dest = X.to_wsae(sae, Path(args.out) / _slug(path.name))
        c = sae.model.cfg
        print(f"{path} ({sae.meta['source_format']}) -> {dest}: {c.kind}, n_p {c.n_p}, n_m {c.n_m}"
              f"{f', k {c.k}' if c.k else ''}, scale {sae.scale:g}, Γ {'yes' if sae.gamma is not None else 'no'}")
    return 0


def _sweep(results: str | Path | None, profile: str | None, layer: int | None = None,
           seed: int | None = None) -> tuple[dict, list[dict]]:
    """A layer sweep's results (default: the profile's committed file) and the records of its trained
    SAEs (every rule but the untrained control; at ``layer`` and of ``seed``, if given), checked to
    be on this machine."""
    import json

    from .experiments.lm import resolve_path, results_path
    from .profile import current_profile

    profile = profile or current_profile()
    path = Path(results) if results else results_path(profile)
    sweep = json.loads(path.read_text())
    trained = [r for r in sweep["records"] if r.get("sae_dir") and r.get("rule") != "untrained"]
    layers = sorted({r["layer"] for r in trained})
    if layer is not None and layer not in layers:
        raise SystemExit(f"{path} has no trained SAE at layer {layer}; layers: {layers}")
    at = [r for r in trained if layer is None or r["layer"] == layer]
    seeds = sorted({r["seed"] for r in at})
    if seed is not None and seed not in seeds:
        raise SystemExit(f"{path} has no trained SAE of seed {seed}{f' at layer {layer}' if layer is not None else ''}; "
                         f"seeds: {seeds}")
    recs = [r for r in at if seed is None or r["seed"] == seed]
    if not recs:
        raise SystemExit(f"{path} has no trained SAE; its records: {len(sweep['records'])}")
    recs = [dict(r, sae_dir=str(resolve_path(r["sae_dir"]))) for r in recs]  # saved relative to the cache root
    missing = [r["sae_dir"] for r in recs if not Path(r["sae_dir"]).is_dir()]
    if missing:
        raise SystemExit(f"{len(missing)} SAE folders of {path} are not on this machine (first: {missing[0]}); "
                         f"rerun the sweep: {PROG} lm --profile {profile}")
    return sweep, recs


def _browser(argv: list[str]) -> int:
    import json

    from .activations import ActivationCache
    from .browser import build_latent_browser, write_latent_browser
    from .experiments.interp import load_tokenizer
    from .experiments.lm import describe, resolve_path
    from .interp import token_strings

    p = argparse.ArgumentParser(prog=f"{PROG} browser", description=(
        "Build the latent browser's data from a layer sweep's SAEs and activation cache "
        f"({PROG} lm writes both) and, optionally, an auto-interpretability run's explanations."))
    p.add_argument("--profile", choices=PROFILES, default=None, help="which sweep (default: $WSAE_PROFILE or book)")
    p.add_argument("--sweep", default=None, help="the sweep's results JSON (default: book/results/lm_sweep_<profile>.json)")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--explanations", default=None,
                   help="an auto-interpretability run's results JSON (interp sweep or interp score): explanations and scores")
    p.add_argument("--sae-seed", type=int, default=0,
                   help="which of the sweep's training seeds to show (its SAEs and their explanations)")
    p.add_argument("--latents", type=int, default=12,
                   help="latents sampled per SAE, explained ones first (besides the paired ones)")
    p.add_argument("--pair-from", nargs="*", default=None, metavar="METHOD",
                   help="add the nearest latent in every other SAE only for these SAEs' samples (default: every SAE's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents' sampling")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="data file to write (the book's: book/browser_assets/latent_browser/data.js)")
    args = p.parse_args(argv)
    sweep, recs = _sweep(args.sweep, args.profile, args.layer, args.sae_seed)
    methods = [r["method"] for r in recs]
    if len(set(methods)) != len(methods):
        raise SystemExit(f"the sweep has several SAEs of one method at layer {args.layer}, seed {args.sae_seed}: {methods}")
    cache_dir = resolve_path(sweep["cache"]["folder"])
    if not cache_dir.is_dir():
        raise SystemExit(f"the sweep's activation cache {cache_dir} is not on this machine; rerun the sweep: {PROG} lm")
    spec = sweep["spec"]
    expl = json.loads(Path(args.explanations).read_text()) if args.explanations else None
    data = build_latent_browser({r["method"]: r["sae_dir"] for r in recs}, ActivationCache(cache_dir), args.layer,
                                token_strings(load_tokenizer(sweep["model_info"]["name"])), explanations=expl,
                                sae_seed=args.sae_seed, n_latents=args.latents,
                                paired=True if args.pair_from is None else args.pair_from,
                                contexts=range(0, spec["n_train_contexts"]),
                                skip_first=spec["skip_first"], seed=args.seed, device=args.device,
                                description=describe(sweep))
    out = write_latent_browser(data, args.out)
    print(f"wrote {out}: {len(data['latents'])} latents of {len(data['saes'])} SAEs at layer {args.layer}, "
          f"seed {args.sae_seed}, {out.stat().st_size / 1024:.0f} KiB")
    return 0


def _benchmark(argv: list[str]) -> int:
    import runpy

    folder = ROOT / "benchmarks"
    names = sorted(f.stem[len("bench_"):] for f in folder.glob("bench_*.py")) if folder.is_dir() else []
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in names:
        print(f"usage: {PROG} benchmark NAME [options]   (NAME --help for its options)\n"
              f"benchmarks in {folder}: {', '.join(names) or 'none (they ship with the repository, not the package)'}\n"
              "See benchmarks/README.md for the environment they need (SAELens, sparsify).")
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    sys.argv = [str(folder / f"bench_{argv[0]}.py"), *argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "synthetic": _experiments("synthetic"),
    "theory": _experiments("theory"),
    "lm": _experiments("lm"),
    "interp": _experiments("interp"),
    "export": _export,
    "import": _import,
    "browser": _browser,
    "benchmark": _benchmark,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"{PROG}: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(HELP, file=sys.stderr)
        return 2
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
