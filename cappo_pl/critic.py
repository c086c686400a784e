"""The critic of PPO with GAE: a value model and its clipped value loss.

The value model is a separate copy of the initial policy's transformer trunk with a scalar head
(verl, TRL and OpenRLHF keep the critic apart from the actor), so the value loss never reaches the
policy's parameters and the combiner sees only the policy's objectives. The head starts at zero,
so the first step's values are 0 and GAE starts from Monte-Carlo-like advantages.

Value loss (verl ``compute_value_loss``; PPO, Schulman et al. 2017):

    v_clip = clip(v, v_old - c, v_old + c)
    L_V = 1/2 agg(max((v - R)^2, (v_clip - R)^2))

with R the GAE returns and v_old the values at the start of the RL step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cappo_pl.constraints import PositiveFloat, check_fields
from cappo_pl.gradients import grad_norm
from cappo_pl.losses.aggregation import AggMode, GlobalBatch, agg_loss, masked_mean
from cappo_pl.scoring import position_ids_from_mask


@dataclass
class CriticConfig:
    """The value model trained next to the policy (needed by ``advantage: GAE``)."""

    cliprange_value: PositiveFloat | None = 0.2
    """c of the clipped value loss (TRL 0.2; verl 0.5); None: unclipped."""
    lr: PositiveFloat | None = None
    """Learning rate of the critic's parameter group (None: the policy's ``optim.lr``)."""
    clip_grad_norm: PositiveFloat | None = 1.0
    """Clip the critic's gradient norm, separately from the policy's (None: no clipping)."""
    agg: AggMode = "token-mean"
    """Aggregation of the per-token value loss."""

    def __post_init__(self) -> None:
        check_fields(self)


class ValueModel(nn.Module):
    """A causal-LM trunk with a scalar head: ``V(s_t)`` for the state before each completion token.

    Args:
        trunk: a transformer returning ``last_hidden_state`` (an HF ``base_model``).
        hidden_size: width of the trunk's output.

    """

    def __init__(self, trunk: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy: nn.Module) -> ValueModel:
        """A critic whose trunk is an independent copy of ``policy.base_model`` (SFT init)."""
        trunk = copy.deepcopy(policy.base_model)
        trunk.requires_grad_(True)
        return cls(trunk, policy.get_output_embeddings().weight.shape[1])

    def forward(self, input_ids: Tensor, attention_mask: Tensor, completion_len: int) -> Tensor:
        """Values at the positions that predict the completion tokens.

        Args:
            input_ids: (B, P + T) left-padded prompt and right-padded completion.
            attention_mask: (B, P + T).
            completion_len: T.

        Returns:
            (B, T) float32 values; ``[:, t]`` is the value of the prefix before completion token t.

        """
        out = self.trunk(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        hidden = out.last_hidden_state[:, -completion_len - 1 : -1]
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()  # a bf16 trunk, an fp32 head


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange: float | None = 0.2,
    agg: AggMode = "token-mean",
    dp: GlobalBatch | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss (module docstring); tensors (B, T); ``dp`` as in ``agg_loss``.

    Returns:
        ``(loss, metrics)``: ``vf_loss``, ``vf_clipfrac`` (tokens where the clipped term is the larger),
        ``value_mean``, ``returns_mean``, ``explained_var`` (``1 - Var(R - v) / Var(R)`` over tokens).

    """
    unclipped = (values - returns) ** 2
    if cliprange is None:
        per_token, clipped_more = unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        v_clip = old_values + (values - old_values).clamp(-cliprange, cliprange)
        clipped = (v_clip - returns) ** 2
        per_token, clipped_more = torch.maximum(unclipped, clipped), clipped > unclipped
    loss = 0.5 * agg_loss(per_token, mask, agg, dp=dp)
    with torch.no_grad():
        resid = returns - values.detach()
        var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
        var_e = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
        metrics = {
            "vf_loss": loss.detach(),
            "vf_clipfrac": masked_mean(clipped_more.float(), mask),
            "value_mean": masked_mean(values.detach(), mask),
            "returns_mean": masked_mean(returns, mask),
            "explained_var": 1 - var_e / var_r.clamp_min(1e-8),
        }
    return loss, metrics


def critic_backward(
    critic: ValueModel,
    cfg: CriticConfig,
    input_ids: Tensor,
    attention_mask: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    backward: Callable[[Tensor], None],
    grad_scale: float = 1.0,
    dp: GlobalBatch | None = None,
) -> dict[str, Tensor]:
    """One mini-batch of the critic: value loss, backward, gradient clipping of the critic alone.

    A non-finite loss skips the backward on every rank (the flag is summed over ``dp``), since a NaN
    critic would poison GAE, and so every later policy update. With fp16 the gradients still carry
    the GradScaler's ``grad_scale`` here, so the clip threshold is scaled and the reported norm unscaled.

    Args:
        critic: the value model.
        cfg: its settings.
        input_ids: (B, P + T) of the mini-batch.
        attention_mask: (B, P + T).
        old_values: (B, T) v_old.
        returns: (B, T) GAE returns.
        mask: (B, T) tokens in the loss.
        backward: the strategy's backward (``manual_backward``).
        grad_scale: the fp16 GradScaler's scale (1.0 otherwise).
        dp: the data-parallel group (None: one process): the loss is normalised over its global batch.

    Returns:
        ``value_loss``'s metrics plus ``skipped`` (1 when the backward was skipped) and ``grad_norm``.

    """
    values = critic(input_ids, attention_mask, returns.shape[1])
    loss, metrics = value_loss(values, old_values, returns, mask, cfg.cliprange_value, cfg.agg, dp)
    bad = (~torch.isfinite(loss.detach())).float()
    if dp is not None:  # every rank must take the same branch, or the gradient all-reduce hangs
        bad = dp.sum(bad)
    metrics["skipped"] = (bad > 0).float()
    if bad > 0:
        return metrics
    backward(loss)
    params = [p for p in critic.parameters() if p.grad is not None]
    metrics["grad_norm"] = grad_norm(params) / grad_scale
    if cfg.clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm * grad_scale)
    return metrics
