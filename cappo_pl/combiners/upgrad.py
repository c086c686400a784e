"""UPGrad (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization"), Gram-only.

Each weighted gradient ``h_i = w_i g_i`` is projected onto the dual cone ``{x : h_k . x >= 0 for all
k}``; in weight space (their Proposition 1) the projection of ``J^T u`` is ``J^T v`` with

    v = argmin_{v >= u} v^T H v,        H = W G W / trace(W G W) + reg_eps I,

and UPGrad sums the projections of ``u = p_i e_i``. The result never conflicts with any objective.
Solved exactly by face enumeration (TorchJD solves the same QPs with quadprog).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from cappo_pl.combiners.base import Combiner, trace_normalised, weighted_gram
from cappo_pl.combiners.qp import box_qp
from cappo_pl.constraints import NonNegativeFloat, checked_init


def upgrad_coefficients(gram: Tensor, pref: Tensor, reg_eps: float = 0.0) -> Tensor:
    """``sum_i argmin_{v >= pref_i e_i} v^T (G / tr G + reg_eps I) v``; (K,) from a (K, K) Gram."""
    g, _ = trace_normalised(gram)
    q_mat = g.numpy() + reg_eps * np.eye(g.shape[0])
    total = np.zeros(g.shape[0])
    for i in range(g.shape[0]):
        lower = np.zeros(g.shape[0])
        lower[i] = float(pref[i])
        total += box_qp(q_mat, lower)
    return torch.from_numpy(total)


class UPGrad(Combiner):
    """UPGrad on the weighted gradients.

    Args:
        reduction: preference vector over the projections: ``sum`` (all ones; with no conflicts the
            update equals :class:`Scalarized`'s) or ``mean`` (1/K, TorchJD's default).
        reg_eps: ridge on the trace-normalised Gram (TorchJD: 1e-4, for quadprog's sake). The exact
            solver needs none, and a ridge lets the result conflict by up to ~reg_eps.

    """

    @checked_init
    def __init__(self, reduction: Literal["sum", "mean"] = "sum", reg_eps: NonNegativeFloat = 0.0) -> None:
        self.reduction = reduction
        self.reg_eps = reg_eps

    def combine(self, gram: Tensor, weights: Tensor, losses: Tensor | None) -> Tensor:
        k = weights.numel()
        pref = torch.full((k,), 1.0 if self.reduction == "sum" else 1.0 / k, dtype=torch.float64)
        return weights * upgrad_coefficients(weighted_gram(gram, weights), pref, self.reg_eps)
