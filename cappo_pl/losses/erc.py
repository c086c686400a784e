"""ERC: entropy-ratio clipping on top of any surrogate.

Su et al. 2025, "Entropy Ratio Clipping as a Soft Global Constraint for Stable Reinforcement
Learning" (arXiv:2512.05591; code: Kwai-Klear/ERC ``core_algos.py``). Per token, the ratio of the
current policy's full-vocabulary entropy to pi_old's (both on temperature-scaled logits; pi_old's
from the step-start pass, stored per token):

    rho_t  = (H_t + 1e-8) / (H_t^old + 1e-8)
    keep_t = (1 - beta_low < rho_t < 1 + beta_high)          # strict, as in the code
    l_t    = keep_t ? l_t^base : sg(l_t^base)                 # value kept, gradient zeroed

The paper puts it on DAPO's PPO-clip (eps 0.2 / 0.28, dual-clip 10) and on GPPO (beta1 = beta2 = 1,
dual-clip 10); here ``base`` is any ``PolicyLoss``. Masked tokens stay in the aggregation's
denominator; no gradient flows through rho.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cappo_pl.constraints import PositiveFloat, checked_init
from cappo_pl.errors import ConfigError
from cappo_pl.losses.aggregation import AggMode, masked_mean
from cappo_pl.losses.base import PolicyLoss, TokenBatch, TokenLoss
from cappo_pl.losses.ppo import PPOClip
from cappo_pl.losses.ratio import ClipEpsLow


def entropy_ratio(entropy: Tensor, old_entropy: Tensor) -> Tensor:
    """ERC's ``rho = (H + 1e-8) / (H_old + 1e-8)`` (B, T), detached (no gradient flows through it)."""
    return (entropy.detach() + 1e-8) / (old_entropy.detach() + 1e-8)


def entropy_ratio_keep(entropy: Tensor, old_entropy: Tensor, beta_low: float, beta_high: float) -> Tensor:
    """ERC's keep mask (B, T) bool: ``1 - beta_low < rho < 1 + beta_high`` (strict)."""
    rho = entropy_ratio(entropy, old_entropy)
    return (rho > 1.0 - beta_low) & (rho < 1.0 + beta_high)


class ERC(PolicyLoss):
    """Entropy-ratio clipping around a base surrogate: its value everywhere, its gradient only inside the band.

    The aggregation, loss-scale factor and ``needs_topk`` are the base's. Metrics: the base's, with
    ``clipfrac`` counted as ``low | high`` when the base has those regions (PPO's ``L2 > L1`` is the
    same set up to float ties), plus ``erc_masked_frac`` (fraction of the masked-in tokens whose
    gradient is cut) and ``entropy_ratio`` (mean rho).

    Args:
        base: the surrogate (``class_path``); None: DAPO's PPO-clip, ``PPOClip(eps_low=0.2,
            eps_high=0.28, clip_ratio_c=10.0, agg="token-mean")``. The paper's GPPO base is
            ``GPPO(beta1=1.0, beta2=1.0, clip_ratio_c=10.0)``.
        beta_low: lower band, keep rho > 1 - beta_low (release scripts 0.05).
        beta_high: upper band, keep rho < 1 + beta_high (0.05).

    Raises:
        ConfigError: ``base`` is not a ``PolicyLoss`` (e.g. the former strings ``dapo`` / ``gppo``).

    """

    @checked_init
    def __init__(
        self, base: PolicyLoss | None = None, beta_low: ClipEpsLow = 0.05, beta_high: PositiveFloat = 0.05
    ) -> None:
        if base is None:
            base = PPOClip(eps_low=0.2, eps_high=0.28, clip_ratio_c=10.0, agg="token-mean")
        if not isinstance(base, PolicyLoss):
            raise ConfigError(
                "model.objectives: loss ERC.base must be a policy loss given by class_path, e.g. "
                "{class_path: cappo_pl.losses.PPOClip, init_args: {eps_low: 0.2, eps_high: 0.28, clip_ratio_c: 10.0}} "
                f"(the former 'dapo'; 'gppo' is cappo_pl.losses.GPPO with beta1: 1.0, beta2: 1.0, clip_ratio_c: 10.0 "
                f"and the former ERC eps_low / eps_high), got {base!r}"
            )
        self.base, self.beta_low, self.beta_high = base, beta_low, beta_high

    @property
    def agg(self) -> AggMode:
        return self.base.agg

    @property
    def loss_scale_factor(self) -> float | None:
        return self.base.loss_scale_factor

    @property
    def needs_topk(self) -> bool:
        return self.base.needs_topk

    def token_loss(self, b: TokenBatch) -> TokenLoss:
        if b.entropy is None or b.old_entropy is None:
            raise RuntimeError("ERC needs the per-token entropy of the current forward and of pi_old")
        out = self.base.token_loss(b)
        keep = entropy_ratio_keep(b.entropy, b.old_entropy, self.beta_low, self.beta_high)
        regions = dict(out.regions)
        if "low" in regions and "high" in regions:
            regions["clipped"] = regions["low"] | regions["high"]
        metrics = {
            **out.metrics,
            "erc_masked_frac": masked_mean((~keep).float(), b.mask),
            "entropy_ratio": masked_mean(entropy_ratio(b.entropy, b.old_entropy), b.mask),
        }
        return TokenLoss(torch.where(keep, out.per_token, out.per_token.detach()), regions, metrics)
