"""Values of small wsae_core.models helpers against independent float64 computations (written to
kill mutation survivors: see CONTRIBUTING.md, "Mutation testing")."""

import numpy as np
import pytest
import torch

from wsae_core import models
from wsae_core.models import SAEConfig


def test_auxk_factor_against_its_definition():
    """``c = dead_scale * var_Γ(x) / var_Γ(e)`` with Γ-weighted sums of squared deviations, also when
    the residual's variance is far below 1 (late in training) and when it is exactly 0."""
    rng = np.random.default_rng(0)
    x, w2 = rng.standard_normal((16, 5)), rng.uniform(0.5, 2.0, 5)
    for scale in (3.0, 1e-3):
        e = scale * rng.standard_normal((16, 5))
        var = lambda a: float(((a - a.mean(0)) ** 2 * w2).sum())
        got = models._auxk_factor(*(torch.tensor(a) for a in (x, e, w2)), 0.25)
        assert got == pytest.approx(0.25 * var(x) / var(e), rel=1e-12)
    zero = models._auxk_factor(torch.tensor(x), torch.ones(16, 5, dtype=torch.float64), torch.tensor(w2), 1.0)
    assert zero == pytest.approx(var(x) / 1e-30, rel=1e-12)  # a constant residual: finite, not inf


@pytest.mark.parametrize("kk", [1, 2, 5])
def test_rows_dot_against_a_loop(kk):
    g = torch.Generator().manual_seed(kk)
    W, G = torch.randn(7, 4, generator=g), torch.randn(3, 4, generator=g)
    idx = torch.stack([torch.randperm(7, generator=g)[:kk] for _ in range(3)])
    out = models._rows_dot(W, idx, G)
    assert out.shape == (3, kk)
    for b in range(3):
        for j in range(kk):
            assert float(out[b, j]) == pytest.approx(float(W[idx[b, j]].double() @ G[b].double()), abs=1e-5)


@pytest.mark.parametrize("kind,kw", [("relu", {}), ("topk", {"k": 2})])
def test_practical_decode_and_encode_values(kind, kw):
    m = models.PracticalSAE(SAEConfig(n_p=4, n_m=6, kind=kind, seed=3, **kw))
    with torch.no_grad():
        m.b_dec.copy_(torch.tensor([0.5, -1.0, 0.25, 2.0]))
        m.b_enc.copy_(torch.linspace(-0.2, 0.3, 6))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    W_enc, b_enc = m.W_enc.detach().double().numpy(), m.b_enc.detach().double().numpy()
    W_dec, b_dec = m.W_dec.detach().double().numpy(), m.b_dec.detach().double().numpy()
    pre = (x.double().numpy() - b_dec) @ W_enc.T + b_enc
    lat = np.maximum(pre, 0)
    if kind == "topk":  # keep each row's 2 largest pre-activations (then the ReLU)
        lat = np.where(pre >= np.sort(pre, axis=1)[:, -2:-1], lat, 0.0)
    enc = m.encode(x)
    np.testing.assert_allclose(enc.detach().double().numpy(), lat, atol=1e-5)
    lat_t = torch.tensor(lat, dtype=torch.float32)
    np.testing.assert_allclose(m.decode(lat_t).detach().double().numpy(), lat @ W_dec + b_dec, atol=1e-5)
    out = m(x)
    np.testing.assert_allclose(out.reconstruction.detach().double().numpy(), lat @ W_dec + b_dec, atol=1e-5)


def test_stable_argsort_keeps_the_order_of_ties():
    """Python's sorted is stable: equal keys keep their positions' order (the Top-k backward relies
    on it for a fixed summation order). 5,000 keys with 7 values: many long runs of ties, beyond
    the short runs that an unstable sort would also leave in order."""
    keys = torch.randint(0, 7, (5000,), generator=torch.Generator().manual_seed(5))
    ref = sorted(range(5000), key=lambda i: int(keys[i]))
    assert models._stable_argsort(keys).tolist() == ref


