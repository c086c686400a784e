"""Data: records, readers, tasks and the DataModule."""

from cappo_pl.data.datamodule import PromptStream, RLDataModule
from cappo_pl.data.paths import PathReward, PathTask
from cappo_pl.data.readers import read_records
from cappo_pl.data.records import PromptBatch, Record
from cappo_pl.data.skew import zipf_draw
from cappo_pl.data.tasks import FileTask, SumTask, Task, compositions

__all__ = [
    "FileTask",
    "PathReward",
    "PathTask",
    "PromptBatch",
    "PromptStream",
    "RLDataModule",
    "Record",
    "SumTask",
    "Task",
    "compositions",
    "read_records",
    "zipf_draw",
]
