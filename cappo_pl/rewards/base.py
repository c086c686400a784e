"""Reward functions: ``fn(prompts, completions, **fields) -> list[float] | Tensor``.

A reward is given in YAML as a ``class_path`` (a ``RewardFunction`` subclass), as
``"package.module:function"`` or as ``"path/to/file.py:function"``. Every call goes through
``call_reward``, which checks the result and names the function and the sample on failure.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cappo_pl.errors import RewardError

RewardFn = Callable[..., Any]


class RewardFunction:
    """Base class for rewards chosen by ``class_path``; implement ``__call__``."""

    def __call__(self, prompts: list[str], completions: list[str], **fields: list[Any]) -> list[float]:
        raise NotImplementedError


def resolve_reward(spec: RewardFunction | RewardFn | str) -> RewardFn:
    """Turn a reward spec into a callable.

    Args:
        spec: a callable, ``"module:function"`` or ``"path/file.py:function"``.

    Raises:
        RewardError: the module, file or attribute cannot be found.

    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise RewardError(f"reward {spec!r}: expected 'module:function' or 'path/file.py:function'")
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise RewardError(f"reward {spec!r}: file {path} not found")
        mod_spec = importlib.util.spec_from_file_location(f"cappo_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as err:
            raise RewardError(f"reward {spec!r}: importing {path} failed: {type(err).__name__}: {err}") from err
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise RewardError(f"reward {spec!r}: cannot import module {target!r} ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {attr!r} is not a callable in {target}")
    return fn


def reward_name(fn: RewardFn) -> str:
    """A readable name for error messages."""
    if hasattr(fn, "__qualname__"):
        return f"{getattr(fn, '__module__', '?')}.{fn.__qualname__}"
    return type(fn).__name__


def call_reward(
    fn: RewardFn, prompts: list[str], completions: list[str], fields: dict[str, Sequence[Any]], on_error: str = "raise"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Call a reward function and validate what it returns.

    Args:
        fn: the reward function.
        prompts, completions: N strings each.
        fields: extra per-sample fields (each a length-N sequence) passed as keyword arguments.
        on_error: ``"raise"`` (default) or ``"skip"``: with skip a non-finite reward marks the sample
            invalid instead of failing (a raising function or a wrong length always fails).

    Returns:
        ``(rewards (N,) float32, valid (N,) bool)``.

    Raises:
        RewardError: naming the function and the offending sample.

    """
    name = reward_name(fn)
    n = len(completions)
    try:
        out = fn(prompts, completions, **fields)
    except Exception as err:
        raise RewardError(
            f"reward function {name} raised {type(err).__name__}: {err} (batch of {n}, first prompt {prompts[0]!r})"
        ) from err
    values = out.detach().cpu().flatten().tolist() if isinstance(out, torch.Tensor) else out
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise RewardError(f"reward function {name} returned non-numeric values ({err})") from err
    if len(values) != n:
        raise RewardError(f"reward function {name} returned {len(values)} values for {n} completions")
    valid = torch.ones(n, dtype=torch.bool)
    for i, v in enumerate(values):
        if not math.isfinite(v):
            if on_error != "skip":
                raise RewardError(
                    f"reward function {name} returned {v} for sample {i} "
                    f"(prompt {prompts[i]!r}, completion {completions[i]!r})"
                )
            valid[i] = False
    rewards = torch.tensor([v if math.isfinite(v) else 0.0 for v in values], dtype=torch.float32)
    return rewards, valid
