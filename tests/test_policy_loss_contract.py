"""The per-token contract of policy losses: base-class aggregation and clip metrics, ERC around any surrogate."""

import argparse

import pytest
import torch
from jsonargparse import ArgumentParser

from cappo_pl.errors import ConfigError
from cappo_pl.losses import (
    CISPO,
    DPPO,
    ERC,
    GPG,
    GPPO,
    GSPO,
    PolicyLoss,
    PPOClip,
    TokenBatch,
    TokenLoss,
    agg_loss,
    dual_clip,
)
from cappo_pl.objectives import PolicyObjective

ADV = [1.3, -0.7, 0.9]
DELTA = [-0.4, -0.1, 0.05, 0.2, 0.5]  # log r per position: r = 0.67 ... 1.65, inside and outside the clip range
# entropy ratio H / H_old per token; band (0.95, 1.05): 1 = keep, 0 = cut
RHO = [[1.0, 1.2, 1.02, 0.8, 1.0], [0.9, 1.0, 1.0, 1.1, 0.97], [1.0, 1.0, 1.3, 1.0, 0.5]]
MASK = [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def _batch(logp=None, **kw):
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.5]] * 3, dtype=torch.float64)
    base_logp = old + torch.tensor([DELTA, DELTA[::-1], DELTA], dtype=torch.float64)
    adv = torch.tensor(ADV, dtype=torch.float64)[:, None].expand(3, 5)
    old_h = torch.full((3, 5), 2.0, dtype=torch.float64)
    h = old_h * torch.tensor(RHO, dtype=torch.float64)
    mask = torch.tensor(MASK, dtype=torch.float64)
    fields = dict(logp=base_logp if logp is None else logp, old_logp=old, rollout_logp=old - 0.05, advantages=adv,
                  mask=mask, entropy=h, old_entropy=old_h, loss_scale_factor=8.0)  # fmt: skip
    fields.update(kw)
    return TokenBatch(**fields)


def _keep_by_hand():
    return torch.tensor([[0.95 < r < 1.05 for r in row] for row in RHO])


SURROGATES = {
    "PPOClip": lambda: PPOClip(0.2, 0.28, 10.0),
    "GPPO": lambda: GPPO(1.0, 1.0, 0.2, 0.2, 10.0),
    "CISPO": lambda: CISPO(),
    "DPPO-binary_tv": lambda: DPPO("binary_tv", delta_low=0.3, delta_high=0.3),
    "GSPO": lambda: GSPO(0.5, 0.5),
    "GPG": lambda: GPG(agg="seq-mean-token-sum"),
}


@pytest.mark.parametrize("name", list(SURROGATES))
def test_erc_composes_with_every_surrogate(name):
    base = SURROGATES[name]()
    logp = _batch().logp.clone().requires_grad_(True)
    loss, metrics = ERC(base, beta_low=0.05, beta_high=0.05)(_batch(logp))
    (grad,) = torch.autograd.grad(loss, logp)

    # independent: the base loss with the cut tokens' log-probs detached by hand (each l_t depends on log pi_t only)
    keep = _keep_by_hand()
    ref_logp = logp.detach().clone().requires_grad_(True)
    ref_loss, ref_metrics = base(_batch(torch.where(keep, ref_logp, ref_logp.detach())))
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_logp)
    plain_loss, _ = base(_batch(logp))
    (plain_grad,) = torch.autograd.grad(plain_loss, logp)

    assert torch.equal(loss.detach(), plain_loss.detach())  # ERC never changes the value
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-15)
    assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep]))
    valid = torch.tensor(MASK, dtype=torch.bool)
    assert (plain_grad[~keep & valid] != 0).any()  # the cut mattered: the base had a gradient there
    torch.testing.assert_close(grad[keep], plain_grad[keep], rtol=1e-12, atol=1e-15)
    assert (grad[keep & valid] != 0).any()
    n_valid = valid.sum().item()
    assert metrics["erc_masked_frac"].item() == pytest.approx((~keep & valid).sum().item() / n_valid)
    assert set(metrics) == set(ref_metrics) | {"erc_masked_frac", "entropy_ratio"}
    for k, v in ref_metrics.items():
        assert v.item() == pytest.approx(metrics[k].item(), abs=1e-12), k


def test_erc_takes_aggregation_scale_and_topk_from_its_base():
    base = DPPO("topk_kl", agg="seq-mean-token-sum-norm", loss_scale_factor=32.0)
    erc = ERC(base)
    assert (erc.agg, erc.loss_scale_factor, erc.needs_topk) == ("seq-mean-token-sum-norm", 32.0, True)
    assert PolicyObjective(erc).needs_topk
    assert ERC(GSPO()).agg == "seq-mean-token-mean" and not ERC(GSPO()).needs_topk
    default = ERC()
    assert type(default.base) is PPOClip
    assert vars(default.base) == vars(PPOClip(0.2, 0.28, 10.0, "token-mean"))


