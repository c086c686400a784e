"""Exact support metrics for tasks whose full set V(x) of correct answers can be enumerated.

Sampled pass@k is noisy and needs k samples; when V(x) is small enough to teacher-force every answer
y, the policy's probability ``pi(y) = pi(y | x)`` of each one (the sum of its token logprobs,
EOS included) gives the same quantities in closed form, with no sampling noise:

    validity      = sum_{y in V} pi(y)                        P(a sample is correct)
    pass@k        = 1 - (1 - validity)^k                      P(one of k samples is correct)
    distinct@k    = sum_{y in V} [1 - (1 - pi(y))^k]          E[distinct correct answers in k samples]
    coverage@k    = distinct@k / min(k, |V|)                  the same, as a fraction of the possible
    answer_entropy = H(pi(. | y in V))                        entropy (nats) of the renormalised pi on V
    support_kept@eps = |{y: pi_SFT(y) >= eps, pi(y) >= eps}| / |{y: pi_SFT(y) >= eps}|

``distinct@k`` is linearity of expectation over the indicator "y appears among k i.i.d. samples"
(probability ``1 - (1 - pi(y))^k``). ``support_kept`` is the enumerable analogue of CaPPO's Support
Retention Ratio (``cappo_pl.metrics.srr``): of the answers the SFT policy gave mass >= eps, the
fraction the policy still gives mass >= eps. A hidden target S (a subset of V, see
``cappo_pl.metrics.hidden``) adds ``hidden/validity = sum_{y in S} pi(y)`` and ``hidden/pass@k``.

Numerics: everything is float64 and in log space; ``1 - (1 - p)^k = -expm1(k log(1 - p))`` with
``log(1 - p)`` from ``log pi`` by ``log1mexp`` (Maechler 2012, "Accurately computing log(1 - exp(-|a|))"),
so neither a tiny p (1 - p rounds to 1) nor a p near 1 loses its digits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from cappo_pl.metrics.srr import threshold_key


def eps_key(eps: float) -> str:
    """Metric-key form of an eps, as the SRR's thresholds: ``1e-3 -> "1e-03"``."""
    return threshold_key(eps)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends (Maechler 2012).

    ``x`` above 0 is read as 0 (result ``-inf``): a total mass that float32 token logprobs pushed a
    rounding error above 1 is a mass of 1.

    Args:
        x: (...) log-probabilities, may be ``-inf``.

    Returns:
        (...) same dtype; ``0`` at ``x = -inf``, ``-inf`` at ``x >= 0``.

    """
    x = x.clamp(max=0.0)
    # near 0, 1 - exp(x) cancels: -expm1(x) is exact; far below, exp(x) is tiny: log1p keeps it
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def at_least_once(log_p: Tensor, k: int) -> Tensor:
    """``1 - (1 - p)^k`` from ``log p``: the probability that k i.i.d. draws hit an event of mass p."""
    return -torch.expm1(k * log1mexp(log_p))


def exact_keys(ks: Sequence[int], eps: Sequence[float]) -> list[str]:
    """Every key :func:`exact_prompt_metrics` can return, in a fixed order (the metric's state layout)."""
    keys = ["validity", *(f"pass@{k}" for k in ks), *(f"distinct@{k}" for k in ks)]
    keys += [*(f"coverage@{k}" for k in ks), "answer_entropy", *(f"support_kept@{eps_key(e)}" for e in eps)]
    return keys + ["hidden/validity", *(f"hidden/pass@{k}" for k in ks)]


def _check_options(ks: Sequence[int], eps: Sequence[float]) -> None:
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"exact metrics: ks must be a non-empty list of integers >= 1, got {list(ks)}")
    if any(not 0.0 < e <= 1.0 for e in eps):
        raise ValueError(f"exact metrics: every eps must be in (0, 1], got {list(eps)}")


