"""Tests for wsae_core.metrics on planted cases with known answers."""

import numpy as np
import pytest
import torch

from wsae_core import data, geometry, metrics, models


def _planted(W, perm, n_m, scale=None, sign=None):
    """Directions ``(n_m, n_p)`` with feature i's column written (times scale, sign) into row perm[i]."""
    D = np.zeros((n_m, W.shape[0]))
    f = np.ones(W.shape[1]) if scale is None else np.asarray(scale, float)
    if sign is not None:
        f = f * np.asarray(sign, float)
    D[perm] = W.T * f[:, None]
    return D


@pytest.mark.parametrize("blocks", [[1, 2, 3], [2, 2], [4], [4, 4], [1, 2, 4, 3], [6]])
def test_matching_recovers_random_permutations_with_any_norm(blocks):
    # Digons, squares and the hexagon hold w and -w; a signed matching must pair each exactly.
    W = geometry.superposition_matrix(blocks)
    n = W.shape[1]
    rng = np.random.default_rng(len(blocks))
    for trial in range(20):
        n_m = n + int(rng.integers(0, 4))
        perm = rng.permutation(n_m)[:n]
        D = _planted(W, perm, n_m, scale=rng.uniform(0.2, 5.0, n))  # non-unit rows
        m = metrics.match_latents(D, W)
        np.testing.assert_array_equal(m.perm, perm)
        np.testing.assert_allclose(m.cosines, 1.0)


def test_matching_tells_w_from_minus_w():
    # Digon: features e (0) and -e (1). A latent along -e stands for feature 1, never for feature 0.
    W = geometry.superposition_matrix([2])
    m = metrics.match_latents(np.array([[-2.0], [0.5]]), W)
    np.testing.assert_array_equal(m.perm, [1, 0])
    # Only one latent, pointing along -e: feature 0 has no latent pointing along it.
    m = metrics.match_latents(np.array([[-1.0]]), W)
    np.testing.assert_array_equal(m.perm, [-1, 0])
    assert m.mean_cosine == pytest.approx(0.5)


def test_matching_sign_flipped_plants():
    # A latent planted as -w_i cannot stand for w_i: it stands for w_i's digon partner if there is
    # one, otherwise for nothing.
    W = geometry.superposition_matrix([1, 2, 3])  # features: mono 0, digon (1, 2), triangle (3, 4, 5)
    perm = np.array([4, 0, 6, 2, 1, 3])
    D = _planted(W, perm, 7, sign=[1, -1, 1, 1, -1, 1])  # feature 1 planted as -w_1 = w_2; feature 4 as -w_4
    m = metrics.match_latents(D, W)
    assert m.perm[0] == 4 and m.perm[3] == 2 and m.perm[5] == 3
    assert m.perm[1] == -1 and m.perm[2] in (0, 6)  # both digon latents point along w_2
    assert m.perm[4] == -1  # -w_4 has cosine -1 with w_4 and +1/2 with w_3, w_5 (taken)
    assert np.all(m.cosines[m.perm >= 0] > 0) and np.all(m.cosines[m.perm < 0] == 0)


def test_matching_is_the_best_signed_assignment():
    # Brute force over every injective assignment on small random cases.
    import itertools

    rng = np.random.default_rng(3)
    for trial in range(30):
        n, n_p, n_m = int(rng.integers(2, 5)), 3, int(rng.integers(2, 6))
        W, D = rng.standard_normal((n_p, n)), rng.standard_normal((n_m, n_p))
        cos = np.maximum((W / np.linalg.norm(W, axis=0)).T @ (D / np.linalg.norm(D, axis=1, keepdims=True)).T, 0)
        best = max(sum(cos[i, j] for i, j in zip(feats, lats))
                   for feats in itertools.permutations(range(n), min(n, n_m))
                   for lats in itertools.permutations(range(n_m), min(n, n_m)))
        m = metrics.match_latents(D, W)
        assert m.cosines.sum() == pytest.approx(best, abs=1e-9)
        assert len(set(m.perm[m.perm >= 0].tolist())) == int((m.perm >= 0).sum())  # injective


def test_matching_ties_are_deterministic_and_rounding_proof():
    # A square's latent at 45 degrees has cosine 1/sqrt(2) with two features: an exact tie. Tiny
    # perturbations (another CPU's rounding) must not change the assignment.
    W = geometry.superposition_matrix([4])
    D = np.array([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]]) / np.sqrt(2)
    ref = metrics.match_latents(D, W).perm
    assert sorted(ref.tolist()) == [0, 1, 2, 3]
    rng = np.random.default_rng(0)
    for _ in range(50):
        np.testing.assert_array_equal(metrics.match_latents(D * (1 + 1e-13 * rng.standard_normal(D.shape)), W).perm, ref)


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


def test_l_gt_of_a_shuffled_closed_form_is_that_of_the_closed_form():
    # The failure seen with |cos|: a trained W_m ~ W_p^T whose digon rows come in either order.
    # Whatever the order, signs and norms of the rows, L_GT must be the closed form's.
    W = geometry.superposition_matrix([1, 2, 3, 4])
    n = W.shape[1]
    x = data.sample_sparse(4096, n, S=0.7, seed=1, dtype=torch.float64).numpy()
    ref = metrics.ground_truth_error(x, geometry.recover(W.T, x @ W.T))
    rng = np.random.default_rng(0)
    for trial in range(10):
        perm = rng.permutation(n + 2)[:n]
        Wm = _planted(W, perm, n + 2)
        lat = geometry.recover(Wm, x @ W.T)
        m = metrics.match_latents(Wm * rng.uniform(0.5, 2.0, (n + 2, 1)), W)
        gt = metrics.ground_truth_error(x, lat, m.perm)
        assert gt.all == pytest.approx(ref.all, rel=1e-12) and gt.unmatched == 0.0


def test_unmatched_latents_count_as_padding():
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    lat = np.array([[1.0, 0.0, 0.5], [0.0, 2.0, 0.0]])  # latent 2 stands for nothing but fires once
    gt = metrics.ground_truth_error(x, lat, np.array([0, 1]))
    assert gt.unmatched == pytest.approx(0.25 / 2)
    assert gt.all == pytest.approx(0.25 / 2)
    gt = metrics.ground_truth_error(x, lat, np.array([0, -1]))  # feature 1 unmatched: recovered as 0
    assert gt.all == pytest.approx((4.0 + 4.0 + 0.25) / 2)


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
    assert r["matched"] == 1.0 and r["l_gt_unmatched"] == 0.0


def test_a_one_element_float_perm_is_refused_by_name():
    """A float ``perm`` of one element is refused like any float one, not left to fail as an index."""
    with pytest.raises(ValueError, match="perm must be a 1-D integer array"):
        metrics.feature_shrinkage(np.ones((4, 1)), np.ones((4, 3)), perm=np.array([0.0]))
    with pytest.raises(ValueError, match="perm must be a 1-D integer array"):
        metrics.vanished_fraction(np.ones((4, 1)), np.ones((4, 3)), perm=np.array([1.0]))
    assert metrics.feature_shrinkage(np.ones((4, 1)), np.full((4, 3), 0.5), perm=np.array([2])).tolist() == [0.5]
