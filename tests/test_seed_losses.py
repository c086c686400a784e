"""CE-GPPO, ERC and DPPO on hand-built tensors: every branch's value and gradient against the reference formulas."""

import math

import pytest
import torch

from cappo_pl.errors import ConfigError
from cappo_pl.losses import DPPO, ERC, GPPO, PPOClip, TokenBatch, binary_divergence, ppo_clip_token_loss

EPS, B1, B2, C = 0.2, 0.5, 1.0, 10.0

# (ratio r, advantage A, mask, expected per-token loss value, expected d loss_t / d log pi)
GPPO_CASES = [
    (1.1, 1.0, 1, -1.1, -1.1),  # in range: -r A
    (1.5, 1.0, 1, -B2 * (1 + EPS), -B2 * (1 + EPS)),  # high side (A > 0, r > 1 + eps): bounded gradient
    (0.5, -1.0, 1, B1 * (1 - EPS), B1 * (1 - EPS)),  # low side (A < 0, r < 1 - eps): -beta1 (1 - eps) A
    (0.5, 1.0, 1, -0.5, -0.5),  # A > 0, r < 1 - eps: not clipped by PPO either, -r A
    (1.5, -1.0, 1, 1.5, 1.5),  # A < 0, r > 1 + eps (below the dual bound): -r A
    (20.0, -1.0, 1, C, 0.0),  # dual-clip binds: value -A c, no gradient
    (0.9, 0.0, 1, 0.0, 0.0),  # zero advantage
    (2.0, 1.0, 0, 0.0, 0.0),  # padding
]


def _tensors(cases):
    r = torch.tensor([c[0] for c in cases], dtype=torch.float64)[None]
    old = torch.zeros_like(r)
    logp = r.log().clone().requires_grad_(True)
    adv = torch.tensor([c[1] for c in cases], dtype=torch.float64)[None]
    mask = torch.tensor([c[2] for c in cases], dtype=torch.float64)[None]
    return logp, old, adv, mask


def test_ce_gppo_value_and_gradient_on_every_branch():
    logp, old, adv, mask = _tensors(GPPO_CASES)
    loss, metrics = GPPO(B1, B2, EPS, EPS, C, "token-mean")(_batch(logp, old, adv, mask))
    n = sum(c[2] for c in GPPO_CASES)
    want_value = sum(c[3] for c in GPPO_CASES if c[2]) / n
    assert loss.item() == pytest.approx(want_value, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, logp)
    want_grad = [c[4] * c[2] / n for c in GPPO_CASES]
    assert grad[0].tolist() == pytest.approx(want_grad, abs=1e-12)
    assert metrics["clipfrac_high"].item() == pytest.approx(1 / n)
    assert metrics["clipfrac_low"].item() == pytest.approx(1 / n)
    assert metrics["clipfrac_dual"].item() == pytest.approx(1 / n)


def test_gppo_with_unit_betas_differs_from_ppo_only_by_the_clipped_gradient():
    logp, old, adv, mask = _tensors(GPPO_CASES)
    gppo, _ = GPPO(1.0, 1.0, EPS, EPS, C, "token-sum")(_batch(logp, old, adv, mask))
    ppo_out = ppo_clip_token_loss(logp, old, adv, EPS, EPS, C)
    per_ppo, regions = ppo_out.per_token, ppo_out.regions
    ppo = (per_ppo * mask).sum()
    assert gppo.item() == pytest.approx(ppo.item(), abs=1e-12)  # same forward value (beta = 1)
    g_gppo = torch.autograd.grad(gppo, logp)[0][0]
    g_ppo = torch.autograd.grad(ppo, logp)[0][0]
    clipped = ((regions["low"] | regions["high"]) & (mask > 0))[0]
    assert torch.equal(g_ppo[clipped], torch.zeros_like(g_ppo[clipped]))  # PPO: no gradient once clipped
    assert (g_gppo[clipped] != 0).all()  # GPPO: a bounded one
    assert torch.allclose(g_gppo[~clipped], g_ppo[~clipped])


def _batch(logp, old, adv, mask, **kw):
    return TokenBatch(logp=logp, old_logp=old, rollout_logp=kw.pop("mu", old), advantages=adv, mask=mask, **kw)


