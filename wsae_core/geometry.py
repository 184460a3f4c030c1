"""Geometry of superposition: W_p, interference, the Theorem 1 closed form, recovery and "~".

Conventions (book chapter *Superposition and the sparse model*):

* ground truth ``x`` has shape ``(n,)`` or ``(batch, n)``;
* the superposition matrix ``W_p`` has shape ``(n_p, n)`` and unit-norm columns, so
  ``x_p = W_p @ x`` has shape ``(n_p,)``;
* the theory SAE's encoder ``W_m`` has shape ``(n_m, n_p)``; its latent is
  ``x_m = relu(W_m @ x_p)`` and its (tied) reconstruction is ``W_m.T @ x_m``.

Functions accept NumPy arrays (or anything ``numpy.asarray`` takes); :func:`closed_form_sae` and
:func:`interference` also accept SymPy matrices and then return exact SymPy matrices.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "superposition_matrix",
    "block_slices",
    "random_nonpositive_superposition",
    "interference",
    "has_nonpositive_interference",
    "closed_form_sae",
    "recover",
    "stable_assignment",
    "match_rows",
    "equivalent",
    "frobenius_optimal_gamma",
    "check_gamma",
    "rotation",
    "theory_losses",
    "fit_theory_sae",
    "frobenius_gap",
    "rotate_rows",
]


def _validate_blocks(blocks: Sequence[int]) -> list[int]:
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence):
        raise ValueError(f"blocks must be a sequence of positive group sizes, got {blocks!r}")
    if len(blocks) == 0:
        raise ValueError("blocks must list at least one group size, got an empty sequence []")
    sizes = []
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, Integral):
            raise ValueError(f"every block size must be a positive integer, got {b!r} in {list(blocks)!r}")
        if b <= 0:
            raise ValueError(f"every block size must be a positive integer (1, 2, 3, ...), got {b} in {list(blocks)!r}")
        sizes.append(int(b))
    return sizes


def _block_dim(size: int) -> int:
    """Dimensions a group occupies: 1 for a monosemantic unit or a digon, 2 for a k-gon (k >= 3)."""
    return 1 if size <= 2 else 2


def block_slices(blocks: Sequence[int]) -> list[tuple[slice, slice]]:
    """For each group, ``(rows, columns)`` of W_p that it occupies (rows = dimensions of x_p)."""
    sizes = _validate_blocks(blocks)
    out, r, c = [], 0, 0
    for k in sizes:
        d = _block_dim(k)
        out.append((slice(r, r + d), slice(c, c + k)))
        r, c = r + d, c + k
    return out


def superposition_matrix(blocks: Sequence[int], exact: bool = False) -> Any:
    """The superposition matrix W_p of shape ``(n_p, n)`` built from groups of features.

    ``blocks`` lists group sizes, each group in its own dimensions, orthogonal to the others:

    * ``1``: a monosemantic dimension (one feature on its own axis);
    * ``2``: a digon, features ``w`` and ``-w`` sharing one dimension;
    * ``k >= 3``: a regular k-gon in a 2-D plane, feature ``j`` at
      ``(sin(2 pi j / k), cos(2 pi j / k))``, so the triangle is the paper's
      ``[[0, sqrt(3)/2, -sqrt(3)/2], [1, -1/2, -1/2]]``.

    Columns have unit norm; ``n = sum(blocks)`` and ``n_p`` = (number of groups of size <= 2)
    + 2 x (number of groups of size >= 3). ``exact=True`` returns a SymPy matrix with exact
    entries such as ``sqrt(3)/2``; otherwise a float64 NumPy array.

    >>> superposition_matrix([1, 2])
    array([[ 1.,  0.,  0.],
           [ 0.,  1., -1.]])
    """
    sizes = _validate_blocks(blocks)
    slices = block_slices(sizes)
    n_p = slices[-1][0].stop
    n = slices[-1][1].stop
    if exact:
        import sympy as sp

        W = sp.zeros(n_p, n)
        for k, (rows, cols) in zip(sizes, slices):
            for j in range(k):
                angle = 2 * sp.pi * j / k
                if k == 1:
                    W[rows.start, cols.start] = 1
                elif k == 2:
                    W[rows.start, cols.start + j] = sp.cos(angle)
                else:
                    W[rows.start, cols.start + j] = sp.sin(angle)
                    W[rows.start + 1, cols.start + j] = sp.cos(angle)
        return W
    W = np.zeros((n_p, n))
    for k, (rows, cols) in zip(sizes, slices):
        angles = 2 * np.pi * np.arange(k) / k
        if k <= 2:
            W[rows.start, cols] = np.round(np.cos(angles))
        else:
            W[rows.start, cols] = np.sin(angles)
            W[rows.start + 1, cols] = np.cos(angles)
    # cos/sin of multiples of pi/2 leave ~1e-17 residue where the exact value is 0.
    W[np.abs(W) < 1e-15] = 0.0
    return W


def random_nonpositive_superposition(n: int, n_p: int, seed: int | None = None) -> np.ndarray:
    """A random W_p of shape ``(n_p, n)`` with unit-norm columns and non-positive interference.

    At most ``2 * n_p`` unit vectors in R^{n_p} can have pairwise non-positive inner products,
    so ``n_p <= n <= 2 * n_p`` is required. Construction (chosen here; the paper does not say):
    start from one feature per dimension, then randomly turn single dimensions into digons
    (+1 feature) and pairs of dimensions into irregular 2-D groups of 3 or 4 features whose
    angular gaps are all at least 90 degrees (+1 or +2), and finally rotate everything by a
    Haar-random orthogonal matrix, which preserves every inner product. Columns are shuffled.
    """
    for name, v in (("n", n), ("n_p", n_p)):
        if isinstance(v, bool) or not isinstance(v, Integral) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not n_p <= n <= 2 * n_p:
        raise ValueError(
            f"need n_p <= n <= 2 * n_p for non-positive interference (at most 2 * n_p = {2 * n_p} "
            f"vectors in R^{n_p} have pairwise non-positive inner products), got n = {n}, n_p = {n_p}"
        )
    rng = np.random.default_rng(seed)
    extra = n - n_p
    free = list(rng.permutation(n_p))
    groups: list[tuple[list[int], int]] = []  # (dims, number of features)
    while extra > 0:
        # Keep extra <= len(free) after every step: a dimension adds at most one feature
        # (a digon), so otherwise the remaining dimensions could not absorb the extra features.
        options = ["digon"]
        if len(free) >= 2 and extra <= len(free) - 1:
            options.append("tri")
        if len(free) >= 2 and extra >= 2:
            options.append("quad")
        op = options[rng.integers(len(options))]
        if op == "digon":
            groups.append(([free.pop()], 2))
            extra -= 1
        else:
            k = 3 if op == "tri" else 4
            groups.append(([free.pop(), free.pop()], k))
            extra -= k - 2
    groups += [([d], 1) for d in free]
    cols = []
    for dims, k in groups:
        if k == 1:
            v = np.zeros(n_p)
            v[dims[0]] = 1.0
            cols.append(v)
        elif k == 2:
            for s in (1.0, -1.0):
                v = np.zeros(n_p)
                v[dims[0]] = s
                cols.append(v)
        else:
            # Gaps between consecutive angles: each in [pi/2, pi], summing to 2 pi. Four such
            # gaps must all equal pi/2 (a square, i.e. two orthogonal digons); three are drawn
            # by rejection (the accepted set has positive probability).
            if k == 4:
                gaps = np.full(3, np.pi / 2)
            else:
                while True:
                    gaps = rng.uniform(np.pi / 2, np.pi, size=k - 1)
                    last = 2 * np.pi - gaps.sum()
                    if np.pi / 2 <= last <= np.pi:
                        break
            angles = rng.uniform(0, 2 * np.pi) + np.concatenate([[0.0], np.cumsum(gaps)])
            for a in angles:
                v = np.zeros(n_p)
                v[dims[0]], v[dims[1]] = np.cos(a), np.sin(a)
                cols.append(v)
    W = np.stack(cols, axis=1)[:, rng.permutation(n)]
    q, r = np.linalg.qr(rng.standard_normal((n_p, n_p)))
    Q = q * np.sign(np.diag(r))  # Haar-distributed orthogonal matrix
    return Q @ W


def _is_sympy(M: Any) -> bool:
    return type(M).__module__.startswith("sympy")


def _as_matrix(W: Any, name: str) -> np.ndarray:
    A = np.asarray(W, dtype=float)
    if A.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got an array of shape {A.shape}")
    if not np.all(np.isfinite(A)):
        raise ValueError(f"{name} must have finite entries, got {A}")
    return A


def interference(W_p: Any) -> Any:
    """Interference between features: the Gram matrix W_pᵀW_p with a zero diagonal, ``(n, n)``.

    Entry ``(i, j)`` is ``w_iᵀ w_j``, the overlap of features i and j in x_p. A SymPy matrix in
    gives an exact SymPy matrix out.
    """
    if _is_sympy(W_p):
        import sympy as sp

        G = (W_p.T * W_p).applyfunc(sp.simplify)
        for i in range(G.shape[0]):
            G[i, i] = 0
        return G
    A = _as_matrix(W_p, "W_p")
    G = A.T @ A
    np.fill_diagonal(G, 0.0)
    return G


def has_nonpositive_interference(W_p: Any, tol: float = 1e-9) -> bool:
    """True when every off-diagonal ``w_iᵀ w_j <= tol`` (Theorem 2's condition)."""
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating, np.integer)) \
            or not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite non-negative number, got {tol!r}")
    G = np.asarray(interference(W_p), dtype=float)
    return bool(np.all(G <= tol))


