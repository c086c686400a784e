import glob
import os

import pytest
import torch

from cappo_pl.cli import build_cli
from cappo_pl.errors import ConfigError
from cappo_pl.models import TinyModelConfig, build_char_tokenizer, build_tiny_model, load_pretrained
from cappo_pl.module import RLModule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def test_configs_exist():
    assert {"grpo.yaml", "ppo.yaml"} <= {os.path.basename(c) for c in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_parses_instantiates_and_states_its_command(path, tmp_path):
    first = open(path).readline().strip()
    assert first == f"# python cli.py fit --config configs/{os.path.relpath(path, os.path.join(ROOT, 'configs'))}"
    cli = build_cli(["--config", path, f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert isinstance(cli.model, RLModule)
    assert cli.model.objectives and cli.datamodule is not None


def test_save_pretrained_round_trip_through_real_loader(tmp_path):
    tok = build_char_tokenizer()
    model = build_tiny_model(
        TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok
    ).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_pretrained(tmp_path)
    ids = tok(["17=", "3="], padding=True, padding_side="left", return_tensors="pt")
    assert tok2("17=")["input_ids"] == tok("17=")["input_ids"] and tok2.padding_side == "left"
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, loaded.eval()(**ids).logits, atol=1e-6)


def test_gpt2_folder_loads_and_gets_pad_token(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_char_tokenizer()
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    ).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, t = load_pretrained(tmp_path)
    assert t.pad_token_id is not None and model.config.model_type == "gpt2"


def test_missing_model_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.policy.path"):
        load_pretrained(tmp_path / "nope")


def test_reference_not_loaded_without_kl(tmp_path):
    from cappo_pl.models import PolicyConfig

    m = RLModule(policy=PolicyConfig(sft=None))
    assert not m.needs_ref


def test_logit_postprocessing_models_are_refused():
    from transformers import LlamaForCausalLM

    from cappo_pl.scoring import check_head_matches_forward

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    tok = build_char_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
    check_head_matches_forward(model, len(tok))  # plain Llama passes
    scaled = Scaled(model.config)
    with pytest.raises(ConfigError, match="post-processes its logits"):
        check_head_matches_forward(scaled, len(tok))


def test_combiner_configs_differ_only_in_the_combiner_block():
    import yaml

    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "combiners", "*.yaml")))
    assert {"scalarized.yaml", "mgda.yaml", "pcgrad.yaml"} <= {os.path.basename(p) for p in paths}
    configs = [yaml.safe_load(open(p)) for p in paths]
    combiners = {c["model"].pop("combiner")["class_path"] for c in configs}
    assert len(combiners) == len(paths)
    assert all(c == configs[0] for c in configs)
