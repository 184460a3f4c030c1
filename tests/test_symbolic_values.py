"""Values of wsae_core.symbolic against independent computations (written to kill mutation
survivors: see CONTRIBUTING.md, "Mutation testing").

* Constant values (every active feature has value 1): the exact expectations are finite sums over
  the 2^n active sets, computed here by brute force in rational arithmetic (``fractions``), with
  latents ``relu(c V W_p x)`` evaluated directly; nothing of the library's region enumeration.
* Uniform values: the floating-point path (taken when ``W_pᵀW_p`` or ``V W_p`` is not rational)
  against the exact rational path on the same matrix written as floats.
* The polytope integrator against closed-form moments of a square, a triangle and a cube.
"""

import itertools
from fractions import Fraction

import numpy as np
import pytest
import sympy as sp

from wsae_core import geometry, symbolic
from wsae_core.symbolic import S, c

# Three features in two dimensions with mixed signs: some latents go negative.
W3 = [[Fraction(1), Fraction(-1), Fraction(0)], [Fraction(0), Fraction(1, 2), Fraction(1)]]
# e_1 + e_2 cancels (x_p = 0: every latent is 0, the top latent is lost), and e_1 + e_3 ties on
# constant values (broken towards the lower index, feature 1's latent).
W5 = [[Fraction(1), Fraction(-1), Fraction(0)], [Fraction(0), Fraction(0), Fraction(1)]]
# Four features in three dimensions, rational and irregular.
W4 = [[Fraction(3, 5), Fraction(0), Fraction(-1, 2), Fraction(1, 3)],
      [Fraction(4, 5), Fraction(1), Fraction(0), Fraction(-2, 3)],
      [Fraction(0), Fraction(-1, 4), Fraction(1), Fraction(2, 3)]]
S_VAL, C_VAL = Fraction(1, 3), Fraction(3, 4)


def _matmul(A, B):
    return [[sum(A[i][k] * B[k][j] for k in range(len(B))) for j in range(len(B[0]))] for i in range(len(A))]


def _T(A):
    return [list(r) for r in zip(*A)]


def _active_sets(n):
    for size in range(n + 1):
        yield from itertools.combinations(range(n), size)


def _constant_sample(Wp, V, cv, active):
    """x (0/1), x_p, and the latents relu(c V x_p) of one constant-value sample, exactly."""
    n = len(Wp[0])
    x = [Fraction(int(i in active)) for i in range(n)]
    xp = [sum(Wp[r][i] * x[i] for i in range(n)) for r in range(len(Wp))]
    pre = [cv * sum(V[j][r] * xp[r] for r in range(len(xp))) for j in range(len(V))]
    return x, xp, [max(p, Fraction(0)) for p in pre]


def _prob(n, active, s):
    return (1 - s) ** len(active) * s ** (n - len(active))


def _sq(v):
    return sum(a * a for a in v)


@pytest.mark.parametrize("Wp", [W3, W4, W5], ids=["W3", "W4", "W5"])
def test_constant_values_expected_losses_by_brute_force(Wp):
    n, V = len(Wp[0]), _T(Wp)
    sae = gt = Fraction(0)
    for active in _active_sets(n):
        x, xp, xm = _constant_sample(Wp, V, C_VAL, active)
        rec = [C_VAL * sum(V[j][r] * xm[j] for j in range(len(V))) for r in range(len(xp))]
        p = _prob(n, active, S_VAL)
        sae += p * _sq([a - b for a, b in zip(xp, rec)])
        gt += p * _sq([a - b for a, b in zip(x, xm)])
    got = symbolic.expected_losses(sp.Matrix(Wp), S_value=sp.Rational(1, 3), c_value=sp.Rational(3, 4),
                                   values="constant")
    assert (got.sae, got.gt) == (sp.Rational(sae.numerator, sae.denominator), sp.Rational(gt.numerator, gt.denominator))


@pytest.mark.parametrize("Wp", [W3, W4, W5], ids=["W3", "W4", "W5"])
def test_constant_values_feature_recovery_by_brute_force(Wp):
    n, V = len(Wp[0]), _T(Wp)
    got = symbolic.feature_recovery(sp.Matrix(Wp), S_value=sp.Rational(1, 3), c_value=sp.Rational(3, 4), values="constant")
    for j in range(n):
        mean = vanish = Fraction(0)
        for active in _active_sets(n):
            if j not in active:
                continue
            p = _prob(n, active, S_VAL) / (1 - S_VAL)  # conditioned on x_j > 0
            _, _, xm = _constant_sample(Wp, V, C_VAL, active)
            mean += p * xm[j]
            vanish += p * (xm[j] == 0)
        assert got.mean_recovered[j] == sp.Rational(mean.numerator, mean.denominator), j
        assert got.shrink_ratio[j] == got.mean_recovered[j]  # E[x_j | x_j > 0] = 1 for constant values
        assert got.vanish_prob[j] == sp.Rational(vanish.numerator, vanish.denominator), j