def closed_form_sae(W_p: Any, n_m: int) -> Any:
    """Theorem 1's optimal theory-SAE encoder ``W_m* = I*(W_p, 0)ᵀ``, shape ``(n_m, n_p)``.

    Its first ``n`` rows are the columns of W_p (``W_pᵀ``), the remaining ``n_m - n`` rows are
    zero latents. Requires ``n_m >= n``. A SymPy W_p gives an exact SymPy matrix.
    """
    if isinstance(n_m, bool) or not isinstance(n_m, Integral):
        raise ValueError(f"n_m must be an integer, got {n_m!r}")
    if _is_sympy(W_p):
        import sympy as sp

        n_p, n = W_p.shape
        if n_m < n:
            raise ValueError(f"n_m must be >= n = {n} (one latent per feature), got n_m = {n_m}")
        return W_p.T.col_join(sp.zeros(n_m - n, n_p))
    A = _as_matrix(W_p, "W_p")
    n_p, n = A.shape
    if n_m < n:
        raise ValueError(f"n_m must be >= n = {n} (one latent per feature), got n_m = {n_m}")
    return np.vstack([A.T, np.zeros((n_m - n, n_p))])


def recover(W_m: Any, x_p: Any) -> np.ndarray:
    """The theory SAE's latent ``x_m = relu(W_m x_p)``.

    ``W_m``: ``(n_m, n_p)``; ``x_p``: ``(n_p,)`` or ``(batch, n_p)``; returns ``(n_m,)`` or
    ``(batch, n_m)``.
    """
    W = _as_matrix(W_m, "W_m")
    X = np.asarray(x_p, dtype=float)
    if X.ndim not in (1, 2) or X.shape[-1] != W.shape[1]:
        raise ValueError(
            f"x_p must have shape ({W.shape[1]},) or (batch, {W.shape[1]}) to match W_m of shape "
            f"{W.shape}, got {X.shape}"
        )
    if not np.all(np.isfinite(X)):
        raise ValueError("x_p must have finite entries, got a non-finite value")
    return np.maximum(X @ W.T, 0.0)


