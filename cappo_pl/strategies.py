"""Strategy knowledge in one room: what DeepSpeed, FSDP and AMP change about a step, and FSDP2 itself.

Every question the rest of the code asks about the strategy is a named function here (``is_deepspeed``,
``shards_parameters``, ``can_step_without_gradients``, ...), so no other module inspects strategy
classes or DeepSpeed configs.

FSDP: Lightning's ``FSDPStrategy`` (FSDP1) wraps the whole LightningModule, which breaks ``manual_backward``
inside ``training_step`` (Lightning-AI/pytorch-lightning #19626) and refuses a CPU accelerator.
``ModelParallelStrategy`` leaves sharding to ``LightningModule.configure_model``; ``RLModule`` shards
its policy there with ``shard_model`` (each decoder layer, then the root). ``FSDP`` below is that
strategy with every rank a data-parallel rank (no tensor parallelism).
"""

from __future__ import annotations

from datetime import timedelta

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor

from cappo_pl.errors import ConfigError


class FSDP(ModelParallelStrategy):
    """FSDP2 data parallelism over all ranks (``ModelParallelStrategy`` with tensor_parallel_size 1).

    Args:
        save_distributed_checkpoint: True: each rank writes its shard (a checkpoint folder; convert
            with ``cli.py to-hf``); False: rank 0 gathers one full ``.ckpt`` file.
        process_group_backend: None: NCCL on GPUs, gloo on CPU.
        timeout: collective timeout.

    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = None,
    ) -> None:
        kwargs = {} if timeout is None else {"timeout": timeout}
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend, **kwargs,
        )  # fmt: skip

    def setup_environment(self) -> None:
        # "auto" would give one data-parallel rank per node (and tensor parallelism within it)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def is_fsdp2(strategy: object) -> bool:
    """A strategy that shards parameters with FSDP2 in ``configure_model`` (ModelParallelStrategy or subclass)."""
    return isinstance(strategy, ModelParallelStrategy)


def shard_model(model: torch.nn.Module, mesh) -> None:
    """``fully_shard`` each decoder layer, then the whole model (embeddings, final norm, head: the root unit).

    Tied input/output embeddings stay in the one root unit. Callers that run parts of the model
    directly (the chunked LM head) must go through the root's forward (``scoring.call_as_forward``)
    so its parameters are gathered and its gradients reduce-scattered. The layers are transformers'
    ``GradientCheckpointingLayer`` modules, else the classes the model names in ``_no_split_modules``.

    Raises:
        ConfigError: no decoder layer found (one root unit would gather the whole model per forward).

    """
    from torch.distributed.fsdp import fully_shard
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        names = set(getattr(model, "_no_split_modules", None) or [])
        layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"trainer.strategy: FSDP found no decoder layers to shard in {type(model).__name__}")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


# --------------------------------------------------------------------------------- predicates
def is_deepspeed(strategy: object) -> bool:
    """A Lightning DeepSpeed strategy (or a subclass)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(strategy, DeepSpeedStrategy)


def is_fsdp(strategy: object) -> bool:
    """A Lightning FSDP strategy: FSDPStrategy, or ModelParallelStrategy (FSDP2; ``FSDP`` above)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy) or is_fsdp2(strategy)


def is_fsdp2_unit(model: torch.nn.Module) -> bool:
    """``model`` is an FSDP2 unit (``fully_shard`` applied to it)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def zero_stage(strategy: object) -> int:
    """DeepSpeed ZeRO stage of a Lightning strategy (0 for anything that is not DeepSpeed)."""
    if not is_deepspeed(strategy):
        return 0
    config = getattr(strategy, "config", None) or {}
    return int(config.get("zero_optimization", {}).get("stage", 0))


def shards_parameters(strategy: object) -> bool:
    """Every forward gathers parameter shards collectively (ZeRO-3, FSDP): ranks must run equal forward counts."""
    return zero_stage(strategy) == 3 or is_fsdp2(strategy)


