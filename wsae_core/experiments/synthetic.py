"""The paper's synthetic WSAE experiment (Figure 3), chapter *WSAE on synthetic data*.

n = 200 features, n_p = 20 dimensions, n_m = 200 latents; for every sparsity S in a grid, every
seed and every model (theory SAE, Top-k practical SAE) train the plain SAE and WSAEs whose Γ comes
from the variance rule ``γ_i ∝ s_i^α`` (α ∈ {−1, −0.5, 0.5, 1}; ``s_i`` the raw, winsorised or
unit-RMS variance, :func:`wsae_core.weights.dimension_variance`), the oracle rule (the true W_p) or
the learned-oracle rule (the Frobenius-optimal Γ of the dictionary the plain SAE of the same seed
learned, :func:`wsae_core.weights.learned_oracle_gamma`), then measure recovery on held-out data.
Every Γ is normalised to ``mean(γ²) = 1``.

Choices the paper leaves open (documented in the chapter): W_p = :data:`~wsae_core.data.DEFAULT_SUPERPOSITION`
(polygon blocks: 4 monosemantic dimensions, 2 digons, 7 planes of 27-28 features) fixed across
seeds (seed 0); Adam, lr 3e-2, batch 256, 400 steps (book profile), a tenth of the run as
warm-up (at most 50 steps), cosine decay to 0.1 lr; Top-k with ``k = max(1, round(n (1 - S)))`` (the
expected number of active features), AuxK on latents silent for ``dead_steps`` steps;
the variance rule uses the variance of 8,192 samples of x_p drawn at the same S. Within a seed
all methods share the initialisation and the data stream (paired comparison), so they are trained
stacked as one model (:func:`wsae_core.stacked.train_stacked`: the same numbers as separate runs, at
about the cost of one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np

from ..profile import Profile, pick

__all__ = ["METHODS", "PAPER_METHODS", "ALPHAS", "ESTIMATE_SUFFIX", "method_label", "SyntheticSpec", "spec_for",
           "run_synthetic", "summarise", "summary_table", "paired_change", "change_verdict", "change_table",
           "dead_table", "MODEL_NAMES", "describe_method", "overall", "rule_families", "oracle_recovery", "gammas_for", "topk_k"]

#: Exponents of the variance rule in the sweep (α = 0 is the plain SAE).
ALPHAS: tuple[float, ...] = (-1.0, -0.5, 0.5, 1.0)
#: Label suffix of each variance estimate (the paper's raw variance has none).
ESTIMATE_SUFFIX = {"raw": "", "winsorised": " winsor", "unit_rms": " unit-RMS"}


def method_label(alpha: float, estimate: str = "raw") -> str:
    """Label of the variance rule with exponent ``alpha`` and ``estimate``, e.g. ``"WSAE α=-0.5 unit-RMS"``."""
    return f"WSAE α={alpha:g}{ESTIMATE_SUFFIX[estimate]}"


#: (label, rule, alpha, variance estimate) of each method; "SAE" is the uniform rule.
METHODS: tuple[tuple[str, str, float, str | None], ...] = (
    ("SAE", "uniform", 0.0, None),
    *((method_label(a, e), "variance", a, e) for e in ESTIMATE_SUFFIX for a in ALPHAS),
    ("WSAE oracle", "oracle", 0.0, None),
    ("WSAE learned oracle", "learned_oracle", 0.0, None),
)
#: The methods of the paper's own comparison (its variance rule with α > 0 and the oracle).
PAPER_METHODS = ("SAE", "WSAE α=0.5", "WSAE α=1", "WSAE oracle")


@dataclass
class SyntheticSpec:
    """Size of the synthetic sweep; :func:`spec_for` gives the per-profile values."""

    S_grid: tuple[float, ...] = (0.0, 0.5, 0.9, 0.97, 0.99, 0.999)
    """Sparsities, from dense (0) to extremely sparse."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Training seeds (initialisation and data stream)."""
    models: tuple[str, ...] = ("theory", "topk")
    """SAE kinds: ``"theory"`` (tied, no bias) and/or ``"topk"`` (practical)."""
    methods: tuple[str, ...] = tuple(m[0] for m in METHODS)
    """Labels from :data:`METHODS` ("WSAE learned oracle" needs "SAE": its Γ comes from that run)."""
    n: int = 200
    """Ground-truth features."""
    n_p: int = 20
    """Dimensions of x_p."""
    n_m: int = 200
    """SAE latents."""
    superposition: str = "polygons"
    """How W_p is made (:func:`wsae_core.data.synthetic_superposition`)."""
    W_p_seed: int = 0
    """Seed of W_p (the same W_p for every training seed)."""
    steps: int = 800
    """Optimiser steps per run."""
    batch_size: int = 512
    """Samples per step."""
    lr: float = 3e-2
    """Peak Adam learning rate."""
    workers: int | None = None
    """Worker processes (None = one per core, at most 4; 1 = in this process, best for tiny runs)."""
    eval_samples: int = 8192
    """Held-out samples for the metrics (and for the variance rule)."""
    log_every: int = 50
    """Steps between two points of the recorded training curves."""
    dead_steps: int = 50
    """A latent silent for this many steps is dead (AuxK revives it; the learned oracle leaves it out).
    Shorter than the trainer's default, which is made for longer runs: with 400 steps of 256 samples,
    50 steps are 12,800 samples, in which a latent of a feature active once in a thousand samples
    still fires about 13 times."""

    def __post_init__(self):
        known = {m[0] for m in METHODS}
        bad = [m for m in self.methods if m not in known]
        if bad:
            raise ValueError(f"methods must be among {sorted(known)}, got {bad}")
        if "WSAE learned oracle" in self.methods and "SAE" not in self.methods:
            raise ValueError("method 'WSAE learned oracle' needs 'SAE' in methods (its Γ comes from the plain SAE's dictionary)")
        bad = [m for m in self.models if m not in ("theory", "topk")]
        if bad:
            raise ValueError(f"models must be 'theory' and/or 'topk', got {bad}")
        from . import check_spec

        check_spec(self, {"n": 1, "n_p": 1, "n_m": 1, "W_p_seed": 0, "steps": 1, "batch_size": 1, "eval_samples": 2,
                          "log_every": 1, "dead_steps": 1}, self.S_grid, self.seeds)
        if not self.S_grid or not self.seeds or not self.methods or not self.models:
            raise ValueError("S_grid, seeds, methods and models must each name at least one value")


