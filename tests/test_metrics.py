"""Tests for wsae_core.metrics on planted cases with known answers."""

import numpy as np
import pytest
import torch

from wsae_core import geometry, metrics, models


def test_matching_recovers_planted_permutation():
    W = geometry.superposition_matrix([1, 2, 3])  # (4, 6)
    perm = np.array([4, 0, 6, 2, 1, 3])
    D = np.zeros((7, 4))
    D[perm] = W.T * np.array([1, -1, 1, 1, -1, 1])[:, None]  # signs must not matter
    m = metrics.match_latents(D, W)
    assert np.array_equal(m.perm, perm)
    assert m.mean_cosine == pytest.approx(1.0)
    assert np.allclose(m.cosines, 1.0)


def test_matching_fewer_latents_than_features():
    W = np.eye(3)
    m = metrics.match_latents(np.eye(3)[:2], W)
    assert (m.perm == -1).sum() == 1
    assert m.mean_cosine == pytest.approx(2 / 3)


def test_matching_errors():
    with pytest.raises(ValueError, match="directions must be"):
        metrics.match_latents(np.zeros((3, 5)), np.eye(4))
    with pytest.raises(ValueError, match="finite"):
        metrics.match_latents(np.full((3, 4), np.nan), np.eye(4))


def test_ground_truth_error_planted():
    x = np.array([[1.0, 0.0], [0.5, 2.0]])
    lat = np.array([[0.0, 0.0, 1.0], [0.3, 0.0, 0.5]])  # latent 2 = feature 0, latent 0 = feature 1
    gt = metrics.ground_truth_error(x, lat, np.array([2, 0]))
    # errors: sample 0: (0, 0); sample 1: (0, 1.7^2)
    assert gt.all == pytest.approx(1.7**2 / 2)
    assert gt.nonzero == pytest.approx(1.7**2 / 3)
    assert gt.zero == pytest.approx(0.0)


def test_shrinking_example_from_the_paper():
    # W_p = [[1,0,0],[0,1,-1]], x = (0.5, 1.0, 0.8) -> x_m = (0.5, 0.2, 0): ||x - x_m||^2 = 1.28.
    W = geometry.superposition_matrix([1, 2])
    x = np.array([[0.5, 1.0, 0.8]])
    x_m = geometry.recover(geometry.closed_form_sae(W, 3), x @ W.T)
    gt = metrics.ground_truth_error(x, x_m, np.arange(3))
    assert gt.all == pytest.approx(1.28)
    assert metrics.feature_shrinkage(x, x_m, np.arange(3)) == pytest.approx([1.0, 0.2, 0.0])
    assert metrics.vanished_fraction(x, x_m, np.arange(3)) == pytest.approx(1 / 3)
    assert metrics.reconstruction_error(x @ W.T, x_m @ geometry.closed_form_sae(W, 3)) == pytest.approx(0.0)


def test_shrinkage_nan_for_never_active():
    s = metrics.feature_shrinkage(np.array([[1.0, 0.0]]), np.array([[0.5, 0.3]]))
    assert s[0] == pytest.approx(0.5) and np.isnan(s[1])


def test_fvu_l0_dead_dense():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    assert metrics.fvu(x, x) == 0.0
    assert metrics.fvu(x, np.tile(x.mean(0), (4, 1))) == pytest.approx(1.0)
    lat = np.array([[1.0, 0.0, 0.0], [1.0, 2.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert metrics.l0(lat) == pytest.approx(1.25)
    assert metrics.dead_fraction(lat) == pytest.approx(1 / 3)
    assert metrics.dense_fraction(lat, 0.5) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="threshold"):
        metrics.dense_fraction(lat, 2.0)


def test_evaluate_recovery_closed_form_is_exact_at_extreme_sparsity():
    # Theorem 2: non-positive interference, one feature active at a time -> x_m ~ x exactly.
    W = geometry.superposition_matrix([1, 2, 4])
    sae = models.build_sae(models.SAEConfig(n_p=W.shape[0], n_m=8))
    with torch.no_grad():
        sae.W_m.copy_(torch.tensor(geometry.closed_form_sae(W, 8), dtype=torch.float32))
    x = torch.zeros(7, 7)
    x[torch.arange(7), torch.arange(7)] = torch.linspace(0.2, 1.0, 7)
    r = metrics.evaluate_recovery(sae, x, W)
    assert r["mean_cosine"] == pytest.approx(1.0)
    assert r["l_gt"] == pytest.approx(0.0, abs=1e-10)
    assert r["shrinkage"] == pytest.approx(1.0, abs=1e-6)
    assert r["vanished"] == 0.0
