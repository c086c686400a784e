"""Sampled pass@k against brute-force enumeration and exact rational arithmetic; SampledPassAtK vs a plain loop."""

import itertools
import math
import random
from fractions import Fraction

import pytest
import torch

from cappo_pl.metrics import SampledPassAtK, pass_at_k, pass_at_k_tensor


def _brute(n, c, k):
    """Fraction of the k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_matches_enumeration_of_every_k_subset():
    grid = [(n, c, k) for n in range(1, 11) for c in range(n + 1) for k in range(1, n + 1)]
    want = [_brute(n, c, k) for n, c, k in grid]
    for (n, c, k), w in zip(grid, want, strict=True):
        assert pass_at_k(n, c, k) == pytest.approx(w, abs=1e-13), (n, c, k)
    for k in range(1, 11):
        rows = [(i, g) for i, g in enumerate(grid) if g[2] == k]
        n = torch.tensor([g[0] for _, g in rows])
        c = torch.tensor([g[1] for _, g in rows])
        got = pass_at_k_tensor(n, c, k)
        assert got.dtype == torch.float64
        assert got.tolist() == pytest.approx([want[i] for i, _ in rows], abs=1e-13), k
    assert {0.0, 1.0} < set(want)  # both ends and values between occur


@pytest.mark.parametrize("c", [0, 1, 2, 7, 100, 512, 1000, 1020, 1024])
def test_stable_at_n_1024(c):
    n = 1024
    ks = [1, 2, 5, 64, 256, 1024]
    exact = [float(1 - Fraction(math.comb(n - c, k), math.comb(n, k))) for k in ks]
    for k, want in zip(ks, exact, strict=True):
        assert pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12, abs=1e-300), (c, k)
    got = torch.stack([pass_at_k_tensor(torch.tensor([n]), torch.tensor([c]), k)[0] for k in ks])
    assert got.tolist() == pytest.approx(exact, rel=1e-12, abs=1e-300)
    if c == 1:
        assert pass_at_k(n, 1, 1) == pytest.approx(1 / 1024, rel=1e-15)  # no cancellation near 0


def test_bad_counts_are_refused():
    for args in [(4, 1, 5), (4, 5, 1), (-1, 0, 1), (4, -1, 1), (4, 1, 0), (4, 1, -2)]:
        with pytest.raises(ValueError):
            pass_at_k(*args)
    with pytest.raises(ValueError):
        pass_at_k_tensor(torch.tensor([4, 2]), torch.tensor([1, 1]), 3)  # k > n in the second element
    with pytest.raises(ValueError):
        pass_at_k_tensor(torch.tensor([4]), torch.tensor([5]), 1)


def _plain(correct, completions, n, ks):
    """Per-prompt loop in plain Python (math.comb for pass@k), then means."""
    out = {f"pass@{k}": [] for k in ks} | {"distinct_correct": [], "unique_ratio": []}
    for p in range(len(correct) // n):
        flags, texts = correct[p * n : (p + 1) * n], completions[p * n : (p + 1) * n]
        c = sum(flags)
        for k in ks:
            out[f"pass@{k}"].append(1 - math.comb(n - c, k) / math.comb(n, k))
        out["distinct_correct"].append(len({t for t, f in zip(texts, flags, strict=True) if f}))
        out["unique_ratio"].append(len(set(texts)) / n)
    return {key: sum(v) / len(v) for key, v in out.items()}


def _samples(seed, prompts, n):
    rng = random.Random(seed)
    completions = [rng.choice(["1+8", "2+7", "3+6", "9", "4+4"]) for _ in range(prompts * n)]
    rate = [rng.random() for _ in range(prompts)]
    correct = [completions[i] != "9" and rng.random() < rate[i // n] for i in range(prompts * n)]
    return correct, completions


def test_sampled_metric_matches_a_plain_loop():
    n, ks = 8, (1, 3, 8)
    correct, completions = _samples(0, 9, n)
    metric = SampledPassAtK(ks)
    assert all(math.isnan(float(v)) for v in metric.compute_all().values())
    for rows in (slice(0, 16), slice(16, 56), slice(56, 72)):  # uneven calls on prompt boundaries
        metric.update(torch.tensor(correct[rows]), completions[rows], n)
    got = {key: float(v) for key, v in metric.compute_all().items()}
    want = _plain(correct, completions, n, ks)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-14), key
    assert float(metric.compute()) == pytest.approx(want["pass@1"])
    assert float(metric.prompts) == 9
    assert 0 < want["pass@1"] < want["pass@3"] < 1 and 1 < want["distinct_correct"] < 4  # a non-trivial case


def test_sampled_metric_refuses_k_above_n_and_ragged_groups():
    metric = SampledPassAtK((1, 8))
    with pytest.raises(ValueError, match="k <= n"):
        metric.update(torch.ones(8, dtype=torch.bool), ["a"] * 8, 4)
    with pytest.raises(ValueError, match="rows"):
        metric.update(torch.ones(7, dtype=torch.bool), ["a"] * 7, 8)
    with pytest.raises(ValueError, match="ks"):
        SampledPassAtK([0])
