"""Outcome-reward advantage estimators (critic-free).

Samples are laid out group-major: ``rewards[p * G + g]`` is completion g of prompt p. Every
estimator maps sequence rewards (N,) to sequence advantages (N,); the module broadcasts them over
tokens. Formulas: shared/reference/algorithms.md sections 1.2 and 1.4.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def grpo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6, scale_by_std: bool = True) -> Tensor:
    """GRPO group-normalised advantage (Shao et al. 2024; verl ``compute_grpo_outcome_advantage``).

    ``A_i = (s_i - mean_g(s)) / (std_g(s) + eps)`` with the unbiased std. With ``scale_by_std=False``
    this is Dr.GRPO's ``A_i = s_i - mean_g(s)`` (Liu et al. 2025). A group of one sample uses mean 0
    and std 1, as verl does.

    Args:
        rewards: (N,) sequence rewards, N = prompts * group_size.
        group_size: completions per prompt G.
        eps: added to the std.
        scale_by_std: divide by the group std (GRPO) or not (Dr.GRPO).

    Returns:
        (N,) advantages.

    """
    g = _groups(rewards.float(), group_size)
    if group_size == 1:
        mean, std = torch.zeros_like(g), torch.ones_like(g)
    else:
        mean = g.mean(-1, keepdim=True)
        std = g.std(-1, keepdim=True, unbiased=True)
    adv = g - mean
    if scale_by_std:
        adv = adv / (std + eps)
    return adv.reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO leave-one-out baseline (Ahmadian et al. 2024): ``A_i = s_i - mean_{j != i} s_j``.

    Args:
        rewards: (N,) sequence rewards.
        group_size: G >= 2.

    """
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 completions per prompt (rollout.group_size >= 2)")
    g = _groups(rewards.float(), group_size)
    others = (g.sum(-1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def reinforce_pp_advantages(
    rewards: Tensor, group_size: int, eps: float = 1e-8, group_baseline: bool = False
) -> Tensor:
    """REINFORCE++ (Hu 2025): batch-normalised returns, ``A_i = (s_i - mean_B(s)) / (std_B(s) + eps)``.

    With ``group_baseline=True`` (REINFORCE++-baseline) the group mean is subtracted first and the
    result is then normalised over the batch. Normalisation is over sequences (one outcome reward
    each), with the unbiased std.

    Args:
        rewards: (N,) sequence rewards.
        group_size: G, used only for the group baseline.
        eps: added to the batch std.
        group_baseline: subtract the group mean before batch normalisation.

    """
    s = rewards.float()
    if group_baseline:
        g = _groups(s, group_size)
        s = (g - g.mean(-1, keepdim=True)).reshape(-1)
    if s.numel() < 2:
        return s - s.mean()
    return (s - s.mean()) / (s.std(unbiased=True) + eps)


class AdvantageEstimator:
    """Base class: ``estimator(rewards (N,), group_size) -> advantages (N,)``; chosen by class_path."""

    def __call__(self, rewards: Tensor, group_size: int) -> Tensor:
        raise NotImplementedError


class GRPO(AdvantageEstimator):
    """Group mean/std normalisation. Args: eps: added to the std."""

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = eps

    def __call__(self, rewards: Tensor, group_size: int) -> Tensor:
        return grpo_advantages(rewards, group_size, self.eps, scale_by_std=True)


class DrGRPO(AdvantageEstimator):
    """Group mean baseline, no std scaling (Dr.GRPO; DPPO's default)."""

    def __call__(self, rewards: Tensor, group_size: int) -> Tensor:
        return grpo_advantages(rewards, group_size, scale_by_std=False)


class RLOO(AdvantageEstimator):
    """Leave-one-out baseline."""

    def __call__(self, rewards: Tensor, group_size: int) -> Tensor:
        return rloo_advantages(rewards, group_size)


class ReinforcePlusPlus(AdvantageEstimator):
    """Batch-normalised REINFORCE++. Args: group_baseline: subtract the group mean first."""

    def __init__(self, group_baseline: bool = False, eps: float = 1e-8) -> None:
        self.group_baseline = group_baseline
        self.eps = eps

    def __call__(self, rewards: Tensor, group_size: int) -> Tensor:
        return reinforce_pp_advantages(rewards, group_size, self.eps, self.group_baseline)


def zero_std_group_fraction(rewards: Tensor, group_size: int) -> Tensor:
    """Fraction of groups whose rewards are all equal (they carry no GRPO signal)."""
    g = _groups(rewards.float(), group_size)
    return (g.max(-1).values == g.min(-1).values).float().mean()
