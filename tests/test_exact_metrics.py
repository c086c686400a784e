"""Exact support metrics against independent computations: exact rationals on one-at-a-time full-softmax
scores of a tiny model, Monte-Carlo frequencies of its samples, 2-process DDP; the hidden targets."""

import math
import random
from fractions import Fraction

import pytest
import torch
from conftest import run_on_gloo_ranks
from torch import nn

from cappo_pl.data.tasks import compositions
from cappo_pl.metrics import (
    EdgeFailure,
    ExactSupportMetrics,
    RandomAnswers,
    RareAnswers,
    SampledPassAtK,
    eps_key,
    exact_keys,
    exact_prompt_metrics,
)
from cappo_pl.models import TinyModelConfig, build_char_tokenizer, build_tiny_model
from cappo_pl.references import sequence_logprobs
from cappo_pl.rollout import RolloutConfig, sample

KS = (1, 4, 64)
EPS = (1e-2, 1e-3, 1e-5)
TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def _answers(n, terms):
    return ["+".join(map(str, c)) for c in compositions(n, terms)]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _crafted(tok):
    """The tiny Llama with its embeddings and (untied) head set so that its next-token distribution is
    close to a bigram table that writes ``a+b<eos>`` after ``=``: real mass on the sums' answers.

    Each context token gets its own basis direction of the residual stream; the head maps that
    direction to the table's logits. The random transformer layers stay, so the context still matters
    a little (attention, positions): the scores are the model's, not the table's.
    """
    model = build_tiny_model(TINY, tok)
    d = TINY.hidden_size
    ids = tok.convert_tokens_to_ids
    digits = [ids(str(i)) for i in range(1, 10)]
    eq, plus, eos = ids("="), ids("+"), tok.eos_token_id
    rows = {eq: 0, plus: 1, **{t: 2 + i for i, t in enumerate(digits)}}
    table = torch.full((d, len(tok)), -8.0)  # (basis direction, next-token logits)
    table[0, digits] = torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0, -1.5, -2.0, -2.5, -3.0])  # first: mostly 1-4
    table[1, digits] = torch.tensor([-3.0, -2.5, -2.0, -1.5, 3.0, 2.0, 1.0, 0.0, -1.0])  # second: mostly 5-8
    for i in range(len(digits)):  # after a small digit mostly '+', after a large one mostly stop
        table[2 + i, plus], table[2 + i, eos] = (3.0, 0.0) if i < 4 else (0.0, 1.0)
    table[len(rows)] = 0.0  # every other context: uniform
    with torch.no_grad():
        emb = torch.zeros(len(tok), d)
        emb[:, len(rows)] = 4.0
        for t, r in rows.items():
            emb[t] = 0.0
            emb[t, r] = 4.0
        model.model.embed_tokens.weight.copy_(emb)
        # the final RMSNorm maps 4 e_r to sqrt(d) e_r: scale the head so the logits are the table's
        model.lm_head.weight = nn.Parameter(table.T.contiguous() / math.sqrt(d))
    return model.eval()


@pytest.fixture(scope="module")
def models(tok):
    return {"random": build_tiny_model(TINY, tok).eval(), "crafted": _crafted(tok)}


def _plain_logp(model, tok, prompt, completion, temperatures):
    """log pi(y) one sequence at a time: full forward, full float64 softmax, no padding, no chunking."""
    ids = tok(prompt)["input_ids"]
    comp = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([ids + comp])).logits[0].double()
    out = []
    for temperature in temperatures:
        logp = torch.log_softmax(logits / temperature, -1)
        out.append(sum(float(logp[len(ids) + j - 1, t]) for j, t in enumerate(comp)))
    return out


