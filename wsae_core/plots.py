"""One figure style for the whole book: readable fonts, a colour-blind-safe palette, labelled axes.

Every chapter draws through these functions so that a figure looks the same wherever it appears.
The palette is Okabe & Ito's (2008) eight colours, distinguishable under the common colour-vision
deficiencies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np

__all__ = [
    "PALETTE",
    "use_book_style",
    "plot_superposition",
    "plot_vector_comparison",
    "plot_losses_vs_sparsity",
    "plot_exploration",
    "plot_exact_vs_mc",
    "plot_matrix",
    "plot_layer_sweep",
    "plot_sparsity_sweep",
    "plot_seed_scatter",
    "plot_cosine_matrix",
]

#: Okabe-Ito colours, in the order the book uses them.
PALETTE = {
    "blue": "#0072B2",
    "orange": "#E69F00",
    "green": "#009E73",
    "vermillion": "#D55E00",
    "sky": "#56B4E9",
    "purple": "#CC79A7",
    "yellow": "#F0E442",
    "black": "#000000",
}
CYCLE = [PALETTE[k] for k in ("blue", "orange", "green", "vermillion", "sky", "purple", "yellow", "black")]


def _figure_and_axes(ax: Any, figsize: tuple[float, float] | None = None):
    """``(figure, axes)``: a new figure when ``ax`` is None, otherwise the figure ``ax`` is on."""
    if ax is None:
        return plt.subplots(figsize=figsize)
    return ax.figure, ax


def _finish_panel_grid(fig, axes, n_used: int, title: str | None, legend_space: float):
    """Hide unused panels, put one shared legend under the grid, add the title."""
    for ax in list(axes.flat)[n_used:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, -0.02))
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, legend_space, 1, 1))
    return fig


def use_book_style() -> None:
    """Apply the book's matplotlib style (call once at the top of a chapter)."""
    mpl.rcParams.update(
        {
            "figure.figsize": (6.4, 4.0),
            "figure.dpi": 100,
            "savefig.dpi": 150,
            "font.size": 11,
            "axes.titlesize": 12,
            "axes.labelsize": 11,
            "legend.fontsize": 10,
            "axes.prop_cycle": mpl.cycler(color=CYCLE),
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "image.cmap": "RdBu_r",
        }
    )


