"""The lab metrics inside a run: sampled pass@k, exact and hidden-target metrics, quantile SRR thresholds.

One short run on a small enumerable SumTask (module fixture) is checked against plain recomputations
from the policy the run ended with; the failure modes (a task that cannot enumerate, k above the
samples, a bad quantile) are one-line errors or notes.
"""

import csv
import glob
import math
import os

import pytest
import torch
from conftest import ROOT, tiny_fit_args

from cappo_pl.cli import build_cli, main
from cappo_pl.data import SumTask
from cappo_pl.errors import ConfigError
from cappo_pl.metrics.exact import exact_prompt_metrics

LAB = [
    "--data.task=cappo_pl.data.SumTask",
    "--data.task.min_n=4",
    "--data.task.max_n=24",
    "--data.task.reference_dist=zipf",
    "--data.task.references_per_prompt=16",
    "--model.val_samples=4",
    "--model.evaluation.pass_ks=[1,2,4]",
    "--model.evaluation.exact_ks=[1,8]",
    "--model.evaluation.train_prompts=3",
    "--model.evaluation.hidden=cappo_pl.metrics.RandomAnswers",
    "--model.evaluation.hidden.fraction=0.5",
    "--model.evaluation.support_eps=[0.01]",
    "--model.srr.thresholds=[quantile:0.25,0.1]",
    "--trainer.val_check_interval=1.0",
    "--data.val_batch_size=2",  # several validation batches: their rows must line up with the scored answers
]


def _rows(log_dir):
    with open(os.path.join(log_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def lab_cache(tmp_path_factory):
    """This file's own SFT cache (its tasks differ from the shared cache's default SumTask)."""
    return str(tmp_path_factory.mktemp("lab_sft"))


@pytest.fixture(scope="module")
def lab_run(lab_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    torch.set_num_threads(1)
    cli = build_cli(tiny_fit_args("configs/grpo.yaml", lab_cache, root, steps=2, extra=LAB))
    (log_dir,) = glob.glob(str(root / "runs" / "grpo" / "version_*"))
    return cli, _rows(log_dir), log_dir


def _values(rows, key):
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]


def test_every_key_is_logged_at_step_0_and_after_validation(lab_run):
    _, rows, _ = lab_run
    keys = [
        "val/pass@1", "val/pass@2", "val/pass@4", "val/distinct_correct", "val/unique_ratio",
        "val/exact/validity", "val/exact/pass@8", "val/exact/distinct@8", "val/exact/coverage@8",
        "val/exact/answer_entropy", "val/exact/support_kept@1e-02", "val/hidden/pass@8", "val/hidden/validity",
        "train_eval/exact/validity", "train_eval/exact/coverage@8", "train_eval/hidden/pass@1",
        "val/srr@q0.25", "val/srr_tau@q0.25", "val/srr@1e-01",
    ]  # fmt: skip
    for key in keys:
        assert _values(rows, key), key
    # the initial policy (step 0): support kept is 1 by definition
    (first,) = [r for r in rows if r.get("val/exact/validity") and r["step"] == "0" and not r.get("val/accuracy")]
    kept = float(first["val/exact/support_kept@1e-02"])
    assert kept == 1.0 or math.isnan(kept)  # NaN: no answer has pi_SFT >= eps
    assert not first.get("val/pass@1")  # sampled pass@k exists only where validation sampled


def test_exact_metrics_equal_a_plain_recomputation_from_the_final_policy(lab_run):
    cli, rows, _ = lab_run
    module, task = cli.model, cli.datamodule.task
    policy, tok = module.policy, module.tokenizer
    records = cli.datamodule.val_records()
    per_prompt = []
    with torch.no_grad():
        for i, rec in enumerate(records):
            logps = []
            for ans in task.valid_completions(rec):
                completion = tok(ans, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                ids = tok(rec.prompt)["input_ids"] + completion
                logits = policy(input_ids=torch.tensor([ids])).logits[0].double()
                logp = torch.log_softmax(logits, -1)
                start = len(tok(rec.prompt)["input_ids"])
                logps.append(sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids))))
            logp = torch.tensor(logps, dtype=torch.float64)
            sft = module.eval_sets["val"].sft_logp[i]
            hidden = module.eval_sets["val"].hidden[i]
            per_prompt.append(exact_prompt_metrics(logp, sft, [1, 8], [0.01], hidden))
    last = max(s for s, _ in _values(rows, "val/exact/validity"))
    for key, logged in [("validity", "val/exact/validity"), ("coverage@8", "val/exact/coverage@8"),
                        ("hidden/pass@8", "val/hidden/pass@8")]:  # fmt: skip
        expect = sum(float(m[key]) for m in per_prompt) / len(per_prompt)
        (got,) = [v for s, v in _values(rows, logged) if s == last]
        assert got == pytest.approx(expect, rel=1e-4, abs=1e-7), key


