"""Built-in reward functions."""

from __future__ import annotations

import re
from typing import Any

_SUM = re.compile(r"^\s*(\d{1,6})(?:\s*\+\s*(\d{1,6}))+\s*$")
_TERM = re.compile(r"\d{1,6}")


def parse_sum(text: str) -> list[int] | None:
    """Parse ``"a+b(+c...)"`` into its terms, or None if the text is not such a sum."""
    if not _SUM.match(text):
        return None
    return [int(t) for t in _TERM.findall(text)]


def sum_reward(
    prompts: list[str], completions: list[str], target: list[int], n_terms: list[int], **_: Any
) -> list[float]:
    """1.0 when the completion is ``n_terms`` positive integers that add up to ``target``, else 0.0."""
    out = []
    for comp, tgt, k in zip(completions, target, n_terms, strict=True):
        terms = parse_sum(comp)
        ok = terms is not None and len(terms) == k and all(t > 0 for t in terms) and sum(terms) == tgt
        out.append(1.0 if ok else 0.0)
    return out


def exact_match(prompts: list[str], completions: list[str], answer: list[str | None], **_: Any) -> list[float]:
    """1.0 when the stripped completion equals the record's ``answer``, else 0.0."""
    return [float(a is not None and c.strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)]
