"""DPPO Top-K: the rest-bucket divergences against full-vocabulary brute force, the mask, and the wiring."""

import math

import pytest
import torch

from cappo_pl.losses import DPPO, TokenBatch, topk_divergence
from cappo_pl.models import TinyModelConfig, build_char_tokenizer, build_tiny_model
from cappo_pl.rollout import RolloutConfig, sample
from cappo_pl.scoring import score_completions

V = 9


def _brute_tv(p, q):
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True))


def _brute_kl(p, q):  # KL(q || p): q is the sampler mu
    return sum(b * math.log(b / a) for a, b in zip(p, q, strict=True))


def _dists(seed, n=64, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    pi = torch.log_softmax(sharp * torch.randn(n, V, generator=g, dtype=torch.float64), -1)
    mu = torch.log_softmax(pi + 0.8 * torch.randn(n, V, generator=g, dtype=torch.float64), -1)
    return pi, mu


def test_topk_with_k_equal_to_vocabulary_is_the_full_divergence():
    pi, mu = _dists(0)
    ids = torch.stack([torch.randperm(V, generator=torch.Generator().manual_seed(i)) for i in range(pi.shape[0])])
    tv = topk_divergence(pi.gather(-1, ids), mu.gather(-1, ids), "topk_tv")
    kl = topk_divergence(pi.gather(-1, ids), mu.gather(-1, ids), "topk_kl")
    for row in range(pi.shape[0]):
        p, q = pi[row].exp().tolist(), mu[row].exp().tolist()
        assert tv[row].item() == pytest.approx(_brute_tv(p, q), abs=1e-6)
        assert kl[row].item() == pytest.approx(_brute_kl(p, q), abs=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_topk_lower_bounds_the_full_divergence_and_rest_bucket_is_exact(k):
    pi, mu = _dists(k)
    # the sampler's top-K of mu with a sampled token forced in at rank K (some rows: outside the top-K)
    ids = mu.topk(k, -1).indices.clone()
    sampled = torch.randint(0, V, (pi.shape[0],), generator=torch.Generator().manual_seed(7))
    missing = ~(ids == sampled[:, None]).any(-1)
    ids[missing, -1] = sampled[missing]
    tv = topk_divergence(pi.gather(-1, ids), mu.gather(-1, ids), "topk_tv")
    kl = topk_divergence(pi.gather(-1, ids), mu.gather(-1, ids), "topk_kl")
    full_kl = 0.0
    for row in range(pi.shape[0]):
        p, q = pi[row].exp().tolist(), mu[row].exp().tolist()
        full_kl += _brute_kl(p, q)
        keep = set(ids[row].tolist())
        # brute force over the coarsened distribution {K tokens, rest}
        pc = [p[i] for i in sorted(keep)] + [sum(p[i] for i in range(V) if i not in keep)]
        qc = [q[i] for i in sorted(keep)] + [sum(q[i] for i in range(V) if i not in keep)]
        assert tv[row].item() == pytest.approx(_brute_tv(pc, qc), abs=1e-6)
        assert kl[row].item() == pytest.approx(_brute_kl(pc, qc), abs=1e-5)
        assert tv[row].item() <= _brute_tv(p, q) + 1e-6  # fp32 computation
        assert kl[row].item() <= _brute_kl(p, q) + 1e-6
    assert (tv > 0).all()
    if k <= V - 2:  # the rest bucket merges >= 2 tokens: coarsening loses divergence (strict bound)
        assert kl.sum().item() < full_kl - 1e-3
    else:  # one token in the rest bucket: nothing is merged, the bucket is exact
        assert kl.sum().item() == pytest.approx(full_kl, abs=1e-4)


def test_topk_config_without_sampler_topk_is_a_config_error():
    from cappo_pl.errors import ConfigError
    from cappo_pl.module import RLModule
    from cappo_pl.objectives import PolicyObjective

    with pytest.raises(ConfigError, match="model.rollout.top_k_logprobs"):
        RLModule(objectives=[PolicyObjective(DPPO("topk_kl"))])


@pytest.mark.parametrize("kind,delta", [("topk_tv", 0.15), ("topk_kl", 0.05)])
def test_topk_mask_value_and_gradient(kind, delta):
    pi, mu = _dists(3, n=40, sharp=2.0)
    k = 3
    # the sampler's set: mu's top-3 with the sampled token forced in at rank K when it is not among them
    tok = torch.randint(0, V, (pi.shape[0], 1), generator=torch.Generator().manual_seed(5))
    ids = mu.topk(k, -1).indices.clone()
    missing = ~(ids == tok).any(-1)
    ids[missing, -1] = tok[missing, 0]
    assert 0 < missing.sum() < pi.shape[0]  # both cases occur
    logp = pi.gather(-1, tok).squeeze(-1)[None].clone().requires_grad_(True)
    mu_logp = mu.gather(-1, tok).squeeze(-1)[None]
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5] * 10, dtype=torch.float64)[None]
    mask = torch.ones_like(adv)
    mask[0, -3:] = 0
    batch = TokenBatch(
        logp=logp, old_logp=logp.detach(), rollout_logp=mu_logp, advantages=adv, mask=mask,
        topk_logp=pi.gather(-1, ids)[None], rollout_topk_logp=mu.gather(-1, ids)[None],
    )  # fmt: skip
    cap = 10.0
    loss, metrics = DPPO(kind, tis_cap=cap, agg="token-mean")(batch)
    want_value, want_grad, invalid = 0.0, [], []
    for t in range(logp.shape[1]):
        p_all, q_all = pi[t].exp().tolist(), mu[t].exp().tolist()
        keep = ids[t].tolist()
        pc = [p_all[i] for i in keep] + [1 - sum(p_all[i] for i in keep)]
        qc = [q_all[i] for i in keep] + [1 - sum(q_all[i] for i in keep)]
        d = _brute_tv(pc, qc) if kind == "topk_tv" else _brute_kl(pc, qc)
        p, q, a = p_all[tok[t, 0]], q_all[tok[t, 0]], adv[0, t].item()  # the sampled token sets the direction
        inv = (d > delta and p > q) if a > 0 else (d > delta and p < q)
        invalid.append(inv and mask[0, t].item() == 1)
        w = min(p / q, cap)
        m = mask[0, t].item()
        want_value += -a * w * math.log(p) * (not inv) * m
        want_grad.append(-a * w * (not inv) * m)
    n = mask.sum().item()
    assert 0 < sum(invalid) < n  # both outcomes occur
    assert loss.item() == pytest.approx(want_value / n, rel=1e-9)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[0].tolist() == pytest.approx([g / n for g in want_grad], abs=1e-12)
    assert metrics["dppo_masked"].item() == pytest.approx(sum(invalid) / n)


