"""Advantage estimators: outcome-reward, critic-free ones and GAE with a value model.

Samples are laid out group-major: ``rewards[p * G + g]`` is completion g of prompt p. The critic-free
estimators map sequence rewards (N,) to sequence advantages (N,), broadcast over tokens
(docs/reference/algorithms.md sections 1.2 and 1.4); GAE works per token with the critic's values.

``valid`` (N,) bool marks samples whose reward counts (a skipped, non-finite reward is invalid):
statistics are taken over valid samples only and invalid samples get advantage 0, so a skipped
sample never shifts its group's baseline.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cappo_pl.constraints import PositiveFloat, UnitFloat, checked_init
from cappo_pl.losses.aggregation import GlobalBatch


def _groups(x: Tensor, group_size: int) -> Tensor:
    if x.ndim != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(x.shape)}")
    if group_size < 1 or x.numel() % group_size:
        raise ValueError(f"{x.numel()} rewards do not split into groups of {group_size}")
    return x.view(-1, group_size)


def _prepare(rewards: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    m = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    return torch.where(m, rewards.float(), torch.zeros_like(rewards, dtype=torch.float32)), m.float()


def _masked_mean_var(x: Tensor, m: Tensor, dp: GlobalBatch | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and unbiased variance of ``x`` over ``m`` along the last dim, and the count.

    With ``dp`` the sums run over every rank's entries too (two passes, as without), so batch-level
    statistics are those of the global batch.
    """
    total = (lambda t: t) if dp is None else dp.sum
    n = total(m.sum(-1, keepdim=True))
    mean = total((x * m).sum(-1, keepdim=True)) / n.clamp_min(1.0)
    var = total((((x - mean) * m) ** 2).sum(-1, keepdim=True)) / (n - 1).clamp_min(1.0)
    return mean, var, n


def _masked_mean_std(x: Tensor, m: Tensor, dp: GlobalBatch | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and unbiased std of ``x`` over ``m`` along the last dim, and the count (``dp``: as above)."""
    mean, var, n = _masked_mean_var(x, m, dp)
    return mean, var.sqrt(), n


def grpo_advantages(
    rewards: Tensor, group_size: int, eps: float = 1e-6, scale_by_std: bool = True, valid: Tensor | None = None
) -> Tensor:
    """GRPO group-normalised advantage (Shao et al. 2024; verl ``compute_grpo_outcome_advantage``).

    ``A_i = (s_i - mean_g(s)) / (std_g(s) + eps)`` with the unbiased std. With ``scale_by_std=False``
    this is Dr.GRPO's ``A_i = s_i - mean_g(s)`` (Liu et al. 2025). A group with one (valid) sample
    uses mean 0 and std 1, as verl does.

    Args:
        rewards: (N,) sequence rewards, N = prompts * group_size.
        group_size: completions per prompt G.
        eps: added to the std.
        scale_by_std: divide by the group std (GRPO) or not (Dr.GRPO).
        valid: (N,) bool, samples that count (default all).

    Returns:
        (N,) advantages, 0 on invalid samples.

    """
    s, m = _prepare(rewards, valid)
    g, gm = _groups(s, group_size), _groups(m, group_size)
    mean, std, n = _masked_mean_std(g, gm)
    single = n <= 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    adv = g - mean
    if scale_by_std:
        adv = adv / (std + eps)
    return (adv * gm).reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
    """RLOO leave-one-out baseline (Ahmadian et al. 2024): ``A_i = s_i - mean_{j != i} s_j``.

    Args:
        rewards: (N,) sequence rewards.
        group_size: G >= 2.
        valid: (N,) bool; the mean runs over valid others; a sample with no valid other gets 0.

    """
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 completions per prompt (rollout.group_size >= 2)")
    s, m = _prepare(rewards, valid)
    g, gm = _groups(s, group_size), _groups(m, group_size)
    n_others = gm.sum(-1, keepdim=True) - gm
    others = ((g * gm).sum(-1, keepdim=True) - g * gm) / n_others.clamp_min(1.0)
    return ((g - others) * gm * (n_others > 0)).reshape(-1)


def reinforce_pp_advantages(
    rewards: Tensor,
    group_size: int,
    eps: float = 1e-8,
    group_baseline: bool = False,
    valid: Tensor | None = None,
    dp: GlobalBatch | None = None,
) -> Tensor:
    """REINFORCE++ (Hu 2025): batch-normalised returns, ``A_i = (s_i - mean_B(s)) / (std_B(s) + eps)``.

    With ``group_baseline=True`` (REINFORCE++-baseline) the group mean is subtracted first and the
    result is then normalised over the batch. Normalisation is over sequences (one outcome reward
    each, unbiased std); verl whitens over tokens, which weights long responses more.

    Args:
        rewards: (N,) sequence rewards.
        group_size: G, used only for the group baseline.
        eps: added to the batch std.
        group_baseline: subtract the group mean before batch normalisation.
        valid: (N,) bool, samples that count.
        dp: the data-parallel group: normalise over every rank's samples (None: this rank's).

    """
    s, m = _prepare(rewards, valid)
    if group_baseline:
        g, gm = _groups(s, group_size), _groups(m, group_size)
        s = (g - _masked_mean_std(g, gm)[0]).reshape(-1)
    mean, std, n = _masked_mean_std(s, m, dp)
    if n.item() < 2:
        return (s - mean) * m
    return (s - mean) / (std + eps) * m


class AdvantageEstimator:
    """Base class: ``estimator(rewards (N,), group_size, valid) -> advantages (N,)``; chosen by class_path.

    Attributes:
        needs_values: the estimator reads the critic's per-token values (``model.critic`` must be set).

    """

    needs_values: bool = False

    def __call__(self, rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def token_advantages(
        self,
        rewards: Tensor,
        group_size: int,
        valid: Tensor,
        mask: Tensor,
        values: Tensor | None = None,
        dp: GlobalBatch | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Per-token advantages (N, T) and value targets (N, T) or None; default: the sequence advantage.

        ``dp``: the data-parallel group, for estimators with batch-level statistics (groups never
        span ranks: a rank holds whole groups).
        """
        return self(rewards, group_size, valid).unsqueeze(-1).expand_as(mask), None