def plot_superposition(W_p: Any, blocks: Sequence[int] | None = None, axes: Any = None, title: str | None = None):
    """Draw the columns of W_p as arrows, one panel per group of features.

    With ``blocks`` (the group sizes given to :func:`wsae_core.geometry.superposition_matrix`) each
    group is drawn in its own 1-D or 2-D subspace; without it, W_p must have ``n_p = 2``.
    Returns the matplotlib figure.
    """
    from .geometry import block_slices

    W = np.asarray(W_p, dtype=float)
    if blocks is None:
        if W.shape[0] != 2:
            raise ValueError(f"without blocks, W_p must have 2 rows to be drawn in the plane, got shape {W.shape}")
        groups = [(slice(0, 2), slice(0, W.shape[1]))]
    else:
        groups = block_slices(blocks)
        if groups[-1][0].stop != W.shape[0] or groups[-1][1].stop != W.shape[1]:
            raise ValueError(f"blocks {list(blocks)} describe a W_p of shape "
                             f"({groups[-1][0].stop}, {groups[-1][1].stop}), got {W.shape}")
    if axes is None:
        fig, axes = plt.subplots(1, len(groups), figsize=(2.6 * len(groups), 2.8), squeeze=False)
        axes = axes[0]
    else:
        axes = np.atleast_1d(axes)
        fig = axes[0].figure
    for g, (ax, (rows, cols)) in enumerate(zip(axes, groups)):
        block = W[rows, cols]
        if block.shape[0] == 1:  # monosemantic unit or digon: draw on a horizontal axis
            block = np.vstack([block, np.zeros_like(block)])
        for j in range(block.shape[1]):
            feat = cols.start + j
            c = CYCLE[feat % len(CYCLE)]
            # Offset digon arrows slightly so w and -w stay visible as two arrows.
            ax.annotate("", xy=(block[0, j], block[1, j]), xytext=(0, 0),
                        arrowprops=dict(arrowstyle="-|>", color=c, lw=2))
            ax.text(1.18 * block[0, j], 1.18 * block[1, j] + (0.12 if rows.stop - rows.start == 1 else 0),
                    f"$w_{{{feat + 1}}}$", ha="center", va="center", color=c)
        ax.add_patch(plt.Circle((0, 0), 1, fill=False, ls=":", color="0.6"))
        ax.set_xlim(-1.4, 1.4)
        ax.set_ylim(-1.4, 1.4)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        dims = ", ".join(str(d + 1) for d in range(rows.start, rows.stop))
        k = cols.stop - cols.start
        name = {1: "monosemantic", 2: "digon"}.get(k, f"{k}-gon")
        ax.set_title(f"{name}\n(dim{'s' if rows.stop - rows.start > 1 else ''} {dims} of $x_p$)", fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_vector_comparison(vectors: dict[str, Any], ax: Any = None, xlabel: str = "coordinate", title: str | None = None):
    """Grouped bar chart of several vectors of equal length (e.g. ``x`` beside ``x_m``)."""
    names = list(vectors)
    arrs = [np.asarray(vectors[k], dtype=float).ravel() for k in names]
    n = max(a.size for a in arrs)
    fig, ax = _figure_and_axes(ax, figsize=(max(4.0, 0.6 * n + 2), 3.0))
    width = 0.8 / len(arrs)
    for i, (name, a) in enumerate(zip(names, arrs)):
        ax.bar(np.arange(a.size) + (i - (len(arrs) - 1) / 2) * width, a, width, label=name, color=CYCLE[i % len(CYCLE)])
    ax.set_xticks(np.arange(n), [str(i + 1) for i in range(n)])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("value")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_losses_vs_sparsity(S: Any, curves: dict[str, Any], ax: Any = None, title: str | None = None,
                            ylabel: str = "loss per sample"):
    """Loss curves against sparsity S with ±2 standard-error bars.

    ``curves`` maps a label to an array ``(len(S), 2)`` of (mean, standard error).
    """
    S = np.asarray(S, dtype=float)
    fig, ax = _figure_and_axes(ax)
    for i, (label, vals) in enumerate(curves.items()):
        vals = np.asarray(vals, dtype=float)
        if vals.shape != (S.size, 2):
            raise ValueError(f"curve {label!r} must have shape ({S.size}, 2) = (mean, se) per S, got {vals.shape}")
        ax.errorbar(S, vals[:, 0], yerr=2 * vals[:, 1], marker="o", ms=4, capsize=3, label=label,
                    color=CYCLE[i % len(CYCLE)])
    ax.set_xlabel("sparsity $S$ (probability a feature is 0)")
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_exploration(e: Any):
    """The playground figure for a :class:`wsae_core.widgets.Exploration`: the columns of W_p with
    the WSAE weights, one sample x against its recovery x_m (shrunk features hatched, vanished ones
    marked ×), and the three losses with the two gaps."""
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(12.5, 3.8), gridspec_kw={"width_ratios": [1, 1.3, 1.1]})
    W = np.asarray(e.W_p)
    for j in range(W.shape[1]):
        col = CYCLE[j % len(CYCLE)]
        a.annotate("", xy=(W[0, j], W[1, j]), xytext=(0, 0), arrowprops=dict(arrowstyle="-|>", color=col, lw=2))
        a.text(1.2 * W[0, j], 1.2 * W[1, j], f"$w_{{{j + 1}}}$", color=col, ha="center", va="center")
    a.add_patch(plt.Circle((0, 0), 1, fill=False, ls=":", color="0.6"))
    a.set(xlim=(-1.45, 1.45), ylim=(-1.45, 1.45), aspect="equal",
          xlabel=f"$x_{{p,1}}$  ($\\gamma_1$ = {e.gamma[0]:.2f})", ylabel=f"$x_{{p,2}}$  ($\\gamma_2$ = {e.gamma[1]:.2f})")
    a.set_title(f"{e.name}: columns of $W_p$", fontsize=10)
    idx = np.arange(e.x.size)
    b.bar(idx - 0.2, e.x, 0.4, label="ground truth $x$", color=PALETTE["blue"])
    bars = b.bar(idx + 0.2, e.x_m, 0.4, label="recovered $x_m$", color=PALETTE["orange"])
    for i in idx:
        if e.shrunk[i]:
            bars[i].set_hatch("//")
            bars[i].set_edgecolor(PALETTE["vermillion"])
        if e.vanished[i]:
            b.plot(i + 0.2, 0.02, marker="x", color=PALETTE["vermillion"], ms=10, mew=2)
    b.set_xticks(idx, [f"{i + 1}" for i in idx])
    b.set(xlabel="feature", ylabel="value", ylim=(0, 1.05), title=f"one sample at S = {e.S:.2f}  (hatched: shrunk, ×: vanished)")
    b.title.set_fontsize(10)
    b.legend(frameon=False, fontsize=9, loc="upper right")
    names = ["$\\mathcal{L}_{SAE}$", f"$\\mathcal{{L}}_{{WSAE}}$\n(α = {e.alpha:.1f})", "$\\mathcal{L}_{GT}$"]
    vals = [e.L_SAE, e.L_WSAE, e.L_GT]
    c.bar(names, vals, color=[PALETTE["orange"], PALETTE["green"], PALETTE["blue"]])
    c.set(ylabel="mean loss per sample")
    c.set_title(f"gap {e.gap:+.3f}, weighted gap {e.weighted_gap:+.3f}\n"
                f"top feature changes in {100 * e.p_top_changed:.0f}% of overlapping samples", fontsize=10)
    fig.tight_layout()
    return fig


