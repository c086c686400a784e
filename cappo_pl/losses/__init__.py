"""Policy surrogates, KL estimators and loss aggregation.

A surrogate is a ``PolicyLoss`` whose ``token_loss`` gives the per-token loss and its clip regions
(``TokenLoss``); the pure ``*_token_loss`` functions hold the math.
"""

from cappo_pl.losses.aggregation import AGG_MODES, AggMode, agg_loss, masked_mean
from cappo_pl.losses.base import CLIP_METRICS, PolicyLoss, TokenBatch, TokenLoss
from cappo_pl.losses.cov import ClipCov, KLCov, clip_cov_token_loss, kl_cov_token_loss, token_covariance
from cappo_pl.losses.dppo import DPPO, binary_divergence, dppo_invalid, dppo_token_loss, topk_divergence
from cappo_pl.losses.erc import ERC, entropy_ratio, entropy_ratio_keep
from cappo_pl.losses.gppo import GPPO, gppo_token_loss
from cappo_pl.losses.kl import KLEstimator, kl_penalty
from cappo_pl.losses.ppo import PPOClip, ppo_clip_token_loss
from cappo_pl.losses.ratio import dual_clip, importance_ratio, log_ratio
from cappo_pl.losses.sequence import CISPO, GPG, GSPO, cispo_token_loss, gspo_token_loss

__all__ = [
    "AGG_MODES",
    "CISPO",
    "CLIP_METRICS",
    "DPPO",
    "ERC",
    "GPG",
    "GPPO",
    "GSPO",
    "AggMode",
    "ClipCov",
    "KLCov",
    "KLEstimator",
    "PPOClip",
    "PolicyLoss",
    "TokenBatch",
    "TokenLoss",
    "agg_loss",
    "binary_divergence",
    "cispo_token_loss",
    "clip_cov_token_loss",
    "dppo_invalid",
    "dppo_token_loss",
    "dual_clip",
    "entropy_ratio",
    "entropy_ratio_keep",
    "gppo_token_loss",
    "gspo_token_loss",
    "importance_ratio",
    "kl_cov_token_loss",
    "kl_penalty",
    "log_ratio",
    "masked_mean",
    "ppo_clip_token_loss",
    "token_covariance",
    "topk_divergence",
]
