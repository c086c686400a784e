"""Every N RL steps: a table of (prompt, completion, reward) to the console and the loggers."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
from rich.console import Console
from rich.table import Table

from cappo_pl.constraints import NonNegativeInt, checked_init


class SampleTable(pl.Callback):
    """Show and log a few of the step's samples.

    Written to the console (rich), to ``samples.jsonl`` in the log dir, to W&B as a table and to
    TensorBoard as text, whichever loggers are configured.

    Args:
        every_n_steps: RL steps between tables (0: never).
        console: also print to the console.

    """

    @checked_init
    def __init__(self, every_n_steps: NonNegativeInt = 25, console: bool = True) -> None:
        self.every_n_steps, self.console = every_n_steps, console

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.every_n_steps or batch.index % self.every_n_steps or not trainer.is_global_zero:
            return
        rows = getattr(pl_module, "last_samples", [])
        if not rows:
            return
        if self.console:
            table = Table(title=f"samples at RL step {batch.index}")
            for col in ("prompt", "completion", "reward"):
                table.add_column(col)
            for r in rows:
                table.add_row(r["prompt"], repr(r["completion"]), f"{r['reward']:.3f}")
            Console().print(table)
        for logger in trainer.loggers:
            log_dir = getattr(logger, "log_dir", None)
            if log_dir:
                path = Path(log_dir) / "samples.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a") as f:
                    for r in rows:
                        f.write(json.dumps({"rl_step": batch.index, **r}) + "\n")
            if hasattr(logger, "log_table"):  # WandbLogger
                logger.log_table(
                    "samples", columns=list(rows[0]), data=[list(r.values()) for r in rows], step=trainer.global_step
                )
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_text"):  # TensorBoard
                text = "\n".join(f"| {r['prompt']} | {r['completion']} | {r['reward']:.3f} |" for r in rows)
                exp.add_text("samples", "| prompt | completion | reward |\n|---|---|---|\n" + text, trainer.global_step)