class GRPO(AdvantageEstimator):
    """Group mean/std normalisation. Args: eps: added to the std (> 0: a group of equal rewards divides 0 by it)."""

    @checked_init
    def __init__(self, eps: PositiveFloat = 1e-6) -> None:
        self.eps = eps

    def __call__(self, rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
        return grpo_advantages(rewards, group_size, self.eps, scale_by_std=True, valid=valid)


class DrGRPO(AdvantageEstimator):
    """Group mean baseline, no std scaling (Dr.GRPO; DPPO's default)."""

    def __call__(self, rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
        return grpo_advantages(rewards, group_size, scale_by_std=False, valid=valid)


class RLOO(AdvantageEstimator):
    """Leave-one-out baseline."""

    def __call__(self, rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
        return rloo_advantages(rewards, group_size, valid)


class ReinforcePlusPlus(AdvantageEstimator):
    """Batch-normalised REINFORCE++. Args: group_baseline: subtract the group mean first."""

    @checked_init
    def __init__(self, group_baseline: bool = False, eps: PositiveFloat = 1e-8) -> None:
        self.group_baseline = group_baseline
        self.eps = eps

    def __call__(self, rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
        return reinforce_pp_advantages(rewards, group_size, self.eps, self.group_baseline, valid)

    def token_advantages(self, rewards, group_size, valid, mask, values=None, dp=None):
        adv = reinforce_pp_advantages(rewards, group_size, self.eps, self.group_baseline, valid, dp)
        return adv.unsqueeze(-1).expand_as(mask), None


def gae_advantages(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016; verl ``compute_gae_advantage_return``).

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = sum_l (gamma lam)^l delta_{t+l}`` over the valid
    tokens (padding is skipped; the value after the last valid token is 0), returns ``R_t = A_t + V_t``.

    Args:
        token_rewards: (N, T) per-token rewards (the outcome reward sits on the last valid token).
        values: (N, T) critic values V(s_t).
        mask: (N, T) 1 on valid completion tokens.
        gamma: discount.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, (N, T) each, 0 on masked positions, no gradient.

    """
    r, v, m = token_rewards.detach().float(), values.detach().float(), mask.float()
    next_value = torch.zeros_like(r[:, 0])
    running = torch.zeros_like(r[:, 0])
    out = torch.zeros_like(r)
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        step = delta + gamma * lam * running
        # a masked position passes the later value and advantage through unchanged
        next_value = torch.where(m[:, t] > 0, v[:, t], next_value)
        running = torch.where(m[:, t] > 0, step, running)
        out[:, t] = running
    return out * m, (out + v) * m


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8, dp: GlobalBatch | None = None) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries (unbiased var; verl ``masked_whiten``).

    With ``dp`` the mean and variance are those of every rank's entries (verl whitens the global batch).
    """
    m = mask.float()
    mean, var, _ = _masked_mean_var(x.reshape(-1), m.reshape(-1), dp)
    return (x - mean) * torch.rsqrt(var + eps) * m


def outcome_token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """(N, T) with each sequence's reward on its last valid token (verl's outcome-reward layout)."""
    last = (mask.sum(-1).long() - 1).clamp_min(0)
    out = torch.zeros_like(mask, dtype=torch.float32)
    return out.scatter(1, last[:, None], rewards.float()[:, None]) * mask


class GAE(AdvantageEstimator):
    """GAE on the critic's values, outcome reward on the last token, whitened over the batch's tokens.

    PPO's estimator (CaPPO's base algorithm in its paper). Needs ``model.critic``.

    Args:
        gamma: discount (verl and TRL 1.0).
        lam: lambda (TRL 0.95; verl 1.0).
        whiten: normalise the advantages over the batch's valid tokens (verl, TRL).

    """

    needs_values = True

    @checked_init
    def __init__(self, gamma: UnitFloat = 1.0, lam: UnitFloat = 0.95, whiten: bool = True) -> None:
        self.gamma, self.lam, self.whiten = gamma, lam, whiten

    def __call__(self, rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
        raise TypeError("GAE is per token and needs the critic's values: use token_advantages")

    def token_advantages(self, rewards, group_size, valid, mask, values=None, dp=None):
        if values is None:
            raise RuntimeError("GAE needs the critic's values (model.critic)")
        r = torch.where(valid.bool(), rewards.float(), torch.zeros_like(rewards, dtype=torch.float32))
        adv, returns = gae_advantages(outcome_token_rewards(r, mask), values, mask, self.gamma, self.lam)
        return (masked_whiten(adv, mask, dp=dp) if self.whiten else adv), returns


def zero_std_groups(rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
    """(N / G,) bool: groups whose valid rewards are all equal, or that have none (no GRPO signal)."""
    s, m = _prepare(rewards, valid)
    g, gm = _groups(s, group_size), _groups(m, group_size).bool()
    hi = torch.where(gm, g, torch.full_like(g, -torch.inf)).max(-1).values
    lo = torch.where(gm, g, torch.full_like(g, torch.inf)).min(-1).values
    return (hi <= lo) | ~gm.any(-1)


def zero_std_group_fraction(rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
    """Fraction of groups whose valid rewards are all equal (they carry no GRPO signal)."""
    return zero_std_groups(rewards, group_size, valid).float().mean()
