"""Tests for wsae_core.geometry: superposition matrices, interference, Theorem 1's closed form,
recovery, "~", Frobenius-optimal weights and per-sample theory losses."""

import numpy as np
import pytest
import sympy as sp

from wsae_core import geometry as g

BLOCK_MIXES = [[1], [2], [3], [4], [1, 2], [2, 3], [1, 1, 2, 3, 4], [3, 3], [2, 2, 2], [5, 1], [6]]


@pytest.mark.parametrize("blocks", BLOCK_MIXES)
def test_superposition_shapes_norms_and_exact_agree(blocks):
    W = g.superposition_matrix(blocks)
    n_p = sum(1 if k <= 2 else 2 for k in blocks)
    assert W.shape == (n_p, sum(blocks))
    np.testing.assert_allclose((W**2).sum(0), 1.0, atol=1e-12)
    We = g.superposition_matrix(blocks, exact=True)
    assert isinstance(We, sp.MatrixBase)
    np.testing.assert_allclose(np.array(We.evalf(), dtype=float), W, atol=1e-12)
    # groups are mutually orthogonal: interference across blocks is zero
    G = g.interference(W)
    for (r1, c1) in g.block_slices(blocks):
        for (r2, c2) in g.block_slices(blocks):
            if c1 != c2:
                assert np.all(G[c1, c2] == 0)


def test_triangle_is_the_papers_matrix():
    We = g.superposition_matrix([3], exact=True)
    assert We == sp.Matrix([[0, sp.sqrt(3) / 2, -sp.sqrt(3) / 2], [1, -sp.Rational(1, 2), -sp.Rational(1, 2)]])
    assert g.interference(We) == sp.Matrix([[0, -sp.Rational(1, 2), -sp.Rational(1, 2)],
                                            [-sp.Rational(1, 2), 0, -sp.Rational(1, 2)],
                                            [-sp.Rational(1, 2), -sp.Rational(1, 2), 0]])


@pytest.mark.parametrize("bad", [[], [0], [2, -1], [2.5], "12", [True], 3, None])
def test_bad_blocks_raise(bad):
    with pytest.raises(ValueError, match="block|blocks"):
        g.superposition_matrix(bad)


def test_nonpositive_interference_classification():
    for blocks in ([1, 2, 3, 4], [2, 2], [3, 1]):
        assert g.has_nonpositive_interference(g.superposition_matrix(blocks))
    for blocks in ([5], [1, 6], [2, 7]):
        assert not g.has_nonpositive_interference(g.superposition_matrix(blocks))
    with pytest.raises(ValueError, match="tol"):
        g.has_nonpositive_interference(g.superposition_matrix([2]), tol=-1)
    with pytest.raises(ValueError, match="tol"):
        g.has_nonpositive_interference(g.superposition_matrix([2]), tol=float("nan"))


@pytest.mark.parametrize("n,n_p", [(2, 1), (4, 2), (6, 3), (10, 5), (7, 5), (5, 5), (20, 10), (40, 20)])
def test_random_nonpositive_superposition(n, n_p):
    for seed in range(25):
        W = g.random_nonpositive_superposition(n, n_p, seed=seed)
        assert W.shape == (n_p, n)
        np.testing.assert_allclose((W**2).sum(0), 1.0, atol=1e-12)
        assert g.has_nonpositive_interference(W, tol=1e-12)
        assert np.linalg.matrix_rank(W) == n_p
    np.testing.assert_array_equal(g.random_nonpositive_superposition(n, n_p, seed=1),
                                  g.random_nonpositive_superposition(n, n_p, seed=1))


@pytest.mark.parametrize("n,n_p", [(5, 2), (2, 3), (0, 1), (3, 0), (2.0, 1)])
def test_random_nonpositive_superposition_bad(n, n_p):
    with pytest.raises(ValueError, match="n"):
        g.random_nonpositive_superposition(n, n_p)


def test_closed_form_and_recover():
    W = g.superposition_matrix([1, 3])
    Wm = g.closed_form_sae(W, 6)
    assert Wm.shape == (6, 3)
    np.testing.assert_array_equal(Wm[:4], W.T)
    np.testing.assert_array_equal(Wm[4:], 0)
    We = g.superposition_matrix([1, 3], exact=True)
    assert g.closed_form_sae(We, 5) == We.T.col_join(sp.zeros(1, 3))
    with pytest.raises(ValueError, match="n_m must be >= n = 4"):
        g.closed_form_sae(W, 3)
    with pytest.raises(ValueError, match="n_m"):
        g.closed_form_sae(W, 4.0)
    x_p = np.array([[0.3, -0.2, 0.5], [1.0, 0.0, 0.0]])
    xm = g.recover(Wm, x_p)
    np.testing.assert_allclose(xm, np.maximum(x_p @ Wm.T, 0))
    np.testing.assert_allclose(g.recover(Wm, x_p[0]), xm[0])
    with pytest.raises(ValueError, match="x_p must have shape"):
        g.recover(Wm, np.ones(4))
    with pytest.raises(ValueError, match="finite"):
        g.recover(Wm, [np.nan, 0, 0])
    with pytest.raises(ValueError, match="2-D"):
        g.recover(np.ones(3), x_p)


