"""The Combiner contract: Gram matrix and preference weights in, coefficients out.

``combiner(gram, weights) -> c`` such that the update direction (subtracted by the optimizer, like a
gradient) is ``sum_k c_k g_k`` over the raw per-objective gradients ``g_k = grad L_k``, with
``gram[i, j] = g_i . g_j``. Working from the Gram alone is what makes every combiner exact under
data parallelism with one K x K all-reduce (docs/combiners.md).

Conventions shared by every combiner here:

- Non-scalarized combiners act on the weighted gradients ``w_k g_k`` (their Gram is ``W G W``) and
  return ``c = w * a`` where ``a`` are their coefficients over the weighted gradients; so the
  weights express preferences and controllers (entropy, KL) keep steering through them.
- An objective with weight 0 is switched off: it gets ``c_k = 0`` and is left out of the solve
  (otherwise MGDA would pick its zero vector as the min-norm point and stop training). The same
  holds for an objective whose gradient is exactly zero (``drop_zero_gradients``).
- Everything is computed in float64 on the CPU, deterministically, so identical Grams give
  bit-identical coefficients on every rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class Combiner:
    """Base class of gradient combiners, chosen by ``class_path`` in YAML.

    Subclasses implement :meth:`combine` on the active (non-zero weight) objectives.
    """

    needs_gram: bool = True
    """False when the coefficients do not depend on the Gram (the Gram is then only for logging)."""
    drop_zero_gradients: bool = True
    """Leave objectives with an exactly zero gradient out of the solve (``c_k = 0``): a zero gradient
    conflicts with nothing, yet MGDA would return it as the min-norm point and stall every other
    objective (e.g. a GRPO batch whose groups all have equal rewards)."""

    def __call__(self, gram: Tensor, weights: Tensor, losses: Tensor | None = None) -> Tensor:
        """Coefficients ``c`` (K,) for the update ``sum_k c_k g_k``.

        Args:
            gram: (K, K) Gram matrix of the raw per-objective gradients; finite, symmetric PSD.
            weights: (K,) preference weights (the objectives' ``weight``).
            losses: (K,) loss values, used by loss-based normalisations only.

        Returns:
            (K,) float64 coefficients on the CPU.

        """
        gram = gram.detach().to("cpu", torch.float64)
        weights = weights.detach().to("cpu", torch.float64)
        k = weights.numel()
        if gram.shape != (k, k):
            raise ValueError(f"gram must be ({k}, {k}) for {k} weights, got {tuple(gram.shape)}")
        if not torch.isfinite(gram).all():
            raise ValueError("gram has non-finite entries; the caller must skip such a step")
        gram = 0.5 * (gram + gram.T)  # float round-off can break symmetry; the solvers assume it
        active = weights != 0
        if self.drop_zero_gradients:
            diag = gram.diagonal()
            nonzero = diag > 1e-24 * diag.max().clamp_min(0.0)
            if not (active & nonzero).any():  # every direction is zero: report the preferences
                return weights.clone()
            active &= nonzero
        c = torch.zeros(k, dtype=torch.float64)
        if active.any():
            idx = active.nonzero().squeeze(-1)
            sub_losses = None if losses is None else losses.detach().to("cpu", torch.float64)[idx]
            c[idx] = self.combine(gram[idx][:, idx], weights[idx], sub_losses)
        return c

    def combine(self, gram: Tensor, weights: Tensor, losses: Tensor | None) -> Tensor:
        """Coefficients for the active objectives (all weights non-zero); float64 CPU tensors."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a checkpoint (random generators, running statistics)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


def weighted_gram(gram: Tensor, weights: Tensor) -> Tensor:
    """Gram of the weighted gradients: ``(W G W)[i, j] = w_i w_j G[i, j]``; (K, K)."""
    return weights[:, None] * gram * weights[None, :]


def trace_normalised(gram: Tensor) -> tuple[Tensor, float]:
    """``gram / trace(gram)`` and the trace; all combiners here are invariant to this scaling.

    Returns the unscaled gram and trace 0 when the trace is not positive (all gradients zero).
    """
    tr = float(gram.diagonal().sum())
    return (gram / tr, tr) if tr > 0 else (gram, 0.0)
