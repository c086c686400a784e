"""Weight controllers: the update rules against their formulas, closed-loop tracking, checkpoint state."""

import math
from types import SimpleNamespace

import pytest
import torch

from cappo_pl.callbacks import AdaptiveKLController, EntropyController, StepEntropyController
from cappo_pl.callbacks.entropy import PIState, pi_log_step, skywork_step
from cappo_pl.callbacks.kl import adaptive_kl_step
from cappo_pl.errors import ConfigError
from cappo_pl.objectives import EntropyBonus, KLPenalty, PolicyObjective


def test_pi_step_with_kp_zero_is_the_reference_update():
    # docs/reference/algorithms.md section 5: log lambda <- log lambda + eta (H* - H), clamped
    state = PIState(math.log(0.01), 0.0)
    for err in (0.3, -0.1, 0.2):
        new = pi_log_step(state, err, math.log(0.01), 0.0, 0.05, math.log(1e-4), math.log(0.1))
        assert new.log_coef == pytest.approx(state.log_coef + 0.05 * err)
        state = new


def test_pi_anti_windup_and_clamp():
    lo, hi = math.log(1e-4), math.log(0.1)
    state = PIState(math.log(0.01), 0.0)
    for _ in range(100):  # a long positive error: saturates at the top without winding up
        state = pi_log_step(state, 1.0, math.log(0.01), 0.0, 0.5, lo, hi)
    assert state.log_coef == pytest.approx(hi)
    assert state.integral <= hi - math.log(0.01) + 0.5 + 1e-12
    back = pi_log_step(state, -1.0, math.log(0.01), 0.0, 0.5, lo, hi)
    assert back.log_coef < hi  # leaves saturation at once (a wound-up integral would hold it there)
    # proportional term acts without memory
    p = pi_log_step(PIState(math.log(0.01), 0.0), 0.5, math.log(0.01), 2.0, 0.0, lo, hi)
    assert p.log_coef == pytest.approx(math.log(0.01) + 1.0) and p.integral == 0.0


def test_skywork_rule_matches_trl():
    assert skywork_step(0.0, 0.1, 0.2, 0.005, 0.0, 1.0) == (0.005, 0.005)
    assert skywork_step(0.5, 0.3, 0.2, 0.005, 0.0, 1.0) == (0.495, 0.0)
    assert skywork_step(1.0, 0.2, 0.2, 0.005, 0.0, 1.0) == (1.0, 1.0)  # H <= target raises; clamped
    assert skywork_step(0.002, 0.5, 0.2, 0.005, 0.0, 1.0) == (0.0, 0.0)


def test_adaptive_kl_matches_ziegler():
    assert adaptive_kl_step(0.1, 0.15, 0.1, 64, 1000) == pytest.approx(0.1 * (1 + 0.2 * 64 / 1000))  # clipped
    assert adaptive_kl_step(0.1, 0.11, 0.1, 64, 1000) == pytest.approx(0.1 * (1 + 0.1 * 64 / 1000))
    assert adaptive_kl_step(0.1, 0.0, 0.1, 64, 1000) == pytest.approx(0.1 * (1 - 0.2 * 64 / 1000))


class _Trainer:
    """The parts of a Trainer a controller touches."""

    world_size = 1

    def __init__(self):
        self.callback_metrics = {}
        self.strategy = SimpleNamespace(reduce=lambda t, reduce_op: t)


class _Module:
    def __init__(self, objectives):
        self.objectives = objectives
        self.device = torch.device("cpu")
        self.rollout_cfg = SimpleNamespace(group_size=4)
        self.logged = []

    def log_dict(self, d, **kw):
        self.logged.append({k: float(v) for k, v in d.items()})


def _step(ctrl, trainer, module, key, value, batch=(0, 1)):
    trainer.callback_metrics = {key: torch.tensor(value)}
    ctrl.on_train_batch_end(trainer, module, None, list(batch), 0)


def _closed_loop(ctrl, steps=300, h0=0.8):
    """A plant with the qualitative RL behaviour: entropy decays, the bonus pushes it up."""
    trainer, obj = _Trainer(), EntropyBonus(weight=0.5)
    module = _Module([PolicyObjective(), obj])
    ctrl.setup(trainer, module, "fit")
    ctrl.on_train_start(trainer, module)
    h, trace = h0, []
    for _ in range(steps):
        _step(ctrl, trainer, module, "train/policy/entropy", h)
        trace.append(h)
        h = max(1e-3, h - 0.02 * h + 2.0 * obj.weight * (1.0 - h / 3.0))  # drift down + push up by the weight
    return trace, module


@pytest.mark.parametrize("gate", [False, True])
def test_entropy_controller_tracks_a_relative_target(gate):
    ctrl = EntropyController(target_ratio=0.5, initial_coef=0.01, coef_min=1e-4, coef_max=0.1, gate=gate)
    trace, module = _closed_loop(ctrl)
    assert ctrl.target == pytest.approx(0.4)  # 0.5 x the step-0 entropy
    tail = trace[-50:]
    assert max(abs(h - 0.4) / 0.4 for h in tail) < 0.1
    assert module.logged[-1]["train/entropy_target"] == pytest.approx(0.4)
    uncontrolled = _closed_loop(EntropyController(target_ratio=0.5, coef_min=1e-4, initial_coef=1e-4, coef_max=1e-4))
    assert uncontrolled[0][-1] < 0.2  # without control the plant collapses, so tracking is the controller's doing


