"""Policy surrogates, KL estimators and loss aggregation."""

from cappo_pl.losses.aggregation import AGG_MODES, AggMode, agg_loss, masked_mean
from cappo_pl.losses.base import PolicyLoss, TokenBatch
from cappo_pl.losses.cov import ClipCov, KLCov, clip_cov_loss, kl_cov_loss, token_covariance
from cappo_pl.losses.dppo import DPPO, binary_divergence, dppo_loss, topk_divergence
from cappo_pl.losses.erc import ERC, entropy_ratio, entropy_ratio_keep, erc_loss
from cappo_pl.losses.gppo import GPPO, gppo_loss, gppo_token_loss
from cappo_pl.losses.kl import KLEstimator, kl_penalty
from cappo_pl.losses.ppo import PPOClip, ppo_clip_loss, ppo_clip_token_loss
from cappo_pl.losses.sequence import CISPO, GPG, GSPO, cispo_loss, gspo_loss

__all__ = [
    "AGG_MODES",
    "CISPO",
    "ClipCov",
    "KLCov",
    "clip_cov_loss",
    "kl_cov_loss",
    "token_covariance",
    "GPG",
    "GSPO",
    "cispo_loss",
    "gspo_loss",
    "DPPO",
    "ERC",
    "GPPO",
    "AggMode",
    "binary_divergence",
    "topk_divergence",
    "dppo_loss",
    "entropy_ratio",
    "entropy_ratio_keep",
    "erc_loss",
    "gppo_loss",
    "gppo_token_loss",
    "ppo_clip_token_loss",
    "KLEstimator",
    "PPOClip",
    "PolicyLoss",
    "TokenBatch",
    "agg_loss",
    "kl_penalty",
    "masked_mean",
    "ppo_clip_loss",
]
