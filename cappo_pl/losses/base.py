"""The policy-loss extension point: per-token tensors in, one per-token loss and its clip regions out.

A surrogate implements ``PolicyLoss.token_loss(batch) -> TokenLoss``: its per-token loss ``l_t`` (B, T),
the bool masks of its clip regions, and any metric of its own. The base class does the rest once for
every surrogate: the aggregation ``agg(l, mask)`` (``agg_loss``, with the loss-scale factor and the
data-parallel group) and the shared clip metrics (``CLIP_METRICS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import final

import torch
from torch import Tensor

from cappo_pl.losses.aggregation import AggMode, GlobalBatch, agg_loss, masked_mean


@dataclass
class TokenBatch:
    """Per-token tensors of one mini-batch, all shaped (B, T) over completion positions.

    Attributes:
        logp: log pi_theta(a_t) under the current parameters (carries the gradient).
        old_logp: log pi_old(a_t), recomputed with no grad at the start of the RL step (PPO anchor).
        rollout_logp: log mu(a_t), recorded by the sampler (behaviour policy; DPPO's anchor).
        advantages: A_t, the sequence advantage broadcast over its tokens.
        mask: 1 for completion tokens that count (up to and including EOS), 0 for padding.
        entropy: per-token entropy of the current policy (temperature-scaled), with gradient.
        old_entropy: per-token entropy of pi_old, no gradient (None if not computed).
        ref_logp: log pi_ref(a_t) (None when no objective needs the reference).
        rewards: (B,) sequence rewards.
        correct: (B,) bool, the sample counted as a success (reward >= the success threshold).
        loss_scale_factor: L of ``seq-mean-token-sum-norm`` (the rollout's ``max_new_tokens``).
        topk_logp: (B, T, K) current logprobs of the sampler's top-K ids, no grad (DPPO Top-K).
        rollout_topk_logp: (B, T, K) the sampler's own logprobs of those ids (mu; sampled token included).
        dp: the data-parallel group: losses are normalised over the global mini-batch (``agg_loss``);
            None with one process.

    """

    logp: Tensor
    old_logp: Tensor
    rollout_logp: Tensor
    advantages: Tensor
    mask: Tensor
    entropy: Tensor | None = None
    old_entropy: Tensor | None = None
    ref_logp: Tensor | None = None
    rewards: Tensor | None = None
    correct: Tensor | None = None
    loss_scale_factor: float | None = None
    topk_logp: Tensor | None = None
    rollout_topk_logp: Tensor | None = None
    dp: GlobalBatch | None = None


CLIP_METRICS: dict[str, str] = {
    "clipped": "clipfrac",
    "low": "clipfrac_low",
    "high": "clipfrac_high",
    "dual": "clipfrac_dual",
    "log_ratio": "ppo_kl",
}
"""Region name -> the metric ``TokenLoss.reduce`` reports for it (a masked mean; ``ppo_kl`` of ``-log r``)."""


@dataclass
class TokenLoss:
    """What a surrogate computes per token, before aggregation.

    Attributes:
        per_token: the per-token loss ``l_t``, shape (B, T), carrying the gradient.
        regions: clip regions, bool (B, T), named as in ``CLIP_METRICS``: ``clipped`` (the clipped branch
            is taken), ``low`` (A < 0 and r < 1 - eps_low), ``high`` (A > 0 and r > 1 + eps_high), ``dual``
            (dual-clip binds); and ``log_ratio`` (B, T), ``log r``. A surrogate gives the ones it has.
        metrics: the surrogate's own scalar metrics (detached by ``reduce``).

    """

    per_token: Tensor
    regions: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)

    def reduce(
        self,
        mask: Tensor,
        agg: AggMode = "token-mean",
        loss_scale_factor: float | None = None,
        dp: GlobalBatch | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The scalar loss ``agg(l, mask)`` and the metrics: clip fractions of ``regions``, then ``metrics``.

        Args:
            mask: (B, T), 1 for the tokens that count.
            agg: aggregation mode (``agg_loss``).
            loss_scale_factor: L of ``seq-mean-token-sum-norm``.
            dp: the data-parallel group the loss is normalised over (None: this rank alone). The
                metrics are this rank's masked means.

        Returns:
            ``(loss, metrics)``: for each region present, ``CLIP_METRICS[name]`` = the masked mean of the
            region (of ``-log_ratio`` for ``ppo_kl``); then the surrogate's own metrics.

        """
        unknown = self.regions.keys() - CLIP_METRICS.keys()
        if unknown:
            raise KeyError(f"unknown clip regions {sorted(unknown)}; expected some of {list(CLIP_METRICS)}")
        loss = agg_loss(self.per_token, mask, agg, loss_scale_factor, dp=dp)
        with torch.no_grad():
            metrics = {
                metric: masked_mean(-self.regions[name] if name == "log_ratio" else self.regions[name].float(), mask)
                for name, metric in CLIP_METRICS.items()
                if name in self.regions
            }
            metrics.update({k: v.detach() for k, v in self.metrics.items()})
        return loss, metrics


class PolicyLoss:
    """Base class of policy surrogates, chosen in YAML by ``class_path``.

    A subclass implements ``token_loss`` (and ``__init__``); calling the loss aggregates the per-token
    loss with ``agg`` and the loss-scale factor and reports the clip fractions of its regions
    (``TokenLoss.reduce``). Metric keys are short (``clipfrac_low``); the module namespaces them.

    Attributes:
        agg: the aggregation mode (``agg_loss``).
        loss_scale_factor: L of ``seq-mean-token-sum-norm`` (None: the batch's, i.e. max_new_tokens).
        needs_topk: the sampler must record top-K logprobs and the update gathers the same ids (DPPO Top-K).

    """

    agg: AggMode = "token-mean"
    loss_scale_factor: float | None = None
    needs_topk: bool = False

    def scale_factor(self, batch: TokenBatch) -> float | None:
        """L of ``seq-mean-token-sum-norm``: the loss's own setting, else the batch's (max_new_tokens)."""
        return self.loss_scale_factor if self.loss_scale_factor is not None else batch.loss_scale_factor

    def token_loss(self, batch: TokenBatch) -> TokenLoss:
        """The per-token loss (B, T), its clip regions and its own metrics, before aggregation."""
        raise NotImplementedError

    @final
    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, metrics)``: ``token_loss(batch)`` aggregated over ``batch.mask`` (``TokenLoss.reduce``)."""
        return self.token_loss(batch).reduce(batch.mask, self.agg, self.scale_factor(batch), batch.dp)
