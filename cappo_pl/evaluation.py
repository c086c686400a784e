"""Pass@k-aware evaluation: what ``model.evaluation`` configures and the baseline a run keeps.

Reward and accuracy cannot tell a policy that keeps the SFT policy's support from one that collapsed
onto a few answers it already produced. Three families of metrics can (docs/metrics.md, "Support and
diversity"):

- sampled, for every task: the unbiased pass@k of Chen et al. 2021 from the validation samples, the
  distinct correct completions per prompt and the unique ratio (``val/pass@<k>``, ...);
- exact, for tasks that enumerate the full set V(x) of correct answers (``valid_completions``):
  every answer is teacher-forced and validity, pass@k, distinct@k, coverage@k, answer entropy and
  support kept follow in closed form (``val/exact/*``, ``train_eval/exact/*`` on a fixed sample of
  training prompts);
- hidden-target pass@k: an evaluation verifier that accepts only a seeded subset S of V(x), never
  used for training rewards (``val/hidden/*``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Annotated

from annotated_types import Interval
from torch import Tensor

from cappo_pl.constraints import NonNegativeInt, PositiveInt, check_fields
from cappo_pl.metrics.hidden import HiddenTarget
from cappo_pl.seeds import derive_seed


@dataclass
class EvalConfig:
    """Support and diversity metrics in validation (``model.evaluation``)."""

    pass_ks: list[PositiveInt] | None = None
    """k of the sampled ``val/pass@<k>`` (each <= ``model.val_samples``); None: 1 and ``val_samples``."""
    exact: bool = True
    """Exact metrics when the task implements ``valid_completions`` (else a one-line note, sampled only)."""
    exact_ks: list[PositiveInt] = field(default_factory=lambda: [1, 8, 64])
    """k of ``val/exact/pass@<k>``, ``distinct@<k>``, ``coverage@<k>`` and ``val/hidden/pass@<k>`` (closed
    forms: any k)."""
    support_eps: list[Annotated[float, Interval(gt=0, le=1)]] = field(default_factory=lambda: [1e-3])
    """eps of ``val/exact/support_kept@<eps>``: of the answers with pi_SFT(y) >= eps, the fraction with pi(y) >= eps."""
    hidden: HiddenTarget | None = None
    """The hidden-target verifier (``RandomAnswers``, ``RareAnswers``, ``EdgeFailure``); None: no ``*/hidden/*``."""
    hidden_seed: int = 0
    """Seed of the hidden subsets (apart from ``model.seed``: runs with different seeds share S)."""
    train_prompts: NonNegativeInt = 32
    """Training prompts in the fixed ``train_eval`` sample (0: none); drawn once from ``hidden_seed``."""
    batch_size: PositiveInt = 512
    """Answers per teacher-forced forward."""

    def __post_init__(self) -> None:
        check_fields(self)

    def sampled_ks(self, val_samples: int) -> list[int]:
        """The sampled pass@k's k list (sorted, distinct)."""
        ks = self.pass_ks if self.pass_ks is not None else [1, val_samples]
        return sorted(set(ks))


def train_eval_rows(n_train: int, count: int, seed: int) -> list[int]:
    """The fixed sample of training prompts ``train_eval`` scores: ``count`` distinct indices, sorted."""
    rng = random.Random(derive_seed(seed, "train_eval_prompts"))
    return sorted(rng.sample(range(n_train), min(count, n_train)))


@dataclass
class PromptSet:
    """The enumerated answers of some prompts and what the initial policy gave them.

    Attributes:
        rows: index of each prompt in its split's records.
        sft_logp: ``sft_logp[i]`` (|V_i|,) float64 log pi_SFT(y) of every valid answer, the initial
            policy's (it cannot be recomputed once training has moved the policy: checkpointed).
        hidden: ``hidden[i]`` (|V_i|,) bool, the hidden-target subset S_i (None: no hidden target);
            drawn from the config on every start, not checkpointed.

    """

    rows: list[int]
    sft_logp: list[Tensor]
    hidden: list[Tensor] | None = None

    def state_dict(self) -> dict:
        return {"rows": self.rows, "sft_logp": self.sft_logp}

    @classmethod
    def from_state(cls, state: dict) -> PromptSet:
        return cls(state["rows"], state["sft_logp"])
