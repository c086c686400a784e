"""Token logprobs and entropy from temperature-scaled logits, in chunks.

The LM head is applied to the final hidden states a chunk of tokens at a time, so the (B, T, V)
logits tensor never exists at once. With gradients on, each chunk is recomputed in the backward
pass (activation checkpointing of the head), so memory stays O(chunk x V) there too.
Entropy: ``H_t = logsumexp(z_t) - sum_v softmax(z_t)_v z_tv`` with ``z = logits / temperature``
(verl ``entropy_from_logits``; docs/reference/algorithms.md section 1.8).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def logprobs_and_entropy(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Log-probability of ``targets`` and entropy under ``softmax(logits / temperature)``.

    Args:
        logits: (..., V) raw logits (any float dtype; computed in float32).
        targets: (...) token ids.
        temperature: sampling temperature (> 0).

    Returns:
        ``(logp, entropy)``, each shaped like ``targets``, float32.

    """
    z = logits.float() / temperature
    logz = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    entropy = logz - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logp, entropy


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding: ``cumsum(mask) - 1`` (0 on pad positions)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@dataclass
class Scores:
    """Per-completion-token scores, (B, T) each; ``hidden`` is (B, T, d) when requested."""

    logp: Tensor
    entropy: Tensor
    hidden: Tensor | None = None
    gram_stats: Tensor | None = None
    """(B, T, 3) detached per-token Gram statistics of the requested space (``jacobian_stats``)."""
    topk_logp: Tensor | None = None
    """(B, T, K) detached fp32 logprobs of the requested token ids (DPPO Top-K)."""

    def detached(self) -> Scores:
        """The logprobs and entropies without their graph (pi_old when the update's forward is reused)."""
        return Scores(self.logp.detach(), self.entropy.detach())


def jacobian_stats(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, head_weight: Tensor | None = None
) -> Tensor:
    """Per-token inner products of the two gradient directions every objective is built from.

    With ``z = logits / T`` and ``p = softmax(z)``: ``d logp_y / d logits = u / T`` with
    ``u = e_y - p``, and ``d H / d logits = v / T`` with ``v = -p * (log p + H)``. A loss that
    depends on the model through the per-token (logp, entropy) has per-token logit gradient
    ``(a u + b v) / T`` (``a = dL/dlogp``, ``b = dL/dH``), so its Gram with another such loss needs
    only three scalars per token. For a linear head ``logits = W h`` the hidden-state gradient is
    ``W^T (a u + b v) / T``: the same form with ``x = W^T u``, ``y = W^T v`` (two extra (V x d)
    products per token, no backward pass, whatever the number of objectives).

    Args:
        logits: (..., V) raw logits.
        targets: (...) token ids.
        temperature: sampling temperature.
        head_weight: (V, d) weight of a linear LM head for hidden-space statistics; None for logits.

    Returns:
        (..., 3) float32: ``(u.u, u.v, v.v) / T^2`` (logits) or ``(x.x, x.y, y.y) / T^2`` (hidden).

    """
    z = logits.detach().float() / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    p = logp_all.exp()
    q = p * (logp_all + (-(p * logp_all).sum(-1, keepdim=True)))  # v = -q
    if head_weight is not None:
        w = head_weight.detach()  # in its own dtype: no (V, d) float32 copy per chunk
        x = (w[targets] - p.to(w.dtype) @ w).float()
        y = -(q.to(w.dtype) @ w).float()
        stats = [(x * x).sum(-1), (x * y).sum(-1), (y * y).sum(-1)]
    else:
        logp_y = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        q_y = q.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        # u.u = (1 - p_y)^2 + sum_{i != y} p_i^2, without the cancellation of 1 - 2 p_y + sum p^2 when p_y ~ 1
        others = (p * p).scatter(-1, targets.unsqueeze(-1), 0.0).sum(-1)
        stats = [torch.expm1(logp_y).square() + others, -q_y + (p * q).sum(-1), (q * q).sum(-1)]
    return torch.stack(stats, -1) / temperature**2


def _head_chunk(
    head: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    temperature: float,
    stats: str | None = None,
    gather_ids: Tensor | None = None,
) -> tuple[Tensor, ...]:
    logits = head(hidden)
    out = list(logprobs_and_entropy(logits, targets, temperature))
    if stats is not None:
        out.append(jacobian_stats(logits, targets, temperature, head.weight if stats == "hidden" else None))
    if gather_ids is not None:  # no gradient, fp32, the same tempered distribution as the sampler's record
        out.append(torch.log_softmax(logits.detach().float() / temperature, dim=-1).gather(-1, gather_ids))
    return tuple(out)


def _plain_linear(head: nn.Module, d: int) -> bool:
    """A linear head whose full (V, d) weight is readable here (not a ZeRO-3 partition)."""
    weight = getattr(head, "weight", None)
    return isinstance(head, nn.Linear) and weight is not None and weight.dim() == 2 and weight.shape[1] == d


