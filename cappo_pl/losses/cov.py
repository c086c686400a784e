"""Clip-Cov and KL-Cov: act on the tokens whose log-prob/advantage covariance drives entropy down.

Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models"
(arXiv:2505.22617); verl ``clip_cov`` / ``kl_cov`` policy-loss modes.

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

from typing import Annotated

import torch
from annotated_types import Interval
from torch import Tensor

from cappo_pl.constraints import NonNegativeFloat, PositiveFloat, checked_init
from cappo_pl.errors import ConfigError
from cappo_pl.losses.aggregation import AggMode, masked_mean
from cappo_pl.losses.base import PolicyLoss, TokenBatch, TokenLoss
from cappo_pl.losses.ratio import ClipEpsLow, importance_ratio, log_ratio
from cappo_pl.seeds import generator

TokenFraction = Annotated[float, Interval(gt=0, le=1)]
"""The fraction of a mini-batch's tokens acted on (at least one token is)."""


def token_covariance(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """``(A - mean A)(log pi - mean log pi)`` over the valid tokens (B, T), detached; -inf on padding."""
    lp = logp.detach()
    cov = (advantages - masked_mean(advantages, mask)) * (lp - masked_mean(lp, mask))
    return torch.where(mask > 0, cov, torch.full_like(cov, -torch.inf))


def _count(ratio: float, mask: Tensor) -> int:
    return max(1, int(ratio * float(mask.sum())))


def clip_cov_token_loss(
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
) -> TokenLoss:
    """Per-token Clip-Cov loss (module docstring); tensors (B, T), ``generator`` draws the dropped tokens.

    Returns:
        ``l`` (B, T), the region ``clipped`` (PPO's L2 > L1 on valid tokens) and the metric
        ``cov_dropped_frac``.

    """
    r = importance_ratio(logp, old_logp)
    loss1, loss2 = -advantages * r, -advantages * r.clamp(1.0 - eps_low, 1.0 + eps_high)
    clipped = (loss2 > loss1) & (mask > 0)
    cov = token_covariance(logp, advantages, mask).masked_fill(clipped, -torch.inf)
    candidates = torch.nonzero((cov > cov_lb) & (cov < cov_ub) & (mask > 0))
    keep = torch.ones_like(r)
    if len(candidates):
        pick = torch.randperm(len(candidates), generator=generator)[: _count(ratio, mask)]
        chosen = candidates[pick.to(candidates.device)]
        keep[chosen[:, 0], chosen[:, 1]] = 0.0
    metrics = {"cov_dropped_frac": masked_mean((keep == 0).float(), mask)}
    return TokenLoss(torch.maximum(loss1, loss2) * keep, {"clipped": clipped}, metrics)


def kl_cov_token_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, ratio: float = 2e-4, beta: float = 1.0
) -> TokenLoss:
    """Per-token KL-Cov loss (module docstring); tensors (B, T). Metric: ``cov_penalised_frac``."""
    log_r = log_ratio(logp, old_logp)
    base = -advantages * torch.exp(log_r)
    cov = token_covariance(logp, advantages, mask).reshape(-1)
    top = torch.topk(cov, min(_count(ratio, mask), int(mask.sum())), largest=True).indices
    penalised = torch.zeros_like(cov, dtype=torch.bool)
    penalised[top] = True
    penalised = penalised.view_as(logp) & (mask > 0)
    per_token = torch.where(penalised, base + beta * log_r.abs(), base)
    return TokenLoss(per_token, metrics={"cov_penalised_frac": masked_mean(penalised.float(), mask)})


class ClipCov(PolicyLoss):
    """Clip-Cov against pi_old (``clip_cov_token_loss``).

    Args:
        ratio: fraction of tokens dropped (verl 2e-4).
        cov_lb: lower covariance bound of the candidates (1).
        cov_ub: upper covariance bound (5).
        eps_low: PPO clip epsilon (the paper's scripts 1.0: clipping effectively off).
        eps_high: PPO clip epsilon (1.0).
        agg: aggregation.
        seed: seed of the random pick (combined with the mini-batch's content, so a resumed run draws the same).

    """

    @checked_init
    def __init__(
        self,
        ratio: TokenFraction = 2e-4,
        cov_lb: float = 1.0,
        cov_ub: float = 5.0,
        eps_low: ClipEpsLow = 1.0,
        eps_high: PositiveFloat = 1.0,
        agg: AggMode = "token-mean",
        seed: int = 0,
    ) -> None:
        if cov_lb >= cov_ub:
            raise ConfigError(f"ClipCov.cov_lb: must be < cov_ub ({cov_ub}), got {cov_lb}")
        self.ratio, self.cov_lb, self.cov_ub = ratio, cov_lb, cov_ub
        self.eps_low, self.eps_high, self.agg, self.seed = eps_low, eps_high, agg, seed

    def token_loss(self, b: TokenBatch) -> TokenLoss:
        # a pure function of the mini-batch and the seed: reproducible and exact on resume, no RNG state
        content = int(float((b.old_logp * b.mask).sum()) * 1e6) % (2**31)
        gen = generator(self.seed, "clip_cov", content)
        args = (gen, self.ratio, self.cov_lb, self.cov_ub, self.eps_low, self.eps_high)
        return clip_cov_token_loss(b.logp, b.old_logp, b.advantages, b.mask, *args)


class KLCov(PolicyLoss):
    """KL-Cov against pi_old (``kl_cov_token_loss``).

    Args:
        ratio: fraction of tokens penalised (verl ``kl_cov_ratio`` 2e-4; the paper's k 0.2% for 7B).
        beta: coefficient of ``|log r|`` (``ppo_kl_coef``, 1 in the paper's scripts).
        agg: aggregation.

    """

    @checked_init
    def __init__(self, ratio: TokenFraction = 2e-4, beta: NonNegativeFloat = 1.0, agg: AggMode = "token-mean") -> None:
        self.ratio, self.beta, self.agg = ratio, beta, agg

    def token_loss(self, b: TokenBatch) -> TokenLoss:
        return kl_cov_token_loss(b.logp, b.old_logp, b.advantages, b.mask, self.ratio, self.beta)
