"""Whole runs under 2-process DDP, DeepSpeed ZeRO-2/3 and FSDP2 equal one process over the same global batch.

One process draws 4 prompts per step; two ranks draw 2 each, and the stream gives rank r slice r of
the same 4 (``PromptStream``). ``model.rollout.seed_per_prompt`` makes each completion's random
stream a function of its place in the global batch, not of the rank, so both runs sample the same
completions. Everything after sampling is the real training step: losses normalised over the
global batch, the all-reduced Gram and combiner, gradient clipping, AdamW, the LR schedule and the
entropy controller. Compared: the final weights (checkpoints) and, per step, the combiner's
coefficients and the metrics that are global by design (reward, accuracy, entropy, KL).
"""

from __future__ import annotations

import csv
import glob
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import CLI, ROOT, tiny_fit_args, tiny_sft_folder
from transformers import AutoModelForCausalLM

from cappo_pl.convert import checkpoint_state

STEPS = 3
GLOBAL_PROMPTS = 4
SAME = "--model.rollout.seed_per_prompt=true"


def _run(base, sft_cache, name, config, devices, strategy_args=(), port=None):
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
    }  # fmt: skip
    if port is not None:  # runs side by side: each its own rendezvous port
        env["MASTER_PORT"] = str(port)
    extra = [
        SAME, f"--trainer.devices={devices}", f"--data.prompts_per_step={GLOBAL_PROMPTS // devices}",
        f"--trainer.logger.init_args.name={name}", "--model.overlong.buffer_len=6", *strategy_args,
    ]  # fmt: skip
    args = [*CLI, *tiny_fit_args(f"configs/{config}", sft_cache, base, STEPS, extra)]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=500, cwd=base)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (log_dir,) = glob.glob(str(base / "runs" / name / "version_*"))
    rows = [r for r in csv.DictReader(open(os.path.join(log_dir, "metrics.csv"))) if r.get("train/reward/mean")]
    assert len(rows) == STEPS
    ckpt = os.path.join(log_dir, "checkpoints", "last.ckpt")
    state = {k: v.float() for k, v in checkpoint_state(ckpt).items() if k.startswith(("policy.", "critic."))}
    return rows, state, ckpt


def _zero(stage):
    return (
        "--config", os.path.join(ROOT, "configs", "strategy", f"deepspeed_zero{stage}.yaml"),
        "--trainer.accelerator=cpu", "--trainer.strategy.class_path=deepspeed_cpu.DeepSpeedOnCPU",
        f"--trainer.strategy.stage={stage}",
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sft_cache):
    base = tmp_path_factory.mktemp("dp_equal")
    runs = {}
    # cappo.yaml: MGDA on the exact parameter-space Gram (one all-reduced backward per objective),
    # the entropy controller and the KL term; grpo.yaml: the weighted sum, under DeepSpeed as well.
    runs["cappo", 1] = ("cappo1", "cappo.yaml", 1)
    ddp = ("--config", os.path.join(ROOT, "configs", "strategy", "ddp.yaml"), "--trainer.accelerator=cpu")
    runs["cappo", "ddp"] = ("cappo_ddp", "cappo.yaml", 2, ddp)
    runs["grpo", 1] = ("grpo1", "grpo.yaml", 1)
    runs["grpo", "ddp"] = ("grpo_ddp", "grpo.yaml", 2, ddp)
    for stage in (2, 3):
        runs["grpo", f"zero{stage}"] = (f"grpo_zero{stage}", "grpo.yaml", 2, _zero(stage))
    fsdp = ("--config", os.path.join(ROOT, "configs", "strategy", "fsdp.yaml"), "--trainer.accelerator=cpu")
    runs["grpo", "fsdp"] = ("grpo_fsdp", "grpo.yaml", 2, fsdp)
    # ppo_critic.yaml: GAE whitened over the global batch, the value loss normalised over it, the critic
    # trained and clipped on its own (under DDP it needs find_unused_parameters). One mini-batch per epoch
    # (2 epochs): with several, each rank shuffles its own rows into them, by design not one process's split.
    one = ("--model.ppo.minibatches=1",)
    runs["ppo_critic", 1] = ("critic1", "ppo_critic.yaml", 1, one)
    unused = (*ddp, "--trainer.strategy=ddp_find_unused_parameters_true", *one)
    runs["ppo_critic", "ddp"] = ("critic_ddp", "ppo_critic.yaml", 2, unused)
    runs["ppo_critic", "fsdp"] = ("critic_fsdp", "ppo_critic.yaml", 2, (*fsdp, *one))
    # LoRA: the reference is the base with adapters off; under FSDP the adapters are sharded with their layers
    lora = ("--model.policy.lora.r=4", "--model.optim.lr=0.01")
    runs["grpo_lora", 1] = ("lora1", "grpo.yaml", 1, lora)
    runs["grpo_lora", "fsdp"] = ("lora_fsdp", "grpo.yaml", 2, (*fsdp, *lora))
    # The first run alone (it may train the shared SFT warm start), then two at a time: a run spends most of
    # its time importing and starting up on one core, which the other run's work fills.
    first, *rest = runs
    out = {first: _run(base, sft_cache, *runs[first])}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(_run, base, sft_cache, *runs[key], port=29611 + i) for i, key in enumerate(rest)}
        out |= {key: future.result() for key, future in futures.items()}
    return out


