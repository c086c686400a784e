"""Policy surrogates, KL estimators and loss aggregation."""

from cappo_pl.losses.aggregation import AGG_MODES, AggMode, agg_loss, masked_mean
from cappo_pl.losses.base import PolicyLoss, TokenBatch
from cappo_pl.losses.kl import KLEstimator, kl_penalty
from cappo_pl.losses.ppo import PPOClip, ppo_clip_loss

__all__ = [
    "AGG_MODES",
    "AggMode",
    "KLEstimator",
    "PPOClip",
    "PolicyLoss",
    "TokenBatch",
    "agg_loss",
    "kl_penalty",
    "masked_mean",
    "ppo_clip_loss",
]
