"""SFT reference completions for the SRR: where they come from and their teacher-forced logprobs.

References come from the data (``Record.references``, the SFT set) or, for prompts without any,
are sampled once from the initial policy and kept (in the checkpoint) so every evaluation of a run
uses the same set. Scoring is batched teacher forcing through ``score_completions`` (chunked LM
head, temperature-scaled logits as in training): no generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
from annotated_types import Interval
from torch import Tensor, nn

from cappo_pl.constraints import NonNegativeInt, PositiveInt, check_fields
from cappo_pl.data.records import Record
from cappo_pl.scoring import score_completions


@dataclass
class SRRConfig:
    """Support Retention Ratio in validation (CaPPO; docs/cappo.md)."""

    enabled: bool = True
    """Compute ``val/srr*`` in every validation."""
    thresholds: list[Annotated[float, Interval(gt=0, le=1)]] = field(default_factory=lambda: [0.1, 0.01, 0.001])
    """Per-token probabilities tau; a reference is retained if its mean token logprob >= log(tau).
    The first is the headline ``val/srr``; each one is logged as ``val/srr@<tau>``. 0.1 (mean token
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


def build_reference_set(records: list[Record], cfg: SRRConfig, sampler) -> ReferenceSet:
    """References per record: the data's, else ``sampler(prompts) -> list[list[str]]`` (once)."""
    texts = [list(r.references[: cfg.max_per_prompt]) for r in records]
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
