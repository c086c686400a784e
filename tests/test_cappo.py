"""CaPPO end to end on the built-in task: no silent MGDA stall, exact resume of the controller, SRR wiring."""

import csv
import glob
import math
import os

import pytest
import torch
import yaml

from cappo_pl.cli import main, merged_config
from cappo_pl.data.tasks import SumTask
from cappo_pl.models import load_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Large enough that SFT gives a non-zero reward (so the policy gradient is not identically zero and the
# stall question is real), small enough for CI: ~15 s of SFT, shared by the tests of this module.
SMALL = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.policy.tiny.hidden_size=64",
    "--model.policy.tiny.num_layers=2",
    "--model.policy.tiny.num_heads=2",
    "--model.policy.tiny.intermediate_size=128",
    "--model.policy.sft.steps=600",
    "--model.policy.sft.batch_size=32",
    "--model.policy.sft.eval_samples=2",
    "--data.prompts_per_step=8",
    "--model.rollout.group_size=8",
    "--model.val_samples=2",
]


@pytest.fixture(scope="module")
def small_sft(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sft_small"))


def _config(tmp_path, target_ratio=None, combiner=None, every_n=None) -> str:
    cfg = merged_config(os.path.join(ROOT, "configs", "cappo.yaml"))  # standalone: written elsewhere below
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("EntropyController") and target_ratio is not None:
            cb["init_args"]["target_ratio"] = target_ratio
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"] = {"every_n_train_steps": every_n or 1000, "save_top_k": -1, "save_last": True}
    if combiner is not None:
        cfg["model"]["combiner"] = combiner
    path = tmp_path / f"cappo_{len(list(tmp_path.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _fit(tmp_path, small_sft, config, name, steps, extra=()):
    main(
        ["fit", "--config", config, *SMALL, f"--model.policy.sft.cache_dir={small_sft}",
         f"--data.steps_per_epoch={steps}", f"--trainer.default_root_dir={tmp_path}",
         f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--trainer.logger.init_args.name={name}", *extra]
    )  # fmt: skip
    (log_dir,) = glob.glob(str(tmp_path / "runs" / name / "version_*"))
    with open(os.path.join(log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return log_dir, rows


def _train(rows):
    return [r for r in rows if r.get("train/reward/mean")]


def _updates(rows):
    """(norm ratio, cosine with the policy gradient, entropy weight) of updates with a non-zero policy gradient."""
    out = []
    for r in _train(rows):
        if r.get("train/grad/norm_policy") and float(r["train/grad/norm_policy"]) > 0:
            out.append(
                (
                    float(r["train/grad/combined_norm_ratio"]),
                    float(r["train/grad/cos_combined_policy"]),
                    float(r["train/objective/entropy/weight"]),
                )
            )
    return out


def test_cappo_update_does_not_stall_with_the_controller_active(tmp_path, small_sft):
    # target above the initial entropy: the entropy constraint is active (small weight, ~0.01) after step 0,
    # the MGDA-stall case (docs/cappo.md) where plain MGDA's direction shrinks to the small weighted entropy gradient
    _, rows = _fit(tmp_path, small_sft, _config(tmp_path, target_ratio=1.2), "cappo", steps=8)
    updates = _updates(rows)
    assert len(updates) >= 4 and any(w > 0 for _, _, w in updates)
    for ratio, cos, _ in updates:
        # rescale: first makes |d| = |w_policy g_policy| exactly; l2-normalised MGDA guarantees
        # cos(d, g_policy) >= |min-norm point of the unit gradients| > 0 unless Pareto-stationary
        assert ratio == pytest.approx(1.0, rel=1e-3)
        assert cos > 0.05
    # the same run with plain MGDA (no normalisation, no rescale) does stall: the floor is not vacuous
    plain = {"class_path": "cappo_pl.combiners.MGDA", "init_args": {"normalization": "none", "rescale": "none"}}
    _, rows = _fit(tmp_path, small_sft, _config(tmp_path, target_ratio=1.2, combiner=plain), "plain", steps=8)
    ratios = [ratio for ratio, _, w in _updates(rows) if w > 0]
    assert ratios and min(ratios) < 0.2


def test_resumed_cappo_run_continues_with_the_same_coefficient(tmp_path, small_sft):
    config = _config(tmp_path, target_ratio=1.2, every_n=2)
    full_dir, full = _fit(tmp_path, small_sft, config, "full", steps=4)
    ckpt = os.path.join(full_dir, "checkpoints", "epoch=0-step=2.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    (ctrl_state,) = [v for k, v in state["callbacks"].items() if "EntropyController" in k]
    assert ctrl_state["steps"] == 2 and ctrl_state["target"] > 0 and "integral" in ctrl_state
    _, resumed = _fit(tmp_path, small_sft, config, "resumed", steps=4, extra=[f"--ckpt_path={ckpt}"])
    keys = ["train/entropy_coef", "train/entropy_target", "train/objective/entropy/weight", "train/reward/mean"]
    keys += ["train/combiner/c_entropy", "train/grad/cos_combined_policy"]
    tail = [r for r in _train(full) if float(r["train/rl_step"]) >= 2]
    assert len(tail) == 2 and len(_train(resumed)) == 2
    for key in keys:
        assert [r[key] for r in tail] == [r[key] for r in _train(resumed)], key


def _independent_mean_logprobs(folder: str) -> list[float]:
    """Per-reference mean token logprob from full-vocabulary logits, one unpadded sequence at a time."""
    model, tok = load_pretrained(folder, "float32")
    model.eval()
    out = []
    for rec in SumTask().val_records():
        prompt = tok(rec.prompt)["input_ids"]
        for ref in rec.references:
            comp = tok(ref, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([prompt + comp])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            out.append(sum(float(logp[len(prompt) - 1 + t, c]) for t, c in enumerate(comp)) / len(comp))
    return out


def test_validation_srr_matches_an_independent_computation(tmp_path, small_sft):
    _, rows = _fit(tmp_path, small_sft, _config(tmp_path), "srr", steps=2)
    initial = [r for r in rows if r.get("val/srr") and not r.get("val/accuracy")]
    final = [r for r in rows if r.get("val/srr") and r.get("val/accuracy")]
    assert len(initial) == 1 and final
    (folder,) = glob.glob(os.path.join(small_sft, "*"))
    means = _independent_mean_logprobs(folder)
    assert len(means) == 18 * 12  # every held-out prompt's SFT references
    for tau, key in ((0.1, "val/srr"), (0.1, "val/srr@1e-01"), (0.01, "val/srr@1e-02")):
        want = sum(m >= math.log(tau) for m in means) / len(means)
        assert float(initial[0][key]) == pytest.approx(want, abs=1e-9), key
    assert float(initial[0]["val/srr_rel"]) == 1.0  # the initial policy against itself
    assert 0.0 <= float(final[-1]["val/srr"]) <= 1.0 and float(final[-1]["val/srr_rel"]) <= 1.0