def call_as_forward(model: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` run as ``model``'s own forward, so the hooks on ``model`` fire around it.

    FSDP2 gathers a unit's parameters in its forward pre-hook and arranges the reduce-scatter of
    their gradients there; scoring runs the trunk and the chunked LM head as separate calls, so under
    FSDP2 it is routed through the root's call (``scoring`` itself does not change).
    """
    saved = model.__dict__.get("forward")  # an instance-level forward (e.g. accelerate's hooks) is put back
    model.forward = fn
    try:
        return model(*args)
    finally:
        if saved is None:
            del model.forward
        else:
            model.forward = saved


def score_completions(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_len: int,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
    return_hidden: bool = False,
    gram_space: str | None = None,
    topk_ids: Tensor | None = None,
) -> Scores:
    """Score the last ``completion_len`` tokens of each sequence under ``model``.

    Args:
        model: an HF causal LM (``base_model`` + ``get_output_embeddings()``).
        input_ids: (B, P + T) left-padded prompt followed by the right-padded completion.
        attention_mask: (B, P + T).
        completion_len: T.
        temperature: the sampling temperature (logits are divided by it).
        chunk_tokens: tokens per LM-head chunk.
        return_hidden: also return the final hidden states at the T predicting positions.
        gram_space: ``logits`` or ``hidden``: also return ``jacobian_stats`` per token. For a head
            that is not a plain ``nn.Linear`` with a readable weight (e.g. partitioned by ZeRO-3)
            the hidden statistics cannot be formed this way, and the hidden states are returned
            instead (the Gram then uses K autograd VJPs).
        topk_ids: (B, T, K) token ids whose current logprobs to gather (the sampler's top-K), no grad.

    Returns:
        ``Scores`` with logp and entropy (B, T) for completion tokens (garbage on padding: mask it).

    """
    args = (completion_len, temperature, chunk_tokens, return_hidden, gram_space, topk_ids)
    from cappo_pl.strategies import is_fsdp2_unit  # lazily: scoring stays importable without Lightning

    if is_fsdp2_unit(model):
        # a tuple of tensors out of the root's forward (FSDP2 hooks its outputs' tensors for backward)
        as_tuple = lambda ids, mask: tuple(vars(_score(model, ids, mask, *args)).values())  # noqa: E731
        return Scores(*call_as_forward(model, as_tuple, input_ids, attention_mask))
    return _score(model, input_ids, attention_mask, *args)


def _score(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_len: int,
    temperature: float,
    chunk_tokens: int,
    return_hidden: bool,
    gram_space: str | None,
    topk_ids: Tensor | None,
) -> Scores:
    out = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    hidden = out.last_hidden_state[:, -completion_len - 1 : -1]  # position t predicts token t + 1
    targets = input_ids[:, -completion_len:]
    head = model.get_output_embeddings()
    if gram_space == "hidden" and not _plain_linear(head, hidden.shape[-1]):
        gram_space, return_hidden = None, True
    b, t, d = hidden.shape
    flat_h, flat_y = hidden.reshape(b * t, d), targets.reshape(b * t)
    flat_k = None if topk_ids is None else topk_ids.reshape(b * t, -1)
    outs = []
    for start in range(0, b * t, chunk_tokens):
        h, y = flat_h[start : start + chunk_tokens], flat_y[start : start + chunk_tokens]
        k = None if flat_k is None else flat_k[start : start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            outs.append(checkpoint(_head_chunk, head, h, y, temperature, gram_space, k, use_reentrant=False))
        else:
            outs.append(_head_chunk(head, h, y, temperature, gram_space, k))
    logp = torch.cat([o[0] for o in outs]).view(b, t)
    entropy = torch.cat([o[1] for o in outs]).view(b, t)
    stats = torch.cat([o[2] for o in outs]).view(b, t, 3) if gram_space is not None else None
    topk = torch.cat([o[-1] for o in outs]).view(b, t, -1) if topk_ids is not None else None
    return Scores(logp, entropy, hidden if return_hidden else None, stats, topk)


@torch.no_grad()
def check_head_matches_forward(model: nn.Module, vocab_size: int, atol: float = 1e-4) -> None:
    """Raise if ``base_model`` + output embeddings does not reproduce the model's own logits.

    Scoring applies the LM head itself (to chunk it); a model whose forward post-processes logits
    (soft-capping, a logit scale) would then give logprobs that differ from the sampler's.

    Raises:
        ConfigError: naming the model class.

    """
    from cappo_pl.errors import ConfigError

    ids = torch.arange(6, device=next(model.parameters()).device).remainder(vocab_size).view(1, 6)
    mask = torch.ones_like(ids)
    was_training = model.training
    model.eval()
    full = model(input_ids=ids, attention_mask=mask).logits.float()
    mine = model.get_output_embeddings()(model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state).float()
    model.train(was_training)
    if not torch.allclose(full, mine, atol=atol, rtol=1e-4):
        raise ConfigError(
            f"model.policy.path: {type(model).__name__} post-processes its logits (soft-capping or scaling), "
            "which chunked scoring does not reproduce; this model is not supported yet"
        )
