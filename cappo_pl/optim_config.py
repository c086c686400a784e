"""How each RL step's rollouts become updates (``model.ppo``), and the optimizer (``model.optim``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class PPOConfig:
    """How each RL step's rollouts are turned into updates."""

    epochs: int = 1
    """Passes over the step's rollouts (PPO epochs)."""
    minibatches: int = 1
    """Optimizer steps per epoch; the rollouts are split into this many shuffled mini-batches."""
    clip_grad_norm: float | None = 1.0
    """Clip the update's global L2 norm (None: no clipping)."""
    score_chunk_tokens: int = 4096
    """Tokens per LM-head chunk when scoring (bounds the logits memory)."""
    reward_on_error: Literal["raise", "skip"] = "raise"
    """A non-finite reward fails the run (raise) or drops that sample from the loss (skip, counted)."""
    success_threshold: float = 1.0
    """A sample with reward >= this counts as correct (accuracy)."""


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, then constant."""

    lr: float = 1e-4
    """Learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""
