"""The shared machinery of callbacks that steer an objective's weight from the step's metrics.

After every RL step the controller reads one logged metric (averaged over ranks, so every rank
takes the same decision), updates its state with a pure rule, and sets the weight the next step's
update uses. The state goes into the checkpoint, so a resumed run continues with the same weight.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch

from cappo_pl.errors import ConfigError


class WeightController(pl.Callback):
    """Base class: steer ``objectives[<objective>].weight`` from the metric ``metric_key``.

    Subclasses implement :meth:`decide` (state in, new weight out) and name their logged keys.

    Args:
        objective: the ``name`` of the objective whose weight is steered.

    """

    metric_key: str = ""
    coef_key: str = ""
    target_key: str = ""
    state_fields: tuple[str, ...] = ("coef", "target", "steps", "last_measure")
    """What the checkpoint keeps: the controller's state, not its configuration (a resumed run may
    change gains or bounds; the state carries on)."""

    def __init__(self, objective: str) -> None:
        self.objective = objective
        self.target: float | None = None
        self.coef: float = 0.0
        self.steps = 0
        self.last_measure: float | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(objective=self.objective)

    def _objective(self, pl_module):
        for obj in pl_module.objectives:
            if obj.name == self.objective:
                return obj
        names = [o.name for o in pl_module.objectives]
        raise ConfigError(
            f"trainer.callbacks: {type(self).__name__}(objective={self.objective!r}) matches no objective; "
            f"model.objectives are named {names}"
        )

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._objective(pl_module)  # fail at startup, not after the first step

    def on_train_start(self, trainer, pl_module) -> None:
        if self.steps == 0:  # a fresh run: the controller owns the weight from the first update on
            self._objective(pl_module).weight = self.initial_weight()

    def initial_weight(self) -> float:
        """The weight of the first update."""
        return self.coef

    def measure(self, trainer, pl_module) -> float | None:
        """The step's metric, averaged over ranks (None when not logged)."""
        value = trainer.callback_metrics.get(self.metric_key)
        if value is None:
            return None
        value = torch.as_tensor(value, dtype=torch.float32, device=pl_module.device)
        value = trainer.strategy.reduce(value, reduce_op="mean")
        return float(value)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        obj = self._objective(pl_module)
        applied = obj.weight
        value = self.measure(trainer, pl_module)
        if value is None or not math.isfinite(value):
            return
        obj.weight = float(self.decide(value))
        self.last_measure = value
        self.steps += 1
        logs = {self.coef_key: applied}
        if self.target is not None:
            logs[self.target_key] = self.target
        pl_module.log_dict({k: torch.tensor(float(v)) for k, v in logs.items()}, on_step=True, on_epoch=False)

    def decide(self, value: float) -> float:
        """Update the state with the step's measurement; return the next update's weight."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.state_fields}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in self.state_fields:
            if key in state_dict:
                setattr(self, key, state_dict[key])
