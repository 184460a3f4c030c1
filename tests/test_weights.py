"""Tests for wsae_core.weights: Γ rules, normalisation, validation, the WSAE loss."""

import numpy as np
import pytest
import torch

from wsae_core import data, geometry, weights


def test_uniform_is_ones():
    assert torch.equal(weights.uniform_gamma(5), torch.ones(5))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
def test_variance_rule_normalised(alpha):
    x_p = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    g = weights.variance_gamma(x_p, alpha)
    assert g.shape == (4,)
    assert torch.isclose(g.pow(2).mean(), torch.tensor(1.0), atol=1e-5)
    if alpha == 0:
        assert torch.allclose(g, torch.ones(4))
    else:
        # gamma_i proportional to var_i^alpha: ratio of dims 4 and 1 is 16^alpha
        assert abs((g[3] / g[0]).item() - 16 ** alpha) / 16 ** alpha < 0.05 * alpha


def test_oracle_rule_matches_geometry():
    W = geometry.superposition_matrix([1, 2])
    g = weights.oracle_gamma(W)
    raw = geometry.frobenius_optimal_gamma(W)  # (1, 1/sqrt 2)
    assert np.allclose(g.numpy() / g[0].item(), raw / raw[0], atol=1e-6)
    assert abs(g.pow(2).mean().item() - 1) < 1e-6


def test_make_gamma_dispatch_and_errors():
    W = geometry.superposition_matrix([1, 3])
    x_p = data.superpose(data.sample_sparse(500, 4, 0.5, seed=0), W)
    assert weights.make_gamma("uniform", n_p=3).shape == (3,)
    assert weights.make_gamma("variance", n_p=3, alpha=1, x_p=x_p).shape == (3,)
    assert weights.make_gamma("oracle", n_p=3, W_p=W).shape == (3,)
    with pytest.raises(ValueError, match="needs a sample x_p"):
        weights.make_gamma("variance", n_p=3)
    with pytest.raises(ValueError, match="needs the true W_p"):
        weights.make_gamma("oracle", n_p=3)
    with pytest.raises(ValueError, match="rule must be one of"):
        weights.make_gamma("entropy", n_p=3)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([1.0, 0.0, 1.0], r"gamma\[1\] = 0.0"),
        ([1.0, -2.0], r"gamma\[1\] = -2.0"),
        ([1.0, float("nan")], r"finite, got gamma\[1\] = nan"),
        ([1.0, float("inf")], r"finite, got gamma\[1\] = inf"),
        ([[1.0, 1.0]], "must be 1-D"),
        (["a", "b"], "1-D array of positive numbers"),
    ],
)
def test_validate_gamma_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        weights.validate_gamma(bad)


def test_validate_gamma_length():
    with pytest.raises(ValueError, match="length n_p = 3, got length 2"):
        weights.validate_gamma([1.0, 1.0], 3)


def test_variance_rule_errors():
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        weights.variance_gamma(torch.randn(10, 2), float("nan"))
    with pytest.raises(ValueError, match=r"variance of x_p\[:, 1\]"):
        weights.variance_gamma(torch.stack([torch.randn(10), torch.ones(10)], 1), 1.0)


def test_wsae_loss():
    x = torch.tensor([[1.0, 2.0]])
    xh = torch.tensor([[0.0, 0.0]])
    assert weights.wsae_loss(x, xh).item() == pytest.approx(5.0)
    assert weights.wsae_loss(x, xh, torch.tensor([1.0, 0.5])).item() == pytest.approx(1 + 1)
    with pytest.raises(ValueError, match="same shape"):
        weights.wsae_loss(x, torch.zeros(1, 3))


# --- variance estimates, negative α, and the learned oracle (rule d) ------------------------------


def _sample_with_massive_dim(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4000, 200)) * np.linspace(0.5, 2.0, 200)
    x[:, 7] *= 100.0  # one massive dimension, as in a language model's residual stream
    return x


def test_dimension_variance_estimates_against_numpy():
    x = _sample_with_massive_dim()
    raw = np.var(x, axis=0, ddof=1)
    assert np.allclose(weights.dimension_variance(x, "raw").numpy(), raw)
    q = np.quantile(raw, 0.99)
    win = weights.dimension_variance(x, "winsorised", quantile=0.99).numpy()
    assert np.allclose(win, np.minimum(raw, q))
    assert win[7] < raw[7] / 100 and np.allclose(np.delete(win, np.argsort(raw)[-2:]), np.delete(raw, np.argsort(raw)[-2:]))
    u = x / np.sqrt((x**2).mean(1, keepdims=True))
    assert np.allclose(weights.dimension_variance(x, "unit_rms").numpy(), np.var(u, axis=0, ddof=1))