@pytest.mark.parametrize("Wp", [W3, W4, W5], ids=["W3", "W4", "W5"])
def test_constant_values_top_change_probability_by_brute_force(Wp):
    n, V = len(Wp[0]), _T(Wp)
    changed = Fraction(0)
    for active in _active_sets(n):
        if not active:
            continue
        _, _, xm = _constant_sample(Wp, V, Fraction(1), active)
        top = max(range(n), key=lambda j: (xm[j], -j))  # ties towards the lower index
        if xm[top] == 0 or top != active[0]:  # all-zero latents count as changed
            changed += _prob(n, active, S_VAL)
    want = changed / (1 - S_VAL**n)
    got = symbolic.top_change_probability(sp.Matrix(Wp), S_value=sp.Rational(1, 3), values="constant")
    assert got == sp.Rational(want.numerator, want.denominator)


def test_shrink_ratio_for_uniform_values_divides_by_the_mean_value():
    """Uniform[0, 1] values have E[x_j | x_j > 0] = 1/2: the shrink ratio is twice the mean."""
    got = symbolic.feature_recovery(sp.Matrix(W3), S_value=sp.Rational(1, 3))
    assert got.shrink_ratio == [sp.expand(2 * m) for m in got.mean_recovered]
    assert all(sp.Rational(0) < r < 1 for r in got.shrink_ratio[:1])


def _as_floats(W):
    return np.array([[float(v) for v in r] for r in W])


@pytest.mark.parametrize("values", ["uniform", "constant"])
def test_float_path_equals_the_exact_path(values):
    """The same matrices as floats (not rational to SymPy) take the floating-point integration; its
    numbers equal the exact rationals to 1e-9."""
    exact_W, float_W = sp.Matrix(W3), _as_floats(W3)
    kw = {"S_value": sp.Rational(1, 3), "values": values}
    for f, extra in ((symbolic.expected_losses, {"c_value": sp.Rational(3, 4)}),
                     (symbolic.feature_recovery, {"c_value": sp.Rational(3, 4)}),
                     (symbolic.top_change_probability, {})):
        a, b = f(exact_W, **kw, **extra), f(float_W, **kw, **extra)
        flat_a = np.array([float(v) for v in sp.flatten(list(a) if isinstance(a, tuple) else [a])])
        flat_b = np.array([float(v) for v in sp.flatten(list(b) if isinstance(b, tuple) else [b])])
        assert any(isinstance(v, sp.Float) or not v.is_Rational
                   for v in sp.flatten(list(b) if isinstance(b, tuple) else [b]) if v != 0), f.__name__
        np.testing.assert_allclose(flat_b, flat_a, rtol=1e-9, atol=1e-12, err_msg=f.__name__)
        assert all(v.is_Rational for v in sp.flatten(list(a) if isinstance(a, tuple) else [a])), f.__name__


def test_float_path_keeps_the_symbols():
    """With the symbols S and c left free, the float path gives the same polynomials."""
    a = symbolic.expected_losses(sp.Matrix(W3))
    b = symbolic.expected_losses(_as_floats(W3))
    for pa, pb in ((a.sae, b.sae), (a.gt, b.gt)):
        diff = sp.Poly(sp.expand(pa - pb), S, c)
        assert max(abs(float(v)) for v in diff.coeffs()) < 1e-9


