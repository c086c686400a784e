"""Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences").

docs/reference/algorithms.md section 1.11 (verl ``AdaptiveKLController``):

    e = clip(KL / KL_target - 1, -0.2, 0.2);    beta <- beta * (1 + e * n_steps / horizon)

with ``n_steps`` the samples in the step. The measured KL is ``train/policy/kl_ref``: the k3
estimate of KL(pi_old || pi_ref) over the step's rollouts, before the update.
"""

from __future__ import annotations

from cappo_pl.callbacks.control import WeightController
from cappo_pl.constraints import PositiveFloat, PositiveInt, checked_init


def adaptive_kl_step(beta: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """One Ziegler update of the KL coefficient (verl ``AdaptiveKLController.update``)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)


class AdaptiveKLController(WeightController):
    """Steer the KL objective's weight so the KL to the reference tracks ``target``.

    Needs a ``KLPenalty`` objective (which loads the reference and logs ``train/policy/kl_ref``).

    Args:
        objective: name of the KL objective.
        init_coef: the first update's beta (verl 0.001).
        target: target KL (verl 0.1).
        horizon: samples over which a 20% error changes beta by 20% (verl 10000).
        gate: apply weight 0 while the KL is at or below the target: the KL term is then a budget
            (a one-sided constraint) that joins the update only when exceeded, the counterpart of
            ``EntropyController(gate=True)`` for non-conflicting combiners (docs/cappo.md).

    """

    metric_key = "train/policy/kl_ref"
    coef_key = "train/kl_coef"
    target_key = "train/kl_target"

    @checked_init
    def __init__(
        self,
        objective: str = "kl",
        init_coef: PositiveFloat = 0.001,
        target: PositiveFloat = 0.1,
        horizon: PositiveInt = 10000,
        gate: bool = False,
    ) -> None:
        super().__init__(objective)
        self.gate = gate
        self.coef, self.target, self.horizon = init_coef, target, horizon
        self._n_steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._n_steps = len(batch) * pl_module.rollout_cfg.group_size * trainer.world_size
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def decide(self, value: float) -> float:
        self.coef = adaptive_kl_step(self.coef, value, self.target, self._n_steps, self.horizon)
        return 0.0 if self.gate and value <= self.target else self.coef

    def initial_weight(self) -> float:
        return 0.0 if self.gate else self.coef  # the KL to the reference is 0 before the first update
