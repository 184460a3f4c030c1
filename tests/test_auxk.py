"""The trainer standards for practical SAEs (sparsify's): AuxK on dead latents, b_dec started at the
data mean, width-scaled learning rate, dead-latent counting; and the theory SAE left as the paper
defines it."""

import pytest
import torch

from wsae_core import data, geometry, models, train

W_P = geometry.superposition_matrix([1, 2, 3, 3])  # n_p = 6, n = 9


def _trainer(kind="topk", n_m=64, k=2, **cfg_kw):
    kw = {"k": k} if kind == "topk" else ({"l1_coeff": 1e-3} if kind == "relu" else {})
    sae = models.build_sae(models.SAEConfig(n_p=W_P.shape[0], n_m=n_m, kind=kind, seed=1, **kw))
    base = dict(steps=40, batch_size=128, warmup_steps=2, seed=3, log_every=10, progress=False, threads=1)
    base.update(cfg_kw)
    return train.Trainer(sae, data.SparseSource(W_P, 0.8), train.TrainConfig(**base))


def test_defaults_by_kind():
    topk, relu, theory = _trainer("topk", n_m=2**14), _trainer("relu"), _trainer("theory")
    assert topk.cfg.lr == pytest.approx(2e-4)  # sparsify: 2e-4 / sqrt(n_m / 2^14)
    assert train.width_scaled_lr(2**16) == pytest.approx(1e-4)
    assert _trainer("topk", lr=3e-3).cfg.lr == 3e-3  # a given lr is kept
    assert relu.cfg.lr == theory.cfg.lr == 1e-2
    assert topk.cfg.auxk_coeff == train.AUXK_COEFF == 1 / 32 and topk.cfg.k_aux == W_P.shape[0] // 2
    assert relu.cfg.auxk_coeff == theory.cfg.auxk_coeff == 0.0
    assert topk.cfg.b_dec_init == relu.cfg.b_dec_init == "mean" and theory.cfg.b_dec_init == "keep"


@pytest.mark.parametrize(
    "kind, kw, match",
    [
        ("theory", {"auxk_coeff": 0.1}, "auxk_coeff is only used by Top-k SAEs, got 0.1 for kind 'theory'"),
        ("relu", {"auxk_coeff": 0.1}, "auxk_coeff is only used by Top-k SAEs"),
        ("theory", {"b_dec_init": "mean"}, "b_dec_init 'mean' needs a practical SAE"),
    ],
)
def test_model_dependent_errors(kind, kw, match):
    with pytest.raises(ValueError, match=match):
        _trainer(kind, **kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(auxk_coeff=-1.0), "auxk_coeff must be a finite number >= 0 or None, got -1.0"),
        (dict(k_aux=0), "k_aux must be an integer >= 1, got 0"),
        (dict(b_dec_init="median"), "b_dec_init must be 'mean', 'keep' or None, got 'median'"),
        (dict(lr=0.0), "lr must be a finite number > 0 or None, got 0.0"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        train.TrainConfig(**kw)


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_b_dec_starts_at_first_batch_mean(kind):
    t = _trainer(kind, steps=1, lr=1e-12, warmup_steps=0)
    first = t.data.sample(t.cfg.batch_size, torch.Generator().manual_seed(t.cfg.seed))
    t.fit()
    assert torch.allclose(t.model.b_dec, first.mean(0), atol=1e-6)
    kept = _trainer(kind, steps=1, lr=1e-12, warmup_steps=0, b_dec_init="keep")
    kept.fit()
    assert kept.model.b_dec.abs().max() < 1e-6


def test_lr_at_needs_a_resolved_lr():
    with pytest.raises(ValueError, match="cfg.lr is None"):
        train.lr_at(0, train.TrainConfig())


def test_auxk_gradient_reaches_only_dead_latents():
    m = models.build_sae(models.SAEConfig(n_p=16, n_m=512, kind="topk", k=4, seed=0))
    x = torch.randn(64, 16)
    dead = torch.arange(512) >= 400
    out = m(x, None, dead, 8)
    assert out.auxk_loss > 0
    g_enc, g_b, g_dec = torch.autograd.grad(out.auxk_loss, [m.W_enc, m.b_enc, m.W_dec])
    touched = (g_enc.abs().sum(1) > 0) | (g_b != 0) | (g_dec.abs().sum(1) > 0)
    assert touched.any() and not touched[~dead].any()
    # the dead encoder rows learn (Gao et al.; sparsify's fused encoder drops this gradient)
    assert (g_enc[dead].abs().sum(1) > 0).sum() > 8


def test_auxk_scale_and_no_dead():
    m = models.build_sae(models.SAEConfig(n_p=16, n_m=512, kind="topk", k=4, seed=0))
    x = torch.randn(64, 16)
    assert m(x, None, torch.zeros(512, dtype=torch.bool), 8).auxk_loss == 0
    few = torch.zeros(512, dtype=torch.bool)
    few[:2] = True  # 2 dead latents, k_aux = 8: the loss is scaled by 2 / 8 (sparsify)
    m.fused = False
    full = m(x, None, few, 2).auxk_loss
    assert torch.allclose(m(x, None, few, 8).auxk_loss, full * 2 / 8, rtol=1e-5)


def test_trainer_reports_dead_and_auxk():
    t = _trainer("topk", n_m=128, dead_steps=5, steps=60)
    hist = t.fit()
    assert all("auxk_loss" in h and "dead_fraction" in h for h in hist)
    assert t.dead_mask().dtype == torch.bool and t.dead_mask().float().mean() == pytest.approx(t.dead_fraction())
    assert hist[-1]["dead_fraction"] > 0 and hist[-1]["auxk_loss"] > 0  # 128 latents for 9 features: some die
    off = _trainer("topk", n_m=128, dead_steps=5, steps=60, auxk_coeff=0.0)
    assert all(h["auxk_loss"] == 0 for h in off.fit())


def test_theory_sae_is_the_papers():
    t = _trainer("theory")
    t.fit()
    assert not hasattr(t.model, "b_dec") and "auxk_loss" not in t.history[-1]
    assert [n for n, _ in t.model.named_parameters()] == ["W_m"]
