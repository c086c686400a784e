"""Sampling G completions per prompt with a KV cache.

The prompt is encoded once; each new token is one cached forward of the whole batch (no per-token
Python loop over samples, no recomputation of the prompt). The sampler records its own token
logprobs (the behaviour policy mu, DPPO's anchor) on the temperature-scaled, unfiltered
distribution, i.e. the same quantity the trainer recomputes; with ``top_p < 1`` tokens are drawn
from the nucleus but their logprob is still that of the full tempered distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import torch
from annotated_types import Interval
from torch import Tensor, nn

from cappo_pl.constraints import NonNegativeInt, PositiveFloat, PositiveInt, check_fields
from cappo_pl.scoring import position_ids_from_mask


@dataclass
class RolloutConfig:
    """How completions are sampled."""

    group_size: PositiveInt = 8
    """Completions per prompt G."""
    max_new_tokens: PositiveInt = 16
    """Longest completion; a completion without EOS by then counts as truncated."""
    temperature: PositiveFloat = 1.0
    """Sampling temperature; scoring uses the same one."""
    top_p: Annotated[float, Interval(gt=0, le=1)] = 1.0
    """Nucleus sampling mass (1.0: off)."""
    top_k_logprobs: NonNegativeInt = 0
    """Record the top-k logprobs per position (sampled token forced in), for DPPO Top-K; 0: off."""
    seed_per_prompt: bool = False
    """Draw each completion from its own random stream, keyed by (seed, step, the prompt's place in
    the step's global batch, sample index), by inversion of the CDF. Samples then do not depend on
    how prompts are split over ranks or batched: a W-rank run draws what one process with W x
    ``data.prompts_per_step`` draws (up to float noise of batched forwards). Off (default): one
    stream per rank and step (``torch.multinomial``), as the runs in docs/ used."""

    def for_validation(self, samples: int) -> RolloutConfig:
        """Validation's sampling: ``samples`` completions per prompt, otherwise these settings (top-k off)."""
        return RolloutConfig(samples, self.max_new_tokens, self.temperature, self.top_p)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Rollout:
    """Sampled completions, N = prompts x G rows (group-major).

    Attributes:
        prompt_ids: (N, P) left-padded prompt ids.
        prompt_mask: (N, P).
        completion_ids: (N, T) right-padded with the pad id.
        completion_mask: (N, T) 1 up to and including EOS.
        rollout_logp: (N, T) the sampler's token logprobs (behaviour policy mu).
        truncated: (N,) no EOS within max_new_tokens.
        topk_ids: (N, T, K) or None.
        topk_logp: (N, T, K) or None.

    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    rollout_logp: Tensor
    truncated: Tensor
    topk_ids: Tensor | None = None
    topk_logp: Tensor | None = None

    @property
    def input_ids(self) -> Tensor:
        """(N, P + T) prompt and completion."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """(N, P + T); padding after EOS is masked out."""
        return torch.cat([self.prompt_mask, self.completion_mask.to(self.prompt_mask.dtype)], dim=1)

    def select(self, idx: Tensor) -> Rollout:
        """Rows ``idx`` of every tensor."""
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Rollout(*(pick(getattr(self, f)) for f in self.__dataclass_fields__))

    @staticmethod
    def cat(parts: list[Rollout], pad_id: int) -> Rollout:
        """Stack rollouts row-wise, left-padding prompts and right-padding completions to a common width.

        The padding is masked (prompt mask 0, completion mask 0, logprobs 0), and positions are
        derived from the mask, so a row scores the same before and after.
        """
        if len(parts) == 1:
            return parts[0]
        p_len = max(r.prompt_ids.shape[1] for r in parts)
        t_len = max(r.completion_ids.shape[1] for r in parts)

        def pad(t: Tensor, width: int, value: float, left: bool) -> Tensor:
            extra = width - t.shape[1]
            if extra == 0:
                return t
            filler = torch.full((t.shape[0], extra, *t.shape[2:]), value, dtype=t.dtype, device=t.device)
            return torch.cat([filler, t] if left else [t, filler], dim=1)

        has_topk = all(r.topk_ids is not None for r in parts)
        if has_topk != any(r.topk_ids is not None for r in parts):
            raise ValueError("Rollout.cat: some parts have top-k logprobs and some do not")
        return Rollout(
            prompt_ids=torch.cat([pad(r.prompt_ids, p_len, pad_id, True) for r in parts]),
            prompt_mask=torch.cat([pad(r.prompt_mask, p_len, 0, True) for r in parts]),
            completion_ids=torch.cat([pad(r.completion_ids, t_len, pad_id, False) for r in parts]),
            completion_mask=torch.cat([pad(r.completion_mask, t_len, 0, False) for r in parts]),
            rollout_logp=torch.cat([pad(r.rollout_logp, t_len, 0, False) for r in parts]),
            truncated=torch.cat([r.truncated for r in parts]),
            topk_ids=torch.cat([pad(r.topk_ids, t_len, pad_id, False) for r in parts]) if has_topk else None,
            topk_logp=torch.cat([pad(r.topk_logp, t_len, 0, False) for r in parts]) if has_topk else None,
        )


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Set logits outside the smallest set with cumulative probability >= top_p to -inf (keeps >= 1)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs > top_p  # mass before this token already reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def inverse_cdf_sample(probs: Tensor, u: Tensor) -> Tensor:
    """Categorical draws by inversion: the first index whose cumulative probability exceeds ``u``.

    ``i = min{ i : sum_{j<=i} p_j > u * sum_j p_j }``; with u ~ U[0, 1) this is a draw from ``p``
    (unnormalised rows are fine; zero-probability ids are never drawn).

    Args:
        probs: (N, V) non-negative.
        u: (N,) uniforms in [0, 1).

    Returns:
        (N,) long ids.

    """
    cdf = probs.cumsum(-1)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def row_uniforms(keys: list[int], length: int, device: torch.device | str = "cpu") -> Tensor:
    """(len(keys), length) uniforms; row i from its own CPU generator seeded with ``keys[i]``."""
    rows = [torch.rand(length, generator=torch.Generator().manual_seed(k % 2**63)) for k in keys]
    return torch.stack(rows).to(device)


def _cache_of(out) -> object:
    # transformers 5.x renamed the returned KV cache from ``past_key_values`` to ``cache``.
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    cfg: RolloutConfig,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    all_ranks_done: Callable[[bool], bool] | None = None,
    uniforms: Tensor | None = None,
) -> Rollout:
    """Sample ``cfg.group_size`` completions per prompt.

    Args:
        model: HF causal LM.
        prompt_ids: (B, P) left-padded prompts.
        prompt_mask: (B, P).
        cfg: sampling settings.
        eos_id: end-of-sequence id (stops a row; the EOS token is part of the completion).
        pad_id: id written after EOS.
        generator: RNG for the draws (seeded per step for reproducibility).
        all_ranks_done: maps this rank's "every row finished" to "every rank's rows finished". Under
            ZeRO-3 each forward gathers parameters collectively, so ranks must take the same number of
            forwards: none stops before all are done. None: stop as soon as this rank is done.
        uniforms: (B x G, max_new_tokens) per-row uniforms: token t of row i is drawn by inversion
            with ``uniforms[i, t]`` (``RolloutConfig.seed_per_prompt``); None: ``generator``.

    Returns:
        A ``Rollout`` with N = B x G rows.

    """
    modes = [(m, m.training) for m in model.modules()]  # per module: keeps e.g. checkpointing flags
    model.eval()
    ids = prompt_ids.repeat_interleave(cfg.group_size, dim=0)
    attn = prompt_mask.repeat_interleave(cfg.group_size, dim=0).long()
    n = ids.shape[0]
    pos = position_ids_from_mask(attn)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
    past, logits = _cache_of(out), out.logits[:, -1]
    next_pos = pos[:, -1:] + 1
    finished = torch.zeros(n, dtype=torch.bool, device=ids.device)
    tokens, logps, topk_ids, topk_lps = [], [], [], []
    for step in range(cfg.max_new_tokens):
        z = logits.float() / cfg.temperature
        logp_all = torch.log_softmax(z, dim=-1)
        probs = torch.softmax(top_p_filter(z, cfg.top_p), dim=-1)
        if uniforms is None:
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            tok = inverse_cdf_sample(probs, uniforms[:, step])
        tok = torch.where(finished, torch.full_like(tok, pad_id), tok)
        logps.append(logp_all.gather(-1, tok.unsqueeze(-1)).squeeze(-1))
        if cfg.top_k_logprobs:
            k_lp, k_id = logp_all.topk(cfg.top_k_logprobs, dim=-1)
            # Force the sampled token into the set (replacing rank K) when it is missing, as vLLM users do.
            missing = ~(k_id == tok.unsqueeze(-1)).any(-1)
            k_id[missing, -1] = tok[missing]
            k_lp[missing, -1] = logps[-1][missing]
            topk_ids.append(k_id)
            topk_lps.append(k_lp)
        tokens.append(tok)
        finished = finished | (tok == eos_id)
        done = bool(finished.all())
        if all_ranks_done is not None:
            done = all_ranks_done(done)
        if done or step == cfg.max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        out = model(input_ids=tok.unsqueeze(-1), attention_mask=attn, position_ids=next_pos, cache=past, use_cache=True)
        past, logits = _cache_of(out), out.logits[:, -1]
        next_pos = next_pos + 1
    for module, mode in modes:
        module.training = mode
    completion = torch.stack(tokens, dim=1)
    is_eos = completion == eos_id
    # Valid: every position up to and including the first EOS.
    before_eos = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
    truncated = ~is_eos.any(-1)
    return Rollout(
        prompt_ids=ids,
        prompt_mask=prompt_mask.repeat_interleave(cfg.group_size, dim=0),
        completion_ids=completion,
        completion_mask=before_eos.float(),
        rollout_logp=torch.stack(logps, dim=1) * before_eos,
        truncated=truncated,
        topk_ids=torch.stack(topk_ids, dim=1) if topk_ids else None,
        topk_logp=torch.stack(topk_lps, dim=1) if topk_lps else None,
    )
