"""Test-only: Lightning's DeepSpeedStrategy with its CUDA-only checks lifted, so the real training step runs
through DeepSpeed engines on CPU (gloo). Everything else (engine init, ZeRO partitioning, backward through the
engine, the optimizer step, sharded checkpoints) is DeepSpeed's and Lightning's own code.
"""

from __future__ import annotations

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy


class DeepSpeedOnCPU(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` minus ``CUDAAccelerator`` and GPU-index checks (set ``DS_ACCELERATOR=cpu``)."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips only the "CUDA GPUs only" check

    def setup_distributed(self) -> None:
        reset_seed()  # as DeepSpeedStrategy does, minus the GPU device-index validation
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)  # DeepSpeed's engine reads a device index; CPU tensors ignore it
