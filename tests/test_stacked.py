"""A stacked run of M SAEs computes what M separate Trainer runs compute (chapter *WSAE on synthetic data*)."""

import numpy as np
import pytest
import torch

from wsae_core.data import SparseSource, synthetic_superposition
from wsae_core.models import SAEConfig, build_sae
from wsae_core.stacked import StackedSAE, train_stacked
from wsae_core.train import Trainer, TrainConfig


@pytest.mark.parametrize("kind,S,k", [("theory", 0.9, None), ("topk", 0.9, 8), ("topk", 0.5, 30)])
def test_stacked_equals_separate_runs(kind, S, k):
    W_p = synthetic_superposition("polygons", 60, 12, seed=0)
    src = SparseSource(W_p, S)
    # dead_steps 5: AuxK starts within the run, so its per-model dead sets are compared too.
    cfg = TrainConfig(steps=40, batch_size=64, lr=3e-2, warmup_steps=4, seed=3, log_every=10, progress=False,
                      threads=1, dead_steps=5, precision="fp32")
    gammas = [None, np.linspace(0.4, 1.6, 12), np.linspace(1.6, 0.4, 12)]
    sae_cfg = SAEConfig(n_p=12, n_m=60, kind=kind, k=k, seed=1)
    saes, hist, since = train_stacked([build_sae(sae_cfg) for _ in gammas], src, cfg, gammas)
    for i, g in enumerate(gammas):
        tr = Trainer(build_sae(sae_cfg), src, cfg, gamma=g)
        tr.fit()
        for (name, a), b in zip(tr.model.named_parameters(), saes[i].parameters()):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (kind, i, name, (a - b).abs().max())
        assert torch.equal(tr.steps_since_fired, since[i])
        assert [h["step"] for h in hist[i]] == [h["step"] for h in tr.history]
        for key in ("fvu", "loss", "l0", "dead_fraction", "auxk_loss"):
            if key in tr.history[-1]:
                assert hist[i][-1][key] == pytest.approx(tr.history[-1][key], rel=1e-4, abs=1e-6), key
    if kind == "topk":
        assert saes[1].W_dec.norm(dim=1).sub(1).abs().max() < 1e-5
        if k < 10:  # few active latents: some die within the run, so AuxK's per-model path was compared
            assert any(h["auxk_loss"] > 0 for hs in hist for h in hs), "AuxK never ran: the comparison missed it"


def test_stacked_refuses_mixed_shapes_and_bad_gammas():
    a = build_sae(SAEConfig(n_p=4, n_m=8, kind="topk", k=2))
    b = build_sae(SAEConfig(n_p=4, n_m=8, kind="topk", k=3))
    with pytest.raises(ValueError, match="must share kind, n_p, n_m and k"):
        StackedSAE([a, b])
    with pytest.raises(ValueError, match="one entry per model"):
        train_stacked([a], SparseSource(np.eye(4), 0.5), TrainConfig(steps=2, warmup_steps=0), [None, None])
    with pytest.raises(ValueError, match="gamma must be > 0"):
        train_stacked([a], SparseSource(np.eye(4), 0.5), TrainConfig(steps=2, warmup_steps=0), [np.zeros(4)])
