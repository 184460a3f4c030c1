"""Exact algebra with SymPy: gap matrices (Theorems 4-5), identities, exact expectations.

Chapters: *The gap* (Theorems 4 and 5), *The closed form* (Theorem 1), *Extreme sparsity* (Theorems 2
and 3), *Shrinking and vanishing*.

Conventions as in :mod:`wsae_core.geometry`: ``W_p`` is ``(n_p, n)``, the theory SAE's encoder is
``W_m`` ``(n_m, n_p)`` with latent ``x_m = relu(W_m x_p)`` and tied reconstruction ``W_mᵀ x_m``.

**Exact expectations.** Every ``x_i`` is 0 with probability ``S`` and otherwise drawn from a value
distribution (``"uniform"`` = Uniform[0, 1], the book's default, or ``"constant"`` = 1). For an
encoder ``W_m = c V`` (``c > 0`` a scale, ``V`` fixed) the pre-activations ``c V W_p x`` are linear
in x, so for a fixed *active set* A (the non-zero features, probability ``(1-S)^|A| S^(n-|A|)``)
and a fixed *sign pattern* P (the latents with positive pre-activation) every loss is a quadratic
form in the active values. The set of values with pattern P is a convex polytope inside the unit
cube, independent of c. We enumerate its vertices, triangulate it, and integrate exactly with the
simplex moment formulas

    ∫_T u du = |T| mean(v_i),   ∫_T u uᵀ du = |T| / ((d+1)(d+2)) (Σ v_i v_iᵀ + s sᵀ),  s = Σ v_i,

so that each expected loss is a polynomial in S and c with exact rational coefficients whenever
the Gram matrices involved are rational (digon, triangle, square, hexagon; regular pentagons and
rotations fall back to floating point). The total volume of the patterns of each active set is
checked to be exactly 1. Losses of block-diagonal configurations are sums over blocks
(:func:`expected_losses_blocks`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from fractions import Fraction
from numbers import Integral, Real
from typing import Any, Literal, NamedTuple

import numpy as np
import sympy as sp

from . import geometry

__all__ = [
    "S",
    "c",
    "gap_matrix",
    "frobenius_optimal_gamma_exact",
    "verify_gap_identity",
    "exact_recovery",
    "shrinking_example",
    "vanishing_example",
    "ExpectedLosses",
    "expected_losses",
    "expected_losses_blocks",
    "optimal_scale",
    "feature_recovery",
    "top_change_probability",
    "mc_estimate",
    "value_moments",
    "variance_proxy",
    "common_scale_optimum",
    "reconstructs_exactly",
    "one_sparse_limit",
]

#: The sparsity and the encoder scale as SymPy symbols (the default free variables of the results).
S = sp.Symbol("S", nonnegative=True)
c = sp.Symbol("c", positive=True)

Values = Literal["uniform", "constant"]


# --------------------------------------------------------------------------------------------
# Gap matrices and the identities of Theorems 4 and 5
# --------------------------------------------------------------------------------------------

def _sympy_matrix(W: Any, name: str) -> sp.Matrix:
    if isinstance(W, sp.MatrixBase):
        M = sp.Matrix(W)
    else:
        A = np.asarray(W, dtype=object)
        if A.ndim != 2:
            raise ValueError(f"{name} must be a 2-D matrix, got an array of shape {A.shape}")
        M = sp.Matrix(A.tolist())
    for v in M:
        if v.is_number and not (v.is_finite and v.is_real):
            raise ValueError(f"{name} must have finite real entries, got {v}")
    return M


def _check_gamma_symbolic(gamma: Any, n_p: int) -> list[sp.Expr]:
    if isinstance(gamma, (str, bytes)) or not hasattr(gamma, "__len__"):
        raise ValueError(f"gamma must be a sequence of {n_p} positive weights, got {gamma!r}")
    if len(gamma) != n_p:
        raise ValueError(f"gamma must have length n_p = {n_p} (one weight per dimension of x_p), got {len(gamma)}")
    out = []
    for i, g in enumerate(gamma):
        e = sp.sympify(g)
        if e.is_number:
            if not (e.is_real and e.is_finite) or e <= 0:
                raise ValueError(f"gamma must be finite and positive, got {g!r} at index {i}")
        elif e.is_positive is False or e.is_real is False:
            raise ValueError(f"gamma must be positive, got the expression {e} (known non-positive) at index {i}")
        out.append(e)
    return out


def gap_matrix(W_p: Any, gamma: Any = None) -> sp.Matrix:
    """Theorem 5's gap matrix ``W_pᵀ ΓᵀΓ W_p - I_n`` as a simplified SymPy matrix ``(n, n)``.

    ``W_p``: ``(n_p, n)``, a SymPy matrix (exact) or an array. ``gamma``: ``None`` (Γ = I, giving
    Theorem 4's ``W_pᵀW_p - I``) or ``n_p`` weights, numbers (finite, > 0) or SymPy symbols
    (declare them ``positive=True``; a symbol known to be non-positive is rejected).
    """
    W = _sympy_matrix(W_p, "W_p")
    n_p, n = W.shape
    g = [sp.Integer(1)] * n_p if gamma is None else _check_gamma_symbolic(gamma, n_p)
    G2 = sp.diag(*[gi**2 for gi in g])
    return (W.T * G2 * W - sp.eye(n)).applyfunc(sp.simplify)


def verify_gap_identity(n_p: int, n: int, weighted: bool = True, tied: bool = True) -> bool:
    """Symbolic proof of Theorem 4 (``weighted=False``) or Theorem 5 (``weighted=True``).

    With fully symbolic ``W_p`` ``(n_p, n)``, ``x`` ``(n,)``, weights ``γ`` ``(n_p,)`` and an
    *undefined* elementwise activation ``σ`` (so the proof holds for every activation, ReLU
    included), it builds, at ``W_m = W_pᵀ`` (``tied=True``),

        L_WSAE(x) = ||Γ(W_p x - W_m^T σ(W_m W_p x))||²,   L_GT(x) = ||x - σ(W_m W_p x)||²,

    and returns True when ``L_WSAE - L_GT - eᵀ(W_pᵀΓᵀΓW_p - I)e`` with ``e = x - σ(W_pᵀW_p x)``
    expands to exactly zero. These are per-sample identities; taking expectations gives the
    theorems. With ``tied=False`` a general symbolic ``W_m`` ``(n, n_p)`` is used instead and the
    identity does *not* hold (the function returns False): the condition ``W_m = W_pᵀ`` matters.
    """
    for name, v in (("n_p", n_p), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, Integral) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if n_p * n > 36:
        raise ValueError(f"n_p * n must be at most 36 to keep the expansion small, got {n_p} * {n} = {n_p * n}")
    W = sp.Matrix(n_p, n, lambda i, j: sp.Symbol(f"w_{i + 1}{j + 1}", real=True))
    x = sp.Matrix(n, 1, lambda i, _: sp.Symbol(f"x_{i + 1}", real=True))
    gam = [sp.Symbol(f"gamma_{i + 1}", positive=True) for i in range(n_p)] if weighted else [1] * n_p
    Gam = sp.diag(*gam)
    W_m = W.T if tied else sp.Matrix(n, n_p, lambda i, j: sp.Symbol(f"m_{i + 1}{j + 1}", real=True))
    sigma = sp.Function("sigma")
    x_p = W * x
    x_m = (W_m * x_p).applyfunc(sigma)
    r = Gam * (x_p - W_m.T * x_m)
    L_wsae = (r.T * r)[0]
    L_gt = ((x - x_m).T * (x - x_m))[0]
    e = x - x_m
    rhs = (e.T * (W.T * Gam.T * Gam * W - sp.eye(n)) * e)[0]
    return sp.expand(L_wsae - L_gt - rhs) == 0


class Recovery(NamedTuple):
    """One sample pushed exactly through the closed-form SAE ``W_m = W_pᵀ`` (SymPy values)."""

    x: sp.Matrix
    x_p: sp.Matrix
    pre: sp.Matrix
    """Pre-activations ``W_pᵀ x_p = W_pᵀW_p x``."""
    x_m: sp.Matrix
    loss_sae: sp.Expr
    """``||x_p - W_p x_m||²``."""
    loss_gt: sp.Expr
    """``||x - x_m||²``."""
    top_x: int
    """0-based index of the largest entry of x."""
    top_x_m: int | None
    """0-based index of the largest entry of x_m (None when x_m = 0)."""


def exact_recovery(W_p: Any, x: Any) -> Recovery:
    """Exact ``x -> x_p = W_p x -> x_m = relu(W_pᵀ x_p)`` for one sample (failure examples).

    ``W_p``: ``(n_p, n)`` (SymPy or array), ``x``: ``(n,)``; floats are converted with
    ``nsimplify`` so that 0.7 becomes 7/10.
    """
    W = _sympy_matrix(W_p, "W_p")
    xs = [sp.nsimplify(v) for v in np.asarray(x, dtype=object).ravel()]
    if len(xs) != W.shape[1]:
        raise ValueError(f"x must have length n = {W.shape[1]} to match W_p of shape {W.shape}, got {len(xs)}")
    xv = sp.Matrix(xs)
    x_p = (W * xv).applyfunc(sp.nsimplify)
    pre = (W.T * x_p).applyfunc(sp.simplify)
    x_m = pre.applyfunc(lambda v: sp.Max(v, 0))
    d_p = W * (xv - x_m)
    loss_sae = sp.nsimplify(sp.simplify((d_p.T * d_p)[0]))
    loss_gt = sp.nsimplify(((xv - x_m).T * (xv - x_m))[0])
    vals = [float(v) for v in x_m]
    top_m = None if max(vals) <= 0 else int(np.argmax(vals))
    return Recovery(xv, x_p, pre, x_m, loss_sae, loss_gt, int(np.argmax([float(v) for v in xv])), top_m)


def shrinking_example() -> Recovery:
    """Failure example 1 (feature shrinking): ``W_p = [[1,0,0],[0,1,-1]]``, ``x = (1/2, 1, 4/5)``."""
    return exact_recovery(geometry.superposition_matrix([1, 2], exact=True), [sp.Rational(1, 2), 1, sp.Rational(4, 5)])


def vanishing_example() -> Recovery:
    """Failure example 2 (feature vanishing): the triangle, ``x = (7/10, 1/2, 3/10)``."""
    return exact_recovery(geometry.superposition_matrix([3], exact=True),
                          [sp.Rational(7, 10), sp.Rational(1, 2), sp.Rational(3, 10)])


def frobenius_optimal_gamma_exact(W_p: Any) -> list[sp.Expr]:
    """Exact weights ``gamma`` ``(n_p,)`` minimising ``||W_pᵀΓ²W_p - I||_F`` (chapter *The gap*).

    ``W_pᵀΓ²W_p = Σ_i g_i r_i r_iᵀ`` with ``g_i = γ_i²`` and ``r_i`` the rows of W_p, so the
    unconstrained minimiser solves the normal equations ``Σ_j (r_iᵀr_j)² g_j = ||r_i||²``.
    When that solution is positive it is also :func:`geometry.frobenius_optimal_gamma`'s NNLS
    solution; otherwise a ``ValueError`` says so (use the NNLS version).
    """
    W = _sympy_matrix(W_p, "W_p")
    rows = [W.row(i) for i in range(W.rows)]
    A = sp.Matrix(len(rows), len(rows), lambda i, j: sp.simplify((rows[i] * rows[j].T)[0] ** 2))
    rhs = sp.Matrix([sp.simplify((r * r.T)[0]) for r in rows])
    if A.det() == 0:
        raise ValueError("the rank-one matrices r_i r_iᵀ of W_p's rows are linearly dependent: the "
                         "Frobenius-optimal weights are not unique")
    g = A.LUsolve(rhs).applyfunc(sp.simplify)
    if any(not (v > 0) for v in g):
        raise ValueError(f"the unconstrained optimum has non-positive squared weights {list(g)}; "
                         "use geometry.frobenius_optimal_gamma (non-negative least squares)")
    return [sp.sqrt(v) for v in g]


# --------------------------------------------------------------------------------------------
# Exact integration over polytopes {u : A u <= b}
# --------------------------------------------------------------------------------------------

def _solve_exact(A: list[list[Fraction]], b: list[Fraction]) -> list[Fraction]:
    """Gauss-Jordan elimination in exact rational arithmetic (A square, non-singular)."""
    d = len(A)
    M = [list(A[i]) + [b[i]] for i in range(d)]
    for col in range(d):
        piv = next(r for r in range(col, d) if M[r][col] != 0)
        M[col], M[piv] = M[piv], M[col]
        p = M[col][col]
        M[col] = [v / p for v in M[col]]
        for r in range(d):
            if r != col and M[r][col] != 0:
                f = M[r][col]
                M[r] = [a - f * bb for a, bb in zip(M[r], M[col])]
    return [M[i][d] for i in range(d)]


def _det(M: list[list[Any]]) -> Any:
    """Determinant: exact elimination for Fractions, LU with pivoting (NumPy) for floats."""
    if not isinstance(M[0][0], Fraction):
        return float(np.linalg.det(np.array(M, dtype=float)))
    M = [list(r) for r in M]
    d, det = len(M), 1
    for col in range(d):
        piv = next((r for r in range(col, d) if M[r][col] != 0), None)
        if piv is None:
            return 0
        if piv != col:
            M[col], M[piv] = M[piv], M[col]
            det = -det
        det = det * M[col][col]
        for r in range(col + 1, d):
            f = M[r][col] / M[col][col]
            if f != 0:
                M[r] = [a - f * bb for a, bb in zip(M[r], M[col])]
    return det


class Moments(NamedTuple):
    vol: Any
    m1: list
    """``∫ u du`` over the region, length d."""
    m2: list
    """``∫ u uᵀ du``, d x d."""


def _polytope_moments(A: list[list[Any]], b: list[Any], exact: bool) -> Moments | None:
    """Volume, first and second moments of the bounded polytope ``{u in R^d : A u <= b}``.

    Vertices are found in floating point (every d-subset of constraints), then recomputed
    exactly from their tight constraints when ``exact``; the polytope is triangulated (Qhull
    Delaunay) and integrated simplex by simplex. Returns None for an empty or flat region.
    """
    from scipy.spatial import ConvexHull, QhullError

    d = len(A[0])
    Af, bf = np.array(A, dtype=float), np.array(b, dtype=float)
    combos = np.array(list(itertools.combinations(range(len(A)), d)))
    M = Af[combos]
    det = np.linalg.det(M)
    ok = np.abs(det) > 1e-10
    if not ok.any():
        return None
    combos, M = combos[ok], M[ok]
    sol = np.linalg.solve(M, bf[combos][..., None])[..., 0]
    feas = np.all(sol @ Af.T <= bf + 1e-9, axis=1)
    if feas.sum() < d + 1:
        return None
    pts, combos = sol[feas], combos[feas]
    _, keep = np.unique(np.round(pts, 8), axis=0, return_index=True)
    pts, combos = pts[keep], combos[keep]
    if len(pts) < d + 1 or np.linalg.matrix_rank(pts[1:] - pts[0], tol=1e-9) < d:
        return None
    if exact:
        verts = [_solve_exact([A[i] for i in cmb], [b[i] for i in cmb]) for cmb in combos]
    else:
        verts = [list(p) for p in pts]
    if d == 1:
        simplices = [[int(np.argmin(pts[:, 0])), int(np.argmax(pts[:, 0]))]]
    else:
        # Cone the triangulated boundary facets from the vertex centroid (appended as the last
        # vertex): a triangulation of a convex polytope that does not depend on Delaunay's
        # handling of co-spherical points (the unit cube's vertices are all co-spherical).
        try:
            facets = ConvexHull(pts, qhull_options="Qt").simplices.tolist()
        except QhullError:  # pragma: no cover - flat regions are caught by the rank test
            return None
        k = len(verts)
        centre = [sum(v[j] for v in verts) / k for j in range(d)]
        verts = verts + [centre]
        simplices = [f + [k] for f in facets]
    zero = Fraction(0) if exact else 0.0
    vol, m1 = zero, [zero] * d
    m2 = [[zero] * d for _ in range(d)]
    fact = math.factorial(d)
    for simp in simplices:
        V = [verts[i] for i in simp]
        tv = abs(_det([[V[k][j] - V[0][j] for j in range(d)] for k in range(1, d + 1)])) / fact
        if tv == 0:
            continue
        s = [sum(V[k][j] for k in range(d + 1)) for j in range(d)]
        vol += tv
        m1 = [m1[j] + tv * s[j] / (d + 1) for j in range(d)]
        w = tv / ((d + 1) * (d + 2))
        for i in range(d):
            for j in range(d):
                m2[i][j] += w * (sum(V[k][i] * V[k][j] for k in range(d + 1)) + s[i] * s[j])
    return Moments(vol, m1, m2)


def _to_numbers(M: Any) -> tuple[list[list[Any]], bool]:
    """A SymPy/array matrix as nested lists of Fractions when every entry is rational, else floats."""
    E = sp.Matrix(M).applyfunc(sp.simplify)
    if all(v.is_Rational for v in E):
        return [[Fraction(int(v.p), int(v.q)) for v in E.row(i)] for i in range(E.rows)], True
    # Floating point: round-off below 1e-12 is an exact zero (e.g. cos(pi/2) of a rotation).
    return [[0.0 if abs(float(v)) < 1e-12 else float(v) for v in E.row(i)] for i in range(E.rows)], False


def _region_constraints(H: list[list[Any]], active: tuple[int, ...], signs: dict[int, int], extra=()):
    """Constraints on the active values ``u_A``: ``0 <= u <= 1``, ``sign_j * (H u)_j >= 0``."""
    d = len(active)
    one, zero = (Fraction(1), Fraction(0)) if isinstance(H[0][0], Fraction) else (1.0, 0.0)
    A, b = [], []
    for k in range(d):
        row = [zero] * d
        row[k] = one
        A.append(row), b.append(one)
        A.append([-v for v in row]), b.append(zero)
    for j, sgn in signs.items():
        A.append([-sgn * H[j][i] for i in active]), b.append(zero)
    for row in extra:
        A.append(list(row)), b.append(zero)
    return A, b


def _per_feature_config(W_p: Any, V: Any, values: str):
    """Validated ``(W_p, V, n_p, n)`` for the per-feature exact statistics (``n <= 6``; ``V``
    defaults to ``W_pᵀ`` and must have shape ``(n, n_p)``)."""
    _check_values(values)
    Wp = _sympy_matrix(W_p, "W_p")
    n_p, n = Wp.shape
    if n > 6:
        raise ValueError(f"n must be <= 6, got n = {n}")
    Vm = Wp.T if V is None else _sympy_matrix(V, "V")
    if Vm.shape != (n, n_p):
        raise ValueError(f"V must have shape (n, n_p) = ({n}, {n_p}), got {Vm.shape}")
    return Wp, Vm, n_p, n


def _check_values(values: str) -> None:
    if values not in ("uniform", "constant"):
        raise ValueError(f"values must be 'uniform' or 'constant', got {values!r}")


@functools.lru_cache(maxsize=None)
def _pattern_table(Hkey: tuple, exact: bool, values: str, n: int):
    """For every active set A and sign pattern P: (A, P, vol, m1, m2) with m1, m2 of length n."""
    H = [list(r) for r in Hkey]
    n_m = len(H)
    zero = Fraction(0) if exact else 0.0
    table = []
    for size in range(1, n + 1):
        for active in itertools.combinations(range(n), size):
            total = zero
            live = [j for j in range(n_m) if any(H[j][i] != 0 for i in active)]
            if values == "constant":
                h = [sum(H[j][i] for i in active) for j in range(n_m)]
                P = tuple(j for j in range(n_m) if h[j] > 0)
                one = [(Fraction(1) if exact else 1.0) if i in active else zero for i in range(n)]
                table.append((active, P, Fraction(1) if exact else 1.0, one,
                              [[a * bb for bb in one] for a in one]))
                continue
            for bits in itertools.product((1, -1), repeat=len(live)):
                signs = dict(zip(live, bits))
                A, b = _region_constraints(H, active, signs)
                mom = _polytope_moments(A, b, exact)
                if mom is None:
                    continue
                total += mom.vol
                m1 = [zero] * n
                m2 = [[zero] * n for _ in range(n)]
                for a, i in enumerate(active):
                    m1[i] = mom.m1[a]
                    for bb, j in enumerate(active):
                        m2[i][j] = mom.m2[a][bb]
                P = tuple(j for j in live if signs[j] > 0)
                table.append((active, P, mom.vol, m1, m2))
            if (exact and total != 1) or (not exact and abs(total - 1) > 1e-9):
                raise RuntimeError(f"internal error: sign regions of active set {active} cover volume {total}, not 1")
    return table


def _mat(M: list[list[Any]]) -> np.ndarray:
    return np.array(M, dtype=object)


def _number(v: Any) -> sp.Expr:
    return sp.Rational(v.numerator, v.denominator) if isinstance(v, Fraction) else sp.Float(v, 15)


def _check_S(S_value: Any) -> Any:
    if S_value is None:
        return S
    if isinstance(S_value, sp.Basic) and not S_value.is_number:
        return S_value
    v = sp.nsimplify(S_value) if isinstance(S_value, float) else sp.sympify(S_value)
    if not (v.is_real and v.is_finite) or not (0 <= v < 1):
        raise ValueError(f"S must be in [0, 1), got {S_value!r}")
    return v


def _check_c(c_value: Any) -> Any:
    if c_value is None:
        return c
    if isinstance(c_value, sp.Basic) and not c_value.is_number:
        if c_value.is_positive is not True:
            raise ValueError(f"a symbolic scale c must be declared positive, got {c_value}")
        return c_value
    v = sp.nsimplify(c_value) if isinstance(c_value, float) else sp.sympify(c_value)
    if not (v.is_real and v.is_finite) or not v > 0:
        raise ValueError(f"c must be finite and positive (the sign regions assume c > 0), got {c_value!r}")
    return v


class ExpectedLosses(NamedTuple):
    """Exact expectations (SymPy expressions in S and c unless numbers were given)."""

    sae: sp.Expr
    """E[L_SAE] = E||x_p - W_mᵀ relu(W_m x_p)||² for W_m = c V."""
    gt: sp.Expr
    """E[L_GT] = E||x - relu(W_m W_p x)||², latent i matched to feature i (zero padding)."""


def expected_losses(W_p: Any, V: Any = None, *, S_value: Any = None, c_value: Any = None,
                    values: Values = "uniform", gamma: Any = None) -> ExpectedLosses:
    """Exact E[L_SAE] and E[L_GT] for one small configuration and the encoder ``W_m = c V``.

    ``W_p``: ``(n_p, n)`` with ``n <= 6`` (use :func:`expected_losses_blocks` for larger
    block-diagonal mixtures); ``V``: ``(n_m, n_p)``, default ``W_pᵀ`` (Theorem 1's closed form).
    ``S_value``/``c_value``: numbers to substitute, or None to keep the symbols :data:`S`, :data:`c`.
    Exact rationals when ``W_pᵀW_p``, ``V W_p`` and ``V Vᵀ`` are rational, floats otherwise.

    With ``G = W_pᵀW_p``, ``H = V W_p``, ``K = V Vᵀ`` and ``P`` the diagonal 0/1 matrix of
    positive latents, per sample (values u):
    ``L_SAE = uᵀGu - 2c² uᵀHᵀPHu + c⁴ uᵀHᵀPKPHu`` and ``L_GT = uᵀu - 2c uᵀEPHu + c² uᵀHᵀPHu``
    (E the ``(n, n_m)`` identity-padding matching).

    ``gamma`` (``n_p`` positive numbers) gives the WSAE loss ``E||Γ(x_p - W_mᵀx_m)||²`` (Theorem 5)
    in place of L_SAE: G, the cross term ``Hᵀ P H`` and K are then taken with Γ² in the middle
    (``W_pᵀΓ²W_p``, ``W_pᵀΓ²Vᵀ P V W_p``, ``VΓ²Vᵀ``); the sign regions do not change.
    """
    _check_values(values)
    Wp = _sympy_matrix(W_p, "W_p")
    n_p, n = Wp.shape
    if n > 6:
        raise ValueError(f"expected_losses enumerates 2^n active sets; n must be <= 6, got n = {n} "
                         "(split a block-diagonal W_p with expected_losses_blocks)")
    Vm = Wp.T if V is None else _sympy_matrix(V, "V")
    if Vm.shape[1] != n_p:
        raise ValueError(f"V must have n_p = {n_p} columns, got shape {Vm.shape}")
    if Vm.shape[0] > 8:
        raise ValueError(f"V may have at most 8 rows (latents) here, got {Vm.shape[0]}")
    S_, c_ = _check_S(S_value), _check_c(c_value)
    G2 = sp.eye(n_p) if gamma is None else sp.diag(*[g**2 for g in _check_gamma_symbolic(gamma, n_p)])
    if any(not v.is_number for v in G2):
        raise ValueError("gamma must be numbers in expected_losses (symbolic weights: use gap_matrix)")
    mats = [_to_numbers(M) for M in (Wp.T * G2 * Wp, Vm * Wp, Vm * G2 * Vm.T, Vm * G2 * Wp)]
    exact = all(e for _, e in mats)
    G, H, K, Hg = (M if exact else [[float(v) for v in r] for r in M] for M, _ in mats)
    if not any(any(v != 0 for v in r) for r in H):
        raise ValueError("V W_p is zero: no latent ever fires")
    table = _pattern_table(tuple(tuple(r) for r in H), exact, values, n)
    sae_terms, gt_terms = _loss_coefficients(table, G, H, K, Hg, n, exact)
    return ExpectedLosses(_assemble(sae_terms, n, S_, c_, (0, 2, 4)),
                          _assemble(gt_terms, n, S_, c_, (0, 1, 2)))


def _loss_coefficients(table, G, H, K, Hg, n, exact):
    """Per active-set size, coefficients of c^0, c^2, c^4 (SAE) and c^0, c^1, c^2 (GT).

    ``Hg = V Γ² W_p`` is the SAE cross term's matrix (equal to H without weights)."""
    n_m = len(H)
    zero = Fraction(0) if exact else 0.0
    sae = {m: [zero] * 3 for m in range(n + 1)}
    gt = {m: [zero] * 3 for m in range(n + 1)}
    Gn, Hn, Kn, Hgn = _mat(G), _mat(H), _mat(K), _mat(Hg)
    Emat = np.array([[Fraction(int(i == j)) if exact else float(i == j) for j in range(n_m)] for i in range(n)], dtype=object)
    for active, P, vol, m1, m2 in table:
        M2 = _mat(m2)
        Pm = np.array([[(Fraction(1) if exact else 1.0) if (i == j and i in P) else zero for j in range(n_m)]
                       for i in range(n_m)], dtype=object)
        PH = Pm.dot(Hn)
        HPH = Hn.T.dot(PH)
        m = len(active)
        tr = lambda X: sum(X[i, j] * M2[j, i] for i in range(n) for j in range(n))
        sae[m][0] += tr(Gn)
        sae[m][1] += -2 * tr(Hgn.T.dot(PH))
        sae[m][2] += tr(PH.T.dot(Kn).dot(PH))
        gt[m][0] += sum(M2[i, i] for i in range(n))
        gt[m][1] += -2 * tr(Emat.dot(PH))
        gt[m][2] += tr(HPH)
    return sae, gt


def _assemble(terms, n, S_, c_, powers):
    """Σ_m C(n,m)-weighted ... : terms[m] already summed over active sets of size m."""
    out = sp.Integer(0)
    for m, coef in terms.items():
        if m == 0:
            continue
        poly = sum(_number(a) * c_**p for a, p in zip(coef, powers))
        out += (1 - S_) ** m * S_ ** (n - m) * poly
    return sp.expand(out)


def expected_losses_blocks(blocks: Sequence[int], *, S_value: Any = None, c_value: Any = None,
                           values: Values = "uniform") -> ExpectedLosses:
    """Exact E[L_SAE], E[L_GT] at ``W_m = c W_pᵀ`` for ``W_p = superposition_matrix(blocks)``.

    The groups live in mutually orthogonal subspaces and ``W_pᵀ`` is block diagonal, so each
    loss is the sum of the groups' losses (the features of different groups are independent).
    Group sizes up to 6 are supported (a regular pentagon gives float coefficients).
    """
    sizes = geometry._validate_blocks(blocks)
    if max(sizes) > 6:
        raise ValueError(f"block sizes up to 6 are supported for exact losses, got {max(sizes)} in {list(blocks)}")
    total_sae, total_gt = sp.Integer(0), sp.Integer(0)
    for k in sizes:
        r = _block_losses(k, values)
        total_sae += r.sae
        total_gt += r.gt
    subs = {S: _check_S(S_value), c: _check_c(c_value)}
    return ExpectedLosses(sp.expand(total_sae.subs(subs)), sp.expand(total_gt.subs(subs)))


@functools.lru_cache(maxsize=None)
def _block_losses(k: int, values: str) -> ExpectedLosses:
    return expected_losses(geometry.superposition_matrix([k], exact=True), values=values)


def optimal_scale(losses_sae: sp.Expr) -> sp.Expr:
    """The scale ``c* > 0`` minimising E[L_SAE](c) = a - 2b c² + d c⁴: ``c*² = b / d`` (Theorem 1).

    Returns a SymPy expression in S (or a number). Raises when the loss is not of that form.
    """
    poly = sp.Poly(sp.expand(losses_sae), c)
    if poly.degree() != 4 or poly.coeff_monomial(c) != 0 or poly.coeff_monomial(c**3) != 0:
        raise ValueError(f"expected a polynomial a - 2 b c^2 + d c^4 in c, got {losses_sae}")
    b, d = -poly.coeff_monomial(c**2) / 2, poly.coeff_monomial(c**4)
    return sp.sqrt(sp.factor(b / d))


# --------------------------------------------------------------------------------------------
# Per-feature recovery: shrinking, vanishing, top-feature changes
# --------------------------------------------------------------------------------------------

class FeatureRecovery(NamedTuple):
    """Exact per-feature statistics at ``W_m = c V`` (SymPy expressions in S, or numbers)."""

    mean_recovered: list
    """E[x_m,j | x_j > 0] for each feature j."""
    shrink_ratio: list
    """E[x_m,j | x_j > 0] / E[x_j | x_j > 0]: 1 means no shrinking on average."""
    vanish_prob: list
    """P(x_m,j = 0 | x_j > 0): the feature is active but its latent is silent."""


def feature_recovery(W_p: Any, V: Any = None, *, S_value: Any = None, c_value: Any = 1,
                     values: Values = "uniform") -> FeatureRecovery:
    """Exact shrinking and vanishing statistics of each feature (chapter *Shrinking and vanishing*).

    ``W_p``: ``(n_p, n)``, ``n <= 6``; ``V`` ``(n, n_p)`` (default ``W_pᵀ``), latent j matched to
    feature j. Conditioning on ``x_j > 0``, feature j is active and each other feature is active
    with probability ``1 - S``.
    """
    Wp, Vm, n_p, n = _per_feature_config(W_p, V, values)
    S_, c_ = _check_S(S_value), _check_c(c_value)
    H, exact = _to_numbers(Vm * Wp)
    if not exact:
        H = [[float(v) for v in r] for r in H]
    means, vanish = [], []
    for j in range(n):
        mean_j, van_j = sp.Integer(0), sp.Integer(0)
        others = [i for i in range(n) if i != j]
        for size in range(n):
            for rest in itertools.combinations(others, size):
                active = tuple(sorted((j,) + rest))
                prob = (1 - S_) ** size * S_ ** (n - 1 - size)
                mpos, vneg = _latent_moments(H, active, j, exact, values)
                mean_j += prob * _number(mpos)
                van_j += prob * _number(vneg)
        means.append(sp.expand(c_ * mean_j))
        vanish.append(sp.expand(van_j))
    half = sp.Rational(1, 2) if values == "uniform" else sp.Integer(1)
    return FeatureRecovery(means, [sp.expand(m / half) for m in means], vanish)


def _latent_moments(H, active, j, exact, values):
    """(∫ (H u)_j over {(Hu)_j > 0}, volume of {(Hu)_j <= 0}) for the active set."""
    zero = Fraction(0) if exact else 0.0
    if values == "constant":
        h = sum(H[j][i] for i in active)
        return (h, zero) if h > 0 else (zero, Fraction(1) if exact else 1.0)
    if all(H[j][i] == 0 for i in active):
        return zero, (Fraction(1) if exact else 1.0)
    A, b = _region_constraints(H, active, {j: 1})
    pos = _polytope_moments(A, b, exact)
    mpos = zero if pos is None else sum(H[j][i] * pos.m1[a] for a, i in enumerate(active))
    vol_pos = zero if pos is None else pos.vol
    return mpos, 1 - vol_pos


def top_change_probability(W_p: Any, V: Any = None, *, S_value: Any = None,
                           values: Values = "uniform") -> sp.Expr:
    """P(argmax x_m != argmax x | x != 0) at ``W_m = V`` (default ``W_pᵀ``), exactly.

    ``W_p``: ``(n_p, n)``, ``n <= 6``; latent j matched to feature j. A sample whose latents are
    all zero counts as changed (it has no top latent). For the constant value distribution ties
    are broken towards the lower index.
    """
    Wp, Vm, n_p, n = _per_feature_config(W_p, V, values)
    S_ = _check_S(S_value)
    H, exact = _to_numbers(Vm * Wp)
    if not exact:
        H = [[float(v) for v in r] for r in H]
    out = sp.Integer(0)
    for size in range(1, n + 1):
        prob = (1 - S_) ** size * S_ ** (n - size)
        for active in itertools.combinations(range(n), size):
            out += prob * _number(_changed_volume(H, active, exact, values))
    return sp.expand(out / (1 - S_**n))


def _changed_volume(H, active, exact, values):
    n = len(H)
    one, zero = (Fraction(1), Fraction(0)) if exact else (1.0, 0.0)
    if values == "constant":
        h = [sum(H[j][i] for i in active) for j in range(n)]
        top = max(range(n), key=lambda j: (h[j], -j))
        return zero if h[top] > 0 and top == active[0] else one
    d = len(active)
    unchanged = zero
    for ia, a in enumerate(active):
        # u_a >= u_i for the other active i; h_a >= h_j for all j; h_a >= 0.
        extra = []
        for ib in range(d):
            if ib != ia:
                row = [zero] * d
                row[ib], row[ia] = one, -one
                extra.append(row)
        for j in range(n):
            if j != a:
                extra.append([H[j][i] - H[a][i] for i in active])
        A, b = _region_constraints(H, active, {a: 1}, extra)
        mom = _polytope_moments(A, b, exact)
        if mom is not None:
            unchanged += mom.vol
    return 1 - unchanged


def mc_estimate(samples: Any) -> tuple[float, float]:
    """Monte-Carlo mean and its standard error ``std / sqrt(N)`` of a 1-D sample ``(N,)``."""
    a = np.asarray(samples, dtype=float).ravel()
    if a.size < 2:
        raise ValueError(f"need at least 2 samples for a standard error, got {a.size}")
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(a.size))


def value_moments(values: Values = "uniform") -> tuple[sp.Expr, sp.Expr]:
    """``(E[u], E[u²])`` of an active feature's value: (1/2, 1/3) for Uniform[0, 1], (1, 1) for 1."""
    _check_values(values)
    return (sp.Rational(1, 2), sp.Rational(1, 3)) if values == "uniform" else (sp.Integer(1), sp.Integer(1))


def variance_proxy(W_p: Any, *, S_value: Any = None, values: Values = "uniform") -> list[sp.Expr]:
    """Exact ``s_i = Var(x_p,i)``, the WSAE's practical monosemanticity proxy, shape ``(n_p,)``.

    The features are independent with a common variance ``v(S) = (1-S)E[u²] - (1-S)²E[u]²``, so
    ``s_i = v(S) ||r_i||²`` with ``r_i`` the i-th row of W_p (chapter *The gap*).
    """
    W = _sympy_matrix(W_p, "W_p")
    S_ = _check_S(S_value)
    m1, m2 = value_moments(values)
    v = (1 - S_) * m2 - (1 - S_) ** 2 * m1**2
    return [sp.factor(sp.simplify(v * (W.row(i) * W.row(i).T)[0])) for i in range(W.rows)]


def common_scale_optimum(blocks: Sequence[int], block_weights: Sequence[Any], *, S_value: Any = None,
                         values: Values = "uniform") -> tuple[sp.Expr, sp.Expr]:
    """One scale ``c`` shared by all groups: the WSAE optimum ``c*`` and E[L_GT] there.

    ``W_m = c W_pᵀ`` with ``W_p = superposition_matrix(blocks)`` and Γ equal to
    ``block_weights[b]`` on every dimension of group b, so that
    ``E[L_WSAE](c) = Σ_b γ_b² E[L_SAE,b](c)``. Returns ``(c*, E[L_GT](c*))`` (chapter *The gap*:
    reweighting moves the optimum only through parameters the groups share).
    """
    sizes = geometry._validate_blocks(blocks)
    if len(block_weights) != len(sizes):
        raise ValueError(f"block_weights must have one weight per block ({len(sizes)}), got {len(block_weights)}")
    w = _check_gamma_symbolic(block_weights, len(sizes))
    S_ = _check_S(S_value)
    L_w, L_gt = sp.Integer(0), sp.Integer(0)
    for k, g in zip(sizes, w):
        r = _block_losses(k, values)
        L_w += g**2 * r.sae
        L_gt += r.gt
    L_w, L_gt = sp.expand(L_w.subs(S, S_)), sp.expand(L_gt.subs(S, S_))
    # Each group's c⁴ coefficient is E||W_p P W_pᵀ x_p||² (P the firing latents at c = 1), positive
    # because some latent fires whenever x != 0: L_w is always the quartic that optimal_scale solves.
    c_star = optimal_scale(L_w)
    return c_star, sp.simplify(L_gt.subs(c, c_star))


def reconstructs_exactly(W_p: Any, W_m: Any = None) -> bool:
    """True when the tied ReLU SAE reconstructs every superposed input exactly:
    ``W_mᵀ relu(W_m W_p x) = W_p x`` for all ``x >= 0``.

    ``W_p``: ``(n_p, n)``; ``W_m``: ``(n_m, n_p)``, default ``W_pᵀ`` (Theorem 1's closed form);
    SymPy (exact) or arrays. On each region of x where the sign pattern P of ``W_m W_p x`` is fixed
    the map is linear, so the identity holds iff ``W_mᵀ P W_m W_p = W_p`` for every pattern
    realised on a region of positive volume. Patterns are grown latent by latent (``n_m <= 12``),
    a prefix kept only if a linear program finds a region realising it; the identity is checked
    exactly in SymPy. Exact reconstruction makes L_SAE = 0, so W_m is then optimal for every value
    distribution (chapter *The closed form*).
    """
    from scipy.optimize import linprog

    Wp = _sympy_matrix(W_p, "W_p")
    n_p, n = Wp.shape
    M = Wp.T if W_m is None else _sympy_matrix(W_m, "W_m")
    if M.shape[1] != n_p:
        raise ValueError(f"W_m must have n_p = {n_p} columns, got shape {M.shape}")
    n_m = M.shape[0]
    if n_m > 12:
        raise ValueError(f"W_m may have at most 12 rows here (2^n_m sign patterns), got {n_m}")
    H = M * Wp
    Hf = np.array(H.evalf(), dtype=float)
    live = [j for j in range(n_m) if np.any(np.abs(Hf[j]) > 1e-12)]

    def realised(rows: list[int], signs: list[int]) -> bool:
        # maximise t subject to sign_j (H x)_j >= t and t <= x_i <= 1 - t: a region of positive
        # volume exists iff t* > 0
        sg = np.array(signs, dtype=float)[:, None]
        A_ub = np.vstack([np.hstack([-(sg * Hf[rows]), np.ones((len(rows), 1))]),
                          np.hstack([-np.eye(n), np.ones((n, 1))]), np.hstack([np.eye(n), np.ones((n, 1))])])
        b_ub = np.r_[np.zeros(len(rows)), np.zeros(n), np.ones(n)]
        res = linprog(np.r_[np.zeros(n), -1.0], A_ub=A_ub, b_ub=b_ub, bounds=[(None, None)] * (n + 1), method="highs")
        return res.status == 0 and -res.fun > 1e-9

    # Grow sign patterns latent by latent, dropping prefixes no region realises.
    patterns: list[list[int]] = [[]]
    for k in range(len(live)):
        patterns = [p + [sg] for p in patterns for sg in (1, -1) if realised(live[: k + 1], p + [sg])]
    for signs in patterns:
        P = sp.diag(*[1 if (j in live and signs[live.index(j)] > 0) else 0 for j in range(n_m)])
        if (M.T * P * H - Wp).applyfunc(sp.simplify) != sp.zeros(n_p, n):
            return False
    return True


class OneSparseLimit(NamedTuple):
    """Extreme-sparsity limits ``lim_{S->1} E[L]/(1-S)`` (Theorems 2 and 3), exact SymPy numbers."""

    sae: sp.Expr
    """Σ_i E[u²] ||w_i - W_mᵀ σ(W_m w_i)||²: zero iff every 1-sparse x_p is reconstructed."""
    gt: sp.Expr
    """Σ_i E[u²] ||e_i - σ(W_m w_i)||²: zero iff every 1-sparse x is recovered (x_m = x)."""
    max_active: int
    """The largest number of latents a 1-sparse input activates (1 = sparse activation)."""


def one_sparse_limit(W_p: Any, W_m: Any = None, *, activation: Literal["relu", "linear"] = "relu",
                     values: Values = "uniform") -> OneSparseLimit:
    """The S -> 1 limit of the expected losses divided by ``1 - S`` (chapter *Extreme sparsity*).

    As S -> 1 a sample has one active feature with probability ``n(1-S) + O((1-S)^2)``, two or
    more with ``O((1-S)^2)``, so ``E[L] = (1-S) Σ_i E[ℓ(u e_i)] + O((1-S)^2)``; every loss is
    homogeneous of degree 2 in ``u``. ``W_p``: ``(n_p, n)``; ``W_m``: ``(n_m, n_p)``, default
    ``W_pᵀ``; latent i is matched to feature i (zero padding). ``activation="linear"`` drops
    the ReLU (an SAE without sparse activation).
    """
    _check_values(values)
    if activation not in ("relu", "linear"):
        raise ValueError(f"activation must be 'relu' or 'linear', got {activation!r}")
    Wp = _sympy_matrix(W_p, "W_p")
    n_p, n = Wp.shape
    M = Wp.T if W_m is None else _sympy_matrix(W_m, "W_m")
    if M.shape[1] != n_p:
        raise ValueError(f"W_m must have n_p = {n_p} columns, got shape {M.shape}")
    n_m, N = M.shape[0], max(n, M.shape[0])
    act = (lambda z: sp.Max(z, 0)) if activation == "relu" else (lambda z: z)
    m2 = value_moments(values)[1]
    sae = gt = sp.Integer(0)
    most = 0
    for i in range(n):
        w = Wp.col(i)
        z = (M * w).applyfunc(sp.simplify)
        x_m = z.applyfunc(act)
        r = w - M.T * x_m
        e = sp.Matrix([1 if j == i else 0 for j in range(N)]) - x_m.col_join(sp.zeros(N - n_m, 1))
        sae += (r.T * r)[0]
        gt += (e.T * e)[0]
        most = max(most, sum(1 for v in x_m if v != 0))
    return OneSparseLimit(sp.nsimplify(sp.simplify(m2 * sae)), sp.nsimplify(sp.simplify(m2 * gt)), most)
