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
