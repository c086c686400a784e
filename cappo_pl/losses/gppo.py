"""GPPO and CE-GPPO: bounded gradients for tokens outside the PPO clip interval.

CE-GPPO (shared/reference/papers/002; Kwai-Klear/CE-GPPO ``compute_gppo_loss_general_beta``,
shared/reference/algorithms.md section 2.1). PPO gives tokens that are already clipped no
gradient; GPPO keeps a bounded one through ``r / sg(r)`` (value 1, gradient ``grad log pi``):

    low  = (r < 1 - eps_low)  & (A < 0)        # negative advantage, already pushed down
    high = (r > 1 + eps_high) & (A > 0)        # positive advantage, already pushed up
    l_t  = -beta1 (1 - eps_low)  (r / sg(r)) A     if low
           -beta2 (1 + eps_high) (r / sg(r)) A     if high
           -r A                                    otherwise
    dual-clip (A < 0): l_t = min(l_t, -A c)

Gradient w.r.t. ``log pi``: ``-beta1 (1 - eps_low) A`` (low), ``-beta2 (1 + eps_high) A`` (high),
``-r A`` otherwise, 0 where dual-clip binds. GPPO is beta1 = beta2 = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cappo_pl.losses.aggregation import AggMode, GlobalBatch, agg_loss, masked_mean
from cappo_pl.losses.base import PolicyLoss, TokenBatch


def gppo_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    beta1: float = 0.5,
    beta2: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_ratio_c: float | None = 10.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token CE-GPPO loss (B, T) and its region masks (bool, (B, T)): ``low``, ``high``, ``dual``."""
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)  # as PPO here; the fork does not clamp (same in range)
    ratio = torch.exp(log_ratio)
    unit = ratio / ratio.detach()  # value 1, gradient d log pi
    low = (ratio < 1.0 - eps_low) & (advantages < 0)
    high = (ratio > 1.0 + eps_high) & (advantages > 0)
    per_token = torch.where(
        low,
        -beta1 * (1.0 - eps_low) * unit * advantages,
        torch.where(high, -beta2 * (1.0 + eps_high) * unit * advantages, -ratio * advantages),
    )
    dual = torch.zeros_like(low)
    if clip_ratio_c is not None:
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 for dual-clip, got {clip_ratio_c}")
        bound = -advantages * clip_ratio_c
        dual = (advantages < 0) & (per_token > bound)
        per_token = torch.where(advantages < 0, torch.minimum(per_token, bound), per_token)
    return per_token, {"low": low, "high": high, "dual": dual, "log_ratio": log_ratio}


def gppo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    beta1: float = 0.5,
    beta2: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_ratio_c: float | None = 10.0,
    agg: AggMode = "token-mean",
    loss_scale_factor: float | None = None,
    dp: GlobalBatch | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CE-GPPO surrogate (module docstring); tensors (B, T).

    Returns:
        ``(loss, metrics)``: ``clipfrac`` (low or high), ``clipfrac_low``, ``clipfrac_high``,
        ``clipfrac_dual``, ``ppo_kl``.

    """
    per_token, regions = gppo_token_loss(logp, old_logp, advantages, beta1, beta2, eps_low, eps_high, clip_ratio_c)
    return agg_loss(per_token, mask, agg, loss_scale_factor, dp=dp), gppo_metrics(regions, mask)


def gppo_metrics(regions: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
    """Fractions of the masked tokens in each region."""
    with torch.no_grad():
        return {
            "clipfrac": masked_mean((regions["low"] | regions["high"]).float(), mask),
            "clipfrac_low": masked_mean(regions["low"].float(), mask),
            "clipfrac_high": masked_mean(regions["high"].float(), mask),
            "clipfrac_dual": masked_mean(regions["dual"].float(), mask),
            "ppo_kl": masked_mean(-regions["log_ratio"], mask),
        }


class GPPO(PolicyLoss):
    """CE-GPPO against pi_old; ``beta1 = beta2 = 1`` is plain GPPO.

    Args:
        beta1: gradient scale on low-side tokens (r < 1 - eps_low, A < 0); release scripts 0.5 (1.5B).
        beta2: gradient scale on high-side tokens (r > 1 + eps_high, A > 0); release scripts 1.0.
        eps_low: lower clip epsilon (0.2).
        eps_high: upper clip epsilon (0.2).
        clip_ratio_c: dual-clip constant (10 in the release scripts) or None.
        agg: loss aggregation (token-mean in the release scripts).
        loss_scale_factor: L of ``seq-mean-token-sum-norm``.

    """

    def __init__(
        self,
        beta1: float = 0.5,
        beta2: float = 1.0,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        clip_ratio_c: float | None = 10.0,
        agg: AggMode = "token-mean",
        loss_scale_factor: float | None = None,
    ) -> None:
        self.beta1, self.beta2, self.eps_low, self.eps_high = beta1, beta2, eps_low, eps_high
        self.clip_ratio_c, self.agg, self.loss_scale_factor = clip_ratio_c, agg, loss_scale_factor

    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        lsf = self.scale_factor(batch)
        return gppo_loss(
            batch.logp, batch.old_logp, batch.advantages, batch.mask, self.beta1, self.beta2,
            self.eps_low, self.eps_high, self.clip_ratio_c, self.agg, lsf, dp=batch.dp,
        )  # fmt: skip