def test_equivalent_and_match_rows():
    x = np.array([0.5, 0.0, 0.2])
    assert g.equivalent(np.array([0.0, 0.2, 0.0, 0.5, 0.0]), x)
    assert not g.equivalent(np.array([0.0, 0.2, 0.1, 0.5, 0.0]), x)  # padding must be zero
    assert not g.equivalent(np.array([0.2, 0.5]), x)  # too few entries
    assert not g.equivalent(np.array([0.0, 0.21, 0.5]), x)
    W = g.superposition_matrix([1, 3])
    perm = np.array([2, 0, 3, 1])
    Wm = np.vstack([W.T[np.argsort(perm)], np.zeros((2, 3))])
    assert g.equivalent(Wm, W.T)
    np.testing.assert_array_equal(Wm[g.match_rows(Wm, W.T)], W.T)


def test_match_rows_is_signed_and_stable():
    # Rows w and -w (digons, squares) are never confused, whatever the order of the rows.
    W = g.superposition_matrix([2, 4, 2])
    rng = np.random.default_rng(0)
    for _ in range(10):
        perm = rng.permutation(W.shape[1] + 2)
        Wm = np.vstack([W.T, np.zeros((2, W.shape[0]))])[perm]
        np.testing.assert_array_equal(Wm[g.match_rows(Wm, W.T)], W.T)
        flipped = W.T.copy()
        flipped[0] *= -1  # now two rows -e and none +e on the first digon's axis
        assert g.equivalent(Wm, W.T) and not g.equivalent(Wm, flipped)
    # Exact ties (a 45-degree frame against a square) resolve the same under last-bit noise.
    A = np.array([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]]) / np.sqrt(2)
    ref = g.match_rows(A, g.superposition_matrix([4]).T)
    for _ in range(20):
        noisy = A * (1 + 1e-13 * rng.standard_normal(A.shape))
        np.testing.assert_array_equal(g.match_rows(noisy, g.superposition_matrix([4]).T), ref)
    with pytest.raises(ValueError, match="finite"):
        g.stable_assignment(np.array([[np.nan]]))


def test_theorem2_one_sparse_recovery_random_wp():
    """Theorem 2 at S -> 1: a 1-sparse x is recovered exactly under non-positive interference."""
    rng = np.random.default_rng(0)
    for seed in range(20):
        W = g.random_nonpositive_superposition(12, 7, seed=seed)
        Wm = g.closed_form_sae(W, 15)
        for i in range(12):
            x = np.zeros(12)
            x[i] = rng.uniform(0.1, 1)
            assert g.equivalent(g.recover(Wm, W @ x), x, atol=1e-12)
    # and it fails with positive interference (pentagon)
    W = g.superposition_matrix([5])
    x = np.array([1.0, 0, 0, 0, 0])
    assert not g.equivalent(g.recover(g.closed_form_sae(W, 5), W @ x), x)


def test_frobenius_optimal_gamma_values_and_optimality():
    np.testing.assert_allclose(g.frobenius_optimal_gamma(g.superposition_matrix([1, 2])), [1, 2**-0.5], atol=1e-9)
    np.testing.assert_allclose(g.frobenius_optimal_gamma(g.superposition_matrix([3])), [np.sqrt(2 / 3)] * 2, atol=1e-9)
    rng = np.random.default_rng(1)
    for seed in range(5):
        W = g.random_nonpositive_superposition(9, 6, seed=seed)
        gam = g.frobenius_optimal_gamma(W)
        f = lambda t: np.linalg.norm(W.T @ np.diag(t**2) @ W - np.eye(9))
        for _ in range(20):
            assert f(gam) <= f(np.abs(gam + 0.05 * rng.standard_normal(6))) + 1e-12


def test_check_gamma_errors():
    for bad, msg in (([1, 0], "positive"), ([1, -1], "positive"), ([1, np.inf], "finite"),
                     ([np.nan, 1], "finite"), ([1, 1, 1], r"shape \(2,\)"), ([[1, 1]], r"shape \(2,\)")):
        with pytest.raises(ValueError, match=msg):
            g.check_gamma(bad, 2)


