"""At the end of fit: a short summary table (start vs end) and where the logs went."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
from rich.console import Console
from rich.table import Table

from cappo_pl.constraints import PositiveInt, checked_init

ROWS = (
    ("reward (train)", "train/reward/mean"),
    ("accuracy (train)", "train/accuracy"),
    ("entropy (per token)", "train/policy/entropy"),
    ("KL to reference (k3)", "train/policy/kl_ref"),
    ("response length", "train/response_length/mean"),
    ("accuracy (val)", "val/accuracy"),
    ("SRR (val)", "val/srr"),
    ("SRR relative (val)", "val/srr_rel"),
)
SRR_KEYS = ("val/srr", "val/srr_rel")


class RunSummary(pl.Callback):
    """Collect key metrics per step and print start/end means when fit ends.

    The table is also written to ``summary.json`` in the first logger's log dir.

    Args:
        window: RL steps averaged at the start and at the end.

    """

    @checked_init
    def __init__(self, window: PositiveInt = 10) -> None:
        self.window = window
        self.history: dict[str, list[float]] = {}

    def _record(self, trainer) -> None:
        for _, key in ROWS:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.history.setdefault(key, []).append(float(value))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(trainer)
        initial = getattr(pl_module, "initial_srr", None) or {}
        for key in SRR_KEYS:  # the initial policy's SRR (RL step 0) is the "start" of the SRR rows
            if key in initial and key + "@val" not in self.history:
                self.history[key + "@val"] = [initial[key]]

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            for key in ("val/accuracy", *SRR_KEYS):
                value = trainer.callback_metrics.get(key)
                if value is not None:
                    self.history.setdefault(key + "@val", []).append(float(value))

    def summary(self) -> dict[str, dict[str, float]]:
        """``{label: {"start": .., "end": .., "steps": n}}``; NaN where never logged."""
        out = {}
        for label, key in ROWS:
            values = self.history.get(key + "@val") if key.startswith("val/") else self.history.get(key)
            values = values or []
            w = self.window if not key.startswith("val/") else 1
            mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
            out[label] = {"start": mean(values[:w]), "end": mean(values[-w:]), "points": len(values)}
        return out

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        data = self.summary()
        log_dir = trainer.loggers[0].log_dir if trainer.loggers else trainer.default_root_dir
        table = Table(
            title=f"run summary (mean of first/last {self.window} RL steps; val: first/last evaluation, "
            "SRR: initial policy/last evaluation)"
        )
        for col in ("metric", "start", "end"):
            table.add_column(col)
        fmt = lambda v: "n/a" if math.isnan(v) else f"{v:.4f}"  # noqa: E731
        for label, row in data.items():
            table.add_row(label, fmt(row["start"]), fmt(row["end"]))
        console = Console()
        console.print(table)
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            (Path(log_dir) / "summary.json").write_text(json.dumps(data, indent=2))
            console.print(f"logs: {log_dir} (metrics.csv, samples.jsonl, summary.json, config.yaml)")
        ckpt = getattr(trainer.checkpoint_callback, "dirpath", None)
        if ckpt:
            console.print(f"checkpoints: {ckpt}")
