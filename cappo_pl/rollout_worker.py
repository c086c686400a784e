"""The rollout worker: prompts -> tokenize -> sample with the run's random streams -> decode -> reward.

One small object used wherever the policy writes completions: the training step (and DAPO's extra
generation batches), validation, and the SRR reference set sampled from the SFT policy. Which random
stream each use draws from is decided here, from ``cappo_pl.seeds``; the module only says which
step, batch and rank it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cappo_pl.data.records import Record, reward_fields
from cappo_pl.experience import Generation
from cappo_pl.rewards.base import call_reward
from cappo_pl.rollout import Rollout, RolloutConfig, row_uniforms, sample
from cappo_pl.seeds import derive_seed, generator


@dataclass
class RolloutWorker:
    """Writes completions with ``policy`` and scores them with ``reward_fn``.

    Attributes:
        policy: the causal LM that samples.
        tokenizer: its tokenizer (left padding is set per call).
        reward_fn: ``fn(prompts, completions, **fields)`` (None: sampling only, e.g. SRR references).
        seed: the run's seed (``model.seed``).
        rank: this process's global rank (the per-rank streams).
        device: where sampling runs.
        success_threshold: a valid sample with reward >= this counts as correct.
        reward_on_error: ``raise`` or ``skip`` (``call_reward``).
        all_ranks_done: under ZeRO-3/FSDP, this rank's "done" -> every rank's (``rollout.sample``).

    """

    policy: nn.Module
    tokenizer: Any
    reward_fn: Callable[..., Any] | None
    seed: int
    rank: int
    device: torch.device
    success_threshold: float = 1.0
    reward_on_error: str = "raise"
    all_ranks_done: Callable[[bool], bool] | None = None

    def sample(
        self, prompts: list[str], cfg: RolloutConfig, gen: torch.Generator | None, uniforms: Tensor | None = None
    ) -> tuple[Rollout, list[str]]:
        """``cfg.group_size`` completions per prompt (group-major) and their decoded texts."""
        enc = self.tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
        ro = sample(
            self.policy, enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device),
            cfg, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, gen, self.all_ranks_done, uniforms,
        )  # fmt: skip
        return ro, self.tokenizer.batch_decode(ro.completion_ids, skip_special_tokens=True)

    def rewards(self, records: list[Record], texts: list[str], group: int) -> tuple[Tensor, Tensor]:
        """``(rewards (N,), valid (N,))`` of G = ``group`` completions per record."""
        prompts = [r.prompt for r in records for _ in range(group)]
        fields = reward_fields(records, group)
        rewards, valid = call_reward(self.reward_fn, prompts, texts, fields, self.reward_on_error)
        return rewards.to(self.device), valid.to(self.device)

    def _judge(self, records: list[Record], ro: Rollout, texts: list[str], group: int) -> Generation:
        rewards, valid = self.rewards(records, texts, group)
        return Generation(records, ro, texts, rewards, valid, (rewards >= self.success_threshold) & valid)

    def generate(self, records: list[Record], cfg: RolloutConfig, step: int, gen_batch: int, offset: int) -> Generation:
        """Generation batch ``gen_batch`` of RL step ``step``, its prompts from ``offset`` of the global batch.

        Draws from the ``rollout`` stream of (step, gen_batch, rank), or with ``cfg.seed_per_prompt``
        from one ``rollout_row`` stream per completion, keyed by its place in the global batch.
        """
        uniforms = None
        if cfg.seed_per_prompt:
            keys = [
                derive_seed(self.seed, "rollout_row", step, gen_batch, offset + p, g)
                for p in range(len(records))
                for g in range(cfg.group_size)
            ]
            uniforms = row_uniforms(keys, cfg.max_new_tokens, self.device)
        gen = generator(self.seed, "rollout", step, gen_batch, self.rank, device=self.device)
        ro, texts = self.sample([r.prompt for r in records], cfg, gen, uniforms)
        return self._judge(records, ro, texts, cfg.group_size)

    def validate(self, records: list[Record], cfg: RolloutConfig, batch: int) -> Generation:
        """Validation batch ``batch``: ``cfg.group_size`` samples per prompt from the ``validation`` stream."""
        gen = generator(self.seed, "validation", batch, self.rank, device=self.device)
        ro, texts = self.sample([r.prompt for r in records], cfg, gen)
        return self._judge(records, ro, texts, cfg.group_size)

    @torch.no_grad()
    def references(self, prompts: list[str], m: int, cfg: RolloutConfig) -> list[list[str]]:
        """``m`` completions per prompt (distinct, EOS-terminated ones only), from the ``srr_references`` stream.

        A truncated sample is not a completion the policy produced, so it is dropped; duplicates are
        kept once (SRR counts distinct completions).
        """
        sample_cfg = RolloutConfig(group_size=m, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
        ro, texts = self.sample(prompts, sample_cfg, generator(self.seed, "srr_references", device=self.device))
        out: list[list[str]] = []
        for i in range(len(prompts)):
            picks = [texts[i * m + j] for j in range(m) if not bool(ro.truncated[i * m + j])]
            out.append(list(dict.fromkeys(t for t in picks if t)))
        return out