def test_topk_requires_the_samplers_topk_logprobs():
    with pytest.raises(RuntimeError, match="top_k_logprobs"):
        logp = torch.zeros(1, 2)
        DPPO("topk_tv")(TokenBatch(logp=logp, old_logp=logp, rollout_logp=logp, advantages=logp, mask=logp + 1))


def test_scorer_gathers_the_samplers_topk_ids_from_the_same_distribution():
    tok = build_char_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok)
    model.eval()
    enc = tok(["12=", "7="], padding=True, padding_side="left", return_tensors="pt")
    cfg = RolloutConfig(group_size=3, max_new_tokens=6, temperature=0.7, top_k_logprobs=5)
    ro = sample(model, enc["input_ids"], enc["attention_mask"], cfg, tok.eos_token_id, tok.pad_token_id,
                torch.Generator().manual_seed(0))  # fmt: skip
    assert ro.topk_ids.shape == (6, ro.completion_ids.shape[1], 5)
    assert (ro.topk_ids == ro.completion_ids[..., None]).any(-1).all()  # the sampled token is always in the set
    scores = score_completions(
        model, ro.input_ids, ro.attention_mask, ro.completion_ids.shape[1], cfg.temperature, topk_ids=ro.topk_ids
    )
    m = ro.completion_mask.bool()
    # the same policy: the trainer's gathered logprobs equal the sampler's, so the Top-K divergence is ~0
    torch.testing.assert_close(scores.topk_logp[m], ro.topk_logp[m], atol=2e-5, rtol=1e-5)
    d = topk_divergence(scores.topk_logp, ro.topk_logp, "topk_kl")
    assert d[m].abs().max() < 1e-5
    assert not scores.topk_logp.requires_grad
