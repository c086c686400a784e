"""The DataModule: a resumable stream of prompt batches for training, fixed batches for validation."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl

from cappo_pl.constraints import PositiveInt, checked_init
from cappo_pl.data.readers import check_prompt_lengths
from cappo_pl.data.records import PromptBatch, Record
from cappo_pl.data.tasks import SumTask, Task
from cappo_pl.errors import ConfigError
from cappo_pl.seeds import derive_seed


class PromptStream:
    """Endless shuffled passes over the training records, cut into batches; resumable.

    Batch ``i`` is a pure function of ``(seed, i)``. The module reports each consumed batch with
    ``mark_consumed`` and the stream's ``state_dict`` holds that position, so Lightning's
    prefetching cannot make a resumed run skip or repeat a batch. One Lightning epoch is
    ``steps_per_epoch`` batches; iteration stops at the next epoch boundary.

    Under data parallelism (``world_size`` W > 1) every step draws one global batch of
    ``W x batch_size`` distinct prompts and rank r takes slice r: ranks train on different prompts,
    and the global batch is the one a single process with ``W x batch_size`` prompts per step draws.
    """

    def __init__(
        self,
        records: list[Record],
        batch_size: int,
        steps_per_epoch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size * world_size > len(records):
            raise ConfigError(
                f"data.prompts_per_step={batch_size} x {world_size} ranks is larger than the "
                f"{len(records)} training prompts"
            )
        self.records, self.batch_size, self.steps_per_epoch, self.seed = records, batch_size, steps_per_epoch, seed
        self.rank, self.world_size = rank, world_size
        self.position = 0

    def _slice(self, picks: list[int], index: int) -> PromptBatch:
        offset = self.rank * self.batch_size
        return PromptBatch([self.records[i] for i in picks[offset : offset + self.batch_size]], index, offset)

    def batch(self, index: int) -> PromptBatch:
        """The rank's part of the global batch at absolute stream position ``index``."""
        size = self.batch_size * self.world_size
        pass_id, slot = divmod(index, len(self.records) // size)
        order = list(range(len(self.records)))
        random.Random(derive_seed(self.seed, "prompt_order", pass_id)).shuffle(order)
        return self._slice(order[slot * size : (slot + 1) * size], index)

    def extra_batch(self, index: int, k: int) -> PromptBatch:
        """The rank's part of the ``k``-th (k >= 1) extra generation batch of step ``index`` (DAPO).

        A pure function of ``(seed, index, k)``: uniform prompts without replacement, drawn apart from
        the main order (which it does not advance), so a resumed run draws the same extras.
        """
        rng = random.Random(derive_seed(self.seed, "extra_prompts", index, k))
        return self._slice(rng.sample(range(len(self.records)), self.batch_size * self.world_size), index)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[PromptBatch]:
        end = (self.position // self.steps_per_epoch + 1) * self.steps_per_epoch
        for index in range(self.position, end):
            yield self.batch(index)

    def mark_consumed(self, index: int) -> None:
        """Record that batch ``index`` was trained on."""
        self.position = index + 1

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


class FixedBatches:
    """A fixed sequence of prompt batches (validation); one dataloader, not a list of them."""

    def __init__(self, batches: list[PromptBatch]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[PromptBatch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class RLDataModule(pl.LightningDataModule):
    """Prompts (with answers, metadata and SFT references) for RL.

    Args:
        task: where records and the reward come from (built-in ``SumTask`` by default, or ``FileTask``).
        prompts_per_step: prompts per RL step and rank (each gets ``model.rollout.group_size``
            completions); ranks draw distinct prompts, so a step's global batch is world size x this.
        steps_per_epoch: RL steps per Lightning epoch; total RL steps = this x ``trainer.max_epochs``.
        val_prompts: held-out prompts used in validation (None: all).
        val_batch_size: prompts per validation batch.
        max_prompt_tokens: a longer prompt is an error naming its file:line.
        seed: seed of the training order.

    """

    @checked_init
    def __init__(
        self,
        task: Task | None = None,
        prompts_per_step: PositiveInt = 16,
        steps_per_epoch: PositiveInt = 100,
        val_prompts: PositiveInt | None = None,
        val_batch_size: PositiveInt = 32,
        max_prompt_tokens: PositiveInt = 128,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.task = task if task is not None else SumTask()
        self.prompts_per_step, self.steps_per_epoch = prompts_per_step, steps_per_epoch
        self.val_prompts, self.val_batch_size = val_prompts, val_batch_size
        self.max_prompt_tokens, self.seed = max_prompt_tokens, seed
        self._checked = False
        self._stream: PromptStream | None = None

    def _tokenizer(self):
        module = self.trainer.lightning_module if self.trainer is not None else None
        return getattr(module, "tokenizer", None)

    def check_records(self, tokenizer=None) -> None:
        """Read and validate every train and val record (file:line errors), prompt lengths with ``tokenizer``."""
        train, val = self.task.train_records(), self.task.val_records()
        if tokenizer is not None:
            count = lambda text: len(tokenizer(text, add_special_tokens=True)["input_ids"])  # noqa: E731
            check_prompt_lengths(train + val, count, self.max_prompt_tokens)
            self._checked = True

    def checked_records(self, split: str) -> list[Record]:
        """Train or val records, validated (prompt token limit) on first use."""
        if not self._checked:
            self.check_records(self._tokenizer())
            self._checked = True
        return self.task.train_records() if split == "train" else self.task.val_records()

    def prepare_data(self) -> None:
        # Fail fast (before any model work) on a bad data file.
        self.checked_records("train")

    def setup(self, stage: str) -> None:
        self.checked_records("train")

    def train_dataloader(self) -> PromptStream:
        if self._stream is None:
            trainer = self.trainer
            rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
            self._stream = PromptStream(
                self.checked_records("train"), self.prompts_per_step, self.steps_per_epoch, self.seed, rank, world
            )
        return self._stream

    def val_records(self) -> list[Record]:
        """The held-out records validation uses (the first ``val_prompts``); batch ``index`` is the offset."""
        records = self.checked_records("val")
        return records if self.val_prompts is None else records[: self.val_prompts]

    def val_dataloader(self) -> FixedBatches:
        records = self.val_records()
        step = self.val_batch_size
        return FixedBatches([PromptBatch(records[i : i + step], i) for i in range(0, len(records), step)])
