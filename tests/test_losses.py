import math

import pytest
import torch

from cappo_pl.losses import AGG_MODES, PPOClip, TokenBatch, agg_loss, kl_penalty


def ppo_clip_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2, c=3.0, agg="token-mean"):
    batch = TokenBatch(logp=logp, old_logp=old, rollout_logp=old, advantages=adv, mask=mask)
    return PPOClip(eps_low, eps_high, c, agg)(batch)


def _loop_agg(loss, mask, mode, L=None):
    B, T = loss.shape
    rows = [[(loss[i, t].item(), mask[i, t].item()) for t in range(T)] for i in range(B)]
    if mode == "token-mean":
        return sum(v * m for r in rows for v, m in r) / sum(m for r in rows for _, m in r)
    if mode == "token-sum":
        return sum(v * m for r in rows for v, m in r)
    if mode == "seq-mean-token-mean":
        per = [sum(v * m for v, m in r) / sum(m for _, m in r) for r in rows if sum(m for _, m in r) > 0]
        return sum(per) / len(per)
    if mode == "seq-mean-token-sum":
        return sum(sum(v * m for v, m in r) for r in rows) / B
    if mode == "seq-mean-token-sum-norm":
        return sum(v * m for r in rows for v, m in r) / (B * (L if L is not None else T))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregation_matches_plain_loop(mode):
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(4, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]).float()
    assert agg_loss(loss, mask, mode).item() == pytest.approx(_loop_agg(loss, mask, mode), rel=1e-6)


def test_seq_mean_token_sum_norm_uses_constant():
    loss, mask = torch.ones(2, 5), torch.ones(2, 5)
    assert agg_loss(loss, mask, "seq-mean-token-sum-norm", loss_scale_factor=10.0).item() == pytest.approx(0.5)


def test_all_masked_gives_zero_not_nan():
    for mode in AGG_MODES:
        assert agg_loss(torch.randn(2, 3), torch.zeros(2, 3), mode).item() == 0.0


def _ppo_token(logp, old, a, el, eh, c):
    r = math.exp(logp - old)
    l1, l2 = -a * r, -a * min(max(r, 1 - el), 1 + eh)
    lc = max(l1, l2)
    return min(lc, -a * c) if (c is not None and a < 0) else lc


# (logp - old, advantage) covering: in range, clipped high with A>0, clipped low with A<0,
# r below range with A>0 (unclipped branch), r above range with A<0, dual-clip (A<0, r > c).
CASES = [(0.05, 1.0), (0.5, 1.0), (-0.5, -1.0), (-0.5, 1.0), (0.5, -1.0), (1.5, -2.0), (0.0, 0.0)]


@pytest.mark.parametrize("eps_low,eps_high,c", [(0.2, 0.2, 3.0), (0.2, 0.28, None), (0.1, 0.3, 2.0)])
def test_ppo_clip_values_and_gradients(eps_low, eps_high, c):
    delta = torch.tensor([[d for d, _ in CASES]], dtype=torch.float64)
    adv = torch.tensor([[a for _, a in CASES]], dtype=torch.float64)
    old = torch.full_like(delta, -1.0)
    logp = (old + delta).clone().requires_grad_(True)
    mask = torch.ones_like(delta)
    loss, metrics = ppo_clip_loss(logp, old, adv, mask, eps_low, eps_high, c, "token-sum")
    expected = [_ppo_token(old[0, i].item() + d, -1.0, a, eps_low, eps_high, c) for i, (d, a) in enumerate(CASES)]
    assert loss.item() == pytest.approx(sum(expected), rel=1e-9)
    loss.backward()
    # Analytic gradient w.r.t. logp: -A r on the unclipped branch, 0 where a clip (or dual-clip) binds.
    for i, (d, a) in enumerate(CASES):
        r = math.exp(d)
        clipped = (a > 0 and r > 1 + eps_high) or (a < 0 and r < 1 - eps_low)
        dual = c is not None and a < 0 and -a * r > -a * c
        want = 0.0 if (clipped or dual) else -a * r
        assert logp.grad[0, i].item() == pytest.approx(want, abs=1e-9), (d, a)
    n = len(CASES)
    assert metrics["clipfrac_high"].item() == pytest.approx(
        sum(a > 0 and math.exp(d) > 1 + eps_high for d, a in CASES) / n
    )
    assert metrics["clipfrac_low"].item() == pytest.approx(
        sum(a < 0 and math.exp(d) < 1 - eps_low for d, a in CASES) / n
    )