@pytest.mark.parametrize("exact", [True, False])
def test_polytope_moments_closed_forms(exact):
    one, zero = (Fraction(1), Fraction(0)) if exact else (1.0, 0.0)
    num = Fraction if exact else float

    def box(d, extra=()):
        A, b = [], []
        for k in range(d):
            row = [zero] * d
            row[k] = one
            A += [row, [-v for v in row]]
            b += [one, zero]
        for row, rhs in extra:
            A.append(row), b.append(rhs)
        return A, b

    cases = [  # (region, volume, first moments, second moments)
        (box(2), 1, [Fraction(1, 2)] * 2, [[Fraction(1, 3), Fraction(1, 4)], [Fraction(1, 4), Fraction(1, 3)]]),
        (box(2, [([one, one], one)]), Fraction(1, 2), [Fraction(1, 6)] * 2,  # the triangle u1 + u2 <= 1
         [[Fraction(1, 12), Fraction(1, 24)], [Fraction(1, 24), Fraction(1, 12)]]),
        (box(3), 1, [Fraction(1, 2)] * 3,
         [[Fraction(1, 3) if i == j else Fraction(1, 4) for j in range(3)] for i in range(3)]),
        (box(1), 1, [Fraction(1, 2)], [[Fraction(1, 3)]]),
    ]
    for (A, b), vol, m1, m2 in cases:
        got = symbolic._polytope_moments(A, b, exact)
        if exact:
            assert (got.vol, got.m1, got.m2) == (vol, m1, m2)
            assert all(isinstance(v, Fraction) for v in [got.vol, *got.m1, *sum(got.m2, [])])
        else:
            np.testing.assert_allclose(float(got.vol), float(vol), rtol=1e-12)
            np.testing.assert_allclose(np.array(got.m1, float), np.array(m1, float), rtol=1e-12)
            np.testing.assert_allclose(np.array(got.m2, float), np.array(m2, float), rtol=1e-12)
    del num
    # an empty region (u1 >= 1/2 and u1 <= 1/4) and a flat one (u1 + u2 <= 0 in the square)
    assert symbolic._polytope_moments(*box(1, [([-one], -one / 2), ([one], one / 4)]), exact) is None
    assert symbolic._polytope_moments(*box(2, [([one, one], zero)]), exact) is None


def test_exact_helpers_det_and_solve():
    F = Fraction
    assert symbolic._det([[F(0), F(1)], [F(1), F(0)]]) == -1  # one row swap
    assert symbolic._det([[F(2), F(1)], [F(4), F(5)]]) == 6
    assert symbolic._det([[F(1), F(2)], [F(2), F(4)]]) == 0
    assert symbolic._det([[0.0, 2.0], [3.0, 1.0]]) == pytest.approx(-6.0)
    x = symbolic._solve_exact([[F(2), F(1)], [F(1), F(3)]], [F(5), F(10)])
    assert x == [F(1), F(3)]
    x = symbolic._solve_exact([[F(0), F(2), F(1)], [F(1), F(1), F(1)], [F(3), F(0), F(1)]], [F(5), F(4), F(4)])
    assert x == [F(1), F(2), F(1)]


def test_scalar_checks_make_floats_exact_and_refuse_non_reals():
    """S and c given as floats are read as the rationals they print as (exact results); complex
    or infinite values and non-positive symbols are refused with ValueError."""
    W = geometry.superposition_matrix([2], exact=True)
    a = symbolic.expected_losses(W, S_value=0.5, c_value=0.75)
    b = symbolic.expected_losses(W, S_value=sp.Rational(1, 2), c_value=sp.Rational(3, 4))
    assert a == b and a.sae.is_Rational
    for bad in (sp.I / 2, sp.oo, 1, -0.1):
        with pytest.raises(ValueError, match="S"):
            symbolic.expected_losses(W, S_value=bad)
    for bad in (sp.I, sp.oo, 0, -1.5, sp.Integer(-1)):
        with pytest.raises(ValueError, match=r"^c must be finite and positive"):
            symbolic.expected_losses(W, c_value=bad)
    for bad in (sp.Symbol("t", negative=True), sp.Symbol("t")):
        with pytest.raises(ValueError, match="^a symbolic scale c must be declared positive"):
            symbolic.expected_losses(W, c_value=bad)
    t = sp.Symbol("t", positive=True)
    assert symbolic.expected_losses(W, S_value=sp.Rational(1, 2), c_value=t).sae.has(t)
    with pytest.raises(ValueError, match="^gamma must be finite and positive, got I at index 0"):
        symbolic.gap_matrix(sp.eye(2), [sp.I, 1])


