"""The paper's synthetic WSAE experiment (Figure 3), chapter *WSAE on synthetic data*.

n = 200 features, n_p = 20 dimensions, n_m = 200 latents; for every sparsity S in a grid, every
seed and every model (theory SAE, Top-k practical SAE) train the plain SAE and WSAEs whose Γ comes
from the variance rule (α = 0.5, 1) or the oracle rule, then measure recovery on held-out data.

Choices the paper leaves open (documented in the chapter): W_p = :data:`~wsae_core.data.DEFAULT_SUPERPOSITION`
(polygon blocks: 4 monosemantic dimensions, 2 digons, 7 planes of 27-28 features) fixed across
seeds (seed 0); Adam, lr 3e-2, batch 512, 800 steps (book profile),
50 warm-up steps, cosine decay to 0.1 lr; Top-k with ``k = max(1, round(n (1 - S)))`` (the expected number of active features);
the variance rule uses the variance of 8,192 samples of x_p drawn at the same S. Within a seed
all methods share the initialisation and the data stream (paired comparison).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np

from ..profile import Profile, pick

__all__ = ["METHODS", "SyntheticSpec", "spec_for", "run_synthetic", "summarise", "summary_table",
           "paired_change", "change_verdict", "change_table", "describe_method", "overall", "gammas_for", "topk_k"]

#: (label, rule, alpha) of each method; "SAE" is the uniform rule.
METHODS: tuple[tuple[str, str, float], ...] = (
    ("SAE", "uniform", 0.0),
    ("WSAE α=0.5", "variance", 0.5),
    ("WSAE α=1", "variance", 1.0),
    ("WSAE oracle", "oracle", 0.0),
)


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
    """Labels from :data:`METHODS`."""
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
    precision: str = "auto"
    """Training precision (:attr:`wsae_core.train.TrainConfig.precision`)."""

    def __post_init__(self):
        known = {m[0] for m in METHODS}
        bad = [m for m in self.methods if m not in known]
        if bad:
            raise ValueError(f"methods must be among {sorted(known)}, got {bad}")
        bad = [m for m in self.models if m not in ("theory", "topk")]
        if bad:
            raise ValueError(f"models must be 'theory' and/or 'topk', got {bad}")
        from . import check_spec

        check_spec(self, {"n": 1, "n_p": 1, "n_m": 1, "W_p_seed": 0, "steps": 1, "batch_size": 1, "eval_samples": 2},
                   self.S_grid, self.seeds)
        if not self.S_grid or not self.seeds or not self.methods or not self.models:
            raise ValueError("S_grid, seeds, methods and models must each name at least one value")


def spec_for(profile: Profile | None = None, **overrides: Any) -> SyntheticSpec:
    """The sweep for a profile: ``ci`` (seconds), ``book`` (default, about 2 min on 2 cores),
    ``paper`` (more steps and seeds, a finer S grid)."""
    spec = SyntheticSpec(
        S_grid=pick(ci=(0.0, 0.99), book=(0.0, 0.5, 0.9, 0.97, 0.99, 0.999),
                    paper=(0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999), profile=profile),
        seeds=pick(ci=(0, 1), book=(0, 1, 2), paper=tuple(range(10)), profile=profile),
        steps=pick(ci=20, book=800, paper=10_000, profile=profile),
        batch_size=pick(ci=128, book=512, paper=4096, profile=profile),
        eval_samples=pick(ci=1024, book=8192, paper=65_536, profile=profile),
        workers=pick(ci=1, book=None, profile=profile),
    )
    return replace(spec, **overrides)


def topk_k(n: int, S: float, n_m: int) -> int:
    """Top-k's k for sparsity S: the expected number of active features ``round(n (1 - S))``, in [1, n_m]."""
    return int(min(n_m, max(1, round(n * (1 - S)))))