def _plain_metrics(logp, sft_logp, hidden, ks=KS, eps=EPS):
    """The definitions in exact rationals (probabilities: the exact values of the floats exp(logp))."""
    p = [Fraction(math.exp(v)) for v in logp]
    validity = sum(p, Fraction(0))
    out = {"validity": float(validity)}
    for k in ks:
        out[f"pass@{k}"] = float(1 - (1 - validity) ** k)
        out[f"distinct@{k}"] = float(sum((1 - (1 - q) ** k for q in p), Fraction(0)))
        out[f"coverage@{k}"] = out[f"distinct@{k}"] / min(k, len(p))
    shares = [float(q / validity) for q in p]
    out["answer_entropy"] = -sum(s * math.log(s) for s in shares if s > 0)
    for e in eps:
        sft_in = [math.exp(s) >= e for s in sft_logp]
        kept = [a and math.exp(v) >= e for a, v in zip(sft_in, logp, strict=True)]
        out[f"support_kept@{eps_key(e)}"] = sum(kept) / sum(sft_in) if sum(sft_in) else float("nan")
    hv = sum((q for q, h in zip(p, hidden, strict=True) if h), Fraction(0))
    out["hidden/validity"] = float(hv)
    for k in ks:
        out[f"hidden/pass@{k}"] = float(1 - (1 - hv) ** k)
    return out


def _close(got, want, rel, abs_=0.0):
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = float(got[key])
        if math.isnan(w):
            assert math.isnan(g), key
        else:
            assert g == pytest.approx(w, rel=rel, abs=abs_), key


@pytest.mark.parametrize("which", ["random", "crafted"])
def test_every_metric_matches_a_plain_computation(which, models, tok):
    model = models[which]
    # two prompts of different lengths in shared batches: left padding; 2- and 3-term answers
    answers = {"9=": _answers(9, 2) + _answers(9, 3), "12=": _answers(12, 2)}
    prompts = [p for p, a in answers.items() for _ in a]
    comps = [c for a in answers.values() for c in a]
    policy = sequence_logprobs(model, tok, prompts, comps, 0.7, 7, 5, "cpu", max_new_tokens=6)
    sft = sequence_logprobs(model, tok, prompts, comps, 1.0, 64, 4096, "cpu")
    assert policy.dtype == torch.float64 and policy.shape == (len(comps),)
    plain, plain_sft = torch.tensor(
        [_plain_logp(model, tok, p, c, (0.7, 1.0)) for p, c in zip(prompts, comps, strict=True)]
    ).T
    assert policy.tolist() == pytest.approx(plain.tolist(), abs=2e-5)
    assert sft.tolist() == pytest.approx(plain_sft.tolist(), abs=2e-5)
    # no answer sits on an eps boundary, where float32 scores could flip the comparison
    assert (torch.cat([plain, plain_sft])[:, None] - torch.tensor(EPS).log()).abs().min() > 1e-3
    start = 0
    for prompt, a in answers.items():
        rows = slice(start, start + len(a))
        start += len(a)
        hidden = torch.tensor([i % 3 == 0 for i in range(len(a))])
        want = _plain_metrics(plain[rows].tolist(), plain_sft[rows].tolist(), hidden.tolist())
        # the same inputs: the float64 closed forms agree with exact rationals to rounding
        _close(exact_prompt_metrics(plain[rows], plain_sft[rows], KS, EPS, hidden), want, rel=1e-12, abs_=1e-15)
        # the batched, chunked float32 scores: agree to float32 precision
        _close(exact_prompt_metrics(policy[rows], sft[rows], KS, EPS, hidden), want, rel=1e-4, abs_=1e-6)
        if which == "crafted" and prompt == "9=":
            # non-trivial values: the test exercises the metrics away from their ends
            assert 0.05 < want["validity"] < 0.95 and 0 < want["support_kept@1e-05"] < 1
            assert want["pass@1"] < want["pass@4"] < want["pass@64"]
            assert 1 < want["distinct@4"] < 4 and want["coverage@64"] < want["coverage@4"]


