"""Crash-safe checkpoints: atomic writes, safe loads, a graceful Ctrl-C (issue 14; stub being filled in)."""

from __future__ import annotations

from typing import Any


def safe_trainer_kwargs(trainer_cfg: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Trainer keyword arguments with the project's checkpoint safety added (atomic IO, interrupt handling)."""
    return kwargs


def verify_checkpoint(path: str) -> None:
    """Raise CheckpointError (one line naming ``path``) when ``path`` is not a loadable checkpoint."""


def raise_if_interrupted(trainer: Any) -> None:
    """After ``fit``: raise Interrupted (one line: where the last good checkpoint is) if a signal stopped the run."""