def test_size_limits_are_inclusive():
    """n = 6 features and 8 latents are accepted; 7 features or 9 latents are refused; the error
    names the matrix (W_p or V) it is about."""
    W6 = sp.eye(6)
    assert symbolic.expected_losses(W6, values="constant", S_value=sp.Rational(1, 2), c_value=1).sae == 0
    assert symbolic.feature_recovery(W6, values="constant", S_value=sp.Rational(1, 2)).vanish_prob == [0] * 6
    for f in (symbolic.expected_losses, symbolic.feature_recovery, symbolic.top_change_probability):
        with pytest.raises(ValueError, match="n must be <= 6"):  # constant values: fast if not refused
            f(sp.eye(7), values="constant", S_value=sp.Rational(1, 2))
    W2 = sp.Matrix([[1, 0], [0, 1]])
    V8, V9 = sp.ones(8, 2), sp.ones(9, 2)
    symbolic.expected_losses(W2, V8, values="constant", S_value=sp.Rational(1, 2), c_value=1)
    with pytest.raises(ValueError, match="at most 8 rows"):
        symbolic.expected_losses(W2, V9)
    with pytest.raises(ValueError, match="^W_p must be a 2-D matrix"):
        symbolic.expected_losses(np.ones(3))
    with pytest.raises(ValueError, match="^V must be a 2-D matrix"):
        symbolic.expected_losses(W2, np.ones(2))
    with pytest.raises(ValueError, match="^V must be a 2-D matrix"):
        symbolic.feature_recovery(W2, np.ones(2))
    with pytest.raises(ValueError, match="^W_p must be a 2-D matrix"):
        symbolic.feature_recovery(np.ones(2))
    for bad in (sp.oo, sp.I, sp.nan):
        with pytest.raises(ValueError, match="^W_p must have finite real entries"):
            symbolic.exact_recovery([[bad, 0], [0, 1]], [1, 0])
    with pytest.raises(ValueError, match="^W_m must be a 2-D matrix"):
        symbolic.reconstructs_exactly(W2, np.ones(2))
    with pytest.raises(ValueError, match="no latent ever fires"):
        symbolic.expected_losses(W2, sp.zeros(2, 2))
    with pytest.raises(ValueError, match="6"):
        symbolic.expected_losses_blocks([7])
    assert symbolic.expected_losses_blocks([6], values="constant", S_value=sp.Rational(1, 2), c_value=1) is not None


def test_feature_recovery_uses_the_given_encoder():
    """V is not ignored: for features at acute angles (W_pᵀW_p >= 0) the encoder -W_pᵀ silences
    every latent (vanish probability 1, every top latent lost)."""
    W = sp.Matrix([[1, sp.Rational(1, 2)], [0, 1]])
    got = symbolic.feature_recovery(W, -W.T, S_value=sp.Rational(1, 3))
    assert got.vanish_prob == [1, 1] and got.mean_recovered == [0, 0]
    assert symbolic.top_change_probability(W, -W.T, S_value=sp.Rational(1, 3)) == 1
    assert symbolic.feature_recovery(W, S_value=sp.Rational(1, 3)).vanish_prob == [0, 0]
    # a latent whose encoder row is orthogonal to every feature never fires, exactly and in floats
    V = sp.Matrix([[1, sp.Rational(1, 2)], [0, 0]])
    for Wi, Vi in ((W, V), (np.array(W, dtype=float), np.array(V, dtype=float))):
        for values in ("uniform", "constant"):
            got = symbolic.feature_recovery(Wi, Vi, S_value=sp.Rational(1, 3), values=values)
            assert float(got.vanish_prob[1]) == pytest.approx(1, abs=1e-12), (type(Wi), values)
            assert float(got.mean_recovered[1]) == pytest.approx(0, abs=1e-12), (type(Wi), values)
            if Wi is W:  # rational input: rational answers
                assert all(v.is_Rational for v in got.vanish_prob + got.mean_recovered), values


def test_reconstructs_exactly_latent_limit_and_a_counterexample():
    W = geometry.superposition_matrix([2], exact=True)  # the digon: reconstructed exactly
    assert symbolic.reconstructs_exactly(W)
    assert not symbolic.reconstructs_exactly(geometry.superposition_matrix([3], exact=True))
    M12 = sp.Matrix.vstack(*[W.T] * 6)  # 12 latents: allowed
    assert symbolic.reconstructs_exactly(W, M12) in (True, False)
    with pytest.raises(ValueError, match="at most 12 rows"):
        symbolic.reconstructs_exactly(W, sp.Matrix.vstack(M12, W.T[:1, :]))


def test_one_sparse_limit_counts_and_pads():
    """max_active is 0 when no latent fires; more latents than features pad the target with zeros."""
    Wpos = sp.Matrix([[1, sp.Rational(1, 2)], [0, 1]])
    assert symbolic.one_sparse_limit(Wpos, -Wpos.T).max_active == 0
    W = geometry.superposition_matrix([2], exact=True)
    M = sp.Matrix.vstack(W.T, sp.zeros(1, W.rows))  # a third latent that never fires
    got = symbolic.one_sparse_limit(W, M)
    assert (got.sae, got.gt, got.max_active) == (0, 0, 1)


