"""Sequence-level and IS-weighted REINFORCE surrogates: GSPO, CISPO, GPG.

Formulas from shared/reference/algorithms.md sections 1.5 (GSPO, verl ``compute_policy_loss_gspo``),
1.6 (CISPO, verl ``cispo`` / TRL ``loss_type="cispo"``) and 1.12 (GPG).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cappo_pl.losses.aggregation import AggMode, GlobalBatch, agg_loss, masked_mean
from cappo_pl.losses.base import PolicyLoss, TokenBatch


def gspo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    dp: GlobalBatch | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025), verl's token form with the stop-gradient trick; tensors (B, T).

    ``log s_i = (1/|y_i|) sum_t m_t (logp - old_logp)`` (clamped <= 10);
    ``log s_it = logp_t - sg(logp_t) + sg(log s_i)`` (value ``s_i``, gradient ``s_i grad logp_t``);
    ``l = max(-A s, -A clip(s, 1 - eps_low, 1 + eps_high))``, aggregated seq-mean-token-mean (forced).

    Returns:
        ``(loss, metrics)`` with ``clipfrac`` (sequences' tokens where the clipped branch is taken) and
        ``seq_ratio`` (mean ``s_i``).

    """
    m = mask.to(logp.dtype)
    lengths = m.sum(-1).clamp_min(1.0)
    log_seq = (((logp - old_logp).detach() * m).sum(-1) / lengths).clamp(max=10.0)  # (B,)
    log_s = (logp - logp.detach() + log_seq[:, None]).clamp(max=10.0)
    s = torch.exp(log_s)
    loss1 = -advantages * s
    loss2 = -advantages * s.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = agg_loss(torch.maximum(loss1, loss2), mask, "seq-mean-token-mean", dp=dp)
    with torch.no_grad():
        metrics = {"clipfrac": masked_mean((loss2 > loss1).float(), mask), "seq_ratio": log_seq.exp().mean()}
    return loss, metrics


def cispo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ratio_min: float | None = None,
    ratio_max: float = 5.0,
    agg: AggMode = "token-mean",
    loss_scale_factor: float | None = None,
    dp: GlobalBatch | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1): ``l = -sg(clip(r, ratio_min, ratio_max)) A log pi``; every token keeps a gradient.

    verl's form is ``clip(r, 1 - eps_low, 1 + eps_high)``; TRL's is ``min(r, eps_max)`` with eps_max 5
    (``ratio_min=None``, ``ratio_max=5``, the default here).
    """
    ratio = torch.exp((logp - old_logp).detach().clamp(-20.0, 20.0))
    weight = ratio.clamp(min=ratio_min, max=ratio_max)
    loss = agg_loss(-weight * advantages * logp, mask, agg, loss_scale_factor, dp=dp)
    with torch.no_grad():
        clipped = ratio > ratio_max
        if ratio_min is not None:
            clipped |= ratio < ratio_min
        metrics = {"clipfrac": masked_mean(clipped.float(), mask)}
    return loss, metrics


class GSPO(PolicyLoss):
    """GSPO against pi_old (seq-mean-token-mean, no dual-clip).

    Args:
        eps_low: lower clip epsilon of the sequence ratio (verl examples 3e-4).
        eps_high: upper clip epsilon (4e-4).

    """

    agg = "seq-mean-token-mean"

    def __init__(self, eps_low: float = 3e-4, eps_high: float = 4e-4) -> None:
        self.eps_low, self.eps_high = eps_low, eps_high

    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        b = batch
        return gspo_loss(b.logp, b.old_logp, b.advantages, b.mask, self.eps_low, self.eps_high, b.dp)


class CISPO(PolicyLoss):
    """CISPO: REINFORCE with a clipped, stop-gradient importance weight against pi_old.

    Args:
        ratio_min: lower bound of the weight (None: none, as TRL; verl uses 1 - eps_low).
        ratio_max: upper bound of the weight (TRL eps_max 5.0; verl 1 + eps_high).
        agg: aggregation (token-mean, as TRL's global token mean).
        loss_scale_factor: L of ``seq-mean-token-sum-norm``.

    """

    def __init__(
        self,
        ratio_min: float | None = None,
        ratio_max: float = 5.0,
        agg: AggMode = "token-mean",
        loss_scale_factor: float | None = None,
    ) -> None:
        self.ratio_min, self.ratio_max, self.agg, self.loss_scale_factor = ratio_min, ratio_max, agg, loss_scale_factor

    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        lsf = self.scale_factor(batch)
        return cispo_loss(
            batch.logp, batch.old_logp, batch.advantages, batch.mask, self.ratio_min, self.ratio_max, self.agg, lsf,
            dp=batch.dp,
        )


class GPG(PolicyLoss):
    """GPG: plain policy gradient ``l = -A log pi`` (no ratio, no clipping).

    Args:
        agg: aggregation mode.
        loss_scale_factor: L of ``seq-mean-token-sum-norm``.

    """

    def __init__(self, agg: AggMode = "token-mean", loss_scale_factor: float | None = None) -> None:
        self.agg, self.loss_scale_factor = agg, loss_scale_factor

    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        lsf = self.scale_factor(batch)
        return agg_loss(-batch.advantages * batch.logp, batch.mask, self.agg, lsf, batch.dp), {}