@pytest.mark.parametrize("kind,kw", [("relu", {"l1_coeff": 0.3}), ("topk", {"k": 2})])
def test_fused_backward_against_autograd_for_scaled_losses_and_frozen_weights(kind, kw):
    """The hand-written backward against autograd through the unfused path (``fused=False``), for
    a loss that weights the reconstruction and sparsity terms by 2.5 and 0.7 (upstream gradients
    other than 1), and for the input's gradient alone, the weights frozen."""
    cfg = SAEConfig(n_p=5, n_m=12, kind=kind, seed=6, **kw)
    fused, plain = models.PracticalSAE(cfg), models.PracticalSAE(cfg, fused=False)
    plain.load_state_dict(fused.state_dict())
    with torch.no_grad():
        for m in (fused, plain):
            m.b_dec.copy_(torch.tensor([0.3, -0.2, 0.1, 0.4, -0.5]))
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(7))
    gamma = torch.tensor([0.5, 1.0, 1.5, 2.0, 0.8])

    def grads(m, wrt):
        xx = x.clone().requires_grad_(True)
        out = m(xx, gamma)
        loss = 2.5 * out.recon_loss + 0.7 * out.sparsity_loss
        return torch.autograd.grad(loss, [xx] + wrt)

    for a, b in zip(grads(fused, list(fused.parameters())), grads(plain, list(plain.parameters()))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for m in (fused, plain):
        m.requires_grad_(False)
    torch.testing.assert_close(grads(fused, [])[0], grads(plain, [])[0], atol=1e-5, rtol=1e-4)


def test_auxk_k_aux_default_and_smallest():
    """``k_aux`` defaults to ``n_p // 2`` (the docstring), and ``k_aux = 1`` still trains the dead
    latents: one per sample gives a positive AuxK loss."""
    m = models.PracticalSAE(SAEConfig(n_p=6, n_m=16, kind="topk", k=2, seed=8))
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(9))
    dead = torch.zeros(16, dtype=torch.bool)
    dead[4:] = True
    for fused in (True, False):
        m.fused = fused
        with torch.no_grad():
            default = float(m(x, dead_mask=dead).auxk_loss)
            assert default == pytest.approx(float(m(x, dead_mask=dead, k_aux=3).auxk_loss), rel=1e-6)
            assert default != pytest.approx(float(m(x, dead_mask=dead, k_aux=2).auxk_loss), rel=1e-3)
            assert float(m(x, dead_mask=dead, k_aux=1).auxk_loss) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_rows_is_torch_topk(dtype):
    """The fused Top-k's selection from a candidate set gives torch.topk's values (and positions,
    where no values tie), including rows whose largest entries crowd into few columns of its view,
    rows of equal values, and sizes where it falls back to torch.topk."""
    from wsae_core.models import _TOPK_SLICES, _topk_rows

    g = torch.Generator().manual_seed(0)
    for B, n_m, k in [(64, 4608, 32), (16, 24576, 32), (8, 512, 7), (5, 100, 3), (3, 64, 8)]:
        pre = torch.randn(B, n_m, generator=g).to(dtype)
        C = n_m // _TOPK_SLICES
        if n_m % _TOPK_SLICES == 0 and B > 2:
            pre[0, ::C] = 100.0 + torch.arange(_TOPK_SLICES, dtype=dtype)  # one column holds the largest entries
            pre[1] = 1.0  # all equal
            pre[2, : 2 * k] = torch.linspace(50, 60, 2 * k).to(dtype)  # the largest in few adjacent columns
        vals, idx = _topk_rows(pre, k)
        ref_vals, ref_idx = pre.topk(k, dim=1, sorted=False)
        assert vals.dtype == dtype and idx.dtype == torch.int64 and vals.shape == idx.shape == (B, k)
        assert torch.equal(vals.sort(1).values, ref_vals.sort(1).values), (B, n_m, k)
        assert torch.equal(pre.gather(1, idx), vals)
        assert all(len(set(r.tolist())) == k for r in idx)  # k distinct latents per row
        if dtype == torch.float32:  # continuous values: no ties outside the planted rows
            rows = slice(3, None) if n_m % _TOPK_SLICES == 0 and B > 2 else slice(None)
            assert torch.equal(idx[rows].sort(1).values, ref_idx[rows].sort(1).values)


@pytest.mark.parametrize("d", [20, 32, 63, 64, 768])
def test_encode_folds_the_bias_into_the_product(d):
    """The bf16 encoder with the bias folded into the GEMM (inner dimension padded to a multiple of
    32, including when d already is one) equals addmm in bf16; fp32 is addmm itself."""
    from wsae_core.models import _encode

    g = torch.Generator().manual_seed(d)
    x, W, b = torch.randn(7, d, generator=g), torch.randn(33, d, generator=g), torch.randn(33, generator=g)
    ref = torch.addmm(b.bfloat16(), x.bfloat16(), W.bfloat16().T).float()
    got = _encode(x, W, b, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (7, 33)
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
    assert torch.equal(_encode(x, W, b, torch.float32), torch.addmm(b, x, W.T))
