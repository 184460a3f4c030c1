"""Every hand-written gradient against finite differences.

The fused kernels of :class:`~wsae_core.models.PracticalSAE` (``_FusedReluSAE``, ``_FusedTopKSAE``
with its AuxK term), the tied theory SAE and the L-BFGS objective of
:func:`~wsae_core.geometry.fit_theory_sae` compute their gradients by hand. Here each one is
compared with central differences, never with another hand formula:

* The fused kernels compute in float32 only. Away from the ReLU kinks and Top-k swaps their
  outputs are quadratic in any single weight (``x̂`` is linear in each weight once the active set
  is fixed), so a central difference has no truncation error, only float32 rounding: with step
  ``EPS = 1e-2`` and losses of order 1 that is ``~1e-7 / 1e-2 = 1e-5``; the check allows
  ``FD_ATOL = 2e-4`` plus ``FD_RTOL = 1e-3``. Entries whose ``±EPS`` step changes the active set
  are left out (at most a tenth of them; the test asserts so).
* The AuxK gradient holds the residual ``e`` and the scale ``c`` constant (Gao et al. 2024), so
  its finite differences are those of the written-out formula ``c * E||Γ(ê - e)||²`` in float64
  with ``e``, ``c`` frozen at the evaluation point; the value of the formula is checked too.
* The theory SAE and ``fit_theory_sae`` are smooth away from the kinks and are checked against
  float64 central differences (``torch.autograd.gradcheck`` where the code runs in float64).
"""

import numpy as np
import pytest
import torch

from wsae_core import geometry, models

EPS = 1e-2
FD_ATOL, FD_RTOL = 2e-4, 1e-3


def _practical(kind, n_p, n_m, k=None, l1=0.0, seed=0):
    cfg = models.SAEConfig(n_p=n_p, n_m=n_m, kind=kind, k=k, l1_coeff=l1, seed=seed)
    m = models.PracticalSAE(cfg)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # away from the initial symmetries: every weight and bias non-trivial
        m.W_enc.add_(0.3 * torch.randn(m.W_enc.shape, generator=g))
        m.b_enc.copy_(0.2 * torch.randn(m.b_enc.shape, generator=g))
        m.W_dec.copy_(m.W_dec + 0.3 * torch.randn(m.W_dec.shape, generator=g))
        m.W_dec.div_(m.W_dec.norm(dim=1, keepdim=True))
        m.b_dec.copy_(0.3 * torch.randn(m.b_dec.shape, generator=g))
    return m


def _pattern(m, x, dead=None, k_aux=None):
    """The active set of a practical SAE on ``x``: what must not change within a finite-difference step."""
    with torch.no_grad():
        pre = m._pre(x)
        if m.cfg.kind == "relu":
            return [pre > 0]
        vals, idx = pre.topk(m.cfg.k, dim=1)
        out = [idx.sort(1).values, vals > 0]
        if dead is not None:
            dead_ids = dead.nonzero().squeeze(1)
            a_vals, a_loc = pre[:, dead_ids].topk(k_aux, dim=1)
            out += [dead_ids[a_loc].sort(1).values, a_vals > 0]
        return out


def _same(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b))


def _fd_check(f, tensors, pattern, analytic, eps=EPS):
    """Central differences of the float32 scalar ``f()`` in every entry of ``tensors`` (perturbed in
    place) against ``analytic`` (same shapes). ``pattern()`` is the active set; an entry whose step
    changes it is skipped. Returns the number of entries checked."""
    base = pattern()
    checked = total = 0
    for t, g in zip(tensors, analytic):
        flat, gflat = t.data.view(-1), g.reshape(-1)
        for i in range(flat.numel()):
            total += 1
            old = float(flat[i])
            flat[i] = old + eps
            up, p_up = float(f()), pattern()
            flat[i] = old - eps
            down, p_down = float(f()), pattern()
            flat[i] = old
            if not (_same(base, p_up) and _same(base, p_down)):
                continue
            fd = (up - down) / (2 * eps)
            assert abs(fd - float(gflat[i])) <= FD_ATOL + FD_RTOL * abs(fd), (t.shape, i, fd, float(gflat[i]))
            checked += 1
    assert checked >= 0.9 * total, f"only {checked} of {total} entries away from a kink: choose another seed"
    return checked


@pytest.mark.parametrize("l1", [0.0, 0.05])
def test_fused_relu_backward_matches_finite_differences(l1):
    torch.manual_seed(0)
    m = _practical("relu", n_p=5, n_m=7, l1=l1)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    gamma = torch.tensor([0.5, 1.0, 1.5, 2.0, 0.8])
    # random linear read-outs of the returned latents and reconstruction exercise their upstream gradients
    r_lat = torch.randn(6, 7, generator=torch.Generator().manual_seed(2))
    r_rec = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))

    def f():
        out = m(x, gamma)
        return out.loss + 0.1 * (out.latents * r_lat).sum() + 0.1 * (out.reconstruction * r_rec).sum()

    params = [m.W_enc, m.b_enc, m.W_dec, m.b_dec]
    grads = torch.autograd.grad(f(), params)
    with torch.no_grad():
        _fd_check(f, params, lambda: _pattern(m, x), grads)
    # the L1 term is l1 * E sum_j a_j, its gradient included
    out = m(x, gamma)
    assert float(out.sparsity_loss.detach()) == pytest.approx(l1 * float(out.latents.detach().sum()) / 6, rel=1e-6)


