"""The playground: superposition, recovery and the (weighted) gap, to move with sliders.

Chapter *Playground*. :func:`explore` computes everything for one setting of the controls (pure
function, testable); :func:`wsae_core.plots.plot_exploration` draws it; :func:`playground` wires
both to ipywidgets for a live kernel; :func:`precomputed_explorer` renders a grid of settings in
advance into a self-contained HTML slider that works in the static book, without a kernel.

All geometries live in the plane (``n_p = 2``) so that the columns of ``W_p`` can be drawn, and
the encoder is Theorem 1's closed form ``W_m = W_pᵀ``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from . import data, geometry, weights

__all__ = ["GEOMETRIES", "geometry_matrix", "Exploration", "explore", "train_pair", "playground",
           "precomputed_explorer"]


def _angle_pair(theta_deg: float) -> np.ndarray:
    t = np.deg2rad(theta_deg)
    return np.array([[1.0, np.cos(t)], [0.0, np.sin(t)]])


def _triangle_with_free(theta_deg: float) -> np.ndarray:
    W = geometry.superposition_matrix([3])
    t = np.deg2rad(theta_deg)
    W[:, 2] = [np.cos(t), np.sin(t)]
    return W


#: Geometry name -> function of the free angle θ (degrees; ignored where there is none) -> W_p (2, n).
GEOMETRIES: dict[str, Callable[[float], np.ndarray]] = {
    "monosemantic + digon": lambda t: geometry.superposition_matrix([1, 2])[[1, 0]],
    "triangle": lambda t: geometry.superposition_matrix([3]),
    "square": lambda t: geometry.superposition_matrix([4]),
    "pentagon": lambda t: geometry.superposition_matrix([5]),
    "two features at angle θ": _angle_pair,
    "triangle, feature 3 at angle θ": _triangle_with_free,
}


def geometry_matrix(name: str, theta_deg: float = 120.0) -> np.ndarray:
    """W_p ``(2, n)`` of a playground geometry (see :data:`GEOMETRIES`)."""
    if name not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {list(GEOMETRIES)}, got {name!r}")
    if not np.isfinite(theta_deg):
        raise ValueError(f"theta_deg must be finite, got {theta_deg!r}")
    return GEOMETRIES[name](float(theta_deg))


class Exploration(NamedTuple):
    """Everything the playground shows for one setting. Losses are per-sample means."""

    name: str
    S: float
    alpha: float
    W_p: np.ndarray        # (2, n)
    x: np.ndarray          # (n,) one sample of the ground truth
    x_m: np.ndarray        # (n,) its recovery relu(W_pᵀ W_p x)
    gamma: np.ndarray      # (2,) WSAE weights γ_i ∝ Var(x_p,i)^α, mean γ² = 1
    L_SAE: float
    L_WSAE: float
    L_GT: float
    se_GT: float           # standard error of L_GT
    p_top_changed: float   # fraction of samples (≥ 2 active) whose largest feature changes
    n_mc: int

    @property
    def gap(self) -> float:
        """Theorem 4: L_SAE − L_GT at W_m = W_pᵀ."""
        return self.L_SAE - self.L_GT

    @property
    def weighted_gap(self) -> float:
        """Theorem 5: L_WSAE − L_GT at W_m = W_pᵀ."""
        return self.L_WSAE - self.L_GT

    @property
    def shrunk(self) -> np.ndarray:
        """Active features recovered below their true value (but not zero)."""
        return (self.x > 0) & (self.x_m < self.x - 1e-9) & (self.x_m > 1e-12)

    @property
    def vanished(self) -> np.ndarray:
        """Active features recovered as exactly zero."""
        return (self.x > 0) & (self.x_m <= 1e-12)


def explore(name: str, S: float, alpha: float = 1.0, theta_deg: float = 120.0, seed: int = 0,
            n_mc: int = 20_000) -> Exploration:
    """Recovery, losses and gaps for the closed-form SAE on one playground geometry.

    One sample ``x`` (seeded, redrawn until at least two features are active when S allows it)
    is shown against ``x_m``; the losses are Monte-Carlo means over ``n_mc`` samples.
    """
    S = data.check_sparsity(S)
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    W_p = geometry_matrix(name, theta_deg)
    n = W_p.shape[1]
    W_m = geometry.closed_form_sae(W_p, n)
    g = torch.Generator().manual_seed(int(seed))
    x = data.sample_sparse(1, n, S, generator=g, dtype=torch.float64).numpy()[0]
    for _ in range(50):  # a sample with overlap is the interesting one to look at
        if (x > 0).sum() >= 2:
            break
        x = data.sample_sparse(1, n, S, generator=g, dtype=torch.float64).numpy()[0]
    X = data.sample_sparse(n_mc, n, S, seed=int(seed) + 1, dtype=torch.float64).numpy()
    X_p = X @ W_p.T
    X_m = geometry.recover(W_m, X_p)
    err_p = (X_p - X_m @ W_m) ** 2                      # (n_mc, 2) per-dimension error in x_p
    gamma = weights.variance_gamma(torch.from_numpy(X_p), alpha).double().numpy()
    l_gt = ((X - X_m) ** 2).sum(1)
    multi = (X > 0).sum(1) >= 2
    changed = np.argmax(X, 1) != np.argmax(X_m, 1)
    return Exploration(
        name=name, S=S, alpha=float(alpha), W_p=W_p, x=x, x_m=geometry.recover(W_m, W_p @ x),
        gamma=gamma, L_SAE=float(err_p.sum(1).mean()), L_WSAE=float((err_p * gamma**2).sum(1).mean()),
        L_GT=float(l_gt.mean()), se_GT=float(l_gt.std() / np.sqrt(n_mc)),
        p_top_changed=float(changed[multi].mean()) if multi.any() else 0.0, n_mc=int(n_mc))


def train_pair(name: str, S: float, alpha: float = 1.0, theta_deg: float = 120.0, steps: int = 400,
               seed: int = 0, n_eval: int = 20_000, progress: bool | None = False) -> dict[str, dict[str, float]]:
    """Train a theory SAE (tied, ReLU, n_m = n) twice on one playground geometry, with the plain
    SAE loss and with the WSAE loss (γ ∝ Var(x_p)^α), from the same initialisation and data
    stream; return :func:`wsae_core.metrics.evaluate_recovery` for each on held-out samples.
    """
    from .metrics import evaluate_recovery
    from .models import SAEConfig, build_sae
    from .train import TrainConfig, Trainer

    W_p = geometry_matrix(name, theta_deg)
    source = data.SparseSource(W_p, data.check_sparsity(S))
    probe = source.sample(8192, torch.Generator().manual_seed(int(seed) + 7))
    gammas = {"SAE": None, f"WSAE α={alpha:g}": weights.variance_gamma(probe, alpha)}
    x_eval = data.sample_sparse(n_eval, W_p.shape[1], S, seed=int(seed) + 11)
    results = {}
    for label, gamma in gammas.items():
        model = build_sae(SAEConfig(n_p=W_p.shape[0], n_m=W_p.shape[1], kind="theory", seed=int(seed)))
        cfg = TrainConfig(steps=int(steps), batch_size=512, lr=1e-2, warmup_steps=min(50, int(steps) // 4),
                          seed=int(seed), progress=progress, log_every=max(1, int(steps)), threads=1)
        Trainer(model, source, cfg, gamma=gamma).fit()
        results[label] = evaluate_recovery(model, x_eval, W_p)
    return results


def playground(n_mc: int = 20_000):
    """The live playground: ipywidgets controls wired to :func:`explore` and its figure."""
    import ipywidgets as W
    import matplotlib.pyplot as plt
    from IPython.display import display

    from .plots import plot_exploration

    style = {"description_width": "110px"}
    layout = W.Layout(width="420px")
    controls = dict(
        name=W.Dropdown(options=list(GEOMETRIES), value="triangle", description="geometry", style=style, layout=layout),
        S=W.FloatSlider(value=0.5, min=0.0, max=0.99, step=0.01, description="sparsity S", style=style, layout=layout),
        alpha=W.FloatSlider(value=1.0, min=0.0, max=2.0, step=0.1, description="WSAE α", style=style, layout=layout),
        theta_deg=W.FloatSlider(value=120.0, min=0.0, max=180.0, step=5.0, description="free angle θ (°)", style=style, layout=layout),
        seed=W.IntSlider(value=0, min=0, max=20, description="sample seed", style=style, layout=layout),
    )

    def show(**kw):
        fig = plot_exploration(explore(n_mc=n_mc, **kw))
        display(fig)
        plt.close(fig)

    out = W.interactive_output(show, controls)
    button = W.Button(description="train SAE vs WSAE", tooltip="400 Adam steps each, about a second")
    trained = W.Output()

    def on_train(_):
        kw = {k: c.value for k, c in controls.items()}
        with trained:
            trained.clear_output()
            res = train_pair(kw["name"], kw["S"], kw["alpha"], kw["theta_deg"], seed=kw["seed"], progress=True)
            for label, m in res.items():
                print(f"{label:>12}: L_GT {m['l_gt']:.4f}  (non-zero coords {m['l_gt_nonzero']:.4f})  "
                      f"x_p error {m['recon_x_p']:.4f}  matched cosine {m['mean_cosine']:.3f}")

    button.on_click(on_train)
    return W.VBox([W.HBox([W.VBox(list(controls.values()))]), out, W.HBox([button]), trained])


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=56)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def precomputed_explorer(names: Sequence[str], S_values: Sequence[float], alpha: float = 1.0,
                         seed: int = 0, n_mc: int = 20_000, theta_deg: float = 120.0) -> str:
    """A self-contained HTML explorer: one pre-rendered figure per (geometry, S), chosen with a
    drop-down and a slider in the browser. No kernel and no network needed; returns the HTML."""
    if not names or not S_values:
        raise ValueError(f"need at least one geometry and one S, got {list(names)} and {list(S_values)}")
    from .plots import plot_exploration

    frames = {f"{i}-{j}": _png(plot_exploration(explore(name, float(S), alpha, theta_deg, seed, n_mc)))
              for i, name in enumerate(names) for j, S in enumerate(S_values)}
    # A stable id (Python's hash() of strings changes between processes).
    uid = "wsae-explorer-" + hashlib.sha1(repr((list(names), list(S_values), alpha, seed, theta_deg)).encode()).hexdigest()[:10]
    options = "".join(f'<option value="{i}">{html.escape(n)}</option>' for i, n in enumerate(names))
    S_json = json.dumps([float(s) for s in S_values])
    return f"""
<div id="{uid}" class="wsae-explorer" style="font-family: sans-serif; margin: 0.5em 0;">
  <label>geometry <select class="wsae-geom">{options}</select></label>
  <label style="margin-left: 1.5em;">sparsity S <input class="wsae-S" type="range" min="0"
    max="{len(S_values) - 1}" step="1" value="0" style="vertical-align: middle;"></label>
  <span class="wsae-S-value"></span>
  <div><img class="wsae-frame" alt="playground figure" style="max-width: 100%;"></div>
</div>
<script>
(function () {{
  var root = document.getElementById("{uid}");
  var frames = {json.dumps(frames)};
  var S = {S_json};
  var geom = root.querySelector(".wsae-geom"), s = root.querySelector(".wsae-S");
  function update() {{
    root.querySelector(".wsae-frame").src = "data:image/png;base64," + frames[geom.value + "-" + s.value];
    root.querySelector(".wsae-S-value").textContent = "S = " + S[+s.value].toFixed(2);
  }}
  geom.addEventListener("change", update); s.addEventListener("input", update); update();
}})();
</script>"""
