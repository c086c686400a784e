import statistics

import pytest
import torch

from cappo_pl.advantages import GRPO, RLOO, DrGRPO, ReinforcePlusPlus, zero_std_group_fraction

R = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.25, 0.0]


def groups(xs, g):
    return [xs[i : i + g] for i in range(0, len(xs), g)]


def test_grpo_matches_plain_statistics():
    out = GRPO()(torch.tensor(R), 4).tolist()
    want = []
    for grp in groups(R, 4):
        m, s = statistics.mean(grp), statistics.stdev(grp)
        want += [(x - m) / (s + 1e-6) for x in grp]
    assert out == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_grpo_zero_std_group_gives_zero_advantage():
    out = GRPO()(torch.tensor(R), 4)
    assert out[4:8].abs().max().item() == 0.0
    assert zero_std_group_fraction(torch.tensor(R), 4).item() == pytest.approx(1 / 3)


def test_dr_grpo_is_mean_centred_only():
    out = DrGRPO()(torch.tensor(R), 4).tolist()
    want = [x - statistics.mean(grp) for grp in groups(R, 4) for x in grp]
    assert out == pytest.approx(want, abs=1e-6)


def test_rloo_leave_one_out():
    out = RLOO()(torch.tensor(R), 4).tolist()
    want = []
    for grp in groups(R, 4):
        for i, x in enumerate(grp):
            others = grp[:i] + grp[i + 1 :]
            want.append(x - sum(others) / len(others))
    assert out == pytest.approx(want, abs=1e-6)


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        RLOO()(torch.tensor([1.0, 2.0]), 1)


@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_pp_batch_normalised(baseline):
    xs = R
    if baseline:
        xs = [x - statistics.mean(grp) for grp in groups(R, 4) for x in grp]
    m, s = statistics.mean(xs), statistics.stdev(xs)
    want = [(x - m) / (s + 1e-8) for x in xs]
    assert ReinforcePlusPlus(group_baseline=baseline)(torch.tensor(R), 4).tolist() == pytest.approx(
        want, rel=1e-5, abs=1e-6
    )


def test_bad_group_size():
    with pytest.raises(ValueError, match="groups of 5"):
        GRPO()(torch.tensor(R), 5)


VALID = [True, False, True, True, True, True, True, True, True, True, False, False]


def test_grpo_skipped_samples_do_not_shift_their_group():
    r = torch.tensor(R)
    r_bad = r.clone()
    r_bad[1] = 123.0  # whatever the invalid value is, it must not matter
    out = GRPO()(r_bad, 4, torch.tensor(VALID)).tolist()
    want = []
    for grp, ok in zip(groups(R, 4), groups(VALID, 4), strict=True):
        vals = [x for x, v in zip(grp, ok, strict=True) if v]
        if len(vals) > 1:
            m, s = statistics.mean(vals), statistics.stdev(vals)
        else:
            m, s = 0.0, 1.0  # verl's rule for a single sample
        want += [(x - m) / (s + 1e-6) if v else 0.0 for x, v in zip(grp, ok, strict=True)]
    assert out == pytest.approx(want, rel=1e-5, abs=1e-6)
    # [1, skip, 0, 1]: the skip is left out of mean and std.
    assert GRPO()(torch.tensor([1.0, 5.0, 1.0, 1.0]), 4, torch.tensor([True, False, True, True])).abs().max() == 0


def test_rloo_and_reinforce_pp_with_skips():
    r, v = torch.tensor(R), torch.tensor(VALID)
    out = RLOO()(r, 4, v).tolist()
    want = []
    for grp, ok in zip(groups(R, 4), groups(VALID, 4), strict=True):
        for i, (x, good) in enumerate(zip(grp, ok, strict=True)):
            others = [y for j, (y, o) in enumerate(zip(grp, ok, strict=True)) if o and j != i]
            want.append(x - sum(others) / len(others) if good and others else 0.0)
    assert out == pytest.approx(want, abs=1e-6)
    vals = [x for x, ok in zip(R, VALID, strict=True) if ok]
    m, s = statistics.mean(vals), statistics.stdev(vals)
    want = [(x - m) / (s + 1e-8) if ok else 0.0 for x, ok in zip(R, VALID, strict=True)]
    assert ReinforcePlusPlus()(r, 4, v).tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_zero_std_fraction_ignores_skipped():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert zero_std_group_fraction(r, 4, torch.tensor([True, False, True, True])).item() == 1.0
    assert zero_std_group_fraction(r, 4).item() == 0.0
