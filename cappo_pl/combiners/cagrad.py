"""CAGrad: Conflict-Averse Gradient descent (Liu et al., NeurIPS 2021), Gram-only.

On the weighted gradients ``h_k = w_k g_k`` with mean ``h_0`` and radius ``sqrt(phi) = c |h_0|``:

    w* = argmin_{w in simplex} h_w . h_0 + sqrt(phi) |h_w|,     h_w = sum_k w_k h_k
    d  = h_0 + sqrt(phi) / |h_w*| h_w*

(the dual of ``max_d min_i h_i . d`` s.t. ``|d - h_0| <= c |h_0|``). In Gram terms
``h_w . h_0 = w^T H 1/K`` and ``|h_w| = sqrt(w^T H w)``. The problem is solved through the
variational form ``sqrt(q) = min_{r > 0} q / (2r) + r / 2``: for fixed r it is a simplex QP
(solved exactly), and the partial minimum is convex in r, so a golden-section search on r
converges to the optimum without the tuned solvers of the official code (SLSQP) or TorchJD (cvxpy).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from cappo_pl.combiners.base import Combiner, trace_normalised, weighted_gram
from cappo_pl.combiners.qp import simplex_qp
from cappo_pl.constraints import NonNegativeFloat, PositiveFloat, checked_init

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def cagrad_dual(gram: np.ndarray, b: np.ndarray, s: float, iters: int = 120) -> np.ndarray:
    """``argmin_{w in simplex} b^T w + s sqrt(w^T G w)`` for a PSD, trace-normalised ``G``.

    Args:
        gram: (K, K) PSD matrix with trace 1.
        b: (K,) linear term.
        s: weight of the norm term (>= 0).
        iters: golden-section iterations on r (each shrinks the bracket by 0.618).

    Returns:
        The minimiser w (K,).

    """

    def inner(r: float) -> tuple[float, np.ndarray]:
        w = simplex_qp((s / r) * gram, b)
        return b @ w + s * (w @ gram @ w / (2 * r) + r / 2), w

    if s == 0.0:
        return simplex_qp(np.zeros_like(gram), b)
    lo, hi = 1e-9, math.sqrt(max(float(np.diag(gram).max()), 1e-18))  # |h_w| <= max_k |h_k|
    x1, x2 = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    f1, f2 = inner(x1)[0], inner(x2)[0]
    for _ in range(iters):
        if hi - lo < 1e-12 * hi:
            break
        if f1 <= f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - _GOLDEN * (hi - lo)
            f1 = inner(x1)[0]
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + _GOLDEN * (hi - lo)
            f2 = inner(x2)[0]
    return inner(0.5 * (lo + hi))[1]


def cagrad_coefficients(gram: Tensor, c: float, norm_eps: float = 1e-4) -> Tensor:
    """Coefficients (over the gradients of ``gram``) of the CAGrad direction, mean-based as the paper.

    Args:
        gram: (K, K) Gram matrix.
        c: radius scale (paper's c, TorchJD's ``c``).
        norm_eps: when ``|h_w*| < norm_eps`` (trace-normalised units) the point is on the Pareto front
            and ``d = h_0`` (the official code adds eps to the norm; TorchJD returns 0).

    Returns:
        (K,) coefficients: ``1/K + sqrt(phi) / |h_w| w*``.

    """
    k = gram.shape[0]
    g, tr = trace_normalised(gram)
    mean = np.full(k, 1.0 / k)
    if tr == 0.0:
        return torch.from_numpy(mean)
    gn = g.numpy()
    sqrt_phi = c * math.sqrt(max(float(mean @ gn @ mean), 0.0))
    w = cagrad_dual(gn, gn @ mean, sqrt_phi)
    gw_norm = math.sqrt(max(float(w @ gn @ w), 0.0))
    coef = mean + (sqrt_phi / gw_norm) * w if gw_norm >= norm_eps else mean
    return torch.from_numpy(coef)


class CAGrad(Combiner):
    """CAGrad on the weighted gradients.

    Args:
        c: radius of the ball around the average gradient (0 gives the average; official 0.5).
        rescale: ``1+c^2`` divides d by 1 + c^2 (official default), ``1+c`` by 1 + c, ``none`` keeps it.
        reduction: ``sum`` scales d by K so that ``c = 0`` equals :class:`Scalarized`; ``mean`` is
            the paper's average.
        norm_eps: Pareto-front threshold on ``|h_w|`` (trace-normalised).

    """

    @checked_init
    def __init__(
        self,
        c: NonNegativeFloat = 0.5,
        rescale: Literal["none", "1+c^2", "1+c"] = "1+c^2",
        reduction: Literal["sum", "mean"] = "sum",
        norm_eps: PositiveFloat = 1e-4,
    ) -> None:
        self.c, self.rescale, self.reduction, self.norm_eps = c, rescale, reduction, norm_eps

    def combine(self, gram: Tensor, weights: Tensor, losses: Tensor | None) -> Tensor:
        a = cagrad_coefficients(weighted_gram(gram, weights), self.c, self.norm_eps)
        a = a / {"none": 1.0, "1+c^2": 1.0 + self.c**2, "1+c": 1.0 + self.c}[self.rescale]
        return weights * (a * weights.numel() if self.reduction == "sum" else a)
