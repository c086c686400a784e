"""RLModule: the RL fine-tuning loop as one readable story.

One ``training_step`` is one RL step on a batch of prompts:
rollout -> rewards -> pi_old/ref scores -> advantages -> PPO epochs x mini-batches of
(forward, objectives, backward, clip, optimizer step). Math lives in pure functions elsewhere.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from cappo_pl.advantages import GRPO, AdvantageEstimator
from cappo_pl.combiners import Combiner, Scalarized
from cappo_pl.critic import CriticConfig, ValueModel, check_critic_strategy, critic_backward
from cappo_pl.data.records import PromptBatch, Record, reward_fields
from cappo_pl.errors import ConfigError
from cappo_pl.experience import DynamicSamplingConfig, Generation, OverlongConfig, collect_experience
from cappo_pl.gradients import (
    GradientConfig,
    check_space,
    combined_backward,
    deepspeed_gradient_clipping,
    grad_norm,
    gram_metrics,
    is_deepspeed,
    offloads_optimizer,
)
from cappo_pl.losses.aggregation import GlobalBatch
from cappo_pl.losses.base import TokenBatch
from cappo_pl.metrics import SupportRetentionRatio
from cappo_pl.models import (
    PolicyConfig,
    add_lora,
    build_char_tokenizer,
    build_tiny_model,
    enable_gradient_checkpointing,
    freeze,
    load_pretrained,
)
from cappo_pl.objectives import Objective, PolicyObjective
from cappo_pl.optim_config import OptimConfig, PPOConfig
from cappo_pl.references import ReferenceSet, SRRConfig
from cappo_pl.rewards.base import call_reward
from cappo_pl.rollout import Rollout, RolloutConfig, prompt_row_keys, row_uniforms, sample
from cappo_pl.scoring import Scores, check_head_matches_forward, is_fsdp2_unit, score_completions
from cappo_pl.sft import ensure_sft_checkpoint, sft_cache_key
from cappo_pl.srr_hooks import SRRHooks
from cappo_pl.step_metrics import step_metrics
from cappo_pl.strategies import is_fsdp2, shard_model, shards_parameters


class RLModule(SRRHooks, pl.LightningModule):
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
        monitor_kl: load the reference to log ``train/policy/kl_ref`` even when no objective needs it.
        seed: seed of sampling and mini-batch order (combined with the step index and rank).

    """

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
        val_samples: int = 4,
        dynamic_sampling: DynamicSamplingConfig | None = None,
        overlong: OverlongConfig | None = None,
        srr: SRRConfig | None = None,
        monitor_kl: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy_cfg = policy or PolicyConfig()
        self.objectives = objectives if objectives else [PolicyObjective()]
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"model.objectives: names must be unique, got {names}")
        self.combiner = combiner or Scalarized()
        self.gradients = gradients or GradientConfig()
        self.skipped_updates = 0
        self.advantage = advantage or GRPO()
        self.critic_cfg = critic
        if self.advantage.needs_values != (critic is not None):
            raise ConfigError(
                f"model.critic: {type(self.advantage).__name__} advantages "
                + ("need a critic: set model.critic" if self.advantage.needs_values else "do not use one: remove it")
            )
        self.critic: ValueModel | None = None
        self.rollout_cfg = rollout or RolloutConfig()
        self.ppo = ppo or PPOConfig()
        self.optim = optim or OptimConfig()
        self.val_samples, self.seed = val_samples, seed
        self.dynamic_sampling = dynamic_sampling or DynamicSamplingConfig()
        self.overlong = overlong or OverlongConfig()
        if self.dynamic_sampling.enabled and self.ppo.minibatches > self.rollout_cfg.group_size:
            # past the cap a step may keep one group (G rows); every rank must still take `minibatches` steps
            raise ConfigError(
                f"model.ppo.minibatches: with dynamic sampling it must be <= model.rollout.group_size "
                f"({self.rollout_cfg.group_size}), got {self.ppo.minibatches}"
            )
        if self.overlong.buffer_len < 0 or self.overlong.buffer_len > self.rollout_cfg.max_new_tokens:
            raise ConfigError(
                f"model.overlong.buffer_len: must be in [0, model.rollout.max_new_tokens="
                f"{self.rollout_cfg.max_new_tokens}], got {self.overlong.buffer_len}"
            )
        self.srr_cfg = srr or SRRConfig()
        try:
            self.srr = SupportRetentionRatio(self.srr_cfg.thresholds, self.srr_cfg.relative_threshold)
        except ValueError as err:
            raise ConfigError(f"model.srr: {err}") from None
        self.references: ReferenceSet | None = None
        self.initial_srr: dict[str, float] = {}
        if self.rollout_cfg.top_p < 1.0:
            rank_zero_warn(
                "model.rollout.top_p < 1: the recorded behaviour logprobs are those of the full tempered "
                "distribution, not of the nucleus the tokens were drawn from"
            )
        self.needs_ref = monitor_kl or any(o.needs_ref for o in self.objectives)
        self.needs_topk = any(o.needs_topk for o in self.objectives)
        if self.needs_topk and self.rollout_cfg.top_k_logprobs < 1:
            raise ConfigError(
                "model.rollout.top_k_logprobs: DPPO's Top-K divergence needs the sampler's top-K logprobs; "
                "set it > 0 (the paper: 20)"
            )
        self.tokenizer = self._build_tokenizer()
        self.policy: torch.nn.Module | None = None
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

    def prepare_sft(self, datamodule=None) -> None:
        """Train (or find cached) the SFT warm start of the built-in model on the data's references."""
        cfg = self.policy_cfg
        if cfg.path is None and cfg.sft is not None:
            dm = datamodule if datamodule is not None else self.trainer.datamodule
            train, val = self._records(dm)
            ensure_sft_checkpoint(cfg.tiny, cfg.sft, train, val, dm.task.reward_fn(), log=print)

    def prepare_data(self) -> None:
        self.prepare_sft()

    def setup(self, stage: str) -> None:
        if self.policy is not None:
            return
        cfg = self.policy_cfg
        if cfg.path is not None:
            self.policy = load_pretrained(cfg.path, cfg.dtype)[0]
        elif cfg.sft is not None:
            folder = f"{cfg.sft.cache_dir}/{sft_cache_key(cfg.tiny, cfg.sft, self._records()[0])}"
            self.policy, self.tokenizer = load_pretrained(folder, cfg.dtype)
        else:
            self.policy = build_tiny_model(cfg.tiny, self.tokenizer)
        check_head_matches_forward(self.policy, len(self.tokenizer))
        if self.critic_cfg is not None:  # from the policy before any adapter: a plain trunk copy
            check_critic_strategy(self.trainer.strategy)
            self.critic = ValueModel.from_policy(self.policy)  # a submodule: checkpointed and DDP-wrapped
        if cfg.lora is not None:  # the reference is then the base with adapters off: no second copy
            self._peft = [add_lora(self.policy, cfg.lora)]
        check_space(self.gradients.space, self.trainer.strategy)
        deepspeed_gradient_clipping(self.trainer.strategy, self.ppo.clip_grad_norm)
        if self.dynamic_sampling.enabled and shards_parameters(self.trainer.strategy):
            # ranks may draw different numbers of generation batches, i.e. of collective forwards
            raise ConfigError("model.dynamic_sampling: not supported under ZeRO-3 or FSDP yet")
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

    def on_validation_start(self) -> None:
        self._ensure_references()

    def configure_optimizers(self):
        o = self.optim
        groups = [{"params": self._trainable()}]
        if self.critic is not None:  # one optimizer (DeepSpeed takes only one), the critic as its own group
            lr = self.critic_cfg.lr if self.critic_cfg.lr is not None else o.lr
            groups.append({"params": list(self.critic.parameters()), "lr": lr})
        adamw = torch.optim.AdamW
        if offloads_optimizer(self.trainer.strategy):  # DeepSpeed refuses a torch optimizer for ZeRO-Offload
            from deepspeed.ops.adam import DeepSpeedCPUAdam as adamw  # noqa: N813 (AdamW semantics: adamw_mode)
        opt = adamw(groups, lr=o.lr, weight_decay=o.weight_decay, betas=(o.beta1, o.beta2))
        warm = max(1, o.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -------------------------------------------------------------------------------- helpers
    def _generator(self, index: int, salt: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(((self.seed * 1_000_003 + index) * 97 + self.global_rank) * 7 + salt)
        return gen

    def _rollout(
        self, records: list[Record], cfg: RolloutConfig, gen: torch.Generator, uniforms: Tensor | None = None
    ) -> tuple[Rollout, list[str]]:
        enc = self.tokenizer([r.prompt for r in records], padding=True, padding_side="left", return_tensors="pt")
        ro = sample(
            self.policy, enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device),
            cfg, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, gen, self._all_ranks_done(), uniforms,
        )  # fmt: skip
        return ro, self.tokenizer.batch_decode(ro.completion_ids, skip_special_tokens=True)

    def _all_ranks_done(self):
        """Under ZeRO-3/FSDP every forward gathers shards, so sampling stops only when all ranks are done."""
        if not shards_parameters(self.trainer.strategy):
            return None
        world = float(self.trainer.world_size)
        return lambda done: float(self._sum_over_ranks(torch.tensor(float(done), device=self.device))) == world

    def _generate(self, records: list[Record], index: int, k: int, offset: int) -> Generation:
        """Generation batch ``k`` of RL step ``index`` (prompts from ``offset`` of the global batch)."""
        cfg, uniforms = self.rollout_cfg, None
        if cfg.seed_per_prompt:  # each row its own stream, keyed by its place in the global batch
            keys = prompt_row_keys(self.seed, index, k, offset, len(records), cfg.group_size)
            uniforms = row_uniforms(keys, cfg.max_new_tokens, self.device)
        # extra batches get their own index space (salts >= 7 would alias the next rank's seeds)
        ro, texts = self._rollout(records, cfg, self._generator(index + k * 2**32, 0), uniforms)
        rewards, valid = self._rewards(records, texts, self.rollout_cfg.group_size)
        correct = (rewards >= self.ppo.success_threshold) & valid
        return Generation(records, ro, texts, rewards, valid, correct)

    def _rewards(self, records: list[Record], texts: list[str], group: int) -> tuple[Tensor, Tensor]:
        prompts = [r.prompt for r in records for _ in range(group)]
        fields = reward_fields(records, group)
        rewards, valid = call_reward(self.reward_fn, prompts, texts, fields, self.ppo.reward_on_error)
        return rewards.to(self.device), valid.to(self.device)

    def _score(self, model: torch.nn.Module, ro: Rollout, for_update: bool = False) -> Scores:
        space = self.gradients.space
        return score_completions(
            model, ro.input_ids, ro.attention_mask, ro.completion_ids.shape[1],
            self.rollout_cfg.temperature, self.ppo.score_chunk_tokens,
            gram_space=space if for_update and space != "params" else None,
            topk_ids=ro.topk_ids if for_update and self.needs_topk else None,
        )  # fmt: skip

    # ---------------------------------------------------------------------------- the RL step
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        opt, sched = self.optimizers(), self.lr_schedulers()
        # Dropout off (as verl): pi/pi_old must compare the same function. Lightning puts the module
        # back in train mode after every validation, so this is set per step.
        self.policy.eval()
        if self.policy_cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.policy)  # its decoder layers only, so dropout stays off
        cfg, group = self.rollout_cfg, self.rollout_cfg.group_size
        t0 = time.perf_counter()

        # 1-2. Rollouts (G per prompt, with the sampler's logprobs mu) and rewards; DAPO's overlong
        # shaping and dynamic sampling when configured (experience.py).
        exp = collect_experience(
            batch.records, lambda records, k: self._generate(records, batch.index, k, batch.offset),
            lambda k: self.trainer.train_dataloader.extra_batch(batch.index, k).records,
            group, cfg.max_new_tokens, self.tokenizer.pad_token_id, self.dynamic_sampling, self.overlong,
        )  # fmt: skip
        ro, rewards, valid, correct, mask = exp.rollout, exp.rewards, exp.valid, exp.correct, exp.mask
        t1 = time.perf_counter()

        # 3. pi_old (+ entropy) and reference scores.
        with torch.no_grad():
            ref_logp = self._reference_logp(ro) if self.needs_ref else None
        # With one update per step pi_old IS the update's own forward (verl: old = logp.detach()), so the
        # grad forward is done here once and reused, instead of a second, no-grad pass.
        on_policy = self.ppo.epochs == 1 and self.ppo.minibatches == 1
        if on_policy:
            first = self._score(self.policy, ro, for_update=True)
            old = Scores(first.logp.detach(), first.entropy.detach())
        else:
            with torch.no_grad():
                old = self._score(self.policy, ro)

        # 4. Advantages per token (a sequence's own, broadcast, or GAE on the critic's values) and the
        # critic's targets; skipped samples carry none.
        old_values = self._values(ro) if self.critic is not None else None
        advantages, returns = self.advantage.token_advantages(rewards, group, valid, mask, old_values, dp=self._dp())
        t2 = time.perf_counter()

        # 5. PPO epochs x mini-batches: one optimizer step each.
        n = rewards.numel()
        update_metrics: list[dict[str, Tensor]] = []
        gen = self._generator(batch.index, 1)
        for _ in range(self.ppo.epochs):
            # On-policy reuses ``first``, whose rows are in rollout order; otherwise shuffle.
            perm = torch.arange(n, device=self.device)
            if not on_policy:
                perm = torch.randperm(n, generator=gen, device=self.device)
            # exactly ``minibatches`` non-empty parts, whatever row count dynamic sampling leaves (``chunk``
            # may give fewer): every rank takes the same number of optimizer steps
            for idx in perm.tensor_split(self.ppo.minibatches):
                sub = ro.select(idx)
                cur = first if on_policy else self._score(self.policy, sub, for_update=True)
                tb = TokenBatch(
                    logp=cur.logp, old_logp=old.logp[idx], rollout_logp=sub.rollout_logp, advantages=advantages[idx],
                    mask=mask[idx], entropy=cur.entropy, old_entropy=old.entropy[idx],
                    ref_logp=None if ref_logp is None else ref_logp[idx], rewards=rewards[idx], correct=correct[idx],
                    loss_scale_factor=float(cfg.max_new_tokens),
                    topk_logp=cur.topk_logp, rollout_topk_logp=sub.topk_logp, dp=self._dp(),
                )  # fmt: skip
                losses, metrics = self._objective_losses(tb)
                opt.zero_grad(set_to_none=True)
                update = self._combined_backward(losses, cur)
                metrics.update(gram_metrics(update, [o.name for o in self.objectives]))
                metrics["loss/total"] = sum(
                    float(c) * loss.detach() for c, loss in zip(update.coefficients, losses, strict=True)
                )
                if update.skipped:  # non-finite loss/Gram: no gradient; the (no-op) step keeps counters aligned
                    self.skipped_updates += 1
                    if self._amp_scale() == 1.0:  # an fp16 GradScaler must see the overflow to lower its scale
                        opt.zero_grad(set_to_none=True)
                metrics["grad_norm"] = grad_norm(self.policy.parameters())
                if self.ppo.clip_grad_norm is not None:  # only the policy's gradients exist at this point
                    self.clip_gradients(opt, gradient_clip_val=self.ppo.clip_grad_norm, gradient_clip_algorithm="norm")
                if self.critic is not None:
                    metrics.update(self._critic_backward(sub, old_values[idx], returns[idx], mask[idx]))
                if not (update.skipped and is_deepspeed(self.trainer.strategy)):  # the engine cannot step gradless
                    opt.step()
                if is_deepspeed(self.trainer.strategy):  # the engine holds the gradients: its norm, pre-clip
                    metrics["grad_norm"] = torch.tensor(float(self.trainer.strategy.model.get_global_grad_norm() or 0))
                sched.step()
                update_metrics.append(metrics)
        t3 = time.perf_counter()

        # 6. Metrics, the sample table, and the stream position (for exact resume).
        if batch.index == 0:
            self._log_initial_srr()
        self._log_step(batch, exp, old, ref_logp, update_metrics, (t0, t1, t2, t3))
        self.last_samples = [
            {"prompt": exp.records[i // group].prompt, "completion": exp.texts[i], "reward": float(rewards[i])}
            for i in range(0, n, max(1, group // 2))
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
            backward=self.manual_backward, grad_scale=self._amp_scale(),
            dp=self._dp(),
        )  # fmt: skip
        return {f"critic/{k}": v for k, v in metrics.items()}

    def _objective_losses(self, tb: TokenBatch) -> tuple[list[Tensor], dict[str, Tensor]]:
        """The objectives' raw losses (in config order) and their namespaced metrics."""
        losses: list[Tensor] = []
        metrics: dict[str, Tensor] = {}
        for obj in self.objectives:
            loss, m = obj(tb)
            losses.append(loss)
            metrics[f"objective/{obj.name}/loss"] = loss.detach()
            prefix = "policy/" if isinstance(obj, PolicyObjective) else f"objective/{obj.name}/"
            metrics.update({prefix + k: v for k, v in m.items()})
        return losses, metrics

    def _combined_backward(self, losses: list[Tensor], cur: Scores):
        """Gram in the configured space -> combiner -> ``.grad = sum_k c_k grad L_k`` (gradients.py)."""
        # float64 weights: c = weights must be exactly the configured numbers (0.04, not float32's 0.0399...)
        weights = torch.tensor([o.weight for o in self.objectives], dtype=torch.float64)
        return combined_backward(
            losses, weights, self.combiner, self.gradients.space,
            lambda loss, retain: self.manual_backward(loss, retain_graph=retain), self._trainable(),
            hidden=cur.hidden, logp=cur.logp, entropy=cur.entropy, gram_stats=cur.gram_stats,
            all_reduce=self._sum_over_ranks,
            world_size=self.trainer.world_size, monitor=self.gradients.monitor, grad_scale=self._amp_scale(),
        )  # fmt: skip

    def _sum_over_ranks(self, t: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(t, reduce_op="sum")

    def _dp(self) -> GlobalBatch | None:
        """The data-parallel group losses and batch statistics are normalised over (None: one process)."""
        return GlobalBatch(self.trainer.world_size, self._sum_over_ranks) if self.trainer.world_size > 1 else None

    def _amp_scale(self) -> float:
        """Current fp16 GradScaler scale (1.0 without one: fp32, bf16)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def _log_step(self, batch, exp, old, ref_logp, update_metrics, times) -> None:
        group = self.rollout_cfg.group_size
        logs = step_metrics(exp, old.logp, old.entropy, ref_logp, update_metrics, times, group, self._dp())
        logs["train/lr"] = torch.tensor(self.optimizers().param_groups[0]["lr"])
        logs["train/rl_step"] = torch.tensor(float(batch.index))
        for obj in self.objectives:
            logs[f"train/objective/{obj.name}/weight"] = torch.tensor(obj.weight)
        logs["train/combiner/skipped_total"] = torch.tensor(float(self.skipped_updates))
        self.log_dict({k: v.float() for k, v in logs.items()}, on_step=True, on_epoch=False, batch_size=len(batch))

    # ----------------------------------------------------------------------------- validation
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        cfg = self.rollout_cfg.for_validation(self.val_samples)
        ro, texts = self._rollout(batch.records, cfg, self._generator(batch_idx, 2))
        rewards, valid = self._rewards(batch.records, texts, self.val_samples)
        correct = (rewards >= self.ppo.success_threshold) & valid
        size = rewards.numel()
        mean_reward = rewards[valid].mean() if valid.any() else torch.tensor(float("nan"), device=self.device)
        self.log("val/reward/mean", mean_reward, batch_size=size, sync_dist=True)
        self.log("val/accuracy", correct.float().mean(), batch_size=size, sync_dist=True)
        self.log("val/response_length/mean", ro.completion_mask.sum(-1).mean(), batch_size=size, sync_dist=True)
        if self.references is not None:
            self._srr_update(batch)

    # ---------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["cappo_objective_weights"] = {o.name: o.weight for o in self.objectives}
        checkpoint["cappo_combiner"] = {"state": self.combiner.state_dict(), "skipped": self.skipped_updates}
        if self.references is not None:
            checkpoint["cappo_srr_references"] = self.references.state_dict()
        if self.policy_cfg.lora is not None:  # what `to-hf` needs to merge the adapters
            checkpoint["cappo_lora"] = {"r": self.policy_cfg.lora.r, "alpha": self.policy_cfg.lora.alpha}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.policy is None:
            self.setup("fit")
        for obj in self.objectives:
            obj.weight = checkpoint.get("cappo_objective_weights", {}).get(obj.name, obj.weight)
        combiner_state = checkpoint.get("cappo_combiner", {})
        self.combiner.load_state_dict(combiner_state.get("state", {}))
        self.skipped_updates = combiner_state.get("skipped", 0)
        if "cappo_srr_references" in checkpoint:  # the initial policy's scores cannot be recomputed later
            self.references = ReferenceSet.from_state(checkpoint["cappo_srr_references"])
