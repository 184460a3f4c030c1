"""Tests for wsae_core.models: forward contract, fused/sparse paths equal autograd, configs."""

import pytest
import torch

from wsae_core import geometry, models, weights


def _cfg(kind, **kw):
    base = dict(n_p=16, n_m=64, kind=kind, seed=3)
    if kind == "topk":
        base["k"] = 4
    base.update(kw)
    return models.SAEConfig(**base)


@pytest.mark.parametrize("kind", ["theory", "relu", "topk"])
def test_forward_contract(kind):
    m = models.build_sae(_cfg(kind))
    x = torch.randn(8, 16)
    out = m(x)
    assert isinstance(out, models.ForwardOutput)
    assert out.reconstruction.shape == (8, 16)
    dense = models.dense_latents(out, 64)
    assert dense.shape == (8, 64) and (dense >= 0).all()
    assert torch.allclose(dense, m.encode(x), atol=1e-6)
    assert torch.allclose(out.loss, out.recon_loss + out.sparsity_loss)
    assert torch.allclose(out.recon_loss, weights.wsae_loss(x, out.reconstruction), rtol=1e-5)
    if kind == "topk":
        assert out.latent_indices.shape == (8, 4)


def test_theory_sae_closed_form_example():
    # Shrinking example: W_p = [[1,0,0],[0,1,-1]], x = (0.5, 1, 0.8) -> x_m = (0.5, 0.2, 0).
    W = geometry.superposition_matrix([1, 2])
    m = models.build_sae(models.SAEConfig(n_p=2, n_m=3))
    with torch.no_grad():
        m.W_m.copy_(torch.tensor(geometry.closed_form_sae(W, 3), dtype=torch.float32))
    x_p = torch.tensor([[0.5, 0.2]])
    assert torch.allclose(m.encode(x_p), torch.tensor([[0.5, 0.2, 0.0]]))
    assert m(x_p).loss.item() == pytest.approx(0.0, abs=1e-12)


def _perturbed(kind, **kw):
    m = models.build_sae(_cfg(kind, **kw))
    with torch.no_grad():
        m.b_dec.normal_(generator=torch.Generator().manual_seed(1))
        m.b_enc.normal_(std=0.1, generator=torch.Generator().manual_seed(2))
    return m


def test_fused_relu_equals_autograd():
    m = _perturbed("relu", l1_coeff=0.01)
    x = torch.randn(32, 16)
    gamma = torch.rand(16) + 0.5
    grads = []
    for fused in (True, False):
        m.fused = fused
        m.zero_grad()
        out = m(x, gamma)
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-6)
    for n in grads[0][1]:
        assert torch.allclose(grads[0][1][n], grads[1][1][n], atol=1e-5, rtol=1e-5), n


def _topk_reference(m, x, gamma, dead=None, k_aux=None):
    """The Top-k SAE and its AuxK loss written out densely with autograd (sparsify/Gao et al. maths)."""
    pre = torch.nn.functional.linear(x - m.b_dec, m.W_enc, m.b_enc)
    v, i = pre.topk(m.cfg.k, dim=1)
    rec = torch.zeros_like(pre).scatter(1, i, v.relu()) @ m.W_dec + m.b_dec
    loss = weights.wsae_loss(x, rec, gamma)
    if dead is None:
        return loss, None
    ids = dead.nonzero().squeeze(1)
    k_aux = min(k_aux, ids.numel())
    av, ai = pre[:, ids].topk(k_aux, dim=1)
    e_hat = torch.zeros_like(pre).scatter(1, ids[ai], av.relu()) @ m.W_dec
    e = (x - rec).detach()
    w2 = gamma.pow(2)
    var = lambda z: ((z - z.mean(0)).pow(2).sum(0) * w2).sum()  # noqa: E731
    scale = min(ids.numel() / 5, 1.0)  # k_aux = 5 requested below
    return loss, scale * var(x) / var(e) * weights.wsae_loss(e, e_hat, gamma)


# dense-fallback and sparse backward paths; with and without dead latents (AuxK)
@pytest.mark.parametrize("n_m, k", [(64, 8), (512, 4), (2048, 16)])
@pytest.mark.parametrize("n_dead", [0, 3, 200])
def test_topk_paths_equal_autograd(n_m, k, n_dead):
    m = _perturbed("topk", n_m=n_m, k=k)
    x = torch.randn(32, 16)
    gamma = torch.rand(16) + 0.5
    dead = torch.zeros(n_m, dtype=torch.bool)
    dead[torch.randperm(n_m, generator=torch.Generator().manual_seed(n_m))[: min(n_dead, n_m // 2)]] = True
    out = m(x, gamma, dead, 5)
    (out.loss + 0.5 * out.auxk_loss).backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    ref, ref_aux = _topk_reference(m, x, gamma, dead if n_dead else None, 5)
    (ref + 0.5 * ref_aux if n_dead else ref).backward()
    assert torch.allclose(out.loss, ref, rtol=1e-5)
    if n_dead:
        assert out.auxk_loss > 0 and torch.allclose(out.auxk_loss, ref_aux, rtol=1e-4)
    else:
        assert out.auxk_loss == 0
    for n, p in m.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-4, rtol=1e-4), n
    # the unfused path of the library computes the same
    m.fused = False
    m.zero_grad()
    out2 = m(x, gamma, dead, 5)
    (out2.loss + 0.5 * out2.auxk_loss).backward()
    assert torch.allclose(out2.auxk_loss, out.auxk_loss, rtol=1e-4)
    for n, p in m.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-4, rtol=1e-4), n


def test_topk_input_gradient():
    # x_p gets no gradient in training, but a caller may ask for it (e.g. attribution): it must be right.
    dead = torch.arange(512) % 3 == 0
    grads = []
    for fused in (True, False):
        m = _perturbed("topk", n_m=512, k=4)
        m.fused = fused
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
        out = m(x, None, dead, 5)
        grads.append(torch.autograd.grad(out.loss + out.auxk_loss, x)[0])
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind, kw", [("relu", {"l1_coeff": 0.001}), ("topk", {"n_m": 512, "k": 4})])
def test_decoder_rows_stay_unit_norm(kind, kw):
    m = _perturbed(kind, **kw)
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    for _ in range(3):
        m(torch.randn(16, 16)).loss.backward()
        m.before_step()
        opt.step()
        opt.zero_grad()
        m.after_step()
    assert torch.allclose(m.W_dec.norm(dim=1), torch.ones(m.cfg.n_m), atol=1e-5)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(n_p=0, n_m=4), "n_p must be a positive integer"),
        (dict(n_p=4, n_m=4, kind="gated"), "kind must be one of"),
        (dict(n_p=4, n_m=4, kind="topk"), r"k must be an integer in \[1, n_m = 4\]"),
        (dict(n_p=4, n_m=4, kind="topk", k=5), "got 5"),
        (dict(n_p=4, n_m=4, kind="theory", k=2), "k is only used by kind 'topk'"),
        (dict(n_p=4, n_m=4, kind="relu", l1_coeff=-1.0), "l1_coeff must be a finite number >= 0"),
        (dict(n_p=4, n_m=4, kind="theory", l1_coeff=0.1), "l1_coeff is only used by kind 'relu'"),
        (dict(n_p=4, n_m=4, init_scale=0.0), "init_scale must be a finite number > 0"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        models.SAEConfig(**kw)


def test_init_is_seeded():
    a = models.build_sae(_cfg("theory"))
    b = models.build_sae(_cfg("theory"))
    c = models.build_sae(_cfg("theory", seed=4))
    assert torch.equal(a.W_m, b.W_m) and not torch.equal(a.W_m, c.W_m)
