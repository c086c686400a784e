"""Shared per-token pieces of ratio-based surrogates: the importance ratio and dual-clip.

Both follow verl's ``compute_policy_loss_vanilla`` (verl-project/verl ``verl/trainer/ppo/core_algos.py``).
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Gt, Interval
from torch import Tensor

ClipEpsLow = Annotated[float, Interval(gt=0, le=1)]
"""A lower clip epsilon or band: the lower bound ``1 - eps`` of a ratio lies in [0, 1) (1: no bound below)."""
DualClipC = Annotated[float, Gt(1)]
"""The dual-clip constant c (> 1)."""


def log_ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    """``log r = clamp(log pi - log pi_old, -20, 20)`` (B, T); the clamp keeps ``exp`` finite (as verl)."""
    return (logp - old_logp).clamp(-20.0, 20.0)


def importance_ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    """``r = pi / pi_old = exp(log_ratio(logp, old_logp))`` (B, T)."""
    return torch.exp(log_ratio(logp, old_logp))


def dual_clip(per_token: Tensor, advantages: Tensor, clip_ratio_c: float | None) -> tuple[Tensor, Tensor]:
    """Dual-clip (Ye et al. 2020, arXiv:1912.09729): bound the loss of negative-advantage tokens by ``-A c``.

    ``l_t = min(l_t, -A_t c)`` where ``A_t < 0``, unchanged elsewhere: a token whose ratio grew far while
    its advantage is negative keeps a bounded loss and gets no gradient.

    Args:
        per_token: the per-token loss (B, T).
        advantages: A (B, T).
        clip_ratio_c: the constant c (> 1), or None for no dual-clip.

    Returns:
        ``(per_token, dual)``: the bounded loss (B, T) and where the bound binds (bool (B, T);
        ``A < 0`` and ``l_t > -A c``).

    Raises:
        ValueError: ``clip_ratio_c <= 1``.

    """
    if clip_ratio_c is None:
        return per_token, torch.zeros_like(per_token, dtype=torch.bool)
    if clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 for dual-clip, got {clip_ratio_c}")
    bound = -advantages * clip_ratio_c
    negative = advantages < 0
    return torch.where(negative, torch.minimum(per_token, bound), per_token), negative & (per_token > bound)
