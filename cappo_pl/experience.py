"""Collecting one RL step's experience: rollouts, rewards, DAPO's overlong shaping and dynamic sampling.

DAPO (Yu et al. 2025; docs/reference/algorithms.md section 1.3), components 3 and 4:

- Dynamic sampling (verl ``algorithm.filter_groups``): groups whose metric (accuracy or reward) has
  zero variance carry no group-relative signal and are dropped; more prompts are generated until
  the step has as many informative groups as prompts per step, up to ``max_gen_batches``
  generation batches. Past the cap the step trains on the informative groups it has (verl raises
  instead); with none at all it trains on the first batch (no signal from the filtered metric; its
  advantages are 0 unless, e.g., overlong shaping or GAE values still differ within a group).
- Overlong reward shaping (verl DAPO reward manager): with ``L_exp = L_max - L_buf`` and completion
  length ``|y|`` (tokens, EOS included), ``R_len = min(-(|y| - L_exp) / L_buf * factor, 0)`` is added
  to the reward: 0 up to ``L_exp``, falling linearly to ``-factor`` at ``L_max``.
- Overlong filtering (TRL ``mask_truncated_completions``): completions cut at ``L_max`` keep their
  place in the group baseline but are masked out of every loss.

Accuracy (``correct``) is judged on the task's reward before shaping: a correct long answer stays correct.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from cappo_pl.advantages import zero_std_groups
from cappo_pl.constraints import NonNegativeFloat, NonNegativeInt, PositiveInt, check_fields
from cappo_pl.data.records import Record
from cappo_pl.losses.aggregation import GlobalBatch
from cappo_pl.losses.base import TokenBatch
from cappo_pl.rollout import Rollout
from cappo_pl.scoring import Scores


@dataclass
class DynamicSamplingConfig:
    """DAPO dynamic sampling (verl ``algorithm.filter_groups``)."""

    enabled: bool = False
    """Drop zero-variance groups and generate more prompts until the step is full."""
    metric: Literal["accuracy", "reward"] = "accuracy"
    """What must vary within a group: correctness (DAPO's ``acc``) or the (shaped) reward."""
    max_gen_batches: PositiveInt = 4
    """Generation batches per step at most, the first included (verl ``max_num_gen_batches``)."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class OverlongConfig:
    """DAPO overlong reward shaping and overlong filtering."""

    buffer_len: NonNegativeInt = 0
    """L_buf: tokens before ``max_new_tokens`` where the length penalty ramps in (0: no shaping)."""
    penalty_factor: NonNegativeFloat = 1.0
    """The penalty at ``max_new_tokens`` (DAPO 1.0)."""
    filter_truncated: bool = False
    """Mask completions without EOS out of the loss (overlong filtering)."""

    def __post_init__(self) -> None:
        check_fields(self)


def overlong_penalty(lengths: Tensor, max_len: int, buffer_len: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, ``min(-(|y| - (L_max - L_buf)) / L_buf * factor, 0)``.

    Args:
        lengths: (N,) completion lengths in tokens (EOS included).
        max_len: L_max, the longest completion.
        buffer_len: L_buf > 0.
        factor: penalty at ``|y| = L_max``.

    Returns:
        (N,) float32 penalties in ``[-factor * |y| / L_buf..., 0]`` (``-factor`` at ``L_max``).

    """
    exceed = lengths.float() - (max_len - buffer_len)
    return (-exceed / buffer_len * factor).clamp(max=0.0)


@dataclass
class Generation:
    """One generation batch: G completions for each of its prompts, and their rewards."""

    records: list[Record]
    rollout: Rollout
    texts: list[str]
    rewards: Tensor
    """(N,) shaped rewards (task reward + overlong penalty)."""
    valid: Tensor
    """(N,) bool: the reward counts."""
    correct: Tensor
    """(N,) bool: task reward >= the success threshold (before shaping), and valid."""


@dataclass
class Experience(Generation):
    """The step's training data, N = groups x G rows, group-major (kept groups of one or more generations)."""

    mask: Tensor
    """(N, T) tokens that enter the losses: completion, valid reward, not filtered."""
    stats: dict[str, Tensor] = field(default_factory=dict)


def _shape(gen: Generation, cfg: OverlongConfig, max_len: int) -> tuple[Generation, Tensor]:
    if cfg.buffer_len <= 0:
        return gen, torch.zeros_like(gen.rewards)
    penalty = overlong_penalty(gen.rollout.completion_mask.sum(-1), max_len, cfg.buffer_len, cfg.penalty_factor)
    penalty = penalty.to(gen.rewards.device) * gen.valid
    gen.rewards = gen.rewards + penalty
    return gen, penalty


def _select_groups(gen: Generation, keep: Tensor, group: int) -> Generation:
    rows = (keep.nonzero().squeeze(-1)[:, None] * group + torch.arange(group, device=keep.device)).reshape(-1)
    rows_cpu = rows.tolist()
    return Generation(
        records=[gen.records[i] for i in keep.nonzero().squeeze(-1).tolist()],
        rollout=gen.rollout.select(rows.to(gen.rollout.completion_ids.device)),
        texts=[gen.texts[i] for i in rows_cpu],
        rewards=gen.rewards[rows],
        valid=gen.valid[rows],
        correct=gen.correct[rows],
    )


def collect_experience(
    records: list[Record],
    generate: Callable[[list[Record], int], Generation],
    extra_records: Callable[[int], list[Record]],
    group: int,
    max_len: int,
    pad_id: int,
    sampling: DynamicSamplingConfig,
    overlong: OverlongConfig,
) -> Experience:
    """Generate, shape and (with dynamic sampling) filter until the step holds ``len(records)`` groups.

    Args:
        records: the step's prompts (generation batch 0).
        generate: ``(records, k) -> Generation`` with task rewards, for generation batch k.
        extra_records: ``k -> records`` of the k-th extra generation batch (k >= 1).
        group: completions per prompt G.
        max_len: ``max_new_tokens`` (L_max).
        pad_id: padding id for stacking rollouts of different widths.
        sampling: dynamic sampling settings.
        overlong: overlong shaping and filtering.

    Returns:
        The ``Experience``; ``stats`` holds ``overlong_penalty`` (mean over valid samples) and, with
        dynamic sampling, ``dynamic/gen_batches``, ``dynamic/informative_frac`` (informative groups
        among all generated) and ``dynamic/fill`` (groups trained / prompts per step).

    """
    target = len(records)
    gens, kept, penalties, informative, generated = [], [], [], 0, 0
    for k in range(max(1, sampling.max_gen_batches) if sampling.enabled else 1):
        gen, penalty = _shape(generate(records if k == 0 else extra_records(k), k), overlong, max_len)
        penalties.append(penalty[gen.valid])
        gens.append(gen)
        if not sampling.enabled:
            kept.append(gen)
            break
        metric = gen.correct.float() if sampling.metric == "accuracy" else gen.rewards
        keep = ~zero_std_groups(metric, group, gen.valid)
        generated += keep.numel()
        informative += int(keep.sum())
        take = keep & (keep.long().cumsum(0) <= target - sum(len(g.records) for g in kept))
        if take.any():
            kept.append(_select_groups(gen, take, group))
        if sum(len(g.records) for g in kept) >= target:
            break
    if not kept:  # nothing informative within the cap: the first batch (zero policy advantage)
        kept = [gens[0]]
    ro = Rollout.cat([g.rollout for g in kept], pad_id)
    valid = torch.cat([g.valid for g in kept])
    mask = ro.completion_mask * valid.unsqueeze(-1)
    if overlong.filter_truncated:
        mask = mask * (~ro.truncated).unsqueeze(-1).to(mask.dtype)
    all_pen = torch.cat(penalties)
    stats = {"reward/overlong_penalty": all_pen.mean() if all_pen.numel() else torch.zeros(())}
    if sampling.enabled:
        n_groups = sum(len(g.records) for g in kept)
        stats["dynamic/gen_batches"] = torch.tensor(float(len(gens)))
        stats["dynamic/informative_frac"] = torch.tensor(informative / max(generated, 1))
        stats["dynamic/fill"] = torch.tensor(min(n_groups, target) / target if informative else 0.0)
    return Experience(
        records=[r for g in kept for r in g.records],
        rollout=ro,
        texts=[t for g in kept for t in g.texts],
        rewards=torch.cat([g.rewards for g in kept]),
        valid=valid,
        correct=torch.cat([g.correct for g in kept]),
        mask=mask,
        stats=stats,
    )


@dataclass
class StepData:
    """Everything a step's updates read: the experience and its step-start scores, N rows each.

    Attributes:
        exp: rollouts, rewards and the loss mask.
        old: pi_old's (B, T) logprobs and entropies (no grad), the PPO anchor.
        ref_logp: (N, T) reference logprobs (None when no objective needs them).
        advantages: (N, T) per-token advantages.
        returns: (N, T) the critic's targets (None without a critic).
        old_values: (N, T) the critic's step-start values (None without a critic).

    """

    exp: Experience
    old: Scores
    ref_logp: Tensor | None
    advantages: Tensor
    returns: Tensor | None = None
    old_values: Tensor | None = None

    def token_batch(
        self, idx: Tensor, sub: Rollout, cur: Scores, loss_scale_factor: float, dp: GlobalBatch | None
    ) -> TokenBatch:
        """The losses' view of mini-batch ``idx`` (rows of the step; ``sub`` its rollout), scored by ``cur``."""
        exp = self.exp
        return TokenBatch(
            logp=cur.logp, old_logp=self.old.logp[idx], rollout_logp=sub.rollout_logp,
            advantages=self.advantages[idx], mask=exp.mask[idx], entropy=cur.entropy,
            old_entropy=self.old.entropy[idx], ref_logp=None if self.ref_logp is None else self.ref_logp[idx],
            rewards=exp.rewards[idx], correct=exp.correct[idx], loss_scale_factor=loss_scale_factor,
            topk_logp=cur.topk_logp, rollout_topk_logp=sub.topk_logp, dp=dp,
        )  # fmt: skip
