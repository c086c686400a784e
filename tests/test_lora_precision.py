"""LoRA (adapters only train; the reference is the base with adapters off), HF export, gradient
checkpointing and mixed precision."""

import csv
import glob
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from cappo_pl.callbacks import export_hf
from cappo_pl.cli import main
from cappo_pl.errors import ConfigError
from cappo_pl.models import (
    LoRAConfig,
    TinyModelConfig,
    add_lora,
    build_char_tokenizer,
    build_tiny_model,
    enable_gradient_checkpointing,
)
from cappo_pl.scoring import score_completions

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def _model():
    tok = build_char_tokenizer()
    return build_tiny_model(TINY, tok), tok


def _batch(tok):
    enc = tok(["12=", "3+4="], padding=True, padding_side="left", return_tensors="pt")
    comp = torch.tensor([[5, 6, 7], [8, 9, 10]])
    return torch.cat([enc["input_ids"], comp], 1), torch.cat([enc["attention_mask"], torch.ones_like(comp)], 1)


def test_lora_trains_adapters_only_and_adapters_off_is_the_base(tmp_path):
    model, tok = _model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = _batch(tok)
    with torch.no_grad():
        before = score_completions(model, ids, mask, 3).logp
    peft = add_lora(model, LoRAConfig(r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (-score_completions(model, ids, mask, 3).logp.mean()).backward()
        opt.step()
    with torch.no_grad():
        after = score_completions(model, ids, mask, 3).logp
        with peft.disable_adapter():
            off = score_completions(model, ids, mask, 3).logp
    assert (after - before).abs().max() > 1e-3  # the adapters changed the policy ...
    torch.testing.assert_close(off, before, atol=1e-6, rtol=0)  # ... and switching them off gives the base back
    for name, value in model.state_dict().items():  # the base weights themselves never moved
        plain = name.replace("base_layer.", "")
        if "lora_" not in name:
            assert torch.equal(value, base[plain]), name
    out = export_hf(model, tok, tmp_path / "hf", peft)
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert not any("lora" in k for k in loaded.state_dict())
    with torch.no_grad():
        exported = score_completions(loaded, ids, mask, 3).logp
    torch.testing.assert_close(exported, after, atol=1e-5, rtol=1e-5)  # merged weights = the adapted policy
    assert any(isinstance(m, torch.nn.Module) and "lora_A" in n for n, m in model.named_modules())  # copy merged


def test_bad_lora_target_is_a_config_error():
    model, _ = _model()
    with pytest.raises(ConfigError, match="model.policy.lora.target_modules"):
        add_lora(model, LoRAConfig(target_modules=["no_such_proj"]))


def test_gradient_checkpointing_recomputes_layers_in_eval_mode_with_identical_gradients():
    model, tok = _model()
    ids, mask = _batch(tok)
    layer = model.model.layers[0]
    calls = []
    # attention runs early in the layer: the recompute (which stops once it has what the backward needs) reruns it
    layer.self_attn.register_forward_hook(lambda *a: calls.append(1))

    def grads():
        model.zero_grad()
        calls.clear()
        score_completions(model, ids, mask, 3).logp.sum().backward()
        return [p.grad.clone() for p in model.parameters()], len(calls)

    model.eval()
    plain, n_plain = grads()
    assert enable_gradient_checkpointing(model) == 2
    ckpt, n_ckpt = grads()
    assert n_plain == 1 and n_ckpt == 2  # the layer's forward ran again in the backward pass
    assert not layer.mlp.training and not layer.self_attn.training  # dropout stays off
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _rows(log_dir):
    return [r for r in csv.DictReader(open(os.path.join(log_dir, "metrics.csv"))) if r.get("train/reward/mean")]


def _run(cli_args, tmp_path, name, extra, steps=3, config="configs/grpo.yaml"):
    main(cli_args(config=config, steps=steps, extra=[f"--trainer.logger.init_args.name={name}", *extra]))
    (log_dir,) = glob.glob(str(tmp_path / "runs" / name / "version_*"))
    return log_dir


def test_lora_run_uses_the_base_as_reference_and_exports_a_merged_folder(cli_args, tmp_path, sft_cache):
    lora = [
        "--model.policy.lora.r=4",
        "--model.optim.lr=0.01",
        "--model.overlong.buffer_len=6",  # the barely trained model earns no task reward: lengths give a signal
        "--trainer.callbacks+=cappo_pl.callbacks.ExportHF",
        "--model.policy.gradient_checkpointing=true",
    ]
    log_dir = _run(cli_args, tmp_path, "lora", lora)
    rows = _rows(log_dir)
    # the adapters start at B = 0: the first step's pi_old IS the base model, so its KL to the reference is 0
    assert float(rows[0]["train/policy/kl_ref"]) == 0.0
    assert float(rows[-1]["train/policy/kl_ref"]) > 0.0
    sd = torch.load(os.path.join(log_dir, "checkpoints", "last.ckpt"), weights_only=False)["state_dict"]
    assert any("lora_A" in k for k in sd)
    one = _run(cli_args, tmp_path, "lora1", lora[:3], steps=1)
    sd1 = torch.load(os.path.join(one, "checkpoints", "last.ckpt"), weights_only=False)["state_dict"]
    assert all(torch.equal(sd[k], sd1[k]) for k in sd if k.startswith("policy.") and "lora_" not in k)
    assert any(not torch.equal(sd[k], sd1[k]) for k in sd if "lora_B" in k)
    loaded = AutoModelForCausalLM.from_pretrained(os.path.join(log_dir, "hf_export"), local_files_only=True)
    assert not any("lora" in k for k in loaded.state_dict())
    # `to-hf` merges the checkpoint's adapters itself (W0 + alpha/r B A): the same weights as peft's merge
    from cappo_pl.cli import main

    (base,) = [os.path.dirname(p) for p in glob.glob(os.path.join(sft_cache, "*", "config.json"))][:1]
    main(["to-hf", "--ckpt", os.path.join(log_dir, "checkpoints", "last.ckpt"), "--base", base,
          "--out", str(tmp_path / "to_hf")])  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "to_hf", local_files_only=True).state_dict()
    assert merged.keys() == loaded.state_dict().keys()
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(merged[k], v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_mixed_precision_runs(cli_args, tmp_path, precision):
    log_dir = _run(cli_args, tmp_path, precision, [f"--trainer.precision={precision}"], steps=2)
    rows = _rows(log_dir)
    assert len(rows) == 2
    for key in ("train/policy/entropy", "train/policy/kl_ref", "train/grad_norm"):
        assert all(math.isfinite(float(r[key])) for r in rows), key


def test_gradient_checkpointing_survives_sampling():
    """The sampler switches the model to eval and back; the checkpointing flags must come back with it."""
    from cappo_pl.rollout import RolloutConfig, sample

    model, tok = _model()
    model.eval()
    enable_gradient_checkpointing(model)
    enc = tok(["12="], return_tensors="pt")
    sample(model, enc["input_ids"], enc["attention_mask"], RolloutConfig(group_size=2, max_new_tokens=3),
           tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(0))  # fmt: skip
    assert all(layer.training for layer in model.model.layers)
    assert not model.training and not model.model.layers[0].self_attn.training


def test_rollout_waits_for_every_rank_when_asked():
    from cappo_pl.rollout import RolloutConfig, sample

    model, tok = _model()
    enc = tok(["12="], return_tensors="pt")
    cfg = RolloutConfig(group_size=2, max_new_tokens=6, temperature=1e-4)  # greedy: a known first token
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    first = int(sample(model, enc["input_ids"], enc["attention_mask"], cfg, -1, tok.pad_token_id, gen())
                .completion_ids[0, 0])  # fmt: skip
    alone = sample(model, enc["input_ids"], enc["attention_mask"], cfg, first, tok.pad_token_id, gen())
    assert alone.completion_ids.shape[1] == 1  # every row ends at once (its first token is "EOS")
    asked = []

    def others_not_done(done):  # another rank is still sampling: this one must keep stepping
        asked.append(done)
        return False

    synced = sample(model, enc["input_ids"], enc["attention_mask"], cfg, first, tok.pad_token_id, gen(),
                    others_not_done)  # fmt: skip
    assert synced.completion_ids.shape[1] == 6 and asked == [True] * 6
    assert synced.completion_mask[:, 1:].sum() == 0  # the extra steps are padding
