"""Loss aggregation over a (B, T) matrix of per-token losses.

Modes follow verl's ``agg_loss`` (verl-project/verl ``verl/trainer/ppo/core_algos.py``); see
shared/reference/algorithms.md section 1.9.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

AggMode = Literal["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def agg_loss(
    loss_mat: Tensor, mask: Tensor, mode: AggMode = "token-mean", loss_scale_factor: float | None = None
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

    Args:
        loss_mat: per-token losses, shape (B, T).
        mask: 1 for tokens that count, shape (B, T).
        mode: aggregation mode.
        loss_scale_factor: the constant L of ``seq-mean-token-sum-norm``.

    Returns:
        A scalar tensor. An all-masked input gives 0 (with a gradient path), never NaN.

    """
    mask = mask.to(loss_mat.dtype)
    masked = loss_mat * mask
    if mode == "token-mean":
        return masked.sum() / mask.sum().clamp_min(1.0)
    if mode == "token-sum":
        return masked.sum()
    if mode == "seq-mean-token-mean":
        lengths = mask.sum(-1)
        per_seq = masked.sum(-1) / lengths.clamp_min(1.0)
        valid = (lengths > 0).to(loss_mat.dtype)
        return (per_seq * valid).sum() / valid.sum().clamp_min(1.0)
    if mode == "seq-mean-token-sum":
        return masked.sum(-1).mean()
    if mode == "seq-mean-token-sum-norm":
        norm = float(loss_scale_factor) if loss_scale_factor is not None else float(loss_mat.shape[-1])
        return masked.sum() / (loss_mat.shape[0] * norm)
    raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {AGG_MODES}")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1 (0 when nothing is valid)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)
