"""Pass@k, exact and hidden-target metrics in an RLModule's validation (``cappo_pl.evaluation``).

A mixin of ``RLModule`` (which owns ``policy``, ``tokenizer``, ``eval_cfg``, ``val_samples`` and the
rollout/ppo configs). Before the first update, every valid answer of the held-out prompts and of a
fixed sample of training prompts is teacher-forced under the initial policy: pi_SFT(y), which the
support-kept metric and the ``RareAnswers``/``EdgeFailure`` hidden targets need and which cannot be
recomputed later (checkpointed by ``RunState``). Every validation then teacher-forces the same
answers under the current policy: batched and chunked, no generation.

Under data parallelism every rank validates every prompt (as for the SRR) and the metric states are
sums, so each mean is the single-process value exactly; the forwards are the same on every rank,
which ZeRO-3 and FSDP need.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from cappo_pl.data.records import PromptBatch, Record
from cappo_pl.evaluation import PromptSet, train_eval_rows
from cappo_pl.experience import Generation
from cappo_pl.metrics import ExactSupportMetrics, SampledPassAtK
from cappo_pl.references import sequence_logprobs

# the metric name each split's exact values are logged under
PREFIX = {"val": "val", "train": "train_eval"}


def prefixed(values: dict[str, Tensor], prefix: str) -> dict[str, float]:
    """``ExactSupportMetrics`` keys -> logged keys: ``<prefix>/exact/<k>`` and ``<prefix>/hidden/<k>``."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}/{key}" if key.startswith("hidden/") else f"{prefix}/exact/{key}"
        out[name] = float(value)
    return out


