"""Bad configs and inputs are refused before anything is written: one line naming the key (and file:line), exit 2.

Each case runs ``cli.main`` in-process on the tiny model and checks three things: the exit code, the one
``error:`` line (no traceback), and that the run folder was not created.
"""

import logging
import os
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from cappo_pl.cli import main
from cappo_pl.config_schema import condense_parser_error
from cappo_pl.config_sources import read_sources


def _refused(args, tmp_path, capsys) -> str:
    """Run ``cli.main(args)``; assert exit 2, one error line, no traceback, nothing under tmp_path/runs."""
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if hasattr(v, "handlers"))]
    for handler in (h for lg in loggers for h in lg.handlers):  # one made under an earlier test holds a closed stream
        if type(handler) is logging.StreamHandler:
            handler.stream = sys.stderr
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err
    assert not (tmp_path / "runs").exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written at all
    return errors[0].removeprefix("error: ")


def _overlay(tmp_path, text: str, name="run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"base: {os.path.join(ROOT, 'configs', 'grpo.yaml')}\n{text}")
    return path


def test_typo_in_a_yaml_key_names_file_line_and_full_key(cli_args, tmp_path, capsys):
    cfg = _overlay(tmp_path, "model:\n  optim:\n    lrr: 0.1\n")
    msg = _refused(cli_args(extra=["--config", str(cfg)]), tmp_path, capsys)
    assert msg.startswith(f"{cfg}:4: model.optim.lrr: unknown key") and "'lr'" in msg


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("trainer:\n  max_epochz: 3\n", 3, "trainer.max_epochz"),
        ("data:\n  task:\n    init_args:\n      min_nn: 3\n", 5, "data.task.min_nn"),
        ("modle:\n  seed: 1\n", 2, "modle"),
        (
            "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
            "      init_args:\n        every_n_train_stepz: 5\n",
            6,
            "trainer.callbacks[0].every_n_train_stepz",
        ),
    ],
)
def test_typos_anywhere_name_the_key_path(text, line, key, cli_args, tmp_path, capsys):
    cfg = _overlay(tmp_path, text)
    msg = _refused(cli_args(extra=["--config", str(cfg)]), tmp_path, capsys)
    assert msg.startswith(f"{cfg}:{line}: {key}: unknown key"), msg


def test_a_value_set_in_a_parent_layer_is_blamed_on_that_file(cli_args, tmp_path, capsys):
    parent = _overlay(tmp_path, "model:\n  optim:\n    lr: -0.5\n", name="parent.yaml")
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\nmodel:\n  seed: 3\n")
    msg = _refused(cli_args(extra=["--config", str(child)]), tmp_path, capsys)
    assert msg == f"{parent}:4: model.optim.lr: must be >= 0, got -0.5"


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--model.optim.lr=-1", "model.optim.lr: must be >= 0, got -1"),
        ("--model.optim.lr=nan", "model.optim.lr: must be a finite number, got nan"),
        ("--model.optim.lr=abc", "model.optim.lr: expected float, got 'abc'"),
        ("--model.rollout.group_size=0", "model.rollout.group_size: must be > 0, got 0"),
        ("--model.rollout.max_new_tokens=0", "model.rollout.max_new_tokens: must be > 0, got 0"),
        ("--model.rollout.temperature=0", "model.rollout.temperature: must be > 0, got 0"),
        ("--model.rollout.top_p=1.5", "model.rollout.top_p: must be <= 1, got 1.5"),
        ("--model.ppo.epochs=0", "model.ppo.epochs: must be > 0, got 0"),
        ("--model.ppo.clip_grad_norm=-1", "model.ppo.clip_grad_norm: must be > 0, got -1"),
        ("--model.optim.beta2=1", "model.optim.beta2: must be < 1, got 1"),
        ("--model.optim.warmup_steps=-2", "model.optim.warmup_steps: must be >= 0, got -2"),
        ("--data.prompts_per_step=0", "data.prompts_per_step: must be > 0, got 0"),
        ("--data.steps_per_epoch=x", "data.steps_per_epoch: expected int, got 'x'"),
        ("--data.task.init_args.n_terms=1", "data.task.n_terms: must be >= 2, got 1"),
        ("--model.srr.thresholds=[0.1,2]", "model.srr.thresholds[1]: must be <= 1, got 2"),
        ("--model.policy.dtype=float16", "model.policy.dtype: must be one of 'float32', 'bfloat16', got 'float16'"),
        ("--model.policy.tiny.num_layers=0", "model.policy.tiny.num_layers: must be > 0, got 0"),
        ("--model.val_samples=0", "model.val_samples: must be > 0, got 0"),
        ("--model.optim.lrr=1", "model.optim.lrr: unknown key (did you mean 'lr'?)"),
    ],
)
def test_bad_values_on_the_command_line(flag, expected, cli_args, tmp_path, capsys):
    assert _refused(cli_args(extra=[flag]), tmp_path, capsys) == f"command line: {expected}"


