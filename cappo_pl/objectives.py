"""Objectives: the named, weighted loss terms of a step.

Each objective returns its raw (unweighted) loss and metrics; the module (and, later, a combiner)
decides how the weighted terms become one update. ``weight`` is mutable so callbacks such as an
entropy controller can steer it between steps.
"""

from __future__ import annotations

from torch import Tensor

from cappo_pl.constraints import NonNegativeFloat, checked_init
from cappo_pl.losses.aggregation import AggMode, agg_loss, masked_mean
from cappo_pl.losses.base import PolicyLoss, TokenBatch
from cappo_pl.losses.kl import KLEstimator, kl_penalty
from cappo_pl.losses.ppo import PPOClip


class Objective:
    """Base class of a loss term, chosen by ``class_path``.

    Attributes:
        name: key used in metric names (``train/objective/<name>/loss``) and by callbacks.
        weight: the term's weight w_k in the update ``sum_k w_k grad L_k``.
        needs_ref: the reference model must be loaded and scored.
        needs_topk: the sampler's top-K logprobs and the current ones of the same ids (DPPO Top-K).

    """

    needs_ref: bool = False
    needs_topk: bool = False

    def __init__(self, name: str, weight: float) -> None:
        self.name = name
        self.weight = float(weight)

    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


class PolicyObjective(Objective):
    """The policy surrogate (reward objective).

    Args:
        loss: the surrogate (PPO-clip by default).
        weight: weight of the term.
        name: metric/controller name.

    """

    @checked_init
    def __init__(self, loss: PolicyLoss | None = None, weight: NonNegativeFloat = 1.0, name: str = "policy") -> None:
        super().__init__(name, weight)
        self.loss = loss if loss is not None else PPOClip()
        self.needs_topk = getattr(self.loss, "needs_topk", False)  # a duck-typed loss may not declare it

    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        return self.loss(batch)


class EntropyBonus(Objective):
    """Entropy regulariser ``L_H = -agg(H)`` on temperature-scaled per-token entropy (verl, TRL).

    Minimising ``w * L_H`` raises entropy; ``weight`` is the entropy coefficient.

    Args:
        weight: entropy coefficient.
        agg: aggregation mode (verl uses the policy loss's mode; TRL always token-mean).
        name: metric/controller name.

    """

    @checked_init
    def __init__(self, weight: float = 0.001, agg: AggMode = "token-mean", name: str = "entropy") -> None:
        super().__init__(name, weight)
        self.agg = agg

    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if batch.entropy is None:
            raise RuntimeError("EntropyBonus needs the per-token entropy of the current forward")
        loss = -agg_loss(batch.entropy, batch.mask, self.agg, batch.loss_scale_factor, batch.dp)
        return loss, {"entropy": masked_mean(batch.entropy.detach(), batch.mask)}


class KLPenalty(Objective):
    """KL-to-reference penalty ``L_KL = agg(k(logp, ref_logp))`` (GRPO's in-loss KL).

    Args:
        weight: KL coefficient beta (DeepSeekMath 0.04; verl 0.001).
        estimator: k1, k2, k3 or a straight-through ``+`` variant.
        agg: aggregation mode.
        name: metric/controller name.

    """

    needs_ref = True

    @checked_init
    def __init__(
        self,
        weight: NonNegativeFloat = 0.001,
        estimator: KLEstimator = "k3",
        agg: AggMode = "token-mean",
        name: str = "kl",
    ) -> None:
        super().__init__(name, weight)
        self.estimator = estimator
        self.agg = agg

    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if batch.ref_logp is None:
            raise RuntimeError("KLPenalty needs reference logprobs")
        kl = kl_penalty(batch.logp, batch.ref_logp, self.estimator)
        loss = agg_loss(kl, batch.mask, self.agg, batch.loss_scale_factor, batch.dp)
        return loss, {"kl": masked_mean(kl.detach(), batch.mask)}


class PositiveNLL(Objective):
    """NLL on the step's correct rollouts, ``L = agg_{i: correct}(-log pi(y_i,t))`` (Klear-Reasoner Eq. 13-14).

    The extra term the CE-GPPO and ERC authors' scripts add (``positive_loss_coeff`` alpha = 0.1; Klear-Reasoner,
    arXiv:2508.07629, Kwai-Klear/CE-GPPO and Kwai-Klear/ERC). Samples that are not correct are out of the loss.

    Args:
        weight: alpha (0.1 in the release scripts).
        agg: aggregation over the correct samples' tokens (token-mean in the scripts).
        name: metric/controller name.

    """

    @checked_init
    def __init__(self, weight: NonNegativeFloat = 0.1, agg: AggMode = "token-mean", name: str = "positive_nll") -> None:
        super().__init__(name, weight)
        self.agg = agg

    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if batch.correct is None:
            raise RuntimeError("PositiveNLL needs the samples' correctness")
        mask = batch.mask * batch.correct[:, None].to(batch.mask.dtype)
        loss = agg_loss(-batch.logp, mask, self.agg, batch.loss_scale_factor, batch.dp)
        return loss, {"positive_frac": batch.correct.float().mean()}


def objective_losses(objectives: list[Objective], batch: TokenBatch) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Each objective's raw loss (in config order) and the step's namespaced metrics.

    Keys: ``objective/<name>/loss``; the policy objective's own metrics under ``policy/``, the others'
    under ``objective/<name>/``.
    """
    losses: list[Tensor] = []
    metrics: dict[str, Tensor] = {}
    for obj in objectives:
        loss, m = obj(batch)
        losses.append(loss)
        metrics[f"objective/{obj.name}/loss"] = loss.detach()
        prefix = "policy/" if isinstance(obj, PolicyObjective) else f"objective/{obj.name}/"
        metrics.update({prefix + k: v for k, v in m.items()})
    return losses, metrics