class EvalHooks:
    """Support and diversity metrics for ``RLModule`` (see the module docstring)."""

    def _init_eval(self) -> None:
        cfg = self.eval_cfg
        self.pass_at_k = SampledPassAtK(cfg.sampled_ks(self.val_samples))
        self.exact_metrics = {split: ExactSupportMetrics(cfg.exact_ks, cfg.support_eps) for split in PREFIX}
        self.eval_sets: dict[str, PromptSet] = {}
        self.initial_eval: dict[str, float] = {}
        self._answer_cache: dict[tuple[str, int], list[str]] = {}
        self._noted_no_enumeration = False

    # ------------------------------------------------------------------------------ the answers
    def _enumerable_task(self):
        """The task when exact metrics are on and it enumerates its answers, else None (noted once)."""
        task = getattr(self.trainer.datamodule, "task", None)
        if not self.eval_cfg.exact:
            return None
        if task is None or not hasattr(task, "valid_completions"):
            if not self._noted_no_enumeration:
                rank_zero_info(
                    f"[eval] data.task ({type(task).__name__}) has no valid_completions(record): exact and "
                    "hidden-target metrics are off, validation logs the sampled pass@k only"
                )
                self._noted_no_enumeration = True
            return None
        return task

    def _split_records(self, split: str) -> list[Record]:
        return self._val_records() if split == "val" else self.trainer.datamodule.checked_records("train")

    def _answers(self, split: str, row: int) -> list[str]:
        """V(x) of record ``row`` of ``split``, distinct, in the task's order (cached for the run)."""
        key = (split, row)
        if key not in self._answer_cache:
            answers = self.trainer.datamodule.task.valid_completions(self._split_records(split)[row])
            self._answer_cache[key] = list(dict.fromkeys(answers or []))
        return self._answer_cache[key]

    def _score_answers(self, split: str, rows: list[int]) -> list[Tensor]:
        """(|V_i|,) float64 log pi(y) of every valid answer of each row under the current policy."""
        records = self._split_records(split)
        prompts, comps, counts = [], [], []
        for row in rows:
            answers = self._answers(split, row)
            prompts += [records[row].prompt] * len(answers)
            comps += answers
            counts.append(len(answers))
        if not comps:
            return [torch.empty(0, dtype=torch.float64) for _ in rows]
        was_training = self.policy.training
        self.policy.eval()
        logp = sequence_logprobs(
            self.policy, self.tokenizer, prompts, comps, self.rollout_cfg.temperature, self.eval_cfg.batch_size,
            self.ppo.score_chunk_tokens, self.device, self.rollout_cfg.max_new_tokens,
        )  # fmt: skip
        self.policy.train(was_training)
        return list(logp.cpu().split(counts))

    def _ensure_eval_sets(self) -> None:
        """Score every valid answer under the initial policy and draw the hidden subsets, once per run."""
        if self.eval_sets or self._enumerable_task() is None:
            return
        cfg = self.eval_cfg
        n_train = len(self._split_records("train"))
        splits = {
            "val": list(range(len(self._val_records()))),
            "train": train_eval_rows(n_train, cfg.train_prompts, cfg.hidden_seed),
        }
        for split, rows in splits.items():
            if not rows:
                continue
            sft = self._score_answers(split, rows)
            hidden = None
            if cfg.hidden is not None:
                records = self._split_records(split)
                hidden = [
                    cfg.hidden.select(self._answers(split, r), s, records[r].prompt, cfg.hidden_seed)
                    for r, s in zip(rows, sft, strict=True)
                ]
            self.eval_sets[split] = PromptSet(rows, sft, hidden)

    # ------------------------------------------------------------------------------- updates
    def _eval_update(self, batch: PromptBatch, gen: Generation) -> None:
        """One validation batch: sampled pass@k from ``gen``; exact metrics of its prompts' answers."""
        self.pass_at_k.update(gen.correct.cpu(), gen.texts, self.val_samples)
        if "val" in self.eval_sets:
            self._exact_update("val", list(range(batch.index, batch.index + len(batch))))

    def _exact_update(self, split: str, rows: list[int]) -> None:
        start = time.perf_counter()
        ps = self.eval_sets[split]
        where = {row: i for i, row in enumerate(ps.rows)}
        metric = self.exact_metrics[split]
        for row, logp in zip(rows, self._score_answers(split, rows), strict=True):
            i = where[row]
            if logp.numel():
                metric.update(logp, ps.sft_logp[i], ps.hidden[i] if ps.hidden is not None else None)
        self._exact_seconds[split] = self._exact_seconds.get(split, 0.0) + time.perf_counter() - start

    def on_validation_epoch_start(self) -> None:
        self._exact_seconds: dict[str, float] = {}

    def _log_eval_epoch(self) -> None:
        """Log and reset the epoch's sampled and exact metrics (states already summed over ranks)."""
        if "train" in self.eval_sets:  # the fixed training sample, every rank the same prompts
            self._exact_update("train", self.eval_sets["train"].rows)
        values: dict[str, float] = {}
        if self.pass_at_k.prompts > 0:
            values.update({f"val/{k}": float(v) for k, v in self.pass_at_k.compute_all().items()})
        for split, metric in self.exact_metrics.items():
            if metric.prompts > 0:
                values.update(prefixed(metric.compute_all(), PREFIX[split]))
                values[f"{PREFIX[split]}/exact/seconds"] = self._exact_seconds.get(split, 0.0)
        for key, value in values.items():
            self.log(key, value, sync_dist=False)
        self.pass_at_k.reset()
        for metric in self.exact_metrics.values():
            metric.reset()

    def _initial_eval_values(self) -> dict[str, float]:
        """``val/exact/*`` and ``train_eval/exact/*`` of the initial policy, from the scores taken at fit start."""
        values: dict[str, float] = {}
        cfg = self.eval_cfg
        for split, ps in self.eval_sets.items():
            # every rank holds the same scores and only rank 0 logs: no collective
            metric = ExactSupportMetrics(cfg.exact_ks, cfg.support_eps, sync_on_compute=False)
            for i, logp in enumerate(ps.sft_logp):
                if logp.numel():
                    metric.update(logp, logp, ps.hidden[i] if ps.hidden is not None else None)
            if metric.prompts > 0:
                values.update(prefixed(metric.compute_all(), PREFIX[split]))
        self.initial_eval = values
        return values