def test_too_long_answers_get_minus_infinity_and_count_as_zero(models, tok):
    model = models["crafted"]
    comps = _answers(9, 2) + _answers(9, 3)  # 3 + EOS tokens, 5 + EOS tokens
    full = sequence_logprobs(model, tok, ["9="] * len(comps), comps, 1.0, 16, 64, "cpu")
    capped = sequence_logprobs(model, tok, ["9="] * len(comps), comps, 1.0, 16, 64, "cpu", max_new_tokens=5)
    long = torch.tensor([len(c) + 1 > 5 for c in comps])
    assert int(long.sum()) == len(_answers(9, 3)) and torch.isfinite(full).all()
    assert torch.isneginf(capped[long]).all()
    assert capped[~long].tolist() == pytest.approx(full[~long].tolist(), abs=2e-5)  # other batches: float noise
    got = exact_prompt_metrics(capped, full, KS, EPS, long)
    want = _plain_metrics(capped.tolist(), full.tolist(), long.tolist())
    _close(got, want, rel=1e-12, abs_=1e-15)
    assert float(got["hidden/validity"]) == 0.0 and not any(math.isnan(float(v)) for v in got.values())


def test_validity_is_the_frequency_of_valid_samples(models, tok):
    """20k samples of one prompt: the fraction that are exactly a valid answer (then EOS) is the exact
    validity, and each answer's frequency its pi(y), within 5 sigma = 5 sqrt(p (1 - p) / N)."""
    model, n_samples, max_new = models["crafted"], 20_000, 6
    answers = _answers(9, 2) + _answers(9, 3)
    logp = sequence_logprobs(model, tok, ["9="] * len(answers), answers, 1.0, 64, 4096, "cpu", max_new)
    exact = exact_prompt_metrics(logp, None, [1], [], None)
    enc = tok(["9="], return_tensors="pt")
    cfg = RolloutConfig(group_size=n_samples, max_new_tokens=max_new)
    gen = torch.Generator().manual_seed(0)
    ro = sample(model, enc["input_ids"], enc["attention_mask"], cfg, tok.eos_token_id, tok.pad_token_id, gen)
    # compare token ids, not decoded text: decoding drops special tokens a sample may contain
    eos = [tok.eos_token_id]
    target = {tuple(tok(a, add_special_tokens=False)["input_ids"] + eos): i for i, a in enumerate(answers)}
    counts = torch.zeros(len(answers))
    lengths = ro.completion_mask.sum(-1).long().tolist()
    for row, length, cut in zip(ro.completion_ids.tolist(), lengths, ro.truncated.tolist(), strict=True):
        hit = None if cut else target.get(tuple(row[:length]))
        if hit is not None:
            counts[hit] += 1
    p = float(exact["validity"])
    freq = float(counts.sum()) / n_samples
    assert 0.1 < p < 0.9 and abs(freq - p) < 5 * math.sqrt(p * (1 - p) / n_samples), (freq, p)
    assert float(exact["pass@1"]) == pytest.approx(p, rel=1e-12)
    for i, q in enumerate(logp.exp().tolist()):
        assert abs(counts[i] / n_samples - q) < 5 * math.sqrt(q * (1 - q) / n_samples) + 1e-12, answers[i]


# ---------------------------------------------------------------------------------------- DDP


