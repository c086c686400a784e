"""Sampled pass@k and diversity of the validation samples, for every task.

The unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code",
arXiv:2107.03374, eq. 1): from n samples of a prompt of which c are correct,

    pass@k = 1 - C(n - c, k) / C(n, k)

the probability that a k-subset drawn without replacement from the n samples holds a correct one.
Evaluated as the product ``1 - prod_{i = n-c+1}^{n} (1 - k / i)`` (the paper's numpy form), in log
space: C(n, n/2) is 2^1019 at n = 1024 and overflows float64 a few samples later, and ``1 - ratio``
loses relative precision when pass@k is close to 0 (``-expm1`` keeps it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


def _check_counts(n: int, c: int, k: int) -> None:
    if k < 1 or n < 0 or c < 0:
        raise ValueError(f"pass@k needs k >= 1 and n, c >= 0, got n={n}, c={c}, k={k}")
    if k > n or c > n:
        raise ValueError(f"pass@k needs k <= n and c <= n, got n={n}, c={c}, k={k}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``c`` correct of ``n`` samples (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)``.

    ``C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)``; summed as ``log1p(-k/i)`` and returned as
    ``-expm1(sum)`` so a value near 0 (one correct of 1024) keeps its relative precision.

    Args:
        n: samples of the prompt.
        c: correct samples among them.
        k: subset size, 1 <= k <= n.

    Returns:
        pass@k in [0, 1]; 1.0 when ``n - c < k`` (every k-subset holds a correct sample).

    Raises:
        ValueError: k < 1, a negative count, k > n or c > n.

    """
    _check_counts(n, c, k)
    if n - c < k:
        return 1.0
    log_ratio = math.fsum(math.log1p(-k / i) for i in range(n - c + 1, n + 1))  # i > k: finite terms
    return -math.expm1(log_ratio)


def pass_at_k_tensor(n: Tensor, c: Tensor, k: int) -> Tensor:
    """Elementwise :func:`pass_at_k`, float64.

    Args:
        n: (P,) integer samples per prompt.
        c: (P,) integer correct samples per prompt.
        k: subset size, ``1 <= k <= min(n)``.

    Returns:
        (P,) float64 pass@k, on ``c``'s device.

    Raises:
        ValueError: as :func:`pass_at_k`, for any element.

    """
    n, c = n.to(torch.long), c.to(device=n.device, dtype=torch.long)
    if n.numel() == 0:
        return torch.zeros(0, dtype=torch.float64, device=n.device)
    if k < 1 or bool((c < 0).any()) or bool((c > n).any()) or bool((n < k).any()):
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got k={k}, n={n.tolist()}, c={c.tolist()}")
    i = torch.arange(1, int(n.max()) + 1, dtype=torch.float64, device=n.device)  # (I,)
    # the product's factors (1 - k/i) for n - c < i <= n; i > k keeps log1p finite (n - c >= k where used)
    inside = (i[None, :] > (n - c)[:, None]) & (i[None, :] <= n[:, None]) & (i[None, :] > k)  # (P, I)
    log_ratio = torch.where(inside, torch.log1p(-k / i.clamp_min(k + 1))[None, :], 0.0).sum(-1)  # (P,)
    return torch.where(n - c < k, torch.ones_like(log_ratio), -torch.expm1(log_ratio))


class SampledPassAtK(Metric):
    """Pass@k, distinct correct completions and unique ratio of n samples per prompt.

    Per prompt (its n samples, c correct):

    - ``pass@<k>``: the unbiased estimator :func:`pass_at_k` (Chen et al. 2021);
    - ``distinct_correct``: how many distinct completion strings are among the correct samples (a
      policy collapsed onto one answer scores 1 at any accuracy);
    - ``unique_ratio``: distinct strings among all n samples, divided by n.

    :meth:`compute_all` returns the means over prompts. Every state is a sum
    (``dist_reduce_fx="sum"``), so under data parallelism the counts are the single-process ones
    exactly and the means equal it up to the summation order of floats.

    Args:
        ks: the k of ``pass@<k>`` (each >= 1; each must be <= the n of every update).
        **kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ...).

    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, ks: Sequence[int], **kwargs) -> None:
        super().__init__(**kwargs)
        ks = [int(k) for k in ks]
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"SampledPassAtK: ks must be a non-empty list of integers >= 1, got {ks}")
        self.ks = ks
        self.add_state("pass_sum", torch.zeros(len(ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("distinct_correct_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("unique_ratio_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prompts", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, correct: Tensor, completions: list[str], n: int) -> None:
        """Add the samples of P prompts.

        Args:
            correct: (P * n,) bool (or 0/1), group-major: prompt p's samples are rows p*n .. p*n+n-1.
            completions: the P * n completion texts, in the same order.
            n: samples per prompt.

        Raises:
            ValueError: sizes that disagree, or a k > n.

        """
        correct = correct.reshape(-1).to(torch.bool)
        if n < 1 or correct.numel() != len(completions) or correct.numel() % n:
            raise ValueError(
                f"SampledPassAtK: {correct.numel()} flags and {len(completions)} completions are not P x n={n} rows"
            )
        if max(self.ks) > n:
            raise ValueError(f"SampledPassAtK: pass@k needs k <= n, got ks={self.ks} with n={n} samples per prompt")
        groups = correct.view(-1, n)  # (P, n)
        c = groups.sum(-1)  # (P,)
        counts = torch.full_like(c, n)
        for j, k in enumerate(self.ks):
            self.pass_sum[j] += pass_at_k_tensor(counts, c, k).sum().to(self.pass_sum.device)
        flags = correct.tolist()
        distinct, unique = 0, 0.0
        for p in range(groups.shape[0]):
            rows = range(p * n, (p + 1) * n)
            distinct += len({completions[i] for i in rows if flags[i]})
            unique += len({completions[i] for i in rows}) / n
        self.distinct_correct_sum += distinct
        self.unique_ratio_sum += unique
        self.prompts += groups.shape[0]

    def compute(self) -> Tensor:
        """Mean ``pass@<ks[0]>`` (NaN before any update)."""
        if self.prompts > 0:
            return self.pass_sum[0] / self.prompts
        return torch.tensor(float("nan"), dtype=torch.float64)

    def compute_all(self) -> dict[str, Tensor]:
        """Means over prompts of ``pass@<k>``, ``distinct_correct``, ``unique_ratio`` (NaN before any update).

        Synchronised across processes.
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            if self.prompts > 0:
                mean = lambda s: s / self.prompts  # noqa: E731
            else:
                mean = lambda s: torch.full_like(s, float("nan"))  # noqa: E731
            out = {f"pass@{k}": mean(self.pass_sum[j]) for j, k in enumerate(self.ks)}
            out["distinct_correct"] = mean(self.distinct_correct_sum)
            out["unique_ratio"] = mean(self.unique_ratio_sum)
            return {key: v.clone() for key, v in out.items()}
