"""How each RL step's rollouts become updates (``model.ppo``), and the optimizer (``model.optim``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from annotated_types import Interval

from cappo_pl.constraints import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, check_fields
from cappo_pl.strategies import offloads_optimizer


@dataclass
class PPOConfig:
    """How each RL step's rollouts are turned into updates."""

    epochs: PositiveInt = 1
    """Passes over the step's rollouts (PPO epochs)."""
    minibatches: PositiveInt = 1
    """Optimizer steps per epoch; the rollouts are split into this many shuffled mini-batches."""
    clip_grad_norm: PositiveFloat | None = 1.0
    """Clip the update's global L2 norm (None: no clipping)."""
    score_chunk_tokens: PositiveInt = 4096
    """Tokens per LM-head chunk when scoring (bounds the logits memory)."""
    reward_on_error: Literal["raise", "skip"] = "raise"
    """A non-finite reward fails the run (raise) or drops that sample from the loss (skip, counted)."""
    success_threshold: float = 1.0
    """A sample with reward >= this counts as correct (accuracy)."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, then constant."""

    lr: NonNegativeFloat = 1e-4
    """Learning rate (0 freezes the policy; the critic, if any, has its own)."""
    weight_decay: NonNegativeFloat = 0.0
    """Decoupled weight decay."""
    beta1: Annotated[float, Interval(ge=0, lt=1)] = 0.9
    """Adam beta1."""
    beta2: Annotated[float, Interval(ge=0, lt=1)] = 0.999
    """Adam beta2."""
    warmup_steps: NonNegativeInt = 0
    """Optimizer steps of linear warm-up."""

    def __post_init__(self) -> None:
        check_fields(self)


def build_optimizer(
    optim: OptimConfig,
    policy_params: list[torch.nn.Parameter],
    critic: tuple[list[torch.nn.Parameter], float | None] | None,
    strategy: object,
) -> dict:
    """AdamW over the policy (and the critic as its own group, at its own lr) with linear warm-up.

    Under ZeRO-Offload DeepSpeed refuses a torch optimizer, so its ``DeepSpeedCPUAdam`` (AdamW mode,
    the same settings) takes its place. Returns Lightning's ``configure_optimizers`` dict.
    """
    groups = [{"params": policy_params}]
    if critic is not None:
        params, lr = critic
        groups.append({"params": params, "lr": lr if lr is not None else optim.lr})
    adamw = torch.optim.AdamW
    if offloads_optimizer(strategy):
        from deepspeed.ops.adam import DeepSpeedCPUAdam as adamw  # noqa: N813 (AdamW semantics: adamw_mode)
    opt = adamw(groups, lr=optim.lr, weight_decay=optim.weight_decay, betas=(optim.beta1, optim.beta2))
    warm = max(1, optim.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
