"""GPPO and CE-GPPO: bounded gradients for tokens outside the PPO clip interval.

CE-GPPO (Su et al. 2025, "CE-GPPO: Coordinating Entropy via Gradient-Preserving Clipping Policy
Optimization in Reinforcement Learning", arXiv:2509.20712; code: Kwai-Klear/CE-GPPO
``compute_gppo_loss_general_beta``); GPPO is Klear-Reasoner's (arXiv:2508.07629). PPO gives tokens
that are already clipped no gradient; GPPO keeps a bounded one through ``r / sg(r)`` (value 1,
gradient ``grad log pi``):

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

from cappo_pl.constraints import NonNegativeFloat, PositiveFloat, checked_init
from cappo_pl.losses.aggregation import AggMode
from cappo_pl.losses.base import PolicyLoss, TokenBatch, TokenLoss
from cappo_pl.losses.ratio import ClipEpsLow, DualClipC, dual_clip, log_ratio


def gppo_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    beta1: float = 0.5,
    beta2: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_ratio_c: float | None = 10.0,
) -> TokenLoss:
    """Per-token CE-GPPO loss (module docstring).

    Args:
        logp: log pi (B, T), with gradient.
        old_logp: log pi_old (B, T).
        advantages: A (B, T).
        beta1: gradient scale on the low side.
        beta2: gradient scale on the high side.
        eps_low: lower clip epsilon.
        eps_high: upper clip epsilon.
        clip_ratio_c: dual-clip constant c (> 1), or None.

    Returns:
        ``l`` (B, T) and the regions ``low``, ``high``, ``clipped`` (low or high), ``dual`` and ``log_ratio``
        (``log r`` clamped to [-20, 20] as PPO's; the fork does not clamp, the same in range).

    """
    lr = log_ratio(logp, old_logp)
    ratio = torch.exp(lr)
    unit = ratio / ratio.detach()  # value 1, gradient d log pi
    low = (ratio < 1.0 - eps_low) & (advantages < 0)
    high = (ratio > 1.0 + eps_high) & (advantages > 0)
    per_token = torch.where(
        low,
        -beta1 * (1.0 - eps_low) * unit * advantages,
        torch.where(high, -beta2 * (1.0 + eps_high) * unit * advantages, -ratio * advantages),
    )
    per_token, dual = dual_clip(per_token, advantages, clip_ratio_c)
    return TokenLoss(per_token, {"clipped": low | high, "low": low, "high": high, "dual": dual, "log_ratio": lr})


class GPPO(PolicyLoss):
    """CE-GPPO against pi_old; ``beta1 = beta2 = 1`` is plain GPPO (``gppo_token_loss``).

    Args:
        beta1: gradient scale on low-side tokens (r < 1 - eps_low, A < 0); release scripts 0.5 (1.5B).
        beta2: gradient scale on high-side tokens (r > 1 + eps_high, A > 0); release scripts 1.0.
        eps_low: lower clip epsilon (0.2).
        eps_high: upper clip epsilon (0.2).
        clip_ratio_c: dual-clip constant (10 in the release scripts) or None.
        agg: loss aggregation (token-mean in the release scripts).
        loss_scale_factor: L of ``seq-mean-token-sum-norm``.

    """

    @checked_init
    def __init__(
        self,
        beta1: NonNegativeFloat = 0.5,
        beta2: NonNegativeFloat = 1.0,
        eps_low: ClipEpsLow = 0.2,
        eps_high: PositiveFloat = 0.2,
        clip_ratio_c: DualClipC | None = 10.0,
        agg: AggMode = "token-mean",
        loss_scale_factor: PositiveFloat | None = None,
    ) -> None:
        self.beta1, self.beta2, self.eps_low, self.eps_high = beta1, beta2, eps_low, eps_high
        self.clip_ratio_c, self.agg, self.loss_scale_factor = clip_ratio_c, agg, loss_scale_factor

    def token_loss(self, b: TokenBatch) -> TokenLoss:
        args = (self.beta1, self.beta2, self.eps_low, self.eps_high, self.clip_ratio_c)
        return gppo_token_loss(b.logp, b.old_logp, b.advantages, *args)
