"""PPO with a critic: GAE against its definition, the clipped value loss, the value model, the wiring."""

import glob
import math
import os

import pytest
import torch

from cappo_pl.advantages import GAE, GRPO, gae_advantages, masked_whiten, outcome_token_rewards
from cappo_pl.cli import main
from cappo_pl.critic import CriticConfig, ValueModel, value_loss
from cappo_pl.errors import ConfigError
from cappo_pl.models import TinyModelConfig, build_char_tokenizer, build_tiny_model


def _brute_gae(rewards, values, length, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l} over the first ``length`` tokens, V after the end = 0."""
    v = list(values[:length]) + [0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(length)]
    adv = [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, length)) for t in range(length)]
    return adv, [a + vt for a, vt in zip(adv, v, strict=False)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_the_sum_of_discounted_td_errors(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 3, 1, 0, 5]
    values = torch.randn(6, 5, generator=g, dtype=torch.float64)
    rewards = torch.randn(6, 5, generator=g, dtype=torch.float64)
    mask = (torch.arange(5)[None] < torch.tensor(lengths + [5])[:, None]).double()
    mask[5] = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])  # interior holes (e.g. tool tokens): skipped, not cut
    adv, ret = gae_advantages(rewards * mask, values, mask, gamma, lam)
    for row in range(6):
        keep = mask[row].bool()
        n = int(keep.sum())
        want_adv, want_ret = _brute_gae(rewards[row][keep].tolist(), values[row][keep].tolist(), n, gamma, lam)
        assert adv[row][keep].tolist() == pytest.approx(want_adv, abs=1e-5)
        assert ret[row][keep].tolist() == pytest.approx(want_ret, abs=1e-5)
        assert adv[row][~keep].abs().sum() == 0 and ret[row][~keep].abs().sum() == 0


def test_gae_with_lambda_one_is_monte_carlo_on_the_outcome_reward():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
    r = outcome_token_rewards(torch.tensor([2.0, -1.0]), mask)
    assert r.tolist() == [[0, 0, 2.0, 0], [0, -1.0, 0, 0]]
    values = torch.tensor([[0.5, 0.1, -0.3, 9.0], [1.0, 2.0, 9.0, 9.0]])
    adv, ret = gae_advantages(r, values, mask, 1.0, 1.0)
    torch.testing.assert_close(ret, torch.tensor([[2.0, 2, 2, 0], [-1.0, -1, 0, 0]]))
    torch.testing.assert_close(adv, (ret - values) * mask)


def test_gae_estimator_whitens_over_valid_tokens_and_zeroes_skipped_samples():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    valid = torch.tensor([True, True, False])
    values = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    m = mask * valid[:, None]
    adv, ret = GAE(lam=0.9).token_advantages(torch.tensor([1.0, 0.0, 5.0]), 4, valid, m, values)
    picked = adv[m.bool()]
    assert abs(picked.mean().item()) < 1e-6 and abs(picked.std().item() - 1) < 1e-4
    raw, _ = gae_advantages(outcome_token_rewards(torch.tensor([1.0, 0.0, 0.0]), m), values, m, 1.0, 0.9)
    torch.testing.assert_close(adv, masked_whiten(raw, m))
    assert adv[2].abs().sum() == 0 and ret[2].abs().sum() == 0


def test_clipped_value_loss_value_gradient_and_clipfrac():
    old = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[0.1, 0.5, 0.5, 2.0]], dtype=torch.float64, requires_grad=True)
    ret = torch.tensor([[1.0, -1.0, 0.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.float64)
    c = 0.2
    loss, metrics = value_loss(v, old, ret, mask, c)
    want, grads, clipped = 0.0, [], 0
    for vi, oi, ri, mi in zip(v[0].tolist(), old[0].tolist(), ret[0].tolist(), mask[0].tolist(), strict=True):
        vc = min(max(vi, oi - c), oi + c)
        a, b = (vi - ri) ** 2, (vc - ri) ** 2
        want += 0.5 * max(a, b) * mi / 3
        # the clipped branch is flat in v when it binds and is larger; else d/dv 1/2 (v - R)^2 = v - R
        grads.append(((vi - ri) if a >= b else (vc - ri) * (oi - c < vi < oi + c)) * mi / 3)
        clipped += (b > a) * mi
    assert loss.item() == pytest.approx(want, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, v)
    assert grad[0].tolist() == pytest.approx(grads, abs=1e-12)
    assert metrics["vf_clipfrac"].item() == pytest.approx(clipped / 3)
    assert 0 < clipped < 3
    unclipped, _ = value_loss(v, old, ret, mask, None)
    assert unclipped.item() == pytest.approx(sum(0.5 * (a - b) ** 2 for a, b in [(0.1, 1), (0.5, -1), (0.5, 0)]) / 3)


def test_value_model_scores_padded_batches_like_single_sequences_and_is_independent_of_the_policy():
    tok = build_char_tokenizer()
    policy = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok)
    critic = ValueModel.from_policy(policy)
    ids = tok(["12=", "3+40="], padding=True, padding_side="left", return_tensors="pt")
    comp = torch.tensor([[5, 6, 7], [8, 9, tok.pad_token_id]])
    cmask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    full_ids = torch.cat([ids["input_ids"], comp], 1)
    full_mask = torch.cat([ids["attention_mask"], cmask], 1)
    assert critic(full_ids, full_mask, 3).abs().sum() == 0  # zero-initialised head
    torch.nn.init.normal_(critic.head.weight, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batched = critic(full_ids, full_mask, 3)
        for row in range(2):
            keep = full_mask[row].bool()
            n = int(cmask[row].sum())  # unpadded: no left padding, no right padding, its own n completion tokens
            single = critic(full_ids[row][keep][None], torch.ones(1, int(keep.sum()), dtype=torch.long), n)
            torch.testing.assert_close(batched[row, :n], single[0], atol=1e-5, rtol=0)
    before = [p.clone() for p in policy.parameters()]
    critic(full_ids, full_mask, 3).sum().backward()
    assert all(p.grad is None for p in policy.parameters())  # a copy, not shared with the policy
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))


def test_critic_and_advantage_must_agree():
    from cappo_pl.module import RLModule

    with pytest.raises(ConfigError, match="model.critic: GAE advantages need a critic"):
        RLModule(advantage=GAE())
    with pytest.raises(ConfigError, match="model.critic: GRPO advantages do not use one"):
        RLModule(advantage=GRPO(), critic=CriticConfig())


def _run(cli_args, tmp_path, name, extra=(), steps=3):
    main(
        cli_args(
            config="configs/ppo_critic.yaml", steps=steps, extra=[f"--trainer.logger.init_args.name={name}", *extra]
        )
    )
    (log_dir,) = glob.glob(str(tmp_path / "runs" / name / "version_*"))
    return log_dir


def test_critic_trains_alone_when_the_policy_lr_is_zero(cli_args, tmp_path):
    import csv

    # the binary task reward is 0 for this barely trained model; the overlong penalty gives returns to fit
    extra = ["--model.optim.lr=0.0", "--model.critic.lr=0.01", "--model.overlong.buffer_len=6"]
    log_dir = _run(cli_args, tmp_path, "critic", extra)
    rows = [r for r in csv.DictReader(open(os.path.join(log_dir, "metrics.csv"))) if r.get("train/reward/mean")]
    assert len(rows) == 3
    keys = ("train/critic/vf_loss", "train/critic/vf_clipfrac", "train/critic/explained_var", "train/critic/grad_norm")
    for key in keys:
        assert all(math.isfinite(float(r[key])) for r in rows), key
    # wiring: the critic's group has its own lr (the policy at lr 0 stays put on all 2 x 4 updates per step,
    # pi == pi_old throughout) and the value loss moves the critic (that its gradients never reach the policy
    # is checked structurally in test_value_model_scores_padded_batches...)
    assert all(float(r["train/policy/ppo_kl"]) == 0.0 and float(r["train/policy/clipfrac"]) == 0.0 for r in rows)
    one_step = _run(cli_args, tmp_path, "critic1", extra, steps=1)
    first = torch.load(os.path.join(one_step, "checkpoints", "last.ckpt"), weights_only=False)["state_dict"]
    last = torch.load(os.path.join(log_dir, "checkpoints", "last.ckpt"), weights_only=False)["state_dict"]
    assert any(k.startswith("critic.trunk.") for k in last)
    assert all(torch.equal(first[k], last[k]) for k in last if k.startswith("policy."))
    assert not torch.equal(first["critic.head.weight"], last["critic.head.weight"])


def test_cappo_runs_on_gae_advantages_with_a_critic(cli_args, tmp_path):
    import csv

    extra = [
        "--model.advantage=cappo_pl.advantages.GAE",
        "--model.critic.cliprange_value=0.2",
        "--model.ppo.minibatches=2",
    ]
    args = cli_args(config="configs/cappo.yaml", steps=2, extra=["--trainer.logger.init_args.name=cappo_gae", *extra])
    main(args)
    (log_dir,) = glob.glob(str(tmp_path / "runs" / "cappo_gae" / "version_*"))
    rows = [r for r in csv.DictReader(open(os.path.join(log_dir, "metrics.csv"))) if r.get("train/reward/mean")]
    assert len(rows) == 2 and all(math.isfinite(float(r["train/critic/vf_loss"])) for r in rows)
    assert all(math.isfinite(float(r["train/combiner/c_policy"])) for r in rows)


def _tiny_critic(dtype=torch.float32):
    tok = build_char_tokenizer()
    policy = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok)
    return ValueModel.from_policy(policy.to(dtype)), tok


def test_value_at_t_sees_the_prefix_before_token_t_only():
    critic, _ = _tiny_critic()
    torch.nn.init.normal_(critic.head.weight, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[3, 4, 5, 10, 11, 12, 13]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        base = critic(ids, mask, 4)  # values of the states before completion tokens 10, 11, 12, 13
        for t in range(4):
            changed = ids.clone()
            changed[0, 3 + t] = 20
            other = critic(changed, mask, 4)
            torch.testing.assert_close(other[0, : t + 1], base[0, : t + 1])  # V(s_t) does not see token t ...
            if t < 3:
                assert (other[0, t + 1 :] - base[0, t + 1 :]).abs().min() > 0  # ... V(s_{t+1}) does


def test_bfloat16_trunk_with_float32_head():
    critic, _ = _tiny_critic(torch.bfloat16)
    out = critic(torch.tensor([[3, 4, 5, 6]]), torch.ones(1, 4, dtype=torch.long), 2)
    assert out.dtype == torch.float32 and out.shape == (1, 2)


def test_critic_learns_fixed_returns_and_skips_a_non_finite_loss():
    from cappo_pl.critic import critic_backward

    critic, _ = _tiny_critic()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (8, 9), generator=g)
    attn = torch.ones_like(ids)
    returns = torch.randn(8, 4, generator=g)
    mask = torch.ones(8, 4)
    cfg = CriticConfig(cliprange_value=None, clip_grad_norm=None)
    opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        m = critic_backward(critic, cfg, ids, attn, torch.zeros_like(returns), returns, mask, lambda x: x.backward())
        losses.append(m["vf_loss"].item())
        opt.step()
    assert losses[-1] < losses[0] / 5, losses[::10]
    opt.zero_grad(set_to_none=True)
    bad = returns.clone()
    bad[0, 0] = float("nan")
    m = critic_backward(critic, cfg, ids, attn, torch.zeros_like(returns), bad, mask, lambda x: x.backward())
    assert m["skipped"].item() == 1.0 and all(p.grad is None for p in critic.parameters())


def test_critic_clip_under_a_grad_scaler_acts_on_the_unscaled_norm():
    from cappo_pl.critic import critic_backward

    critic, _ = _tiny_critic()
    torch.nn.init.normal_(critic.head.weight, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 60, (4, 6), generator=torch.Generator().manual_seed(2))
    args = (ids, torch.ones_like(ids), torch.zeros(4, 3), torch.full((4, 3), 5.0), torch.ones(4, 3))
    plain = critic_backward(critic, CriticConfig(clip_grad_norm=None), *args, lambda x: x.backward())
    critic.zero_grad(set_to_none=True)
    scale, clip = 1024.0, 1e-3
    scaled = critic_backward(critic, CriticConfig(clip_grad_norm=clip), *args, lambda x: (x * scale).backward(), scale)
    assert scaled["grad_norm"].item() == pytest.approx(plain["grad_norm"].item(), rel=1e-4)
    assert plain["grad_norm"].item() > clip
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in critic.parameters() if p.grad is not None]))
    assert after.item() / scale == pytest.approx(clip, rel=1e-3)  # clipped to ``clip`` once unscaled