def test_erc_needs_both_entropies():
    with pytest.raises(RuntimeError, match="entropy"):
        ERC()(_batch(old_entropy=None))


def _with_base(base_yaml):
    start, end = ERC_YAML.index("\n      class_path"), ERC_YAML.index("\n    beta_low")
    return ERC_YAML[:start] + base_yaml + ERC_YAML[end:]


ERC_YAML = """
loss:
  class_path: cappo_pl.losses.ERC
  init_args:
    base:
      class_path: cappo_pl.losses.PPOClip
      init_args: {eps_low: 0.2, eps_high: 0.28, clip_ratio_c: 10.0, agg: token-mean}
    beta_low: 0.05
    beta_high: 0.05
"""


def _parse(text):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--loss", type=PolicyLoss)
    return parser.instantiate(parser.parse_string(text)).loss


@pytest.mark.parametrize(
    "yaml_base,python_base",
    [
        ("""
      class_path: cappo_pl.losses.PPOClip
      init_args: {eps_low: 0.2, eps_high: 0.28, clip_ratio_c: 10.0, agg: token-mean}""",
         PPOClip(eps_low=0.2, eps_high=0.28, clip_ratio_c=10.0, agg="token-mean")),
        ("""
      class_path: cappo_pl.losses.GPPO
      init_args: {beta1: 1.0, beta2: 1.0, clip_ratio_c: 10.0}""", GPPO(beta1=1.0, beta2=1.0, clip_ratio_c=10.0)),
        ("""
      class_path: cappo_pl.losses.CISPO""", CISPO()),
    ],
)  # fmt: skip
def test_erc_from_yaml_equals_the_python_construction(yaml_base, python_base):
    loss = _parse(_with_base(yaml_base))
    want = ERC(python_base, beta_low=0.05, beta_high=0.05)
    assert type(loss) is ERC and type(loss.base) is type(want.base)
    assert vars(loss.base) == vars(want.base)
    assert (loss.beta_low, loss.beta_high) == (want.beta_low, want.beta_high)
    logp = _batch().logp.clone().requires_grad_(True)
    (a, ma), (b, mb) = loss(_batch(logp)), want(_batch(logp))
    assert torch.equal(a, b) and ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_erc_yaml_with_a_string_base_is_refused():
    bad = _with_base(" dapo")
    assert "base: dapo" in bad
    with pytest.raises(argparse.ArgumentError, match=r"(?s)cappo_pl\.losses\.ERC.*base.*dapo"):
        _parse(bad)
    with pytest.raises(ConfigError, match="model.objectives: loss ERC.base"):
        ERC("gppo")  # type: ignore[arg-type]


class _Halve(PolicyLoss):
    """A surrogate written against the contract: only ``token_loss``."""

    agg = "token-sum"

    def token_loss(self, b):
        lr = b.logp - b.old_logp
        return TokenLoss(0.5 * b.logp, {"low": lr < -0.3, "log_ratio": lr}, {"extra": b.logp.sum()})


def test_the_base_class_aggregates_and_reports_the_regions_present():
    b = _batch()
    logp = b.logp.clone().requires_grad_(True)
    loss, metrics = _Halve()(_batch(logp))
    mask = b.mask
    torch.testing.assert_close(loss, agg_loss(0.5 * logp, mask, "token-sum"))
    lr = (logp - b.old_logp).detach()
    assert list(metrics) == ["clipfrac_low", "ppo_kl", "extra"]  # no clipfrac / high / dual: regions absent
    assert metrics["clipfrac_low"].item() == pytest.approx(((lr < -0.3) * mask).sum().item() / mask.sum().item())
    assert metrics["ppo_kl"].item() == pytest.approx((-lr * mask).sum().item() / mask.sum().item())
    assert not any(v.requires_grad for v in metrics.values())
    with pytest.raises(KeyError, match="unknown clip regions"):
        TokenLoss(logp, {"clip": lr > 0}).reduce(mask)


def test_dual_clip_bounds_negative_advantages_only():
    per = torch.tensor([5.0, 1.0, 5.0, -2.0])
    adv = torch.tensor([-1.0, -1.0, 1.0, 0.0])
    out, dual = dual_clip(per, adv, 3.0)
    assert out.tolist() == [3.0, 1.0, 5.0, -2.0] and dual.tolist() == [True, False, False, False]
    out, dual = dual_clip(per, adv, None)
    assert torch.equal(out, per) and not dual.any()
    with pytest.raises(ValueError, match="clip_ratio_c"):
        dual_clip(per, adv, 1.0)
