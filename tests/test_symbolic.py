"""Tests for wsae_core.symbolic: gap matrices, the Theorem 4/5 identities, the failure examples,
and exact expectations checked against high-sample Monte Carlo."""

import numpy as np
import pytest
import sympy as sp

from wsae_core import geometry as g
from wsae_core import symbolic as sy

Sx, cx = sy.S, sy.c


def sample(n, S, N, seed, values="uniform"):
    rng = np.random.default_rng(seed)
    vals = rng.uniform(size=(N, n)) if values == "uniform" else np.ones((N, n))
    return vals * (rng.uniform(size=(N, n)) >= S)


def close_to_mc(exact, samples, k=4.5):
    m, se = sy.mc_estimate(samples)
    assert abs(float(exact) - m) <= k * se + 1e-12, (float(exact), m, se)


# ---- gap matrices and identities --------------------------------------------------------------

def test_gap_matrix_values():
    assert sy.gap_matrix(g.superposition_matrix([3], exact=True)) == sp.Matrix(3, 3, lambda i, j: 0 if i == j else -sp.Rational(1, 2))
    a, b = sp.symbols("a b", positive=True)
    M = sy.gap_matrix(g.superposition_matrix([1, 2], exact=True), [a, b])
    assert M == sp.Matrix([[a**2 - 1, 0, 0], [0, b**2 - 1, -b**2], [0, -b**2, b**2 - 1]])
    # numbers for a random W_p agree with numpy
    W = g.random_nonpositive_superposition(5, 3, seed=0)
    gam = [0.5, 1.2, 0.9]
    np.testing.assert_allclose(np.array(sy.gap_matrix(W, gam), dtype=float),
                               W.T @ np.diag(np.square(gam)) @ W - np.eye(5), atol=1e-12)


@pytest.mark.parametrize("gamma,msg", [([1], "length n_p = 2"), ([1, 0], "positive"), ([1, -2], "positive"),
                                       ([1, sp.oo], "finite"), ([sp.nan, 1], "finite"), (2.0, "sequence"),
                                       ([1, -sp.Symbol("t", positive=True)], "non-positive")])
def test_gap_matrix_bad_gamma(gamma, msg):
    with pytest.raises(ValueError, match=msg):
        sy.gap_matrix(g.superposition_matrix([1, 2]), gamma)


def test_gap_matrix_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        sy.gap_matrix(np.ones(3))
    with pytest.raises(ValueError, match="finite"):
        sy.gap_matrix(sp.Matrix([[1, sp.oo]]))


@pytest.mark.parametrize("n_p,n", [(1, 2), (2, 3), (2, 4), (3, 3)])
def test_gap_identity_proved_and_needs_tied_weights(n_p, n):
    assert sy.verify_gap_identity(n_p, n, weighted=True)
    assert sy.verify_gap_identity(n_p, n, weighted=False)
    assert not sy.verify_gap_identity(n_p, n, weighted=False, tied=False)


def test_gap_identity_bad_input():
    with pytest.raises(ValueError, match="n_p"):
        sy.verify_gap_identity(0, 3)
    with pytest.raises(ValueError, match="36"):
        sy.verify_gap_identity(7, 7)


def test_failure_examples_exact():
    r = sy.shrinking_example()
    assert list(r.x_p) == [sp.Rational(1, 2), sp.Rational(1, 5)]
    assert list(r.x_m) == [sp.Rational(1, 2), sp.Rational(1, 5), 0]
    assert r.loss_sae == 0 and r.loss_gt == sp.Rational(32, 25)
    assert (r.top_x, r.top_x_m) == (1, 0)
    v = sy.vanishing_example()
    assert list(v.x_p) == [sp.sqrt(3) / 10, sp.Rational(3, 10)]
    assert list(v.pre) == [sp.Rational(3, 10), 0, -sp.Rational(3, 10)]
    assert list(v.x_m) == [sp.Rational(3, 10), 0, 0]
    assert v.loss_gt == sp.Rational(1, 2) and v.loss_sae == sp.Rational(3, 100)
    with pytest.raises(ValueError, match="length n = 3"):
        sy.exact_recovery(g.superposition_matrix([3]), [1, 2])


def test_frobenius_gamma_exact_matches_nnls():
    for blocks in ([1, 2], [3], [1, 2, 3, 4], [2, 5]):
        ex = [float(v) for v in sy.frobenius_optimal_gamma_exact(g.superposition_matrix(blocks, exact=True))]
        np.testing.assert_allclose(ex, g.frobenius_optimal_gamma(g.superposition_matrix(blocks)), atol=1e-8)
    assert sy.frobenius_optimal_gamma_exact(g.superposition_matrix([3], exact=True)) == [sp.sqrt(6) / 3] * 2


# ---- exact expectations ---------------------------------------------------------------------

