"""Entropy controllers: steer the entropy objective's weight so per-token entropy tracks a target.

``EntropyController`` is CaPPO's adaptive controller (docs/reference/algorithms.md section 5,
a reconstruction): proportional-integral in log space (SAC-style temperature tuning), with a
clamped coefficient range, anti-windup and an optional warm-up. ``StepEntropyController`` is the
Skywork-OR1 rule that TRL adopted (docs/reference/algorithms.md section 1.11). Both work with every combiner: they
only set ``objectives[<name>].weight``.

The measured entropy is ``train/policy/entropy``: the token-mean entropy (temperature-scaled) of
the step's rollouts under pi_old, i.e. the policy before the step's update. Step 0's value is the
initial policy's entropy, measured before the first update: relative targets are set from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cappo_pl.callbacks.control import WeightController
from cappo_pl.constraints import NonNegativeFloat, NonNegativeInt, PositiveFloat, checked_init
from cappo_pl.errors import ConfigError


@dataclass(frozen=True)
class PIState:
    """State of the log-space PI controller."""

    log_coef: float
    integral: float


def pi_log_step(
    state: PIState, error: float, log_coef0: float, kp: float, ki: float, log_min: float, log_max: float
) -> PIState:
    """One step of the PI controller on ``log(coef)`` with conditional-integration anti-windup.

    ``u = log_coef0 + kp * e + I``, ``I <- I + ki * e``; when ``u`` leaves the clamp in the direction
    ``e`` pushes, the integral only moves as far as the clamp (back-calculation), so it never winds up
    while the output is held, and the controller leaves saturation as soon as the error turns. The
    output is ``clamp(u, log_min, log_max)``. With ``kp = 0`` this is the reference's
    ``log lambda <- log lambda + eta (H* - H)`` with ``eta = ki`` (inside the clamp).

    Args:
        state: previous state.
        error: the step's error ``e`` (positive: raise the coefficient).
        log_coef0: the output at zero error and zero integral.
        kp: proportional gain.
        ki: integral gain per step.
        log_min: lower clamp of ``log(coef)``.
        log_max: upper clamp of ``log(coef)``.

    Returns:
        The new state (``log_coef`` clamped).

    """
    integral = state.integral + ki * error
    u = log_coef0 + kp * error + integral
    if (u > log_max and error > 0) or (u < log_min and error < 0):
        # anti-windup (back-calculation): stop the integral where the output meets the clamp
        bound = log_max if u > log_max else log_min
        lo, hi = sorted((state.integral, integral))
        integral = min(max(bound - log_coef0 - kp * error, lo), hi)
        u = log_coef0 + kp * error + integral
    return PIState(min(max(u, log_min), log_max), integral)


def skywork_step(coef: float, entropy: float, target: float, delta: float, lo: float, hi: float) -> tuple[float, float]:
    """Skywork-OR1 adaptive entropy (TRL ``use_adaptive_entropy``).

    ``c <- min(c + delta, hi)`` if ``H <= H_tgt`` else ``max(c - delta, lo)``; the applied
    coefficient is ``c`` if ``H <= H_tgt`` else 0 (the gate uses the entropy just measured).

    Returns:
        ``(c, applied)``.

    """
    if entropy <= target:
        coef = min(coef + delta, hi)
        return coef, coef
    return max(coef - delta, lo), 0.0


class _EntropyTarget(WeightController):
    metric_key = "train/policy/entropy"
    coef_key = "train/entropy_coef"
    target_key = "train/entropy_target"

    def __init__(self, objective: str, target: float | None, target_ratio: float | None) -> None:
        super().__init__(objective)
        if target is not None and target_ratio is not None:  # each one's range is in its annotation
            raise ConfigError(
                f"trainer.callbacks: {type(self).__name__}.target / target_ratio: give exactly one of `target` (nats) "
                f"or `target_ratio`, got target={target}, target_ratio={target_ratio}"
            )
        self.target_abs, self.target_ratio = target, target_ratio
        self.target = target
        self.initial_entropy: float | None = None

    def _set_target(self, entropy: float) -> None:
        if self.initial_entropy is None:  # step 0: the policy before the first update
            self.initial_entropy = entropy
            self.target = self.target_abs if self.target_abs is not None else self.target_ratio * entropy


class EntropyController(_EntropyTarget):
    """CaPPO's adaptive entropy controller: PI on ``log(coef)`` steering entropy to a target.

    Error ``e = (H* - H) / H*`` (relative, so the gains carry over between tasks whose entropies
    differ by orders of magnitude). ``log coef = log coef0 + kp e + I``, ``I += ki e`` (see
    :func:`pi_log_step`), clamped to ``[coef_min, coef_max]``.

    ``gate`` (Skywork-OR1's gate, and the design answer to MGDA's stall/runaway, docs/cappo.md):
    the applied weight is 0 while ``H >= H*``. Entropy is then a one-sided constraint that joins
    the update only when violated. A non-conflicting combiner (MGDA, UPGrad, ...) that always
    includes the entropy objective never lets entropy decrease to first order, so with it
    entropy can only ratchet up; and MGDA leans the hardest on the objective with the smallest
    weighted gradient, so lowering the coefficient would raise entropy's share of the direction.

    Args:
        objective: name of the entropy objective (``EntropyBonus(name=...)``).
        target: target per-token entropy in nats (absolute), or
        target_ratio: target as a fraction of the initial policy's entropy (step 0, before any update);
            neither: ratio 1.0, the reconstruction's default (hold the SFT policy's entropy).
        initial_coef: coefficient at zero error and zero integral (``coef0``).
        coef_min: lower clamp (> 0: the controller works on ``log(coef)``).
        coef_max: upper clamp.
        kp: proportional gain on the relative error.
        ki: integral gain per RL step on the relative error.
        warmup_steps: RL steps that keep ``initial_coef`` (the integral starts after them).
        gate: apply weight 0 while the entropy is at or above the target.

    """

    state_fields = ("coef", "target", "steps", "last_measure", "integral", "initial_entropy")

    @checked_init
    def __init__(
        self,
        objective: str = "entropy",
        target: PositiveFloat | None = None,
        target_ratio: PositiveFloat | None = None,
        initial_coef: PositiveFloat = 0.01,
        coef_min: PositiveFloat = 1e-4,
        coef_max: PositiveFloat = 0.1,
        kp: NonNegativeFloat = 1.0,
        ki: NonNegativeFloat = 0.2,
        warmup_steps: NonNegativeInt = 0,
        gate: bool = False,
    ) -> None:
        if target is None and target_ratio is None:
            target_ratio = 1.0  # the reconstruction's default: hold the SFT policy's entropy
        super().__init__(objective, target, target_ratio)
        if not coef_min <= initial_coef <= coef_max:
            got = f"{coef_min}, {initial_coef}, {coef_max}"
            raise ConfigError(
                f"trainer.callbacks: EntropyController.coef_min / initial_coef / coef_max: "
                f"need coef_min <= initial_coef <= coef_max, got {got}"
            )
        self.initial_coef, self.coef_min, self.coef_max = initial_coef, coef_min, coef_max
        self.kp, self.ki, self.warmup_steps, self.gate = kp, ki, warmup_steps, gate
        self.coef = initial_coef
        self.integral = 0.0

    def initial_weight(self) -> float:
        # gated: the constraint is inactive until entropy falls below the target
        return 0.0 if self.gate else self.coef

    def decide(self, value: float) -> float:
        self._set_target(value)
        error = (self.target - value) / self.target
        if self.steps + 1 > self.warmup_steps:
            state = pi_log_step(
                PIState(math.log(self.coef), self.integral), error, math.log(self.initial_coef),
                self.kp, self.ki, math.log(self.coef_min), math.log(self.coef_max),
            )  # fmt: skip
            self.coef, self.integral = math.exp(state.log_coef), state.integral
        return 0.0 if self.gate and value >= self.target else self.coef


class StepEntropyController(_EntropyTarget):
    """Skywork-OR1 / TRL adaptive entropy: fixed steps of ``delta`` towards the target, gated.

    Args:
        objective: name of the entropy objective.
        target: target entropy in nats, or
        target_ratio: target as a fraction of the initial entropy; neither: 0.2 nats (TRL's default).
        delta: step of the coefficient per RL step (TRL 0.005).
        coef_min: lower bound (TRL 0).
        coef_max: upper bound (TRL 1).
        initial_coef: starting coefficient.

    """

    state_fields = ("coef", "target", "steps", "last_measure", "initial_entropy")

    @checked_init
    def __init__(
        self,
        objective: str = "entropy",
        target: PositiveFloat | None = None,
        target_ratio: PositiveFloat | None = None,
        delta: PositiveFloat = 0.005,
        coef_min: NonNegativeFloat = 0.0,
        coef_max: NonNegativeFloat = 1.0,
        initial_coef: NonNegativeFloat = 0.0,
    ) -> None:
        if target is None and target_ratio is None:
            target = 0.2  # TRL's default, in nats
        super().__init__(objective, target, target_ratio)
        if coef_min > coef_max:
            raise ConfigError(
                f"trainer.callbacks: StepEntropyController.coef_min: must be <= coef_max ({coef_max}), got {coef_min}"
            )
        self.delta, self.coef_min, self.coef_max = delta, coef_min, coef_max
        self.coef = initial_coef

    def initial_weight(self) -> float:
        return 0.0  # TRL: the gate uses the previous step's entropy, unknown before the first step

    def decide(self, value: float) -> float:
        self._set_target(value)
        self.coef, applied = skywork_step(self.coef, value, self.target, self.delta, self.coef_min, self.coef_max)
        return applied
