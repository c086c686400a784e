import copy
import math
from types import SimpleNamespace

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


class FakeLM(torch.nn.Module):
    """Next-token logits: 0 everywhere, ``eos_logit`` on EOS; ignores context (no KV state needed)."""

    def __init__(self, vocab: int, eos_id: int, eos_logit: float) -> None:
        super().__init__()
        self.vocab, self.eos_id, self.eos_logit = vocab, eos_id, eos_logit

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, cache=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.eos_id] = self.eos_logit
        return SimpleNamespace(logits=logits, cache=object())


def test_rollout_masks_after_eos_and_truncation(tiny):
    _, tok = tiny
    V = len(tok)
    fake = FakeLM(V, tok.eos_token_id, 3.0)
    enc = tok(["17=", "123=", "5="], padding=True, padding_side="left", return_tensors="pt")
    cfg = RolloutConfig(group_size=8, max_new_tokens=6)
    ro = sample(
        fake,
        enc["input_ids"],
        enc["attention_mask"],
        cfg,
        tok.eos_token_id,
        tok.pad_token_id,
        torch.Generator().manual_seed(0),
    )
    rows, masks = ro.completion_ids.tolist(), ro.completion_mask.tolist()
    n_eos = 0
    for row, m in zip(rows, masks, strict=True):
        if tok.eos_token_id in row:
            n_eos += 1
            k = row.index(tok.eos_token_id)
            assert m[: k + 1] == [1.0] * (k + 1) and sum(m[k + 1 :]) == 0
            assert all(t == tok.pad_token_id for t in row[k + 1 :])
        else:
            assert sum(m) == len(row)
    assert 0 < n_eos < len(rows)  # both branches exercised
    assert ro.truncated.tolist() == [tok.eos_token_id not in r for r in rows]
    assert (ro.rollout_logp * (1 - ro.completion_mask)).abs().sum() == 0
    # Closed form: p(EOS) = e^3 / (e^3 + V - 1), every other token 1 / (e^3 + V - 1).
    z = math.exp(3.0) + V - 1
    valid = ro.completion_mask.bool()
    want = torch.where(
        ro.completion_ids == tok.eos_token_id, torch.tensor(3.0 - math.log(z)), torch.tensor(-math.log(z))
    )
    assert torch.allclose(ro.rollout_logp[valid], want[valid], atol=1e-5)


def test_padded_batch_scores_equal_each_row_scored_alone(tiny):
    model, tok = tiny
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(8.0)  # tied: embeddings and head scaled; mean entropy ~2.4 nats vs 4.6 uniform
    ro = _rollout(sharp, tok)
    T = ro.completion_ids.shape[1]
    s = score_completions(sharp, ro.input_ids, ro.attention_mask, T, 1.0)
    # Far from uniform (and not deterministic), so a misaligned or mis-masked score would show.
    assert s.entropy.mean() < math.log(len(tok)) - 1.0 and s.logp[ro.completion_mask.bool()].std() > 0.3
    for i in range(ro.input_ids.shape[0]):
        prompt = ro.prompt_ids[i][ro.prompt_mask[i].bool()]
        comp = ro.completion_ids[i][ro.completion_mask[i].bool()]
        ids = torch.cat([prompt, comp]).unsqueeze(0)
        logits = sharp(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        alone = torch.log_softmax(logits, -1).gather(-1, comp.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(s.logp[i, : len(comp)], alone, atol=1e-4)
        assert torch.allclose(ro.rollout_logp[i, : len(comp)], alone, atol=1e-4)


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