def test_exact_losses_known_values():
    tri = sy.expected_losses(g.superposition_matrix([3], exact=True))
    assert tri.sae.subs({Sx: 0, cx: 1}) == sp.Rational(13, 320)
    assert sp.factor(tri.gt.subs(cx, 1) - (4 - Sx) * (1 - Sx) ** 2 / 8) == 0
    dig = sy.expected_losses_blocks([2])
    assert dig.sae.subs(cx, 1) == 0 and sp.expand(dig.gt.subs(cx, 1) - (1 - Sx) ** 2 / 3) == 0
    # c* for the triangle: 1.064 at S = 0, -> 1 as S -> 1
    cstar = sy.optimal_scale(tri.sae)
    assert abs(float(cstar.subs(Sx, 0)) - 1.06399) < 1e-5
    assert sp.limit(cstar, Sx, 1) == 1


@pytest.mark.parametrize("blocks", [[1, 3], [2, 3], [1, 2, 2], [4, 1]])
def test_blocks_decomposition_equals_direct(blocks):
    direct = sy.expected_losses(g.superposition_matrix(blocks, exact=True))
    summed = sy.expected_losses_blocks(blocks)
    assert sp.expand(direct.sae - summed.sae) == 0 and sp.expand(direct.gt - summed.gt) == 0


@pytest.mark.parametrize("blocks,S,cv", [([3], 0.0, 1.0), ([2, 3], 0.5, 1.1), ([4], 0.2, 0.9), ([1, 2, 3], 0.7, 1.3)])
def test_exact_losses_against_monte_carlo(blocks, S, cv):
    W = g.superposition_matrix(blocks)
    ex = sy.expected_losses_blocks(blocks, S_value=S, c_value=cv)
    L = g.theory_losses(W, cv * W.T, sample(W.shape[1], S, 200_000, seed=len(blocks)))
    close_to_mc(ex.sae, L.sae)
    close_to_mc(ex.gt, L.gt)


def test_exact_losses_float_paths_against_monte_carlo():
    # rotated triangle encoder (irrational entries: float path), random W_p, pentagon, weights
    W = g.superposition_matrix([3])
    V = W.T @ g.rotation(0.25).T
    ex = sy.expected_losses(W, V, S_value=0.4, c_value=1.05)
    L = g.theory_losses(W, 1.05 * V, sample(3, 0.4, 200_000, seed=5))
    close_to_mc(ex.sae, L.sae), close_to_mc(ex.gt, L.gt)
    Wr = g.random_nonpositive_superposition(5, 3, seed=11)
    gam = [0.6, 1.0, 1.4]
    ex = sy.expected_losses(Wr, S_value=0.3, c_value=0.95, gamma=gam)
    L = g.theory_losses(Wr, 0.95 * Wr.T, sample(5, 0.3, 200_000, seed=6), gamma=gam)
    close_to_mc(ex.sae, L.sae), close_to_mc(ex.gt, L.gt)
    W5 = g.superposition_matrix([5])
    ex = sy.expected_losses_blocks([5], S_value=0.5, c_value=1)
    L = g.theory_losses(W5, W5.T, sample(5, 0.5, 200_000, seed=7))
    close_to_mc(ex.sae, L.sae), close_to_mc(ex.gt, L.gt)


def test_exact_losses_extra_and_missing_latents():
    W = g.superposition_matrix([3], exact=True)
    Wn = np.array(W.evalf(), dtype=float)
    for V in (W.T.col_join(sp.Matrix([[1, 0]])), W.T[:2, :]):  # n_m = 4 and n_m = 2
        ex = sy.expected_losses(W, V, S_value=sp.Rational(1, 2), c_value=1)
        L = g.theory_losses(Wn, np.array(V.evalf(), dtype=float), sample(3, 0.5, 200_000, seed=8))
        close_to_mc(ex.sae, L.sae), close_to_mc(ex.gt, L.gt)


def test_constant_values_against_monte_carlo():
    ex = sy.expected_losses_blocks([1, 3], S_value=0.3, c_value=1.2, values="constant")
    W = g.superposition_matrix([1, 3])
    L = g.theory_losses(W, 1.2 * W.T, sample(4, 0.3, 100_000, seed=9, values="constant"))
    close_to_mc(ex.sae, L.sae), close_to_mc(ex.gt, L.gt)


def test_feature_recovery_and_top_change_against_monte_carlo():
    for blocks in ([3], [1, 2], [4]):
        W = g.superposition_matrix(blocks)
        fr = sy.feature_recovery(g.superposition_matrix(blocks, exact=True), S_value=sp.Rational(1, 4))
        x = sample(W.shape[1], 0.25, 200_000, seed=10)
        xm = g.recover(W.T, x @ W.T)
        for j in range(W.shape[1]):
            on = x[:, j] > 0
            close_to_mc(fr.mean_recovered[j], xm[on, j])
            close_to_mc(fr.vanish_prob[j], (xm[on, j] <= 0).astype(float))
        p = sy.top_change_probability(g.superposition_matrix(blocks, exact=True), S_value=sp.Rational(1, 4))
        nz = x.max(1) > 0
        changed = (xm.max(1) <= 0) | (xm.argmax(1) != x.argmax(1))
        close_to_mc(p, changed[nz].astype(float))
    assert sy.top_change_probability(g.superposition_matrix([3], exact=True)) == 0
    tri = sy.feature_recovery(g.superposition_matrix([3], exact=True))
    assert sp.expand(tri.vanish_prob[0] - (1 - Sx) / 2) == 0