def test_ppo_masked_tokens_do_not_contribute():
    logp = torch.zeros(1, 3, requires_grad=True)
    adv = torch.ones(1, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, _ = ppo_clip_loss(logp, torch.zeros(1, 3), adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0)
    assert logp.grad[0, 2].item() == 0.0


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_kl_estimators_match_formulas(est):
    logp = torch.tensor([-1.0, -2.0, -0.3, -4.0])
    ref = torch.tensor([-1.5, -1.0, -0.3, -0.5])
    d = (ref - logp).tolist()
    want = {"k1": [-x for x in d], "k2": [0.5 * x * x for x in d], "k3": [min(math.exp(x) - x - 1, 10.0) for x in d]}[
        est
    ]  # verl clamps k3 to [-10, 10]
    assert kl_penalty(logp, ref, est).tolist() == pytest.approx(want, rel=1e-6)


def test_k3_is_unbiased_kl_on_samples():
    # E_{x~p}[k3] = KL(p||q) for categorical p, q: checked by exact expectation over the support.
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum()
    k3 = kl_penalty(p.log(), q.log(), "k3")
    assert (p * k3).sum().item() == pytest.approx(exact.item(), rel=1e-6)


@pytest.mark.parametrize("base", ["k1", "k2", "k3"])
def test_straight_through_has_base_value_and_k2_gradient(base):
    ref = torch.tensor([-1.5, -1.0, -0.2])
    a = torch.tensor([-1.0, -2.0, -0.3], requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    st = kl_penalty(a, ref, base + "+")
    assert st.tolist() == pytest.approx(kl_penalty(a, ref, base).tolist())
    st.sum().backward()
    kl_penalty(b, ref, "k2").sum().backward()
    assert a.grad.tolist() == pytest.approx(b.grad.tolist())


def test_kl_bad_name():
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


def test_entropy_bonus_and_kl_objectives():
    from cappo_pl.objectives import EntropyBonus, KLPenalty

    H = torch.tensor([[1.0, 2.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    z = torch.zeros(1, 3)
    tb = TokenBatch(logp=z, old_logp=z, rollout_logp=z, advantages=z, mask=mask, entropy=H, ref_logp=z - 1)
    loss, m = EntropyBonus()(tb)
    assert loss.item() == pytest.approx(-1.5)
    loss, m = KLPenalty(estimator="k1")(tb)
    assert loss.item() == pytest.approx(1.0)


def test_seq_mean_token_sum_norm_divisor_is_constant_across_batch_lengths():
    loss = PPOClip(agg="seq-mean-token-sum-norm")
    for T in (3, 7):  # early-stopped rollouts have different padded lengths
        z = torch.zeros(2, T)
        tb = TokenBatch(logp=z, old_logp=z, rollout_logp=z, advantages=-torch.ones(2, T), mask=torch.ones(2, T),
                        loss_scale_factor=16.0)  # fmt: skip
        value, _ = loss(tb)
        assert value.item() == pytest.approx(2 * T / (2 * 16.0))


def test_ppo_metrics_clipfrac_dual_and_ppo_kl():
    d = torch.tensor([[0.5, -0.5, 1.5, 0.0]])
    a = torch.tensor([[1.0, 1.0, -1.0, 1.0]])
    _, m = ppo_clip_loss(d, torch.zeros_like(d), a, torch.ones_like(d), 0.2, 0.2, 3.0)
    # L2 > L1 only for token 0 (A>0, r=1.65 > 1.2); token 2 (A<0, r=4.48) has L1=4.48 > L2=1.2.
    assert m["clipfrac"].item() == pytest.approx(1 / 4)
    assert m["clipfrac_dual"].item() == pytest.approx(1 / 4)  # token 2: A<0, r > c = 3
    assert m["ppo_kl"].item() == pytest.approx(-(0.5 - 0.5 + 1.5 + 0.0) / 4)
