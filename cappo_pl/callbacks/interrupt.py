"""Ctrl-C / SIGTERM: finish the RL step, save ``last.ckpt``, stop; a second signal aborts at once."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from cappo_pl.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def checkpoint_dir(trainer: pl.Trainer) -> str:
    """Where the run's checkpoints go: the ModelCheckpoint's folder, else ``<log dir>/checkpoints``."""
    cb = trainer.checkpoint_callback
    if cb is not None and getattr(cb, "dirpath", None):
        return str(cb.dirpath)
    return os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")


def newest_checkpoint(folder: str) -> str | None:
    """The most recently written ``*.ckpt`` file or complete sharded folder in ``folder`` (None: none yet)."""
    from cappo_pl.checkpointing import is_complete

    found = [p for p in Path(folder).glob("*.ckpt") if is_complete(p)]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


class GracefulInterrupt(pl.Callback):
    """Stop a run cleanly on the first SIGINT (Ctrl-C) or SIGTERM; abort on the second.

    The first signal only sets a flag. At the end of the RL step that is running (``on_train_batch_end``), the
    ranks agree (one rank's signal stops them all), save ``last.ckpt`` in the checkpoint folder and stop the
    trainer; after ``fit`` ``cappo_pl.checkpointing.raise_if_interrupted`` makes the CLI exit 130 naming that
    file. Saving at a step boundary is what makes the resume exact: mid-step, the prompt stream's position and
    the weights disagree. A second signal raises ``Interrupted`` wherever the run is, naming the newest
    checkpoint on disk. Handlers are installed in the main thread only, from ``on_train_start`` (after
    Lightning's own SIGTERM handler, which this one replaces for the run), and restored when training ends.
    """

    def __init__(self) -> None:
        self.received: int | None = None  # the first signal's number
        self.saved: str | None = None
        self.steps_done = 0
        self.global_step = 0
        self._folder = ""
        self._verbose = True
        self._previous: dict[int, Any] = {}
        self._launcher: Any = None

    # ------------------------------------------------------------------ signal handling
    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works in the main thread only
        for sig in SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_first_signal)

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            # only while ours is installed: after Lightning's teardown the original handler is back already
            if signal.getsignal(sig) in (self._on_first_signal, self._on_second_signal):
                signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def _on_first_signal(self, signum: int, frame: Any) -> None:
        self.received = signum
        for sig in self._previous:
            signal.signal(sig, self._on_second_signal)
        if self._verbose:
            name = signal.Signals(signum).name
            print(f"\n{name}: stopping after this step and saving last.ckpt (again to abort now)", file=sys.stderr)

    def _on_second_signal(self, signum: int, frame: Any) -> None:
        self._restore()
        if self._launcher is not None and hasattr(self._launcher, "kill"):
            # the ranks this process launched would otherwise wait in a collective for rank 0 until a timeout
            self._launcher.kill(signal.SIGKILL)
        newest = newest_checkpoint(self._folder)
        where = f"newest checkpoint {newest}; resume with --ckpt_path {newest}" if newest else "no checkpoint saved"
        name = signal.Signals(signum).name
        raise Interrupted(f"aborted by a second {name} after {self.steps_done} RL steps (mid-step): {where}")

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.received, self.saved = None, None
        self._folder = checkpoint_dir(trainer)  # now: the log dir is a collective under DDP, a handler cannot ask
        self._verbose = trainer.is_global_zero
        self._launcher = trainer.strategy.launcher
        self._install()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self.steps_done = getattr(batch, "index", batch_idx) + 1
        self.global_step = trainer.global_step
        if self.saved is not None:
            return
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        path = os.path.join(self._folder, "last.ckpt")
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "save_last", False) and str(getattr(cb, "dirpath", "")) == self._folder:
                # part of the saved state: the resumed ModelCheckpoint goes on writing last.ckpt, not last-v1.ckpt
                cb.last_model_path = path
        trainer.save_checkpoint(path, weights_only=False)  # every rank: DeepSpeed and FSDP save collectively
        self.saved = path
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # stopping now, not after one more validation pass

    def message(self) -> str:
        """The one line the CLI prints after a stopped run."""
        return (
            f"interrupted after {self.steps_done} RL steps (global_step {self.global_step}): saved {self.saved}; "
            f"resume with --ckpt_path {self.saved}"
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.saved is None:
            return
        for cb in trainer.checkpoint_callbacks:
            # Runs before the checkpoint callbacks' own epoch-end (Lightning puts those last). They would save
            # again here and at train end, with the epoch marked done, and a resume from that file would skip
            # the rest of the epoch: this step boundary is saved already.
            if hasattr(cb, "_last_global_step_saved"):
                cb._last_global_step_saved = trainer.global_step
            if hasattr(cb, "_last_checkpoint_saved") and not cb._last_checkpoint_saved:
                cb._last_checkpoint_saved = self.saved

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()