def test_gated_controller_applies_zero_above_target():
    ctrl = EntropyController(target=0.5, gate=True)
    trainer, obj = _Trainer(), EntropyBonus(weight=0.3)
    module = _Module([obj])
    ctrl.setup(trainer, module, "fit")
    ctrl.on_train_start(trainer, module)
    assert obj.weight == 0.0
    _step(ctrl, trainer, module, "train/policy/entropy", 0.7)
    assert obj.weight == 0.0 and ctrl.coef < 0.01  # above target: off, and the coefficient decays
    _step(ctrl, trainer, module, "train/policy/entropy", 0.2)
    assert obj.weight == ctrl.coef > 0


def test_step_controller_and_adaptive_kl_drive_the_weight():
    trainer = _Trainer()
    ent, kl = EntropyBonus(), KLPenalty(weight=0.5)
    module = _Module([PolicyObjective(), ent, kl])
    step_ctrl, kl_ctrl = (
        StepEntropyController(target=0.3),
        AdaptiveKLController(init_coef=0.05, target=0.1, horizon=100),
    )
    for c in (step_ctrl, kl_ctrl):
        c.setup(trainer, module, "fit")
        c.on_train_start(trainer, module)
    assert ent.weight == 0.0 and kl.weight == 0.05
    _step(step_ctrl, trainer, module, "train/policy/entropy", 0.1)
    assert ent.weight == pytest.approx(0.005)
    _step(kl_ctrl, trainer, module, "train/policy/kl_ref", 1.0, batch=range(8))  # 8 prompts x G=4 samples
    assert kl.weight == pytest.approx(0.05 * (1 + 0.2 * 32 / 100))


def test_state_round_trip_keeps_state_not_configuration():
    ctrl = EntropyController(target_ratio=0.5, kp=1.0, ki=0.3)
    _closed_loop(ctrl, steps=20)
    state = ctrl.state_dict()
    fresh = EntropyController(target_ratio=0.5, kp=2.0, ki=0.1)  # a resumed run may retune the gains
    fresh.load_state_dict(state)
    for key in ("coef", "integral", "target", "initial_entropy", "steps", "last_measure"):
        assert getattr(fresh, key) == getattr(ctrl, key)
    assert (fresh.kp, fresh.ki) == (2.0, 0.1)
    trainer, module = _Trainer(), _Module([EntropyBonus(weight=0.7)])
    fresh.on_train_start(trainer, module)
    assert module.objectives[0].weight == 0.7  # a resumed controller does not reset the restored weight


def test_bad_configuration_is_refused():
    with pytest.raises(ConfigError, match="objective='ent'"):
        EntropyController(objective="ent").setup(_Trainer(), _Module([EntropyBonus()]), "fit")
    with pytest.raises(ValueError, match="exactly one"):
        EntropyController(target=0.5, target_ratio=0.5)
    with pytest.raises(ValueError, match="coef_min"):
        EntropyController(initial_coef=1.0, coef_max=0.1)


def _ddp_controller_worker(rank, world, port, queue):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def reduce(t, reduce_op):
        assert reduce_op == "mean"
        t = t.clone()
        dist.all_reduce(t)
        return t / world

    trainer = _Trainer()
    trainer.strategy = SimpleNamespace(reduce=reduce)
    obj = EntropyBonus(weight=0.0)
    module = _Module([PolicyObjective(), obj])
    ctrl = EntropyController(target_ratio=0.9)
    ctrl.setup(trainer, module, "fit")
    ctrl.on_train_start(trainer, module)
    weights = []
    for step in range(5):  # each rank measures a different entropy on its own rollouts
        _step(ctrl, trainer, module, "train/policy/entropy", 0.8 - 0.05 * step + (0.1 if rank else -0.1))
        weights.append(obj.weight)
    queue.put((rank, weights, ctrl.state_dict()))
    dist.destroy_process_group()


def test_ranks_take_the_same_decision_from_the_mean_measurement():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").Queue()
    mp.start_processes(_ddp_controller_worker, args=(2, port, queue), nprocs=2, start_method="spawn", join=True)
    results = {rank: (w, st) for rank, w, st in (queue.get() for _ in range(2))}
    assert results[0] == results[1]  # identical weights and state on both ranks
    single = EntropyController(target_ratio=0.9)
    trainer, obj = _Trainer(), EntropyBonus(weight=0.0)
    module = _Module([PolicyObjective(), obj])
    single.setup(trainer, module, "fit")
    single.on_train_start(trainer, module)
    want = []
    for step in range(5):  # one process seeing the ranks' mean
        _step(single, trainer, module, "train/policy/entropy", 0.8 - 0.05 * step)
        want.append(obj.weight)
    assert results[0][0] == pytest.approx(want, rel=1e-6)
    assert results[0][1]["target"] == pytest.approx(0.72, rel=1e-6)
