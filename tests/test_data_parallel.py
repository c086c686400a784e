"""Data parallelism without processes: the pieces that make W ranks equal one process.

Each test splits one global batch over W simulated ranks; ``FakeGroup`` plays the all-reduce (ranks
call collectives in the same order, as real ones must).
"""

from __future__ import annotations

import pytest
import torch

from cappo_pl.advantages import GAE, ReinforcePlusPlus, masked_whiten
from cappo_pl.data import PromptStream, SumTask
from cappo_pl.losses import AGG_MODES, agg_loss
from cappo_pl.losses.aggregation import GlobalBatch, masked_mean
from cappo_pl.models import TinyModelConfig, build_char_tokenizer, build_tiny_model
from cappo_pl.rollout import RolloutConfig, inverse_cdf_sample, row_uniforms, sample


class FakeGroup:
    """W simulated ranks; ``run(fn)`` returns ``[fn(rank, dp_r) for r]`` with every all-reduce answered exactly.

    A later collective's inputs may depend on an earlier one's answer (two-pass variance), so each
    round answers one more call: round k records what every rank sends to call k, given exact answers
    to calls < k, until every call is answered.
    """

    def __init__(self, world: int) -> None:
        self.world = world

    def run(self, fn):
        answers: list[torch.Tensor] = []
        while True:
            sent: list[list[torch.Tensor]] = [[] for _ in range(self.world)]

            def rank_sum(r, sent=sent):
                def s(t):  # in place, as Lightning's all-reduce: an input reused after the call would show
                    i = len(sent[r])
                    sent[r].append(t.detach().clone())
                    if i < len(answers):
                        t.copy_(answers[i])
                    return t

                return s

            outs = [fn(r, GlobalBatch(self.world, rank_sum(r))) for r in range(self.world)]
            if len(answers) == len(sent[0]):
                return outs
            answers.append(sum(sent[q][len(answers)] for q in range(self.world)))


