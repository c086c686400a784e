"""Whole training runs under 2-process DDP (gloo, CPU) through the CLI: they finish and log what one process does."""

from __future__ import annotations

import csv
import glob
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_ARGS


def _fit(tmp_path, sft_cache, config, strategy, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    args = [
        sys.executable, os.path.join(ROOT, "cli.py"), "fit", "--config", os.path.join(ROOT, "configs", config),
        *TINY_ARGS, f"--model.policy.sft.cache_dir={sft_cache}", "--data.steps_per_epoch=2",
        "--data.prompts_per_step=4", "--model.rollout.group_size=4", "--model.val_samples=2",
        "--trainer.devices=2", f"--trainer.strategy={strategy}", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.logger.init_args.name=ddp", *extra,
    ]  # fmt: skip
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    return proc


@pytest.mark.parametrize(
    "config,strategy,extra",
    [
        ("cappo.yaml", "ddp", ()),  # SRR references and the step-0 SRR: the step-0 value once hung under DDP
        ("ppo_critic.yaml", "ddp_find_unused_parameters_true", ("--model.overlong.buffer_len=6",)),
    ],
)
def test_two_process_ddp_run_finishes_and_logs(tmp_path, sft_cache, config, strategy, extra):
    proc = _fit(tmp_path, sft_cache, config, strategy, extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (log_dir,) = glob.glob(str(tmp_path / "runs" / "ddp" / "version_*"))
    rows = list(csv.DictReader(open(os.path.join(log_dir, "metrics.csv"))))
    assert len([r for r in rows if r.get("train/reward/mean")]) == 2
    assert any(r.get("val/srr") for r in rows)
    assert os.path.exists(os.path.join(log_dir, "checkpoints", "last.ckpt"))


def test_critic_under_plain_ddp_is_a_config_error(tmp_path, sft_cache):
    proc = _fit(tmp_path, sft_cache, "ppo_critic.yaml", "ddp")
    assert proc.returncode != 0
    assert "model.critic: under DDP set trainer.strategy=ddp_find_unused_parameters_true" in proc.stderr
