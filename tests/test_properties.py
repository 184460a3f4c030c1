"""Property-based tests (Hypothesis) of the invariants behind the book's claims: the gap identity of
Theorems 4-5 for random W_p, Γ and x, "~" under row permutations and zero padding, a planted
permutation found by matching, non-negative losses, and the geometry of the constructions.

Settings: a bounded number of examples per property, no deadline (a loaded 2-core machine must not
turn slowness into failures) and ``derandomize=True``, so every run tries the same examples on every
CPU and a failure reproduces. Count: ``pytest tests -m property --collect-only -q``; each property
tries ``max_examples`` examples (set per test below).
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import sympy as sp
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from wsae_core import checks, geometry, metrics, models, symbolic, train, weights

pytestmark = pytest.mark.property

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
FAST = settings(max_examples=60, **SETTINGS)
SLOW = settings(max_examples=25, **SETTINGS)  # SymPy or optimisation inside

# No subnormals: wsae_core.train flushes denormals to zero (torch.set_flush_denormal, for speed), which
# Hypothesis detects and refuses to generate them under.
finite = st.floats(-3, 3, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=64)
positive = st.floats(0.1, 3, allow_nan=False, allow_infinity=False, width=64)
rational = st.builds(Fraction, st.integers(-6, 6), st.integers(1, 4))


@st.composite
def problem(draw, rational_entries=False, max_n=5, max_n_p=3):
    """A random ``(W_p (n_p, n), gamma (n_p,), x (batch, n) >= 0)``."""
    n_p = draw(st.integers(1, max_n_p))
    n = draw(st.integers(1, max_n))
    batch = draw(st.integers(1, 6))
    if rational_entries:
        W = np.array(draw(st.lists(rational, min_size=n_p * n, max_size=n_p * n)), dtype=object).reshape(n_p, n)
        g = draw(st.lists(st.builds(Fraction, st.integers(1, 6), st.integers(1, 4)), min_size=n_p, max_size=n_p))
    else:
        W = draw(arrays(np.float64, (n_p, n), elements=finite))
        g = draw(st.lists(positive, min_size=n_p, max_size=n_p))
    x = draw(arrays(np.float64, (batch, n), elements=st.floats(0, 2, allow_subnormal=False, width=64)))
    x[draw(arrays(np.bool_, (batch, n)))] = 0.0  # sparse ground truth
    return W, g, x


# ----------------------------------------------------------------------------- Theorems 4 and 5


@SLOW
@given(problem(rational_entries=True), st.booleans())
def test_gap_identity_for_random_W_p_gamma_and_x(prob, weighted):
    """At W_m = W_pᵀ: L_(W)SAE - L_GT = eᵀ(W_pᵀΓ²W_p - I)e per sample, e = x - relu(W_pᵀW_p x),
    with the gap matrix from SymPy (exact) and the losses from the numeric theory SAE."""
    W, g, x = prob
    gamma = g if weighted else None
    G = np.array(symbolic.gap_matrix(sp.Matrix(W.tolist()), gamma), dtype=np.float64)
    Wf = W.astype(np.float64)
    gf = None if gamma is None else np.array(g, dtype=np.float64)
    losses = geometry.theory_losses(Wf, Wf.T, x, gamma=gf)
    e = x - np.maximum(x @ Wf.T @ Wf, 0.0)
    gap = np.einsum("bi,ij,bj->b", e, G, e)
    scale = 1 + np.abs(losses.sae) + np.abs(losses.gt)
    np.testing.assert_allclose(losses.sae - losses.gt, gap, atol=1e-9 * scale.max())
    np.testing.assert_allclose(losses.gt, (e**2).sum(1), atol=1e-12 * scale.max())


@FAST
@given(st.integers(1, 6), st.integers(0, 6), st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(0, 2**32 - 1))
def test_gap_is_non_positive_under_non_positive_interference(n_p, extra, seed, batch, xseed):
    """Theorem 4's sign: unit columns with w_iᵀw_j <= 0 give e >= 0 and L_SAE <= L_GT at W_m = W_pᵀ."""
    n = n_p + min(extra, n_p)
    W = geometry.random_nonpositive_superposition(n, n_p, seed=seed)
    x = np.random.default_rng(xseed).random((batch, n)) * (np.random.default_rng(xseed + 1).random((batch, n)) < 0.5)
    e = x - np.maximum(x @ W.T @ W, 0.0)
    assert e.min() >= -1e-12
    losses = geometry.theory_losses(W, W.T, x)
    assert np.all(losses.sae <= losses.gt + 1e-9)


@FAST
@given(problem())
def test_gap_matrix_symbolic_equals_numeric(prob):
    W, g, _ = prob
    W, gr = np.round(W, 2), np.round(np.array(g), 2)  # short decimals: SymPy's exact arithmetic stays fast
    G = np.array(symbolic.gap_matrix(W, gr.tolist()), dtype=np.float64)
    np.testing.assert_allclose(G, W.T @ np.diag(gr**2) @ W - np.eye(W.shape[1]), atol=1e-9)


