"""Test-only objective: a zero loss that is NaN once, on one rank (to drive the skipped-update path)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from cappo_pl.objectives import Objective


class NaNOnce(Objective):
    """Loss ``0 * sum(logp)``, except NaN at call ``at_call`` (1-based) on global rank ``rank``."""

    def __init__(self, rank: int = 1, at_call: int = 2, weight: float = 1.0, name: str = "nan_once") -> None:
        super().__init__(name, weight)
        self.rank, self.at_call, self.calls = rank, at_call, 0

    def __call__(self, batch):
        self.calls += 1
        loss = (batch.logp * batch.mask).sum() * 0.0
        my_rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if self.calls == self.at_call and my_rank == self.rank:
            loss = loss + float("nan")
        return loss, {"calls": torch.tensor(float(self.calls))}