def test_erc_cuts_the_gradient_outside_the_band_and_keeps_value_and_denominator():
    cases = [(1.1, 1.0, 1), (1.5, 1.0, 1), (0.9, -1.0, 1), (1.0, 1.0, 1), (1.2, -1.0, 1), (1.0, 1.0, 0)]
    logp, old, adv, mask = _tensors([(r, a, m, 0, 0) for r, a, m in cases])
    old_h = torch.ones_like(logp)
    h = torch.tensor([[1.0, 1.04, 0.96, 1.2, 0.9, 1.0]], dtype=torch.float64)  # rho: in, in, in, out, out, pad
    loss, metrics = ERC()(_batch(logp, old, adv, mask, entropy=h, old_entropy=old_h))  # default: DAPO's PPO-clip
    per = ppo_clip_token_loss(logp, old, adv, 0.2, 0.28, 10.0).per_token
    assert loss.item() == pytest.approx(((per * mask).sum() / mask.sum()).item(), abs=1e-12)  # value unchanged
    (grad,) = torch.autograd.grad(loss, logp)
    base_grad = torch.autograd.grad((per * mask).sum() / mask.sum(), logp)[0]
    keep = torch.tensor([[1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.allclose(grad[keep], base_grad[keep]) and (base_grad[keep] != 0).any()
    assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep]))
    assert metrics["erc_masked_frac"].item() == pytest.approx(2 / 5)


def test_erc_on_policy_masks_nothing():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    h = torch.rand(3, 5, generator=g, dtype=torch.float64) * 2
    adv, mask = torch.randn(3, 1, generator=g).expand(3, 5).double(), torch.ones(3, 5, dtype=torch.float64)
    for base in (PPOClip(0.2, 0.28, 10.0), GPPO(1.0, 1.0, 0.2, 0.2, 10.0)):
        _, metrics = ERC(base)(_batch(logp, logp.detach(), adv, mask, entropy=h, old_entropy=h.clone()))
        assert metrics["erc_masked_frac"].item() == 0.0


# (p = pi(a), p' = mu(a), A, mask)
DPPO_CASES = [(0.5, 0.45, 1.0, 1), (0.9, 0.5, 1.0, 1), (0.2, 0.5, -1.0, 1), (0.6, 0.5, -1.0, 1), (0.3, 0.31, 2.0, 1),
              (0.999, 0.01, 1.0, 1), (0.4, 0.6, 1.0, 1), (0.9, 0.2, -1.0, 0)]  # fmt: skip


def _dppo_tensors():
    p = torch.tensor([c[0] for c in DPPO_CASES], dtype=torch.float64)[None]
    q = torch.tensor([c[1] for c in DPPO_CASES], dtype=torch.float64)[None]
    logp = p.log().clone().requires_grad_(True)
    adv = torch.tensor([c[2] for c in DPPO_CASES], dtype=torch.float64)[None]
    mask = torch.tensor([c[3] for c in DPPO_CASES], dtype=torch.float64)[None]
    return logp, q.log(), adv, mask


def _brute_invalid(p, q, a, kind, d_low, d_high):
    if kind == "binary_tv":
        return (p - q > d_high) if a > 0 else (p - q < -d_low)
    kl = q * math.log(q / p) + (1 - q) * math.log((1 - q + 1e-8) / (1 - p + 1e-8))
    return (kl > d_high and p > q) if a > 0 else (kl > d_low and p < q)


@pytest.mark.parametrize("kind,delta", [("binary_tv", 0.15), ("binary_kl", 0.05)])
def test_dppo_mask_value_and_gradient(kind, delta):
    logp, mu, adv, mask = _dppo_tensors()
    cap, length = 10.0, 4.0
    loss, metrics = DPPO(kind, tis_cap=cap, loss_scale_factor=length)(_batch(logp, logp.detach(), adv, mask, mu=mu))
    invalid = [_brute_invalid(p, q, a, kind, delta, delta) for p, q, a, _ in DPPO_CASES]
    assert any(invalid) and not all(invalid)  # the cases exercise both outcomes
    weights = [min(p / q, cap) for p, q, _, _ in DPPO_CASES]
    # seq-mean-token-sum-norm over one sequence: sum_t l_t m_t / (B * L)
    want = sum(
        -a * w * math.log(p) * (not inv) * m for (p, _, a, m), w, inv in zip(DPPO_CASES, weights, invalid, strict=True)
    )
    assert loss.item() == pytest.approx(want / length, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, logp)  # -A sg(min(r, C)) M, PPO's unclipped gradient inside the region
    want_grad = [
        -a * w * (not inv) * m / length for (_, _, a, m), w, inv in zip(DPPO_CASES, weights, invalid, strict=True)
    ]
    assert grad[0].tolist() == pytest.approx(want_grad, abs=1e-12)
    n = sum(c[3] for c in DPPO_CASES)
    pos = sum(inv and a > 0 and m for (_, _, a, m), inv in zip(DPPO_CASES, invalid, strict=True))
    assert metrics["dppo_masked_pos"].item() == pytest.approx(pos / n)
    assert metrics["tis_clipfrac"].item() == pytest.approx(1 / n)  # 0.999 / 0.01 > C


