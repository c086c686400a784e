"""ERC: entropy-ratio clipping (shared/reference/papers/001; Kwai-Klear/ERC, algorithms.md section 3.1).

Per token, the ratio of the current policy's full-vocabulary entropy to pi_old's (both on
temperature-scaled logits; pi_old's from the step-start pass, stored per token):

    rho_t  = (H_t + 1e-8) / (H_t^old + 1e-8)
    keep_t = (1 - beta_low < rho_t < 1 + beta_high)          # strict, as in the code
    l_t    = keep_t ? l_t^base : sg(l_t^base)                 # value kept, gradient zeroed

on top of DAPO's PPO-clip (clip-higher, dual-clip) or GPPO (beta1 = beta2 = 1, dual-clip). Masked
tokens stay in the aggregation's denominator; no gradient flows through rho.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from cappo_pl.errors import ConfigError
from cappo_pl.losses.aggregation import AggMode, GlobalBatch, agg_loss, masked_mean
from cappo_pl.losses.base import PolicyLoss, TokenBatch
from cappo_pl.losses.gppo import gppo_metrics, gppo_token_loss
from cappo_pl.losses.ppo import ppo_clip_token_loss


def entropy_ratio(entropy: Tensor, old_entropy: Tensor) -> Tensor:
    """ERC's ``rho = (H + 1e-8) / (H_old + 1e-8)`` (B, T), detached (no gradient flows through it)."""
    return (entropy.detach() + 1e-8) / (old_entropy.detach() + 1e-8)


def entropy_ratio_keep(entropy: Tensor, old_entropy: Tensor, beta_low: float, beta_high: float) -> Tensor:
    """ERC's keep mask (B, T) bool: ``1 - beta_low < rho < 1 + beta_high`` (strict)."""
    rho = entropy_ratio(entropy, old_entropy)
    return (rho > 1.0 - beta_low) & (rho < 1.0 + beta_high)


def erc_loss(
    base_per_token: Tensor,
    entropy: Tensor,
    old_entropy: Tensor,
    mask: Tensor,
    beta_low: float = 0.05,
    beta_high: float = 0.05,
    agg: AggMode = "token-mean",
    loss_scale_factor: float | None = None,
    dp: GlobalBatch | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Aggregate a per-token base loss (B, T) with ERC's gradient mask.

    Returns:
        ``(loss, metrics)`` with ``erc_masked_frac`` (fraction of the masked-in tokens whose gradient
        is cut) and ``entropy_ratio`` (mean rho).

    """
    keep = entropy_ratio_keep(entropy, old_entropy, beta_low, beta_high)
    per_token = torch.where(keep, base_per_token, base_per_token.detach())
    loss = agg_loss(per_token, mask, agg, loss_scale_factor, dp=dp)
    with torch.no_grad():
        rho = entropy_ratio(entropy, old_entropy)
        metrics = {"erc_masked_frac": masked_mean((~keep).float(), mask), "entropy_ratio": masked_mean(rho, mask)}
    return loss, metrics


class ERC(PolicyLoss):
    """Entropy-ratio clipping on top of DAPO (PPO-clip, clip-higher) or GPPO.

    Args:
        base: ``dapo`` (PPO-clip with eps_low/eps_high and dual-clip) or ``gppo`` (beta1 = beta2 = 1).
        beta_low: lower band, keep rho > 1 - beta_low (release scripts 0.05).
        beta_high: upper band, keep rho < 1 + beta_high (0.05).
        eps_low: lower clip epsilon (0.2).
        eps_high: upper clip epsilon (0.28 for dapo, 0.2 for gppo in the release scripts).
        clip_ratio_c: dual-clip constant (10) or None.
        agg: aggregation (token-mean in the release scripts).
        loss_scale_factor: L of ``seq-mean-token-sum-norm``.

    """

    needs_old_entropy = True

    def __init__(
        self,
        base: Literal["dapo", "gppo"] = "dapo",
        beta_low: float = 0.05,
        beta_high: float = 0.05,
        eps_low: float = 0.2,
        eps_high: float = 0.28,
        clip_ratio_c: float | None = 10.0,
        agg: AggMode = "token-mean",
        loss_scale_factor: float | None = None,
    ) -> None:
        if base not in ("dapo", "gppo"):
            raise ConfigError(f"model.objectives: loss ERC: base must be 'dapo' or 'gppo', got {base!r}")
        self.base, self.beta_low, self.beta_high = base, beta_low, beta_high
        self.eps_low, self.eps_high, self.clip_ratio_c = eps_low, eps_high, clip_ratio_c
        self.agg, self.loss_scale_factor = agg, loss_scale_factor

    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if batch.entropy is None or batch.old_entropy is None:
            raise RuntimeError("ERC needs the per-token entropy of the current forward and of pi_old")
        args = (batch.logp, batch.old_logp, batch.advantages)
        if self.base == "gppo":
            per_token, regions = gppo_token_loss(*args, 1.0, 1.0, self.eps_low, self.eps_high, self.clip_ratio_c)
        else:
            per_token, regions = ppo_clip_token_loss(*args, self.eps_low, self.eps_high, self.clip_ratio_c)
        lsf = self.scale_factor(batch)
        loss, metrics = erc_loss(
            per_token, batch.entropy, batch.old_entropy, batch.mask, self.beta_low, self.beta_high, self.agg, lsf,
            dp=batch.dp,
        )
        regions.setdefault("clipped", regions["low"] | regions["high"])
        return loss, {**gppo_metrics(regions, batch.mask), **metrics}
