"""The record schema shared by the built-in task and file readers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Record:
    """One prompt with what the reward and the SRR need.

    Attributes:
        prompt: the text the policy continues (non-empty).
        references: SFT reference completions (may be empty for RL-only data).
        answer: the ground truth a reward function may compare against (optional).
        extra: any other fields, passed to the reward function as keyword lists.
        source: ``file:line`` (or ``builtin:<task>#i``) for error messages.

    """

    prompt: str
    references: list[str] = field(default_factory=list)
    answer: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def source_file(source: str) -> str:
    """The file of a ``Record.source`` (``data/train.jsonl:12`` -> ``data/train.jsonl``)."""
    return source.rsplit(":", 1)[0] if ":" in source else source


@dataclass
class PromptBatch:
    """A batch of prompts.

    Attributes:
        records: this rank's prompts.
        index: the absolute position in the training stream (for resume).
        offset: position of ``records[0]`` in the step's global batch (over all ranks): rank r of W
            holds prompts ``[offset, offset + len(records))`` of the ``W x len(records)`` drawn.

    """

    records: list[Record]
    index: int = -1
    offset: int = 0

    def __len__(self) -> int:
        return len(self.records)


def reward_fields(records: list[Record], group: int) -> dict[str, list[Any]]:
    """Per-sample keyword lists for the reward: ``answer`` and every extra field, each repeated G times."""
    fields: dict[str, list[Any]] = {"answer": [r.answer for r in records for _ in range(group)]}
    for key in sorted({k for r in records for k in r.extra}):
        fields[key] = [r.extra.get(key) for r in records for _ in range(group)]
    return fields