def test_binary_kl_is_the_bernoulli_kl_and_tv_is_signed():
    p, q = torch.tensor([0.3, 0.7]).double(), torch.tensor([0.5, 0.5]).double()
    kl = binary_divergence(p.log(), q.log(), "binary_kl")
    brute = [
        b * math.log(b / a) + (1 - b) * math.log((1 - b) / (1 - a)) for a, b in zip(p.tolist(), q.tolist(), strict=True)
    ]
    assert kl.tolist() == pytest.approx(brute, rel=1e-6)
    assert binary_divergence(p.log(), q.log(), "binary_tv").tolist() == pytest.approx([-0.2, 0.2])


def test_dppo_anchors_on_the_sampler_not_pi_old():
    logp, mu, adv, mask = _dppo_tensors()
    far_old = logp.detach() - 5.0  # a very different pi_old must not change anything
    a, _ = DPPO("binary_tv")(_batch(logp, far_old, adv, mask, mu=mu))
    b, _ = DPPO("binary_tv")(_batch(logp, logp.detach(), adv, mask, mu=mu))
    assert a.item() == b.item()


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="divergence"):
        DPPO("tv")
    with pytest.raises(ConfigError, match="ERC.base must be a policy loss given by class_path"):
        ERC(base="dapo")
    with pytest.raises(ValueError, match="clip_ratio_c"):
        GPPO(clip_ratio_c=0.5)(_batch(*_tensors(GPPO_CASES)))


SEED_CONFIGS = [
    "ce_gppo.yaml", "erc.yaml", "dppo.yaml", "dppo_topk.yaml", "gspo.yaml", "cispo.yaml", "clip_cov.yaml",
    "kl_cov.yaml", "dapo.yaml", "ppo_critic.yaml", "gpg.yaml",
]  # fmt: skip


def _rows(log_dir):
    import csv

    with open(f"{log_dir}/metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("train/reward/mean")]


def _fit(cli_args, tmp_path, config, name, steps=2, extra=()):
    import glob

    from cappo_pl.cli import main

    args = cli_args(config=config, steps=steps, extra=[f"--trainer.logger.init_args.name={name}", *extra])
    main(args)
    (log_dir,) = glob.glob(str(tmp_path / "runs" / name / "version_*"))
    return _rows(log_dir)


def test_erc_in_the_loop_masks_nothing_on_policy_and_reports_off_policy(cli_args, tmp_path):
    on = _fit(cli_args, tmp_path, "configs/erc.yaml", "on", extra=["--model.ppo.minibatches=1"])
    assert [float(r["train/policy/erc_masked_frac"]) for r in on] == [0.0, 0.0]  # old entropy == step-start entropy
    off = _fit(cli_args, tmp_path, "configs/erc.yaml", "off")
    assert all(0.0 <= float(r["train/policy/erc_masked_frac"]) <= 1.0 for r in off)


def test_erc_old_entropy_is_the_step_start_policys_without_padding_or_temperature_drift():
    """The recompute pass (batched, left/right padded, chunked head) against one unpadded sequence at a time."""
    from cappo_pl.models import TinyModelConfig, build_char_tokenizer, build_tiny_model
    from cappo_pl.rollout import RolloutConfig, sample
    from cappo_pl.scoring import score_completions

    tok = build_char_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok)
    model.eval()
    temp = 0.6
    enc = tok(["3+4=", "12=", "100="], padding=True, padding_side="left", return_tensors="pt")
    ro = sample(model, enc["input_ids"], enc["attention_mask"], RolloutConfig(group_size=3, max_new_tokens=7,
                temperature=temp), tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(1))  # fmt: skip
    lengths = ro.completion_mask.sum(-1)
    assert lengths.min() < lengths.max()  # right padding differs between rows
    t = ro.completion_ids.shape[1]
    with torch.no_grad():  # step start (pi_old), chunked head with small chunks
        old = score_completions(model, ro.input_ids, ro.attention_mask, t, temp, chunk_tokens=5)
    sub = ro.select(torch.tensor([4, 0, 7]))  # an update's mini-batch, with gradients on (checkpointed head)
    cur = score_completions(model, sub.input_ids, sub.attention_mask, t, temp)
    for row in range(ro.completion_ids.shape[0]):
        n = int(lengths[row])
        ids = torch.cat([ro.prompt_ids[row][ro.prompt_mask[row].bool()], ro.completion_ids[row, :n]])
        with torch.no_grad():
            z = model(input_ids=ids[None]).logits[0, -n - 1 : -1].double() / temp
        p = z.softmax(-1)
        want = -(p * z.log_softmax(-1)).sum(-1)
        torch.testing.assert_close(old.entropy[row, :n].double(), want, atol=2e-5, rtol=1e-5)
    m = sub.completion_mask.bool()
    torch.testing.assert_close(cur.entropy.detach()[m], old.entropy[[4, 0, 7]][m], atol=1e-5, rtol=1e-5)
    # so before any update the ratio is 1 on every token and ERC (band 0.95..1.05) masks nothing
    ratio = cur.entropy.detach()[m] / old.entropy[[4, 0, 7]][m]
    assert ((ratio - 1).abs() < 1e-4).all()