def offloads_optimizer(strategy: object) -> bool:
    """DeepSpeed ZeRO-Offload: the optimizer states and step live on the CPU (or NVMe)."""
    if not is_deepspeed(strategy):
        return False
    config = getattr(strategy, "config", None) or {}
    device = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def can_step_without_gradients(strategy: object) -> bool:
    """The optimizer may step on a skipped update (no gradients); DeepSpeed's engine cannot."""
    return not is_deepspeed(strategy)


def engine_grad_norm(strategy: object) -> Tensor | None:
    """DeepSpeed's pre-clip global gradient norm of the last step (the engine owns the gradients); else None."""
    if not is_deepspeed(strategy):
        return None
    return torch.tensor(float(strategy.model.get_global_grad_norm() or 0))


def amp_scale(trainer: object) -> float:
    """The fp16 GradScaler's current scale (1.0 without one: fp32, bf16)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


# ----------------------------------------------------------------------------- refusals, setup
def check_gram_space(space: str, strategy: object) -> None:
    """Refuse ``params`` where ``.grad`` is not the plain, complete gradient the optimizer steps on.

    DeepSpeed (ZeRO-2/3 cannot even run several backward passes per step; at every stage the engine
    keeps its own gradient buffers) and FSDP (sharded gradients: per-rank Grams would differ).
    """
    name = type(strategy).__name__
    if space == "params" and (is_deepspeed(strategy) or is_fsdp(strategy)):
        stage = f" ZeRO-{zero_stage(strategy)}" if is_deepspeed(strategy) else ""
        raise ConfigError(
            f"model.gradients.space: 'params' needs K separate backward passes and plain per-parameter "
            f".grad, which {name}{stage} does not provide; use 'hidden' or 'logits'"
        )


def check_critic(strategy: object) -> None:
    """Refuse strategies the critic's second backward per step does not work with (ConfigError)."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    name = type(strategy).__name__
    # DeepSpeed: one engine owns every gradient and clips them all together; FSDP1 wraps the whole module.
    # FSDP2 (``FSDP`` above) shards the critic as its own unit and clips its DTensor gradients.
    if is_deepspeed(strategy) or isinstance(strategy, FSDPStrategy):
        raise ConfigError(f"model.critic: not supported under {name} yet (use DDP or cappo_pl.strategies.FSDP)")
    if isinstance(strategy, DDPStrategy) and not getattr(strategy, "_ddp_kwargs", {}).get(
        "find_unused_parameters", False
    ):
        # the policy's and the critic's backward passes each use only their own parameters
        raise ConfigError("model.critic: under DDP set trainer.strategy=ddp_find_unused_parameters_true")


def check_dynamic_sampling(enabled: bool, strategy: object) -> None:
    """Refuse dynamic sampling where ranks must run equal forward counts (ZeRO-3, FSDP)."""
    if enabled and shards_parameters(strategy):
        # ranks may draw different numbers of generation batches, i.e. of collective forwards
        raise ConfigError("model.dynamic_sampling: not supported under ZeRO-3 or FSDP yet")


def deepspeed_gradient_clipping(strategy: object, clip: float | None) -> None:
    """Put ``model.ppo.clip_grad_norm`` into the DeepSpeed config, where the engine applies it in ``step``.

    Under DeepSpeed, Lightning's ``clip_gradients`` does nothing (the engine owns the gradients).

    Raises:
        ConfigError: the strategy's own config sets a different ``gradient_clipping``.

    """
    if not is_deepspeed(strategy):
        return
    config = strategy.config
    want = float(clip or 0.0)
    have = config.get("gradient_clipping")
    if have not in (None, "auto") and float(have) != want:
        raise ConfigError(
            f"trainer.strategy: the DeepSpeed config sets gradient_clipping={have} but model.ppo.clip_grad_norm "
            f"is {clip}; make them equal (or drop gradient_clipping from the DeepSpeed config)"
        )
    config["gradient_clipping"] = want