def exact_prompt_metrics(
    logp: Tensor,
    sft_logp: Tensor | None,
    ks: Sequence[int],
    eps: Sequence[float],
    hidden: Tensor | None,
) -> dict[str, Tensor]:
    """The exact metrics of one prompt from the log-probabilities of all its valid answers.

    Definitions in the module docstring. A value that is undefined for this prompt is NaN and the
    metric leaves the prompt out of that key's average: ``answer_entropy`` when validity is 0,
    ``support_kept@<eps>`` when no answer has ``pi_SFT(y) >= eps``, the ``hidden/*`` keys when S is
    empty.

    Args:
        logp: (V,) log pi(y) of every valid answer y in V(x) (sum of its token logprobs and EOS's);
            ``-inf`` allowed (an answer the sampler can never emit).
        sft_logp: (V,) log pi_SFT(y) of the same answers, or None (no ``support_kept@*`` keys).
        ks: the k of ``pass@<k>``, ``distinct@<k>``, ``coverage@<k>``, ``hidden/pass@<k>``.
        eps: the eps of ``support_kept@<eps_key(eps)>``, each in (0, 1].
        hidden: (V,) bool, the hidden target S, or None (no ``hidden/*`` keys).

    Returns:
        0-dim float64 tensors: ``validity``, ``pass@<k>``, ``distinct@<k>``, ``coverage@<k>``,
        ``answer_entropy``, then ``support_kept@<eps>`` (with ``sft_logp``) and ``hidden/validity``,
        ``hidden/pass@<k>`` (with ``hidden``).

    Raises:
        ValueError: an empty V, NaN log-probabilities, mismatched shapes, or bad ks/eps.

    """
    _check_options(ks, eps)
    logp = logp.to(torch.float64).reshape(-1)  # (V,)
    n = logp.numel()
    if n == 0:
        raise ValueError("exact metrics: the prompt has no valid answers (empty V)")
    if bool(torch.isnan(logp).any()):
        raise ValueError("exact metrics: NaN log-probability of a valid answer")
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=logp.device)
    log_validity = torch.logsumexp(logp, 0)
    out = {"validity": log_validity.exp()}
    for k in ks:
        out[f"pass@{k}"] = at_least_once(log_validity, k)
    for k in ks:
        out[f"distinct@{k}"] = at_least_once(logp, k).sum()
    for k in ks:
        out[f"coverage@{k}"] = out[f"distinct@{k}"] / min(k, n)
    if torch.isfinite(log_validity):
        log_q = logp - log_validity  # (V,) renormalised on V
        q = log_q.exp()
        out["answer_entropy"] = -torch.where(q > 0, q * log_q, 0.0).sum()  # 0 log 0 = 0
    else:
        out["answer_entropy"] = nan
    if sft_logp is not None:
        sft_logp = sft_logp.to(device=logp.device, dtype=torch.float64).reshape(-1)
        if sft_logp.shape != logp.shape:
            raise ValueError(f"exact metrics: sft_logp has {sft_logp.numel()} answers, logp {n}")
        for e in eps:
            log_e = math.log(e)
            in_sft = sft_logp >= log_e  # compared in log space: pi(y) >= eps without exp underflow
            total = in_sft.sum()
            kept = (in_sft & (logp >= log_e)).sum()
            out[f"support_kept@{eps_key(e)}"] = kept.to(torch.float64) / total if total > 0 else nan
    if hidden is not None:
        hidden = hidden.to(device=logp.device, dtype=torch.bool).reshape(-1)
        if hidden.shape != logp.shape:
            raise ValueError(f"exact metrics: the hidden mask has {hidden.numel()} answers, logp {n}")
        if bool(hidden.any()):
            log_hidden = torch.logsumexp(logp[hidden], 0)
            out["hidden/validity"] = log_hidden.exp()
            for k in ks:
                out[f"hidden/pass@{k}"] = at_least_once(log_hidden, k)
        else:
            out["hidden/validity"] = nan
            for k in ks:
                out[f"hidden/pass@{k}"] = nan
    return out


class ExactSupportMetrics(Metric):
    """Means over prompts of :func:`exact_prompt_metrics`, one prompt per :meth:`update`.

    :meth:`compute_all` returns every key of :func:`exact_keys` (the hidden-target ones prefixed
    ``hidden/``, so a caller maps ``hidden/<name>`` and ``<name>`` to its own namespaces by the prefix),
    each the mean over the prompts where it was defined (NaN where none was: before any update, when
    no update passed ``sft_logp`` or ``hidden``, or every S was empty), plus two totals for cost
    reports: ``prompts`` (updates) and ``answers`` (answers scored, the sum of |V|).

    Every state is a sum (``dist_reduce_fx="sum"``): the counts under data parallelism are the
    single-process ones exactly and the means equal it up to the summation order of floats.

    Args:
        ks: the k of the ``@<k>`` keys (integers >= 1, any size: closed forms).
        eps: the eps of ``support_kept@<eps>`` (each in (0, 1]).
        **kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ...).

    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, ks: Sequence[int], eps: Sequence[float] = (1e-3,), **kwargs) -> None:
        super().__init__(**kwargs)
        _check_options(ks, eps)
        self.ks = [int(k) for k in ks]
        self.eps = [float(e) for e in eps]
        self.keys = exact_keys(self.ks, self.eps)
        n = len(self.keys)
        self.add_state("sums", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prompts", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("answers", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logp: Tensor, sft_logp: Tensor | None = None, hidden: Tensor | None = None) -> None:
        """Add one prompt (arguments as :func:`exact_prompt_metrics`: (V,) logp, sft_logp, hidden)."""
        values = exact_prompt_metrics(logp, sft_logp, self.ks, self.eps, hidden)
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=values["validity"].device)
        row = torch.stack([values.get(key, nan) for key in self.keys]).to(self.sums.device)  # (keys,)
        defined = ~torch.isnan(row)
        self.sums += torch.where(defined, row, 0.0)
        self.counts += defined.to(torch.float64)
        self.prompts += 1
        self.answers += logp.numel()

    def compute(self) -> Tensor:
        """Mean ``validity`` (NaN before any update)."""
        if self.counts[0] > 0:
            return self.sums[0] / self.counts[0]
        return torch.tensor(float("nan"), dtype=torch.float64)

    def compute_all(self) -> dict[str, Tensor]:
        """Means over prompts, ``prompts`` and ``answers`` (class docstring), synchronised across processes."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            nan = torch.full_like(self.sums, float("nan"))
            means = torch.where(self.counts > 0, self.sums / self.counts.clamp_min(1), nan)
            out = {key: means[i].clone() for i, key in enumerate(self.keys)}
            out["prompts"] = self.prompts.clone()
            out["answers"] = self.answers.clone()
            return out
