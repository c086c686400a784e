"""Crash-safe checkpoints (issue 14): a kill mid-save, refused checkpoint files, and a graceful Ctrl-C."""

from __future__ import annotations

import csv
import glob
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CLI, ROOT, checkpointing_every, layered_config, tiny_fit_args

from cappo_pl.checkpointing import AtomicCheckpointIO, partial_files, safe_load, safe_trainer_kwargs, verify_checkpoint
from cappo_pl.cli import main
from cappo_pl.errors import CheckpointError, Interrupted

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}


def _log_dir(root: Path, name: str) -> str:
    (log_dir,) = glob.glob(str(root / "runs" / name / "version_*"))
    return log_dir


def _rows(log_dir: str) -> list[dict]:
    return [r for r in csv.DictReader(open(os.path.join(log_dir, "metrics.csv"))) if r.get("train/reward/mean")]


def _policy(ckpt: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in safe_load(ckpt)["state_dict"].items() if k.startswith("policy.")}


def _start(args: list[str], cwd: Path, log: str) -> subprocess.Popen:
    # output to files: a pipe nobody reads would block the run once full
    out = open(cwd / f"{log}.out", "w")  # noqa: SIM115
    err = open(cwd / f"{log}.err", "w")  # noqa: SIM115
    return subprocess.Popen([*CLI, *args], env=ENV, cwd=cwd, stdout=out, stderr=err)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 400) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before {path.name} appeared"
        assert time.monotonic() < end, f"no {path} after {timeout} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def full(tmp_path_factory, sft_cache):
    """An uninterrupted 4-step run with a checkpoint at every step: ``(root, log_dir, config)``."""
    root = tmp_path_factory.mktemp("ckpt")
    config = str(checkpointing_every(root, 1))
    main(tiny_fit_args(config, sft_cache, root, 4, ["--trainer.logger.init_args.name=full"]))
    return root, _log_dir(root, "full"), config


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_and_the_resume_is_exact(full, sft_cache):
    root, full_dir, config = full
    marker = root / "half_written"
    plugin = {"class_path": "slow_io.StallingCheckpointIO", "init_args": {"marker": str(marker), "global_step": 2}}
    args = tiny_fit_args(config, sft_cache, root, 4, ["--trainer.logger.init_args.name=killed"])
    proc = _start([*args, f"--trainer.plugins={json.dumps(plugin)}"], root, "killed")
    try:
        _wait_for(marker, proc)  # half of last.ckpt's step-2 bytes are in its temporary file
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()
    ckpts = Path(_log_dir(root, "killed")) / "checkpoints"
    last = ckpts / "last.ckpt"
    (partial,) = partial_files(last)
    assert partial.name.startswith(f"last.ckpt.partial-{proc.pid}-")
    verify_checkpoint(last)
    assert safe_load(last)["global_step"] == 1  # the step-1 file, whole
    assert safe_load(ckpts / "epoch=0-step=2.ckpt")["global_step"] == 2  # saved just before

    main(tiny_fit_args(config, sft_cache, root, 4, ["--trainer.logger.init_args.name=resumed", f"--ckpt_path={last}"]))
    resumed_dir = _log_dir(root, "resumed")
    a, b = _rows(full_dir), _rows(resumed_dir)
    assert [r["train/rl_step"] for r in b] == ["1.0", "2.0", "3.0"]
    assert [r["train/reward/mean"] for r in a[1:]] == [r["train/reward/mean"] for r in b]
    wa = _policy(os.path.join(full_dir, "checkpoints", "last.ckpt"))
    wb = _policy(os.path.join(resumed_dir, "checkpoints", "last.ckpt"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _same(a, b) -> bool:
    """Equal nested checkpoint contents (tensors bit for bit)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _bad_checkpoint(kind: str, full_dir: str, tmp_path: Path) -> Path:
    path = tmp_path / "bad" / "last.ckpt"
    path.parent.mkdir()
    good = Path(full_dir, "checkpoints", "last.ckpt").read_bytes()
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "garbage":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "tampered":
        torch.save({"state_dict": {}, "global_step": 1, "x": _Evil(str(tmp_path / "pwned"))}, path)
    return path  # "missing": not written


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


BAD = {
    "truncated": "truncated or not a checkpoint (PytorchStreamReader failed reading zip archive",
    "garbage": "truncated or not a checkpoint (",
    "tampered": "refuses to unpickle global posix.system",
    "missing": "no such checkpoint file",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_checkpoint_is_one_line_before_anything_is_written(kind, full, sft_cache, tmp_path, capsys):
    root, full_dir, config = full
    ckpt = _bad_checkpoint(kind, full_dir, tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(BAD[kind])):
        verify_checkpoint(ckpt)
    before = _tree(tmp_path)
    for args, flag in [
        (tiny_fit_args(config, sft_cache, tmp_path, 4, [f"--ckpt_path={ckpt}"]), "--ckpt_path"),
        (["to-hf", "--ckpt", str(ckpt), "--base", sft_cache, "--out", str(tmp_path / "hf")], "--ckpt"),
    ]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {flag} {ckpt}: {err.split(': ', 2)[2]}" and "\n" not in err, err
        assert BAD[kind] in err
    assert _tree(tmp_path) == before  # no run folder, no HF folder
    assert not (tmp_path / "pwned").exists()


def test_loads_through_the_plugin_refuse_code_and_saves_clean_up_old_partials(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    stale = tmp_path / "last.ckpt.partial-999999"  # a save killed earlier
    stale.write_bytes(b"half")
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, path)
    assert not stale.exists() and sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    assert io.load_checkpoint(path)["global_step"] == 3
    torch.save({"state_dict": {}, "x": _Evil(str(tmp_path / "pwned"))}, path)
    with pytest.raises(CheckpointError, match="refuses to unpickle global posix.system"):
        io.load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    os.mkdir(tmp_path / "sharded.ckpt")  # a folder is accepted once its writer finished (marker file)
    with pytest.raises(CheckpointError, match="folder without meta.pt or latest"):
        verify_checkpoint(tmp_path / "sharded.ckpt")
    (tmp_path / "sharded.ckpt" / "meta.pt").write_bytes(b"")  # FSDP's meta.pt is loaded (weights_only) too
    with pytest.raises(CheckpointError, match="meta.pt: truncated or not a checkpoint"):
        verify_checkpoint(tmp_path / "sharded.ckpt")
    torch.save({"global_step": 3}, tmp_path / "sharded.ckpt" / "meta.pt")
    verify_checkpoint(tmp_path / "sharded.ckpt")
    (tmp_path / "ds.ckpt").mkdir()  # DeepSpeed: its `latest` marker only (the shards are DeepSpeed's to read)
    (tmp_path / "ds.ckpt" / "latest").write_text("checkpoint")
    verify_checkpoint(tmp_path / "ds.ckpt")


def test_safe_trainer_kwargs_keep_a_configured_checkpoint_io_and_add_the_interrupt_callback_once():
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from lightning.pytorch.strategies import DDPStrategy

    from cappo_pl.callbacks import GracefulInterrupt

    out = safe_trainer_kwargs({"callbacks": None}, {})
    assert [type(p) for p in out["plugins"]] == [AtomicCheckpointIO]
    assert [type(c) for c in out["callbacks"]] == [GracefulInterrupt]
    mine = TorchCheckpointIO()
    assert "plugins" not in safe_trainer_kwargs({"plugins": mine}, {})  # the configured one stays alone
    assert "plugins" not in safe_trainer_kwargs({"strategy": DDPStrategy(checkpoint_io=mine)}, {})
    cb = GracefulInterrupt()
    assert "callbacks" not in safe_trainer_kwargs({"callbacks": [cb]}, {})


def test_a_second_signal_aborts_at_once_naming_the_newest_checkpoint(tmp_path):
    from cappo_pl.callbacks import GracefulInterrupt

    (tmp_path / "epoch=0-step=1.ckpt").write_bytes(b"x")
    before = signal.getsignal(signal.SIGINT)
    cb = GracefulInterrupt()
    cb._folder, cb.steps_done = str(tmp_path), 1
    cb._install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: only a flag
        time.sleep(0.01)
        assert cb.received == signal.SIGINT
        with pytest.raises(Interrupted, match=r"aborted by a second SIGINT after 1 RL steps .*epoch=0-step=1\.ckpt"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        cb._restore()
    assert signal.getsignal(signal.SIGINT) == before


def test_ctrl_c_finishes_the_step_saves_last_ckpt_and_exits_130(tmp_path, sft_cache):
    callbacks = layered_config("grpo.yaml")["trainer"]["callbacks"]
    for cb in callbacks:  # a checkpoint every step (the signal's cue), and last.ckpt as configs/ have it
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"] = {"every_n_train_steps": 1, "save_top_k": -1, "save_last": True, "dirpath": None}
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump({"base": os.path.join(ROOT, "configs", "grpo.yaml"), "trainer": {"callbacks": callbacks}})
    )
    steps = 40
    proc = _start(
        tiny_fit_args(str(config), sft_cache, tmp_path, steps, ["--trainer.logger.init_args.name=c"]), tmp_path, "c"
    )
    try:
        _wait_for(tmp_path / "runs" / "c" / "version_0" / "checkpoints" / "epoch=0-step=1.ckpt", proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=300) == 130
    finally:
        proc.kill()
    err = (tmp_path / "c.err").read_text()
    assert "SIGINT: stopping after this step" in err
    last_line = err.strip().splitlines()[-1]
    found = re.fullmatch(
        r"error: interrupted after (\d+) RL steps \(global_step (\d+)\): saved (\S+); resume with --ckpt_path \3",
        last_line,
    )
    assert found, last_line
    n, path = int(found.group(1)), found.group(3)
    assert Path(path).name == "last.ckpt" and 1 <= n < steps
    last = safe_load(path)
    assert last["global_step"] == int(found.group(2)) == n
    # the same state ModelCheckpoint saved at that step boundary (the files test_train resumes from exactly): not
    # re-saved at epoch or train end with the epoch marked done, which a resume would skip the rest of
    step_n = safe_load(Path(path).with_name(f"epoch=0-step={n}.ckpt"))
    assert _same({**last, "callbacks": None}, {**step_n, "callbacks": None})
    assert sorted(p.name for p in Path(path).parent.iterdir()) == sorted(
        ["last.ckpt", *(f"epoch=0-step={i}.ckpt" for i in range(1, n + 1))]
    )  # no last-v1.ckpt, no partial file