def stable_assignment(score: Any, maximize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian assignment (scipy's ``linear_sum_assignment``) that every CPU computes alike.

    ``score`` ``(rows, cols)``; returns ``(row_ind, col_ind)`` as scipy does. Scores are first
    rounded to 1e-9 of the largest ``|score|``: two CPUs whose matmul kernels round differently
    produce scores that differ in the last bits, and near-ties would otherwise resolve differently
    from one machine to the other. Exact ties that remain are resolved by scipy's algorithm, which
    is deterministic: identical input, identical assignment.
    """
    from scipy.optimize import linear_sum_assignment

    C = np.asarray(score, dtype=float)
    if C.ndim != 2 or not np.all(np.isfinite(C)):
        raise ValueError(f"score must be a finite 2-D matrix, got shape {C.shape}")
    scale = float(np.max(np.abs(C), initial=0.0))
    if scale > 0:
        C = np.round(C / scale, 9)
    return linear_sum_assignment(C, maximize=maximize)


def match_rows(A: Any, B: Any, stable: bool = True) -> np.ndarray:
    """The assignment of rows of ``B`` (n, ...) to rows of ``A`` (n_m, ...) that minimises the
    total squared difference (Hungarian algorithm). Returns ``perm`` with ``A[perm[i]] ~ B[i]``.

    The cost is signed: a row ``-w`` is at distance ``2||w||`` from ``w``, so a digon's ``w`` and
    ``-w`` are never confused (unlike a matching by ``|cosine|``). With ``stable`` near-ties are
    resolved alike on every CPU (:func:`stable_assignment`, which rounds the costs to 1e-9 of the
    largest); ``stable=False`` keeps full precision, for exact comparisons such as :func:`equivalent`.
    """
    a, b = _rows(A, "A"), _rows(B, "B")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"A and B must have rows of the same length, got {a.shape} and {b.shape}")
    if a.shape[0] < b.shape[0]:
        raise ValueError(f"A needs at least as many rows as B (zero padding), got {a.shape[0]} < {b.shape[0]}")
    cost = ((b[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    if stable:
        rows, cols = stable_assignment(cost)
    else:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(cost)
    perm = np.empty(b.shape[0], dtype=int)
    perm[rows] = cols
    return perm


def _rows(M: Any, name: str) -> np.ndarray:
    A = np.asarray(M, dtype=float)
    if A.ndim == 1:
        A = A[:, None]
    if A.ndim != 2:
        raise ValueError(f"{name} must be a vector or a matrix, got shape {A.shape}")
    return A


def equivalent(A: Any, B: Any, atol: float = 1e-9) -> bool:
    """The paper's "~": ``A`` equals ``B`` up to reordering and zero padding.

    The first axis indexes features/latents: ``A`` is ``(n_m, ...)``, ``B`` is ``(n, ...)`` with
    ``n_m >= n``. True when some injective assignment of B's rows to A's rows matches every row
    within ``atol`` and A's unassigned rows are zero. Use it on vectors (``x_m ~ x``), on
    encoders (``W_m ~ W_pᵀ``) or on batches transposed to ``(features, batch)`` so that one
    permutation must serve every sample.
    """
    a, b = _rows(A, "A"), _rows(B, "B")
    if a.shape[1] != b.shape[1] or a.shape[0] < b.shape[0]:
        return False
    # Full precision: rows that differ by less than the rounding of stable_assignment must still be
    # told apart, and any assignment within atol answers the question the same on every CPU.
    perm = match_rows(a, b, stable=False)
    if np.max(np.abs(a[perm] - b), initial=0.0) > atol:
        return False
    rest = np.setdiff1d(np.arange(a.shape[0]), perm)
    return bool(np.max(np.abs(a[rest]), initial=0.0) <= atol)


def frobenius_optimal_gamma(W_p: Any) -> np.ndarray:
    """The weights ``gamma`` (shape ``(n_p,)``) minimising ``||W_pᵀ Γ² W_p - I||_F``, Γ = diag(gamma).

    One explicit form of Theorem 5's weight-selection principle (chosen by this book; the paper
    states the principle, not a formula). ``W_pᵀΓ²W_p = sum_i g_i r_i r_iᵀ`` with ``r_i`` the rows
    of W_p and ``g = gamma²``, so ``||W_pᵀΓ²W_p - I||_F² = gᵀHg - 2bᵀg + n`` with
    ``H_ij = (r_i·r_j)²`` and ``b_i = ||r_i||²``: a non-negative quadratic programme of size n_p,
    whatever n is (so it also serves a learned dictionary of thousands of atoms). It is solved
    as the equivalent non-negative least squares ``min ||Ug - y||`` with ``H = UᵀU``, ``Uᵀy = b``
    (scipy's ``nnls``). For the monosemantic + digon example it gives ``(1, 1/sqrt(2))``; for the
    triangle ``sqrt(2/3)`` on both dimensions. Dimensions whose best weight is 0 get gamma = 0.
    """
    from scipy.optimize import nnls

    A = _as_matrix(W_p, "W_p")
    G = A @ A.T  # (n_p, n_p): r_i · r_j
    H, b = G * G, np.diag(G).copy()
    lam, V = np.linalg.eigh(H)
    keep = lam > lam.max(initial=0.0) * 1e-12
    if not keep.any():  # W_p = 0: every g gives ||-I||; g = 0
        return np.zeros(A.shape[0])
    # b lies in the range of H (b = Dᵀ vec(I) for the design D with H = DᵀD), so y is exact.
    U = np.sqrt(lam[keep])[:, None] * V[:, keep].T
    y = (V[:, keep].T @ b) / np.sqrt(lam[keep])
    g, _ = nnls(U, y, maxiter=50 * A.shape[0])
    return np.sqrt(g)


def check_gamma(gamma: Any, n_p: int) -> np.ndarray:
    """Validate WSAE weights ``gamma`` (Theorem 5's Γ = diag(gamma)): shape ``(n_p,)``, finite, > 0."""
    g = np.asarray(gamma, dtype=float)
    if g.ndim != 1 or g.shape[0] != n_p:
        raise ValueError(f"gamma must have shape ({n_p},) (one weight per dimension of x_p), got {g.shape}")
    bad = ~np.isfinite(g) | (g <= 0)
    if bad.any():
        raise ValueError(f"gamma must be finite and positive, got {float(g[bad][0])} at index {int(np.flatnonzero(bad)[0])}")
    return g


def rotation(theta: float) -> np.ndarray:
    """The 2-D rotation matrix ``[[cos, -sin], [sin, cos]]`` by angle ``theta`` (radians), ``(2, 2)``."""
    t = float(theta)
    if not np.isfinite(t):
        raise ValueError(f"theta must be finite, got {theta!r}")
    return np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])


class TheoryLosses(NamedTuple):
    """Per-sample losses of the theory SAE, each of shape ``(batch,)``."""

    sae: np.ndarray
    """``||Γ(x_p - W_mᵀ σ(W_m x_p))||²`` (Γ = I unless ``gamma`` is given: then L_WSAE)."""
    gt: np.ndarray
    """``||x - x_m||²`` with latent i matched to feature i (zero padding on the shorter side)."""


def theory_losses(W_p: Any, W_m: Any, x: Any, gamma: Any = None) -> TheoryLosses:
    """Per-sample L_SAE (or L_WSAE) and L_GT of the tied ReLU theory SAE (Theorems 1, 4, 5).

    ``W_p``: ``(n_p, n)``; ``W_m``: ``(n_m, n_p)``; ``x``: ``(batch, n)`` or ``(n,)``; ``gamma``:
    ``(n_p,)`` positive weights or None. Latent i is compared with feature i, as in
    :func:`closed_form_sae`'s order: when ``n_m > n`` the extra latents are compared with 0, when
    ``n_m < n`` the features without a latent count as recovered as 0. (Permute a learned W_m
    with :func:`match_rows` first.) Monte-Carlo means of these give E[L_SAE] and E[L_GT].
    """
    Wp, Wm = _as_matrix(W_p, "W_p"), _as_matrix(W_m, "W_m")
    n_p, n = Wp.shape
    if Wm.shape[1] != n_p:
        raise ValueError(f"W_m must have {n_p} columns to act on x_p = W_p x, got shape {Wm.shape}")
    X = np.asarray(x, dtype=float)
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim != 2 or X.shape[1] != n:
        raise ValueError(f"x must have shape (batch, {n}) to match W_p of shape {Wp.shape}, got {np.shape(x)}")
    if not np.all(np.isfinite(X)):
        raise ValueError("x must have finite entries, got a non-finite value")
    g = np.ones(n_p) if gamma is None else check_gamma(gamma, n_p)
    x_p = X @ Wp.T
    x_m = np.maximum(x_p @ Wm.T, 0.0)
    sae = (((x_p - x_m @ Wm) * g) ** 2).sum(1)
    n_m, N = Wm.shape[0], max(n, Wm.shape[0])
    gt = ((np.pad(X, ((0, 0), (0, N - n))) - np.pad(x_m, ((0, 0), (0, N - n_m)))) ** 2).sum(1)
    return TheoryLosses(sae, gt)


class TheoryFit(NamedTuple):
    """Result of :func:`fit_theory_sae`."""

    W_m: np.ndarray
    """The fitted encoder, ``(n_m, n_p)``."""
    loss: float
    """Its sample-mean L_SAE (or L_WSAE with weights) on the training sample."""
    success: bool
    """Whether the optimiser reported convergence."""


def fit_theory_sae(W_p: Any, x: Any, n_m: int, *, gamma: Any = None, init: Any = "closed_form",
                   unit_norm: bool = False, seed: int | None = 0, maxiter: int = 2000) -> TheoryFit:
    """Minimise the sample mean of ``||Γ(x_p - W_mᵀ relu(W_m x_p))||²`` over the encoder W_m.

    The tied, bias-free ReLU theory SAE of Theorem 1 (``gamma=None``) or the WSAE of Theorem 5,
    fitted by L-BFGS with the exact gradient on the fixed sample ``x`` ``(batch, n)``, so that
    different encoders are compared with common random numbers. ``init``: ``"closed_form"``
    (W_pᵀ padded with small random rows), ``"random"`` (Gaussian rows) or an ``(n_m, n_p)`` array.
    ``unit_norm=True`` constrains every row of W_m to unit norm (parametrised as U / ||U||).
    Used in the chapters *The closed form* and *The gap*.
    """
    Wp = _as_matrix(W_p, "W_p")
    n_p, n = Wp.shape
    if isinstance(n_m, bool) or not isinstance(n_m, Integral) or n_m <= 0:
        raise ValueError(f"n_m must be a positive integer, got {n_m!r}")
    X = np.asarray(x, dtype=float)
    if X.ndim != 2 or X.shape[1] != n or not np.all(np.isfinite(X)):
        raise ValueError(f"x must be a finite array of shape (batch, {n}), got shape {X.shape}")
    g2 = (np.ones(n_p) if gamma is None else check_gamma(gamma, n_p)) ** 2
    rng = np.random.default_rng(seed)
    if isinstance(init, str):
        if init == "closed_form":
            U0 = np.vstack([Wp.T, 0.01 * rng.standard_normal((max(n_m - n, 0), n_p))])[:n_m]
        elif init == "random":
            U0 = rng.standard_normal((n_m, n_p)) / np.sqrt(n_p)
        else:
            raise ValueError(f"init must be 'closed_form', 'random' or an array, got {init!r}")
    else:
        U0 = _as_matrix(init, "init")
        if U0.shape != (n_m, n_p):
            raise ValueError(f"init must have shape ({n_m}, {n_p}), got {U0.shape}")
    Xp = X @ Wp.T
    B = Xp.shape[0]

    def loss_grad(theta):
        U = theta.reshape(n_m, n_p)
        if unit_norm:
            norms = np.linalg.norm(U, axis=1, keepdims=True) + 1e-12
            W = U / norms
        else:
            W = U
        pre = Xp @ W.T
        A = np.maximum(pre, 0.0)
        R = Xp - A @ W
        Rg = R * g2
        loss = float((R * Rg).sum() / B)
        grad = -2.0 / B * (((Rg @ W.T) * (pre > 0)).T @ Xp + A.T @ Rg)
        if unit_norm:
            grad = (grad - (grad * W).sum(1, keepdims=True) * W) / norms
        return loss, grad.ravel()

    from scipy.optimize import minimize

    res = minimize(loss_grad, U0.ravel(), jac=True, method="L-BFGS-B", options={"maxiter": maxiter, "gtol": 1e-10})
    W = res.x.reshape(n_m, n_p)
    if unit_norm:
        W = W / np.linalg.norm(W, axis=1, keepdims=True)
    return TheoryFit(W, float(loss_grad(W.ravel())[0]), bool(res.success))


def frobenius_gap(W_p: Any, gamma: Any = None, rescale: bool = True) -> float:
    """``||W_pᵀ Γ² W_p - I||_F`` (Theorem 5's gap matrix in Frobenius norm), Γ = diag(gamma).

    With ``rescale=True`` the weights are first multiplied by the best common factor (only the
    *shape* of the weights is judged: ``t* = <A, I> / <A, A>`` for ``A = W_pᵀΓ²W_p``). Chapter
    *The gap* compares weight rules with it.
    """
    A = _as_matrix(W_p, "W_p")
    n_p, n = A.shape
    g = np.ones(n_p) if gamma is None else check_gamma(gamma, n_p)
    M = A.T @ np.diag(g**2) @ A
    # For M = 0 (e.g. W_p = 0) every factor gives ||-I||: take t = 0 instead of dividing 0 by 0.
    t = (np.trace(M) / (M * M).sum() if (M * M).sum() > 0 else 0.0) if rescale else 1.0
    return float(np.linalg.norm(t * M - np.eye(n)))


def rotate_rows(W_m: Any, angles: Any) -> np.ndarray:
    """Rotate each row of a 2-column encoder ``W_m`` ``(n_m, 2)`` by its own angle (radians).

    ``angles`` has shape ``(n_m,)`` (or is one number for all rows). A row keeps its norm, so this
    explores encoders with fixed row norms (chapter *The closed form*).
    """
    W = _as_matrix(W_m, "W_m")
    if W.shape[1] != 2:
        raise ValueError(f"rotate_rows needs an encoder with 2 columns (n_p = 2), got shape {W.shape}")
    a = np.broadcast_to(np.asarray(angles, dtype=float), (W.shape[0],))
    if not np.all(np.isfinite(a)):
        raise ValueError(f"angles must be finite, got {angles!r}")
    cos, sin = np.cos(a), np.sin(a)
    return np.stack([cos * W[:, 0] - sin * W[:, 1], sin * W[:, 0] + cos * W[:, 1]], axis=1)
