"""End-to-end: a short fit, exact resume from a mid-run checkpoint, and the quickstart notebook."""

import csv
import glob
import os

import pytest
import torch
from conftest import checkpointing_every, layered_config

from cappo_pl.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(tmp_path, every_n: int, config: str = "grpo.yaml") -> str:
    return str(checkpointing_every(tmp_path, every_n, config, name="cfg.yaml"))


def _rows(log_dir):
    with open(os.path.join(log_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def _weights(ckpt):
    sd = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in sd.items() if k.startswith("policy.")}


@pytest.fixture
def run(cli_args, tmp_path):
    def go(name, steps, extra=(), config="grpo.yaml"):
        args = cli_args(steps=steps, extra=["--trainer.logger.init_args.name=" + name, *extra])
        args[2] = _config(tmp_path, every_n=2, config=config)
        main(args)
        (log_dir,) = glob.glob(str(tmp_path / "runs" / name / "version_*"))
        return log_dir

    return go


COMBINER_KEYS = (
    "train/combiner/c_policy",
    "train/grad/cos_policy_entropy",
    "train/grad/norm_kl",
    "train/grad/conflict",
)


@pytest.mark.parametrize("config", ["grpo.yaml", "combiners/pcgrad.yaml", "dapo.yaml", "ppo_critic.yaml"])
def test_fit_logs_metrics_and_resume_is_exact(run, tmp_path, config):
    full = run("full", steps=4, config=config)
    rows = [r for r in _rows(full) if r.get("train/reward/mean")]
    assert [float(r["train/rl_step"]) for r in rows] == [0.0, 1.0, 2.0, 3.0]
    for key in (
        "train/policy/entropy",
        "train/policy/kl_ref",
        "train/policy/clipfrac_low",
        "train/response_length/mean",
        "train/zero_std_groups",
        "train/lr",
        "train/objective/policy/weight",
    ):
        assert key in rows[0], key
    assert any(r.get("val/accuracy") for r in _rows(full))
    assert os.path.exists(os.path.join(full, "summary.json")) and os.path.exists(os.path.join(full, "samples.jsonl"))

    ppo = layered_config(config)["model"]["ppo"]
    mid_step = 2 * ppo["epochs"] * ppo["minibatches"]  # checkpoints count optimizer steps; this is RL step 2
    mid = sorted(glob.glob(os.path.join(full, "checkpoints", f"*step={mid_step}.ckpt")))
    assert mid, os.listdir(os.path.join(full, "checkpoints"))
    resumed = run("resumed", steps=4, extra=[f"--ckpt_path={mid[0]}"], config=config)
    rrows = [r for r in _rows(resumed) if r.get("train/reward/mean")]
    # It trains the remaining steps (never restarts, never exits without training) ...
    assert [float(r["train/rl_step"]) for r in rrows] == [2.0, 3.0]
    # ... and lands on exactly the weights of the uninterrupted run.
    a = _weights(os.path.join(full, "checkpoints", "last.ckpt"))
    b = _weights(os.path.join(resumed, "checkpoints", "last.ckpt"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    keys = ["train/reward/mean", "train/policy/entropy", "train/combiner/c_policy"]
    if "combiners" in config:
        assert all(k in rows[0] for k in COMBINER_KEYS)
        keys += list(COMBINER_KEYS)
    if config == "ppo_critic.yaml":  # the critic (weights, its optimizer group) resumes too
        keys += ["train/critic/vf_loss", "train/critic/value_mean"]
        a_c, b_c = (
            torch.load(os.path.join(d, "checkpoints", "last.ckpt"), weights_only=False) for d in (full, resumed)
        )
        assert all(torch.equal(a_c["state_dict"][k], b_c["state_dict"][k]) for k in a_c["state_dict"] if "critic" in k)
    if config == "dapo.yaml":  # extra generation batches are drawn again, identically, after the resume
        keys += ["train/dynamic/gen_batches", "train/dynamic/fill", "train/reward/overlong_penalty"]
    for key in keys:
        assert [r[key] for r in rows[2:]] == [r[key] for r in rrows], key


def test_quickstart_notebook_executes(run, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    log_dir = run("nb", steps=3)
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    os.environ["CAPPO_RUN_DIR"] = log_dir
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        del os.environ["CAPPO_RUN_DIR"]
    assert os.path.exists(os.path.join(log_dir, "quickstart.png"))
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "train/reward/mean" in outputs


def test_sft_subcommand_trains_once_then_hits_cache(tmp_path, capsys):
    from conftest import TINY_ARGS

    args = ["sft", "--config", os.path.join(ROOT, "configs", "grpo.yaml"), *TINY_ARGS]
    args += [f"--model.policy.sft.cache_dir={tmp_path}", "--model.policy.sft.steps=5"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    second = capsys.readouterr().out
    assert "SFT policy accuracy" in first and "cached checkpoint" in second
    (folder,) = glob.glob(str(tmp_path / "*"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "sft_metrics.json"} <= set(os.listdir(folder))


@pytest.mark.parametrize(
    "logger,artifact",
    [
        ("lightning.pytorch.loggers.TensorBoardLogger", "events.out.tfevents"),
        ("lightning.pytorch.loggers.WandbLogger", ".wandb"),
    ],
)
def test_other_loggers_by_config(logger, artifact, cli_args, tmp_path):
    args = [a for a in cli_args(steps=2) if not a.startswith("--trainer.logger.init_args")]
    args += [f"--trainer.logger={logger}", f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]
    if "Wandb" in logger:
        args += ["--trainer.logger.init_args.offline=true", "--trainer.logger.init_args.project=cappo-test"]
    main(args)
    found = [
        p for p in glob.glob(str(tmp_path / "logs" / "**" / "*"), recursive=True) if artifact in os.path.basename(p)
    ]
    assert found, os.listdir(tmp_path / "logs")


def test_rich_progress_bar_by_default(tmp_path):
    from lightning.pytorch.callbacks import RichProgressBar

    from cappo_pl.cli import build_cli

    cfg = os.path.join(ROOT, "configs", "grpo.yaml")
    on = build_cli(["--config", cfg, f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert any(isinstance(c, RichProgressBar) for c in on.trainer.callbacks)
    off = build_cli(["--config", cfg, "--trainer.enable_progress_bar=false"], run=False)
    assert not any(isinstance(c, RichProgressBar) for c in off.trainer.callbacks)
