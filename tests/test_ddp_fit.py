"""Whole training runs under 2-process DDP (gloo, CPU) through the CLI: they finish and log what one process does."""

from __future__ import annotations

import csv
import glob
import os
import subprocess

import pytest
from conftest import CLI, ROOT, tiny_fit_args


def _fit(tmp_path, sft_cache, config, strategy, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    strategy_args = ["--trainer.devices=2", f"--trainer.strategy={strategy}", "--trainer.logger.init_args.name=ddp"]
    args = [*CLI, *tiny_fit_args(f"configs/{config}", sft_cache, tmp_path, 2, [*strategy_args, *extra])]
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


def test_two_node_simulation_one_process_per_node(tmp_path):
    """num_nodes=2, devices=1: each "node" is launched by hand with NODE_RANK, as a cluster launcher would.

    A fresh SFT cache: each node's local rank 0 trains the SFT warm start in ``prepare_data`` at the same
    time into the same (here shared) folder, which once left a folder without weights from global rank 1.
    """
    sft_cache = tmp_path / "sft"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = ["--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.strategy=ddp"]
    args = [
        *CLI,
        *tiny_fit_args("configs/grpo.yaml", sft_cache, tmp_path, 2, [*nodes, "--trainer.logger.init_args.name=nodes"]),
    ]
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "MASTER_ADDR": "127.0.0.1"}
    procs = [
        subprocess.Popen(
            args,
            env={**base, "MASTER_PORT": str(port), "NODE_RANK": str(r), "WORLD_SIZE": "2"},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    outs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outs[1][1]  # node 1's single process is global rank 1
    (log_dir,) = glob.glob(str(tmp_path / "runs" / "nodes" / "version_*"))  # rank 0 alone logs ...
    rows = list(csv.DictReader(open(os.path.join(log_dir, "metrics.csv"))))
    assert len([r for r in rows if r.get("train/reward/mean")]) == 2
    assert os.path.exists(os.path.join(log_dir, "checkpoints", "last.ckpt"))  # ... and saves the checkpoints


def test_sft_cache_written_on_a_non_zero_global_rank_is_complete(tmp_path, monkeypatch):
    """transformers writes model files on global rank 0 only; a node's local rank 0 must still write its cache."""
    import transformers.distributed.mixin as mixin

    from cappo_pl.data import SumTask
    from cappo_pl.models import SFTConfig, TinyModelConfig, load_pretrained
    from cappo_pl.sft import ensure_sft_checkpoint

    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    task = SumTask()
    tiny = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    sft = SFTConfig(steps=2, batch_size=8, eval_samples=1, cache_dir=str(tmp_path))
    folder = ensure_sft_checkpoint(tiny, sft, task.train_records(), task.val_records(), task.reward_fn(), log=print)
    assert (folder / "config.json").is_file()
    monkeypatch.undo()
    load_pretrained(folder)  # weights and tokenizer are all there


def test_an_incomplete_sft_cache_folder_is_replaced(tmp_path):
    from cappo_pl.data import SumTask
    from cappo_pl.models import SFTConfig, TinyModelConfig
    from cappo_pl.sft import ensure_sft_checkpoint, sft_cache_key

    task = SumTask()
    tiny = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    sft = SFTConfig(steps=2, batch_size=8, eval_samples=1, cache_dir=str(tmp_path))
    broken = tmp_path / sft_cache_key(tiny, sft, task.train_records())
    broken.mkdir()
    (broken / "sft_metrics.json").write_text('{"train_accuracy": 0, "val_accuracy": 0}')  # no weights
    folder = ensure_sft_checkpoint(tiny, sft, task.train_records(), task.val_records(), task.reward_fn(), log=print)
    assert folder == broken and (folder / "config.json").is_file()