def _global_batch(rows=6, cols=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    losses = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 0, 5, 3, 6])[:rows]  # unequal per rank, one row with no token
    mask = (torch.arange(cols)[None] < lengths[:, None]).double()
    return losses, mask


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("split", [[3, 3], [2, 4], [1, 2, 3]])
def test_ranks_losses_average_to_the_global_loss_and_gradient(mode, split):
    losses, mask = _global_batch()
    x = losses.clone().requires_grad_(True)
    reference = agg_loss(x, mask, mode, loss_scale_factor=8.0)
    (ref_grad,) = torch.autograd.grad(reference, x)
    bounds = torch.tensor([0, *split]).cumsum(0).tolist()
    xs = [losses[a:b].clone().requires_grad_(True) for a, b in zip(bounds, bounds[1:], strict=False)]
    ms = [mask[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    per_rank = FakeGroup(len(split)).run(lambda r, dp: agg_loss(xs[r], ms[r], mode, 8.0, dp))
    ddp_loss = sum(per_rank) / len(split)  # DDP averages the ranks' gradients, i.e. their losses
    ddp_loss.backward()
    torch.testing.assert_close(ddp_loss.detach(), reference.detach())
    torch.testing.assert_close(torch.cat([t.grad for t in xs]), ref_grad)


def test_a_per_rank_token_mean_would_differ():
    """The bug global normalisation fixes: ranks with unequal token counts weight tokens unequally."""
    losses, mask = _global_batch()
    per_rank_mean = (agg_loss(losses[:2], mask[:2]) + agg_loss(losses[2:], mask[2:])) / 2
    assert not torch.isclose(per_rank_mean, agg_loss(losses, mask))


def test_global_masked_mean_whiten_and_reinforce_pp():
    losses, mask = _global_batch()
    halves = [(losses[:2], mask[:2]), (losses[2:], mask[2:])]
    means = FakeGroup(2).run(lambda r, dp: masked_mean(*halves[r], dp))
    assert all(torch.allclose(m, masked_mean(losses, mask)) for m in means)
    white = FakeGroup(2).run(lambda r, dp: masked_whiten(*halves[r], dp=dp))
    torch.testing.assert_close(torch.cat(white), masked_whiten(losses, mask))
    # REINFORCE++: batch statistics over both ranks' sequences (group baseline stays per group)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.0])
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    m = torch.ones(8, 3)
    est = ReinforcePlusPlus(group_baseline=True)
    parts = FakeGroup(2).run(
        lambda r, dp: est.token_advantages(rewards[4 * r : 4 * r + 4], 2, valid[4 * r : 4 * r + 4], m[:4], dp=dp)[0]
    )
    torch.testing.assert_close(torch.cat(parts), est.token_advantages(rewards, 2, valid, m)[0])
    # GAE's whitening as well
    values = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    gae = GAE(lam=0.9)
    parts = FakeGroup(2).run(
        lambda r, dp: gae.token_advantages(rewards[4 * r : 4 * r + 4], 2, valid[4 * r : 4 * r + 4], m[:4],
                                           values[4 * r : 4 * r + 4], dp)[0]  # fmt: skip
    )
    torch.testing.assert_close(torch.cat(parts), gae.token_advantages(rewards, 2, valid, m, values)[0])


# ------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_draw_disjoint_slices_of_the_one_process_global_batch(world):
    recs = SumTask().train_records()
    one = PromptStream(recs, 2 * world, 5, seed=3)
    ranks = [PromptStream(recs, 2, 5, seed=3, rank=r, world_size=world) for r in range(world)]
    for index in (0, 1, 7, 40):  # 40: past a pass boundary
        parts = [s.batch(index) for s in ranks]
        assert [r.prompt for p in parts for r in p.records] == [r.prompt for r in one.batch(index).records]
        assert [p.offset for p in parts] == [2 * r for r in range(world)]
        extras = [s.extra_batch(index, 1) for s in ranks]
        assert [r.prompt for p in extras for r in p.records] == [r.prompt for r in one.extra_batch(index, 1).records]


def test_a_global_batch_larger_than_the_data_names_the_ranks():
    recs = SumTask().train_records()
    with pytest.raises(Exception, match=r"data.prompts_per_step=\d+ x 4 ranks is larger than"):
        PromptStream(recs, len(recs) // 2, 5, seed=0, rank=0, world_size=4)


# ------------------------------------------------------------------------------------ sampling
def test_inverse_cdf_sample_brute_force_and_frequencies():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(50, 9, generator=gen) * (torch.rand(50, 9, generator=gen) > 0.3)
    probs[:, 4] += 0.01  # every row has mass
    u = torch.rand(50, generator=gen)
    got = inverse_cdf_sample(probs, u)
    for i in range(50):
        acc, target, pick = 0.0, float(u[i]) * float(probs[i].sum()), None
        for j in range(9):
            acc += float(probs[i, j])
            if acc > target:
                pick = j
                break
        assert int(got[i]) == pick
        assert probs[i, pick] > 0  # a zero-probability id is never drawn
    # with uniform u the draws follow p (5 sigma on 40k draws)
    p = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05])
    draws = inverse_cdf_sample(p.expand(40_000, 5), torch.rand(40_000, generator=gen))
    freq = torch.bincount(draws, minlength=5).double() / 40_000
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / 40_000).sqrt() + 1e-12).all()


def test_seed_per_prompt_samples_do_not_depend_on_the_batch_they_are_drawn_in():
    tok = build_char_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok)
    model.eval()
    cfg = RolloutConfig(group_size=3, max_new_tokens=8, temperature=1.5)
    prompts = ["12+30=", "7=", "101+5="]  # different lengths: different left padding per batch
    keys = [[100 * p + g for g in range(3)] for p in range(3)]

    def draw(idx):
        enc = tok([prompts[i] for i in idx], padding=True, padding_side="left", return_tensors="pt")
        u = row_uniforms([k for i in idx for k in keys[i]], cfg.max_new_tokens)
        ro = sample(model, enc["input_ids"], enc["attention_mask"], cfg, tok.eos_token_id, tok.pad_token_id,
                    uniforms=u)  # fmt: skip
        return ro.completion_ids, ro.completion_mask

    together_ids, together_mask = draw([0, 1, 2])
    for i in range(3):
        alone_ids, alone_mask = draw([i])
        width = int(alone_mask.sum(-1).max())
        assert torch.equal(together_ids[3 * i : 3 * i + 3, :width] * together_mask[3 * i : 3 * i + 3, :width].long(),
                           alone_ids[:, :width] * alone_mask[:, :width].long())  # fmt: skip
    assert len({tuple(r) for r in together_ids.tolist()}) > 1  # rows differ: keys are per row
