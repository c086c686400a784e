"""Combiners: properties over every combiner, and checks against independent solvers (SciPy, TorchJD)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from cappo_pl.combiners import MGDA, CAGrad, PCGrad, Scalarized, UPGrad
from cappo_pl.combiners.mgda import min_norm_alpha, min_norm_two
from cappo_pl.combiners.pcgrad import pcgrad_coefficients
from cappo_pl.combiners.qp import simplex_qp

F64 = torch.float64
FACTORIES = {
    "scalarized": Scalarized,
    "mgda": MGDA,
    "mgda_l2": lambda: MGDA(normalization="l2"),
    "pcgrad": PCGrad,
    "upgrad": UPGrad,
    "cagrad": CAGrad,
}


def jacobian(rng: np.random.Generator, k: int, p: int = 12, cond: float = 1.0) -> torch.Tensor:
    """Random K x P Jacobian (rank min(K, P)) whose singular values span ``cond`` orders of magnitude."""
    r = min(k, p)
    u, _ = np.linalg.qr(rng.normal(size=(k, r)))
    v, _ = np.linalg.qr(rng.normal(size=(p, r)))
    s = 10.0 ** -rng.uniform(0, cond, size=r)
    return torch.from_numpy((u * s) @ v.T)


def gram_cases(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        k = int(rng.integers(1, 6))
        j = jacobian(rng, k, p=int(rng.integers(max(1, k - 2), 16)), cond=[0.5, 3, 8][i % 3])
        w = torch.from_numpy(rng.uniform(0.1, 2.0, size=k))
        yield j, w


def direction(j: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return j.T @ c


# ------------------------------------------------------------------------------------ properties
# How c responds to G -> s G (gradients scaled by sqrt(s)) and to weights -> t w: c ~ s^a t^b.
# l2-normalised MGDA uses unit gradients, so its c carries 1/|g| and ignores the weights' scale.
SCALING = {name: (0.0, 1.0) for name in FACTORIES} | {"mgda_l2": (-0.5, 0.0)}


def close_directions(j, c1, c2, rtol=1e-6):
    # relative to the size of the combined terms: near a Pareto-stationary point d itself cancels to ~0
    scale = max((c1.abs() * j.norm(dim=1)).sum(), (c2.abs() * j.norm(dim=1)).sum())
    assert (direction(j, c1) - direction(j, c2)).norm() <= rtol * scale, (c1, c2)


@pytest.mark.parametrize("name", FACTORIES)
def test_output_is_finite_float64_and_scales_as_specified(name):
    a, b = SCALING[name]
    for j, w in gram_cases(40, seed=1):
        g = j @ j.T
        c = FACTORIES[name]()(g, w)
        assert c.dtype == F64 and c.shape == w.shape and torch.isfinite(c).all()
        for s in (1e-30, 1e-8, 1e8, 1e30):  # AMP loss scale, 1/N^2 averaging, tiny/huge gradients
            close_directions(j, FACTORIES[name]()(g * s, w), c * s**a)
        close_directions(j, FACTORIES[name]()(g, 3.0 * w), c * 3.0**b)


@pytest.mark.parametrize("name", [n for n in FACTORIES if n != "pcgrad"])
def test_permuting_objectives_permutes_coefficients(name):
    for j, w in gram_cases(30, seed=2):
        perm = torch.randperm(len(w), generator=torch.Generator().manual_seed(len(w)))
        g = j @ j.T
        c = FACTORIES[name]()(g, w)
        cp = FACTORIES[name]()(g[perm][:, perm], w[perm])
        torch.testing.assert_close(cp, c[perm], rtol=1e-5, atol=1e-7)


def test_pcgrad_is_permutation_equivariant_given_the_mapped_orders():
    for j, w in gram_cases(30, seed=3):
        k = len(w)
        gw = (j * w[:, None]) @ (j * w[:, None]).T
        orders = [torch.randperm(k).tolist() for _ in range(k)]
        perm = torch.randperm(k).tolist()
        inv = {old: new for new, old in enumerate(perm)}
        orders_p = [[inv[o] for o in orders[perm[i]]] for i in range(k)]
        a = pcgrad_coefficients(gw, orders)
        ap = pcgrad_coefficients(gw[perm][:, perm], orders_p)
        torch.testing.assert_close(ap, a[perm])


@pytest.mark.parametrize("name", ["mgda", "mgda_l2", "upgrad"])
def test_direction_conflicts_with_no_objective(name):
    for j, w in gram_cases(60, seed=4):
        g = j @ j.T
        g = g / g.trace()
        c = FACTORIES[name]()(g, w)
        assert ((g @ c) >= -1e-6).all(), g @ c


def test_scalarized_one_hot_is_one_objective():
    rng = np.random.default_rng(5)
    j = jacobian(rng, 3)
    for k in range(3):
        w = torch.zeros(3, dtype=F64)
        w[k] = 1.0
        torch.testing.assert_close(direction(j, Scalarized()(j @ j.T, w)), j[k])


@pytest.mark.parametrize("name", FACTORIES)
def test_single_objective_is_a_plain_step(name):
    j = jacobian(np.random.default_rng(6), 1)
    c = FACTORIES[name]()(j @ j.T, torch.tensor([0.7], dtype=F64))
    # CAGrad's K = 1 direction is (1 + c) g_0 / (1 + c^2) by its definition; l2-MGDA's is g / |w g|
    expected = 0.7 * {"cagrad": 1.5 / 1.25, "mgda_l2": 1 / (0.7 * j.norm().item())}.get(name, 1.0)
    torch.testing.assert_close(c, torch.tensor([expected], dtype=F64))


@pytest.mark.parametrize("name", FACTORIES)
def test_degenerate_grams(name):
    make = FACTORIES[name]
    w = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
    # all gradients zero (every advantage zero): the preferences, finite
    torch.testing.assert_close(make()(torch.zeros(3, 3, dtype=F64), w), w)
    g1 = torch.randn(8, dtype=F64, generator=torch.Generator().manual_seed(0))
    # identical gradients: any convex combination is the same direction; the sum of c is fixed
    ident = torch.stack([g1, g1, g1])
    c = make()(ident @ ident.T, torch.ones(3, dtype=F64))
    expected_sum = {"mgda": 1.0, "mgda_l2": 1.0 / g1.norm().item(), "cagrad": 3 * 1.5 / 1.25}.get(name, 3.0)
    assert c.sum().item() == pytest.approx(expected_sum, rel=1e-6)
    # opposite gradients: no common descent direction; MGDA, PCGrad and UPGrad stop
    opp = torch.stack([g1, -g1])
    c = make()(opp @ opp.T, torch.ones(2, dtype=F64))
    d = direction(opp, c)
    if name in ("mgda", "mgda_l2", "pcgrad", "upgrad"):
        assert d.norm() <= 1e-6 * g1.norm()
    # one zero gradient is left out: it conflicts with nothing and must not stall the others
    zero_row = torch.stack([torch.zeros(8, dtype=F64), g1, 0.5 * g1 + 0.1])
    c = make()(zero_row @ zero_row.T, torch.ones(3, dtype=F64))
    if name != "scalarized":
        assert c[0] == 0 and direction(zero_row, c).norm() > 0.1
    # non-finite Grams are the caller's to skip
    with pytest.raises(ValueError, match="non-finite"):
        make()(torch.full((2, 2), float("nan"), dtype=F64), torch.ones(2, dtype=F64))


def test_zero_weight_switches_an_objective_off():
    j = jacobian(np.random.default_rng(7), 3)
    g = j @ j.T
    for make in FACTORIES.values():
        c = make()(g, torch.tensor([1.0, 0.0, 1.0], dtype=F64))
        assert c[1] == 0
        torch.testing.assert_close(c[[0, 2]], make()(g[[0, 2]][:, [0, 2]], torch.ones(2, dtype=F64)))


# ----------------------------------------------------------------------- MGDA vs independent QP
def scipy_min_norm(g: np.ndarray) -> float:
    k = g.shape[0]
    best = np.inf
    for start in [np.full(k, 1.0 / k), *np.eye(k)]:
        res = minimize(
            lambda a: a @ g @ a, start, jac=lambda a: 2 * g @ a, method="SLSQP",
            bounds=[(0, 1)] * k,
            constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1, "jac": lambda a: np.ones(k)}],
            options={"ftol": 1e-16, "maxiter": 1000},
        )  # fmt: skip
        best = min(best, float(res.x @ g @ res.x))
    return best


def test_mgda_matches_scipy_on_250_random_grams_including_ill_conditioned():
    rng = np.random.default_rng(8)
    worst = 0.0
    for i in range(250):
        k = int(rng.integers(3, 7))
        j = jacobian(rng, k, p=int(rng.integers(2, 20)), cond=[0.3, 4, 10][i % 3]).numpy()
        g = j @ j.T
        g /= np.trace(g)
        alpha = min_norm_alpha(torch.from_numpy(g)).numpy()
        assert alpha.min() >= 0 and abs(alpha.sum() - 1) < 1e-12
        ours, ref = alpha @ g @ alpha, scipy_min_norm(g)
        assert ours <= ref + 1e-9  # never worse than SciPy ...
        worst = max(worst, abs(ours - ref))
    assert worst <= 1e-6  # ... and within 1e-6 of it


def test_mgda_matches_a_brute_force_simplex_grid_for_k3():
    rng = np.random.default_rng(9)
    n = 300
    a1, a2 = np.meshgrid(np.arange(n + 1) / n, np.arange(n + 1) / n)
    keep = a1 + a2 <= 1
    grid = np.stack([a1[keep], a2[keep], 1 - a1[keep] - a2[keep]], 1)
    for _ in range(20):
        j = jacobian(rng, 3, p=5, cond=2).numpy()
        g = j @ j.T / np.trace(j @ j.T)
        alpha = min_norm_alpha(torch.from_numpy(g)).numpy()
        brute = np.einsum("ni,ij,nj->n", grid, g, grid).min()
        assert alpha @ g @ alpha <= brute + 1e-12
        assert brute - alpha @ g @ alpha <= 1e-4  # grid resolution bound


def test_mgda_two_task_closed_form_equals_the_general_solver():
    rng = np.random.default_rng(10)
    for _ in range(100):
        j = jacobian(rng, 2, p=int(rng.integers(1, 6)), cond=3)
        g = j @ j.T / (j @ j.T).trace()
        a2, a = min_norm_two(g), torch.from_numpy(simplex_qp(2 * g.numpy()))
        assert float(a2 @ g @ a2) == pytest.approx(float(a @ g @ a), abs=1e-10)


def test_mgda_preference_scaling_and_rescale():
    j = jacobian(np.random.default_rng(11), 3)
    g = j @ j.T
    w = torch.tensor([1.0, 0.2, 3.0], dtype=F64)
    c = MGDA()(g, w)
    alpha = c / w
    assert alpha.sum().item() == pytest.approx(1.0) and (alpha >= 0).all()
    torch.testing.assert_close(alpha, min_norm_alpha(w[:, None] * g * w[None, :]))
    c_first = MGDA(rescale="first")(g, w)
    assert direction(j, c_first).norm().item() == pytest.approx((w[0] * j[0]).norm().item())
    torch.testing.assert_close(c_first / c_first.sum(), c / c.sum())


# ----------------------------------------------------------------------- PCGrad vs vector paper
def pcgrad_vectors(rows: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    out = torch.zeros_like(rows[0])
    for i in range(len(rows)):
        gi = rows[i].clone()
        for j in orders[i]:
            if j != i and gi @ rows[j] < 0:
                gi -= (gi @ rows[j]) / (rows[j] @ rows[j]) * rows[j]
        out += gi
    return out


def test_pcgrad_matches_the_papers_vector_algorithm_with_the_same_order():
    for seed, (j, w) in enumerate(gram_cases(60, seed=12)):
        c = PCGrad(seed=seed)(j @ j.T, w)
        orders = PCGrad(seed=seed).orders(len(w))
        torch.testing.assert_close(direction(j, c), pcgrad_vectors(j * w[:, None], orders), rtol=1e-9, atol=1e-9)


def test_pcgrad_order_state_round_trips():
    a = PCGrad(seed=3)
    a.orders(4)
    state = a.state_dict()
    first = a.orders(4)
    b = PCGrad(seed=99)
    b.load_state_dict(state)
    assert b.orders(4) == first


# ---------------------------------------------------------------------- UPGrad, CAGrad vs TorchJD
def test_upgrad_matches_torchjd():
    from torchjd._linalg import QuadprogProjector
    from torchjd.aggregation import UPGrad as TJUPGrad

    for j, w in gram_cases(60, seed=13):
        rows = j * w[:, None]
        if rows.norm() ** 2 < 1e-3:  # TorchJD zeroes Grams with trace < norm_eps (absolute)
            continue
        for reduction, pref in (("sum", torch.ones(len(w), dtype=F64)), ("mean", None)):
            ref = TJUPGrad(pref_vector=pref, projector=QuadprogProjector(reg_eps=1e-4))(rows)
            ours = direction(j, UPGrad(reduction=reduction, reg_eps=1e-4)(j @ j.T, w))
            torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-8)


def test_cagrad_matches_torchjd():
    from torchjd.aggregation import CAGrad as TJCAGrad

    for j, w in gram_cases(40, seed=14):
        rows = j * w[:, None]
        if len(w) == 1 or rows.norm() ** 2 < 1e-3:
            continue
        for c_radius in (0.2, 0.5, 1.0):
            ref = TJCAGrad(c=c_radius)(rows)
            ours = direction(j, CAGrad(c=c_radius, rescale="none", reduction="mean")(j @ j.T, w))
            # both solve a flat convex problem (CLARABEL vs exact QPs + golden section) to ~1e-8 in value
            torch.testing.assert_close(ours, ref, rtol=2e-3, atol=2e-4 * rows.norm().item())
            summed = CAGrad(c=c_radius, rescale="1+c^2", reduction="sum")(j @ j.T, w)
            torch.testing.assert_close(direction(j, summed), ours * len(w) / (1 + c_radius**2))


def test_cagrad_with_zero_radius_is_the_scalarized_sum():
    for j, w in itertools.islice(gram_cases(20, seed=15), 20):
        torch.testing.assert_close(CAGrad(c=0.0)(j @ j.T, w), w)
