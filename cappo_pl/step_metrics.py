"""The ``train/*`` metrics of one RL step (keys documented in docs/metrics.md)."""

from __future__ import annotations

import torch
from torch import Tensor

from cappo_pl.advantages import zero_std_group_fraction
from cappo_pl.experience import Experience
from cappo_pl.losses.aggregation import GlobalBatch, masked_mean
from cappo_pl.losses.kl import kl_penalty


def step_metrics(
    exp: Experience,
    old_logp: Tensor,
    old_entropy: Tensor,
    ref_logp: Tensor | None,
    update_metrics: list[dict[str, Tensor]],
    times: tuple[float, float, float, float],
    group_size: int,
    dp: GlobalBatch | None = None,
) -> dict[str, Tensor]:
    """The step's metrics, before the module adds its own (lr, step, weights).

    Under data parallelism the reward, accuracy, length, entropy and reference-KL means are over the
    global batch (``dp``; the controllers read entropy and KL), so they equal a single process's; the
    rest are this rank's (Lightning logs rank 0's).

    Args:
        exp: the step's experience (N rows).
        old_logp: (N, T) pi_old logprobs.
        old_entropy: (N, T) pi_old entropies.
        ref_logp: (N, T) reference logprobs, or None.
        update_metrics: one dict per optimizer step; each key is averaged over the updates that have it.
        times: perf_counter at the start, after rollouts, after scoring and after the updates.
        group_size: G.
        dp: the data-parallel group (None: one process).

    """
    ro, rewards, valid, correct, mask = exp.rollout, exp.rewards, exp.valid, exp.correct, exp.mask
    lengths = ro.completion_mask.sum(-1)
    v = valid.float()
    r = torch.where(valid, rewards.float(), torch.zeros_like(rewards, dtype=torch.float32))  # skipped: may be NaN
    nan = torch.tensor(float("nan"), device=rewards.device)
    n_valid = v.sum() if dp is None else dp.sum(v.sum())
    logs: dict[str, Tensor] = {
        "train/reward/mean": masked_mean(r, v, dp) if n_valid > 0 else nan,
        "train/reward/std": rewards[valid].std() if valid.sum() > 1 else torch.tensor(0.0),
        "train/reward/skipped": (~valid).float().sum(),
        "train/accuracy": masked_mean(correct.float(), v, dp) if n_valid > 0 else nan,
        "train/response_length/mean": masked_mean(lengths.float(), torch.ones_like(lengths), dp),
        "train/response_length/max": lengths.max(),
        "train/response_length/truncated_ratio": ro.truncated.float().mean(),
        "train/zero_std_groups": zero_std_group_fraction(rewards, group_size, valid),
        "train/policy/entropy": masked_mean(old_entropy, mask, dp),
        "train/time/rollout_s": torch.tensor(times[1] - times[0]),
        "train/time/score_s": torch.tensor(times[2] - times[1]),
        "train/time/update_s": torch.tensor(times[3] - times[2]),
        **{f"train/{k}": v for k, v in exp.stats.items()},
    }
    if ref_logp is not None:
        logs["train/policy/kl_ref"] = masked_mean(kl_penalty(old_logp, ref_logp, "k3"), mask, dp)
    # mean over the step's updates that have the key (a skipped update has no Gram metrics)
    for key in dict.fromkeys(k for m in update_metrics for k in m):
        logs[f"train/{key}"] = torch.stack([m[key] for m in update_metrics if key in m]).mean()
    return logs
