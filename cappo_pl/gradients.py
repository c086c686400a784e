"""Per-objective gradients -> Gram (K x K) -> combiner coefficients -> one combined update.

Three Gram spaces (docs/combiners.md; docs/reference/combiners.md A2.1, A5, B6):

- ``params``: exact. K backward passes through the strategy (under DDP each one is all-reduced, so
  the local Gram of the averaged gradients IS the global Gram: no further reduction). Each
  gradient is stashed, ``G[i, j] = g_i . g_j``, and ``sum_k c_k g_k`` is written into ``.grad``
  in place: no extra backward. Peak extra memory: about K x the parameter size (the stash).
  Refused under DeepSpeed (ZeRO-2/3 cannot run several independent backward passes; every stage
  keeps its own gradient buffers) and FSDP (sharded gradients).
- ``hidden`` (MGDA-UB, Sener & Koltun 2018 Sec. 3.3): gradients of each L_k w.r.t. the last hidden
  state, then ONE backward of ``sum_k c_k L_k``.
- ``logits``: gradients w.r.t. the logits, then the same single backward.

Both representation spaces are computed from three per-token scalars (``scoring.jacobian_stats``)
and the gradients of each L_k w.r.t. the per-token (logp, entropy), which cost no model pass at
all: neither the (B, T, V) logits gradient nor K VJPs through the head are formed. This is exact
for objectives that depend on the model through the per-token (logp, entropy) of the scored
tokens, which every built-in one does. (A non-linear head in ``hidden`` space falls back to K
autograd VJPs w.r.t. the hidden states: ``hidden_gram``.)

In ``hidden``/``logits`` each rank holds different samples, i.e. disjoint coordinates, so the sum
of per-rank Grams, divided by world_size^2, is the Gram of the global loss ``(1/W) sum_r L_r`` (each
rank's loss is normalised over the global batch: ``losses.aggregation.GlobalBatch``), the one a
single process over the same global batch computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from cappo_pl.combiners.base import Combiner
from cappo_pl.constraints import check_fields
from cappo_pl.losses.aggregation import GlobalBatch
from cappo_pl.scoring import Scores

Space = Literal["params", "hidden", "logits"]
Backward = Callable[[Tensor, bool], None]
"""``backward(loss, retain_graph)``: the strategy-aware backward (``LightningModule.manual_backward``)."""


@dataclass
class GradientConfig:
    """Where per-objective gradients are compared.

    Attributes:
        space: ``hidden`` (default: cheap, exact under any strategy), ``logits`` (cheapest) or
            ``params`` (exact parameter-space Gram; K backward passes and K x params memory).
        monitor: compute the Gram (norms, cosines, conflicts in the logs) even when the combiner
            does not need it (Scalarized). Off: a Scalarized step is a plain single backward.

    """

    space: Space = "hidden"
    monitor: bool = True

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Update:
    """What one combined update did."""

    coefficients: Tensor
    """(K,) float64 coefficients c (the weights when no Gram was needed)."""
    gram: Tensor | None
    """(K, K) float64 Gram in the configured space (None when not computed)."""
    skipped: bool
    """True when a non-finite loss, Gram or coefficient made the step be skipped (no gradient)."""
    weights: Tensor | None = None
    """(K,) float64 objective weights the coefficients came from."""


# ----------------------------------------------------------------------------------- pure Grams
def gram_of(vectors: Sequence[Tensor]) -> Tensor:
    """``G[i, j] = v_i . v_j`` in float64 for K same-shaped tensors; (K, K)."""
    flat = torch.stack([v.reshape(-1) for v in vectors]).double()
    return flat @ flat.T


def hidden_gram(losses: Sequence[Tensor], hidden: Tensor) -> Tensor:
    """Gram of ``d L_k / d hidden`` (K VJPs through the LM head only); (K, K) float64.

    Args:
        losses: K scalar losses, each a function of ``hidden`` (B, T, d).
        hidden: the shared representation.

    """
    grads = []
    for loss in losses:
        (g,) = torch.autograd.grad(loss, hidden, retain_graph=True, allow_unused=True)
        grads.append(torch.zeros_like(hidden) if g is None else g.detach())
    return gram_of(grads)


def stats_gram(losses: Sequence[Tensor], logp: Tensor, entropy: Tensor, stats: Tensor) -> Tensor:
    """Gram of ``d L_k / d logits`` (or ``/ d hidden``) from per-token scalars; (K, K) float64.

    Per token t the representation gradient of L_k is ``a_kt u_t + b_kt v_t`` with
    ``a = dL_k/dlogp_t``, ``b = dL_k/dH_t`` (``scoring.jacobian_stats``), so
    ``G[i, j] = sum_t a_i a_j uu + (a_i b_j + b_i a_j) uv + b_i b_j vv``.

    Args:
        losses: K scalar losses, functions of ``logp`` and ``entropy`` (B, T).
        logp: (B, T) per-token logprobs of the scored tokens (part of the graph).
        entropy: (B, T) per-token entropies (part of the graph).
        stats: (B, T, 3) ``(u.u, u.v, v.v) / T^2`` of the space.

    """
    a_rows, b_rows = [], []
    for k, loss in enumerate(losses):
        a, b = torch.autograd.grad(loss, (logp, entropy), retain_graph=True, allow_unused=True)
        if a is None and b is None and loss.requires_grad:
            raise ValueError(
                f"objective {k} does not depend on the scored tokens' logp or entropy, so its gradient is not "
                "in the hidden/logits Gram; use model.gradients.space=params"
            )
        a_rows.append(torch.zeros_like(logp) if a is None else a.detach())
        b_rows.append(torch.zeros_like(entropy) if b is None else b.detach())
    a_mat = torch.stack(a_rows).reshape(len(losses), -1).double()
    b_mat = torch.stack(b_rows).reshape(len(losses), -1).double()
    uu, uv, vv = (stats.reshape(-1, 3).double()[:, i] for i in range(3))
    cross = (a_mat * uv) @ b_mat.T
    return (a_mat * uu) @ a_mat.T + cross + cross.T + (b_mat * vv) @ b_mat.T


# --------------------------------------------------------------------------------- the update
def _finite(*tensors: Tensor | None) -> bool:
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


def _coefficients(combiner: Combiner, gram: Tensor | None, weights: Tensor, losses: Tensor) -> Tensor:
    if combiner.needs_gram:
        return combiner(gram, weights, losses)
    return combiner(torch.zeros(len(weights), len(weights), dtype=torch.float64), weights, losses)


def combined_backward(
    losses: Sequence[Tensor],
    weights: Tensor,
    combiner: Combiner,
    space: Space,
    backward: Backward,
    params: Sequence[torch.nn.Parameter],
    scores: Scores | None = None,
    dp: GlobalBatch | None = None,
    *,
    monitor: bool = True,
    grad_scale: float = 1.0,
) -> Update:
    """Fill ``.grad`` of ``params`` with ``sum_k c_k grad L_k``, ``c = combiner(G, weights)``.

    The caller zeroes the gradients first and runs clipping and the optimizer step after.

    Args:
        losses: K scalar losses (raw, unweighted).
        weights: (K,) objective weights.
        combiner: maps (Gram, weights) to coefficients.
        space: Gram space.
        backward: strategy-aware ``backward(loss, retain_graph)``.
        params: the trained parameters (``params`` space reads and writes their ``.grad``).
        scores: the update's forward (``hidden``/``logits`` spaces): its (B, T) ``logp`` and ``entropy``
            with ``gram_stats`` (B, T, 3) from ``scoring.jacobian_stats``, or the (B, T, d) ``hidden``
            states (``hidden`` space: K VJPs).
        dp: the data-parallel group: the losses and the per-rank Grams (``hidden``/``logits``) are
            summed over it; None with one process.
        monitor: compute the Gram even if the combiner does not need it.
        grad_scale: the AMP loss scale already applied by ``backward`` (``params`` space): the Gram
            is unscaled by it before the combiner, so scale-dependent options (MGDA ``l2``) see the
            true gradients, while ``.grad`` stays scaled as the precision plugin expects.

    Returns:
        The coefficients, the Gram and whether the step was skipped.

    """
    loss_vec = torch.stack([loss.detach().double() for loss in losses])
    if dp is not None:
        # The combiner must see the same losses on every rank (MGDA's loss normalisations read them):
        # losses are normalised over the global batch, so their mean over ranks is the global loss. A
        # non-finite loss on any rank makes it non-finite on all, so every rank takes the same branch.
        loss_vec = dp.sum(loss_vec) / dp.world_size
    loss_vec = loss_vec.cpu()
    weights = weights.detach().double().cpu()
    if not _finite(loss_vec):
        return Update(weights.clone(), None, True, weights)
    if space == "params":
        return _params_update(losses, weights, loss_vec, combiner, backward, params, monitor, grad_scale)

    gram = None
    if combiner.needs_gram or monitor:
        if scores is not None and scores.gram_stats is not None:
            gram = stats_gram(losses, scores.logp, scores.entropy, scores.gram_stats)
        elif space == "hidden" and scores is not None and scores.hidden is not None:
            gram = hidden_gram(losses, scores.hidden)
        else:
            raise ValueError(f"the {space} Gram space needs (logp, entropy, gram_stats) or the hidden states")
        if dp is not None:
            gram = dp.sum(gram) / dp.world_size**2
        gram = gram.cpu()
    if not _finite(gram):
        return Update(weights.clone(), gram, True, weights)
    c = _coefficients(combiner, gram, weights, loss_vec)
    if not _finite(c):
        return Update(c, gram, True, weights)
    total = sum(float(ck) * loss for ck, loss in zip(c, losses, strict=True) if ck != 0)
    if isinstance(total, Tensor):  # all coefficients zero: nothing to back-propagate
        backward(total, False)
    return Update(c, gram, False, weights)


def _params_update(
    losses: Sequence[Tensor],
    weights: Tensor,
    loss_vec: Tensor,
    combiner: Combiner,
    backward: Backward,
    params: Sequence[torch.nn.Parameter],
    monitor: bool,
    grad_scale: float = 1.0,
) -> Update:
    """K backward passes, stash, Gram, coefficients, ``.grad = sum_k c_k g_k`` in place.

    On a non-finite Gram ``.grad`` is left holding ``sum_k w_k g_k`` (non-finite) and the update is
    marked skipped: with an fp16 GradScaler the caller keeps it, so the scaler skips the step and
    lowers its scale (a backward overflow is what that fixes); otherwise the caller zeroes it.
    """
    params = [p for p in params if p.requires_grad]
    if not (combiner.needs_gram or monitor):
        c = _coefficients(combiner, None, weights, loss_vec)
        backward(sum(float(ck) * loss for ck, loss in zip(c, losses, strict=True)), False)
        return Update(c, None, False, weights)
    # One flat float32 (K, P) buffer: the Gram is then a single GEMM and the combination a single GEMV,
    # instead of K^2 small products per parameter (this keeps the params space at its K-backward floor).
    sizes = [p.numel() for p in params]
    buf = torch.zeros(len(losses), sum(sizes), dtype=torch.float32, device=params[0].device)
    used = [False] * len(params)
    for k, loss in enumerate(losses):
        for p in params:
            p.grad = None
        backward(loss, k < len(losses) - 1)
        for i, (p, row) in enumerate(zip(params, buf[k].split(sizes), strict=True)):
            if p.grad is not None:
                row.copy_(p.grad.reshape(-1))
                used[i] = True
    for p in params:
        p.grad = None
    gram = (buf @ buf.T).double().cpu() / grad_scale**2
    if not _finite(gram):  # a backward overflow: leave it visible (see the docstring)
        c = weights.clone()
    else:
        c = _coefficients(combiner, gram, weights, loss_vec)
        if not _finite(c):
            return Update(c, gram, True, weights)
    combined = c.to(buf) @ buf
    for p, flat, u in zip(params, combined.split(sizes), used, strict=True):
        p.grad = flat.view_as(p).to(p.dtype) if u else None  # untouched params keep no gradient (no decay)
    return Update(c, gram, not _finite(gram), weights)


def grad_norm(params) -> Tensor:
    """Global l2 norm of the parameters' gradients (0 without any); FSDP2's sharded DTensor gradients included."""
    params = list(params)
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else None)
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ------------------------------------------------------------------------------------- logging
def gram_metrics(update: Update, names: Sequence[str]) -> dict[str, Tensor]:
    """Namespaced metrics of one update (norms and cosines are in the Gram's space).

    Keys: ``combiner/c_<name>``, ``grad/norm_<name>``, ``grad/cos_<a>_<b>``, ``grad/combined_norm``
    (``sqrt(c^T G c)``), ``grad/conflict`` (1 if any pair of non-zero gradients has cosine < 0),
    ``grad/combined_norm_ratio`` (that norm over the first objective's weighted gradient norm
    ``|w_1 g_1|``: ~0 is an MGDA stall, >> 1 an update dominated by the other objectives),
    ``grad/cos_combined_<first>`` (cosine of the combined direction with the first objective's
    gradient: how much of the update serves the reward surrogate), ``combiner/skipped`` (1 for a skipped step).
    """
    out = {f"combiner/c_{n}": update.coefficients[i].float() for i, n in enumerate(names)}
    out["combiner/skipped"] = torch.tensor(float(update.skipped))
    g = update.gram
    if g is None or not _finite(g):
        return out
    norms = g.diagonal().clamp_min(0.0).sqrt()
    for i, n in enumerate(names):
        out[f"grad/norm_{n}"] = norms[i].float()
    conflict = False
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            denom = float(norms[i] * norms[j])
            cos = float(g[i, j]) / denom if denom > 0 else 0.0
            out[f"grad/cos_{names[i]}_{names[j]}"] = torch.tensor(cos)
            conflict |= cos < 0
    c = update.coefficients
    combined = math.sqrt(max(float(c @ g @ c), 0.0))
    out["grad/combined_norm"] = torch.tensor(combined)
    # relative to the first objective's (the reward surrogate's) weighted gradient: ~0 means a stall
    w0 = float(update.weights[0]) if update.weights is not None else 1.0
    first = float(norms[0]) * abs(w0)
    out["grad/combined_norm_ratio"] = torch.tensor(combined / first if first > 0 else float("nan"))
    # cosine of the combined direction with the first objective's gradient: near 0 (or below) the update
    # does not improve the reward surrogate to first order, whatever its norm (rescaling hides that)
    along = float(g[0].double() @ c.double())
    denom = float(norms[0]) * combined
    out[f"grad/cos_combined_{names[0]}"] = torch.tensor(along / denom if denom > 0 else float("nan"))
    out["grad/conflict"] = torch.tensor(float(conflict))
    return out