def test_theory_losses_examples_and_gap_identity():
    W = g.superposition_matrix([3])
    L = g.theory_losses(W, g.closed_form_sae(W, 3), np.array([0.7, 0.5, 0.3]))
    np.testing.assert_allclose([L.sae[0], L.gt[0]], [0.03, 0.5], atol=1e-12)
    # Theorem 4/5 per sample at W_m = W_p^T, random W_p with non-positive interference, random weights
    rng = np.random.default_rng(2)
    W = g.random_nonpositive_superposition(8, 5, seed=3)
    x = rng.uniform(size=(500, 8)) * (rng.uniform(size=(500, 8)) < 0.4)
    gam = rng.uniform(0.3, 1.5, size=5)
    L = g.theory_losses(W, W.T, x, gamma=gam)
    e = x - g.recover(W.T, x @ W.T)
    rhs = np.einsum("bi,ij,bj->b", e, W.T @ np.diag(gam**2) @ W - np.eye(8), e)
    np.testing.assert_allclose(L.sae - L.gt, rhs, atol=1e-12)
    L0 = g.theory_losses(W, W.T, x)
    assert np.all(L0.sae - L0.gt <= 1e-12)  # gap <= 0 under non-positive interference
    assert np.any(L0.sae - L0.gt < -1e-3)
    # zero padding: n_m < n loses the features without a latent
    L2 = g.theory_losses(W, W.T[:6], x)
    assert np.all(L2.gt >= (x[:, 6:] ** 2).sum(1) - 1e-12)
    with pytest.raises(ValueError, match="W_m must have 5 columns"):
        g.theory_losses(W, W, x)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 8\)"):
        g.theory_losses(W, W.T, x[:, :7])
    with pytest.raises(ValueError, match="positive"):
        g.theory_losses(W, W.T, x, gamma=[1, 1, 0, 1, 1])


def test_rotation():
    R = g.rotation(0.3)
    np.testing.assert_allclose(R @ R.T, np.eye(2), atol=1e-15)
    with pytest.raises(ValueError, match="theta"):
        g.rotation(float("inf"))


def test_fit_theory_sae_finds_scaled_closed_form_and_two_digon_encoder():
    W = g.superposition_matrix([3])
    x = np.random.default_rng(0).uniform(size=(20_000, 3))
    fit = g.fit_theory_sae(W, x, 3)
    # Theorem 1's W_p^T is not the unconstrained optimum: the rows grow to c* = 1.064 (exact value)
    np.testing.assert_allclose(np.linalg.norm(fit.W_m, axis=1), 1.06399, atol=0.01)
    assert fit.loss < g.theory_losses(W, W.T, x).sae.mean()
    unit = g.fit_theory_sae(W, x, 3, unit_norm=True)
    np.testing.assert_allclose(np.linalg.norm(unit.W_m, axis=1), 1.0, atol=1e-12)
    assert g.equivalent(unit.W_m, W.T, atol=0.05)
    spare = g.fit_theory_sae(W, x, 4, init="random", seed=1)
    assert spare.loss < 1e-8  # n_m = 4 > n: exact reconstruction by (+-) a basis
    gam = g.fit_theory_sae(W, x, 3, gamma=[0.5, 2.0])
    assert gam.W_m.shape == (3, 2)
    with pytest.raises(ValueError, match="init"):
        g.fit_theory_sae(W, x, 3, init="zeros")
    with pytest.raises(ValueError, match=r"init must have shape \(3, 2\)"):
        g.fit_theory_sae(W, x, 3, init=np.ones((2, 2)))
    with pytest.raises(ValueError, match="n_m"):
        g.fit_theory_sae(W, x, 0)
    with pytest.raises(ValueError, match=r"shape \(batch, 3\)"):
        g.fit_theory_sae(W, x[:, :2], 3)


def test_frobenius_gap_and_rotate_rows():
    W = g.superposition_matrix([1, 2, 3])
    gF = g.frobenius_optimal_gamma(W)
    assert g.frobenius_gap(W, gF, rescale=False) == pytest.approx(g.frobenius_gap(W, gF), abs=1e-12)
    assert g.frobenius_gap(W, gF) < g.frobenius_gap(W) < g.frobenius_gap(W, (W**2).sum(1))
    assert g.frobenius_gap(W, 3 * gF) == pytest.approx(g.frobenius_gap(W, gF))  # rescaling removed
    assert g.frobenius_gap(W, 3 * gF, rescale=False) > g.frobenius_gap(W, gF) + 1
    T = g.superposition_matrix([3]).T  # rows (0, 1), (sqrt(3)/2, -1/2), (-sqrt(3)/2, -1/2)
    R = g.rotate_rows(T, [0.1, 0.2, 0.3])
    np.testing.assert_allclose(np.linalg.norm(R, axis=1), 1.0)
    np.testing.assert_allclose(R[1:] @ T[1:].T, np.cos([[0.2, 0], [0, 0.3]]) * np.eye(2) + (R[1:] @ T[1:].T) * (1 - np.eye(2)))
    np.testing.assert_allclose(g.rotate_rows(T, np.pi / 2)[0], [-1.0, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="2 columns"):
        g.rotate_rows(W.T, 0.1)
    with pytest.raises(ValueError, match="finite"):
        g.rotate_rows(T, np.nan)