def _synthetic(seed, prompts=11):
    """Per prompt: (logp (V,), sft_logp (V,), hidden (V,)) with -inf answers, prompts whose SFT mass is
    below every eps (support_kept undefined) and empty hidden sets (hidden metrics undefined)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(prompts):
        v = int(torch.randint(1, 12, (1,), generator=g))
        logits = torch.randn(v + 1, generator=g, dtype=torch.float64) * 3
        logp = torch.log_softmax(logits, 0)[:v]  # the last entry is the mass on invalid completions
        logp[torch.rand(v, generator=g) < 0.15] = float("-inf")
        sft = torch.log_softmax(torch.randn(v + 1, generator=g, dtype=torch.float64) * 3, 0)[:v]
        if i % 4 == 0:
            sft = sft - 30.0  # every answer below every eps
        hidden = torch.rand(v, generator=g) < (0.0 if i % 5 == 1 else 0.4)
        out.append((logp, sft, hidden))
    return out


def _passk_data(seed, prompts=11, n=8):
    rng = random.Random(seed)
    texts = [rng.choice(["a", "b", "c", "d"]) for _ in range(prompts * n)]
    return torch.tensor([rng.random() < 0.4 for _ in texts]), texts


def _fill(rows, exact, passk, seed):
    for logp, sft, hidden in [x for i, x in enumerate(_synthetic(seed)) if i in rows]:
        exact.update(logp, sft, hidden)
    correct, texts = _passk_data(seed)
    lo, hi = rows.start * 8, rows.stop * 8
    passk.update(correct[lo:hi], texts[lo:hi], 8)


def _values(metric):
    return {k: float(v) for k, v in metric.compute_all().items()}


def _metrics_on_rank(rank):
    exact, passk = ExactSupportMetrics(KS, EPS), SampledPassAtK((1, 3, 8))
    _fill(range(0, 7) if rank == 0 else range(7, 11), exact, passk, seed=3)  # uneven shards
    return _values(exact), _values(passk)


def test_two_process_ddp_equals_one_process():
    exact, passk = ExactSupportMetrics(KS, EPS), SampledPassAtK((1, 3, 8))
    _fill(range(0, 11), exact, passk, seed=3)
    want_exact, want_passk = _values(exact), _values(passk)
    assert want_exact["prompts"] == 11 and want_exact["answers"] == sum(x[0].numel() for x in _synthetic(3))
    assert exact.counts[exact.keys.index("hidden/validity")] < 11  # some prompts were left out ...
    assert exact.counts[exact.keys.index("support_kept@1e-02")] < 11  # ... of these averages
    results = run_on_gloo_ranks(_metrics_on_rank)
    for rank in (0, 1):
        got_exact, got_passk = results[rank]
        assert got_exact["prompts"] == 11 and got_exact["answers"] == want_exact["answers"]
        for got, want in ((got_exact, want_exact), (got_passk, want_passk)):
            assert got.keys() == want.keys()
            for key in want:  # float sums in another order: equal to rounding
                assert got[key] == pytest.approx(want[key], rel=1e-13, abs=1e-15), key
    shard_exact, shard_passk = ExactSupportMetrics(KS, EPS), SampledPassAtK((1, 3, 8))
    _fill(range(0, 7), shard_exact, shard_passk, seed=3)
    assert _values(shard_exact)["validity"] != want_exact["validity"]  # the shards differ: the sync mattered
    assert _values(shard_passk)["pass@3"] != want_passk["pass@3"]


def test_metric_averages_each_key_over_the_prompts_where_it_is_defined():
    data = _synthetic(5)
    metric = ExactSupportMetrics(KS, EPS)
    assert set(metric.compute_all()) == set(exact_keys(KS, EPS)) | {"prompts", "answers"}
    assert math.isnan(float(metric.compute()))
    per_prompt = []
    for logp, sft, hidden in data:
        metric.update(logp, sft, hidden)
        per_prompt.append(exact_prompt_metrics(logp, sft, KS, EPS, hidden))
    got = _values(metric)
    for key in exact_keys(KS, EPS):
        defined = [float(v[key]) for v in per_prompt if not math.isnan(float(v[key]))]
        assert got[key] == pytest.approx(sum(defined) / len(defined), rel=1e-13), key
    # without sft_logp and hidden those keys stay NaN
    bare = ExactSupportMetrics(KS, EPS)
    bare.update(data[0][0])
    values = _values(bare)
    assert math.isnan(values["support_kept@1e-02"]) and math.isnan(values["hidden/pass@1"])
    assert values["validity"] == pytest.approx(float(data[0][0].exp().sum()), rel=1e-13)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="empty V"):
        exact_prompt_metrics(torch.zeros(0), None, KS, EPS, None)
    with pytest.raises(ValueError, match="NaN"):
        exact_prompt_metrics(torch.tensor([float("nan")]), None, KS, EPS, None)
    with pytest.raises(ValueError, match="hidden"):
        exact_prompt_metrics(torch.zeros(2), None, KS, EPS, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="eps"):
        ExactSupportMetrics(KS, [0.0])
    with pytest.raises(ValueError, match="ks"):
        ExactSupportMetrics([0], EPS)


def test_numerics_at_the_ends():
    tiny = torch.tensor([-40.0, -45.0], dtype=torch.float64)  # 1 - (1 - p)^k cancels to 0 if done naively
    got = exact_prompt_metrics(tiny, None, [1, 3], [], None)
    p = math.exp(-40) + math.exp(-45)
    assert float(got["pass@3"]) == pytest.approx(3 * p, rel=1e-12)
    assert float(got["distinct@1"]) == pytest.approx(p, rel=1e-12)
    sure = torch.tensor([0.0, float("-inf")], dtype=torch.float64)  # all the mass on one valid answer
    got = exact_prompt_metrics(sure, None, [1, 8], [], None)
    assert float(got["pass@8"]) == 1.0 and float(got["distinct@8"]) == 1.0 and float(got["answer_entropy"]) == 0.0
    over = torch.tensor([math.log(0.6), math.log(0.4000001)], dtype=torch.float64)  # float32 rounding above 1
    assert float(exact_prompt_metrics(over, None, [2], [], None)["pass@2"]) == 1.0
    none = torch.full((3,), float("-inf"), dtype=torch.float64)
    got = exact_prompt_metrics(none, None, [1], [], None)
    assert float(got["validity"]) == 0.0 and float(got["pass@1"]) == 0.0 and math.isnan(float(got["answer_entropy"]))


# ------------------------------------------------------------------------------ hidden targets


def test_random_answers_size_and_determinism():
    target = RandomAnswers(fraction=0.3)
    for v, size in [(1, 1), (2, 1), (5, 2), (10, 3), (15, 5), (36, 11)]:  # round half up, at least 1
        answers = [str(i) for i in range(v)]
        mask = target.select(answers, torch.zeros(v, dtype=torch.float64), "9=", seed=0)
        assert mask.dtype == torch.bool and mask.shape == (v,) and int(mask.sum()) == size, v
    answers = [str(i) for i in range(20)]
    sft = torch.zeros(20, dtype=torch.float64)
    first = target.select(answers, sft, "9=", seed=0)
    assert torch.equal(first, target.select(answers, sft, "9=", seed=0))  # same prompt and seed: same S
    by_key = {tuple(target.select(answers, sft, f"{n}=", seed=0).tolist()) for n in range(20)}
    by_seed = {tuple(target.select(answers, sft, "9=", seed=s).tolist()) for s in range(20)}
    assert len(by_key) >= 15 and len(by_seed) >= 15  # C(20, 6) = 38,760 subsets: collisions are rare
    from cappo_pl.errors import ConfigError

    with pytest.raises(ConfigError, match="fraction"):
        RandomAnswers(fraction=1.0)


def test_rare_answers_are_the_least_likely_under_sft():
    g = torch.Generator().manual_seed(0)
    sft = torch.randn(10, generator=g, dtype=torch.float64)
    mask = RareAnswers(fraction=0.3).select([str(i) for i in range(10)], sft, "x", seed=1)
    assert set(mask.nonzero().flatten().tolist()) == set(sft.argsort()[:3].tolist())
    # ties (here: four answers the sampler cannot emit) are broken by the seeded order, not the listing
    tied = torch.tensor([float("-inf")] * 4 + [-1.0, -2.0], dtype=torch.float64)
    picks = [RareAnswers(fraction=0.3).select(list("abcdef"), tied, f"{n}=", seed=0) for n in range(30)]
    assert all(int(m.sum()) == 2 and not m[4:].any() for m in picks)
    assert len({tuple(m.tolist()) for m in picks}) > 2


def test_edge_failure_removes_the_modal_paths_edge():
    answers = ["0 1 3", "0 2 3", "0 1 2 3", "0 2 1 3", "0 3"]
    sft = torch.tensor([-0.5, -2.0, -3.0, -4.0, -5.0], dtype=torch.float64)  # "0 1 3" is modal
    target = EdgeFailure()
    seen = set()
    for n in range(40):
        mask = target.select(answers, sft, f"p{n}", seed=0).tolist()
        assert not mask[0]  # the modal answer always uses the broken edge
        # S is exactly the answers avoiding one edge of the modal path (undirected: "2 1" uses 1-2)
        avoid = {edge: [edge not in target.edges(a) for a in answers] for edge in [("0", "1"), ("1", "3")]}
        broken = [edge for edge, m in avoid.items() if m == mask]
        assert len(broken) == 1, mask
        seen.add(broken[0])
    assert seen == {("0", "1"), ("1", "3")}  # the seeded pick reaches both edges
    assert avoid[("0", "1")] == [False, True, False, True, True]  # "0 2 1 3" avoids 0-1 ...
    assert avoid[("1", "3")] == [False, True, True, False, True]  # ... but not 1-3
    # directed: "2 1" is not the edge 1 -> 2
    directed = EdgeFailure(directed=True)
    assert ("1", "2") in directed.edges("0 1 2") and ("1", "2") not in directed.edges("0 2 1")


def test_edge_failure_is_empty_when_every_alternative_uses_every_edge():
    target = EdgeFailure(separator="-")
    answers = ["a-b-c", "a-b-c-b-c", "a-b-a-b-c"]  # every answer uses a-b and b-c
    sft = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)
    assert not target.select(answers, sft, "k", seed=0).any()
    assert not target.select(["a-b"], torch.zeros(1, dtype=torch.float64), "k", seed=0).any()  # V = {modal}
    assert not target.select(["a"], torch.zeros(1, dtype=torch.float64), "k", seed=0).any()  # no edge at all
    metrics = exact_prompt_metrics(sft, None, [1], [], target.select(answers, sft, "k", seed=0))
    assert math.isnan(float(metrics["hidden/validity"]))  # left out of the hidden averages


def test_random_targets_are_fair_at_pass1_and_reward_support_at_large_k():
    """Two policies of validity 0.9 on |V| = 10: one on a single answer, one spread evenly. Over many
    random S (|S| = 3), both have expected hidden validity 0.3 * 0.9; hidden pass@64 tells them apart."""
    v, draws = 10, 800
    answers = [str(i) for i in range(v)]
    collapsed = torch.tensor([math.log(0.9)] + [-60.0] * (v - 1), dtype=torch.float64)
    spread = torch.full((v,), math.log(0.09), dtype=torch.float64)
    target = RandomAnswers(fraction=0.3)
    results = {}
    for name, logp in (("collapsed", collapsed), ("spread", spread)):
        metric = ExactSupportMetrics([1, 64], [])
        for n in range(draws):
            metric.update(logp, None, target.select(answers, logp, f"prompt {n}", seed=7))
        results[name] = _values(metric)
    want = 3 / v * 0.9
    # the collapsed policy's hidden validity is 0.9 or 0 (S holds its answer with probability 3/10)
    sigma = 0.9 * math.sqrt(0.3 * 0.7 / draws)
    assert abs(results["collapsed"]["hidden/validity"] - want) < 5 * sigma
    assert results["spread"]["hidden/validity"] == pytest.approx(want, rel=1e-12)  # every S: 3 x 0.09
    assert results["collapsed"]["hidden/pass@64"] < 0.4 < 0.99 < results["spread"]["hidden/pass@64"]
    assert results["collapsed"]["validity"] == pytest.approx(results["spread"]["validity"], rel=1e-12)