@pytest.mark.parametrize("kwargs,msg", [(dict(S_value=1), r"S must be in \[0, 1\)"), (dict(S_value=-0.1), "S must"),
                                        (dict(S_value=float("nan")), "S must"), (dict(c_value=0), "c must"),
                                        (dict(c_value=-1), "c must"), (dict(values="gauss"), "values"),
                                        (dict(gamma=[1, 0]), "positive"), (dict(gamma=[1]), "length")])
def test_expected_losses_bad_input(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        sy.expected_losses(g.superposition_matrix([2, 1], exact=True), **kwargs)


def test_expected_losses_size_limits():
    with pytest.raises(ValueError, match="n must be <= 6"):
        sy.expected_losses(g.superposition_matrix([3, 4]))
    with pytest.raises(ValueError, match="block sizes up to 6"):
        sy.expected_losses_blocks([7])
    with pytest.raises(ValueError, match="V must have n_p = 2 columns"):
        sy.expected_losses(g.superposition_matrix([3]), np.ones((3, 3)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        sy.mc_estimate([1.0])


def test_reconstructs_exactly():
    for blocks, expected in (([1], True), ([2], True), ([4], True), ([1, 2, 4], True), ([3], False),
                             ([2, 3], False), ([5], False)):
        assert sy.reconstructs_exactly(g.superposition_matrix(blocks, exact=True)) is expected
    W3 = g.superposition_matrix([3], exact=True)
    basis = np.vstack([np.eye(2), -np.eye(2)])
    assert sy.reconstructs_exactly(W3, basis @ g.rotation(0.4))
    assert not sy.reconstructs_exactly(W3, 1.01 * basis)
    assert not sy.reconstructs_exactly(g.superposition_matrix([2], exact=True), sp.Matrix([[1], [-2]]))
    with pytest.raises(ValueError, match="n_p = 2 columns"):
        sy.reconstructs_exactly(W3, np.ones((3, 3)))


def test_one_sparse_limit_against_expected_losses():
    eps = sp.Symbol("eps", positive=True)
    for blocks in ([3], [1, 2], [5]):
        W = g.superposition_matrix(blocks, exact=True)
        lim = sy.one_sparse_limit(W)
        L = sy.expected_losses(W, c_value=1)
        for got, full in ((lim.sae, L.sae), (lim.gt, L.gt)):
            first = sp.Poly(sp.expand(full.subs(Sx, 1 - eps)), eps).coeff_monomial(eps)
            assert abs(float(got) - float(first)) < 1e-9
    W3 = g.superposition_matrix([3], exact=True)
    anti = sy.one_sparse_limit(W3, -sp.sqrt(2) * W3.T)
    assert (anti.sae, anti.gt, anti.max_active) == (0, 2, 2)
    assert sy.one_sparse_limit(W3, activation="linear").gt == sp.Rational(1, 2)
    assert sy.one_sparse_limit(W3, W3.T[:2, :]).gt == sp.Rational(1, 3)
    assert sy.one_sparse_limit(W3, values="constant").gt == 0
    with pytest.raises(ValueError, match="activation"):
        sy.one_sparse_limit(W3, activation="tanh")


def test_variance_proxy_and_common_scale():
    W = g.superposition_matrix([1, 2, 3], exact=True)
    s = sy.variance_proxy(W, S_value=sp.Rational(1, 2))
    x = sample(6, 0.5, 200_000, seed=12)
    xp = x @ np.array(W.evalf(), dtype=float).T
    np.testing.assert_allclose([float(v) for v in s], xp.var(0), rtol=0.02)
    sc = sy.variance_proxy(W, S_value=sp.Rational(1, 2), values="constant")
    assert [float(v) for v in sc] == pytest.approx([0.25, 0.5, 0.375, 0.375])
    c1, L1 = sy.common_scale_optimum([1, 3], [1, 1], S_value=0)
    c2, L2 = sy.common_scale_optimum([1, 3], [1, sp.sqrt(sp.Rational(2, 3))], S_value=0)
    assert 1 < float(c2) < float(c1) < float(sy.optimal_scale(sy.expected_losses_blocks([3]).sae).subs(Sx, 0))
    assert float(L2) > float(L1)
    with pytest.raises(ValueError, match="one weight per block"):
        sy.common_scale_optimum([1, 3], [1])
