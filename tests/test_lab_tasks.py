"""The contraction lab's enumerable tasks: zipf_draw, SumTask.valid_completions / Zipf references, PathTask."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from collections import Counter

import pytest

from cappo_pl.data import PathTask, SumTask, zipf_draw
from cappo_pl.data.records import reward_fields
from cappo_pl.errors import ConfigError
from cappo_pl.rewards.base import call_reward


def _records_hash(task) -> str:
    recs = task.train_records() + task.val_records()
    payload = [(r.prompt, r.references, r.answer, r.extra, r.source) for r in recs]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _rewards(task, records, completions_per_record: list[list[str]]) -> list[list[float]]:
    """Score each record's completions through the reward, called as the trainer calls it."""
    out = []
    for rec, comps in zip(records, completions_per_record, strict=True):
        fields = reward_fields([rec], len(comps))
        rewards, _ = call_reward(task.reward_fn(), [rec.prompt] * len(comps), comps, fields)
        out.append(rewards.tolist())
    return out


# ---------------------------------------------------------------------------------------------- zipf_draw


def test_zipf_draw_is_seeded_and_deterministic():
    answers = [f"a{i}" for i in range(20)]
    one = zipf_draw(answers, 200, 1.0, random.Random(5))
    assert one == zipf_draw(answers, 200, 1.0, random.Random(5))
    assert one != zipf_draw(answers, 200, 1.0, random.Random(6))
    assert answers == [f"a{i}" for i in range(20)]  # not shuffled in place
    assert set(one) <= set(answers) and len(one) == 200
    assert zipf_draw([], 5, 1.0, random.Random(0)) == [] and zipf_draw(answers, 0, 1.0, random.Random(0)) == []


@pytest.mark.parametrize("exponent", [1.0, 2.0])
def test_zipf_draw_frequencies_follow_the_zipf_law(exponent):
    answers = [f"x{i}" for i in range(10)]
    count = 20_000
    draws = zipf_draw(answers, count, exponent, random.Random(11))
    ranked = list(answers)
    random.Random(11).shuffle(ranked)  # the documented ranking: the rng's first act is one shuffle
    weights = [1 / r**exponent for r in range(1, 11)]
    probs = [w / sum(weights) for w in weights]
    freq = Counter(draws)
    for answer, p in zip(ranked, probs, strict=True):
        sigma = math.sqrt(p * (1 - p) / count)
        assert abs(freq[answer] / count - p) < 5 * sigma, (answer, freq[answer] / count, p)
    assert freq[ranked[0]] > 5 * max(freq[ranked[-1]], 1)  # the top answer is drawn far more than the last


# ---------------------------------------------------------------------------------------------- SumTask


def test_sum_task_defaults_are_unchanged():
    # hashes of the records computed before valid_completions / reference_dist existed (cached SFT keys)
    assert _records_hash(SumTask()) == "7120081e561e9e9daf712cd5e904ee16ccf586e99d1408718d6fb88b78135386"
    other = SumTask(n_terms=3, min_n=5, max_n=30, references_per_prompt=8, seed=3)
    assert _records_hash(other) == "5004101bb066ccd4184356d9e9029596ef152da375dc7900fdd9e1f43dfc88a2"
    assert _records_hash(SumTask(reference_dist="uniform", zipf_exponent=3.0)) == _records_hash(SumTask())


@pytest.mark.parametrize("n_terms", [2, 3])
def test_sum_valid_completions_are_exactly_what_the_reward_accepts(n_terms):
    task = SumTask(min_n=n_terms, max_n=11, n_terms=n_terms, val_every=3)
    records = task.train_records() + task.val_records()
    candidates = []
    for rec in records:
        n = rec.extra["target"]
        candidates.append(["+".join(map(str, t)) for t in itertools.product(range(n + 2), repeat=n_terms)])
    for rec, comps, rewards in zip(records, candidates, _rewards(task, records, candidates), strict=True):
        accepted = {c for c, r in zip(comps, rewards, strict=True) if r == 1.0}
        valid = task.valid_completions(rec)
        assert len(valid) == len(set(valid)) and set(valid) == accepted, rec.prompt


def test_sum_zipf_references():
    task = SumTask(reference_dist="zipf", references_per_prompt=40, zipf_exponent=1.0)
    again = SumTask(reference_dist="zipf", references_per_prompt=40, zipf_exponent=1.0)
    assert _records_hash(task) == _records_hash(again) != _records_hash(SumTask(references_per_prompt=40))
    for rec in task.train_records() + task.val_records():
        assert len(rec.references) == 40 and set(rec.references) <= set(task.valid_completions(rec))
    big = task.train_records()[-1]
    assert Counter(big.references).most_common(1)[0][1] >= 4  # the skew shows: a popular answer repeats
    with pytest.raises(ConfigError, match="reference_dist"):
        SumTask(reference_dist="normal")
    with pytest.raises(ConfigError, match="zipf_exponent"):
        SumTask(reference_dist="zipf", zipf_exponent=0.0)


# ---------------------------------------------------------------------------------------------- PathTask


@pytest.fixture(scope="module")
def path_task() -> PathTask:
    return PathTask()


def _brute_force_paths(edges, s: str, t: str) -> set[str]:
    """All s -> t paths by an explicit-stack DFS over the edge set alone."""
    succ: dict[str, list[str]] = {}
    for u, v in edges:
        succ.setdefault(u, []).append(v)
    found, stack = set(), [[s]]
    while stack:
        path = stack.pop()
        if path[-1] == t:
            found.add(" ".join(path))
            continue
        stack.extend([*path, v] for v in succ.get(path[-1], []))
    return found