@pytest.mark.parametrize("combiner", ["MGDA", "PCGrad"])
@pytest.mark.parametrize("config", SEED_CONFIGS)
def test_each_method_composes_with_entropy_and_kl_under_a_combiner(config, combiner, cli_args, tmp_path):
    import os

    import yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = yaml.safe_load(open(os.path.join(root, "configs", config)))
    if "base" in cfg:  # parents are named relative to the config's folder; the composed copy lives elsewhere
        names = [cfg["base"]] if isinstance(cfg["base"], str) else cfg["base"]
        cfg["base"] = [os.path.join(root, "configs", name) for name in names]
    present = {o["class_path"] for o in cfg["model"]["objectives"]}
    cfg["model"]["objectives"] += [
        o
        for o in (
            {"class_path": "cappo_pl.objectives.EntropyBonus", "init_args": {"weight": 0.01}},
            {"class_path": "cappo_pl.objectives.KLPenalty", "init_args": {"weight": 0.04}},
            {"class_path": "cappo_pl.objectives.PositiveNLL", "init_args": {"weight": 0.1}},
        )
        if o["class_path"] not in present
    ]
    cfg["model"]["combiner"] = {"class_path": f"cappo_pl.combiners.{combiner}"}
    cfg["model"]["gradients"] = {"space": "params"}
    path = tmp_path / "composed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rows = _fit(cli_args, tmp_path, str(path), "composed", steps=1)
    assert len(rows) == 1
    keys = (
        "train/combiner/c_policy",
        "train/combiner/c_entropy",
        "train/combiner/c_kl",
        "train/combiner/c_positive_nll",
    )
    for key in keys:
        assert math.isfinite(float(rows[0][key]))
    assert float(rows[0]["train/combiner/skipped_total"]) == 0.0


def test_gspo_uses_the_sequence_ratio_with_per_token_gradients():
    from cappo_pl.losses import GSPO

    # sequence 0: log-ratios 0.1, 0.3: s = e^0.2 is outside the 1e-3 clip range, A > 0 takes the clipped branch;
    # sequence 1: log-ratios 0, 0 (s = 1, unclipped); sequence 2: padding after one token
    old = torch.zeros(3, 2, dtype=torch.float64)
    logp = torch.tensor([[0.1, 0.3], [0.0, 0.0], [-0.0002, 5.0]], dtype=torch.float64).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0], [2.0, 2.0], [-1.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 1], [1, 0]], dtype=torch.float64)
    loss, metrics = GSPO(1e-3, 1e-3)(_batch(logp, old, adv, mask, loss_scale_factor=7.0))  # L unused: seq-mean
    s = [math.exp(0.2), 1.0, math.exp(-0.0002)]
    # per sequence: max(-A s, -A clip(s)); seq-mean-token-mean of a per-sequence constant is that constant
    per_seq = [max(-a * v, -a * min(max(v, 1 - 1e-3), 1 + 1e-3)) for a, v in zip([1.0, 2.0, -1.0], s, strict=True)]
    assert loss.item() == pytest.approx(sum(per_seq) / 3, rel=1e-12)
    (grad,) = torch.autograd.grad(loss, logp)
    # d/d logp_t: -A s_i / |y_i| / B where unclipped (sequences 1 and 2), 0 for the clipped sequence 0
    want = [[0.0, 0.0], [-2.0 * 1.0 / 2 / 3] * 2, [1.0 * s[2] / 1 / 3, 0.0]]
    assert grad.tolist() == [pytest.approx(row, abs=1e-12) for row in want]
    assert metrics["clipfrac"].item() == pytest.approx(2 / 5)


