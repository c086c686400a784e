"""Per-token KL estimators between the policy and the reference on samples from the policy.

Schulman, "Approximating KL divergence" (http://joschu.net/blog/kl-approx.html); verl
``kl_penalty_forward`` (verl-project/verl ``verl/trainer/ppo/core_algos.py``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3", "k1+", "k2+", "k3+"]


def _k1(delta: Tensor) -> Tensor:
    return -delta


def _k2(delta: Tensor) -> Tensor:
    return 0.5 * delta.square()


def _k3(delta: Tensor) -> Tensor:
    # verl clamps delta to [-20, 20] and the result to [-10, 10] to keep exp finite.
    delta = delta.clamp(-20.0, 20.0)
    return (torch.exp(delta) - delta - 1.0).clamp(-10.0, 10.0)


_BASE = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref), shape (B, T).

    With ``delta = log pi_ref - log pi_theta`` on tokens sampled from pi_theta:

    - ``k1 = -delta`` (unbiased, high variance, can be negative);
    - ``k2 = delta^2 / 2`` (biased; its gradient is the true KL gradient in expectation);
    - ``k3 = exp(delta) - delta - 1`` (unbiased, non-negative; verl ``low_var_kl``).

    A trailing ``+`` is the straight-through variant: the forward value of the base estimator with
    the gradient of k2, i.e. ``k2 - sg(k2) + sg(kX)``.

    Args:
        logp: policy token logprobs (B, T), with gradient.
        ref_logp: reference token logprobs (B, T), no gradient needed.
        estimator: one of k1, k2, k3, k1+, k2+, k3+.

    """
    straight_through = estimator.endswith("+")
    base = estimator.rstrip("+")
    if base not in _BASE:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of k1, k2, k3 (optionally with '+')")
    delta = ref_logp - logp
    value = _BASE[base](delta)
    if not straight_through:
        return value
    k2 = _k2(delta)
    return k2 - k2.detach() + value.detach()
