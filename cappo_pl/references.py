"""SFT reference completions for the SRR: where they come from and their teacher-forced logprobs.

References come from the data (``Record.references``, the SFT set) or, for prompts without any,
are sampled once from the initial policy and kept (in the checkpoint) so every evaluation of a run
uses the same set. Scoring is batched teacher forcing through ``score_completions`` (chunked LM
head, temperature-scaled logits as in training): no generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated

import torch
from annotated_types import Interval
from torch import Tensor, nn

from cappo_pl.constraints import NonNegativeInt, PositiveInt, check_fields
from cappo_pl.data.records import Record
from cappo_pl.errors import ConfigError
from cappo_pl.metrics.srr import SupportRetentionRatio, threshold_key
from cappo_pl.scoring import score_completions


@dataclass
class SRRConfig:
    """Support Retention Ratio in validation (CaPPO; docs/cappo.md)."""

    enabled: bool = True
    """Compute ``val/srr*`` in every validation."""
    thresholds: list[Annotated[float, Interval(gt=0, le=1)] | str] = field(default_factory=lambda: [0.1, 0.01, 0.001])
    """Per-token probabilities tau; a reference is retained if its mean token logprob >= log(tau).
    The first is the headline ``val/srr``; each one is logged as ``val/srr@<tau>``. ``quantile:q``
    (0 < q < 1) sets tau to the q-quantile of the SFT policy's own mean token logprob on the references,
    as the CaPPO paper defines the SRR (so the initial policy keeps about 1 - q of them); logged as
    ``val/srr@q<q>``, its tau as ``val/srr_tau@q<q>``. 0.1 (mean token
    logprob >= -2.3, perplexity <= 10) separates kept from dropped completions both for the built-in
    task's 100-token vocabulary (uniform is 0.01) and for LLM-sized ones; 1e-2 and 1e-3 are the looser
    tests the CaPPO reconstruction suggests (docs/reference/algorithms.md section 5)."""
    relative_threshold: Annotated[float, Interval(gt=0, le=1)] = 0.1
    """tau_rel of ``val/srr_rel``: mean per-token log-ratio to the initial (SFT) policy >= log(tau_rel)."""
    sampled_per_prompt: NonNegativeInt = 8
    """m: references sampled from the initial policy for prompts that have none in the data."""
    max_per_prompt: PositiveInt | None = None
    """Use at most this many references per prompt (None: all)."""
    batch_size: PositiveInt = 256
    """References per teacher-forced forward."""

    def __post_init__(self) -> None:
        check_fields(self)


QUANTILE = "quantile:"


def threshold_quantile(threshold: float | str, key: str = "model.srr.thresholds") -> float | None:
    """Q of a ``"quantile:q"`` threshold (None for a fixed probability).

    Raises:
        ConfigError: a string that is not ``quantile:q`` with 0 < q < 1 (names ``key``).

    """
    if not isinstance(threshold, str):
        return None
    try:
        q = float(threshold.removeprefix(QUANTILE)) if threshold.startswith(QUANTILE) else float("nan")
    except ValueError:
        q = float("nan")
    if not 0.0 < q < 1.0:
        raise ConfigError(f"{key}: must be a probability in (0, 1] or 'quantile:q' with 0 < q < 1, got {threshold!r}")
    return q


def srr_metric(
    cfg: SRRConfig, sft_scores: list[Tensor] | None = None, **kwargs
) -> tuple[SupportRetentionRatio, dict[str, float]]:
    """The SRR metric with every threshold resolved, and the tau of each quantile threshold by key.

    A ``quantile:q`` threshold is ``tau = exp(Q_q(s))``, ``s`` the SFT policy's mean token logprobs of all
    references and ``Q_q`` the lower empirical quantile (a score itself, so at least 1 - q of the
    references score >= it); before they exist (``sft_scores`` None) it is a placeholder of 1.0, replaced
    once they are measured. ``kwargs`` go to the Metric.
    """
    scores = torch.cat(sft_scores).to(torch.float64) if sft_scores else None
    taus, names, resolved = [], [], {}
    for t in cfg.thresholds:
        q = threshold_quantile(t)
        if q is None:
            taus.append(float(t))
            names.append(threshold_key(float(t)))
            continue
        name = f"q{q:g}"
        tau = 1.0
        if scores is not None and scores.numel():
            log_tau = float(torch.quantile(scores, q, interpolation="lower"))
            tau = min(1.0, math.exp(log_tau))
            while tau > 0 and math.log(tau) > log_tau:  # the metric compares with log(tau): keep the boundary score
                tau = math.nextafter(tau, 0.0)
        taus.append(max(tau, 1e-300))  # a quantile of -inf scores: a tau that keeps the (0, 1] contract
        names.append(name)
        resolved[f"srr_tau@{name}"] = tau
    return SupportRetentionRatio(taus, cfg.relative_threshold, names=names, **kwargs), resolved


@dataclass
class ReferenceSet:
    """Reference completions of the validation prompts, aligned with the validation records.

    Attributes:
        texts: ``texts[i]`` are the references of validation record ``i``.
        sft_scores: ``sft_scores[i]`` (len(texts[i]),) mean token logprob of each reference under the
            initial policy, float64; None until measured.
        sampled: how many prompts got sampled references (no references in the data).

    """

    texts: list[list[str]]
    sft_scores: list[Tensor] | None = None
    sampled: int = 0

    def state_dict(self) -> dict:
        return {"texts": self.texts, "sft_scores": self.sft_scores, "sampled": self.sampled}

    @classmethod
    def from_state(cls, state: dict) -> ReferenceSet:
        return cls(state["texts"], state.get("sft_scores"), state.get("sampled", 0))


def encode_references(tokenizer, prompts: list[str], completions: list[str], device) -> tuple[Tensor, Tensor, int]:
    """Left-padded prompts followed by right-padded completions + EOS (the SFT layout).

    Returns:
        ``(input_ids (B, P + T), attention_mask (B, P + T), T)``; the completion mask is the last T
        columns of the attention mask.

    """
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    comps = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in completions]
    width = max(len(c) for c in comps)
    ids = torch.full((len(comps), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, c in enumerate(comps):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    input_ids = torch.cat([enc["input_ids"], ids], dim=1).to(device)
    attention = torch.cat([enc["attention_mask"], mask], dim=1).to(device)
    return input_ids, attention, width


@torch.no_grad()
def reference_logprobs(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    completions: list[str],
    temperature: float,
    batch_size: int,
    chunk_tokens: int,
    device,
) -> list[tuple[Tensor, Tensor]]:
    """Teacher-forced token logprobs of ``completions[i]`` given ``prompts[i]``, in batches.

    Returns:
        One ``(token_logprobs (b, T), mask (b, T))`` pair per batch of ``batch_size`` references.

    """
    out = []
    for s in range(0, len(completions), batch_size):
        ids, attn, t = encode_references(
            tokenizer, prompts[s : s + batch_size], completions[s : s + batch_size], device
        )
        scores = score_completions(model, ids, attn, t, temperature, chunk_tokens)
        out.append((scores.logp, attn[:, -t:]))
    return out


@torch.no_grad()
def sequence_logprobs(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    completions: list[str],
    temperature: float,
    batch_size: int,
    chunk_tokens: int,
    device,
    max_new_tokens: int | None = None,
) -> Tensor:
    """Sequence log-probabilities log pi(y | x): the sum of the completion's token logprobs and EOS's.

    The probability that the sampler (at ``temperature``, no top-p) emits exactly ``completions[i]``
    and stops, as the exact metrics need (``cappo_pl.metrics.exact``). Teacher-forced in batches by
    :func:`reference_logprobs`; the token logprobs are float32, their sum float64.

    Args:
        model: causal LM (put it in eval mode: dropout would change the scores).
        tokenizer: its tokenizer (the completion is encoded without special tokens, then EOS).
        prompts: (N) prompt of each completion.
        completions: (N) completion texts.
        temperature: the sampling temperature the logits are divided by.
        batch_size: completions per forward.
        chunk_tokens: tokens per LM-head chunk.
        device: where the forwards run.
        max_new_tokens: the sampler's limit; a completion whose tokens plus EOS exceed it gets
            ``-inf`` (the sampler can never emit it) without a forward. None: no limit.

    Returns:
        (N,) float64 on ``device``.

    """
    out = torch.full((len(completions),), float("-inf"), dtype=torch.float64, device=device)
    keep = list(range(len(completions)))
    if max_new_tokens is not None:
        lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in completions]  # + EOS
        keep = [i for i in keep if lengths[i] <= max_new_tokens]
    if not keep:
        return out
    batches = reference_logprobs(
        model, tokenizer, [prompts[i] for i in keep], [completions[i] for i in keep],
        temperature, batch_size, chunk_tokens, device,
    )  # fmt: skip
    sums = torch.cat([torch.where(mask > 0, logp.double(), 0.0).sum(-1) for logp, mask in batches])  # (len(keep),)
    out[torch.tensor(keep, device=device)] = sums.to(device)
    return out


def build_reference_set(records: list[Record], cfg: SRRConfig, sampler) -> ReferenceSet:
    """References per record: the data's (distinct), else ``sampler(prompts) -> list[list[str]]`` (once).

    SFT data may repeat a reference (``SumTask``'s Zipf draws): the SRR counts each completion once.
    """
    texts = [list(dict.fromkeys(r.references))[: cfg.max_per_prompt] for r in records]
    missing = [i for i, t in enumerate(texts) if not t]
    if missing:
        drawn = sampler([records[i].prompt for i in missing])
        for i, refs in zip(missing, drawn, strict=True):
            texts[i] = refs[: cfg.max_per_prompt]
    return ReferenceSet(texts, sampled=len(missing))


def flatten(refs: ReferenceSet, records: list[Record], rows: range) -> tuple[list[str], list[str], list[int]]:
    """Prompts, completions and prompt ids of the references of records ``rows``."""
    prompts, comps, ids = [], [], []
    for i in rows:
        for text in refs.texts[i]:
            prompts.append(records[i].prompt)
            comps.append(text)
            ids.append(i)
    return prompts, comps, ids
