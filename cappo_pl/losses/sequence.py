"""Sequence-level and IS-weighted REINFORCE surrogates: GSPO, CISPO, GPG.

- GSPO: Zheng et al. 2025, "Group Sequence Policy Optimization" (arXiv:2507.18071); verl
  ``compute_policy_loss_gspo``.
- CISPO: MiniMax-M1 (arXiv:2506.13585); verl ``cispo``, TRL ``loss_type="cispo"``.
- GPG: Chu et al. 2025, "GPG: A Simple and Strong Reinforcement Learning Baseline for Model
  Reasoning" (arXiv:2504.02546; AMAP-ML/GPG).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cappo_pl.constraints import NonNegativeFloat, PositiveFloat, checked_init
from cappo_pl.errors import ConfigError
from cappo_pl.losses.aggregation import AggMode
from cappo_pl.losses.base import PolicyLoss, TokenBatch, TokenLoss
from cappo_pl.losses.ratio import ClipEpsLow, importance_ratio


def gspo_token_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps_low: float = 3e-4, eps_high: float = 4e-4
) -> TokenLoss:
    """GSPO's token form with the stop-gradient trick (verl), to aggregate seq-mean-token-mean.

    ``log s_i = (1/|y_i|) sum_t m_t (logp - old_logp)`` (clamped <= 10);
    ``log s_it = logp_t - sg(logp_t) + sg(log s_i)`` (value ``s_i``, gradient ``s_i grad logp_t``);
    ``l = max(-A s, -A clip(s, 1 - eps_low, 1 + eps_high))``.

    Args:
        logp: log pi (B, T), with gradient.
        old_logp: log pi_old (B, T).
        advantages: A (B, T).
        mask: (B, T), the tokens of each sequence (its length |y_i|).
        eps_low: lower clip epsilon of the sequence ratio.
        eps_high: upper clip epsilon.

    Returns:
        ``l`` (B, T), the region ``clipped`` (the clipped branch is taken) and the metric ``seq_ratio``
        (mean ``s_i``).

    """
    m = mask.to(logp.dtype)
    lengths = m.sum(-1).clamp_min(1.0)
    log_seq = (((logp - old_logp).detach() * m).sum(-1) / lengths).clamp(max=10.0)  # (B,)
    log_s = (logp - logp.detach() + log_seq[:, None]).clamp(max=10.0)
    s = torch.exp(log_s)
    loss1 = -advantages * s
    loss2 = -advantages * s.clamp(1.0 - eps_low, 1.0 + eps_high)
    return TokenLoss(torch.maximum(loss1, loss2), {"clipped": loss2 > loss1}, {"seq_ratio": log_seq.exp().mean()})


def cispo_token_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, ratio_min: float | None = None, ratio_max: float = 5.0
) -> TokenLoss:
    """CISPO: ``l = -sg(clip(r, ratio_min, ratio_max)) A log pi``; every token keeps a gradient.

    verl's form is ``clip(r, 1 - eps_low, 1 + eps_high)``; TRL's is ``min(r, eps_max)`` with eps_max 5
    (``ratio_min=None``, ``ratio_max=5``, the default here).

    Args:
        logp: log pi (B, T), with gradient.
        old_logp: log pi_old (B, T).
        advantages: A (B, T).
        ratio_min: lower bound of the weight, or None.
        ratio_max: upper bound of the weight.

    Returns:
        ``l`` (B, T) and the region ``clipped`` (the weight is clipped).

    """
    ratio = importance_ratio(logp.detach(), old_logp.detach())
    clipped = ratio > ratio_max
    if ratio_min is not None:
        clipped = clipped | (ratio < ratio_min)
    weight = ratio.clamp(min=ratio_min, max=ratio_max)
    return TokenLoss(-weight * advantages * logp, {"clipped": clipped})


class GSPO(PolicyLoss):
    """GSPO against pi_old (``gspo_token_loss``; seq-mean-token-mean, as the method defines, no dual-clip).

    Args:
        eps_low: lower clip epsilon of the sequence ratio (verl examples 3e-4).
        eps_high: upper clip epsilon (4e-4).

    """

    agg = "seq-mean-token-mean"

    @checked_init
    def __init__(self, eps_low: ClipEpsLow = 3e-4, eps_high: PositiveFloat = 4e-4) -> None:
        self.eps_low, self.eps_high = eps_low, eps_high

    def token_loss(self, b: TokenBatch) -> TokenLoss:
        return gspo_token_loss(b.logp, b.old_logp, b.advantages, b.mask, self.eps_low, self.eps_high)


class CISPO(PolicyLoss):
    """CISPO: REINFORCE with a clipped, stop-gradient importance weight against pi_old (``cispo_token_loss``).

    Args:
        ratio_min: lower bound of the weight (None: none, as TRL; verl uses 1 - eps_low).
        ratio_max: upper bound of the weight (TRL eps_max 5.0; verl 1 + eps_high).
        agg: aggregation (token-mean, as TRL's global token mean).
        loss_scale_factor: L of ``seq-mean-token-sum-norm``.

    """

    @checked_init
    def __init__(
        self,
        ratio_min: NonNegativeFloat | None = None,
        ratio_max: PositiveFloat = 5.0,
        agg: AggMode = "token-mean",
        loss_scale_factor: PositiveFloat | None = None,
    ) -> None:
        if ratio_min is not None and ratio_min > ratio_max:
            raise ConfigError(f"CISPO.ratio_min: must be <= ratio_max ({ratio_max}), got {ratio_min}")
        self.ratio_min, self.ratio_max, self.agg, self.loss_scale_factor = ratio_min, ratio_max, agg, loss_scale_factor

    def token_loss(self, b: TokenBatch) -> TokenLoss:
        return cispo_token_loss(b.logp, b.old_logp, b.advantages, self.ratio_min, self.ratio_max)


class GPG(PolicyLoss):
    """GPG: plain policy gradient ``l = -A log pi`` (no ratio, no clipping).

    Args:
        agg: aggregation mode.
        loss_scale_factor: L of ``seq-mean-token-sum-norm``.

    """

    @checked_init
    def __init__(self, agg: AggMode = "token-mean", loss_scale_factor: PositiveFloat | None = None) -> None:
        self.agg, self.loss_scale_factor = agg, loss_scale_factor

    def token_loss(self, b: TokenBatch) -> TokenLoss:
        return TokenLoss(-b.advantages * b.logp)
