"""torchmetrics metrics."""

from cappo_pl.metrics.exact import ExactSupportMetrics, eps_key, exact_keys, exact_prompt_metrics
from cappo_pl.metrics.hidden import EdgeFailure, HiddenTarget, RandomAnswers, RareAnswers
from cappo_pl.metrics.passk import SampledPassAtK, pass_at_k, pass_at_k_tensor
from cappo_pl.metrics.srr import SupportRetentionRatio, mean_token_logprob, threshold_key

__all__ = [
    "EdgeFailure",
    "ExactSupportMetrics",
    "HiddenTarget",
    "RandomAnswers",
    "RareAnswers",
    "SampledPassAtK",
    "SupportRetentionRatio",
    "eps_key",
    "exact_keys",
    "exact_prompt_metrics",
    "mean_token_logprob",
    "pass_at_k",
    "pass_at_k_tensor",
    "threshold_key",
]