# ----------------------------------------------------------------------------- "~" and matching


@FAST
@given(arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 4)), elements=finite),
       st.integers(0, 3), st.randoms(use_true_random=False))
def test_equivalent_under_row_permutations_and_zero_padding(A, pad, rnd):
    perm = list(range(A.shape[0] + pad))
    rnd.shuffle(perm)
    B = np.vstack([A, np.zeros((pad, A.shape[1]))])[perm]
    assert geometry.equivalent(B, A)
    assert geometry.equivalent(B, A, atol=1e-6)
    moved = B.copy()
    row = perm.index(0)  # where A's first row went
    moved[row, 0] += 0.5
    assume(not any(np.allclose(moved[row], r, atol=1e-3) for r in A))  # still some row of A: not a change
    assert not geometry.equivalent(moved, A)


@st.composite
def distinct_features(draw):
    """Unit columns W_p (n_p, n) whose pairwise |cosine| <= 0.95 (the matching is then unique)."""
    n_p = draw(st.integers(2, 5))
    n = draw(st.integers(1, 8))
    W = draw(arrays(np.float64, (n_p, n), elements=finite))
    norms = np.linalg.norm(W, axis=0)
    assume(np.all(norms > 0.1))
    W = W / norms
    cos = np.abs(W.T @ W) - np.eye(n)
    assume(cos.max(initial=0.0) <= 0.95)
    return W


@FAST
@given(distinct_features(), st.randoms(use_true_random=False), st.integers(0, 4))
def test_planted_permutation_is_found_by_matching(W, rnd, extra):
    n_p, n = W.shape
    perm = list(range(n + extra))
    rnd.shuffle(perm)
    rng = np.random.default_rng(rnd.randrange(2**32))
    # Latent directions: the features (each scaled by a positive factor; a flipped row points away
    # from its feature and may not stand for it) and `extra` unit random rows, in shuffled order.
    # The feature in row perm.index(i) is feature i.
    rows = [W[:, i] * rng.uniform(0.5, 2) for i in range(n)]
    rand = rng.standard_normal((extra, n_p))
    rand /= np.linalg.norm(rand, axis=1, keepdims=True)
    assume(extra == 0 or np.abs(rand @ W).max() <= 0.95)
    D = np.vstack(rows + list(rand))[np.argsort(perm)]
    m = metrics.match_latents(D, W)
    planted = np.array([int(np.flatnonzero(np.argsort(perm) == i)[0]) for i in range(n)])
    np.testing.assert_array_equal(m.perm, planted)
    assert m.mean_cosine == pytest.approx(1.0, abs=1e-9)
    exact = np.vstack([W.T, rand])[np.argsort(perm)]  # by squared distance: no scaling, no flips
    np.testing.assert_array_equal(geometry.match_rows(exact, W.T), planted)


# ----------------------------------------------------------------------------- non-negative losses


@FAST
@given(problem(), arrays(np.float64, st.tuples(st.integers(1, 6), st.just(1)), elements=finite))
def test_theory_losses_are_non_negative(prob, _):
    W, g, x = prob
    rng = np.random.default_rng(int(1e6 * abs(W).sum()) % 2**32)
    W_m = rng.standard_normal((rng.integers(1, 7), W.shape[0]))
    losses = geometry.theory_losses(W, W_m, x, gamma=g)
    assert np.all(losses.sae >= 0) and np.all(losses.gt >= 0)
    assert geometry.frobenius_gap(W, g) >= 0 and geometry.frobenius_gap(W, g, rescale=False) >= 0


@FAST
@given(st.sampled_from(["theory", "relu", "topk"]), st.integers(1, 5), st.integers(1, 9), st.integers(1, 8),
       st.integers(0, 2**32 - 1))
def test_sae_losses_and_metrics_are_non_negative(kind, n_p, n_m, batch, seed):
    cfg = models.SAEConfig(n_p=n_p, n_m=n_m, kind=kind, k=min(2, n_m) if kind == "topk" else None,
                           l1_coeff=1e-2 if kind == "relu" else 0.0, seed=seed % 2**31)
    sae = models.build_sae(cfg)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_p, generator=g)
    gamma = torch.rand(n_p, generator=g) + 0.1
    out = sae(x, gamma)
    for v in (out.loss, out.recon_loss, out.sparsity_loss, out.fvu):
        assert float(v.detach()) >= 0
    assert float(weights.wsae_loss(x, out.reconstruction.detach(), gamma)) >= 0
    assert metrics.reconstruction_error(x, out.reconstruction.detach()) >= 0
    gt = metrics.ground_truth_error(x.abs(), x.abs().flip(0))
    assert gt.all >= 0 and gt.nonzero >= 0 and gt.zero >= 0


