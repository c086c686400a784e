"""Token logprobs and entropy from temperature-scaled logits, in chunks.

The LM head is applied to the final hidden states a chunk of tokens at a time, so the (B, T, V)
logits tensor never exists at once. With gradients on, each chunk is recomputed in the backward
pass (activation checkpointing of the head), so memory stays O(chunk x V) there too.
Entropy: ``H_t = logsumexp(z_t) - sum_v softmax(z_t)_v z_tv`` with ``z = logits / temperature``
(verl ``entropy_from_logits``; shared/reference/algorithms.md section 1.8).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def _head_chunk(head: nn.Module, hidden: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    return logprobs_and_entropy(head(hidden), targets, temperature)


def score_completions(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_len: int,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
    return_hidden: bool = False,
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

    Returns:
        ``Scores`` with logp and entropy (B, T) for completion tokens (garbage on padding: mask it).

    """
    out = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    hidden = out.last_hidden_state[:, -completion_len - 1 : -1]  # position t predicts token t + 1
    targets = input_ids[:, -completion_len:]
    head = model.get_output_embeddings()
    b, t, d = hidden.shape
    flat_h, flat_y = hidden.reshape(b * t, d), targets.reshape(b * t)
    logps, ents = [], []
    for start in range(0, b * t, chunk_tokens):
        h, y = flat_h[start : start + chunk_tokens], flat_y[start : start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            lp, en = checkpoint(_head_chunk, head, h, y, temperature, use_reentrant=False)
        else:
            lp, en = _head_chunk(head, h, y, temperature)
        logps.append(lp)
        ents.append(en)
    logp = torch.cat(logps).view(b, t)
    entropy = torch.cat(ents).view(b, t)
    return Scores(logp, entropy, hidden if return_hidden else None)


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