@pytest.fixture(scope="module")
def sft_start(runs, sft_cache):
    model = AutoModelForCausalLM.from_pretrained(tiny_sft_folder(sft_cache))
    return {f"policy.{k}": v.float() for k, v in model.state_dict().items()}


GLOBAL_KEYS = ("train/reward/mean", "train/accuracy", "train/policy/entropy", "train/policy/kl_ref")


@pytest.mark.parametrize(
    "config,strategy",
    [
        ("cappo", "ddp"), ("grpo", "ddp"), ("grpo", "zero2"), ("grpo", "zero3"), ("grpo", "fsdp"),
        ("ppo_critic", "ddp"), ("ppo_critic", "fsdp"), ("grpo_lora", "fsdp"),
    ],  # fmt: skip
)
def test_two_ranks_equal_one_process_over_the_same_global_batch(runs, sft_start, config, strategy):
    (rows1, state1, _), (rows2, state2, _) = runs[config, 1], runs[config, strategy]
    # the same completions: global reward/accuracy identical, entropy/KL up to float noise
    for r1, r2 in zip(rows1, rows2, strict=True):
        for key in GLOBAL_KEYS:
            if r1.get(key):
                assert float(r2[key]) == pytest.approx(float(r1[key]), rel=1e-4, abs=1e-6), key
        coefs = [k for k in r1 if k.startswith("train/combiner/c_") and r1[k]]
        assert coefs
        # the pre-clip gradient norms are global: they catch an error of scale, which AdamW's first steps,
        # the clipping and a weighted sum's coefficients would all hide
        for key in coefs + [k for k in ("train/grad_norm", "train/critic/grad_norm") if r1.get(k)]:
            assert float(r2[key]) == pytest.approx(float(r1[key]), rel=1e-4, abs=1e-6), key
    # and the same updates: after STEPS optimizer steps the weights agree to float noise, while they
    # moved from the SFT start by far more (Adam moves a weight by at most the summed warmup lr, 3.6e-4)
    assert state1.keys() == state2.keys()
    diff = max((state1[k] - state2[k]).abs().max().item() for k in state1)
    trained = [k for k in state1 if k in sft_start or "lora_B" in k]  # LoRA: B starts at 0 (A at random)
    moved = max((state1[k] - sft_start.get(k, 0)).abs().max().item() for k in trained)
    print(f"{config} {strategy}: max |w_1 - w_2| = {diff:.2e}, max |w_1 - w_sft| = {moved:.2e}")
    assert diff < 1e-5 and moved > 1e-4, (diff, moved)


def test_lora_under_fsdp_trains_adapters_only_and_to_hf_merges_them(runs, sft_start, sft_cache, tmp_path):
    from cappo_pl.cli import main
    from cappo_pl.models import LoRAConfig, add_lora

    _, state, ckpt = runs["grpo_lora", "fsdp"]
    assert all(torch.equal(v, sft_start[k.replace(".base_layer", "")]) for k, v in state.items() if "lora_" not in k)
    assert any(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)  # B starts at 0: trained
    base = tiny_sft_folder(sft_cache)
    main(["to-hf", "--ckpt", ckpt, "--base", base, "--out", str(tmp_path / "hf")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).state_dict()
    # independently: peft's own merge of the same adapters
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    peft = add_lora(model, LoRAConfig(r=4))
    model.load_state_dict({k.removeprefix("policy."): v for k, v in state.items()})
    expected = peft.merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-6, atol=1e-7)