@FAST
@given(arrays(np.float64, st.tuples(st.integers(2, 8), st.integers(1, 4)), elements=finite))
def test_fvu_of_exact_and_mean_reconstructions(x):
    assume(np.ptp(x, axis=0).max() > 1e-3)
    assert metrics.fvu(x, x) == 0.0
    assert metrics.fvu(x, np.broadcast_to(x.mean(0), x.shape)) == pytest.approx(1.0, rel=1e-9)
    assert metrics.fvu(x, np.zeros_like(x)) >= 0


# ----------------------------------------------------------------------------- constructions and weights


@FAST
@given(st.lists(st.integers(1, 7), min_size=1, max_size=5))
def test_superposition_matrix_geometry(blocks):
    W = geometry.superposition_matrix(blocks)
    assert W.shape == (sum(1 if k <= 2 else 2 for k in blocks), sum(blocks))
    np.testing.assert_allclose(np.linalg.norm(W, axis=0), 1.0, atol=1e-12)
    G = geometry.interference(W)
    np.testing.assert_allclose(G, G.T, atol=0)
    assert np.all(np.diag(G) == 0)
    # Monosemantic units, digons, triangles and squares have non-positive interference; k >= 5 do not.
    assert geometry.has_nonpositive_interference(W) == all(k <= 4 for k in blocks)
    W_m = geometry.closed_form_sae(W, sum(blocks) + 2)
    assert geometry.equivalent(W_m, W.T)


@FAST
@given(st.integers(1, 6), st.integers(0, 6), st.integers(0, 2**32 - 1))
def test_random_nonpositive_superposition_is_what_it_claims(n_p, extra, seed):
    n = n_p + min(extra, n_p)
    W = geometry.random_nonpositive_superposition(n, n_p, seed=seed)
    assert W.shape == (n_p, n)
    np.testing.assert_allclose(np.linalg.norm(W, axis=0), 1.0, atol=1e-9)
    assert geometry.has_nonpositive_interference(W, tol=1e-9)


@FAST
@given(arrays(np.float64, st.tuples(st.integers(3, 12), st.integers(1, 4)), elements=finite),
       st.floats(0, 2, allow_subnormal=False, width=64), positive, finite)
def test_variance_rule_is_normalised_and_scale_and_shift_invariant(x, alpha, c, shift):
    assume(np.var(x, axis=0, ddof=1).min() > 1e-3)
    g = weights.variance_gamma(x, alpha).double()
    assert float(g.pow(2).mean()) == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(weights.variance_gamma(c * x + shift, alpha).double(), g, rtol=1e-4, atol=1e-5)


@FAST
@given(st.integers(1, 400), st.integers(0, 400), st.floats(1e-5, 1.0), st.sampled_from(["cosine", "linear", "constant"]),
       st.floats(0, 1, allow_subnormal=False))
def test_learning_rate_schedule_stays_in_range(steps, warmup, lr, decay, ratio):
    cfg = train.TrainConfig(steps=steps, warmup_steps=min(warmup, steps), lr=lr, decay=decay, final_lr_ratio=ratio)
    rates = [train.lr_at(s, cfg) for s in range(steps)]
    assert all(0 < r <= lr * (1 + 1e-12) for r in rates[: cfg.warmup_steps])  # warm-up: positive, rising
    assert all(a <= b + 1e-15 for a, b in zip(rates[: cfg.warmup_steps], rates[1 : cfg.warmup_steps]))
    floor = lr if decay == "constant" else ratio * lr  # after it: between the final rate and the peak
    assert all(floor * (1 - 1e-12) - 1e-15 <= r <= lr * (1 + 1e-12) for r in rates[cfg.warmup_steps :])


@FAST
@given(arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 5)), elements=st.floats(-1e3, 1e3, allow_subnormal=False, width=32)),
       st.data(), st.sampled_from([math.nan, math.inf, -math.inf]))
def test_nonfinite_location_finds_the_first_bad_entry(x, data, bad):
    assert checks.nonfinite_location(x) is None and checks.nonfinite_location(torch.from_numpy(x)) is None
    i = data.draw(st.integers(0, x.shape[0] - 1))
    j = data.draw(st.integers(0, x.shape[1] - 1))
    x[i, j] = bad
    for arr in (x, torch.from_numpy(x)):
        where, value = checks.nonfinite_location(arr)
        assert where == (i, j) and (math.isnan(value) if math.isnan(bad) else value == bad)


@SLOW
@given(problem(rational_entries=True, max_n=4, max_n_p=2))
def test_exact_recovery_agrees_with_the_numeric_theory_sae(prob):
    W, _, x = prob
    xr = [Fraction(v).limit_denominator(8) for v in x[0]]
    exact = symbolic.exact_recovery(sp.Matrix(W.tolist()), xr)
    num = geometry.recover(W.astype(np.float64).T, W.astype(np.float64) @ np.array(xr, dtype=np.float64))
    np.testing.assert_allclose(np.array(exact.x_m, dtype=np.float64).ravel(), num, atol=1e-9)
