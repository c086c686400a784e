"""MGDA: the min-norm point of the convex hull of the (weighted) gradients.

Désidéri 2012; Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.
Preference-scaled as in CaPPO: with ``W = diag(weights)``

    alpha* = argmin_{alpha in simplex} alpha^T (W G W) alpha,    c = weights * alpha*.

If the minimum is > 0 the direction ``d = sum_k c_k g_k`` satisfies ``g_k . d >= |d|^2 > 0`` for
every active objective (a common descent direction); if it is 0 the point is Pareto-stationary.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from cappo_pl.combiners.base import Combiner, trace_normalised, weighted_gram
from cappo_pl.combiners.qp import RIDGE, simplex_qp
from cappo_pl.constraints import NonNegativeFloat, checked_init

Normalization = Literal["none", "l2", "loss", "loss+"]
Rescale = Literal["none", "first", "mean"]


def min_norm_two(gram: Tensor) -> Tensor:
    """Closed-form MGDA for K = 2 (Sener & Koltun, ``_min_norm_element_from2``), exact at the bounds.

    ``gamma = clip((v22 - v12) / (v11 + v22 - 2 v12), 0, 1)`` weights the first gradient. A ridge of
    1e-12 on a trace-normalised Gram splits identical gradients evenly instead of arbitrarily.

    Args:
        gram: (2, 2) Gram matrix.

    Returns:
        alpha (2,) on the simplex.

    """
    g, _ = trace_normalised(gram)
    v11, v12, v22 = float(g[0, 0]) + RIDGE, float(g[0, 1]), float(g[1, 1]) + RIDGE
    if v12 >= v11:
        gamma = 1.0
    elif v12 >= v22:
        gamma = 0.0
    else:
        gamma = (v22 - v12) / (v11 + v22 - 2.0 * v12)
    return torch.tensor([gamma, 1.0 - gamma], dtype=torch.float64)


def min_norm_alpha(gram: Tensor) -> Tensor:
    """``argmin_{alpha in simplex} alpha^T G alpha`` for any K <= 12: closed form for K <= 2, else exact.

    Args:
        gram: (K, K) PSD Gram matrix.

    Returns:
        alpha (K,) on the simplex; uniform when every gradient is zero.

    """
    k = gram.shape[0]
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    g, tr = trace_normalised(gram)
    if tr == 0.0:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    if k == 2:
        return min_norm_two(g)
    return torch.from_numpy(simplex_qp(2.0 * g.numpy()))


class MGDA(Combiner):
    """Preference-scaled MGDA, exact for every K <= 12.

    Args:
        normalization: divide each weighted gradient by a scale before the solve (the update then
            uses the normalised gradients, LibMTL's convention): ``l2`` its norm, ``loss`` |L_k|,
            ``loss+`` |L_k| times its norm. Normalising discards the weights' magnitudes.
        rescale: scale the resulting direction ``d`` to the norm of the first objective's weighted
            gradient (``first``) or the mean norm of the weighted gradients (``mean``). MGDA's ``d``
            is a convex combination, so without rescaling its norm is at most that of the
            smallest-norm weighted gradient (and 0 at a Pareto-stationary point).
        eps: floor of the normalisers, relative to the largest one.

    """

    @checked_init
    def __init__(
        self, normalization: Normalization = "none", rescale: Rescale = "none", eps: NonNegativeFloat = 1e-12
    ) -> None:
        self.normalization = normalization
        self.rescale = rescale
        self.eps = eps

    def _normalisers(self, wg: Tensor, weights: Tensor, losses: Tensor | None) -> Tensor:
        norms = wg.diagonal().clamp_min(0.0).sqrt()
        if self.normalization == "none":
            return torch.ones_like(weights)
        if self.normalization == "l2":
            n = norms
        elif losses is None:
            raise ValueError(f"MGDA(normalization={self.normalization!r}) needs the loss values")
        else:
            n = (weights * losses).abs() * (1.0 if self.normalization == "loss" else norms)
        return n.clamp_min(max(self.eps * float(n.max()), 1e-300))  # relative floor: scale-free

    def combine(self, gram: Tensor, weights: Tensor, losses: Tensor | None) -> Tensor:
        wg = weighted_gram(gram, weights)
        n = self._normalisers(wg, weights, losses)
        alpha = min_norm_alpha(wg / (n[:, None] * n[None, :]))
        c = weights * alpha / n
        if self.rescale != "none":
            d_norm = math.sqrt(max(float(c @ gram @ c), 0.0))
            norms = wg.diagonal().clamp_min(0.0).sqrt()
            target = float(norms[0] if self.rescale == "first" else norms.mean())
            if d_norm > 0:
                c = c * (target / d_norm)
        return c


__all__ = ["MGDA", "min_norm_alpha", "min_norm_two"]
