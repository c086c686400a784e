"""The policy-loss extension point and the per-token tensors every loss reads."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from cappo_pl.losses.aggregation import AggMode, GlobalBatch


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


class PolicyLoss:
    """Base class of policy surrogates, chosen in YAML by ``class_path``.

    Subclasses implement ``__call__(batch) -> (loss, metrics)`` with ``metrics`` a dict of detached
    scalar tensors whose keys are short (``clipfrac_low``); the module namespaces them.
    """

    agg: AggMode = "token-mean"
    loss_scale_factor: float | None = None
    needs_old_entropy: bool = False
    """Per-token entropy of pi_old must be recomputed at step start (ERC)."""
    needs_topk: bool = False
    """The sampler must record top-K logprobs and the update gathers the same ids (DPPO Top-K)."""

    def scale_factor(self, batch: TokenBatch) -> float | None:
        """L of ``seq-mean-token-sum-norm``: the loss's own setting, else the batch's (max_new_tokens)."""
        return self.loss_scale_factor if self.loss_scale_factor is not None else batch.loss_scale_factor

    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError
