"""DAPO's sampling components: overlong shaping and filtering, dynamic sampling, stacking rollouts."""

import torch

from cappo_pl.data.datamodule import PromptStream
from cappo_pl.data.records import Record
from cappo_pl.experience import DynamicSamplingConfig, Generation, OverlongConfig, collect_experience, overlong_penalty
from cappo_pl.models import TinyModelConfig, build_char_tokenizer, build_tiny_model
from cappo_pl.rollout import Rollout, RolloutConfig, sample
from cappo_pl.scoring import score_completions

G = 4


def test_overlong_penalty_matches_the_piecewise_definition():
    max_len, buf, factor = 20, 5, 0.7
    lengths = torch.arange(0, max_len + 1)
    got = overlong_penalty(lengths, max_len, buf, factor)
    for n, value in zip(lengths.tolist(), got.tolist(), strict=True):
        # 0 up to L_max - L_buf, then linear to -factor at L_max (DAPO Eq. 13)
        want = 0.0 if n <= max_len - buf else -factor * (n - (max_len - buf)) / buf
        assert abs(value - want) < 1e-6, (n, value, want)
    assert abs(got[-1].item() + factor) < 1e-6


def _fake_rollout(lengths: list[int], width: int, prompt_width: int = 3, tag: int = 0) -> Rollout:
    n = len(lengths)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).float()
    return Rollout(
        prompt_ids=torch.full((n, prompt_width), 5 + tag),
        prompt_mask=torch.ones(n, prompt_width, dtype=torch.long),
        completion_ids=torch.arange(n * width).view(n, width) + 1000 * tag,
        completion_mask=mask,
        rollout_logp=-mask,
        truncated=torch.tensor([length >= width for length in lengths]),
    )


def _gen(records, rewards, lengths, width, tag=0, valid=None):
    r = torch.tensor(rewards, dtype=torch.float32)
    v = torch.ones_like(r, dtype=torch.bool) if valid is None else torch.tensor(valid)
    texts = [f"{tag}:{i}" for i in range(len(rewards))]
    return Generation(records, _fake_rollout(lengths, width, tag=tag), texts, r, v, (r >= 1.0) & v)


def _records(tag, n=2):
    return [Record(prompt=f"p{tag}.{i}") for i in range(n)]


def test_dynamic_sampling_keeps_informative_groups_until_full():
    # batch 0: group 0 all correct (dropped), group 1 mixed (kept); batch 1: group 0 mixed, group 1 mixed:
    # the step needs 2 groups, so only batch 1's first group is taken, and generation stops.
    batches = {
        0: _gen(_records(0), [1, 1, 1, 1, 0, 1, 0, 0], [3] * 8, 5, tag=0),
        1: _gen(_records(1), [0, 1, 0, 0, 1, 0, 1, 1], [2] * 8, 7, tag=1),
        2: _gen(_records(2), [0, 1, 0, 1, 0, 1, 0, 1], [2] * 8, 7, tag=2),
    }
    calls = []

    def generate(records, k):
        calls.append(k)
        return batches[k]

    exp = collect_experience(
        _records(0), generate, lambda k: _records(k), G, 8, 0,
        DynamicSamplingConfig(True, "accuracy", 5), OverlongConfig(),
    )  # fmt: skip
    assert calls == [0, 1]
    assert [r.prompt for r in exp.records] == ["p0.1", "p1.0"]
    assert exp.texts == ["0:4", "0:5", "0:6", "0:7", "1:0", "1:1", "1:2", "1:3"]
    assert exp.rewards.tolist() == [0, 1, 0, 0, 0, 1, 0, 0]
    # stacked to the wider batch: batch 0's rows padded from 5 to 7 completion positions, masked
    assert exp.rollout.completion_ids.shape == (8, 7)
    assert exp.mask[:4, 5:].sum() == 0 and exp.mask[:4].sum() == 12 and exp.mask[4:].sum() == 8
    assert exp.stats["dynamic/gen_batches"].item() == 2
    assert exp.stats["dynamic/informative_frac"].item() == 3 / 4
    assert exp.stats["dynamic/fill"].item() == 1.0


def test_dynamic_sampling_cap_trains_on_what_it_has_and_falls_back_to_the_first_batch():
    mixed = _gen(_records(0), [1, 1, 1, 1, 0, 1, 0, 0], [3] * 8, 5)
    flat = _gen(_records(1), [0] * 8, [3] * 8, 5, tag=1)
    cfg = DynamicSamplingConfig(True, "accuracy", 3)
    exp = collect_experience(
        _records(0), lambda r, k: mixed if k == 0 else flat, _records, G, 8, 0, cfg, OverlongConfig()
    )
    assert [r.prompt for r in exp.records] == ["p0.1"]
    assert exp.stats["dynamic/gen_batches"].item() == 3 and exp.stats["dynamic/fill"].item() == 0.5
    none = collect_experience(_records(1), lambda r, k: flat, _records, G, 8, 0, cfg, OverlongConfig())
    assert [r.prompt for r in none.records] == ["p1.0", "p1.1"] and none.stats["dynamic/fill"].item() == 0.0