def spec_for(profile: Profile | None = None, **overrides: Any) -> SyntheticSpec:
    """The sweep for a profile: ``ci`` (seconds: two sparsities, three seeds, short runs), ``book``
    (default), ``paper`` (more steps and seeds, a finer S grid)."""
    spec = SyntheticSpec(
        S_grid=pick(ci=(0.0, 0.99), book=(0.0, 0.5, 0.9, 0.97, 0.99, 0.999),
                    paper=(0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999), profile=profile),
        seeds=pick(ci=(0, 1, 2), book=(0, 1, 2), paper=tuple(range(10)), profile=profile),
        steps=pick(ci=100, book=400, paper=10_000, profile=profile),
        batch_size=pick(ci=64, book=256, paper=4096, profile=profile),
        eval_samples=pick(ci=2048, book=8192, paper=65_536, profile=profile),
        workers=pick(ci=1, book=None, profile=profile),
        log_every=pick(ci=20, book=20, paper=250, profile=profile),
        dead_steps=pick(ci=20, book=50, paper=500, profile=profile),
    )
    return replace(spec, **overrides)


def topk_k(n: int, S: float, n_m: int) -> int:
    """Top-k's k for sparsity S: the expected number of active features ``round(n (1 - S))``, in [1, n_m]."""
    return int(min(n_m, max(1, round(n * (1 - S)))))