def test_yaml_duplicate_key_and_syntax_error(cli_args, tmp_path, capsys):
    dup = _overlay(tmp_path, "model:\n  seed: 1\n  seed: 2\n", name="dup.yaml")
    assert _refused(cli_args(extra=["--config", str(dup)]), tmp_path, capsys) == (
        f"{dup}:4: duplicate key 'seed' (first at line 3)"
    )
    bad = _overlay(tmp_path, "model:\n  seed: [1, 2\n", name="bad.yaml")
    assert _refused(cli_args(extra=["--config", str(bad)]), tmp_path, capsys).startswith(f"{bad}:")


def _file_task(path, *extra):
    return ["--data.task=cappo_pl.data.FileTask", f"--data.task.train_file={path}", "--data.prompts_per_step=1", *extra]


def test_training_file_without_references_and_sft_on(cli_args, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    msg = _refused(cli_args(extra=_file_task(data)), tmp_path, capsys)
    assert msg.startswith(f"{data}: the SFT warm start") and "'references'" in msg


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from cappo_pl.models import TinyModelConfig, build_char_tokenizer, build_tiny_model

    folder = tmp_path_factory.mktemp("hf_model")
    tok = build_char_tokenizer()
    build_tiny_model(
        TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("policy", ["sft_off", "folder"])
def test_missing_reward_file_before_the_run_folder(policy, model_folder, cli_args, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    source = ["--model.policy.sft=null"] if policy == "sft_off" else [f"--model.policy.path={model_folder}"]
    args = cli_args(extra=[*_file_task(data, f"--data.task.reward={tmp_path / 'nope.py'}:score"), *source])
    msg = _refused(args, tmp_path, capsys)
    assert "nope.py" in msg and "not found" in msg


@pytest.mark.parametrize(
    ("line", "what"),
    [('{"prompt": "1+1=", "answer": 9.5e999}', "non-finite number"), ('{"prompt": "a", "prompt": "b"}', "duplicate")],
)
def test_bad_json_values_refused_before_the_run_folder(line, what, cli_args, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(f'{{"prompt": "1+1=", "answer": "2"}}\n{line}\n')
    msg = _refused(cli_args(extra=_file_task(data, "--model.policy.sft=null")), tmp_path, capsys)
    assert msg.startswith(f"{data}:2: ") and what in msg


def test_sources_track_origins_through_layers_and_flags(tmp_path):
    low = tmp_path / "low.yaml"
    low.write_text("model:\n  optim:\n    lr: 0.1\n  objectives:\n    - class_path: a.B\n      init_args: {w: 1}\n")
    high = tmp_path / "high.yaml"
    high.write_text("model:\n  objectives:\n    - class_path: a.C\n")
    raw = read_sources(["--config", str(low), "--config", str(high), "--model.optim.lr=0.5"])
    assert raw.tree["model"]["optim"]["lr"] == "0.5"
    assert raw.origin(("model", "optim", "lr")) == "command line"
    # the class changed: the old init_args are gone, and so is their origin
    assert raw.tree["model"]["objectives"] == [{"class_path": "a.C"}]
    assert raw.origin(("model", "objectives", 0, "init_args", "w")) == f"{high}:3"


def test_condensed_parser_error_is_one_line():
    dump = (
        'Parser key "model.optim":\n  Does not validate against any of the Union subtypes\n  Subtypes: [...]\n'
        "  Errors:\n    - Parser key \"lr\":\n        Expected a <class 'float'>. Got value: abc\n"
        "    - Expected a <class 'NoneType'>\n  Given value type: <class 'str'>\n  Given value: abc"
    )
    assert condense_parser_error(dump) == "model.optim.lr: Expected a <class 'float'>. Got value: abc"


@pytest.mark.parametrize(
    "extra",
    [
        ["--trainer.precision=null"],  # Optional[Literal]: null is a choice
        ["--trainer.precision", "bf16-mixed"],  # a string choice, and the `--key value` form
        ["--model.optim.lr", "5e-5"],
        ["--data.task.class_path=cappo_pl.data.FileTask", "--data.task.train_file=x.jsonl"],  # the old init_args go
        ["--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor"],
        ["--model.policy.sft=null", "--trainer.logger=false", "--ckpt_path=null"],
        ["-c", '{"model": {"seed": 3}}'],  # inline YAML
    ],
)
def test_valid_command_lines_are_not_refused(extra, capsys):
    from cappo_pl.cli import build_cli

    with pytest.raises(SystemExit) as exc:
        build_cli(["fit", "--config", os.path.join(ROOT, "configs", "grpo.yaml"), *extra, "--print_config"])
    assert exc.value.code in (0, None), capsys.readouterr().err


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    merged = tmp_path / "merged.yaml"
    merged.write_text(
        f"base: {os.path.join(ROOT, 'configs', 'grpo.yaml')}\n"
        "model:\n  optim: &opt {lr: 0.001, warmup_steps: 5}\n  policy:\n    sft:\n      <<: *opt\n      lr: 0.003\n"
    )
    raw = read_sources(["--config", str(merged)])
    assert raw.tree["model"]["policy"]["sft"] == {"lr": 0.003, "warmup_steps": 5}
    assert raw.origin(("model", "policy", "sft", "lr")) == f"{merged}:7"


def test_bad_value_in_the_key_value_form(cli_args, tmp_path, capsys):
    msg = _refused(cli_args(extra=["--model.rollout.group_size", "0"]), tmp_path, capsys)
    assert msg == "command line: model.rollout.group_size: must be > 0, got 0"