def plot_exact_vs_mc(x: Any, exact: dict[str, Any], mc: dict[str, Any] | None = None, x_mc: Any = None,
                     ax: Any = None, xlabel: str = "", ylabel: str = "", title: str | None = None,
                     marks: dict[str, tuple[float, float]] | None = None):
    """Exact curves (lines) with Monte-Carlo checks (points with ±2 standard-error bars).

    ``exact`` maps a label to values on the grid ``x``; ``mc`` maps the same labels to arrays
    ``(len(x_mc), 2)`` of (mean, standard error); ``marks`` maps a label to one point ``(x, y)``
    drawn as a black star (an optimum, say; labels starting with "_" stay out of the legend).
    Used by the Theory chapters.
    """
    x = np.asarray(x, dtype=float)
    fig, ax = _figure_and_axes(ax)
    for i, (label, ys) in enumerate(exact.items()):
        col = CYCLE[i % len(CYCLE)]
        ax.plot(x, np.asarray(ys, dtype=float), color=col, lw=2, label=label)
        if mc and label in mc:
            v = np.asarray(mc[label], dtype=float)
            ax.errorbar(np.asarray(x_mc, dtype=float), v[:, 0], yerr=2 * v[:, 1], fmt="o", ms=4, capsize=3,
                        color=col, mfc="white")
    for i, (label, (mx, my)) in enumerate((marks or {}).items()):
        ax.plot([mx], [my], marker="*", ms=13, ls="none", color=PALETTE["black"], label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_matrix(M: Any, ax: Any = None, title: str | None = None, labels: Sequence[str] | None = None,
                fmt: str = "{:.2f}"):
    """A small matrix (a gap matrix, say) as a diverging heat map with its entries written in."""
    A = np.asarray(M, dtype=float)
    if A.ndim != 2:
        raise ValueError(f"M must be a 2-D matrix, got shape {A.shape}")
    fig, ax = _figure_and_axes(ax, figsize=(0.55 * A.shape[1] + 1.8, 0.55 * A.shape[0] + 1.2))
    lim = max(np.abs(A).max(), 1e-12)
    ax.imshow(A, cmap="RdBu_r", vmin=-lim, vmax=lim)
    for (i, j), v in np.ndenumerate(A):
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8,
                color="white" if abs(v) > 0.6 * lim else "black")
    ticks = labels if labels is not None else [str(i + 1) for i in range(A.shape[1])]
    ax.set_xticks(range(A.shape[1]), ticks)
    ax.set_yticks(range(A.shape[0]), ticks[: A.shape[0]] if labels is not None else [str(i + 1) for i in range(A.shape[0])])
    ax.grid(False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_layer_sweep(records: Sequence[dict], metrics: Sequence[tuple[str, str]], ncols: int = 3,
                     title: str | None = None):
    """One panel per metric of a layer sweep (chapter *SAEs and WSAEs on a language model*).

    ``records``: dicts with ``layer``, ``method`` and the metric keys (``wsae_core.experiments.lm``);
    ``metrics``: ``(key, label)`` pairs. A metric with a ``<key>_chance`` entry gets its random-latent
    level drawn as a dashed grey line.
    """
    methods = list(dict.fromkeys(r["method"] for r in records))
    layers = sorted({r["layer"] for r in records})
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.6 * nrows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, metrics):
        for i, m in enumerate(methods):
            val = {r["layer"]: r.get(key) for r in records if r["method"] == m}
            ys = [np.nan if val.get(l) is None else val[l] for l in layers]
            ax.plot(layers, ys, marker="o", ms=4, color=CYCLE[i % len(CYCLE)], label=m)
        ch = {r["layer"]: r.get(key + "_chance") for r in records if r["method"] == methods[0]}
        if any(v is not None for v in ch.values()):
            ax.plot(layers, [np.nan if ch.get(l) is None else ch[l] for l in layers], ls="--", color="0.5",
                    label="random latents")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
    return _finish_panel_grid(fig, axes, len(metrics), title, legend_space=0.05)


