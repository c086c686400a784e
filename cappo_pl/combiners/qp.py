"""Exact small quadratic programs by enumeration of faces.

The combiners solve QPs with K <= 12 variables (K = number of objectives). For such K the exact
optimum is found by visiting every face of the feasible set: on a face the problem is an equality-
constrained QP (one small linear solve), and the best feasible face solution is the global optimum
of the convex problem. This is finite, exact to rounding, needs no tolerances or iteration counts,
and does not slow down near the optimum as Frank-Wolfe does. A tiny ridge makes every face solve
well posed when the Gram matrix is singular (collinear or identical gradients).

Arrays are float64 numpy: for K x K problems the per-call overhead of numpy is ~20x below torch's.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

MAX_K = 12
"""Largest K solved by enumeration (2^12 - 1 = 4095 faces, tens of ms)."""
RIDGE = 1e-12
"""Ridge added to a trace-normalised matrix: changes the optimal value by at most ~1e-12."""


def _check(q_mat: np.ndarray) -> int:
    k = q_mat.shape[0]
    if q_mat.shape != (k, k) or k < 1:
        raise ValueError(f"expected a square matrix, got shape {q_mat.shape}")
    if k > MAX_K:
        raise ValueError(f"exact QP by face enumeration supports K <= {MAX_K} objectives, got {k}")
    return k


def simplex_qp(q_mat: np.ndarray, lin: np.ndarray | None = None) -> np.ndarray:
    """``argmin_{x in simplex} 1/2 x^T Q x + lin^T x`` for a PSD ``Q`` (K x K).

    On the face with support S the KKT system is ``Q_SS x_S + lin_S = lam 1``, ``1^T x_S = 1``.

    Args:
        q_mat: PSD matrix (K, K); scale it to O(1) first (the ridge is absolute).
        lin: linear term (K,), zero when omitted.

    Returns:
        The minimiser (K,), non-negative and summing to 1.

    """
    k = _check(q_mat)
    lin = np.zeros(k) if lin is None else lin
    q_reg = q_mat + RIDGE * np.eye(k)
    best, best_val = np.full(k, 1.0 / k), np.inf
    for m in range(1, k + 1):
        for face in combinations(range(k), m):
            idx = list(face)
            kkt = np.zeros((m + 1, m + 1))
            kkt[:m, :m], kkt[:m, m], kkt[m, :m] = q_reg[np.ix_(idx, idx)], -1.0, 1.0
            rhs = np.concatenate([-lin[idx], [1.0]])
            try:
                sol = np.linalg.solve(kkt, rhs)[:m]
            except np.linalg.LinAlgError:
                continue
            if sol.min() < -1e-12:
                continue
            x = np.zeros(k)
            x[idx] = np.clip(sol, 0.0, None)
            x /= x.sum()
            val = 0.5 * x @ q_mat @ x + lin @ x
            if val < best_val:
                best, best_val = x, val
    return best


def box_qp(q_mat: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """``argmin_{v >= lower} v^T Q v`` for a PSD ``Q`` (K x K).

    On the face where the variables in S are free and the others sit at their bound,
    ``Q_SS v_S = -Q_{S,S^c} lower_{S^c}``.

    Args:
        q_mat: PSD matrix (K, K), scaled to O(1).
        lower: lower bounds (K,).

    Returns:
        The minimiser (K,).

    """
    k = _check(q_mat)
    q_reg = q_mat + RIDGE * np.eye(k)
    best, best_val = lower.copy(), lower @ q_mat @ lower
    for m in range(1, k + 1):
        for face in combinations(range(k), m):
            free = list(face)
            fixed = [i for i in range(k) if i not in face]
            rhs = -q_reg[np.ix_(free, fixed)] @ lower[fixed] if fixed else np.zeros(m)
            try:
                sol = np.linalg.solve(q_reg[np.ix_(free, free)], rhs)
            except np.linalg.LinAlgError:
                continue
            if (sol < lower[free] - 1e-12).any():
                continue
            v = lower.copy()
            v[free] = np.maximum(sol, lower[free])
            val = v @ q_mat @ v
            if val < best_val:
                best, best_val = v, val
    return best
