"""Tasks: where prompts, references and the reward come from.

``SumTask`` is the built-in task: "write N as a sum of k positive integers". Every prompt has many
valid completions (N - 1 for k = 2), so an RL policy that collapses onto a few of them loses
measurable support while keeping its reward. ``FileTask`` reads JSONL/Parquet files.
"""

from __future__ import annotations

import random
from itertools import combinations
from typing import Annotated, Literal

from annotated_types import Ge

from cappo_pl.constraints import NonNegativeInt, PositiveFloat, PositiveInt, checked_init
from cappo_pl.data.readers import read_records
from cappo_pl.data.records import Record
from cappo_pl.data.skew import zipf_draw
from cappo_pl.errors import ConfigError
from cappo_pl.rewards.base import RewardFn, RewardFunction, resolve_reward
from cappo_pl.rewards.builtin import sum_reward
from cappo_pl.seeds import derive_seed


class Task:
    """Base class of a task: train/val records and the reward.

    Two optional methods, looked up with ``hasattr`` (not defined here, so their absence means "not
    supported"):

    - ``valid_completions(record) -> list[str]``: enumerable tasks implement this; it returns the
      full set V(x) of correct completions of ``record`` (each one the reward scores 1.0), so the
      exact validity of a policy, the sum over V(x) of pi(y | x), can be measured.
    - ``sft_records() -> list[Record]``: the records the SFT warm start trains on when they differ
      from ``train_records()`` (e.g. extra auxiliary examples); without it SFT uses ``train_records()``.
    """

    def train_records(self) -> list[Record]:
        """Records the policy trains on."""
        raise NotImplementedError

    def val_records(self) -> list[Record]:
        """Held-out records (reward/accuracy and SRR)."""
        raise NotImplementedError

    def reward_fn(self) -> RewardFn:
        """The reward ``fn(prompts, completions, **fields)``."""
        raise NotImplementedError


def compositions(n: int, k: int) -> list[tuple[int, ...]]:
    """All ordered ways to write n as k positive integers (stars and bars), lexicographic."""
    out = []
    for cuts in combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        out.append(tuple(bounds[i + 1] - bounds[i] for i in range(k)))
    return out


class SumTask(Task):
    """Write N as a sum of ``n_terms`` positive integers: prompt ``"17="``, completion e.g. ``"9+8"``.

    N runs over ``[min_n, max_n]``; every ``val_every``-th N is held out for validation. Each prompt
    gets ``references_per_prompt`` SFT reference completions (seeded): distinct valid completions drawn
    uniformly (``reference_dist="uniform"``), or draws with replacement skewed by a Zipf law over a
    random ranking of all valid completions (``"zipf"``, see ``cappo_pl.data.skew.zipf_draw``).
    The task is enumerable: ``valid_completions(record)`` lists every composition.

    Args:
        min_n: smallest N (>= n_terms).
        max_n: largest N.
        n_terms: number of summands k.
        references_per_prompt: SFT reference completions per prompt (>= 8 recommended).
        val_every: every val_every-th N goes to validation. A divisor of 10 holds out whole last digits
            (5: every N ending in 4 or 9, never seen in training), which the tiny model does not
            generalize to (exact held-out validity ~0.4); 7 spreads them (~0.88; docs/lab.md).
        seed: seed of the reference draw.
        reference_dist: ``uniform`` (distinct, uniform) or ``zipf`` (skewed, with repeats).
        zipf_exponent: the Zipf exponent s of ``zipf`` (rank r drawn with probability ~ 1 / r**s).

    """

    @checked_init
    def __init__(
        self,
        min_n: PositiveInt = 10,
        max_n: PositiveInt = 99,
        n_terms: Annotated[int, Ge(2)] = 2,
        references_per_prompt: NonNegativeInt = 12,
        val_every: NonNegativeInt = 5,
        seed: int = 0,
        reference_dist: Literal["uniform", "zipf"] = "uniform",
        zipf_exponent: PositiveFloat = 1.0,
    ) -> None:
        if min_n < n_terms or max_n < min_n:
            raise ConfigError(f"data.task: need n_terms <= min_n <= max_n, got {n_terms}, {min_n}, {max_n}")
        self.min_n, self.max_n, self.n_terms = min_n, max_n, n_terms
        self.references_per_prompt, self.val_every, self.seed = references_per_prompt, val_every, seed
        self.reference_dist, self.zipf_exponent = reference_dist, zipf_exponent
        self._records = self._build()

    def _build(self) -> dict[str, list[Record]]:
        rng = random.Random(derive_seed(self.seed, "task_build"))
        split: dict[str, list[Record]] = {"train": [], "val": []}
        for i, n in enumerate(range(self.min_n, self.max_n + 1)):
            pool = compositions(n, self.n_terms)
            if self.reference_dist == "zipf":
                answers = ["+".join(map(str, p)) for p in pool]
                refs = zipf_draw(answers, self.references_per_prompt, self.zipf_exponent, rng)
            else:  # the original draw, unchanged (cached SFT checkpoints are keyed by these records)
                picks = rng.sample(pool, min(self.references_per_prompt, len(pool)))
                refs = ["+".join(map(str, p)) for p in picks]
            rec = Record(
                prompt=f"{n}=",
                references=refs,
                answer=str(n),
                extra={"target": n, "n_terms": self.n_terms},
                source=f"builtin:sum#{n}",
            )
            split["val" if self.val_every and i % self.val_every == self.val_every - 1 else "train"].append(rec)
        return split

    def train_records(self) -> list[Record]:
        return self._records["train"]

    def val_records(self) -> list[Record]:
        return self._records["val"]

    def reward_fn(self) -> RewardFn:
        return sum_reward

    def valid_completions(self, record: Record) -> list[str]:
        """Every correct completion of ``record``: all compositions of its N as ``"a+b"`` strings.

        These are the canonical forms (the references' format); ``sum_reward`` also accepts spacing
        and leading zeros (``" 09 + 8"``), which are not listed.
        """
        n, k = record.extra["target"], record.extra["n_terms"]
        return ["+".join(map(str, p)) for p in compositions(n, k)]


class FileTask(Task):
    """Records from local files (schema in ``cappo_pl.data.readers``).

    Args:
        train_file: .jsonl or .parquet with training prompts.
        val_file: held-out prompts (optional; without it validation is skipped).
        reward: ``RewardFunction`` (class_path), ``"module:function"`` or ``"path/file.py:function"``.

    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        reward: RewardFunction | str = "cappo_pl.rewards:exact_match",
    ) -> None:
        self.train_file, self.val_file, self.reward = train_file, val_file, reward
        self._cache: dict[str, list[Record]] = {}

    def _load(self, key: str, path: str | None) -> list[Record]:
        if path is None:
            return []
        if key not in self._cache:
            self._cache[key] = read_records(path)
        return self._cache[key]

    def train_records(self) -> list[Record]:
        return self._load("train", self.train_file)

    def val_records(self) -> list[Record]:
        return self._load("val", self.val_file)

    def reward_fn(self) -> RewardFn:
        return resolve_reward(self.reward)