def test_sft_scores_are_checkpointed_and_hidden_subsets_drawn_from_the_config(lab_run):
    cli, _, log_dir = lab_run
    ckpt = torch.load(os.path.join(log_dir, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=True)
    sets = ckpt["cappo_eval_sets"]
    assert set(sets) == {"val", "train"} and len(sets["train"]["rows"]) == 3
    assert "hidden" not in sets["val"]  # S is a pure function of the config, pi_SFT and the answers
    task = SumTask(min_n=4, max_n=24, reference_dist="zipf", references_per_prompt=16)
    hiddens = cli.model.eval_sets["val"].hidden
    for rec, sft, hidden in zip(task.val_records(), sets["val"]["sft_logp"], hiddens, strict=True):
        assert sft.shape == hidden.shape == (len(task.valid_completions(rec)),)
        assert int(hidden.sum()) == max(1, math.floor(0.5 * sft.numel() + 0.5))  # halves round up


def test_quantile_threshold_is_the_sft_scores_quantile(lab_run):
    cli, rows, _ = lab_run
    scores = torch.cat(cli.model.references.sft_scores)
    tau = math.exp(float(torch.quantile(scores, 0.25, interpolation="lower")))  # a score itself
    ((_, logged),) = _values(rows, "val/srr_tau@q0.25")
    assert logged == pytest.approx(tau, rel=1e-12)
    (initial,) = [v for s, v in _values(rows, "val/srr@q0.25") if s == 0][:1]
    assert initial == pytest.approx(float((scores >= math.log(tau)).double().mean()))
    assert initial >= 0.75  # at least 1 - q of the references, by construction (the lower quantile)


def test_a_task_without_valid_completions_gets_sampled_metrics_and_a_note(lab_cache, tmp_path, caplog):
    import json

    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    line = lambda n, **more: json.dumps({"prompt": f"{n}=", "answer": f"1+{n - 1}", **more}) + "\n"  # noqa: E731
    train.write_text("".join(line(n, references=[f"1+{n - 1}"]) for n in range(10, 30)))
    val.write_text("".join(line(n) for n in range(40, 44)))
    extra = [
        "--data.task=cappo_pl.data.FileTask", f"--data.task.train_file={train}", f"--data.task.val_file={val}",
        "--trainer.val_check_interval=1.0", "--model.srr.enabled=false",
    ]  # fmt: skip
    with caplog.at_level("INFO"):
        main(tiny_fit_args("configs/grpo.yaml", lab_cache, tmp_path, steps=1, extra=extra))
    notes = [r.getMessage() for r in caplog.records if "valid_completions" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0] and "FileTask" in notes[0]
    (log_dir,) = glob.glob(str(tmp_path / "runs" / "grpo" / "version_*"))
    header = set(_rows(log_dir)[0])
    assert {"val/pass@1", "val/pass@2", "val/distinct_correct"} <= header
    assert not any(k.startswith(("val/exact/", "val/hidden/", "train_eval/")) for k in header)


def test_k_above_the_samples_is_a_config_error_naming_the_key(capsys):
    config = os.path.join(ROOT, "configs", "grpo.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--model.val_samples=4", "--model.evaluation.pass_ks=[1,8]"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("error: model.evaluation.pass_ks[1]: pass@8 needs at least 8 samples")


@pytest.mark.parametrize("bad", ["quantile:1.5", "quantile:x", "median"])
def test_a_bad_quantile_threshold_is_a_config_error(bad):
    config = os.path.join(ROOT, "configs", "grpo.yaml")
    with pytest.raises(ConfigError, match=r"model\.srr\.thresholds: must be a probability in \(0, 1\] or 'quantile:q'"):
        build_cli(["--config", config, f"--model.srr.thresholds=[{bad}]"], run=False)


def test_a_resumed_run_keeps_the_initial_policys_scores(lab_run, lab_cache, tmp_path):
    _, _, log_dir = lab_run
    ckpt = os.path.join(log_dir, "checkpoints", "last.ckpt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["cappo_eval_sets"]
    extra = [*LAB, "--trainer.max_epochs=2", f"--ckpt_path={ckpt}"]
    cli = build_cli(tiny_fit_args("configs/grpo.yaml", lab_cache, tmp_path, steps=2, extra=extra))
    assert cli.trainer.global_step == 4
    for split in ("val", "train"):
        kept = cli.model.eval_sets[split]
        assert kept.rows == saved[split]["rows"]
        for now, then in zip(kept.sft_logp, saved[split]["sft_logp"], strict=True):
            assert torch.equal(now, then)  # not re-scored under the trained policy
    # the trained policy gives them other scores: the check above could fail
    moved = cli.model._score_answers("val", cli.model.eval_sets["val"].rows[:1])[0]
    assert not torch.equal(moved, saved["val"]["sft_logp"][0])


def test_without_a_hidden_target_no_hidden_keys_are_logged(lab_cache, tmp_path):
    extra = [*LAB, "--model.evaluation.hidden=null", "--model.evaluation.train_prompts=0", "--data.val_prompts=2"]
    main(tiny_fit_args("configs/grpo.yaml", lab_cache, tmp_path, steps=1, extra=extra))
    (log_dir,) = glob.glob(str(tmp_path / "runs" / "grpo" / "version_*"))
    header = set(_rows(log_dir)[0])
    assert "val/exact/coverage@8" in header
    assert not any("/hidden/" in k or k.startswith("train_eval/") for k in header)
