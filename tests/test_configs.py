"""configs/: every file states its command, parses, instantiates and trains 2 steps; the ``base:`` layers.

The strategy overlays (configs/strategy/) need several processes (DDP and FSDP on CPU, DeepSpeed on GPUs): they
are parsed and instantiated here, and run by tests/test_ddp_fit.py, test_fsdp.py, test_deepspeed.py and
test_dp_equality.py.
"""

import csv
import glob
import os
import subprocess

import pytest
import torch
import yaml
from conftest import CLI, ROOT

from cappo_pl.cli import build_cli, config_layers, expand_config_args, merged_config
from cappo_pl.errors import ConfigError
from cappo_pl.module import RLModule

CONFIG_DIR = os.path.join(ROOT, "configs")
NAMES = sorted(
    os.path.relpath(p, CONFIG_DIR) for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True)
)
RUNS = [n for n in NAMES if not n.startswith("strategy/")]  # one process each: trained for 2 steps below
COMBINERS = [n for n in RUNS if n.startswith("combiners/") and n != "combiners/peers.yaml"]

# A 2-step run of a config: the tiny model from random weights (no SFT), few prompts, logs under a tmp dir.
TINY_RUN = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.policy.tiny.hidden_size=32",
    "--model.policy.tiny.num_layers=2",
    "--model.policy.tiny.num_heads=2",
    "--model.policy.tiny.intermediate_size=64",
    "--model.policy.sft=null",
    "--data.steps_per_epoch=2",
    "--data.prompts_per_step=4",
    "--model.rollout.group_size=4",
    "--model.val_samples=2",
    "--data.val_prompts=4",
]


@pytest.fixture
def one_thread():
    # The tiny model gains nothing from a second thread, and on a loaded machine two threads make these runs
    # ~10x slower (each op waits for the other thread).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _path(name):
    return os.path.join(CONFIG_DIR, name)


