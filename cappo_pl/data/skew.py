"""Skewed reference draws: real SFT data has popular and rare answers, not a uniform sample."""

from __future__ import annotations

import random


def zipf_draw(answers: list[str], count: int, exponent: float, rng: random.Random) -> list[str]:
    """``count`` draws WITH replacement from ``answers``, Zipf-skewed over a seeded random ranking.

    The answers are first shuffled with ``rng`` (rank 1 is the first after the shuffle), then each draw
    picks rank r with probability proportional to ``1 / r**exponent``. Duplicates are intended: an SFT
    policy trained on the draws learns the skew (a few popular answers, a long tail of rare ones, and
    some valid answers never seen), the kind of start an RL policy can contract from.

    Args:
        answers: the candidates (e.g. every valid completion of a prompt); not modified.
        count: how many draws.
        exponent: the Zipf exponent s (0 would be uniform; 1 is the classic Zipf law).
        rng: the random stream (consumed: one shuffle, then ``count`` draws).

    Returns:
        ``count`` answers, in draw order ([] when ``answers`` is empty or ``count`` is 0).

    """
    if not answers or count <= 0:
        return []
    ranked = list(answers)
    rng.shuffle(ranked)
    weights = [1.0 / (rank**exponent) for rank in range(1, len(ranked) + 1)]
    return rng.choices(ranked, weights=weights, k=count)