def plot_sparsity_sweep(summaries: dict[str, dict[str, dict[str, Any]]], labels: dict[str, str] | None = None,
                        logy: Sequence[str] = (), title: str | None = None, ncols: int = 4):
    """One panel per metric against the density ``1 - S`` (log axis, sparser to the right), one
    line per method with error bars (chapter *WSAE on synthetic data*).

    ``summaries``: ``{metric: {method: {"S", "mean", "sem"}}}`` as from
    :func:`wsae_core.experiments.synthetic.summarise`; ``labels``: axis titles per metric;
    ``logy``: metrics drawn on a log y axis.
    """
    keys = list(summaries)
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, min(ncols, len(keys)), figsize=(3.2 * min(ncols, len(keys)), 2.9 * nrows),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for i, (method, s) in enumerate(summaries[key].items()):
            dens = np.maximum(1 - np.asarray(s["S"], dtype=float), 1e-4)
            ax.errorbar(dens, s["mean"], yerr=s["sem"], marker="o", ms=3.5, capsize=2, lw=1.4,
                        color=CYCLE[i % len(CYCLE)], label=method)
        ax.set_xscale("log")
        ax.invert_xaxis()
        if key in logy:
            ax.set_yscale("log")
        ax.set_xlabel("density 1 − S")
        ax.set_title((labels or {}).get(key, key), fontsize=10)
    return _finish_panel_grid(fig, axes, len(keys), title, legend_space=0.07)


def plot_seed_scatter(records: Sequence[dict], key: str, group: str = "config", ax: Any = None,
                      ylabel: str | None = None, logy: bool = False, title: str | None = None):
    """Each run as a point against the density ``1 - S`` (log axis), one colour per ``group``,
    the median over seeds joined by a line (chapter *Training meets theory*)."""
    fig, ax = _figure_and_axes(ax, figsize=(5.2, 3.4))
    groups = list(dict.fromkeys(r[group] for r in records))
    for i, g in enumerate(groups):
        rs = [r for r in records if r[group] == g]
        Ss = sorted({r["S"] for r in rs})
        c = CYCLE[i % len(CYCLE)]
        jitter = 1 + 0.06 * (i - (len(groups) - 1) / 2)
        for S in Ss:
            ys = [r[key] for r in rs if r["S"] == S]
            ax.scatter(np.full(len(ys), max(1 - S, 1e-4) * jitter), ys, s=14, color=c, alpha=0.7)
        med = [np.median([r[key] for r in rs if r["S"] == S]) for S in Ss]
        ax.plot([max(1 - S, 1e-4) * jitter for S in Ss], med, color=c, lw=1.4, label=str(g))
    ax.set_xscale("log")
    ax.invert_xaxis()
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("density 1 − S")
    ax.set_ylabel(ylabel or key)
    ax.legend(frameon=False, fontsize=9)
    if title:
        ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_cosine_matrix(directions: Any, W_p: Any, ax: Any = None, title: str | None = None):
    """Signed cosine between an SAE's latent directions ``(n_m, n_p)`` (rows, ordered by their
    matched feature, :func:`wsae_core.metrics.match_latents`) and the features, the columns of W_p
    ``(n_p, n)``: a permutation of the identity (plus zero rows) means the SAE found the features.
    Red = along the feature, blue = against it (a digon's ``w`` and ``-w`` differ only in sign)
    (chapter *Training meets theory*)."""
    from .metrics import match_latents

    D = np.asarray(directions, dtype=float)
    W = np.asarray(W_p, dtype=float)
    m = match_latents(D, W)
    rest = [j for j in range(D.shape[0]) if j not in set(m.perm.tolist())]
    order = [p for p in m.perm if p >= 0] + rest
    Dn = D / np.maximum(np.linalg.norm(D, axis=1, keepdims=True), 1e-12)
    C = Dn[order] @ (W / np.linalg.norm(W, axis=0, keepdims=True))
    fig, ax = _figure_and_axes(ax, figsize=(0.35 * W.shape[1] + 1.5, 0.35 * D.shape[0] + 1.0))
    ax.imshow(C, vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto")
    ax.set_xlabel("feature i")
    ax.set_ylabel("latent (matched order)")
    ax.set_xticks(range(W.shape[1]), [str(i + 1) for i in range(W.shape[1])], fontsize=8)
    ax.set_yticks([])
    ax.grid(False)
    if title:
        ax.set_title(title, fontsize=10)
    return fig