def test_path_task_is_deterministic():
    a, b, c = PathTask(seed=1), PathTask(seed=1), PathTask(seed=2)
    assert a.edges == b.edges and _records_hash(a) == _records_hash(b)
    assert [(r.prompt, r.references) for r in a.sft_records()] == [(r.prompt, r.references) for r in b.sft_records()]
    assert a.edges != c.edges


def test_path_graph_shape(path_task):
    nodes = [v for layer in path_task.layers for v in layer]
    assert 40 <= len(nodes) <= 60 and 5 <= len(path_task.layers) <= 6
    assert len(set(nodes)) == len(nodes) and all(len(v) == 2 and v.isdigit() for v in nodes)
    layer_of = {v: k for k, layer in enumerate(path_task.layers) for v in layer}
    assert all(layer_of[v] == layer_of[u] + 1 for u, v in path_task.edges)  # consecutive layers only
    out = Counter(u for u, _ in path_task.edges)
    assert all(out[u] == path_task.out_degree for layer in path_task.layers[:-1] for u in layer)


def test_path_valid_completions_match_brute_force(path_task):
    records = path_task.train_records() + path_task.val_records()
    assert len(records) > 100
    for rec in records:
        s, t = rec.extra["s"], rec.extra["t"]
        assert rec.prompt == f"{s} {t}:" and rec.source.startswith("builtin:path#")
        valid = path_task.valid_completions(rec)
        assert len(valid) == len(set(valid)) == rec.extra["n_paths"]
        assert path_task.min_paths <= len(valid) <= path_task.max_paths
        assert set(valid) == _brute_force_paths(path_task.edges, s, t)
        assert set(rec.references) <= set(valid) and len(rec.references) == path_task.references_per_pair


def test_path_reward_is_one_exactly_on_valid_paths(path_task):
    layer_of = {v: k for k, layer in enumerate(path_task.layers) for v in layer}
    records = path_task.val_records()[:6]
    candidates = []
    for rec in records:  # every sequence with one node per layer from s to t: all candidate paths
        s, t = rec.extra["s"], rec.extra["t"]
        middle = path_task.layers[layer_of[s] + 1 : layer_of[t]]
        candidates.append([" ".join((s, *mid, t)) for mid in itertools.product(*middle)])
    for rec, comps, rewards in zip(records, candidates, _rewards(path_task, records, candidates), strict=True):
        assert {c for c, r in zip(comps, rewards, strict=True) if r == 1.0} == set(path_task.valid_completions(rec))
    rec = path_task.val_records()[0]
    s, t = rec.extra["s"], rec.extra["t"]
    good = path_task.valid_completions(rec)[0]
    nodes = good.split(" ")
    wrong_edge = next(
        " ".join([s, v, *nodes[2:]]) for v in path_task.layers[layer_of[s] + 1] if (s, v) not in path_task.edges
    )
    other_end = next(v for v in path_task.layers[layer_of[t]] if v != t)
    bad = [
        wrong_edge,
        " ".join([*nodes[:-1], other_end]),  # wrong end
        " ".join(nodes[:-1]),  # stops early
        " ".join(nodes[1:]),  # wrong start
        good.replace(" ", "  ", 1),  # double space
        good.replace(" ", ","),
        "",
        "hello",
        f"{good} {t}",
    ]
    rewards = _rewards(path_task, [rec], [[good, f" {good} ", *bad]])[0]
    assert rewards == [1.0, 1.0] + [0.0] * len(bad)


def test_path_split_and_sft_records(path_task):
    train, val = path_task.train_records(), path_task.val_records()
    pairs = len(train) + len(val)
    assert abs(len(val) - round(path_task.val_fraction * pairs)) <= 2 and len(val) > 0
    sft = path_task.sft_records()
    sft_prompts = {r.prompt for r in sft}
    assert not {r.prompt for r in val} & sft_prompts  # held-out pairs are unseen
    assert [r for r in sft if r.source.startswith("builtin:path#")] == train
    edge_examples = {(r.prompt, tuple(r.references)) for r in sft if not r.source.startswith("builtin:path#")}
    assert edge_examples == {(f"{u} {v}:", (f"{u} {v}",)) for u, v in path_task.edges}
    # ALPINE: every held-out (s, t) has a successor u of s with (u, t) an edge or seen on a training path
    observed = set(path_task.edges)
    for rec in train:
        for ref in rec.references:
            nodes = ref.split(" ")
            observed |= {(a, b) for i, a in enumerate(nodes) for b in nodes[i + 1 :]}
    for rec in val:
        s, t = rec.extra["s"], rec.extra["t"]
        assert any((v, t) in observed for u, v in path_task.edges if u == s), rec.prompt


def test_path_task_rejects_bad_shapes():
    with pytest.raises(ConfigError, match="100"):
        PathTask(n_layers=11, nodes_per_layer=10)
    with pytest.raises(ConfigError, match="min_paths"):
        PathTask(min_paths=9, max_paths=3)
    with pytest.raises(ConfigError, match="out_degree"):
        PathTask(out_degree=9)
    with pytest.raises(ConfigError, match="no pair"):
        PathTask(min_paths=10_000, max_paths=20_000)
