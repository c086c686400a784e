"""RLModule: the RL fine-tuning loop as one readable story.

One ``training_step`` is one RL step on a batch of prompts:
rollout -> rewards -> pi_old/ref scores -> advantages -> PPO epochs x mini-batches of
(forward, objectives, backward, clip, optimizer step). Math lives in pure functions elsewhere.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from cappo_pl.advantages import GRPO, AdvantageEstimator
from cappo_pl.combiners import Combiner, Scalarized
from cappo_pl.config_checks import check_config, check_strategy
from cappo_pl.constraints import PositiveInt, checked_init
from cappo_pl.critic import CriticConfig, ValueModel, critic_backward
from cappo_pl.data.records import PromptBatch, Record
from cappo_pl.errors import ConfigError
from cappo_pl.eval_hooks import EvalHooks
from cappo_pl.evaluation import EvalConfig
from cappo_pl.experience import DynamicSamplingConfig, OverlongConfig, StepData, collect_experience
from cappo_pl.gradients import GradientConfig, combined_backward, grad_norm, gram_metrics
from cappo_pl.losses.aggregation import GlobalBatch
from cappo_pl.models import (
    PolicyConfig,
    add_lora,
    build_char_tokenizer,
    build_tiny_model,
    enable_gradient_checkpointing,
    freeze,
    load_pretrained,
)
from cappo_pl.objectives import Objective, PolicyObjective, objective_losses
from cappo_pl.optim_config import OptimConfig, PPOConfig, build_optimizer
from cappo_pl.references import ReferenceSet, SRRConfig, srr_metric
from cappo_pl.rollout import Rollout, RolloutConfig
from cappo_pl.rollout_worker import RolloutWorker
from cappo_pl.run_state import RunState
from cappo_pl.scoring import Scores, check_head_matches_forward, score_completions
from cappo_pl.seeds import generator
from cappo_pl.sft import ensure_sft_checkpoint, sft_cache_key
from cappo_pl.srr_hooks import SRRHooks
from cappo_pl.step_metrics import step_metrics
from cappo_pl.strategies import (
    amp_scale,
    can_step_without_gradients,
    engine_grad_norm,
    is_fsdp2,
    is_fsdp2_unit,
    shard_model,
    shards_parameters,
)


class RLModule(SRRHooks, EvalHooks, RunState, pl.LightningModule):
    """RL fine-tuning of a causal LM with pluggable objectives.

    Args:
        policy: where the policy comes from (local HF folder or the built-in tiny model + SFT).
        objectives: the loss terms (default: one ``PolicyObjective`` with PPO-clip).
        combiner: how the objectives' gradients become one update (default: the weighted sum).
        gradients: the space in which gradients are compared (the Gram) and monitoring.
        advantage: the advantage estimator (default GRPO; ``GAE`` needs ``critic``).
        critic: the value model trained next to the policy (PPO with GAE); None: critic-free.
        rollout: sampling settings.
        ppo: epochs, mini-batches, clipping.
        optim: optimizer settings.
        val_samples: completions per held-out prompt in validation.
        dynamic_sampling: DAPO's dynamic sampling (off by default).
        overlong: DAPO's overlong reward shaping and filtering (off by default).
        srr: the Support Retention Ratio computed in validation (CaPPO).
        evaluation: support and diversity metrics in validation: sampled pass@k, exact metrics on
            enumerable tasks, hidden-target pass@k (``cappo_pl.evaluation``).
        monitor_kl: load the reference to log ``train/policy/kl_ref`` even when no objective needs it.
        seed: seed of sampling and mini-batch order (combined with the step index and rank).

    """

    @checked_init
    def __init__(
        self,
        policy: PolicyConfig | None = None,
        objectives: list[Objective] | None = None,
        combiner: Combiner | None = None,
        gradients: GradientConfig | None = None,
        advantage: AdvantageEstimator | None = None,
        critic: CriticConfig | None = None,
        rollout: RolloutConfig | None = None,
        ppo: PPOConfig | None = None,
        optim: OptimConfig | None = None,
        val_samples: PositiveInt = 4,
        dynamic_sampling: DynamicSamplingConfig | None = None,
        overlong: OverlongConfig | None = None,
        srr: SRRConfig | None = None,
        evaluation: EvalConfig | None = None,
        monitor_kl: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy_cfg = policy or PolicyConfig()
        self.objectives = objectives if objectives else [PolicyObjective()]
        self.combiner = combiner or Scalarized()
        self.gradients = gradients or GradientConfig()
        self.advantage = advantage or GRPO()
        self.critic_cfg = critic
        self.rollout_cfg = rollout or RolloutConfig()
        self.ppo = ppo or PPOConfig()
        self.optim = optim or OptimConfig()
        self.val_samples, self.seed = val_samples, seed
        self.dynamic_sampling = dynamic_sampling or DynamicSamplingConfig()
        self.overlong = overlong or OverlongConfig()
        self.srr_cfg = srr or SRRConfig()
        self.eval_cfg = evaluation or EvalConfig()
        check_config(
            self.objectives, self.advantage, critic, self.rollout_cfg, self.ppo, self.dynamic_sampling,
            self.overlong, self.srr_cfg, self.eval_cfg, val_samples,
        )  # fmt: skip
        self.srr, self._srr_taus = srr_metric(self.srr_cfg)  # quantile thresholds: resolved at fit start
        self._srr_resolved = False
        self._init_eval()
        self.references: ReferenceSet | None = None
        self.initial_srr: dict[str, float] = {}
        self.skipped_updates = 0
        self.needs_ref = monitor_kl or any(o.needs_ref for o in self.objectives)
        self.needs_topk = any(o.needs_topk for o in self.objectives)
        self.tokenizer = self._build_tokenizer()
        self.policy: torch.nn.Module | None = None
        self.critic: ValueModel | None = None
        self.reward_fn = None
        self._reference: list[torch.nn.Module] = []  # a list hides it from state_dict and DDP
        self._peft: list[Any] = []  # the peft wrapper of a LoRA policy (same hiding)
        self.last_samples: list[dict[str, Any]] = []

    # ----------------------------------------------------------------------------------- setup
    def _build_tokenizer(self):
        if self.policy_cfg.path is not None:
            return load_pretrained(self.policy_cfg.path, self.policy_cfg.dtype)[1]
        return build_char_tokenizer()

    def _records(self, dm=None) -> tuple[list[Record], list[Record]]:
        dm = dm if dm is not None else self.trainer.datamodule
        return dm.checked_records("train"), dm.checked_records("val")

    def sft_records(self, dm=None) -> list[Record]:
        """What SFT trains on: the task's ``sft_records()`` where it has them, else the training records."""
        dm = dm if dm is not None else self.trainer.datamodule
        task = getattr(dm, "task", None)
        return task.sft_records() if hasattr(task, "sft_records") else self._records(dm)[0]

    def prepare_sft(self, datamodule=None) -> None:
        """Train (or find cached) the SFT warm start of the built-in model on the data's references."""
        cfg = self.policy_cfg
        if cfg.path is None and cfg.sft is not None:
            dm = datamodule if datamodule is not None else self.trainer.datamodule
            train, val = self._records(dm)
            reward = dm.task.reward_fn()
            ensure_sft_checkpoint(cfg.tiny, cfg.sft, self.sft_records(dm), val, reward, log=print, eval_train=train)

    def prepare_data(self) -> None:
        self.prepare_sft()

    def setup(self, stage: str) -> None:
        if self.policy is not None:
            return
        cfg = self.policy_cfg
        if cfg.path is not None:
            self.policy = load_pretrained(cfg.path, cfg.dtype)[0]
        elif cfg.sft is not None:
            folder = f"{cfg.sft.cache_dir}/{sft_cache_key(cfg.tiny, cfg.sft, self.sft_records())}"
            self.policy, self.tokenizer = load_pretrained(folder, cfg.dtype)
        else:
            self.policy = build_tiny_model(cfg.tiny, self.tokenizer)
        check_head_matches_forward(self.policy, len(self.tokenizer))
        check_strategy(self.trainer.strategy, self.gradients, self.critic_cfg, self.dynamic_sampling, self.ppo)
        if self.critic_cfg is not None:  # from the policy before any adapter: a plain trunk copy
            self.critic = ValueModel.from_policy(self.policy)  # a submodule: checkpointed and DDP-wrapped
        if cfg.lora is not None:  # the reference is then the base with adapters off: no second copy
            self._peft = [add_lora(self.policy, cfg.lora)]
        if self.needs_ref and not self._peft:
            self._reference = [freeze(copy.deepcopy(self.policy))]
        self.reward_fn = self.trainer.datamodule.task.reward_fn()

    def configure_model(self) -> None:
        """Under FSDP (``cappo_pl.strategies.FSDP``): shard the policy and the critic; the reference stays whole."""
        if is_fsdp2(self.trainer.strategy) and not is_fsdp2_unit(self.policy):
            if self.device_mesh["tensor_parallel"].size() > 1:  # every rank must be a data-parallel rank
                raise ConfigError("trainer.strategy: tensor parallelism is not supported; use cappo_pl.strategies.FSDP")
            for model in [self.policy] + ([self.critic] if self.critic is not None else []):
                shard_model(model, self.device_mesh["data_parallel"])

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]  # LoRA: the adapters only

    def _reference_logp(self, ro: Rollout) -> Tensor:
        if self._peft:
            with self._peft[0].disable_adapter():
                return self._score(self.policy, ro).logp
        return self._score(self.reference, ro).logp

    @property
    def reference(self) -> torch.nn.Module | None:
        """The frozen reference policy (None when nothing needs it)."""
        return self._reference[0] if self._reference else None

    def on_train_start(self) -> None:
        if self.dynamic_sampling.enabled and not hasattr(self.trainer.train_dataloader, "extra_batch"):
            raise ConfigError(
                "model.dynamic_sampling: the DataModule's train stream has no extra_batch(index, k) to draw "
                "more prompts from (RLDataModule's PromptStream has one)"
            )

    def on_fit_start(self) -> None:
        if self.reference is not None:
            self.reference.to(self.device)
        self._ensure_references()  # before the first update: the SRR's SFT baseline is the initial policy
        self._ensure_eval_sets()  # and pi_SFT of every valid answer (enumerable tasks)

    def on_validation_start(self) -> None:
        self._ensure_references()
        self._ensure_eval_sets()

    def configure_optimizers(self):
        critic = None
        if self.critic is not None:  # one optimizer (DeepSpeed takes only one), the critic as its own group
            critic = (list(self.critic.parameters()), self.critic_cfg.lr)
        return build_optimizer(self.optim, self._trainable(), critic, self.trainer.strategy)

    # -------------------------------------------------------------------------------- helpers
    def worker(self) -> RolloutWorker:
        """The rollout worker over the current policy (tokenize -> sample -> decode -> reward)."""
        return RolloutWorker(
            self.policy, self.tokenizer, self.reward_fn, self.seed, self.global_rank, self.device,
            self.ppo.success_threshold, self.ppo.reward_on_error, self._all_ranks_done(),
        )  # fmt: skip

    def _all_ranks_done(self):
        """Under ZeRO-3/FSDP every forward gathers shards, so sampling stops only when all ranks are done."""
        if not shards_parameters(self.trainer.strategy):
            return None
        world = float(self.trainer.world_size)
        return lambda done: float(self._sum_over_ranks(torch.tensor(float(done), device=self.device))) == world

    def _score(self, model: torch.nn.Module, ro: Rollout, for_update: bool = False) -> Scores:
        space = self.gradients.space
        return score_completions(
            model, ro.input_ids, ro.attention_mask, ro.completion_ids.shape[1],
            self.rollout_cfg.temperature, self.ppo.score_chunk_tokens,
            gram_space=space if for_update and space != "params" else None,
            topk_ids=ro.topk_ids if for_update and self.needs_topk else None,
        )  # fmt: skip

    def _prepare_policy(self) -> None:
        # Dropout off (as verl): pi/pi_old must compare the same function. Lightning puts the module
        # back in train mode after every validation, so this is set per step.
        self.policy.eval()
        if self.policy_cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.policy)  # its decoder layers only, so dropout stays off

    # ---------------------------------------------------------------------------- the RL step
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._prepare_policy()
        cfg, worker, times = self.rollout_cfg, self.worker(), [time.perf_counter()]

        # 1-2. Rollouts (G per prompt, with the sampler's logprobs mu) and rewards; DAPO's overlong
        # shaping and dynamic sampling when configured (experience.py).
        exp = collect_experience(
            batch.records, lambda records, k: worker.generate(records, cfg, batch.index, k, batch.offset),
            lambda k: self.trainer.train_dataloader.extra_batch(batch.index, k).records,
            cfg.group_size, cfg.max_new_tokens, self.tokenizer.pad_token_id, self.dynamic_sampling, self.overlong,
        )  # fmt: skip
        times.append(time.perf_counter())

        # 3. Reference and pi_old (+ entropy) scores. With one update per step pi_old IS the update's own
        # forward (verl: old = logp.detach()): the grad forward is done here once and reused.
        with torch.no_grad():
            ref_logp = self._reference_logp(exp.rollout) if self.needs_ref else None
        on_policy = self.ppo.epochs == 1 and self.ppo.minibatches == 1
        first = self._score(self.policy, exp.rollout, for_update=True) if on_policy else None
        with torch.no_grad():
            old = self._score(self.policy, exp.rollout) if first is None else first.detached()

        # 4. Advantages per token (a sequence's own, broadcast, or GAE on the critic's values) and the
        # critic's targets; skipped samples carry none.
        old_values = self._values(exp.rollout) if self.critic is not None else None
        advantages, returns = self.advantage.token_advantages(
            exp.rewards, cfg.group_size, exp.valid, exp.mask, old_values, dp=self._dp()
        )
        step = StepData(exp, old, ref_logp, advantages, returns, old_values)
        times.append(time.perf_counter())

        # 5. PPO epochs x mini-batches: one optimizer step each.
        updates = [self._update(step, idx, first) for idx in self._minibatches(batch.index, exp.rewards.numel(), first)]
        times.append(time.perf_counter())

        # 6. Metrics, the sample table, and the stream position (for exact resume).
        self._end_step(batch, step, updates, tuple(times))

    def _minibatches(self, index: int, n: int, first: Scores | None) -> Iterator[Tensor]:
        """Row indices of each update: ``epochs`` x ``minibatches`` shuffled parts of the step's n rows."""
        gen = generator(self.seed, "minibatch_order", index, self.global_rank, device=self.device)
        for _ in range(self.ppo.epochs):
            # on-policy reuses ``first``, whose rows are in rollout order; otherwise shuffle
            perm = torch.arange(n, device=self.device)
            if first is None:
                perm = torch.randperm(n, generator=gen, device=self.device)
            # exactly ``minibatches`` non-empty parts, whatever row count dynamic sampling leaves (``chunk``
            # may give fewer): every rank takes the same number of optimizer steps
            yield from perm.tensor_split(self.ppo.minibatches)

    def _update(self, step: StepData, idx: Tensor, first: Scores | None) -> dict[str, Tensor]:
        """One optimizer step on rows ``idx``: forward, objectives, combined backward, clip, step; its metrics."""
        opt, sched, strategy = self.optimizers(), self.lr_schedulers(), self.trainer.strategy
        sub = step.exp.rollout.select(idx)
        cur = first if first is not None else self._score(self.policy, sub, for_update=True)
        batch = step.token_batch(idx, sub, cur, float(self.rollout_cfg.max_new_tokens), self._dp())
        losses, metrics = objective_losses(self.objectives, batch)
        opt.zero_grad(set_to_none=True)
        update = self._combined_backward(losses, cur)
        metrics.update(gram_metrics(update, [o.name for o in self.objectives]))
        metrics["loss/total"] = sum(float(c) * x.detach() for c, x in zip(update.coefficients, losses, strict=True))
        if update.skipped:  # non-finite loss/Gram: no gradient; the (no-op) step keeps counters aligned
            self.skipped_updates += 1
            if amp_scale(self.trainer) == 1.0:  # an fp16 GradScaler must see the overflow to lower its scale
                opt.zero_grad(set_to_none=True)
        metrics["grad_norm"] = grad_norm(self.policy.parameters())
        if self.ppo.clip_grad_norm is not None:  # only the policy's gradients exist at this point
            self.clip_gradients(opt, gradient_clip_val=self.ppo.clip_grad_norm, gradient_clip_algorithm="norm")
        if self.critic is not None:
            metrics.update(self._critic_backward(sub, step.old_values[idx], step.returns[idx], step.exp.mask[idx]))
        if not update.skipped or can_step_without_gradients(strategy):
            opt.step()
        engine_norm = engine_grad_norm(strategy)  # DeepSpeed's engine holds the gradients: its norm, pre-clip
        if engine_norm is not None:
            metrics["grad_norm"] = engine_norm
        sched.step()
        return metrics

    def _end_step(self, batch: PromptBatch, step: StepData, updates: list[dict[str, Tensor]], times) -> None:
        """Log the step, keep a few samples for the table, and mark the batch consumed (exact resume)."""
        if batch.index == 0:
            self._log_initial()
        self._log_step(batch, step, updates, times)
        exp, group = step.exp, self.rollout_cfg.group_size
        self.last_samples = [
            {"prompt": exp.records[i // group].prompt, "completion": exp.texts[i], "reward": float(exp.rewards[i])}
            for i in range(0, exp.rewards.numel(), max(1, group // 2))
        ][:8]
        stream = self.trainer.train_dataloader
        if hasattr(stream, "mark_consumed"):
            stream.mark_consumed(batch.index)

    def _values(self, ro: Rollout) -> Tensor:
        """The critic's values at step start (v_old), no gradient."""
        self.critic.eval()  # dropout off, as for the policy
        with torch.no_grad():
            return self.critic(ro.input_ids, ro.attention_mask, ro.completion_ids.shape[1])

    def _critic_backward(self, sub: Rollout, old_values: Tensor, returns: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """Clipped value loss on the mini-batch -> the critic's gradients, clipped apart from the policy's."""
        metrics = critic_backward(
            self.critic, self.critic_cfg, sub.input_ids, sub.attention_mask, old_values, returns, mask,
            backward=self.manual_backward, grad_scale=amp_scale(self.trainer), dp=self._dp(),
        )  # fmt: skip
        return {f"critic/{k}": v for k, v in metrics.items()}

    def _combined_backward(self, losses: list[Tensor], cur: Scores):
        """Gram in the configured space -> combiner -> ``.grad = sum_k c_k grad L_k`` (gradients.py)."""
        # float64 weights: c = weights must be exactly the configured numbers (0.04, not float32's 0.0399...)
        weights = torch.tensor([o.weight for o in self.objectives], dtype=torch.float64)
        return combined_backward(
            losses, weights, self.combiner, self.gradients.space,
            lambda loss, retain: self.manual_backward(loss, retain_graph=retain), self._trainable(), cur, self._dp(),
            monitor=self.gradients.monitor, grad_scale=amp_scale(self.trainer),
        )  # fmt: skip

    def _sum_over_ranks(self, t: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(t, reduce_op="sum")

    def _dp(self) -> GlobalBatch | None:
        """The data-parallel group losses and batch statistics are normalised over (None: one process)."""
        return GlobalBatch(self.trainer.world_size, self._sum_over_ranks) if self.trainer.world_size > 1 else None

    def _log_step(self, batch: PromptBatch, step: StepData, updates: list[dict[str, Tensor]], times) -> None:
        group, old = self.rollout_cfg.group_size, step.old
        logs = step_metrics(step.exp, old.logp, old.entropy, step.ref_logp, updates, times, group, self._dp())
        logs["train/lr"] = torch.tensor(self.optimizers().param_groups[0]["lr"])
        logs["train/rl_step"] = torch.tensor(float(batch.index))
        for obj in self.objectives:
            logs[f"train/objective/{obj.name}/weight"] = torch.tensor(obj.weight)
        logs["train/combiner/skipped_total"] = torch.tensor(float(self.skipped_updates))
        self.log_dict({k: v.float() for k, v in logs.items()}, on_step=True, on_epoch=False, batch_size=len(batch))

    # ----------------------------------------------------------------------------- validation
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        gen = self.worker().validate(batch.records, self.rollout_cfg.for_validation(self.val_samples), batch_idx)
        rewards, valid, size = gen.rewards, gen.valid, gen.rewards.numel()
        mean_reward = rewards[valid].mean() if valid.any() else torch.tensor(float("nan"), device=self.device)
        self.log("val/reward/mean", mean_reward, batch_size=size, sync_dist=True)
        self.log("val/accuracy", gen.correct.float().mean(), batch_size=size, sync_dist=True)
        length = gen.rollout.completion_mask.sum(-1).mean()
        self.log("val/response_length/mean", length, batch_size=size, sync_dist=True)
        if self.references is not None:
            self._srr_update(batch)
        self._eval_update(batch, gen)

    def on_validation_epoch_end(self) -> None:
        self._log_srr_epoch()
        self._log_eval_epoch()

    def _log_initial(self) -> None:
        """The initial policy's ``val/srr*``, ``val/exact/*`` and ``train_eval/exact/*`` at RL step 0."""
        values = {**self._initial_srr_values(), **self._initial_eval_values()}
        if values and self.trainer.is_global_zero:
            # straight to the loggers: ``self.log`` would repeat a once-logged value on every later step
            for logger in self.loggers:
                logger.log_metrics(values, step=0)  # RL step 0, the first batch
