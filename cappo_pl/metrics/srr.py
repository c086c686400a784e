"""Support Retention Ratio (SRR): how much of the SFT policy's support the RL policy keeps.

CaPPO ("Escaping Policy Contraction: Contraction-Aware PPO", OpenReview vDlkJewkDu; reconstructed in
docs/reference/algorithms.md section 5):
for prompts x with SFT reference completions y^j,

    SRR(tau) = 1/(|X| m) sum_x sum_j 1[ (1/|y^j|) sum_t log pi_RL(y^j_t | x, y^j_<t) >= log tau ]

the fraction of references whose mean token log-likelihood under the RL policy is at least
``log(tau)``: decoding-independent and comparable across prompts. The relative variant tests the
mean per-token log-ratio to the SFT policy instead, ``(1/|y|) sum_t (log pi_RL - log pi_SFT) >=
log(tau_rel)`` (docs/reference/algorithms.md section 5, alternative (a)): "the RL policy gives this reference at
least tau_rel of the per-token probability the SFT policy gave it".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


def mean_token_logprob(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence mean of the masked token log-probabilities.

    Args:
        token_logprobs: (B, T) log pi(y_t | x, y_<t) (garbage on padding is fine).
        mask: (B, T) 1 on completion tokens; every row needs at least one.

    Returns:
        (B,) float64 means.

    """
    m = mask.to(torch.float64)
    lengths = m.sum(-1)
    if (lengths <= 0).any():
        raise ValueError("SupportRetentionRatio: a reference completion has no tokens under the mask")
    return (torch.where(m > 0, token_logprobs.to(torch.float64), 0.0)).sum(-1) / lengths


def threshold_key(threshold: float) -> str:
    """Metric-key form of a threshold: ``0.001 -> "1e-03"``, stable across runs."""
    return f"{threshold:.0e}"


class SupportRetentionRatio(Metric):
    """Fraction of SFT reference completions that keep non-negligible probability under the policy.

    ``update`` takes teacher-forced token logprobs of reference completions (B, T). ``compute``
    returns the pooled SRR at ``thresholds[0]``; :meth:`compute_all` returns every variant:

    - ``srr``: pooled fraction at ``thresholds[0]``; ``srr@<tau>``: at each threshold;
    - ``srr_rel`` (when ``sft_logprobs`` were given): relative test at ``relative_threshold``;
    - ``srr_per_prompt``: the mean over prompts of each prompt's own fraction (at ``thresholds[0]``),
      which weights prompts equally when they have different numbers of references.

    Every state is a sum (``dist_reduce_fx="sum"``), so the value under data parallelism equals the
    single-process value exactly. The per-prompt variant needs each prompt's references to arrive in
    one ``update`` call (they are grouped by ``prompt_ids`` within the call).

    Args:
        thresholds: probabilities tau (0 < tau <= 1); the first is the headline ``srr``.
        relative_threshold: tau_rel of the relative variant.
        names: the key of each threshold (``srr@<name>``; default ``threshold_key(tau)``).

    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(
        self,
        thresholds: Sequence[float] = (0.1, 0.01, 0.001),
        relative_threshold: float = 0.1,
        names: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        thresholds = [float(t) for t in thresholds]
        self.names = list(names) if names is not None else [threshold_key(t) for t in thresholds]
        if len(self.names) != len(thresholds):
            raise ValueError(f"SRR: {len(self.names)} names for {len(thresholds)} thresholds")
        if not thresholds or any(not 0.0 < t <= 1.0 for t in [*thresholds, relative_threshold]):
            raise ValueError(f"SRR thresholds must be in (0, 1], got {thresholds} and {relative_threshold}")
        self.thresholds = thresholds
        self.relative_threshold = float(relative_threshold)
        self.register_buffer("_log_tau", torch.tensor(thresholds, dtype=torch.float64).log(), persistent=False)
        n = len(thresholds)
        self.add_state("retained", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("retained_rel", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_rel", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prompt_fraction_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prompts", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        token_logprobs: Tensor,
        mask: Tensor,
        sft_logprobs: Tensor | None = None,
        prompt_ids: Tensor | None = None,
    ) -> None:
        """Add a batch of teacher-forced reference completions.

        Args:
            token_logprobs: (B, T) token logprobs of the references under the current policy.
            mask: (B, T) 1 on reference tokens (including EOS when it was part of SFT).
            sft_logprobs: (B, T) token logprobs of the same references under the SFT policy
                (enables ``srr_rel``), or (B,) per-sequence means already reduced.
            prompt_ids: (B,) integer id of each reference's prompt (default: one prompt per row).

        """
        score = mean_token_logprob(token_logprobs, mask)  # (B,)
        hits = score[:, None] >= self._log_tau.to(score.device)[None, :]  # (B, n_thresholds)
        self.retained += hits.sum(0).to(torch.float64)
        self.total += score.numel()
        if sft_logprobs is not None:
            sft = sft_logprobs.to(torch.float64) if sft_logprobs.dim() == 1 else mean_token_logprob(sft_logprobs, mask)
            self.retained_rel += (score - sft >= torch.tensor(self.relative_threshold).log()).sum()
            self.total_rel += score.numel()
        ids = prompt_ids if prompt_ids is not None else torch.arange(score.numel(), device=score.device)
        _, group = torch.unique(ids, return_inverse=True)
        count = torch.zeros(int(group.max()) + 1, dtype=torch.float64, device=score.device)
        kept = torch.zeros_like(count)
        count.index_add_(0, group, torch.ones_like(score))
        kept.index_add_(0, group, hits[:, 0].to(torch.float64))
        self.prompt_fraction_sum += (kept / count).sum()
        self.prompts += count.numel()

    def compute(self) -> Tensor:
        """Pooled SRR at ``thresholds[0]`` (NaN before any update)."""
        return self.retained[0] / self.total if self.total > 0 else torch.tensor(float("nan"), dtype=torch.float64)

    def compute_all(self) -> dict[str, Tensor]:
        """Every variant (see the class docstring), synchronised across processes."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            nan = torch.tensor(float("nan"), dtype=torch.float64)
            ratio = lambda a, b: a / b if b > 0 else nan  # noqa: E731
            out = {"srr": ratio(self.retained[0], self.total)}
            for i, name in enumerate(self.names):
                out[f"srr@{name}"] = ratio(self.retained[i], self.total)
            if self.total_rel > 0:
                out["srr_rel"] = ratio(self.retained_rel, self.total_rel)
            out["srr_per_prompt"] = ratio(self.prompt_fraction_sum, self.prompts)
            return {k: v.clone() for k, v in out.items()}
