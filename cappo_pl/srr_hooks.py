"""The Support Retention Ratio's plumbing in an RLModule: references, their SFT scores, validation updates.

A mixin of ``RLModule`` (which owns ``policy``, ``tokenizer``, ``srr_cfg``, ``srr``, ``references``
and ``initial_srr``): the reference set is built and scored under the initial policy before the first
update, every validation teacher-forces it, and the step-0 value goes straight to the loggers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cappo_pl.data.records import PromptBatch, Record
from cappo_pl.metrics import mean_token_logprob
from cappo_pl.references import build_reference_set, flatten, reference_logprobs, srr_metric


class SRRHooks:
    """Validation-time SRR for ``RLModule`` (see the module docstring)."""

    def _log_srr_epoch(self) -> None:
        if self.references is not None and self.srr.total > 0:
            for key, value in self.srr.compute_all().items():  # already summed over ranks (exact)
                self.log(f"val/{key}", value.float(), sync_dist=False)
        self.srr.reset()

    # ------------------------------------------------------------------------------------- SRR
    def _val_records(self) -> list[Record]:
        dm = self.trainer.datamodule
        if not hasattr(dm, "val_records"):  # a custom DataModule: no record-aligned validation, so no SRR
            return []
        return dm.val_records()

    def _ensure_references(self) -> None:
        """Build the SRR reference set and score it under the current (initial) policy, once per run."""
        if self.references is not None and not self._srr_resolved:  # restored from a checkpoint
            self._resolve_srr_thresholds()
        if not self.srr_cfg.enabled or self.references is not None:
            return
        records = self._val_records()
        if not records:
            return
        was_training = self.policy.training
        self.policy.eval()
        cfg = self.srr_cfg
        worker = self.worker()
        sampler = lambda prompts: worker.references(prompts, cfg.sampled_per_prompt, self.rollout_cfg)  # noqa: E731
        refs = build_reference_set(records, cfg, sampler)
        prompts, comps, ids = flatten(refs, records, range(len(records)))
        scores = torch.cat([mean_token_logprob(lp, m) for lp, m in self._teacher_force(prompts, comps)]).cpu()
        ids_t = torch.tensor(ids)
        refs.sft_scores = [scores[ids_t == i] for i in range(len(records))]
        self.references = refs
        self.policy.train(was_training)
        self._resolve_srr_thresholds()

    def _resolve_srr_thresholds(self) -> None:
        """The SRR metric with its ``quantile:q`` thresholds set from the SFT scores (they are the baseline)."""
        metric, self._srr_taus = srr_metric(self.srr_cfg, self.references.sft_scores)
        self.srr = metric.to(self.device)
        self._srr_resolved = True

    def _teacher_force(self, prompts: list[str], comps: list[str]) -> list[tuple[Tensor, Tensor]]:
        return reference_logprobs(
            self.policy, self.tokenizer, prompts, comps, self.rollout_cfg.temperature,
            self.srr_cfg.batch_size, self.ppo.score_chunk_tokens, self.device,
        )  # fmt: skip

    def _initial_srr_values(self) -> dict[str, float]:
        """``val/srr*`` of the initial policy, from the scores taken before the first update."""
        if self.references is None or not self.references.sft_scores:
            return {}
        # every rank holds the same full set of initial scores, and only rank 0 logs: no collective
        # (a sync here would wait forever for the other ranks)
        metric = srr_metric(self.srr_cfg, self.references.sft_scores, sync_on_compute=False)[0]
        for i, scores in enumerate(self.references.sft_scores):
            if scores.numel():
                ones = torch.ones(scores.numel(), 1)
                metric.update(scores[:, None], ones, scores, torch.full((scores.numel(),), i))
        if metric.total == 0:
            return {}
        values = {f"val/{k}": float(v) for k, v in metric.compute_all().items()}
        values.update({f"val/{k}": v for k, v in self._srr_taus.items()})
        self.initial_srr = values
        return values

    def _srr_update(self, batch: PromptBatch) -> None:
        rows = range(batch.index, batch.index + len(batch))
        prompts, comps, ids = flatten(self.references, self._val_records(), rows)
        if not comps:
            return
        sft = torch.cat([self.references.sft_scores[i] for i in rows]).to(self.device)
        start = 0
        for logp, mask in self._teacher_force(prompts, comps):
            end = start + logp.shape[0]
            self.srr.update(logp, mask, sft[start:end], torch.tensor(ids[start:end], device=self.device))
            start = end
