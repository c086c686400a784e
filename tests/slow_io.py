"""Test-only: a checkpoint IO that stalls half-way through one save, so a test can kill the process mid-write.

Selected with ``--trainer.plugins`` (``tests/`` on PYTHONPATH) in the run that is to be killed, and nowhere else.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import IO, Any

import torch

from cappo_pl.checkpointing import AtomicCheckpointIO


class StallingCheckpointIO(AtomicCheckpointIO):
    """Write half of the ``name`` save at ``global_step`` to its temporary file, create ``marker``, then sleep.

    Args:
        marker: the file created once half of the bytes are on disk.
        name: the checkpoint file name whose save stalls.
        global_step: the step whose save of ``name`` stalls.
        stall_s: how long it sleeps (the test kills the process before).

    """

    def __init__(self, marker: str, name: str = "last.ckpt", global_step: int = 2, stall_s: float = 600) -> None:
        super().__init__()
        self.marker, self.name, self.global_step, self.stall_s = marker, name, global_step, stall_s

    def write(self, checkpoint: dict[str, Any], f: IO[bytes]) -> None:
        stalls = Path(f.name).name.startswith(f"{self.name}.partial-") and checkpoint["global_step"] == self.global_step
        if not stalls:
            super().write(checkpoint, f)
            return
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        Path(self.marker).touch()
        time.sleep(self.stall_s)
        f.write(data[len(data) // 2 :])
