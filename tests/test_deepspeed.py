"""The real training step through DeepSpeed ZeRO-2 and ZeRO-3 engines, 2 processes on CPU (gloo).

Lightning refuses DeepSpeed on a CPU accelerator, so the runs use ``tests/deepspeed_cpu.py``: the same
strategy with only its CUDA checks lifted. What stays untested without a GPU: NCCL, CPU offload of a GPU
run, fp16/bf16 engines, and speed.
"""

from __future__ import annotations

import csv
import glob
import os
import subprocess

import pytest
import torch
from conftest import CLI, ROOT, assert_resumed_exactly, grpo_checkpointing_every, tiny_fit_args

pytest.importorskip("deepspeed")


GRPO = os.path.join(ROOT, "configs", "grpo.yaml")
# a loss that is NaN on rank 1 only, at the second update (RL step 1): every rank must skip that update
# (no backward, no engine step) and neither may hang
NAN_ON_RANK1_AT_STEP1 = '--model.objectives+={"class_path": "nan_objective.NaNOnce", "init_args": {"at_call": 2}}'


def _fit(tmp_path, sft_cache, stage, name, extra=(), config=GRPO, strategy_config=None):
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
    }  # fmt: skip
    strategy = [
        "--config", os.path.join(ROOT, "configs", "strategy", strategy_config or f"deepspeed_zero{stage}.yaml"),
        "--trainer.accelerator=cpu", "--trainer.strategy.class_path=deepspeed_cpu.DeepSpeedOnCPU",
        f"--trainer.strategy.stage={stage}",
        "--model.overlong.buffer_len=6",  # a reward signal for the barely trained model, so weights move
        f"--trainer.logger.init_args.name={name}",
    ]  # fmt: skip
    args = [*CLI, *tiny_fit_args(config, sft_cache, tmp_path, 2, [*strategy, *extra])]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=500, cwd=tmp_path)
    return proc


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, sft_cache):
    base = tmp_path_factory.mktemp("zero")
    runs = {}
    for stage in (2, 3):
        proc = _fit(base, sft_cache, stage, f"zero{stage}", [NAN_ON_RANK1_AT_STEP1])
        assert proc.returncode == 0, proc.stderr[-4000:]
        (log_dir,) = glob.glob(str(base / "runs" / f"zero{stage}" / "version_*"))
        runs[stage] = (log_dir, proc.stdout + proc.stderr)
    return runs


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_engines_run_the_training_step_with_two_ranks(zero_runs, stage):
    log_dir, out = zero_runs[stage]
    assert "initializing deepspeed distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in out
    rows = [r for r in csv.DictReader(open(os.path.join(log_dir, "metrics.csv"))) if r.get("train/reward/mean")]
    assert len(rows) == 2
    assert float(rows[0]["train/grad_norm"]) > 0  # the engine's own (pre-clip) norm
    # the update with a NaN loss on rank 1 was skipped (on every rank: the run finished), the first one was not
    assert [float(r["train/combiner/skipped_total"]) for r in rows] == [0.0, 1.0]
    assert [float(r["train/objective/nan_once/calls"]) for r in rows] == [1.0, 2.0]
    ckpt = os.path.join(log_dir, "checkpoints", "last.ckpt")
    assert os.path.isdir(ckpt)  # a sharded DeepSpeed checkpoint: one optimizer partition per rank
    shards = glob.glob(os.path.join(ckpt, "checkpoint", "*zero_pp_rank_*optim_states.pt"))
    assert sorted(os.path.basename(s).split("zero_pp_rank_")[1][0] for s in shards) == ["0", "1"], shards
    (states,) = glob.glob(os.path.join(ckpt, "checkpoint", "*model_states.pt"))[:1]
    ds_config = torch.load(states, map_location="cpu", weights_only=False)["ds_config"]
    assert ds_config["zero_optimization"]["stage"] == stage
    assert ds_config["gradient_clipping"] == 1.0  # model.ppo.clip_grad_norm reached the engine


def test_zero_checkpoints_convert_to_hf_folders_that_agree(zero_runs, sft_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    from cappo_pl.convert import checkpoint_state
    from cappo_pl.scoring import score_completions

    (base,) = [os.path.dirname(p) for p in glob.glob(os.path.join(sft_cache, "*", "config.json"))][:1]
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    logps = {}
    for stage, (log_dir, _) in zero_runs.items():
        ckpt = os.path.join(log_dir, "checkpoints", "last.ckpt")
        out = tmp_path / f"hf{stage}"
        from cappo_pl.cli import main

        main(["to-hf", "--ckpt", ckpt, "--base", base, "--out", str(out)])
        model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
        state = checkpoint_state(ckpt)
        for k, v in model.state_dict().items():  # the consolidated fp32 weights, all of them
            torch.testing.assert_close(v, state[f"policy.{k}"], rtol=0, atol=0)
        base_model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
        moved = any(not torch.equal(v, base_model.state_dict()[k]) for k, v in model.state_dict().items())
        assert moved  # two RL steps changed the weights, and the folder has the trained ones
        with torch.no_grad():
            logps[stage] = score_completions(model, ids, torch.ones_like(ids), 3).logp
    # ZeRO-2 keeps whole parameters, ZeRO-3 partitions them across ranks: the same run either way
    torch.testing.assert_close(logps[2], logps[3], atol=1e-4, rtol=1e-4)


def test_params_space_under_deepspeed_is_refused_at_startup(tmp_path, sft_cache):
    proc = _fit(tmp_path, sft_cache, 2, "params", ["--model.gradients.space=params", "--trainer.devices=1"])
    assert proc.returncode != 0
    assert "model.gradients.space: 'params'" in proc.stderr


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resume_from_a_sharded_checkpoint_is_exact(tmp_path, sft_cache, stage):
    path = grpo_checkpointing_every(tmp_path, 2)

    def run(name, extra=()):
        proc = _fit(tmp_path, sft_cache, stage, name, ["--data.steps_per_epoch=4", *extra], config=str(path))
        assert proc.returncode == 0, proc.stderr[-4000:]
        (log_dir,) = glob.glob(str(tmp_path / "runs" / name / "version_*"))
        return log_dir

    full = run("full")
    (mid,) = glob.glob(os.path.join(full, "checkpoints", "*step=2.ckpt"))
    assert os.path.isdir(mid)
    resumed = run("resumed", [f"--ckpt_path={mid}"])
    assert_resumed_exactly(full, resumed)


@pytest.mark.parametrize("stage,config", [(1, "deepspeed_zero1.yaml"), (3, "deepspeed_zero3_offload.yaml")])
def test_the_other_zero_configs_run(tmp_path, sft_cache, stage, config):
    """ZeRO-1, and ZeRO-3 with parameters and optimizer offloaded to the CPU (DeepSpeedCPUAdam, built on first use)."""
    proc = _fit(tmp_path, sft_cache, stage, "other", strategy_config=config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (log_dir,) = glob.glob(str(tmp_path / "runs" / "other" / "version_*"))
    rows = [r for r in csv.DictReader(open(os.path.join(log_dir, "metrics.csv"))) if r.get("train/reward/mean")]
    assert len(rows) == 2 and float(rows[0]["train/grad_norm"]) > 0
    (states,) = glob.glob(os.path.join(log_dir, "checkpoints", "last.ckpt", "checkpoint", "*model_states.pt"))[:1]
    zero = torch.load(states, map_location="cpu", weights_only=False)["ds_config"]["zero_optimization"]
    assert zero["stage"] == stage
    if "offload" in config:
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
