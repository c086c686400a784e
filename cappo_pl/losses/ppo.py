"""PPO-clip with asymmetric (clip-higher) bounds and dual-clip.

Schulman et al. 2017 (PPO); DAPO (Yu et al. 2025) for eps_high; Ye et al. 2020 for dual-clip.
Formula as in verl ``compute_policy_loss_vanilla`` (shared/reference/algorithms.md section 1.1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cappo_pl.losses.aggregation import AggMode, GlobalBatch, agg_loss, masked_mean
from cappo_pl.losses.base import PolicyLoss, TokenBatch


def ppo_clip_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_ratio_c: float | None = 3.0,
    agg: AggMode = "token-mean",
    loss_scale_factor: float | None = None,
    dp: GlobalBatch | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip surrogate with dual-clip.

    ``r = exp(clamp(logp - old_logp, -20, 20))``,
    ``L1 = -A r``, ``L2 = -A clip(r, 1 - eps_low, 1 + eps_high)``, ``Lc = max(L1, L2)``;
    for ``A < 0`` (dual-clip, ``c > 1``): ``l = min(Lc, -A c)``; loss = agg(l, mask).

    Args:
        logp, old_logp, advantages, mask: tensors of shape (B, T).
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]``.
        clip_ratio_c: dual-clip constant c (> 1), or None to disable.
        agg: aggregation mode (see ``agg_loss``).
        loss_scale_factor: L of ``seq-mean-token-sum-norm``.
        dp: the data-parallel group the loss is normalised over (``agg_loss``; None: this rank alone).

    Returns:
        ``(loss, metrics)`` with ``clipfrac`` (L2 > L1), ``clipfrac_low`` (A < 0 and r < 1 - eps_low),
        ``clipfrac_high`` (A > 0 and r > 1 + eps_high), ``clipfrac_dual`` and ``ppo_kl`` (mean of -log r).

    """
    per_token, regions = ppo_clip_token_loss(logp, old_logp, advantages, eps_low, eps_high, clip_ratio_c)
    loss = agg_loss(per_token, mask, agg, loss_scale_factor, dp=dp)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean(regions["clipped"].float(), mask),
            "clipfrac_low": masked_mean(regions["low"].float(), mask),
            "clipfrac_high": masked_mean(regions["high"].float(), mask),
            "clipfrac_dual": masked_mean(regions["dual"].float(), mask),
            "ppo_kl": masked_mean(-regions["log_ratio"], mask),
        }
    return loss, metrics


def ppo_clip_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_ratio_c: float | None = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO-clip loss (B, T) before aggregation, and its region masks (bool, (B, T)).

    Regions: ``clipped`` (L2 > L1), ``low`` (A < 0, r < 1 - eps_low), ``high`` (A > 0, r > 1 + eps_high),
    ``dual`` (dual-clip binds); also ``log_ratio``.
    """
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    clipped = torch.maximum(loss1, loss2)
    per_token = clipped
    dual = torch.zeros_like(advantages, dtype=torch.bool)
    if clip_ratio_c is not None:
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 for dual-clip, got {clip_ratio_c}")
        loss3 = -advantages * clip_ratio_c
        dual = (advantages < 0) & (clipped > loss3)
        per_token = torch.where(advantages < 0, torch.minimum(clipped, loss3), clipped)
    regions = {
        "clipped": loss2 > loss1,
        "low": (advantages < 0) & (ratio < 1.0 - eps_low),
        "high": (advantages > 0) & (ratio > 1.0 + eps_high),
        "dual": dual,
        "log_ratio": log_ratio,
    }
    return per_token, regions


class PPOClip(PolicyLoss):
    """PPO-clip surrogate against pi_old (recomputed at step start).

    Args:
        eps_low: lower clip epsilon.
        eps_high: upper clip epsilon (DAPO clip-higher uses 0.28).
        clip_ratio_c: dual-clip constant (> 1) or None.
        agg: loss aggregation mode.
        loss_scale_factor: L of ``seq-mean-token-sum-norm`` (None: the batch's, i.e. max_new_tokens).

    """

    def __init__(
        self,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        clip_ratio_c: float | None = 3.0,
        agg: AggMode = "token-mean",
        loss_scale_factor: float | None = None,
    ) -> None:
        self.eps_low = eps_low
        self.eps_high = eps_high
        self.clip_ratio_c = clip_ratio_c
        self.agg = agg
        self.loss_scale_factor = loss_scale_factor

    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        return ppo_clip_loss(
            batch.logp,
            batch.old_logp,
            batch.advantages,
            batch.mask,
            self.eps_low,
            self.eps_high,
            self.clip_ratio_c,
            self.agg,
            self.scale_factor(batch),
            dp=batch.dp,
        )