def _printed(args, capsys):
    """``fit ARGS --print_config``, in process: the whole run as lines, without the (null) ``base``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        build_cli(["fit", *args, "--print_config"])
    assert exit_.value.code in (0, None)
    return [line for line in capsys.readouterr().out.splitlines() if line != "base: null"]


def test_configs_exist():
    assert {"base.yaml", "grpo.yaml", "ppo.yaml", "combiners/peers.yaml", "strategy/ddp.yaml"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_config_states_its_command(name):
    first = open(_path(name)).readline().strip()
    if name == "base.yaml":  # the shared layer: not a method, so no command of its own on top
        assert first.startswith("# The shared layer")
        assert "python cli.py fit --config configs/grpo.yaml --print_config" in open(_path(name)).read()
    else:
        assert first == f"# python cli.py fit --config configs/{name}"


@pytest.mark.parametrize("name", NAMES)
def test_every_config_parses_and_instantiates(name, tmp_path):
    cli = build_cli(["--config", _path(name), f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert isinstance(cli.model, RLModule)
    assert cli.model.objectives and cli.datamodule is not None


@pytest.mark.parametrize("name", RUNS)
def test_every_config_trains_two_steps_and_its_saved_config_reruns(name, tmp_path, capsys, one_thread):
    args = ["--config", _path(name), *TINY_RUN, f"--trainer.default_root_dir={tmp_path}"]
    args += [f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
    cli = build_cli(["fit", *args])
    (log_dir,) = glob.glob(str(tmp_path / "runs" / "*" / "version_*"))
    rows = [r for r in csv.DictReader(open(os.path.join(log_dir, "metrics.csv"))) if r.get("train/reward/mean")]
    assert [float(r["train/rl_step"]) for r in rows] == [0.0, 1.0]
    ppo = cli.model.ppo  # one optimizer step per (epoch x mini-batch) of each RL step
    assert cli.trainer.global_step == 2 * ppo.epochs * ppo.minibatches
    if ppo.epochs * ppo.minibatches == 1 and "train/policy/ppo_kl" in rows[0]:
        # Wiring: the only update is on-policy, so pi == pi_old (recomputed at step start) and nothing clips.
        for r in rows:
            if r["train/policy/ppo_kl"] != "":  # GPG has no ratio, no clip
                assert abs(float(r["train/policy/ppo_kl"])) < 1e-5 and float(r["train/policy/clipfrac"]) == 0.0
    # The saved config.yaml is the whole run, with no parent to look for: it parses to the same run.
    saved = os.path.join(log_dir, "config.yaml")
    assert yaml.safe_load(open(saved))["base"] is None
    assert _printed(["--config", saved], capsys) == _printed(args, capsys)


@pytest.mark.parametrize("name", RUNS)
def test_layers_merge_into_the_plain_merged_config(name, tmp_path, capsys):
    # jsonargparse merges a restated list item by item (an item keeps init_args of the one below it): a layer
    # that restates a list must set them, so the layered file gives exactly the run of its plain merge.
    plain = tmp_path / "merged.yaml"
    plain.write_text(yaml.safe_dump(merged_config(_path(name))))
    assert _printed(["--config", str(plain)], capsys) == _printed(["--config", _path(name)], capsys)


def _leaves(cfg, prefix=()):
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


@pytest.mark.parametrize("name", [n for n in RUNS if n != "base.yaml"])
def test_each_layer_holds_only_what_differs_from_its_parents(name):
    layers = config_layers(_path(name))
    assert os.path.realpath(layers[0]) == os.path.realpath(_path("base.yaml"))  # every run builds on base.yaml
    own = yaml.safe_load(open(_path(name)))
    assert isinstance(own.pop("base"), str)  # one parent: layers[-2], with its own parents merged in
    parents = merged_config(layers[-2])
    for keys, value in _leaves(own):
        node = parents
        for key in keys:
            node = node.get(key, KeyError) if isinstance(node, dict) else KeyError
        assert node != value, f"{name}: {'.'.join(keys)} restates {value!r}"


def test_combiner_overlays_hold_only_the_combiner_block():
    assert {"combiners/scalarized.yaml", "combiners/mgda.yaml", "combiners/pcgrad.yaml"} <= set(COMBINERS)
    overlays = [yaml.safe_load(open(_path(n))) for n in COMBINERS]
    assert all(set(o) == {"base", "model"} and set(o["model"]) == {"combiner"} for o in overlays)
    assert all(o["base"] == "peers.yaml" for o in overlays)
    assert len({o["model"]["combiner"]["class_path"] for o in overlays}) == len(COMBINERS)


def test_expansion_puts_parents_first_once_and_resets_base():
    mgda, ddp = _path("combiners/mgda.yaml"), _path("strategy/ddp.yaml")
    args = expand_config_args(["fit", "--config", mgda, f"--config={ddp}", "--print_config"])
    parents = [_path("base.yaml"), _path("combiners/peers.yaml")]
    assert args == [
        "fit", "--config", parents[0], "--config", parents[1], "--config", mgda, "--base=null",
        "--config", ddp, "--print_config",
    ]  # fmt: skip
    assert expand_config_args(args) == args  # a relaunched DDP rank's argv is left as it is
    inline = ["fit", "--config", "{trainer: {max_epochs: 2}}"]
    assert expand_config_args(inline) == inline
    assert expand_config_args(["fit", "--config", ddp]) == ["fit", "--config", ddp]
    # a parent an earlier --config already applied is not applied again (it would reset grpo's settings)
    grpo = _path("grpo.yaml")
    assert expand_config_args(["fit", "--config", grpo, "--config", mgda]) == [
        "fit", "--config", parents[0], "--config", grpo, "--config", parents[1], "--config", mgda, "--base=null",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="inline YAML config cannot name a base"):
        expand_config_args(["fit", "--config", "{base: base.yaml, trainer: {max_epochs: 2}}"])


def test_bad_base_is_a_one_line_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: [a.yaml]\n")
    (tmp_path / "missing.yaml").write_text("base: nope.yaml\n")
    (tmp_path / "typed.yaml").write_text("base: {x: 1}\n")
    cases = {
        "a.yaml": "b.yaml: base: a.yaml makes a cycle (a.yaml -> b.yaml -> a.yaml)",
        "missing.yaml": "missing.yaml: base: nope.yaml not found",
    }
    for name, message in cases.items():
        proc = subprocess.run([*CLI, "fit", "--config", str(tmp_path / name)], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith(f"error: {tmp_path}") and message in line, line
    with pytest.raises(ConfigError, match="typed.yaml: base: must be a file name or a list of file names"):
        build_cli(["--config", str(tmp_path / "typed.yaml")], run=False)


def test_command_line_print_config_shows_the_whole_run(capsys):
    # The real entry point (LightningCLI reading sys.argv) expands the layers as build_cli(args) does.
    name = "combiners/mgda.yaml"
    out = subprocess.run(
        [*CLI, "fit", "--config", f"configs/{name}", "--print_config"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line != "base: null"]
    assert lines == _printed(["--config", _path(name)], capsys)
    assert "      every_n_train_steps: 50" in lines and "    class_path: cappo_pl.combiners.MGDA" in lines
