"""torchmetrics metrics."""

from cappo_pl.metrics.srr import SupportRetentionRatio, mean_token_logprob, threshold_key

__all__ = ["SupportRetentionRatio", "mean_token_logprob", "threshold_key"]