def gammas_for(W_p: np.ndarray, S: float, seed: int, n_samples: int = 8192,
               methods: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """γ ``(n_p,)`` of every method for this W_p and S, except the learned oracle (it needs a trained
    SAE). Variances from ``n_samples`` samples of x_p drawn with seed ``10_000 + seed``; the
    ``unit_rms`` estimate leaves out the samples with no active feature (x_p = 0 has no RMS to
    scale by). ``methods`` restricts the labels computed."""
    import torch

    from ..data import SparseSource
    from ..weights import make_gamma

    wanted = [m for m in METHODS if (methods is None or m[0] in methods) and m[1] != "learned_oracle"]
    x_p = None
    if any(rule == "variance" for _, rule, _, _ in wanted):
        _, x_p = SparseSource(W_p, S).sample_pair(n_samples, torch.Generator().manual_seed(10_000 + seed))
    n_p = W_p.shape[0]
    out = {}
    for label, rule, alpha, estimate in wanted:
        if rule == "oracle":
            out[label] = _oracle_gamma(np.ascontiguousarray(W_p, dtype=np.float64).tobytes(), W_p.shape)
        elif rule == "variance":
            sample = x_p[x_p.abs().sum(1) > 0] if estimate == "unit_rms" else x_p
            out[label] = make_gamma(rule, n_p=n_p, alpha=alpha, x_p=sample, estimate=estimate).numpy()
        else:
            out[label] = make_gamma(rule, n_p=n_p).numpy()
    return out


@lru_cache(maxsize=8)
def _oracle_gamma(W_bytes: bytes, shape: tuple[int, int]) -> np.ndarray:
    # Once per W_p, not per run.
    from ..weights import oracle_gamma

    W = np.frombuffer(W_bytes, dtype=np.float64).reshape(shape)
    g = oracle_gamma(W).numpy()
    g.setflags(write=False)
    return g


def _record(sae, x, W_p, history: list[dict], dead_since, cfg, base: dict, gamma) -> dict:
    """Metrics of one trained SAE (:func:`wsae_core.metrics.evaluate_recovery` on held-out ``x``),
    with its training curve and its dead fraction at the end of training."""
    from ..metrics import evaluate_recovery

    out = dict(base)
    out.update(evaluate_recovery(sae, x, W_p))
    out["train_fvu"] = history[-1]["fvu"]
    out["train_dead"] = float((dead_since >= min(cfg.dead_steps, cfg.steps)).float().mean())
    out["curve"] = {key: [h[key] for h in history] for key in ("step", "fvu", "loss", "dead_fraction")}
    out["gamma"] = [float(v) for v in gamma]
    return out


def _run_group(task: dict) -> list[dict]:
    """Every method of one (S, seed, model), trained stacked: ``task`` holds W_p, S, seed, model,
    the methods and the spec's sizes. The learned oracle trains after the plain SAE whose
    dictionary (decoder rows of its live latents) gives its Γ."""
    import torch

    from ..data import SparseSource
    from ..models import SAEConfig, build_sae
    from ..stacked import train_stacked
    from ..train import TrainConfig
    from ..weights import make_gamma

    spec = SyntheticSpec(**task["spec"])
    W_p = np.asarray(task["W_p"])
    S, seed, model = task["S"], task["seed"], task["model"]
    methods = [m for m in spec.methods if m != "WSAE learned oracle"]
    gammas = gammas_for(W_p, S, seed, spec.eval_samples, methods=tuple(methods))
    if task.get("oracle") is not None and "WSAE oracle" in gammas:
        gammas["WSAE oracle"] = np.asarray(task["oracle"])
    k = topk_k(spec.n, S, spec.n_m) if model == "topk" else None
    sae_cfg = SAEConfig(n_p=spec.n_p, n_m=spec.n_m, kind=model, k=k, seed=seed)
    src = SparseSource(W_p, S)
    cfg = TrainConfig(steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr, warmup_steps=min(50, spec.steps // 10),
                      seed=seed, log_every=spec.log_every, dead_steps=spec.dead_steps, progress=False, threads=1,
                      precision="fp32")
    x, _ = src.sample_pair(spec.eval_samples, torch.Generator().manual_seed(20_000 + seed))
    base = {"S": S, "seed": seed, "model": model, "k": k}
    saes, hist, since = train_stacked([build_sae(sae_cfg) for _ in methods], src, cfg,
                                      [None if m == "SAE" else gammas[m] for m in methods])
    out = [_record(sae, x, W_p, h, d, cfg, {**base, "method": m}, gammas[m]) for m, sae, h, d in zip(methods, saes, hist, since)]
    if "WSAE learned oracle" in spec.methods:
        i = methods.index("SAE")
        alive = since[i] < min(cfg.dead_steps, cfg.steps)
        g = make_gamma("learned_oracle", n_p=spec.n_p, directions=saes[i].feature_directions(), alive=alive).numpy()
        (sae,), (h,), (d,) = train_stacked([build_sae(sae_cfg)], src, cfg, [g])
        out.append(_record(sae, x, W_p, h, d, cfg, {**base, "method": "WSAE learned oracle"}, g))
    return out


def run_synthetic(spec: SyntheticSpec | None = None, workers: int | None = None) -> list[dict]:
    """Run the whole grid (S x seeds x models x methods); one record (dict of metrics) per run.

    Metrics per record: see :func:`wsae_core.metrics.evaluate_recovery` (``dead``: latents that never
    fire on the held-out data); plus S, seed, model, method, k (Top-k), the last training FVU
    (``train_fvu``), the fraction of latents that did not fire in the last ``dead_steps`` training
    steps (``train_dead``), the training curve (``curve``: step, fvu, loss, dead_fraction) and Γ
    (``gamma``).
    """
    from ..data import synthetic_superposition
    from . import run_tasks

    spec = spec or spec_for()
    W_p = synthetic_superposition(spec.superposition, spec.n, spec.n_p, seed=spec.W_p_seed)
    oracle = gammas_for(W_p, 0.0, 0, methods=("WSAE oracle",))["WSAE oracle"].tolist() if "WSAE oracle" in spec.methods else None
    tasks = [{"spec": asdict(spec), "W_p": W_p.tolist(), "oracle": oracle, "S": S, "seed": s, "model": m}
             for m in spec.models for S in spec.S_grid for s in spec.seeds]
    # Longest runs first (dense data, large k) so that the workers finish together.
    order = sorted(range(len(tasks)), key=lambda i: (tasks[i]["S"], tasks[i]["model"] != "topk"))
    results = run_tasks(_run_group, [tasks[i] for i in order], spec.workers if workers is None else workers)
    back: list[list[dict]] = [[] for _ in tasks]
    for i, r in zip(order, results):
        back[i] = r
    return [r for group in back for r in group]


def summarise(records: list[dict], metric: str, model: str) -> dict[str, dict[str, np.ndarray]]:
    """``{method: {"S": (n_S,), "mean": (n_S,), "sem": (n_S,)}}`` of ``metric`` over seeds."""
    out: dict[str, dict[str, np.ndarray]] = {}
    rows = [r for r in records if r["model"] == model]
    if not rows:
        raise ValueError(f"no records for model {model!r}")
    for method in dict.fromkeys(r["method"] for r in rows):
        Ss = sorted({r["S"] for r in rows if r["method"] == method})
        vals = [np.array([r[metric] for r in rows if r["method"] == method and r["S"] == S]) for S in Ss]
        out[method] = {
            "S": np.array(Ss),
            "mean": np.array([v.mean() for v in vals]),
            "sem": np.array([v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0.0 for v in vals]),
        }
    return out


def paired_change(records: list[dict], metric: str, model: str, method: str, baseline: str = "SAE",
                  level: float = 0.95) -> dict[str, np.ndarray]:
    """Relative change of ``metric`` for ``method`` vs ``baseline`` at each S, paired by seed:
    ``(method - baseline) / baseline``. Returns ``{"S", "mean", "sem", "ci", "n"}`` ``(n_S,)`` each,
    with ``ci`` the half-width of the Student-t ``level`` interval of the mean over ``n`` seeds
    (NaN with fewer than 2 seeds). Negative = lower than the baseline."""
    from scipy.stats import t as student_t

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rows = [r for r in records if r["model"] == model]
    Ss = sorted({r["S"] for r in rows})
    means, sems, cis, ns = [], [], [], []
    for S in Ss:
        base = {r["seed"]: r[metric] for r in rows if r["S"] == S and r["method"] == baseline}
        new = {r["seed"]: r[metric] for r in rows if r["S"] == S and r["method"] == method}
        d = np.array([(new[s] - base[s]) / base[s] for s in base if s in new and base[s] != 0])
        sem = d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else np.nan
        means.append(d.mean() if d.size else np.nan)
        sems.append(sem)
        cis.append(student_t.ppf(0.5 + level / 2, d.size - 1) * sem if d.size > 1 else np.nan)
        ns.append(d.size)
    return {"S": np.array(Ss), "mean": np.array(means), "sem": np.array(sems), "ci": np.array(cis),
            "n": np.array(ns)}


def change_verdict(mean: float, ci: float) -> str:
    """``"lower"`` or ``"higher"`` when the interval ``mean ± ci`` excludes 0, else ``"no clear
    change"`` (also when ``ci`` is NaN: one seed cannot decide)."""
    if not np.isfinite(ci) or abs(mean) <= ci:
        return "no clear change"
    return "lower" if mean < 0 else "higher"


def summary_table(records: list[dict], metric: str, model: str, digits: int = 3) -> str:
    """A plain-text table: one row per S, one column per method, ``mean ± sem`` over seeds."""
    summ = summarise(records, metric, model)
    methods = list(summ)
    head = f"{metric} ({model} SAE), mean ± s.e.m. over seeds"
    cols = ["S".rjust(6)] + [m.rjust(18) for m in methods]
    lines = [head, " ".join(cols)]
    for i, S in enumerate(summ[methods[0]]["S"]):
        cells = [f"{S:6g}"] + [f"{summ[m]['mean'][i]:.{digits}g} ± {summ[m]['sem'][i]:.1g}".rjust(18) for m in methods]
        lines.append(" ".join(cells))
    return "\n".join(lines)


def change_table(records: list[dict], metric: str, model: str, baseline: str = "SAE",
                 methods: list[str] | None = None) -> str:
    """Plain-text table of :func:`paired_change` in percent for every method (or ``methods``) against
    ``baseline``: one row per method, one column per S, ``mean ± half-width of the 95% t interval``
    over seeds; ``*`` marks intervals that exclude 0 (negative = lower than the baseline)."""
    if methods is None:
        methods = [m for m in dict.fromkeys(r["method"] for r in records if r["model"] == model) if m != baseline]
    ch = {m: paired_change(records, metric, model, m, baseline) for m in methods}
    n = int(ch[methods[0]]["n"].max())
    lines = [f"{model} SAE: change of {metric} vs {baseline} (%), mean ± 95% CI over {n} seeds (* excludes 0)",
             f"{'S =':>22s}" + "".join(f"{S:>18g} " for S in ch[methods[0]]["S"])]
    for m in methods:
        cells = []
        for mu, ci in zip(100 * ch[m]["mean"], 100 * ch[m]["ci"]):
            star = "*" if change_verdict(mu, ci) != "no clear change" else " "
            cells.append(f"{mu:+8.1f} ±{ci:7.1f}{star}")
        lines.append(f"{m:>22s}" + "".join(f"{c:>19s}" for c in cells))
    return "\n".join(lines)


def dead_table(records: list[dict], model: str, key: str = "dead") -> str:
    """Plain-text table of the dead-latent percentage per method (rows) and S (columns), mean and
    largest over seeds: ``key`` = ``"dead"`` (never fire on the held-out data) or ``"train_dead"``
    (did not fire in the last ``dead_steps`` training steps)."""
    rows = [r for r in records if r["model"] == model]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    Ss = sorted({r["S"] for r in rows})
    what = "never firing on held-out data" if key == "dead" else "not firing in the last training steps"
    lines = [f"{model} SAE: dead latents (%, {what}), mean (max) over seeds",
             f"{'S =':>22s}" + "".join(f"{S:>14g}" for S in Ss)]
    for m in methods:
        cells = []
        for S in Ss:
            v = 100 * np.array([r[key] for r in rows if r["method"] == m and r["S"] == S])
            cells.append(f"{v.mean():5.1f} ({v.max():4.1f})")
        lines.append(f"{m:>22s}" + "".join(f"{c:>14s}" for c in cells))
    return "\n".join(lines)


#: How the chapter names each model kind.
MODEL_NAMES = {"theory": "theory SAE", "topk": "Top-k SAE"}


def _pct(v: float) -> str:
    return f"{100 * v:+.1f} %".replace("-", "−")


def describe_method(records: list[dict], model: str, method: str, metric: str = "l_gt_nonzero",
                    baseline: str = "SAE") -> str:
    """One Markdown sentence on ``method`` against ``baseline`` for ``model``, every number and verdict
    word computed from ``records``: at which S ``metric`` is significantly lower or higher (95% t
    interval over seeds), and the change of the x_p reconstruction error at the lowest S. Chapter
    *WSAE on synthetic data* glues it into its text, so a re-run can never contradict the page."""
    ch = paired_change(records, metric, model, method, baseline)
    rec = paired_change(records, "recon_x_p", model, method, baseline)
    parts = {"lower": [], "higher": []}
    for S, mu, ci in zip(ch["S"], ch["mean"], ch["ci"]):
        v = change_verdict(mu, ci)
        if v != "no clear change":
            parts[v].append(f"$S = {S:g}$ ({_pct(mu)} ± {100 * ci:.1f})")
    said = []
    for word in ("lower", "higher"):
        if parts[word]:
            said.append(f"{word} at " + ", ".join(parts[word]))
    n_quiet = len(ch["S"]) - len(parts["lower"]) - len(parts["higher"])
    if not said:
        body = f"no change beyond its 95 % interval at any of the {len(ch['S'])} sparsities"
    else:
        body = "; ".join(said) + (f"; within noise at the other {n_quiet} sparsit{'y' if n_quiet == 1 else 'ies'}"
                                  if n_quiet else "")
    return (f"**{method}**: error per active coordinate: {body}. Reconstruction error of $x_p$ at "
            f"$S = {rec['S'][0]:g}$: {_pct(rec['mean'][0])}.")


def overall(records: list[dict], metric: str = "l_gt_nonzero", baseline: str = "SAE") -> dict[str, str]:
    """Markdown sentences summarising the whole sweep for the chapter's verdict, each number and verdict
    word computed from ``records`` (see :func:`describe_method`). Keys: ``helps`` (where some WSAE
    lowers ``metric`` beyond its 95% interval), ``hurts`` (where some WSAE raises it), ``variance``
    (what the variance rule does for each model) and ``recon`` (the x_p reconstruction cost at the
    lowest S of every method)."""
    models = list(dict.fromkeys(r["model"] for r in records))
    methods = [m for m in dict.fromkeys(r["method"] for r in records) if m != baseline]
    ch = {(mo, me): paired_change(records, metric, mo, me, baseline) for mo in models for me in methods}
    rec = {(mo, me): paired_change(records, "recon_x_p", mo, me, baseline) for mo in models for me in methods}

    def where(word: str) -> str:
        parts = []
        for mo in models:
            hits = [(S, me, mu) for me in methods for S, mu, ci in zip(ch[mo, me]["S"], ch[mo, me]["mean"], ch[mo, me]["ci"])
                    if change_verdict(mu, ci) == word]
            if not hits:
                parts.append(f"{MODEL_NAMES[mo]}: at no sparsity")
                continue
            Ss = sorted({S for S, _, _ in hits})
            S_best, me_best, mu_best = max(hits, key=lambda h: abs(h[2]))
            parts.append(f"{MODEL_NAMES[mo]}: at $S \\in \\{{{', '.join(f'{S:g}' for S in Ss)}\\}}$ (largest: {me_best}, "
                         f"{_pct(mu_best)} at $S = {S_best:g}$)")
        return "; ".join(parts)

    var = [me for me in methods if me in ("WSAE α=0.5", "WSAE α=1")]
    vparts = []
    for mo in models:
        low = sorted({f"{S:g}" for me in var for S, mu, ci in zip(ch[mo, me]["S"], ch[mo, me]["mean"], ch[mo, me]["ci"])
                      if change_verdict(mu, ci) == "lower"})
        high = sorted({f"{S:g}" for me in var for S, mu, ci in zip(ch[mo, me]["S"], ch[mo, me]["mean"], ch[mo, me]["ci"])
                       if change_verdict(mu, ci) == "higher"})
        vparts.append(f"for the {MODEL_NAMES[mo]} it lowers the error at "
                      + (f"$S \\in \\{{{', '.join(low)}\\}}$" if low else "no sparsity")
                      + " and raises it at " + (f"$S \\in \\{{{', '.join(high)}\\}}$" if high else "no sparsity"))
    S0 = rec[models[0], methods[0]]["S"][0]
    rparts = [f"{MODEL_NAMES[mo]}: " + ", ".join(f"{me} {_pct(rec[mo, me]['mean'][0])}" for me in methods) for mo in models]
    return {
        "helps": "Lower error per active coordinate, beyond the 95 % interval: " + where("lower") + ".",
        "hurts": "Higher error per active coordinate, beyond the 95 % interval: " + where("higher") + ".",
        "variance": "The variance rule (α = 0.5 or 1): " + "; ".join(vparts) + ".",
        "recon": f"Change of the (unweighted) $x_p$ reconstruction error at $S = {S0:g}$: " + "; ".join(rparts) + ".",
    }


_ESTIMATE_NAME = {"raw": "raw", "winsorised": "winsorised", "unit_rms": "unit-RMS"}


def rule_families(methods: list[str]) -> dict[str, list[str]]:
    """The rules whose verdict the chapter gives, each with its methods among ``methods``: the
    variance rule per estimate and sign of α (e.g. ``"raw variance, α < 0"``), and the learned oracle."""
    fam: dict[str, list[str]] = {}
    for est in ESTIMATE_SUFFIX:
        for sign, keep in (("α < 0", lambda a: a < 0), ("α > 0", lambda a: a > 0)):
            ms = [method_label(a, est) for a in ALPHAS if keep(a) and method_label(a, est) in methods]
            if ms:
                fam[f"{_ESTIMATE_NAME[est]} variance, {sign}"] = ms
    if "WSAE learned oracle" in methods:
        fam["learned oracle"] = ["WSAE learned oracle"]
    return fam


def _at(Ss: list[float]) -> str:
    return f"$S \\in \\{{{', '.join(f'{S:g}' for S in Ss)}\\}}$" if Ss else "no sparsity"


def oracle_recovery(records: list[dict], model: str, metric: str = "l_gt_nonzero") -> dict[str, dict[str, Any]]:
    """Does a rule recover the oracle's gains? For ``model``, per family of :func:`rule_families`:

    the oracle's gains are the sparsities where ``WSAE oracle`` lowers ``metric`` against the SAE
    beyond its 95 % interval (paired by seed). A method *recovers* a gain where it too lowers
    ``metric`` beyond its interval, and *falls short* where its paired difference from the oracle
    is positive beyond its interval. Returns ``{family: {"word", "recovered", "short", "text"}}``
    (``word``: ``"recovers"`` = some method recovers every gain and falls short at none,
    ``"partly"``, ``"does not"``, or ``"nothing to recover"``) and ``"oracle"``: ``{"gains", "text"}``.
    """
    methods = list(dict.fromkeys(r["method"] for r in records if r["model"] == model))
    orc = paired_change(records, metric, model, "WSAE oracle")
    gains = [S for S, mu, ci in zip(orc["S"], orc["mean"], orc["ci"]) if change_verdict(mu, ci) == "lower"]
    pieces = [f"$S = {S:g}$ ({_pct(mu)} ± {100 * ci:.1f})" for S, mu, ci in zip(orc["S"], orc["mean"], orc["ci"])
              if S in gains]
    out: dict[str, dict[str, Any]] = {"oracle": {
        "gains": gains,
        "text": (f"The oracle lowers the error per active coordinate of the {MODEL_NAMES[model]} beyond its interval at "
                 + (", ".join(pieces) if pieces else "no sparsity") + ".")}}
    for fam, ms in rule_families(methods).items():
        said, words = [], []
        recovered, short = {}, {}
        for m in ms:
            ch = paired_change(records, metric, model, m)
            vs = paired_change(records, metric, model, m, baseline="WSAE oracle")
            v = {S: change_verdict(mu, ci) for S, mu, ci in zip(ch["S"], ch["mean"], ch["ci"])}
            w = {S: change_verdict(mu, ci) for S, mu, ci in zip(vs["S"], vs["mean"], vs["ci"])}
            recovered[m] = [S for S in gains if v[S] == "lower"]
            short[m] = [S for S in gains if w[S] == "higher"]
            low = [S for S in v if v[S] == "lower"]
            high = [S for S in v if v[S] == "higher"]
            said.append(f"{m} lowers the error at {_at(low)}, raises it at {_at(high)}"
                        + (f", and falls short of the oracle at {_at(short[m])}" if gains else ""))
            words.append("recovers" if gains and recovered[m] == gains and not short[m]
                         else "partly" if recovered[m] else "does not")
        word = ("nothing to recover" if not gains else "recovers" if "recovers" in words
                else "partly" if "partly" in words else "does not")
        head = {"recovers": "recovers the oracle's gains", "partly": "recovers part of the oracle's gains",
                "does not": "does not recover the oracle's gains", "nothing to recover": "(the oracle has no gain to recover)"}[word]
        out[fam] = {"word": word, "recovered": recovered, "short": short,
                    "text": f"**{fam}** {head}: " + "; ".join(said) + "."}
    return out
