"""Crash-safe checkpoints: atomic writes, safe loads, a graceful Ctrl-C (issue 14).

* ``AtomicCheckpointIO`` writes a checkpoint file to a temporary name next to it, fsyncs it and renames it into
  place, so a process killed mid-save leaves the previous file whole. Single-file checkpoints only: DeepSpeed and
  sharded FSDP write their folders through their own engines, not through a CheckpointIO.
* Loads are ``torch.load(weights_only=True)``: a checkpoint holds tensors and plain data, and a file whose pickle
  names any other global (``os.system``, ...) is refused, not executed. ``verify_checkpoint`` checks a
  ``--ckpt_path`` before anything is built or written and turns every failure into one line.
* ``GracefulInterrupt`` (``cappo_pl.callbacks.interrupt``): the first Ctrl-C / SIGTERM finishes the RL step,
  saves ``last.ckpt`` and stops; ``raise_if_interrupted`` then makes the CLI exit 130 saying how to resume.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import secrets
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cappo_pl.errors import CheckpointError, Interrupted

# A folder is a sharded checkpoint once its writer's last file exists: Lightning writes meta.pt after the FSDP
# shards, DeepSpeed writes `latest` after its own.
FOLDER_MARKERS = ("meta.pt", "latest")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6; mmap needs it


def _reason(err: BaseException) -> str:
    """The short, one-line cause of a failed ``torch.load``."""
    text = str(err)
    bad_global = re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(err, pickle.UnpicklingError) and bad_global:
        return f"refuses to unpickle global {bad_global.group(1)} (a checkpoint holds only tensors and plain data)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        # torch's advice paragraph first, the actual cause on its own line after it
        lines = [line for line in lines[1:] if not line.startswith(("Please file", "Check the documentation"))]
    cause = lines[0].split(". ")[0] if lines else ""
    if not isinstance(err, RuntimeError | pickle.UnpicklingError) or not cause:
        cause = f"{type(err).__name__}: {cause}".rstrip(": ")  # a bare KeyError's message is only the key
    return f"truncated or not a checkpoint ({cause[:160]})"


def _is_remote(path: str | Path) -> bool:
    return "://" in str(path)


def safe_load(path: str | Path, flag: str = "--ckpt_path", mmap: bool = False, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` whose every failure is a one-line CheckpointError.

    Args:
        path: a checkpoint file.
        flag: the option that named it, for the message (``--ckpt_path``, ``--ckpt``).
        mmap: map the file instead of reading it: tensors are then read lazily (cheap checks of big files).
        map_location: as for ``torch.load``.

    Raises:
        CheckpointError: missing, empty, truncated, not a torch file, or a pickle naming a non-allowed global.

    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{flag} {path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{flag} {path}: truncated or not a checkpoint (empty file)")
    with path.open("rb") as f:
        zipped = f.read(4) == _ZIP_MAGIC
    try:
        # garbage makes torch warn (odd pickle protocols) before failing: the one line below says it all
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # mmap needs the zip format; an older (pre-zip) torch file, or garbage, is read (and refused) plainly
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipped)
    except Exception as err:  # garbage fails in many ways (IndexError, KeyError, UnicodeDecodeError, ...)
        raise CheckpointError(f"{flag} {path}: {_reason(err)}") from None


def is_complete(path: Path) -> bool:
    """A checkpoint file, or a sharded folder whose writer wrote its last file (``FOLDER_MARKERS``)."""
    return path.is_file() or any((path / marker).is_file() for marker in FOLDER_MARKERS)


def _check_folder(path: Path, flag: str) -> None:
    if not is_complete(path):
        raise CheckpointError(
            f"{flag} {path}: a folder without {' or '.join(FOLDER_MARKERS)} (an incomplete or not a sharded checkpoint)"
        )


def verify_checkpoint(path: str | Path, flag: str = "--ckpt_path") -> dict[str, Any] | None:
    """Raise CheckpointError (one line naming ``path``) when ``path`` is not a loadable checkpoint.

    Returns the memory-mapped checkpoint of a file (None for a folder, a keyword or a URL).

    Cheap for big files: the file is memory-mapped, so only its pickle is read (and checked for globals other
    than tensors and plain data); tensor bytes are not. A sharded checkpoint folder (DeepSpeed, FSDP) passes when
    its writer's last file exists (``FOLDER_MARKERS``); its shards are not read. Lightning's own ``ckpt_path``
    keywords (``last``, ``best``, ``hpc``, ``registry...``) and remote URLs are left to Lightning.

    Raises:
        CheckpointError: missing, truncated, not a checkpoint, or a pickle naming a non-allowed global.

    """
    text = str(path)
    if text in ("last", "best", "hpc") or text.startswith("registry") or _is_remote(text):
        return None
    path = Path(path)
    if path.is_dir():
        _check_folder(path, flag)
        if (path / "meta.pt").is_file():  # FSDP: Lightning's state next to the shards (DeepSpeed's: its own format)
            safe_load(path / "meta.pt", flag, mmap=True)
        return None
    ckpt = safe_load(path, flag, mmap=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{flag} {path}: not a Lightning checkpoint (no state_dict)")
    return ckpt


def _fsync_dir(folder: Path) -> None:
    # the rename is durable only once the folder's entry is on disk; some filesystems cannot fsync a folder
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def partial_files(path: str | Path) -> list[Path]:
    """Temporary files of unfinished saves to ``path`` (a process killed while writing it leaves one)."""
    path = Path(path)
    return sorted(path.parent.glob(f"{_glob_escape(path.name)}.partial-*"))


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic and whose loads are ``weights_only`` (safe).

    A save writes ``<name>.partial-<pid>-<random>`` in the target's folder (not a ``*.ckpt`` name, so Lightning never
    takes it for a checkpoint), flushes and fsyncs it, renames it over the target and fsyncs the folder: the
    target is always the old or the new checkpoint, never half of one. Partial files that earlier, killed saves
    of the same target left behind are removed after the next successful one.

    Covers single-file checkpoints (single device, DDP, FSDP with ``save_distributed_checkpoint=False``).
    DeepSpeed and sharded FSDP write checkpoint folders through their own engines and do not call it: a kill
    during such a save can leave a half-written folder.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or _is_remote(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # the parent's errors and remote writes
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # pid and a random part: two writers sharing a folder (containers, both pid 1) never share a temp file
        tmp = path.with_name(f"{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            with tmp.open("wb") as f:
                self.write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # an exception (a second Ctrl-C) is not a kill: clean up now
            raise
        _fsync_dir(path.parent)
        for stale in partial_files(path):
            stale.unlink(missing_ok=True)

    def write(self, checkpoint: dict[str, Any], f: IO[bytes]) -> None:
        """Serialize ``checkpoint`` into the open temporary file (streamed: no second copy in memory)."""
        torch.save(checkpoint, f)

    def load_checkpoint(
        self, path: Any, map_location: Callable | Any = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        # weights_only is forced: a resumed checkpoint never runs code, whatever the caller asked
        if _is_remote(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return safe_load(path, map_location=map_location)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _is_xla(strategy: Any, accelerator: Any) -> bool:
    # XLA strategies need their own XLACheckpointIO
    name = strategy if isinstance(strategy, str) else type(strategy).__name__
    return "xla" in str(name).lower() or str(accelerator).lower() == "tpu"


def safe_trainer_kwargs(trainer_cfg: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Trainer keyword arguments with the project's checkpoint safety added.

    Adds ``AtomicCheckpointIO`` to ``plugins`` unless a CheckpointIO is configured already (as a plugin or on
    the strategy object), and a ``GracefulInterrupt`` callback unless one is listed.

    Args:
        trainer_cfg: the instantiated ``trainer`` config (LightningCLI's ``config_init.trainer``).
        kwargs: the arguments the CLI adds or overrides; they win over ``trainer_cfg``.

    """
    from cappo_pl.callbacks.interrupt import GracefulInterrupt

    def get(key: str) -> Any:
        return kwargs[key] if key in kwargs else trainer_cfg.get(key)

    out = dict(kwargs)
    plugins, strategy = _as_list(get("plugins")), get("strategy")
    has_io = any(isinstance(p, CheckpointIO) for p in plugins) or getattr(strategy, "_checkpoint_io", None)
    if not has_io and not _is_xla(strategy, get("accelerator")):
        out["plugins"] = [*plugins, AtomicCheckpointIO()]
    callbacks = _as_list(get("callbacks"))
    if not any(isinstance(c, GracefulInterrupt) for c in callbacks):
        out["callbacks"] = [*callbacks, GracefulInterrupt()]
    return out


def raise_if_interrupted(trainer: Any) -> None:
    """After ``fit``: raise Interrupted (one line: where the last good checkpoint is) if a signal stopped the run."""
    from cappo_pl.callbacks.interrupt import GracefulInterrupt

    for cb in getattr(trainer, "callbacks", []):
        if isinstance(cb, GracefulInterrupt) and cb.saved is not None:
            raise Interrupted(cb.message())
