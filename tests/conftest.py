import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`make test` runs two workers) each worker gets one core's worth of threads.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small and fast: the CLI tests all use this model/SFT so the SFT cache is shared within a session.
TINY_ARGS = [
    "--trainer.enable_progress_bar=false",
    "--model.policy.tiny.hidden_size=32",
    "--model.policy.tiny.num_layers=2",
    "--model.policy.tiny.num_heads=2",
    "--model.policy.tiny.intermediate_size=64",
    "--model.policy.sft.steps=30",
    "--model.policy.sft.batch_size=32",
    "--model.policy.sft.eval_samples=2",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(scope="session")
def sft_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sft_cache"))


@pytest.fixture
def cli_args(sft_cache, tmp_path):
    """Common overrides: tiny model, shared SFT cache, logs under tmp_path."""

    def make(config="configs/grpo.yaml", steps=3, extra=()):
        return tiny_fit_args(config, sft_cache, tmp_path, steps, extra)

    return make


# A CLI run in a subprocess (multi-process strategies relaunch the script): ``[*CLI, *tiny_fit_args(...)]``.
CLI = [sys.executable, os.path.join(ROOT, "cli.py")]


def tiny_fit_args(config, sft_cache, root, steps=3, extra=()):
    """``fit`` arguments of a short run of ``config`` on the tiny model, logging under ``root``/runs."""
    return [
        "fit",
        "--config",
        os.path.join(ROOT, config),
        *TINY_ARGS,
        f"--model.policy.sft.cache_dir={sft_cache}",
        f"--data.steps_per_epoch={steps}",
        "--data.prompts_per_step=4",
        "--model.rollout.group_size=4",
        "--model.val_samples=2",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={Path(root) / 'runs'}",
        *extra,
    ]


def layered_config(config):
    """configs/``config`` with its ``base:`` layers merged (``cappo_pl.cli.merged_config``): a standalone dict."""
    from cappo_pl.cli import merged_config

    return merged_config(os.path.join(ROOT, "configs", config))


def checkpointing_every(root, steps=2, config="grpo.yaml", name=None):
    """An overlay of configs/``config``: ModelCheckpoint every ``steps`` optimizer steps (all kept), under ``root``."""
    import yaml

    callbacks = layered_config(config)["trainer"]["callbacks"]
    for cb in callbacks:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"] = {"every_n_train_steps": steps, "save_top_k": -1, "save_last": True, "dirpath": None}
    overlay = {"base": os.path.join(ROOT, "configs", config), "trainer": {"callbacks": callbacks}}
    path = Path(root) / (name or f"{Path(config).stem}_ckpt{steps}.yaml")
    path.write_text(yaml.safe_dump(overlay))
    return path


def grpo_checkpointing_every(root, steps=2):
    """configs/grpo.yaml with ModelCheckpoint every ``steps`` optimizer steps (all kept), written under ``root``."""
    return checkpointing_every(root, steps)


def assert_resumed_exactly(full, resumed):
    """A 4-step run's log dir, and that of the run resumed from its step-2 checkpoint: same steps, same weights."""
    import csv

    from cappo_pl.convert import checkpoint_state

    rows = lambda d: [r for r in csv.DictReader(open(os.path.join(d, "metrics.csv"))) if r.get("train/reward/mean")]  # noqa: E731
    a, b = rows(full), rows(resumed)
    assert [r["train/rl_step"] for r in b] == ["2.0", "3.0"]
    assert [r["train/reward/mean"] for r in a[2:]] == [r["train/reward/mean"] for r in b]
    wa = checkpoint_state(os.path.join(full, "checkpoints", "last.ckpt"))
    wb = checkpoint_state(os.path.join(resumed, "checkpoints", "last.ckpt"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa if k.startswith("policy."))


def free_port() -> int:
    """A free TCP port on localhost (a process group's MASTER_PORT)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank, world, port, queue, fn):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, fn(rank)))
    finally:
        dist.destroy_process_group()


def run_on_gloo_ranks(fn, world=2):
    """``{rank: fn(rank)}`` with ``fn`` run in ``world`` spawned processes joined in one gloo group.

    ``fn`` must be a module-level function (it is pickled into the spawned processes).
    """
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").Queue()
    mp.start_processes(_gloo_worker, args=(world, free_port(), queue, fn), nprocs=world, start_method="spawn")
    return dict(queue.get() for _ in range(world))


def tiny_sft_folder(sft_cache):
    """The SFT start the ``TINY_ARGS`` runs of the default SumTask share in ``sft_cache`` (other tests add others)."""
    from cappo_pl.data import SumTask
    from cappo_pl.models import SFTConfig, TinyModelConfig
    from cappo_pl.sft import sft_cache_key

    tiny = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    sft = SFTConfig(steps=30, batch_size=32, eval_samples=2, cache_dir=sft_cache)
    folder = os.path.join(sft_cache, sft_cache_key(tiny, sft, SumTask().train_records()))
    assert os.path.isfile(os.path.join(folder, "config.json")), folder
    return folder
