"""PCGrad ("Gradient Surgery", Yu et al., NeurIPS 2020) in Gram-only form.

Paper, on the weighted gradients ``h_k = w_k g_k``::

    for i: h_i^PC = h_i
           for j in random order (j != i):
               if h_i^PC . h_j < 0: h_i^PC -= (h_i^PC . h_j) / |h_j|^2 h_j   # the ORIGINAL h_j
    d = sum_i h_i^PC   (reduction "sum", as the paper, TorchJD and LibMTL)

Every ``h_i^PC`` is a linear combination ``sum_j a^(i)_j h_j``, so with H the Gram of the h's the
inner product is ``H[j] @ a^(i)`` and the projection subtracts ``inner / H[j, j]`` from ``a^(i)_j``
(TorchJD's ``PCGradWeighting``). Returns ``c = weights * sum_i a^(i)``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from cappo_pl.combiners.base import Combiner, weighted_gram
from cappo_pl.constraints import checked_init
from cappo_pl.seeds import generator


def pcgrad_coefficients(gram: Tensor, orders: list[list[int]]) -> Tensor:
    """Coefficients ``sum_i a^(i)`` of the PCGrad direction over the gradients of ``gram``.

    Args:
        gram: (K, K) Gram matrix of the gradients being projected.
        orders: for each i, the order in which the other gradients are visited.

    Returns:
        (K,) coefficients (reduction "sum").

    """
    k = gram.shape[0]
    total = torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        a = torch.zeros(k, dtype=torch.float64)
        a[i] = 1.0
        for j in orders[i]:
            if j == i or gram[j, j] <= 0:  # a zero gradient conflicts with nothing
                continue
            inner = gram[j] @ a
            if inner < 0:
                a[j] -= inner / gram[j, j]
        total += a
    return total


class PCGrad(Combiner):
    """PCGrad on the weighted gradients with a seeded, checkpointed random order.

    Args:
        seed: seed of the order generator. Every rank must use the same seed (the default), so the
            coefficients agree across ranks without communication.
        reduction: ``sum`` (paper) or ``mean`` of the projected gradients. With ``sum`` and no
            conflicts the update equals :class:`Scalarized`'s.

    """

    @checked_init
    def __init__(self, seed: int = 0, reduction: Literal["sum", "mean"] = "sum") -> None:
        self.seed = seed
        self.reduction = reduction
        self.generator = generator(seed, "pcgrad_order")

    def orders(self, k: int) -> list[list[int]]:
        """Draw one visiting order per objective (advances the generator)."""
        return [torch.randperm(k, generator=self.generator).tolist() for _ in range(k)]

    def combine(self, gram: Tensor, weights: Tensor, losses: Tensor | None) -> Tensor:
        k = weights.numel()
        a = pcgrad_coefficients(weighted_gram(gram, weights), self.orders(k))
        return weights * (a / k if self.reduction == "mean" else a)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