def test_reward_metric_sees_the_length_penalty_and_accuracy_does_not():
    # all correct, lengths differ: accuracy has zero variance (dropped), the shaped reward does not
    gen = lambda: _gen(_records(0, 1), [1, 1, 1, 1], [4, 6, 7, 8], 8)  # noqa: E731
    over = OverlongConfig(buffer_len=2, penalty_factor=1.0)
    by_reward = collect_experience(
        _records(0, 1), lambda r, k: gen(), _records, G, 8, 0, DynamicSamplingConfig(True, "reward", 1), over
    )
    assert by_reward.rewards.tolist() == [1.0, 1.0, 0.5, 0.0]
    assert by_reward.correct.tolist() == [True] * 4  # judged before shaping
    assert by_reward.stats["dynamic/fill"].item() == 1.0
    assert abs(by_reward.stats["reward/overlong_penalty"].item() - (-1.5 / 4)) < 1e-6
    by_acc = collect_experience(
        _records(0, 1), lambda r, k: gen(), _records, G, 8, 0, DynamicSamplingConfig(True, "accuracy", 1), over
    )
    assert by_acc.stats["dynamic/fill"].item() == 0.0


def test_overlong_filter_masks_truncated_completions_and_skipped_rewards():
    gen = _gen(_records(0, 1), [1, 0, 1, 0], [3, 8, 8, 2], 8, valid=[True, True, True, False])
    exp = collect_experience(
        _records(0, 1), lambda r, k: gen, _records, G, 8, 0,
        DynamicSamplingConfig(), OverlongConfig(filter_truncated=True),
    )  # fmt: skip
    assert exp.mask.sum(-1).tolist() == [3.0, 0.0, 0.0, 0.0]
    assert "dynamic/fill" not in exp.stats


def test_stacked_rollouts_score_like_their_parts():
    tok = build_char_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok)
    model.eval()
    parts = []
    for i, prompts in enumerate([["1+2=", "30="], ["4="]]):
        enc = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
        cfg = RolloutConfig(group_size=2, max_new_tokens=4 + 3 * i, top_k_logprobs=3)
        gen = torch.Generator().manual_seed(i)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        parts.append(sample(model, ids, mask, cfg, tok.eos_token_id, tok.pad_token_id, gen))
    both = Rollout.cat(parts, tok.pad_token_id)
    assert both.prompt_ids.shape[1] == max(p.prompt_ids.shape[1] for p in parts)
    assert both.completion_ids.shape[1] == max(p.completion_ids.shape[1] for p in parts)
    with torch.no_grad():
        whole = score_completions(model, both.input_ids, both.attention_mask, both.completion_ids.shape[1])
        start = 0
        for p in parts:
            own = score_completions(model, p.input_ids, p.attention_mask, p.completion_ids.shape[1])
            n, t = p.completion_ids.shape
            m = p.completion_mask.bool()
            torch.testing.assert_close(whole.logp[start : start + n, :t][m], own.logp[m], atol=1e-5, rtol=1e-5)
            assert torch.equal(both.topk_ids[start : start + n, :t], p.topk_ids)
            assert both.completion_mask[start : start + n, t:].sum() == 0
            start += n


def test_extra_batches_are_pure_functions_of_seed_step_and_k():
    records = [Record(prompt=str(i)) for i in range(50)]
    a, b = PromptStream(records, 8, 10, seed=3), PromptStream(records, 8, 10, seed=3)
    b.mark_consumed(7)  # the main stream's position does not move them
    assert [r.prompt for r in a.extra_batch(4, 1).records] == [r.prompt for r in b.extra_batch(4, 1).records]
    assert [r.prompt for r in a.extra_batch(4, 1).records] != [r.prompt for r in a.extra_batch(4, 2).records]
    assert len({r.prompt for r in a.extra_batch(4, 1).records}) == 8  # without replacement
    assert a.position == 0


def test_config_errors_and_mismatched_parts():
    import pytest

    from cappo_pl.errors import ConfigError
    from cappo_pl.module import PPOConfig, RLModule

    with pytest.raises(ConfigError, match="model.ppo.minibatches"):
        RLModule(
            rollout=RolloutConfig(group_size=4), ppo=PPOConfig(minibatches=8),
            dynamic_sampling=DynamicSamplingConfig(enabled=True),
        )  # fmt: skip
    with pytest.raises(ConfigError, match="model.overlong.buffer_len"):
        RLModule(rollout=RolloutConfig(max_new_tokens=8), overlong=OverlongConfig(buffer_len=9))
    a = _fake_rollout([2, 3], 4)
    b = _fake_rollout([1, 1], 4)
    b.topk_ids, b.topk_logp = torch.zeros(2, 4, 3, dtype=torch.long), torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match="top-k"):
        Rollout.cat([a, b], 0)
