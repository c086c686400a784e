"""Scalarized combiner: the weighted sum, i.e. the usual single-loss update."""

from __future__ import annotations

from torch import Tensor

from cappo_pl.combiners.base import Combiner


class Scalarized(Combiner):
    """``c = weights``: the update is ``grad sum_k w_k L_k`` (the baseline every other one departs from)."""

    needs_gram = False
    drop_zero_gradients = False

    def combine(self, gram: Tensor, weights: Tensor, losses: Tensor | None) -> Tensor:
        return weights.clone()