def test_negative_alpha_inverts_the_ordering_and_mean_square_is_one():
    x = _sample_with_massive_dim()
    var = np.var(x, axis=0, ddof=1)
    for alpha in (-1.0, -0.5, 0.5, 1.0):
        g = weights.variance_gamma(x, alpha).double().numpy()
        assert (g**2).mean() == pytest.approx(1.0, abs=1e-6)
        expected = var**alpha / np.sqrt((var ** (2 * alpha)).mean())
        assert np.allclose(g, expected, rtol=1e-5)
        assert np.argmax(g) == (7 if alpha > 0 else np.argmin(var))


def test_winsorised_rule_spreads_the_weight():
    x = _sample_with_massive_dim()
    eff = lambda g: float(g.pow(2).sum() ** 2 / g.pow(4).sum())  # effective number of weighted dims
    raw = weights.variance_gamma(x, 1.0, "raw")
    win = weights.variance_gamma(x, 1.0, "winsorised")
    assert eff(raw) < 2 and eff(win) > 50  # one dimension vs most of the 200


def test_variance_estimate_errors():
    x = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match="estimate must be one of"):
        weights.dimension_variance(x, "median")
    with pytest.raises(ValueError, match=r"quantile must be a number in \(0, 1\]"):
        weights.dimension_variance(x, "winsorised", quantile=1.5)
    x[4] = 0.0
    with pytest.raises(ValueError, match=r"x_p\[4\] is all zeros"):
        weights.dimension_variance(x, "unit_rms")


def test_learned_oracle_of_the_true_dictionary_is_the_oracle():
    from wsae_core import geometry

    W_p = geometry.superposition_matrix([1, 2, 3])  # (4, 6)
    rng = np.random.default_rng(1)
    atoms = W_p.T[rng.permutation(6)] * rng.uniform(0.5, 3.0, size=(6, 1))  # shuffled, any norm
    g = weights.learned_oracle_gamma(atoms)
    assert torch.allclose(g, weights.oracle_gamma(W_p), atol=1e-6)
    # (1, 1/sqrt 2, sqrt(2/3), sqrt(2/3)) normalised to mean(γ²) = 1
    ref = np.array([1, 1 / np.sqrt(2), np.sqrt(2 / 3), np.sqrt(2 / 3)])
    assert np.allclose(g.numpy(), ref / np.sqrt((ref**2).mean()), atol=1e-6)
    assert torch.allclose(weights.make_gamma("learned_oracle", n_p=4, directions=atoms), g)


def test_learned_oracle_ignores_dead_atoms():
    from wsae_core import geometry

    W_p = geometry.superposition_matrix([1, 2, 3])
    dead = np.random.default_rng(2).normal(size=(5, 4))
    atoms = np.vstack([W_p.T, dead])
    alive = np.r_[np.ones(6, bool), np.zeros(5, bool)]
    g = weights.learned_oracle_gamma(atoms, alive=alive)
    assert torch.allclose(g, weights.oracle_gamma(W_p), atol=1e-6)
    assert not torch.allclose(weights.learned_oracle_gamma(atoms), g, atol=1e-3)
    with pytest.raises(ValueError, match="alive keeps no atom"):
        weights.learned_oracle_gamma(atoms, alive=np.zeros(11, bool))
    with pytest.raises(ValueError, match=r"alive must be a boolean mask of shape \(11,\)"):
        weights.learned_oracle_gamma(atoms, alive=np.ones(3, bool))
    with pytest.raises(ValueError, match="needs the directions"):
        weights.make_gamma("learned_oracle", n_p=4)


def test_frobenius_optimal_gamma_solves_the_least_squares_problem():
    """Against the direct (n², n_p) non-negative least squares the Gram form replaces."""
    from scipy.optimize import nnls

    from wsae_core import geometry

    rng = np.random.default_rng(3)
    for n_p, n in ((3, 5), (6, 14), (10, 40)):
        W = rng.normal(size=(n_p, n))
        design = np.stack([np.outer(r, r).ravel() for r in W], axis=1)
        g_ref, _ = nnls(design, np.eye(n).ravel())
        assert np.allclose(geometry.frobenius_optimal_gamma(W) ** 2, g_ref, atol=1e-8)
    assert np.all(geometry.frobenius_optimal_gamma(np.zeros((3, 4))) == 0)
