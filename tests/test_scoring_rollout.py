import math

import pytest
import torch

from cappo_pl.models import TinyModelConfig, build_char_tokenizer, build_tiny_model
from cappo_pl.rollout import RolloutConfig, sample, top_p_filter
from cappo_pl.scoring import logprobs_and_entropy, position_ids_from_mask, score_completions


@pytest.fixture(scope="module")
def tiny():
    tok = build_char_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok)
    return model.eval(), tok


def test_logprob_and_entropy_brute_force():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0]])
    for temp in (1.0, 0.7):
        lp, h = logprobs_and_entropy(logits, torch.tensor([1]), temp)
        z = [v / temp for v in logits[0].tolist()]
        norm = sum(math.exp(v) for v in z)
        p = [math.exp(v) / norm for v in z]
        assert lp.item() == pytest.approx(math.log(p[1]), rel=1e-6)
        assert h.item() == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-6)


def _rollout(model, tok, **kw):
    enc = tok(["17=", "123=", "5="], padding=True, padding_side="left", return_tensors="pt")
    cfg = RolloutConfig(group_size=3, max_new_tokens=6, **kw)
    gen = torch.Generator().manual_seed(0)
    return sample(model, enc["input_ids"], enc["attention_mask"], cfg, tok.eos_token_id, tok.pad_token_id, gen)


@pytest.mark.parametrize("temp", [1.0, 0.6])
def test_chunked_scores_equal_full_logits_and_sampler(tiny, temp):
    model, tok = tiny
    ro = _rollout(model, tok, temperature=temp)
    T = ro.completion_ids.shape[1]
    full = model(
        input_ids=ro.input_ids, attention_mask=ro.attention_mask, position_ids=position_ids_from_mask(ro.attention_mask)
    ).logits
    want_lp, want_h = logprobs_and_entropy(full[:, -T - 1 : -1], ro.completion_ids, temp)
    for chunk in (1, 7, 4096):
        s = score_completions(model, ro.input_ids, ro.attention_mask, T, temp, chunk_tokens=chunk)
        assert torch.allclose(s.logp, want_lp, atol=1e-5)
        assert torch.allclose(s.entropy, want_h, atol=1e-5)
    # The sampler's own logprobs (KV cache) equal the teacher-forced recompute on valid tokens.
    m = ro.completion_mask.bool()
    assert torch.allclose(ro.rollout_logp[m], want_lp[m], atol=1e-4)


def test_chunked_gradient_equals_unchunked(tiny):
    model, tok = tiny
    ro = _rollout(model, tok)
    T = ro.completion_ids.shape[1]
    grads = []
    for chunk in (5, 4096):
        model.zero_grad()
        s = score_completions(model, ro.input_ids, ro.attention_mask, T, 1.0, chunk_tokens=chunk)
        ((s.logp + 0.1 * s.entropy) * ro.completion_mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_rollout_masks_after_eos_and_truncation(tiny):
    model, tok = tiny
    # Force EOS to be very likely by biasing the output layer.
    with torch.no_grad():
        bias_model = build_tiny_model(
            TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok
        )
        bias_model.lm_head.weight.zero_()
        bias_model.model.embed_tokens.weight.zero_()
    ro = _rollout(bias_model, tok)  # uniform distribution: EOS appears at random
    for row, m in zip(ro.completion_ids.tolist(), ro.completion_mask.tolist(), strict=True):
        if tok.eos_token_id in row:
            k = row.index(tok.eos_token_id)
            assert m[: k + 1] == [1.0] * (k + 1) and sum(m[k + 1 :]) == 0
            assert all(t == tok.pad_token_id for t in row[k + 1 :])
        else:
            assert sum(m) == len(row)
    assert ro.truncated.tolist() == [tok.eos_token_id not in r for r in ro.completion_ids.tolist()]
    assert (ro.rollout_logp * (1 - ro.completion_mask)).abs().sum() == 0
    # Uniform over V: every sampled token has logprob -log V.
    V = len(tok)
    assert torch.allclose(ro.rollout_logp[ro.completion_mask.bool()], torch.tensor(-math.log(V)), atol=1e-5)


def test_topk_logprobs_include_sampled_token(tiny):
    model, tok = tiny
    ro = _rollout(model, tok, top_k_logprobs=3)
    assert ro.topk_ids.shape[-1] == 3
    hit = (ro.topk_ids == ro.completion_ids.unsqueeze(-1)).any(-1)
    assert bool(hit[ro.completion_mask.bool()].all())


def test_top_p_filter_keeps_smallest_nucleus():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])
    kept = torch.isfinite(top_p_filter(logits, 0.75))[0].tolist()
    assert kept == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.01))[0].tolist() == [True, False, False, False]


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    a, b = _rollout(model, tok), _rollout(model, tok)
    assert torch.equal(a.completion_ids, b.completion_ids)


def test_group_layout_is_prompt_major(tiny):
    model, tok = tiny
    ro = _rollout(model, tok)
    p = ro.prompt_ids
    assert torch.equal(p[0], p[1]) and torch.equal(p[1], p[2]) and not torch.equal(p[2], p[3])
