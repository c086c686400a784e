"""Clip-Cov and KL-Cov: act on the tokens whose log-prob/advantage covariance drives entropy down.

Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs"; verl ``clip_cov`` / ``kl_cov``;
shared/reference/algorithms.md section 1.10.

Entropy falls with the covariance between log-probability and advantage, so both act on the few
tokens with the largest centred covariance over the mini-batch's valid tokens,

    cov_t = (A_t - mean(A)) (log pi_t - mean(log pi))          (log pi detached in the means)

- Clip-Cov: among tokens not already clipped by PPO with ``lb < cov_t < ub``, pick
  ``max(1, floor(ratio N))`` at random and drop them from the loss (value and gradient x 0); the
  rest get PPO's ``max(L1, L2)``. The paper's scripts open the clip range to [0, 2] (eps 1 / 1).
- KL-Cov: the top ``max(1, floor(ratio N))`` tokens by cov_t get ``-A r + beta |log r|``; all others
  ``-A r`` (unclipped).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cappo_pl.losses.aggregation import AggMode, GlobalBatch, agg_loss, masked_mean
from cappo_pl.losses.base import PolicyLoss, TokenBatch


def token_covariance(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """``(A - mean A)(log pi - mean log pi)`` over the valid tokens (B, T), detached; -inf on padding."""
    lp = logp.detach()
    cov = (advantages - masked_mean(advantages, mask)) * (lp - masked_mean(lp, mask))
    return torch.where(mask > 0, cov, torch.full_like(cov, -torch.inf))


def _count(ratio: float, mask: Tensor) -> int:
    return max(1, int(ratio * float(mask.sum())))


def clip_cov_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    generator: torch.Generator,
    ratio: float = 2e-4,
    cov_lb: float = 1.0,
    cov_ub: float = 5.0,
    eps_low: float = 1.0,
    eps_high: float = 1.0,
    agg: AggMode = "token-mean",
    loss_scale_factor: float | None = None,
    dp: GlobalBatch | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clip-Cov (module docstring); ``generator`` draws which candidates are dropped.

    Returns:
        ``(loss, metrics)`` with ``cov_dropped_frac`` and ``clipfrac``.

    """
    r = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    loss1, loss2 = -advantages * r, -advantages * r.clamp(1.0 - eps_low, 1.0 + eps_high)
    clipped = (loss2 > loss1) & (mask > 0)
    cov = token_covariance(logp, advantages, mask).masked_fill(clipped, -torch.inf)
    candidates = torch.nonzero((cov > cov_lb) & (cov < cov_ub) & (mask > 0))
    keep = torch.ones_like(r)
    if len(candidates):
        pick = torch.randperm(len(candidates), generator=generator)[: _count(ratio, mask)]
        chosen = candidates[pick.to(candidates.device)]
        keep[chosen[:, 0], chosen[:, 1]] = 0.0
    loss = agg_loss(torch.maximum(loss1, loss2) * keep, mask, agg, loss_scale_factor, dp=dp)
    with torch.no_grad():
        metrics = {
            "cov_dropped_frac": masked_mean((keep == 0).float(), mask),
            "clipfrac": masked_mean(clipped.float(), mask),
        }
    return loss, metrics


def kl_cov_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ratio: float = 2e-4,
    beta: float = 1.0,
    agg: AggMode = "token-mean",
    loss_scale_factor: float | None = None,
    dp: GlobalBatch | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL-Cov (module docstring). Returns ``(loss, metrics)`` with ``cov_penalised_frac``."""
    log_r = (logp - old_logp).clamp(-20.0, 20.0)
    base = -advantages * torch.exp(log_r)
    cov = token_covariance(logp, advantages, mask).reshape(-1)
    top = torch.topk(cov, min(_count(ratio, mask), int(mask.sum())), largest=True).indices
    penalised = torch.zeros_like(cov, dtype=torch.bool)
    penalised[top] = True
    penalised = penalised.view_as(logp) & (mask > 0)
    per_token = torch.where(penalised, base + beta * log_r.abs(), base)
    loss = agg_loss(per_token, mask, agg, loss_scale_factor, dp=dp)
    return loss, {"cov_penalised_frac": masked_mean(penalised.float(), mask)}


class ClipCov(PolicyLoss):
    """Clip-Cov against pi_old.

    Args:
        ratio: fraction of tokens dropped (verl 2e-4).
        cov_lb: lower covariance bound of the candidates (1).
        cov_ub: upper covariance bound (5).
        eps_low: PPO clip epsilon (the paper's scripts 1.0: clipping effectively off).
        eps_high: PPO clip epsilon (1.0).
        agg: aggregation.
        seed: seed of the random pick (combined with the mini-batch's content, so a resumed run draws the same).

    """

    def __init__(
        self,
        ratio: float = 2e-4,
        cov_lb: float = 1.0,
        cov_ub: float = 5.0,
        eps_low: float = 1.0,
        eps_high: float = 1.0,
        agg: AggMode = "token-mean",
        seed: int = 0,
    ) -> None:
        self.ratio, self.cov_lb, self.cov_ub = ratio, cov_lb, cov_ub
        self.eps_low, self.eps_high, self.agg, self.seed = eps_low, eps_high, agg, seed

    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        # a pure function of the mini-batch and the seed: reproducible and exact on resume, no RNG state
        content = int(float((batch.old_logp * batch.mask).sum()) * 1e6) % (2**31)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + content)
        return clip_cov_loss(
            batch.logp, batch.old_logp, batch.advantages, batch.mask, gen, self.ratio, self.cov_lb, self.cov_ub,
            self.eps_low, self.eps_high, self.agg, self.scale_factor(batch), dp=batch.dp,
        )  # fmt: skip


class KLCov(PolicyLoss):
    """KL-Cov against pi_old.

    Args:
        ratio: fraction of tokens penalised (verl ``kl_cov_ratio`` 2e-4; the paper's k 0.2% for 7B).
        beta: coefficient of ``|log r|`` (``ppo_kl_coef``, 1 in the paper's scripts).
        agg: aggregation.

    """

    def __init__(self, ratio: float = 2e-4, beta: float = 1.0, agg: AggMode = "token-mean") -> None:
        self.ratio, self.beta, self.agg = ratio, beta, agg

    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        return kl_cov_loss(
            batch.logp, batch.old_logp, batch.advantages, batch.mask, self.ratio, self.beta, self.agg,
            self.scale_factor(batch), dp=batch.dp,
        )  # fmt: skip