def test_mc_estimate_is_mean_and_standard_error():
    assert symbolic.mc_estimate([1, 3]) == (2.0, pytest.approx(np.std([1, 3], ddof=1) / np.sqrt(2)))
    a = np.arange(10.0) ** 2
    assert symbolic.mc_estimate(a) == (pytest.approx(a.mean()), pytest.approx(a.std(ddof=1) / np.sqrt(10)))
    assert symbolic.mc_estimate(np.array([1, 2], dtype=np.int64))[0] == 1.5
    with pytest.raises(ValueError, match="at least 2"):
        symbolic.mc_estimate([1.0])


def test_common_scale_optimum_against_its_definition():
    """c* minimises Σ_b γ_b² E[L_SAE,b](c) and E[L_GT] there is Σ_b E[L_GT,b](c*), from the
    per-block expected losses (unequal weights, so a wrong power of γ shows)."""
    half = sp.Rational(1, 2)
    blocks, weights = [3, 2], [sp.Integer(2), half]
    c_star, gt = symbolic.common_scale_optimum(blocks, weights, S_value=half)
    per = [symbolic.expected_losses(geometry.superposition_matrix([k], exact=True), S_value=half) for k in blocks]
    L_w = sp.expand(sum(w**2 * r.sae for w, r in zip(weights, per)))
    assert sp.simplify(sp.diff(L_w, c).subs(c, c_star)) == 0 and c_star.is_positive
    assert sp.simplify(gt - sum(r.gt for r in per).subs(c, c_star)) == 0
    # blocks reconstructed exactly at c = 1 (digons): c* = 1 and E[L_GT] there
    c1, gt1 = symbolic.common_scale_optimum([2, 2], [1, 3], S_value=half)
    per2 = symbolic.expected_losses(geometry.superposition_matrix([2], exact=True), S_value=half)
    assert c1 == 1 and gt1 == 2 * per2.gt.subs(c, 1)


def test_frobenius_exact_refuses_dependent_rows():
    with pytest.raises(ValueError, match="linearly dependent"):
        symbolic.frobenius_optimal_gamma_exact(sp.Matrix([[1, 0], [1, 0], [0, 1]]))  # two equal rows


def test_exact_recovery_fields_and_a_silent_sample():
    """Every field against a hand computation, and x_m = 0 (all latents silent: no top latent)."""
    W = sp.Matrix([[1, -1], [0, 0]])  # two opposite features in the first dimension
    r = symbolic.exact_recovery(W, [0.5, 0.5])  # x_p = 0: nothing fires
    assert r.x == sp.Matrix([sp.Rational(1, 2), sp.Rational(1, 2)]) and r.x_p == sp.zeros(2, 1)
    assert r.x_m == sp.zeros(2, 1) and r.top_x_m is None and r.top_x == 0
    assert r.loss_sae == 0 and r.loss_gt == sp.Rational(1, 2)
    r = symbolic.exact_recovery(W, [sp.Rational(1, 5), sp.Rational(7, 10)])  # x_p = (-1/2, 0): latent 2 fires
    assert r.pre == sp.Matrix([-sp.Rational(1, 2), sp.Rational(1, 2)]) and r.x_m == sp.Matrix([0, sp.Rational(1, 2)])
    assert (r.top_x, r.top_x_m) == (1, 1)
    assert r.loss_gt == sp.Rational(1, 25) + sp.Rational(1, 25) and r.loss_sae == 0


def test_names_in_the_errors_and_defaults():
    """Each function's errors name its argument as the signature does; value_moments defaults to
    Uniform[0, 1]; optimal_scale refuses a loss with odd powers of c."""
    W2 = sp.eye(2)
    for f in (symbolic.one_sparse_limit, symbolic.variance_proxy, symbolic.reconstructs_exactly,
              symbolic.frobenius_optimal_gamma_exact, symbolic.gap_matrix):
        with pytest.raises(ValueError, match="^W_p must be a 2-D matrix"):
            f(np.ones(3))
    for f in (symbolic.one_sparse_limit, symbolic.reconstructs_exactly):
        with pytest.raises(ValueError, match="^W_m must be a 2-D matrix"):
            f(W2, np.ones(2))
    assert symbolic.value_moments() == (sp.Rational(1, 2), sp.Rational(1, 3))
    assert symbolic.value_moments("constant") == (1, 1)
    for bad in (1 - c + c**4, 1 - c**2 + c**3 + c**4, 1 - 2 * c**2, 1 - c**2 + c**4 + c**5):
        with pytest.raises(ValueError, match="expected a polynomial a - 2 b c\\^2 \\+ d c\\^4"):
            symbolic.optimal_scale(bad)
    assert symbolic.optimal_scale(1 - 4 * c**2 + 2 * c**4) == 1
