"""Hidden-target verifiers: evaluation-only verifiers that accept a seeded subset S of V(x).

Training rewards every answer in V(x); a hidden target is a second verifier, never used for
rewards, that accepts only S, a subset of V(x) the policy never learns about. It measures what a
policy that collapsed onto a few answers loses: at equal validity, every policy has the same
expected hidden pass@1 under a uniformly random S (``E[sum_{y in S} pi(y)] = |S|/|V| * validity``),
but hidden pass@k at large k, ``1 - (1 - sum_{y in S} pi(y))^k``, rewards spreading mass over V: a
policy on one answer hits S with probability |S|/|V| whatever k, one that keeps its support hits
it almost surely. ``RareAnswers`` and ``EdgeFailure`` are the adversarial versions: S is what the
SFT policy found least likely, or every answer avoiding one step of its favourite answer (the
"tool breaks" scenario of path tasks).

Targets are chosen in YAML by ``class_path`` (``model.evaluation.hidden``); the subsets are drawn
once per run from the initial policy's probabilities and a seed (stream ``hidden_target``, keyed by
the prompt), so every run with that seed evaluates the same S.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor

from cappo_pl.constraints import OpenUnitFloat, checked_init
from cappo_pl.seeds import generator


def prompt_generator(key: str, seed: int) -> torch.Generator:
    """The hidden-target stream of prompt ``key``: ``derive_seed(seed, "hidden_target", crc32(key))``.

    crc32 rather than ``hash()``: Python salts string hashes per process, S must be the same in every
    process and run.
    """
    return generator(seed, "hidden_target", zlib.crc32(key.encode("utf-8")))


def subset_size(fraction: float, total: int) -> int:
    """``max(1, round(fraction * total))``, rounding halves up (Python's ``round`` rounds them to even)."""
    return max(1, math.floor(fraction * total + 0.5))


class HiddenTarget:
    """Base class of hidden-target verifiers: ``select`` returns the subset S of V(x) it accepts."""

    def select(self, answers: list[str], sft_logp: Tensor, key: str, seed: int) -> Tensor:
        """The hidden target of one prompt.

        Args:
            answers: V(x), the |V| distinct valid answers, in the task's order.
            sft_logp: (|V|,) float64 log pi_SFT(y) of each answer under the initial policy.
            key: identifies the prompt (its text): with ``seed``, it seeds the prompt's draws.
            seed: the run's hidden-target seed.

        Returns:
            (|V|,) bool, True on the answers in S; all False leaves the prompt out of the hidden metrics.

        """
        raise NotImplementedError


class FractionTarget(HiddenTarget):
    """A hidden target that accepts a share ``fraction`` of V(x) (``subset_size``), in (0, 1)."""

    @checked_init
    def __init__(self, fraction: OpenUnitFloat = 0.3) -> None:
        self.fraction = fraction


class RandomAnswers(FractionTarget):
    """S is a uniformly random subset of V(x) with ``max(1, round(fraction * |V|))`` answers.

    The fair target: its expected hidden validity is ``|S|/|V|`` times the validity for any policy,
    so only how pi is spread over V (hidden pass@k, k > 1) tells policies of equal validity apart.

    Args:
        fraction: share of V(x) in S, in (0, 1).

    """

    def select(self, answers: list[str], sft_logp: Tensor, key: str, seed: int) -> Tensor:
        n = len(answers)
        mask = torch.zeros(n, dtype=torch.bool)
        if n:
            mask[torch.randperm(n, generator=prompt_generator(key, seed))[: subset_size(self.fraction, n)]] = True
        return mask


class RareAnswers(FractionTarget):
    """S is the ``max(1, round(fraction * |V|))`` answers the SFT policy gave the least probability.

    Ties are broken by a seeded random order (an exact tie, e.g. answers the sampler can never emit,
    at ``-inf``, must not pick by the task's listing order). This target asks whether RL kept the
    tail of the SFT distribution, the part contraction removes first.

    Args:
        fraction: share of V(x) in S, in (0, 1).

    """

    def select(self, answers: list[str], sft_logp: Tensor, key: str, seed: int) -> Tensor:
        n = len(answers)
        mask = torch.zeros(n, dtype=torch.bool)
        if n:
            order = torch.randperm(n, generator=prompt_generator(key, seed))  # the tie-break
            ranked = order[torch.sort(sft_logp.detach().cpu()[order], stable=True).indices]  # least likely first
            mask[ranked[: subset_size(self.fraction, n)]] = True
        return mask


class EdgeFailure(HiddenTarget):
    """For path answers (``"07 12 30 41"``): one step of the SFT policy's favourite answer breaks.

    Take the SFT-modal answer (argmax of ``sft_logp``, the first on ties), draw (seeded) one of its
    edges (consecutive node pairs) among those some valid answer avoids, and let S be every answer
    that does not use it: the modal answer is never in S. A policy that contracted onto the modal
    path fails every hidden sample; one that kept alternative routes does not. When every edge of
    the modal answer is used by every answer (or it has no edge), S is empty and the prompt is left
    out of the hidden metrics.

    Args:
        separator: what separates the nodes of an answer.
        directed: edges are ordered pairs; False (default): ``"a b"`` and ``"b a"`` are the same edge.

    """

    @checked_init
    def __init__(self, separator: str = " ", directed: bool = False) -> None:
        self.separator = separator
        self.directed = directed

    def edges(self, answer: str) -> set[tuple[str, ...]]:
        """The edges an answer uses (its consecutive node pairs; sorted pairs when undirected)."""
        nodes = answer.split(self.separator)
        pairs = zip(nodes[:-1], nodes[1:], strict=True)
        return {pair if self.directed else tuple(sorted(pair)) for pair in pairs}

    def select(self, answers: list[str], sft_logp: Tensor, key: str, seed: int) -> Tensor:
        n = len(answers)
        mask = torch.zeros(n, dtype=torch.bool)
        if n == 0:
            return mask
        modal = int(torch.argmax(sft_logp.detach().cpu()))
        used = [self.edges(a) for a in answers]
        nodes = answers[modal].split(self.separator)
        ordered = []  # the modal answer's edges in path order, each once (a fixed order for the draw)
        for pair in zip(nodes[:-1], nodes[1:], strict=True):
            edge = pair if self.directed else tuple(sorted(pair))
            if edge not in ordered and any(edge not in u for u in used):
                ordered.append(edge)
        if not ordered:
            return mask
        pick = int(torch.randint(len(ordered), (1,), generator=prompt_generator(key, seed)))
        broken = ordered[pick]
        return torch.tensor([broken not in u for u in used], dtype=torch.bool)