# (n_m, k): 16 k >= n_m takes the dense backward, 16 k < n_m the sparse one
@pytest.mark.parametrize("n_m, k", [(12, 3), (40, 2)])
def test_fused_topk_backward_matches_finite_differences(n_m, k):
    m = _practical("topk", n_p=5, n_m=n_m, k=k, seed=n_m)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    gamma = torch.tensor([0.5, 1.0, 1.5, 2.0, 0.8])
    r_val = torch.randn(6, k, generator=torch.Generator().manual_seed(2))
    r_rec = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))

    def f():
        out = m(x, gamma)
        # values come unsorted: read them out through the dense view so the functional is well defined
        dense = models.dense_latents(out, n_m)
        return out.loss + 0.1 * (dense.gather(1, out.latent_indices.sort(1).values) * r_val).sum() \
            + 0.1 * (out.reconstruction * r_rec).sum()

    params = [m.W_enc, m.b_enc, m.W_dec, m.b_dec]
    grads = torch.autograd.grad(f(), params)
    with torch.no_grad():
        _fd_check(f, params, lambda: _pattern(m, x), grads)


@pytest.mark.parametrize("kind, n_m, kw", [("relu", 7, {"l1": 0.05}), ("topk", 12, {"k": 3}), ("topk", 40, {"k": 2})])
def test_fused_input_gradient(kind, n_m, kw):
    """Both fused kernels return the gradient of ``x_p`` (attribution asks for it); the returned
    reconstruction depends on ``x_p`` only through the latents."""
    m = _practical(kind, n_p=5, n_m=n_m, seed=n_m, **kw)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1)).requires_grad_()
    r_rec = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))

    def f():
        out = m(x)
        return out.loss + 0.1 * (out.reconstruction * r_rec).sum()

    (g,) = torch.autograd.grad(f(), [x])
    with torch.no_grad():
        _fd_check(f, [x], lambda: _pattern(m, x), [g])


def _auxk_reference(params, x, gamma, dead, k, k_aux, e, c):
    """``c * E||Γ(ê - e)||²`` in float64 with the residual ``e`` and the scale ``c`` given (frozen):
    ``ê = sum of the k_aux largest ReLU'd dead pre-activations times their decoder rows`` (no bias)."""
    W_enc, b_enc, W_dec, b_dec = params
    pre = (x - b_dec) @ W_enc.T + b_enc
    dead_ids = dead.nonzero().squeeze(1)
    a_vals, a_loc = pre[:, dead_ids].topk(k_aux, dim=1)
    S = torch.zeros_like(pre).scatter(1, dead_ids[a_loc], a_vals.relu())
    e_hat = S @ W_dec
    return c * ((e_hat - e) ** 2 * gamma**2).sum() / x.shape[0]


