"""Gram spaces and the combined update, each against an independent brute-force computation."""

from __future__ import annotations

import pytest
import torch

from cappo_pl.combiners import MGDA, PCGrad, Scalarized, UPGrad
from cappo_pl.errors import ConfigError
from cappo_pl.gradients import Update, combined_backward, gram_metrics
from cappo_pl.losses.aggregation import agg_loss
from cappo_pl.models import TinyModelConfig, build_char_tokenizer, build_tiny_model
from cappo_pl.scoring import logprobs_and_entropy, position_ids_from_mask, score_completions
from cappo_pl.strategies import check_gram_space, zero_stage

T = 0.8  # a non-unit temperature exercises the 1/T factors


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tok)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(tok), (6, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[:2, :3] = 0  # left padding
    comp_mask = torch.ones(6, 5)
    comp_mask[3, 3:] = 0
    batch = {
        "ids": ids,
        "mask": mask,
        "comp_mask": comp_mask,
        "adv": torch.randn(6, 1, generator=gen).expand(6, 5),
        "ref": torch.randn(6, 5, generator=gen) * 0.1 - 3.0,
    }
    return model.eval(), batch


def objective_losses(logp, entropy, b):
    """Three peer objectives that depend on the model through (logp, entropy): PG, entropy, KL (k3)."""
    m = b["comp_mask"]
    pg = agg_loss(-b["adv"] * logp, m, "token-mean")
    ent = -agg_loss(entropy, m, "seq-mean-token-mean")
    log_ratio = b["ref"] - logp
    kl = agg_loss(log_ratio.exp() - 1 - log_ratio, m, "token-mean")
    return [pg, ent, kl]


def scored(model, b, **kw):
    s = score_completions(model, b["ids"], b["mask"], 5, T, chunk_tokens=7, **kw)
    return s, objective_losses(s.logp, s.entropy, b)


def plain_backward(loss, retain):
    loss.backward(retain_graph=retain)


def params_of(model):
    return [p for p in model.parameters() if p.requires_grad]


def brute_force_param_grads(model, b):
    """Flattened per-objective parameter gradients from separate forward passes (no stash, no chunks)."""
    rows = []
    for k in range(3):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=b["ids"], attention_mask=b["mask"], position_ids=position_ids_from_mask(b["mask"]))
        logp, ent = logprobs_and_entropy(out.logits[:, -6:-1], b["ids"][:, -5:], T)
        objective_losses(logp, ent, b)[k].backward()
        rows.append(
            torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params_of(model)])
        )
    model.zero_grad(set_to_none=True)
    return torch.stack(rows).double()


def current_grad(model):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params_of(model)])


@pytest.mark.parametrize("combiner", [MGDA(), PCGrad(seed=1), UPGrad(), Scalarized()])
def test_params_space_gram_and_applied_gradient(setup, combiner):
    model, b = setup
    jac = brute_force_param_grads(model, b)
    weights = torch.tensor([1.0, 0.01, 0.05])
    _, losses = scored(model, b)
    update = combined_backward(losses, weights, combiner, "params", plain_backward, params_of(model))
    torch.testing.assert_close(update.gram, jac @ jac.T, rtol=1e-5, atol=1e-10)
    expected = jac.T @ update.coefficients
    torch.testing.assert_close(current_grad(model).double(), expected, rtol=1e-4, atol=1e-8)
    model.zero_grad(set_to_none=True)


def test_hidden_space_gram_matches_unchunked_autograd(setup):
    model, b = setup
    out = model.base_model(input_ids=b["ids"], attention_mask=b["mask"], position_ids=position_ids_from_mask(b["mask"]))
    h = out.last_hidden_state[:, -6:-1].detach().requires_grad_()
    logp, ent = logprobs_and_entropy(model.get_output_embeddings()(h), b["ids"][:, -5:], T)
    grads = [torch.autograd.grad(loss, h, retain_graph=True)[0].reshape(-1) for loss in objective_losses(logp, ent, b)]
    ref = torch.stack(grads).double() @ torch.stack(grads).double().T

    s, losses = scored(model, b, return_hidden=True)
    update = combined_backward(
        losses, torch.ones(3), MGDA(), "hidden", plain_backward, params_of(model), scores=s
    )
    torch.testing.assert_close(update.gram, ref, rtol=1e-5, atol=1e-12)
    model.zero_grad(set_to_none=True)


def test_logits_space_gram_from_scalars_matches_the_materialised_logit_gradients(setup):
    model, b = setup
    with torch.no_grad():
        out = model(input_ids=b["ids"], attention_mask=b["mask"], position_ids=position_ids_from_mask(b["mask"]))
    z = out.logits[:, -6:-1].clone().requires_grad_()
    logp, ent = logprobs_and_entropy(z, b["ids"][:, -5:], T)
    grads = [torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1) for loss in objective_losses(logp, ent, b)]
    ref = torch.stack(grads).double() @ torch.stack(grads).double().T

    s, losses = scored(model, b, gram_space="logits")
    update = combined_backward(
        losses, torch.ones(3), MGDA(), "logits", plain_backward, params_of(model),
        scores=s,
    )  # fmt: skip
    torch.testing.assert_close(update.gram, ref, rtol=1e-4, atol=1e-12)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("space", ["params", "hidden", "logits"])
