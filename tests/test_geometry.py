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


# --- Values against independent computations (written to kill mutation survivors) -------------


def _brute_force_assignment(C, maximize=False):
    """Best injective assignment of rows to columns by enumerating every one, ``(value, cols)``."""
    from itertools import permutations

    best = None
    for cols in permutations(range(C.shape[1]), C.shape[0]):
        v = C[np.arange(C.shape[0]), cols].sum()
        if best is None or (v > best[0] if maximize else v < best[0]):
            best = (v, np.array(cols))
    return best


def test_block_slices_and_validation_values():
    assert g.block_slices((1, 2, 3, np.int64(4))) == [(slice(0, 1), slice(0, 1)), (slice(1, 2), slice(1, 3)),
                                                      (slice(2, 4), slice(3, 6)), (slice(4, 6), slice(6, 10))]
    for bad in (b"12", [1, True], [np.float64(2.0)]):
        with pytest.raises(ValueError, match="block"):
            g.block_slices(bad)


def test_superposition_matrix_entries_written_out():
    # Pentagon: column j is (sin(2 pi j / 5), cos(2 pi j / 5)); digon: (1, -1) on one row.
    a = 2 * np.pi * np.arange(5) / 5
    np.testing.assert_allclose(g.superposition_matrix([5]), np.stack([np.sin(a), np.cos(a)]), atol=1e-15)
    np.testing.assert_array_equal(g.superposition_matrix([2, 1]), [[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
    # The square's entries are exactly 0 and +-1 (the cos/sin residues are cleared), in float and SymPy.
    sq = np.array([[0.0, 1.0, 0.0, -1.0], [1.0, 0.0, -1.0, 0.0]])
    np.testing.assert_array_equal(g.superposition_matrix([4]), sq)
    assert g.superposition_matrix([4], exact=True) == sp.Matrix(sq.astype(int))
    assert g.superposition_matrix([1, 2], exact=True) == sp.Matrix([[1, 0, 0], [0, 1, -1]])
    assert g.superposition_matrix([2], exact=True).shape == (1, 2)


def test_interference_against_pairwise_products():
    W = np.random.default_rng(3).standard_normal((3, 5))
    G = g.interference(W)
    for i in range(5):
        for j in range(5):
            assert G[i, j] == pytest.approx(0.0 if i == j else float(W[:, i] @ W[:, j]), abs=1e-14)
    with pytest.raises(ValueError, match="finite"):
        g.interference(np.array([[1.0, np.inf]]))
    # a 0/1 incidence matrix given as booleans is read as numbers (products are counts, not "or")
    B = np.array([[True, True, False], [True, True, True]])
    np.testing.assert_array_equal(g.interference(B), [[0.0, 2.0, 1.0], [2.0, 0.0, 1.0], [1.0, 1.0, 0.0]])


def test_has_nonpositive_interference_boundaries():
    # An orthonormal basis has interference exactly 0, which tol = 0 accepts (<=, not <).
    assert g.has_nonpositive_interference(np.eye(3), tol=0)
    assert g.has_nonpositive_interference(np.eye(3), tol=0.0)
    W = np.array([[1.0, 0.6], [0.0, 0.8]])  # interference 0.6
    assert not g.has_nonpositive_interference(W)
    assert g.has_nonpositive_interference(W, tol=0.6) and not g.has_nonpositive_interference(W, tol=0.59)
    assert g.has_nonpositive_interference(W, tol=np.float32(0.7))
    for bad in (True, "0", float("inf"), -1e-12):
        with pytest.raises(ValueError, match="tol"):
            g.has_nonpositive_interference(W, tol=bad)


def test_random_nonpositive_superposition_structure():
    # n = n_p: one feature per dimension, rotated: an orthonormal basis.
    W = g.random_nonpositive_superposition(4, 4, seed=0)
    np.testing.assert_allclose(W.T @ W, np.eye(4), atol=1e-12)
    # n = 2 n_p: the only 2 n_p unit vectors with pairwise non-positive products are +-(a basis):
    # every column has exactly one antipode and is orthogonal to the others.
    for seed in range(5):
        G = g.interference(g.random_nonpositive_superposition(6, 3, seed=seed))
        np.testing.assert_allclose(np.sort(G, axis=1), np.tile([-1.0, 0, 0, 0, 0, 0], (6, 1)), atol=1e-12)
    # n = 3, n_p = 2 is a digon + one axis, or a triangle (three vectors, pairwise obtuse, no antipodes,
    # gaps in [90, 180] degrees); both constructions are drawn.
    kinds = set()
    for seed in range(40):
        G = g.interference(g.random_nonpositive_superposition(3, 2, seed=seed))
        off = G[~np.eye(3, dtype=bool)]
        if np.isclose(off.min(), -1.0):
            np.testing.assert_allclose(np.sort(off), [-1, -1, 0, 0, 0, 0], atol=1e-12)
            kinds.add("digon")
        else:
            assert np.all(off < 0) and np.all(off >= -1)
            # the three angles between neighbours sum to 360 degrees
            assert np.degrees(np.arccos(off[[0, 1, 3]])).sum() == pytest.approx(360.0)
            kinds.add("triangle")
    assert kinds == {"digon", "triangle"}
    for args, name in (((0, 1), "n"), ((1, 0), "n_p"), ((2.0, 1), "n"), ((2, 1.0), "n_p"), ((-1, -1), "n")):
        with pytest.raises(ValueError, match=rf"^{name} must be a positive integer, got"):
            g.random_nonpositive_superposition(*args)
    for args in ((True, 1), (2, True), (np.int64(2), np.int64(1))):
        if isinstance(args[0], np.integer):
            assert g.random_nonpositive_superposition(*args, seed=0).shape == (1, 2)
        else:
            with pytest.raises(ValueError, match="positive integer"):
                g.random_nonpositive_superposition(*args)
    with pytest.raises(ValueError, match="n_p <= n"):
        g.random_nonpositive_superposition(2, 3)


def test_closed_form_sae_inputs():
    We = g.superposition_matrix([3], exact=True)
    assert g.closed_form_sae(We, 3) == We.T
    with pytest.raises(ValueError, match="n_m must be >= n = 3"):
        g.closed_form_sae(We, 2)
    for bad in (True, 3.0, "3"):
        with pytest.raises(ValueError, match="n_m must be an integer"):
            g.closed_form_sae(We, bad)
    Wm = g.closed_form_sae([[1, 0], [0, 1]], np.int64(3))
    assert Wm.dtype == np.float64 and Wm.shape == (3, 2)
    np.testing.assert_array_equal(Wm, [[1, 0], [0, 1], [0, 0]])


def test_recover_against_loops_and_bad_shapes():
    rng = np.random.default_rng(4)
    Wm, xp = rng.standard_normal((5, 3)), rng.standard_normal((7, 3))
    out = g.recover(Wm, xp)
    assert out.shape == (7, 5)
    for b in range(7):
        for i in range(5):
            assert out[b, i] == pytest.approx(max(0.0, float(sum(Wm[i, j] * xp[b, j] for j in range(3)))), abs=1e-14)
    with pytest.raises(ValueError, match="x_p must have shape"):
        g.recover(Wm, xp[None])
    with pytest.raises(ValueError, match="x_p must have shape"):
        g.recover(Wm, 1.0)
    with pytest.raises(ValueError, match="finite"):
        g.recover(np.full((2, 3), np.nan), xp)


def test_stable_assignment_against_brute_force():
    rng = np.random.default_rng(5)
    for shape in ((4, 4), (3, 5)):
        C = rng.standard_normal(shape)
        for maximize in (False, True):
            rows, cols = g.stable_assignment(C, maximize=maximize)
            value, best = _brute_force_assignment(C, maximize)
            np.testing.assert_array_equal(rows, np.arange(shape[0]))
            np.testing.assert_array_equal(cols, best)
    # The rounding is relative to the largest score: a 1e-12-sized matrix keeps its optimum ...
    tiny = 1e-12 * np.array([[2.0, 1.0], [1.0, 2.0]])
    np.testing.assert_array_equal(g.stable_assignment(tiny)[1], [1, 0])
    # ... a difference of 1e-10 of the largest is a tie (resolved as scipy resolves an exact tie),
    # and a difference of 1e-8 is not.
    for eps, expected in ((1e-10, [0, 1]), (1e-8, [1, 0])):
        C = np.array([[1.0, 1.0 - eps], [1.0 - eps, 1.0]])
        np.testing.assert_array_equal(g.stable_assignment(C)[1], expected)
    np.testing.assert_array_equal(g.stable_assignment(np.zeros((2, 2)))[1], [0, 1])  # no 0/0
    assert g.stable_assignment(np.zeros((0, 3)))[1].size == 0  # nothing to assign
    assert g.match_rows(np.ones((2, 3)), np.zeros((0, 3))).shape == (0,)
    with pytest.raises(ValueError, match="2-D"):
        g.stable_assignment(np.zeros(3))


def test_match_rows_against_brute_force_and_full_precision():
    rng = np.random.default_rng(6)
    A, B = rng.standard_normal((5, 3)), rng.standard_normal((3, 3))
    cost = ((B[:, None, :] - A[None, :, :]) ** 2).sum(-1)
    np.testing.assert_array_equal(g.match_rows(A, B), _brute_force_assignment(cost)[1])
    np.testing.assert_array_equal(g.match_rows(A[:, 0], B[:, 0]), _brute_force_assignment(
        (B[:, None, 0] - A[None, :, 0]) ** 2)[1])  # vectors are rows of length 1
    # Rows 1e-6 apart: costs differ by ~1e-12 of the largest, a tie for the stable rounding,
    # while stable=False finds the exact match.
    A = np.array([[1.0, 0.0], [1.0 + 1e-6, 0.0]])
    B = A[::-1].copy()
    np.testing.assert_array_equal(g.match_rows(A, B, stable=False), [1, 0])
    with pytest.raises(ValueError, match="same length"):
        g.match_rows(np.ones((3, 2)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="at least as many rows"):
        g.match_rows(np.ones((1, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="at least as many rows"):
        g.match_rows(np.ones((2, 1)), np.ones((3, 1)))
    np.testing.assert_array_equal(g.match_rows(np.eye(2, 3), np.eye(2, 3)[::-1]), [1, 0])  # rows longer than many
    with pytest.raises(ValueError, match="vector or a matrix"):
        g.match_rows(np.ones((2, 2, 2)), np.ones((2, 2)))


def test_equivalent_tolerance_boundaries():
    # Differences that are exact in binary: 0.25 is within atol = 0.25 (<=) and not within 0.2.
    assert g.equivalent([0.75], [0.5], atol=0.25) and not g.equivalent([0.75], [0.5], atol=0.2)
    assert g.equivalent([0.5, 0.25], [0.5], atol=0.25) and not g.equivalent([0.5, 0.25], [0.5], atol=0.2)
    assert g.equivalent(np.zeros((2, 0)), np.zeros((1, 0)))  # nothing to compare
    assert not g.equivalent(np.ones((3, 2)), np.ones((2, 3)))  # rows of different length
    # active-set patterns (booleans) compare as 0/1: the support of x_m against that of x
    assert g.equivalent(np.array([False, True, False]), np.array([True]))
    assert not g.equivalent(np.array([True, True, False]), np.array([True]))
    np.testing.assert_array_equal(g.match_rows(np.array([False, True]), np.array([True])), [1])
    # 1e-7 apart, one near-tie: the full-precision match must pair them right for atol = 1e-9.
    A = np.array([[1.0, 0.0], [1.0 + 1e-7, 0.0], [0.0, 0.0]])
    assert g.equivalent(A, A[[1, 0]])


def test_frobenius_optimal_gamma_against_direct_nnls():
    """``g = gamma²`` minimises ``||sum_i g_i r_i r_iᵀ - I||_F`` over g >= 0: a non-negative least
    squares on the design whose columns are vec(r_i r_iᵀ), solved here without the eigen-route."""
    from scipy.optimize import nnls

    rng = np.random.default_rng(7)
    cases = [rng.standard_normal((4, 6)), rng.standard_normal((6, 4)), g.superposition_matrix([1, 2, 5]),
             np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.6]])]
    for W in cases:
        n = W.shape[1]
        D = np.stack([np.outer(r, r).ravel() for r in W], axis=1)
        g2, _ = nnls(D, np.eye(n).ravel())
        gam = g.frobenius_optimal_gamma(W)
        assert gam.shape == (W.shape[0],)
        f = lambda t: np.linalg.norm(W.T @ np.diag(t) @ W - np.eye(n))
        assert f(gam**2) == pytest.approx(f(g2), abs=1e-9)
    np.testing.assert_array_equal(g.frobenius_optimal_gamma(np.zeros((2, 3))), [0.0, 0.0])
    assert g.frobenius_optimal_gamma(np.zeros((0, 3))).shape == (0,)
    # W_p -> s W_p gives gamma -> gamma / s (W_pᵀΓ²W_p is unchanged), down to tiny s whose H = O(s⁴)
    for W in cases[:3]:
        np.testing.assert_allclose(g.frobenius_optimal_gamma(1e-4 * W), 1e4 * g.frobenius_optimal_gamma(W), rtol=1e-6)
    # A third dimension that mixes two orthogonal features only adds interference: its weight is 0.
    np.testing.assert_allclose(g.frobenius_optimal_gamma(cases[-1]) ** 2, [1.0, 1.0, 0.0], atol=1e-12)


def test_check_gamma_and_rotation_values():
    np.testing.assert_array_equal(g.check_gamma([1, 2], 2), [1.0, 2.0])
    assert g.check_gamma([1, 2], 2).dtype == np.float64
    with pytest.raises(ValueError, match="positive"):
        g.check_gamma([1e-300, 0.0], 2)
    t = 0.7
    np.testing.assert_allclose(g.rotation(t) @ [1.0, 0.0], [np.cos(t), np.sin(t)], atol=1e-15)
    np.testing.assert_allclose(g.rotation(np.pi / 2), [[0.0, -1.0], [1.0, 0.0]], atol=1e-15)
    np.testing.assert_allclose(g.rotation(np.float32(t)), g.rotation(t), atol=1e-7)
    with pytest.raises(ValueError, match="theta"):
        g.rotation(float("nan"))


def test_theory_losses_against_written_out_sums():
    rng = np.random.default_rng(8)
    W_p = g.superposition_matrix([3, 1])  # (3, 4)
    x = rng.uniform(size=(6, 4))
    gam = np.array([0.5, 2.0, 1.5])
    for n_m in (2, 4, 6):
        W_m = rng.standard_normal((n_m, 3))
        L = g.theory_losses(W_p, W_m, x, gamma=gam)
        for b in range(6):
            xp = W_p @ x[b]
            xm = np.maximum(W_m @ xp, 0)
            sae = sum((gam[i] * (xp - W_m.T @ xm)[i]) ** 2 for i in range(3))
            gt = sum(((x[b, i] if i < 4 else 0.0) - (xm[i] if i < n_m else 0.0)) ** 2 for i in range(max(4, n_m)))
            assert L.sae[b] == pytest.approx(sae, rel=1e-12)
            assert L.gt[b] == pytest.approx(gt, rel=1e-12)
    one = g.theory_losses(W_p, W_p.T, x[0])
    assert one.sae.shape == one.gt.shape == (1,)
    with pytest.raises(ValueError, match="x must have shape"):
        g.theory_losses(W_p, W_p.T, x[None])
    with pytest.raises(ValueError, match="finite"):
        g.theory_losses(W_p, W_p.T, np.full((2, 4), np.nan))


def test_fit_theory_sae_is_stationary_and_reports_its_loss():
    """At the fit the mean loss (from theory_losses, not the optimiser's objective) has zero
    gradient by central differences, and the reported loss is that mean."""
    W_p = g.superposition_matrix([3])
    x = np.random.default_rng(9).uniform(size=(400, 3)) * (np.random.default_rng(10).uniform(size=(400, 3)) < 0.6)
    gam = np.array([0.7, 1.3])
    for n_m, init in ((3, "closed_form"), (4, "closed_form"), (2, "closed_form"), (3, np.ones((3, 2)))):
        fit = g.fit_theory_sae(W_p, x, n_m, gamma=gam, init=init)
        assert fit.success and fit.W_m.shape == (n_m, 2)
        mean = lambda W: g.theory_losses(W_p, W, x, gamma=gam).sae.mean()
        assert fit.loss == pytest.approx(mean(fit.W_m), rel=1e-12)
        h, grad = 1e-5, np.zeros_like(fit.W_m)
        for idx in np.ndindex(*fit.W_m.shape):
            E = np.zeros_like(fit.W_m)
            E[idx] = h
            grad[idx] = (mean(fit.W_m + E) - mean(fit.W_m - E)) / (2 * h)
        assert np.abs(grad).max() < 1e-4  # L-BFGS stops at <= 2e-5; the start has 5e-2, one step 3e-2
    # The starting points, captured as passed to the optimiser (one step only): closed_form is W_pᵀ
    # over spare rows with entries of standard deviation 0.01; random has rows of mean squared norm 1.
    import unittest.mock

    import scipy.optimize

    seen = {}
    real = scipy.optimize.minimize

    def spy(fun, x0, **kw):
        seen["x0"] = x0.copy()
        return real(fun, x0, **{**kw, "options": {"maxiter": 1}})

    with unittest.mock.patch.object(scipy.optimize, "minimize", spy):
        g.fit_theory_sae(W_p, x, 403, seed=3)
        start = seen["x0"].reshape(403, 2)
        np.testing.assert_array_equal(start[:3], W_p.T)
        assert start[3:].std() == pytest.approx(0.01, rel=0.1) and abs(start[3:].mean()) < 0.002
        g.fit_theory_sae(W_p, x, 400, init="random", seed=3)
        assert (seen["x0"].reshape(400, 2) ** 2).sum(1).mean() == pytest.approx(1.0, rel=0.1)
    # unit_norm: rows of norm 1 and stationary along the sphere (the tangent gradient vanishes).
    fit = g.fit_theory_sae(W_p, x, 3, unit_norm=True, init="random", seed=2)
    np.testing.assert_allclose(np.linalg.norm(fit.W_m, axis=1), 1.0, atol=1e-12)
    assert fit.loss == pytest.approx(g.theory_losses(W_p, fit.W_m, x).sae.mean(), rel=1e-12)
    for i in range(3):
        t = np.array([-fit.W_m[i, 1], fit.W_m[i, 0]])  # tangent of row i
        f = lambda s: g.theory_losses(W_p, np.vstack([fit.W_m[:i], [(fit.W_m[i] + s * t) / np.linalg.norm(
            fit.W_m[i] + s * t)], fit.W_m[i + 1:]]), x).sae.mean()
        assert abs((f(1e-5) - f(-1e-5)) / 2e-5) < 1e-4
    # The minimiser does not depend on the data's overall scale (the loss scales by s²): a fit on
    # 1e-3 x, whose gradients are 1e6 times smaller, still moves the rows to ~1.064 (a stopping
    # rule on the gradient's absolute size would stop at the start, rows of norm 1).
    x3 = np.random.default_rng(0).uniform(size=(2000, 3))
    big, small = g.fit_theory_sae(W_p, x3, 3), g.fit_theory_sae(W_p, 1e-3 * x3, 3)
    np.testing.assert_allclose(np.linalg.norm(small.W_m, axis=1), np.linalg.norm(big.W_m, axis=1), atol=0.01)
    assert np.all(np.linalg.norm(small.W_m, axis=1) > 1.04)
    # maxiter is honoured: one iteration does not converge
    short = g.fit_theory_sae(W_p, x3, 3, maxiter=1)
    assert not short.success and short.loss > big.loss
    # n_m = 1: one latent; from W_pᵀ's first row the best single tied latent is a local optimum
    one = g.fit_theory_sae(W_p, x, 1)
    assert one.W_m.shape == (1, 2) and one.loss == pytest.approx(g.theory_losses(W_p, one.W_m, x).sae.mean())
    # the default seed is 0 (the documented signature): a random start is reproducible without one
    np.testing.assert_array_equal(g.fit_theory_sae(W_p, x, 3, init="random", maxiter=1).W_m,
                                  g.fit_theory_sae(W_p, x, 3, init="random", seed=0, maxiter=1).W_m)
    for bad in (True, 2.0):
        with pytest.raises(ValueError, match="n_m"):
            g.fit_theory_sae(W_p, x, bad)
    with pytest.raises(ValueError, match="shape"):
        g.fit_theory_sae(W_p, x[0], 3)
    with pytest.raises(ValueError, match="finite"):
        g.fit_theory_sae(W_p, np.full((2, 3), np.nan), 3)


def test_frobenius_gap_against_its_definition():
    from scipy.optimize import minimize_scalar

    rng = np.random.default_rng(11)
    W = rng.standard_normal((3, 5))
    gam = rng.uniform(0.5, 2, 3)
    M = W.T @ np.diag(gam**2) @ W
    assert g.frobenius_gap(W, gam, rescale=False) == pytest.approx(np.linalg.norm(M - np.eye(5)), rel=1e-12)
    best = minimize_scalar(lambda t: np.linalg.norm(t * M - np.eye(5)), bracket=(0, 1), tol=1e-12).fun
    assert g.frobenius_gap(W, gam) == pytest.approx(best, rel=1e-8)
    assert g.frobenius_gap(W) == pytest.approx(g.frobenius_gap(W, np.ones(3)), rel=1e-15)
    for rescale in (True, False):  # W_p = 0: ||-I|| = sqrt(n), no 0/0
        assert g.frobenius_gap(np.zeros((2, 4)), rescale=rescale) == pytest.approx(2.0)
    # the rescaled gap judges only the shape of W_pᵀΓ²W_p: any small overall scale gives the same
    assert g.frobenius_gap(0.1 * W, gam) == pytest.approx(g.frobenius_gap(W, gam), rel=1e-12)


def test_bad_matrices_are_named_in_the_error():
    # Each function names its own argument (case included) when the matrix is not 2-D.
    for call, name in ((lambda A: g.closed_form_sae(A, 3), "W_p"), (g.frobenius_gap, "W_p"),
                       (lambda A: g.rotate_rows(A, 0.1), "W_m"), (g.interference, "W_p"),
                       (g.frobenius_optimal_gamma, "W_p"), (lambda A: g.recover(A, [1.0]), "W_m"),
                       (lambda A: g.theory_losses(A, np.ones((1, 1)), [1.0]), "W_p"),
                       (lambda A: g.theory_losses(np.ones((1, 1)), A, [1.0]), "W_m"),
                       (lambda A: g.fit_theory_sae(np.ones((1, 1)), np.ones((2, 1)), 1, init=A), "init"),
                       (lambda A: g.fit_theory_sae(A, np.ones((2, 1)), 1), "W_p")):
        with pytest.raises(ValueError, match=rf"^{name} must be a 2-D matrix"):
            call(np.ones(3))
        with pytest.raises(ValueError, match=rf"^{name} must have finite entries"):
            call(np.full((1, 1), np.nan))
    for call in (g.equivalent, g.match_rows):
        with pytest.raises(ValueError, match=r"^A must be a vector or a matrix"):
            call(np.ones((2, 2, 2)), [1.0])
        with pytest.raises(ValueError, match=r"^B must be a vector or a matrix"):
            call([1.0], np.ones((2, 2, 2)))


def test_rotate_rows_against_rotation_matrices():
    rng = np.random.default_rng(12)
    W, a = rng.standard_normal((4, 2)), rng.uniform(-3, 3, 4)
    R = g.rotate_rows(W, a)
    for i in range(4):
        c, s = np.cos(a[i]), np.sin(a[i])
        np.testing.assert_allclose(R[i], [c * W[i, 0] - s * W[i, 1], s * W[i, 0] + c * W[i, 1]], atol=1e-14)
    np.testing.assert_allclose(g.rotate_rows(W, 0.4), W @ g.rotation(0.4).T, atol=1e-14)
    with pytest.raises(ValueError, match="finite"):
        g.rotate_rows(W, [0.0, 0.1, np.inf, 0.0])