@pytest.mark.parametrize("n_m, k", [(12, 3), (40, 2)])
def test_fused_auxk_value_and_backward(n_m, k):
    m = _practical("topk", n_p=6, n_m=n_m, k=k, seed=n_m + 1)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(4))
    gamma = torch.tensor([0.5, 1.0, 1.5, 2.0, 0.8, 1.2])
    dead = torch.zeros(n_m, dtype=torch.bool)
    dead[torch.randperm(n_m, generator=torch.Generator().manual_seed(5))[: n_m // 2]] = True
    k_aux = 3
    out = m(x, gamma, dead, k_aux)
    params = [m.W_enc, m.b_enc, m.W_dec, m.b_dec]
    grads = torch.autograd.grad(out.auxk_loss, params)

    # The scale, from its definition: dead_scale * var_Γ(x) / var_Γ(e), dead_scale = min(n_dead / k_aux, 1)
    x64, g64 = x.double(), gamma.double()
    e = (x64 - out.reconstruction.detach().double())
    var = lambda t: float((((t - t.mean(0)) ** 2).sum(0) * g64**2).sum())  # noqa: E731
    c = min(int(dead.sum()) / k_aux, 1.0) * var(x64) / var(e)
    p64 = [p.detach().double().clone().requires_grad_() for p in params]
    ref = _auxk_reference(p64, x64, g64, dead, k, k_aux, e, c)
    assert float(out.auxk_loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)

    # float64 central differences of the frozen-target formula
    ref_grads = torch.autograd.grad(ref, p64)
    with torch.no_grad():
        for p, g, gref in zip(p64, grads, ref_grads):
            flat = p.data.view(-1)
            for i in range(flat.numel()):
                old = float(flat[i])
                flat[i] = old + 1e-6
                up = float(_auxk_reference(p64, x64, g64, dead, k, k_aux, e, c))
                flat[i] = old - 1e-6
                down = float(_auxk_reference(p64, x64, g64, dead, k, k_aux, e, c))
                flat[i] = old
                fd = (up - down) / 2e-6
                assert abs(fd - float(gref.reshape(-1)[i])) <= 1e-6 + 1e-6 * abs(fd)  # the formula's own autograd
                assert abs(fd - float(g.reshape(-1)[i])) <= 1e-4 + 1e-4 * abs(fd), (p.shape, i, fd, float(g.reshape(-1)[i]))


def _theory_loss(W_m, x_p, gamma):
    """``E||Γ(x_p - W_mᵀ relu(W_m x_p))||²`` written out (float64)."""
    rec = torch.relu(x_p @ W_m.T) @ W_m
    return ((x_p - rec) ** 2 * gamma**2).sum() / x_p.shape[0]


def test_theory_sae_gradient_is_that_of_the_tied_loss():
    """Both uses of the tied ``W_m`` (encoder and decoder) carry gradient."""
    torch.manual_seed(0)
    m = models.TheorySAE(models.SAEConfig(n_p=4, n_m=6, seed=3))
    x_p = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    gamma = torch.tensor([0.5, 1.0, 2.0, 1.3])
    out = m(x_p, gamma)
    (g,) = torch.autograd.grad(out.loss, [m.W_m])
    W64 = m.W_m.detach().double().clone().requires_grad_()
    x64, g64 = x_p.double(), gamma.double()
    assert float(out.loss.detach()) == pytest.approx(float(_theory_loss(W64, x64, g64).detach()), rel=1e-6)
    # the written-out loss, float64 central differences (gradcheck), then the model's float32 gradient
    assert torch.autograd.gradcheck(lambda W: _theory_loss(W, x64, g64), (W64,), eps=1e-6, atol=1e-7)
    fd = torch.zeros_like(W64)
    with torch.no_grad():
        for i in range(W64.numel()):
            d = torch.zeros_like(W64).view(-1)
            d[i] = 1e-6
            d = d.view_as(W64)
            fd.view(-1)[i] = (_theory_loss(W64 + d, x64, g64) - _theory_loss(W64 - d, x64, g64)) / 2e-6
    torch.testing.assert_close(g.double(), fd, atol=1e-5, rtol=1e-5)
    # a decoder-only gradient (encoder cut) or an encoder-only one is far from it
    W_half = W64.detach().clone().requires_grad_()
    rec = torch.relu(x64 @ W_half.detach().T) @ W_half
    (g_dec_only,) = torch.autograd.grad(((x64 - rec) ** 2 * g64**2).sum() / 16, [W_half])
    assert float((g_dec_only - fd).norm()) > 0.05 * float(fd.norm())


@pytest.mark.parametrize("unit_norm", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_fit_theory_sae_objective_gradient(monkeypatch, unit_norm, weighted):
    """The L-BFGS objective's hand-written gradient, caught as passed to scipy, against gradcheck's
    float64 central differences of its own loss."""
    import scipy.optimize

    seen = {}
    real = scipy.optimize.minimize

    def spy(fun, x0, **kw):
        seen["fun"], seen["x0"] = fun, x0
        return real(fun, x0, **{**kw, "options": {"maxiter": 1}})

    monkeypatch.setattr(scipy.optimize, "minimize", spy)
    W_p = geometry.superposition_matrix([3, 2, 1])  # n_p = 4, n = 6
    x = np.random.default_rng(0).uniform(0, 1, (32, 6)) * (np.random.default_rng(1).uniform(size=(32, 6)) > 0.4)
    gamma = np.array([0.5, 1.5, 1.0, 2.0]) if weighted else None
    geometry.fit_theory_sae(W_p, x, 6, gamma=gamma, init="random", unit_norm=unit_norm, seed=2)
    fun = seen["fun"]
    theta = seen["x0"] + 0.1 * np.random.default_rng(3).standard_normal(seen["x0"].shape)
    loss, grad = fun(theta)
    # the loss is the definition
    W = theta.reshape(6, 4)
    if unit_norm:
        W = W / np.linalg.norm(W, axis=1, keepdims=True)
    Xp = x @ W_p.T
    g2 = 1.0 if gamma is None else gamma**2
    assert loss == pytest.approx((((Xp - np.maximum(Xp @ W.T, 0) @ W) ** 2) * g2).sum(1).mean(), rel=1e-10)

    class Loss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            value, gr = fun(t.numpy())
            ctx.save_for_backward(torch.from_numpy(gr))
            return torch.tensor(value, dtype=torch.float64)

        @staticmethod
        def backward(ctx, g):
            return g * ctx.saved_tensors[0]

    assert torch.autograd.gradcheck(Loss.apply, (torch.from_numpy(theta).requires_grad_(),), eps=1e-6, atol=1e-6, rtol=1e-5)
