"""FSDP for RL fine-tuning: FSDP2 (``fully_shard``) data parallelism through Lightning's ModelParallelStrategy.

Lightning's ``FSDPStrategy`` (FSDP1) wraps the whole LightningModule, which breaks ``manual_backward``
inside ``training_step`` (Lightning-AI/pytorch-lightning #19626) and refuses a CPU accelerator.
``ModelParallelStrategy`` leaves sharding to ``LightningModule.configure_model``; ``RLModule`` shards
its policy there with ``shard_model`` (each decoder layer, then the root). ``FSDP`` below is that
strategy with every rank a data-parallel rank (no tensor parallelism).
"""

from __future__ import annotations

from datetime import timedelta

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

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


def shards_parameters(strategy: object) -> bool:
    """Every forward gathers parameter shards collectively (ZeRO-3, FSDP): ranks must run equal forward counts."""
    from cappo_pl.gradients import zero_stage

    return zero_stage(strategy) == 3 or is_fsdp2(strategy)
