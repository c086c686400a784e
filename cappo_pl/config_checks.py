"""Checks that span several config blocks, run once: at construction, and at setup against the strategy.

A check that reads one block only belongs in that block's dataclass; the ones here compare blocks
(the loss needs what the sampler records, the advantage estimator needs a critic, ...) or a block
and the strategy. Each error names the config key to change.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.utilities import rank_zero_warn

from cappo_pl.advantages import AdvantageEstimator
from cappo_pl.critic import CriticConfig
from cappo_pl.errors import ConfigError
from cappo_pl.evaluation import EvalConfig
from cappo_pl.experience import DynamicSamplingConfig, OverlongConfig
from cappo_pl.gradients import GradientConfig
from cappo_pl.objectives import Objective
from cappo_pl.optim_config import PPOConfig
from cappo_pl.references import SRRConfig, threshold_quantile
from cappo_pl.rollout import RolloutConfig
from cappo_pl.strategies import (
    check_critic,
    check_dynamic_sampling,
    check_gram_space,
    deepspeed_gradient_clipping,
)


def check_config(
    objectives: Sequence[Objective],
    advantage: AdvantageEstimator,
    critic: CriticConfig | None,
    rollout: RolloutConfig,
    ppo: PPOConfig,
    dynamic_sampling: DynamicSamplingConfig,
    overlong: OverlongConfig,
    srr: SRRConfig,
    evaluation: EvalConfig | None = None,
    val_samples: int = 1,
) -> None:
    """Refuse combinations of ``model.*`` blocks that cannot work (ConfigError naming the key).

    Raises:
        ConfigError: duplicate objective names; a critic without GAE (or GAE without one); dynamic
            sampling with more mini-batches than a group has rows; an overlong buffer longer than a
            completion; a Top-K loss without the sampler's top-K logprobs; SRR thresholds outside (0, 1]; a
            sampled pass@k whose k exceeds the validation samples.

    """
    names = [o.name for o in objectives]
    if len(set(names)) != len(names):
        raise ConfigError(f"model.objectives: names must be unique, got {names}")
    if advantage.needs_values != (critic is not None):
        raise ConfigError(
            f"model.critic: {type(advantage).__name__} advantages "
            + ("need a critic: set model.critic" if advantage.needs_values else "do not use one: remove it")
        )
    if dynamic_sampling.enabled and ppo.minibatches > rollout.group_size:
        # past the cap a step may keep one group (G rows); every rank must still take `minibatches` steps
        raise ConfigError(
            f"model.ppo.minibatches: with dynamic sampling it must be <= model.rollout.group_size "
            f"({rollout.group_size}), got {ppo.minibatches}"
        )
    if overlong.buffer_len < 0 or overlong.buffer_len > rollout.max_new_tokens:
        raise ConfigError(
            f"model.overlong.buffer_len: must be in [0, model.rollout.max_new_tokens="
            f"{rollout.max_new_tokens}], got {overlong.buffer_len}"
        )
    if any(o.needs_topk for o in objectives) and rollout.top_k_logprobs < 1:
        raise ConfigError(
            "model.rollout.top_k_logprobs: DPPO's Top-K divergence needs the sampler's top-K logprobs; "
            "set it > 0 (the paper: 20)"
        )
    fixed = [t for t in srr.thresholds if threshold_quantile(t) is None]  # raises on a bad 'quantile:q'
    taus = [*fixed, srr.relative_threshold]
    if not srr.thresholds or any(not 0.0 < float(t) <= 1.0 for t in taus):
        # checked here, not in SRRConfig.__post_init__: jsonargparse would bury that error in a Union dump
        raise ConfigError(f"model.srr: thresholds must be in (0, 1], got {list(srr.thresholds)} and {taus[-1]}")
    for key in ("pass_ks", "exact_ks", "support_eps"):
        if evaluation is not None and getattr(evaluation, key) == []:
            raise ConfigError(f"model.evaluation.{key}: must not be empty (null for the default)")
    if evaluation is not None and evaluation.pass_ks is not None:
        for i, k in enumerate(evaluation.pass_ks):
            if k > val_samples:
                raise ConfigError(
                    f"model.evaluation.pass_ks[{i}]: pass@{k} needs at least {k} samples per prompt, but "
                    f"model.val_samples is {val_samples}"
                )
    if rollout.top_p < 1.0 and evaluation is not None and evaluation.exact:
        rank_zero_warn(
            "model.rollout.top_p < 1: model.evaluation's exact metrics score the full tempered distribution, "
            "not the nucleus validation samples from (set model.evaluation.exact=false to drop them)"
        )
    if rollout.top_p < 1.0:
        rank_zero_warn(
            "model.rollout.top_p < 1: the recorded behaviour logprobs are those of the full tempered "
            "distribution, not of the nucleus the tokens were drawn from"
        )


def check_strategy(
    strategy: object,
    gradients: GradientConfig,
    critic: CriticConfig | None,
    dynamic_sampling: DynamicSamplingConfig,
    ppo: PPOConfig,
) -> None:
    """Refuse what the strategy cannot run, and hand DeepSpeed the clipping norm (at setup).

    Raises:
        ConfigError: the ``params`` Gram space under DeepSpeed/FSDP; a critic under DeepSpeed/FSDP1 or
            DDP without unused-parameter detection; dynamic sampling under ZeRO-3/FSDP; a DeepSpeed
            ``gradient_clipping`` that differs from ``model.ppo.clip_grad_norm``.

    """
    if critic is not None:
        check_critic(strategy)
    check_gram_space(gradients.space, strategy)
    deepspeed_gradient_clipping(strategy, ppo.clip_grad_norm)
    check_dynamic_sampling(dynamic_sampling.enabled, strategy)