def test_cispo_weight_is_clipped_and_stop_gradient_and_every_token_gets_a_gradient():
    from cappo_pl.losses import CISPO

    r = torch.tensor([[0.5, 1.0, 3.0, 8.0]], dtype=torch.float64)
    logp = r.log().clone().requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones_like(r)
    loss, metrics = CISPO(None, 5.0, "token-sum")(_batch(logp, torch.zeros_like(r), adv, mask))
    w = [0.5, 1.0, 3.0, 5.0]
    assert loss.item() == pytest.approx(
        sum(-wi * a * math.log(ri) for wi, a, ri in zip(w, [1, -1, 1, 1], r[0].tolist(), strict=True))
    )
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[0].tolist() == pytest.approx([-0.5, 1.0, -3.0, -5.0])  # -sg(w) A, never 0
    assert metrics["clipfrac"].item() == pytest.approx(0.25)


def test_positive_nll_counts_only_correct_samples():
    from cappo_pl.objectives import PositiveNLL

    logp = torch.log(torch.tensor([[0.5, 0.25], [0.1, 0.1]], dtype=torch.float64)).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    batch = _batch(logp, logp.detach(), torch.zeros_like(logp), mask, correct=torch.tensor([True, False]))
    loss, metrics = PositiveNLL(weight=0.1)(batch)
    assert loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad.tolist() == [[-0.5, -0.5], [0.0, 0.0]]
    assert metrics["positive_frac"].item() == 0.5


def _cov_batch():
    # 1 x 8 valid tokens + padding; the covariances are checkable by hand
    logp = torch.tensor([[-0.1, -3.0, -0.2, -2.5, -1.0, -0.3, -4.0, -0.5, -9.0]], dtype=torch.float64)
    adv = torch.tensor([[2.0, -2.0, 1.5, -1.0, 0.0, 3.0, 2.0, -1.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.float64)
    return logp, adv, mask


def test_token_covariance_matches_the_definition():
    from cappo_pl.losses import token_covariance

    logp, adv, mask = _cov_batch()
    lp, a = logp[0, :8].tolist(), adv[0, :8].tolist()
    want = [(ai - sum(a) / 8) * (li - sum(lp) / 8) for ai, li in zip(a, lp, strict=True)]
    got = token_covariance(logp, adv, mask)[0]
    assert got[:8].tolist() == pytest.approx(want) and got[8].item() == -math.inf


def test_kl_cov_penalises_exactly_the_top_covariance_tokens():
    from cappo_pl.losses import KLCov, token_covariance

    logp, adv, mask = _cov_batch()
    old = logp - 0.1  # log r = 0.1 everywhere
    x = logp.clone().requires_grad_(True)
    loss, metrics = KLCov(ratio=0.25, beta=1.0, agg="token-sum")(_batch(x, old, adv, mask))  # 2 of 8 tokens
    cov = token_covariance(logp, adv, mask)[0]
    top = set(torch.topk(cov, 2).indices.tolist())
    r = math.exp(0.1)
    want = sum(-a * r + (0.1 if t in top else 0.0) for t, a in enumerate(adv[0, :8].tolist()))
    assert loss.item() == pytest.approx(want)
    (grad,) = torch.autograd.grad(loss, x)  # d/dlogp: -A r, plus beta sign(log r) on the penalised tokens
    want_grad = [(-a * r + (1.0 if t in top else 0.0)) if t < 8 else 0.0 for t, a in enumerate(adv[0].tolist())]
    assert grad[0].tolist() == pytest.approx(want_grad)
    assert metrics["cov_penalised_frac"].item() == pytest.approx(0.25)


def test_clip_cov_drops_random_in_band_candidates_only():
    from cappo_pl.losses import clip_cov_token_loss, token_covariance

    logp, adv, mask = _cov_batch()
    cov = token_covariance(logp, adv, mask)[0]
    band = {t for t in range(8) if 1.0 < cov[t].item() < 5.0}
    assert 2 <= len(band) < 8  # the data has in-band and out-of-band tokens
    for seed in range(5):
        x = logp.clone().requires_grad_(True)
        out = clip_cov_token_loss(x, logp, adv, mask, torch.Generator().manual_seed(seed), ratio=0.125)
        loss, metrics = out.reduce(mask, "token-mean")
        (grad,) = torch.autograd.grad(loss, x)
        dropped = {t for t in range(8) if grad[0, t].item() == 0.0 and adv[0, t].item() != 0.0}
        assert len(dropped) == 1 and dropped <= band  # max(1, floor(0.125 x 8)) = 1, from the band
        kept = [-a for t, a in enumerate(adv[0, :8].tolist()) if t not in dropped]  # r = 1: -A r, token-mean
        assert loss.item() == pytest.approx(sum(kept) / 8)
        assert metrics["cov_dropped_frac"].item() == pytest.approx(1 / 8)