def test_one_scalarized_objective_is_a_plain_step(setup, space):
    model, b = setup
    _, losses = scored(model, b)
    (0.3 * losses[0]).backward()
    plain = current_grad(model).clone()
    model.zero_grad(set_to_none=True)
    s, losses = scored(model, b, gram_space=space if space != "params" else None)
    update = combined_backward(
        losses[:1], torch.tensor([0.3]), Scalarized(), space, plain_backward, params_of(model),
        scores=s,
    )  # fmt: skip
    assert not update.skipped and update.coefficients.tolist() == pytest.approx([0.3])
    # params space scales g after the backward (0.3 * grad L vs grad 0.3 L): float32 rounding only
    torch.testing.assert_close(current_grad(model), plain, rtol=1e-5, atol=1e-6 * plain.abs().max().item())
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("space", ["params", "hidden"])
def test_non_finite_loss_or_gram_skips_the_step(setup, space):
    model, b = setup
    s, losses = scored(model, b, return_hidden=True)
    losses[1] = losses[1] * float("nan")
    update = combined_backward(losses, torch.ones(3), MGDA(), space, plain_backward, params_of(model), scores=s)
    assert update.skipped and all(p.grad is None for p in params_of(model))


def test_params_space_is_refused_under_deepspeed_and_fsdp():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    strategy = object.__new__(DeepSpeedStrategy)  # no deepspeed install needed to read a config
    for stage in (0, 1, 2, 3):
        strategy.config = {"zero_optimization": {"stage": stage}}
        assert zero_stage(strategy) == stage
        for space in ("hidden", "logits"):
            check_gram_space(space, strategy)
        with pytest.raises(ConfigError, match=f"model.gradients.space.*ZeRO-{stage}"):
            check_gram_space("params", strategy)
    with pytest.raises(ConfigError, match="model.gradients.space.*FSDP"):
        check_gram_space("params", object.__new__(FSDPStrategy))
    check_gram_space("params", object.__new__(DDPStrategy))
    assert zero_stage(object()) == 0


def test_an_objective_outside_logp_and_entropy_is_refused_in_representation_spaces(setup):
    model, b = setup
    s, losses = scored(model, b, gram_space="logits")
    losses.append(sum(p.square().sum() for p in params_of(model)))  # a weight penalty: no logp/entropy path
    with pytest.raises(ValueError, match="space=params"):
        combined_backward(
            losses, torch.ones(4), MGDA(), "logits", plain_backward, params_of(model),
            scores=s,
        )  # fmt: skip
    model.zero_grad(set_to_none=True)


def test_params_space_leaves_unused_parameters_without_gradient():
    used, unused = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    losses = [used.sum(), (used**2).sum()]
    update = combined_backward(losses, torch.ones(2), MGDA(), "params", plain_backward, [used, unused])
    assert not update.skipped and unused.grad is None and used.grad is not None


def test_gram_metrics_norms_cosines_and_conflict():
    g = torch.tensor([[4.0, -2.0, 0.0], [-2.0, 1.0, 0.0], [0.0, 0.0, 9.0]], dtype=torch.float64)
    w = torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64)
    m = gram_metrics(Update(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), g, False, w), ["pg", "ent", "kl"])
    assert m["grad/norm_pg"].item() == pytest.approx(2.0) and m["grad/norm_kl"].item() == pytest.approx(3.0)
    assert m["grad/cos_pg_ent"].item() == pytest.approx(-1.0) and m["grad/cos_pg_kl"].item() == 0.0
    assert m["grad/conflict"].item() == 1.0 and m["combiner/c_ent"].item() == 2.0
    c = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    assert m["grad/combined_norm"].item() == pytest.approx(float(c @ g @ c) ** 0.5)
    assert m["grad/combined_norm_ratio"].item() == pytest.approx(float(c @ g @ c) ** 0.5 / (0.5 * 2.0))


def test_params_space_backward_overflow_is_skipped_but_left_visible_to_a_grad_scaler():
    p = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
    losses = [p.sum(), p.abs().sqrt().sum()]  # d sqrt|x| / dx is infinite at 0: a finite loss, a non-finite gradient
    update = combined_backward(losses, torch.ones(2), MGDA(), "params", plain_backward, [p], grad_scale=4.0)
    assert update.skipped and not torch.isfinite(p.grad).all()  # the module zeroes it unless an fp16 scaler is active


def test_params_space_gram_is_unscaled_by_the_amp_loss_scale():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    scale = 1024.0
    losses = [(p**2).sum(), (p * torch.tensor([1.0, 3.0, -1.0])).sum()]
    update = combined_backward(
        losses, torch.ones(2), MGDA(normalization="l2"), "params",
        lambda loss, retain: (loss * scale).backward(retain_graph=retain), [p], grad_scale=scale,
    )  # fmt: skip
    g = torch.stack([2 * p.detach(), torch.tensor([1.0, 3.0, -1.0])]).double()
    torch.testing.assert_close(update.gram, g @ g.T)
    torch.testing.assert_close(update.coefficients, MGDA(normalization="l2")(g @ g.T, torch.ones(2)))
    torch.testing.assert_close(p.grad.double(), scale * (g.T @ update.coefficients), rtol=1e-6, atol=1e-6)  # scaled
