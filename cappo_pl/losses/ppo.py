"""PPO-clip with asymmetric (clip-higher) bounds and dual-clip.

PPO (Schulman et al. 2017, arXiv:1707.06347); clip-higher ``eps_high`` from DAPO (Yu et al. 2025,
arXiv:2503.14476); dual-clip from Ye et al. 2020 (arXiv:1912.09729). The formula is verl's
``compute_policy_loss_vanilla`` (verl-project/verl ``verl/trainer/ppo/core_algos.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cappo_pl.constraints import PositiveFloat, checked_init
from cappo_pl.losses.aggregation import AggMode
from cappo_pl.losses.base import PolicyLoss, TokenBatch, TokenLoss
from cappo_pl.losses.ratio import ClipEpsLow, DualClipC, dual_clip, log_ratio


def ppo_clip_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_ratio_c: float | None = 3.0,
) -> TokenLoss:
    """Per-token PPO-clip loss with dual-clip.

    ``r = exp(clamp(logp - old_logp, -20, 20))``, ``L1 = -A r``, ``L2 = -A clip(r, 1 - eps_low, 1 + eps_high)``,
    ``l = max(L1, L2)``; for ``A < 0`` (dual-clip, ``c > 1``): ``l = min(l, -A c)``.

    Args:
        logp: log pi (B, T), with gradient.
        old_logp: log pi_old (B, T).
        advantages: A (B, T).
        eps_low: lower clip epsilon.
        eps_high: upper clip epsilon.
        clip_ratio_c: dual-clip constant c (> 1), or None to disable.

    Returns:
        ``l`` (B, T) and the regions ``clipped`` (L2 > L1), ``low`` (A < 0 and r < 1 - eps_low), ``high``
        (A > 0 and r > 1 + eps_high), ``dual`` (dual-clip binds) and ``log_ratio``.

    """
    lr = log_ratio(logp, old_logp)
    ratio = torch.exp(lr)
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token, dual = dual_clip(torch.maximum(loss1, loss2), advantages, clip_ratio_c)
    regions = {
        "clipped": loss2 > loss1,
        "low": (advantages < 0) & (ratio < 1.0 - eps_low),
        "high": (advantages > 0) & (ratio > 1.0 + eps_high),
        "dual": dual,
        "log_ratio": lr,
    }
    return TokenLoss(per_token, regions)


class PPOClip(PolicyLoss):
    """PPO-clip surrogate against pi_old (recomputed at step start); ``ppo_clip_token_loss``.

    Args:
        eps_low: lower clip epsilon.
        eps_high: upper clip epsilon (DAPO clip-higher uses 0.28).
        clip_ratio_c: dual-clip constant (> 1) or None.
        agg: loss aggregation mode.
        loss_scale_factor: L of ``seq-mean-token-sum-norm`` (None: the batch's, i.e. max_new_tokens).

    """

    @checked_init
    def __init__(
        self,
        eps_low: ClipEpsLow = 0.2,
        eps_high: PositiveFloat = 0.2,
        clip_ratio_c: DualClipC | None = 3.0,
        agg: AggMode = "token-mean",
        loss_scale_factor: PositiveFloat | None = None,
    ) -> None:
        self.eps_low, self.eps_high, self.clip_ratio_c = eps_low, eps_high, clip_ratio_c
        self.agg, self.loss_scale_factor = agg, loss_scale_factor

    def token_loss(self, b: TokenBatch) -> TokenLoss:
        return ppo_clip_token_loss(b.logp, b.old_logp, b.advantages, self.eps_low, self.eps_high, self.clip_ratio_c)
