"""Loss aggregation over a (B, T) matrix of per-token losses.

Modes follow verl's ``agg_loss`` (verl-project/verl ``verl/trainer/ppo/core_algos.py``);
``seq-mean-token-sum-norm`` is Dr. GRPO's (Liu et al. 2025, "Understanding R1-Zero-Like Training",
arXiv:2503.20783).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

AggMode = Literal["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


@dataclass(frozen=True)
class GlobalBatch:
    """The data-parallel group a mini-batch belongs to: losses are normalised over the global batch.

    DDP and DeepSpeed average gradients over the W ranks, so rank r's loss is set to
    ``W * numerator_r / count_global``. Then ``(1/W) sum_r L_r = sum_r numerator_r / count_global``,
    the loss of one process holding every rank's rows, whatever each rank's token or sequence count
    (verl's global token normalisation; a per-rank mean would weight a rank's tokens by 1/count_r).

    Attributes:
        world_size: W, the number of data-parallel ranks.
        sum: all-reduce (sum) of a tensor over the ranks; every rank calls it the same number of times.

    """

    world_size: int
    sum: Callable[[Tensor], Tensor]


def agg_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: AggMode = "token-mean",
    loss_scale_factor: float | None = None,
    dp: GlobalBatch | None = None,
) -> Tensor:
    """Aggregate per-token losses into a scalar.

    Formulas (``l`` the loss matrix, ``m`` the 0/1 mask, B sequences, T positions):

    - ``token-mean``: ``sum(l m) / sum(m)`` (DAPO, ERC, CE-GPPO).
    - ``token-sum``: ``sum(l m)``.
    - ``seq-mean-token-mean``: ``mean_i( sum_t l m / sum_t m )`` (GRPO, GSPO); sequences with no valid
      token are left out of the mean.
    - ``seq-mean-token-sum``: ``mean_i sum_t l m``.
    - ``seq-mean-token-sum-norm``: ``sum(l m) / (B * L)`` with ``L = loss_scale_factor`` or, when None,
      the padded length T (Dr.GRPO, DPPO).

    With ``dp`` the denominator (token count, sequence count, B) is summed over the ranks and the
    result multiplied by W (see ``GlobalBatch``); ``token-sum`` is only multiplied by W.

    Args:
        loss_mat: per-token losses, shape (B, T).
        mask: 1 for tokens that count, shape (B, T).
        mode: aggregation mode.
        loss_scale_factor: the constant L of ``seq-mean-token-sum-norm``.
        dp: the data-parallel group (None: this rank's rows are the whole batch).

    Returns:
        A scalar tensor. An all-masked input gives 0 (with a gradient path), never NaN.

    """
    mask = mask.to(loss_mat.dtype)
    masked = loss_mat * mask
    f32 = torch.float32  # counts stay exact whatever the losses' dtype
    if mode == "token-mean":
        numerator, count = masked.sum(), mask.sum(dtype=f32)
    elif mode == "token-sum":
        numerator, count = masked.sum(), None
    elif mode == "seq-mean-token-mean":
        lengths = mask.sum(-1)
        valid = (lengths > 0).to(loss_mat.dtype)
        numerator, count = (masked.sum(-1) / lengths.clamp_min(1.0) * valid).sum(), valid.sum(dtype=f32)
    elif mode == "seq-mean-token-sum":
        numerator, count = masked.sum(), torch.tensor(float(loss_mat.shape[0]), device=mask.device)
    elif mode == "seq-mean-token-sum-norm":
        norm = float(loss_scale_factor) if loss_scale_factor is not None else float(loss_mat.shape[-1])
        numerator, count = masked.sum(), torch.tensor(loss_mat.shape[0] * norm, dtype=f32, device=mask.device)
    else:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {AGG_MODES}")
    if dp is not None:
        numerator = numerator * dp.world_size
        count = None if count is None else dp.sum(count.detach().clone())
    if count is None:
        return numerator
    return numerator / torch.where(count > 0, count, torch.ones_like(count))  # nothing valid: 0, not NaN


def masked_mean(values: Tensor, mask: Tensor, dp: GlobalBatch | None = None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1 (0 when nothing is valid).

    With ``dp``: over every rank's positions (the global batch's mean, the same on every rank).
    """
    mask = mask.to(values.dtype)
    if dp is None:
        return (values * mask).sum() / mask.sum().clamp_min(1.0)
    return dp.sum((values * mask).sum()) / dp.sum(mask.sum()).clamp_min(1.0)
