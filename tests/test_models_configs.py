import pytest
import torch

from cappo_pl.errors import ConfigError
from cappo_pl.models import TinyModelConfig, build_char_tokenizer, build_tiny_model, load_pretrained
from cappo_pl.module import RLModule

# The configs/ tests (commands, parse, instantiate, 2-step runs, base: layers) are in tests/test_configs.py.


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
