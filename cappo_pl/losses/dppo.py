"""DPPO: a trust region on the estimated divergence to the behaviour policy, instead of ratio clipping.

Qi et al. 2026, "Rethinking the Trust Region in LLM Reinforcement Learning" (arXiv:2602.04879; code:
sail-sg/Stable-RL ``compute_policy_loss_with_mask``, and verl ``compute_policy_loss_dppo_{tv,kl}``).
Anchored on the sampler's policy mu (``rollout_logp``), not on the recomputed pi_old:

    l_t = -A_t sg(min(pi(a_t) / mu(a_t), C)) log pi(a_t) M_t
    M_t = 1 - invalid_t (detached);  invalid_t = invalid_pos if A_t > 0 else invalid_neg

Binary approximations collapse the vocabulary to {sampled token, everything else}, with p = pi(a_t)
and p' = mu(a_t):

- Binary-TV: ``D = p - p'``; invalid_pos: ``D > delta_high``; invalid_neg: ``D < -delta_low``.
- Binary-KL: ``D = p' log(p'/p) + (1 - p') log((1 - p' + 1e-8) / (1 - p + 1e-8))``;
  invalid_pos: ``D > delta_high and p > p'``; invalid_neg: ``D > delta_low and p < p'``.

Top-K approximations (Stable-RL ``compute_topk_kl``) keep the sampler's K most likely tokens (the
sampled one forced in) and a "rest" bucket, ``rest = 1 - sum_K`` clamped >= 1e-12, for both policies:

- Top-K TV: ``D = 1/2 [sum_{i in K} |mu_i - pi_i| + |mu_rest - pi_rest|]``.
- Top-K KL: ``D = sum_{i in K} mu_i (log mu_i - log pi_i) + mu_rest (log mu_rest - log pi_rest)``.
- invalid_pos: ``D > delta_high and p > p'``; invalid_neg: ``D > delta_low and p < p'`` (the sampled token
  decides the direction). Coarsening the vocabulary can only lose divergence, so both lower-bound the
  full-vocabulary TV / KL and equal them when K = V.

Gradient w.r.t. ``log pi``: ``-A min(r, C) M``, PPO's unclipped branch inside the region, 0 outside.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from cappo_pl.constraints import PositiveFloat, checked_init
from cappo_pl.losses.aggregation import AggMode, masked_mean
from cappo_pl.losses.base import PolicyLoss, TokenBatch, TokenLoss

Divergence = Literal["binary_tv", "binary_kl", "topk_tv", "topk_kl"]
DEFAULT_DELTA = {"binary_tv": 0.15, "binary_kl": 0.05, "topk_tv": 0.15, "topk_kl": 0.05}


def topk_divergence(pi_topk_logp: Tensor, mu_topk_logp: Tensor, kind: Literal["topk_tv", "topk_kl"]) -> Tensor:
    """Top-K TV or KL(mu || pi) with a rest bucket (module docstring).

    Args:
        pi_topk_logp: (B, T, K) current logprobs of the sampler's top-K ids.
        mu_topk_logp: (B, T, K) the sampler's logprobs of the same ids.
        kind: ``topk_tv`` or ``topk_kl``.

    Returns:
        (B, T) float32 divergence, no gradient.

    """
    lp, lq = pi_topk_logp.detach().float(), mu_topk_logp.detach().float()
    p, q = lp.exp(), lq.exp()
    p_rest, q_rest = (1 - p.sum(-1)).clamp_min(1e-12), (1 - q.sum(-1)).clamp_min(1e-12)
    if kind == "topk_tv":
        return 0.5 * ((q - p).abs().sum(-1) + (q_rest - p_rest).abs())
    if kind == "topk_kl":
        return (q * (lq - lp)).sum(-1) + q_rest * (q_rest.log() - p_rest.log())
    raise ValueError(f"unknown DPPO Top-K divergence {kind!r}")


def binary_divergence(logp: Tensor, mu_logp: Tensor, kind: Divergence) -> Tensor:
    """Per-token binary TV (signed, ``p - p'``) or binary KL(mu || pi); (B, T), no gradient."""
    p, q = logp.detach().exp(), mu_logp.detach().exp()
    if kind == "binary_tv":
        return p - q
    if kind == "binary_kl":
        return q * (mu_logp.detach() - logp.detach()) + (1 - q) * torch.log((1 - q + 1e-8) / (1 - p + 1e-8))
    raise ValueError(f"unknown DPPO divergence {kind!r}")


def dppo_invalid(
    logp: Tensor,
    mu_logp: Tensor,
    advantages: Tensor,
    kind: Divergence,
    delta_low: float,
    delta_high: float,
    pi_topk_logp: Tensor | None = None,
    mu_topk_logp: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One-sided trust-region violations (bool (B, T)) and the divergence D (B, T); Top-K needs the (B, T, K)s."""
    if kind.startswith("topk"):
        if pi_topk_logp is None or mu_topk_logp is None:
            raise RuntimeError(f"DPPO {kind} needs top-K logprobs (model.rollout.top_k_logprobs > 0)")
        d = topk_divergence(pi_topk_logp, mu_topk_logp, kind)
    else:
        d = binary_divergence(logp, mu_logp, kind)
    if kind == "binary_tv":
        inv_pos, inv_neg = d > delta_high, d < -delta_low
    else:
        up = logp.detach() > mu_logp.detach()
        down = logp.detach() < mu_logp.detach()
        inv_pos, inv_neg = (d > delta_high) & up, (d > delta_low) & down
    return torch.where(advantages > 0, inv_pos, inv_neg), d


def dppo_token_loss(
    logp: Tensor,
    mu_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    kind: Divergence = "binary_tv",
    delta_low: float = 0.15,
    delta_high: float = 0.15,
    tis_cap: float = 10.0,
    pi_topk_logp: Tensor | None = None,
    mu_topk_logp: Tensor | None = None,
) -> TokenLoss:
    """Per-token DPPO loss ``-A sg(min(r, C)) log pi M`` (module docstring), ``r = pi / mu``.

    Args:
        logp: log pi (B, T), with gradient.
        mu_logp: log mu (B, T), the sampler's.
        advantages: A (B, T).
        mask: (B, T), the tokens the metrics average over.
        kind: the divergence (``Divergence``).
        delta_low: region size where pi falls below mu.
        delta_high: region size where pi rises above mu.
        tis_cap: cap C of the importance weight.
        pi_topk_logp: (B, T, K) current logprobs of the sampler's top-K ids (Top-K only).
        mu_topk_logp: (B, T, K) the sampler's logprobs of the same ids (Top-K only).

    Returns:
        ``l`` (B, T), no clip regions, and the metrics ``dppo_masked`` (fraction of tokens masked),
        ``dppo_masked_pos`` / ``dppo_masked_neg`` (masked with A > 0 / A <= 0), ``dppo_divergence``
        (mean D) and ``tis_clipfrac`` (r > C).

    """
    invalid, d = dppo_invalid(logp, mu_logp, advantages, kind, delta_low, delta_high, pi_topk_logp, mu_topk_logp)
    ratio = torch.exp((logp.detach() - mu_logp.detach()).clamp(max=20.0))  # clamped above only
    weight = ratio.clamp(max=tis_cap)
    per_token = -advantages * weight * logp * (~invalid).to(logp.dtype)
    metrics = {
        "dppo_masked": masked_mean(invalid.float(), mask),
        "dppo_masked_pos": masked_mean((invalid & (advantages > 0)).float(), mask),
        "dppo_masked_neg": masked_mean((invalid & (advantages <= 0)).float(), mask),
        "dppo_divergence": masked_mean(d, mask),
        "tis_clipfrac": masked_mean((ratio > tis_cap).float(), mask),
    }
    return TokenLoss(per_token, metrics=metrics)


class DPPO(PolicyLoss):
    """DPPO with a Binary or Top-K, TV or KL trust region around the sampler's policy.

    Args:
        divergence: ``binary_tv``, ``binary_kl``, ``topk_tv`` or ``topk_kl`` (Top-K needs
            ``model.rollout.top_k_logprobs``; the paper's K is 20).
        delta_low: region size on the side where pi falls below mu (TV 0.15, KL 0.05).
        delta_high: region size on the side where pi rises above mu (TV 0.15, KL 0.05).
        tis_cap: cap C of the truncated importance weight (Stable-RL 10).
        agg: aggregation (the paper's example: seq-mean-token-sum-norm).
        loss_scale_factor: L of ``seq-mean-token-sum-norm`` (None: the batch's max_new_tokens).

    """

    @checked_init
    def __init__(
        self,
        divergence: Divergence = "binary_tv",
        delta_low: PositiveFloat | None = None,
        delta_high: PositiveFloat | None = None,
        tis_cap: PositiveFloat = 10.0,
        agg: AggMode = "seq-mean-token-sum-norm",
        loss_scale_factor: PositiveFloat | None = None,
    ) -> None:
        self.divergence = divergence
        self.needs_topk = divergence.startswith("topk")
        self.delta_low = DEFAULT_DELTA[divergence] if delta_low is None else delta_low
        self.delta_high = DEFAULT_DELTA[divergence] if delta_high is None else delta_high
        self.tis_cap, self.agg, self.loss_scale_factor = tis_cap, agg, loss_scale_factor

    def token_loss(self, b: TokenBatch) -> TokenLoss:
        args = (self.divergence, self.delta_low, self.delta_high, self.tis_cap, b.topk_logp, b.rollout_topk_logp)
        return dppo_token_loss(b.logp, b.rollout_logp, b.advantages, b.mask, *args)
