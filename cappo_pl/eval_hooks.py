"""Pass@k, exact and hidden-target metrics in an RLModule's validation (``cappo_pl.evaluation``).

A mixin of ``RLModule`` (which owns ``policy``, ``tokenizer``, ``eval_cfg``, ``val_samples`` and the
rollout/ppo configs). Before the first update, every valid answer of the held-out prompts and of a
fixed sample of training prompts is teacher-forced under the initial policy: pi_SFT(y), which the
support-kept metric and the ``RareAnswers``/``EdgeFailure`` hidden targets need and which cannot be
recomputed later (checkpointed by ``RunState``). Every validation then teacher-forces the same
answers under the current policy: batched and chunked, no generation.

Under data parallelism every rank validates every prompt (as for the SRR): the exact metrics are the
same on every rank and are not summed over ranks (the single-process values, counts included), and the
forwards are the same on every rank, which ZeRO-3 and FSDP need. The sampled metrics are summed: each
rank draws its own samples of every prompt, so ``val/pass@k`` is the mean of the ranks' estimates.
pi_SFT is checkpointed; the hidden subsets are drawn again from the config on every start (a pure
function of the answers, pi_SFT and ``hidden_seed``).
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from cappo_pl.data.records import PromptBatch, Record
from cappo_pl.errors import ConfigError
from cappo_pl.evaluation import PromptSet, train_eval_rows
from cappo_pl.experience import Generation
from cappo_pl.metrics import ExactSupportMetrics, SampledPassAtK
from cappo_pl.references import sequence_logprobs

# the metric name each split's exact values are logged under
PREFIX = {"val": "val", "train": "train_eval"}


def prefixed(values: dict[str, Tensor], prefix: str, hidden: bool) -> dict[str, float]:
    """``ExactSupportMetrics`` keys -> logged keys: ``<prefix>/exact/<k>`` and (``hidden``) ``<prefix>/hidden/<k>``."""
    out = {}
    for key, value in values.items():
        if key.startswith("hidden/") and not hidden:
            continue
        name = f"{prefix}/{key}" if key.startswith("hidden/") else f"{prefix}/exact/{key}"
        out[name] = float(value)
    return out


class EvalHooks:
    """Support and diversity metrics for ``RLModule`` (see the module docstring)."""

    def _init_eval(self) -> None:
        cfg = self.eval_cfg
        self.pass_at_k = SampledPassAtK(cfg.sampled_ks(self.val_samples))
        # identical on every rank (every rank scores every prompt): no sum over ranks; CPU states, not submodules
        self.exact_metrics = {
            split: ExactSupportMetrics(cfg.exact_ks, cfg.support_eps, sync_on_compute=False) for split in PREFIX
        }
        self.eval_sets: dict[str, PromptSet] = {}
        self._answer_cache: dict[tuple[str, int], list[str]] = {}
        self._exact_seconds: dict[str, float] = {}
        self._noted_no_enumeration = False
        self._baseline_missing = False  # resumed from a checkpoint without the initial policy's scores
        self._hidden_drawn = False

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
        # one precision everywhere (validation_step runs under the plugin's autocast, the hooks do not), so
        # pi and pi_SFT, val and train_eval are scored alike
        with self.trainer.precision_plugin.forward_context():
            logp = sequence_logprobs(
                self.policy, self.tokenizer, prompts, comps, self.rollout_cfg.temperature, self.eval_cfg.batch_size,
                self.ppo.score_chunk_tokens, self.device, self.rollout_cfg.max_new_tokens,
            )  # fmt: skip
        self.policy.train(was_training)
        return list(logp.cpu().split(counts))

    def _ensure_eval_sets(self) -> None:
        """Score every valid answer under the initial policy (once per run) and draw the hidden subsets.

        Raises:
            ConfigError: a resumed run whose held-out or ``train_eval`` prompts differ from the checkpoint's.

        """
        if self._enumerable_task() is None or (self.eval_sets and self._hidden_drawn):
            return
        cfg = self.eval_cfg
        n_train = len(self._split_records("train"))
        splits = {
            "val": list(range(len(self._val_records()))),
            "train": train_eval_rows(n_train, cfg.train_prompts, cfg.hidden_seed),
        }
        if self._baseline_missing:
            rank_zero_info(
                "[eval] the checkpoint holds no initial-policy scores of the valid answers: support_kept and the "
                "SFT-based hidden targets compare with the resumed policy instead"
            )
        for split, rows in splits.items():
            if split in self.eval_sets:  # restored: pi_SFT cannot be recomputed, so the prompts must match
                if self.eval_sets[split].rows != rows:
                    raise ConfigError(
                        f"model.evaluation: the {PREFIX[split]} prompts differ from the checkpoint's "
                        "(data.val_prompts, model.evaluation.train_prompts or hidden_seed changed); "
                        "resume with the same ones"
                    )
            elif rows:
                self.eval_sets[split] = PromptSet(rows, self._score_answers(split, rows))
                self._warn_unreachable(split, rows)
        self._draw_hidden()

    def _draw_hidden(self) -> None:
        """The hidden subsets S of every scored prompt, from the config (also after a resume)."""
        cfg = self.eval_cfg
        for split, ps in self.eval_sets.items():
            ps.hidden = None
            if cfg.hidden is not None:
                records = self._split_records(split)
                ps.hidden = [
                    cfg.hidden.select(self._answers(split, r), s, records[r].prompt, cfg.hidden_seed)
                    for r, s in zip(ps.rows, ps.sft_logp, strict=True)
                ]
        self._hidden_drawn = True

    def _warn_unreachable(self, split: str, rows: list[int]) -> None:
        """One line when valid answers cannot be sampled within ``max_new_tokens`` (they count as probability 0)."""
        budget = self.rollout_cfg.max_new_tokens
        long = sum(
            len(self.tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 > budget
            for r in rows
            for a in self._answers(split, r)
        )
        if long:
            rank_zero_warn(
                f"model.rollout.max_new_tokens={budget}: {long} valid answers of the {PREFIX[split]} prompts need "
                "more tokens (with EOS); the exact metrics count them as probability 0"
            )

    # ------------------------------------------------------------------------------- updates
    def _eval_update(self, batch: PromptBatch, gen: Generation) -> None:
        """One validation batch: sampled pass@k from ``gen``; exact metrics of its prompts' answers."""
        self.pass_at_k.update(gen.correct.cpu(), gen.texts, self.val_samples)
        if self.eval_cfg.exact and "val" in self.eval_sets:
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
        self._exact_seconds = {}

    def _log_eval_epoch(self) -> None:
        """Log and reset the epoch's sampled and exact metrics (states already summed over ranks)."""
        if self.eval_cfg.exact and "train" in self.eval_sets:  # the fixed training sample, every rank the same prompts
            self._exact_update("train", self.eval_sets["train"].rows)
        values: dict[str, float] = {}
        if self.pass_at_k.prompts > 0:
            values.update({f"val/{k}": float(v) for k, v in self.pass_at_k.compute_all().items()})
        for split, metric in self.exact_metrics.items():
            if metric.prompts > 0:
                values.update(prefixed(metric.compute_all(), PREFIX[split], self.eval_cfg.hidden is not None))
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
                values.update(prefixed(metric.compute_all(), PREFIX[split], ps.hidden is not None))
        return values
