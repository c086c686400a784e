"""FSDP2 (``cappo_pl.strategies.FSDP``, configs/strategy/fsdp.yaml): the real training step, 2 processes on CPU (gloo).

``ModelParallelStrategy`` runs on a CPU accelerator as it is; the policy is sharded by
``RLModule.configure_model`` (``fully_shard`` on each decoder layer, then the root). Equality with one
process is in ``tests/test_dp_equality.py``. Not tested here: NCCL, FSDP mixed-precision policies, speed.
"""

from __future__ import annotations

import csv
import glob
import os
import subprocess

import pytest
import torch
from conftest import CLI, ROOT, assert_resumed_exactly, grpo_checkpointing_every, tiny_fit_args

from cappo_pl.convert import checkpoint_state


def _fit(tmp_path, sft_cache, name, extra=(), config="configs/grpo.yaml"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    args = [
        *CLI,
        *tiny_fit_args(config, sft_cache, tmp_path, 4, [
            "--config", os.path.join(ROOT, "configs", "strategy", "fsdp.yaml"), "--trainer.accelerator=cpu",
            "--data.prompts_per_step=2", "--model.overlong.buffer_len=6", f"--trainer.logger.init_args.name={name}",
            *extra,
        ]),
    ]  # fmt: skip
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=500, cwd=tmp_path)


def _rows(log_dir):
    return [r for r in csv.DictReader(open(os.path.join(log_dir, "metrics.csv"))) if r.get("train/reward/mean")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sft_cache):
    """4 steps with a checkpoint at step 2, and a run resumed from it."""
    base = tmp_path_factory.mktemp("fsdp")
    config = grpo_checkpointing_every(base, 2)
    out = {}
    for name, extra in [("full", ()), ("resumed", None)]:
        if extra is None:
            (mid,) = glob.glob(os.path.join(out["full"][0], "checkpoints", "*step=2.ckpt"))
            extra = (f"--ckpt_path={mid}",)
        proc = _fit(base, sft_cache, name, extra, str(config))
        assert proc.returncode == 0, proc.stderr[-4000:]
        (log_dir,) = glob.glob(str(base / "runs" / name / "version_*"))
        out[name] = (log_dir, proc.stdout + proc.stderr)
    return out


def test_fsdp_runs_the_training_step_on_two_ranks_with_sharded_checkpoints(runs):
    log_dir, out = runs["full"]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out
    rows = _rows(log_dir)
    assert len(rows) == 4 and all(float(r["train/grad_norm"]) > 0 for r in rows)
    ckpt = os.path.join(log_dir, "checkpoints", "last.ckpt")
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(ckpt, "*.distcp"))) == [
        "__0_0.distcp", "__1_0.distcp",
    ]  # fmt: skip


def test_fsdp_resume_from_a_sharded_checkpoint_is_exact(runs):
    assert_resumed_exactly(runs["full"][0], runs["resumed"][0])


def test_fsdp_checkpoint_converts_to_an_hf_folder_with_the_same_logits(runs, sft_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    from cappo_pl.cli import main

    (base,) = [os.path.dirname(p) for p in glob.glob(os.path.join(sft_cache, "*", "config.json"))][:1]
    ckpt = os.path.join(runs["full"][0], "checkpoints", "last.ckpt")
    main(["to-hf", "--ckpt", ckpt, "--base", base, "--out", str(tmp_path / "hf")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    state = checkpoint_state(ckpt)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[f"policy.{k}"], rtol=0, atol=0)
    reference = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    reference.load_state_dict({k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")})
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
        assert not torch.equal(model(ids).logits, AutoModelForCausalLM.from_pretrained(base)(ids).logits)


def test_params_space_under_fsdp_is_refused_at_startup(tmp_path, sft_cache):
    proc = _fit(tmp_path, sft_cache, "refused", ["--model.gradients.space=params", "--trainer.devices=1"])
    assert proc.returncode != 0
    assert "model.gradients.space: 'params'" in proc.stderr