def gammas_for(W_p: np.ndarray, S: float, seed: int, n_samples: int = 8192,
               methods: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """γ of every method ``(n_p,)`` for this W_p and S (variance from ``n_samples`` samples of x_p,
    drawn with seed ``10_000 + seed``). ``methods`` restricts the labels computed."""
    import torch

    from ..data import SparseSource
    from ..weights import make_gamma

    wanted = [m for m in METHODS if methods is None or m[0] in methods]
    x_p = None
    if any(rule == "variance" for _, rule, _ in wanted):
        _, x_p = SparseSource(W_p, S).sample_pair(n_samples, torch.Generator().manual_seed(10_000 + seed))
    n_p = W_p.shape[0]
    out = {}
    for label, rule, alpha in wanted:
        if rule == "oracle":
            out[label] = _oracle_gamma(np.ascontiguousarray(W_p, dtype=np.float64).tobytes(), W_p.shape)
        else:
            out[label] = make_gamma(rule, n_p=n_p, alpha=alpha, x_p=x_p).numpy()
    return out


@lru_cache(maxsize=8)
def _oracle_gamma(W_bytes: bytes, shape: tuple[int, int]) -> np.ndarray:
    # The oracle rule solves an (n^2 x n_p) NNLS: 2-3 s for n = 200, so once per W_p, not per run.
    from ..weights import oracle_gamma

    W = np.frombuffer(W_bytes, dtype=np.float64).reshape(shape)
    g = oracle_gamma(W).numpy()
    g.setflags(write=False)
    return g


def _run_task(task: dict) -> dict:
    """One training run: ``task`` holds W_p, S, seed, model, method and the spec's sizes."""
    import torch

    from ..data import SparseSource
    from ..metrics import evaluate_recovery
    from ..models import SAEConfig, build_sae
    from ..train import Trainer, TrainConfig

    spec = SyntheticSpec(**task["spec"])
    W_p = np.asarray(task["W_p"])
    S, seed, model, method = task["S"], task["seed"], task["model"], task["method"]
    gamma = (np.asarray(task["oracle"]) if method == "WSAE oracle" and task.get("oracle") is not None
             else gammas_for(W_p, S, seed, spec.eval_samples, methods=(method,))[method])
    k = topk_k(spec.n, S, spec.n_m) if model == "topk" else None
    sae = build_sae(SAEConfig(n_p=spec.n_p, n_m=spec.n_m, kind=model, k=k, seed=seed))
    src = SparseSource(W_p, S)
    cfg = TrainConfig(steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr, warmup_steps=min(50, spec.steps // 10),
                      seed=seed, log_every=spec.steps, progress=False, threads=1, precision=spec.precision)
    trainer = Trainer(sae, src, cfg, gamma=gamma)
    trainer.fit()
    x, _ = src.sample_pair(spec.eval_samples, torch.Generator().manual_seed(20_000 + seed))
    out = {"S": S, "seed": seed, "model": model, "method": method, "k": k}
    out.update(evaluate_recovery(sae, x, W_p))
    out["train_fvu"] = trainer.history[-1]["fvu"]
    return out


def run_synthetic(spec: SyntheticSpec | None = None, workers: int | None = None) -> list[dict]:
    """Run the whole grid (S x seeds x models x methods); one record (dict of metrics) per run.

    Metrics per record: see :func:`wsae_core.metrics.evaluate_recovery`; plus S, seed, model,
    method, k (Top-k) and the last training FVU.
    """
    from ..data import synthetic_superposition
    from . import run_tasks

    spec = spec or spec_for()
    W_p = synthetic_superposition(spec.superposition, spec.n, spec.n_p, seed=spec.W_p_seed)
    oracle = gammas_for(W_p, 0.0, 0, methods=("WSAE oracle",))["WSAE oracle"].tolist() if "WSAE oracle" in spec.methods else None
    tasks = [{"spec": asdict(spec), "W_p": W_p.tolist(), "oracle": oracle, "S": S, "seed": s, "model": m, "method": meth}
             for m in spec.models for S in spec.S_grid for s in spec.seeds for meth in spec.methods]
    # Longest runs first (dense data, large k) so that the workers finish together.
    order = sorted(range(len(tasks)), key=lambda i: (tasks[i]["S"], tasks[i]["model"] != "topk"))
    results = run_tasks(_run_task, [tasks[i] for i in order], spec.workers if workers is None else workers)
    back = [None] * len(tasks)
    for i, r in zip(order, results):
        back[i] = r
    return back


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


def change_table(records: list[dict], metric: str, model: str, baseline: str = "SAE") -> str:
    """Plain-text table of :func:`paired_change` in percent for every method against ``baseline``:
    one row per S, ``mean ± half-width of the 95% t interval`` over seeds; ``*`` marks intervals
    that exclude 0 (negative = lower than the baseline)."""
    methods = [m for m in dict.fromkeys(r["method"] for r in records if r["model"] == model) if m != baseline]
    ch = {m: paired_change(records, metric, model, m, baseline) for m in methods}
    n = int(ch[methods[0]]["n"].max())
    lines = [f"{model} SAE: change of {metric} vs {baseline} (%), mean ± 95% CI over {n} seeds (* excludes 0)",
             "     S " + "".join(f"{m:>19s}" for m in methods)]
    for i, S in enumerate(ch[methods[0]]["S"]):
        cells = []
        for m in methods:
            mu, ci = 100 * ch[m]["mean"][i], 100 * ch[m]["ci"][i]
            star = "*" if change_verdict(mu, ci) != "no clear change" else " "
            cells.append(f"{mu:+9.1f} ± {ci:5.1f}{star} ")
        lines.append(f"{S:6g} " + "".join(cells))
    return "\n".join(lines)


_MODEL = {"theory": "theory SAE", "topk": "Top-k SAE"}


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
                parts.append(f"{_MODEL[mo]}: at no sparsity")
                continue
            Ss = sorted({S for S, _, _ in hits})
            S_best, me_best, mu_best = max(hits, key=lambda h: abs(h[2]))
            parts.append(f"{_MODEL[mo]}: at $S \\in \\{{{', '.join(f'{S:g}' for S in Ss)}\\}}$ (largest: {me_best}, "
                         f"{_pct(mu_best)} at $S = {S_best:g}$)")
        return "; ".join(parts)

    var = [me for me in methods if me.startswith("WSAE α")]
    vparts = []
    for mo in models:
        low = sorted({f"{S:g}" for me in var for S, mu, ci in zip(ch[mo, me]["S"], ch[mo, me]["mean"], ch[mo, me]["ci"])
                      if change_verdict(mu, ci) == "lower"})
        high = sorted({f"{S:g}" for me in var for S, mu, ci in zip(ch[mo, me]["S"], ch[mo, me]["mean"], ch[mo, me]["ci"])
                       if change_verdict(mu, ci) == "higher"})
        vparts.append(f"for the {_MODEL[mo]} it lowers the error at "
                      + (f"$S \\in \\{{{', '.join(low)}\\}}$" if low else "no sparsity")
                      + " and raises it at " + (f"$S \\in \\{{{', '.join(high)}\\}}$" if high else "no sparsity"))
    S0 = rec[models[0], methods[0]]["S"][0]
    rparts = [f"{_MODEL[mo]}: " + ", ".join(f"{me} {_pct(rec[mo, me]['mean'][0])}" for me in methods) for mo in models]
    return {
        "helps": "Lower error per active coordinate, beyond the 95 % interval: " + where("lower") + ".",
        "hurts": "Higher error per active coordinate, beyond the 95 % interval: " + where("higher") + ".",
        "variance": "The variance rule (α = 0.5 or 1): " + "; ".join(vparts) + ".",
        "recon": f"Change of the (unweighted) $x_p$ reconstruction error at $S = {S0:g}$: " + "; ".join(rparts) + ".",
    }
