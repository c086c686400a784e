"""Range constraints declared in type hints (cappo_pl.constraints) and their enforcement by every config class.

(a) ``violation`` / ``check_fields`` / ``checked_init`` against hand-computed expectations, at the edges.
(b) A walk over every class a config can name: each default meets its own annotation, and a value just
    outside each declared bound is refused at construction with a ``ConfigError`` naming the parameter (so a
    bound added to a hint without ``@checked_init`` / ``check_fields`` fails here).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import re
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional

import pytest
from annotated_types import Ge, Gt, Interval, Le, Lt

from cappo_pl.constraints import (
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitFloat,
    PositiveFloat,
    PositiveInt,
    UnitFloat,
    check_fields,
    checked_init,
    union_members,
    violation,
)
from cappo_pl.errors import ConfigError

# ---------------------------------------------------------------------------------------------------------------
# (a) violation / check_fields / checked_init
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "tp", "expected"),
    [
        # Gt vs Ge at the bound
        (0.0, PositiveFloat, "must be > 0"),
        (0, PositiveInt, "must be > 0"),
        (5e-324, PositiveFloat, None),
        (1, PositiveInt, None),
        (0.0, NonNegativeFloat, None),
        (0, NonNegativeInt, None),
        (-5e-324, NonNegativeFloat, "must be >= 0"),
        (-1, NonNegativeInt, "must be >= 0"),
        # Lt / Le
        (1.0, Annotated[float, Lt(1)], "must be < 1"),
        (0.999, Annotated[float, Lt(1)], None),
        (1.0, Annotated[float, Le(1)], None),
        (1.0000001, Annotated[float, Le(1)], "must be <= 1"),
        # Interval: closed [0, 1] and open (0, 1)
        (0.0, UnitFloat, None),
        (1.0, UnitFloat, None),
        (-0.1, UnitFloat, "must be >= 0"),
        (1.1, UnitFloat, "must be <= 1"),
        (0.0, OpenUnitFloat, "must be > 0"),
        (1.0, OpenUnitFloat, "must be < 1"),
        (0.5, OpenUnitFloat, None),
        (1.0, Annotated[float, Interval(gt=0, le=1)], None),
        (0.0, Annotated[float, Interval(gt=0, le=1)], "must be > 0"),
        # a bound given as a float, compared with an int value
        (1, Annotated[float, Ge(1.0)], None),
        (0.999, Annotated[float, Ge(1.0)], "must be >= 1.0"),
        (1.0, Annotated[float, Gt(1)], "must be > 1"),
        # several metadata items: the first broken one is reported
        (5, Annotated[int, Ge(0), Lt(3)], "must be < 3"),
        (-1, Annotated[int, Ge(0), Lt(3)], "must be >= 0"),
        # Literal
        ("b", Literal["a", "b"], None),
        ("c", Literal["a", "b"], "must be one of 'a', 'b'"),
        (1, Literal[1, 2], None),
        # Optional / unions: None is fine when allowed, a number is checked against the non-None member
        (None, PositiveFloat | None, None),
        (None, Optional[PositiveFloat], None),  # noqa: UP045 (the typing.Optional spelling must work too)
        (-1.0, PositiveFloat | None, "must be > 0"),
        (-1.0, Optional[PositiveFloat], "must be > 0"),  # noqa: UP045
        (2.0, PositiveFloat | None, None),
        (-1, Annotated[int, Lt(0)] | Annotated[int, Gt(10)], None),
        (11, Annotated[int, Lt(0)] | Annotated[int, Gt(10)], None),
        (5, Annotated[int, Lt(0)] | Annotated[int, Gt(10)], "must be < 0"),
        ("auto", PositiveInt | Literal["auto"], None),
        ("x", PositiveInt | Literal["auto"], None),  # a str may be read as the int member: left to the type checker
        # list items
        ([1, 2], list[PositiveInt], None),
        ([1, 0], list[PositiveInt], "item 1: must be > 0"),
        ((0.5, 2.0), list[UnitFloat], "item 1: must be <= 1"),
        ([], list[PositiveInt], None),
        ([-1.0], list[float], None),
        ([math.nan], list[float], "item 0: must be a finite number"),
        # every float must be finite, with or without bounds
        (math.nan, float, "must be a finite number"),
        (math.inf, float, "must be a finite number"),
        (-math.inf, float, "must be a finite number"),
        (math.inf, PositiveFloat, "must be a finite number"),
        (math.nan, NonNegativeFloat, "must be a finite number"),
        (math.nan, PositiveFloat | None, "must be a finite number"),
        (-1e300, float, None),
        (3, float, None),
        # bool is not a number: refused where the annotation bounds a number (a plain type is left to jsonargparse)
        (True, PositiveInt, "must be a number, not a boolean"),
        (False, PositiveInt, "must be a number, not a boolean"),
        (False, PositiveFloat, "must be a number, not a boolean"),
        (True, float, None),
        # another type than the annotation's: left to the type checker, never refused here
        ("x", PositiveFloat, None),
        (None, PositiveFloat, None),
        (-1.0, int, None),
        (-1.0, Any, None),
    ],
)
def test_violation(value, tp, expected):
    assert violation(value, tp) == expected


def test_union_members():
    assert union_members(int | None) == (int, type(None))
    assert union_members(Optional[int]) == (int, type(None))  # noqa: UP045
    assert union_members(PositiveInt) is None
    assert union_members(int) is None


@dataclass
class _Fields:
    n: PositiveInt = 1
    frac: UnitFloat = 0.5
    mode: Literal["a", "b"] = "a"
    x: float = 0.0
    opt: PositiveFloat | None = None
    free: str = "anything"

    def __post_init__(self) -> None:
        check_fields(self)


def test_check_fields_accepts_valid_values():
    _Fields()
    _Fields(n=1, frac=0.0, opt=1e-9, x=-1e9)
    _Fields(frac=1.0, mode="b", opt=None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n: must be > 0, got 0"),
        ({"frac": 1.5}, "frac: must be <= 1, got 1.5"),
        ({"frac": -0.0001}, "frac: must be >= 0, got -0.0001"),
        ({"mode": "c"}, "mode: must be one of 'a', 'b', got 'c'"),
        ({"x": math.inf}, "x: must be a finite number, got inf"),
        ({"opt": 0.0}, "opt: must be > 0, got 0.0"),
    ],
)
def test_check_fields_refuses(kwargs, message):
    with pytest.raises(ConfigError) as err:
        _Fields(**kwargs)
    assert str(err.value) == message


def test_check_fields_prefix_and_error_type():
    obj = _Fields()
    obj.n = -3  # a dataclass is not re-checked on assignment; check_fields can be called again
    with pytest.raises(ConfigError, match=r"^model\.thing\.n: must be > 0, got -3$") as err:
        check_fields(obj, prefix="model.thing.")
    assert isinstance(err.value, ValueError)  # ConfigError is a ValueError: old `except ValueError` still works


class _Checked:
    @checked_init
    def __init__(
        self,
        rate: PositiveFloat = 1.0,
        frac: Annotated[float, Interval(gt=0, lt=1)] = 0.5,
        count: NonNegativeInt = 0,
        mode: Literal["x", "y"] = "x",
        cap: Annotated[float, Gt(1)] | None = None,
        name: str = "n",
    ) -> None:
        """Doc of the init.

        Args:
            rate: a rate.
        """
        self.rate, self.frac, self.count, self.mode, self.cap, self.name = rate, frac, count, mode, cap, name


class _CheckedChild(_Checked):
    pass


def test_checked_init_accepts_valid_values():
    obj = _Checked(2.0, 0.999, 3, "y", 1.0001, "z")
    assert (obj.rate, obj.frac, obj.count, obj.mode, obj.cap, obj.name) == (2.0, 0.999, 3, "y", 1.0001, "z")
    assert _Checked().cap is None


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((0.0,), {}, "_Checked.rate: must be > 0, got 0.0"),  # positional
        ((), {"rate": -1}, "_Checked.rate: must be > 0, got -1"),
        ((), {"frac": 1.0}, "_Checked.frac: must be < 1, got 1.0"),
        ((), {"frac": 0}, "_Checked.frac: must be > 0, got 0"),
        ((1.0, 0.5, -1), {}, "_Checked.count: must be >= 0, got -1"),
        ((), {"mode": "z"}, "_Checked.mode: must be one of 'x', 'y', got 'z'"),
        ((), {"cap": 1.0}, "_Checked.cap: must be > 1, got 1.0"),
        ((), {"rate": math.nan}, "_Checked.rate: must be a finite number, got nan"),
    ],
)
def test_checked_init_refuses(args, kwargs, message):
    with pytest.raises(ConfigError) as err:
        _Checked(*args, **kwargs)
    assert str(err.value) == message


def test_checked_init_names_the_subclass_and_keeps_the_signature():
    with pytest.raises(ConfigError, match=r"^_CheckedChild\.rate: must be > 0"):
        _CheckedChild(rate=0.0)
    params = list(inspect.signature(_Checked.__init__).parameters)
    assert params == ["self", "rate", "frac", "count", "mode", "cap", "name"]
    assert _Checked.__init__.__doc__.startswith("Doc of the init.")
    hints = typing.get_type_hints(_Checked.__init__, include_extras=True)  # resolved in the wrapped init's module
    assert hints["rate"] == PositiveFloat
    with pytest.raises(TypeError):  # a wrong call is still a TypeError, not swallowed
        _Checked(unknown=1)


# ---------------------------------------------------------------------------------------------------------------
# (b) every config class enforces the bounds of its annotations
# ---------------------------------------------------------------------------------------------------------------

_EXPORTING = (
    "cappo_pl.losses",
    "cappo_pl.combiners",
    "cappo_pl.callbacks",
    "cappo_pl.advantages",
    "cappo_pl.objectives",
)
_DATACLASS_MODULES = ("cappo_pl.optim_config", "cappo_pl.models")
_EXTRA = (
    ("cappo_pl.rollout", "RolloutConfig"),
    ("cappo_pl.critic", "CriticConfig"),
    ("cappo_pl.references", "SRRConfig"),
    ("cappo_pl.experience", "DynamicSamplingConfig"),
    ("cappo_pl.experience", "OverlongConfig"),
    ("cappo_pl.gradients", "GradientConfig"),
    ("cappo_pl.data.tasks", "SumTask"),
    ("cappo_pl.data.datamodule", "RLDataModule"),
    ("cappo_pl.module", "RLModule"),
)


def _config_classes() -> list[type]:
    found: dict[str, type] = {}

    def add(cls: Any) -> None:
        if inspect.isclass(cls) and cls.__module__.startswith("cappo_pl."):
            found[f"{cls.__module__}.{cls.__qualname__}"] = cls

    for name in _EXPORTING:
        module = importlib.import_module(name)
        names = getattr(module, "__all__", None) or [
            n for n, v in vars(module).items() if inspect.isclass(v) and v.__module__ == name
        ]
        for attr in names:
            add(getattr(module, attr))
    for name in _DATACLASS_MODULES:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if dataclasses.is_dataclass(value) and value.__module__ == name:
                add(value)
    for name, attr in _EXTRA:
        add(getattr(importlib.import_module(name), attr, None))
    return [found[k] for k in sorted(found)]


@dataclass(frozen=True)
class _Param:
    name: str
    hint: Any
    default: Any  # inspect.Parameter.empty when required


def _params(cls: type) -> list[_Param] | None:
    """The constructor parameters of ``cls`` with their hints (None: nothing a config sets)."""
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls, include_extras=True)
        out = []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = inspect.Parameter.empty
            out.append(_Param(f.name, hints.get(f.name, Any), default))
        return out
    if cls.__init__ is object.__init__:
        return None
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [_Param(p.name, hints.get(p.name, Any), p.default) for p in params if p.kind not in kinds]


def _bounded_members(hint: Any) -> list[tuple[type, object]]:
    """``(inner type, metadata)`` of each bound of ``hint`` (through ``X | None``; not list items)."""
    members = union_members(hint) or (hint,)
    out = []
    for m in members:
        if typing.get_origin(m) is Annotated:
            inner, *metadata = typing.get_args(m)
            out += [(inner, meta) for meta in metadata if any(hasattr(meta, a) for a in ("gt", "ge", "lt", "le"))]
    return out


def _just_outside(inner: type, meta: object) -> list[Any]:
    """The values closest to each bound of ``meta`` that break it (the bound itself for a strict one)."""
    out = []
    for attr, step in (("gt", 0), ("ge", -1), ("lt", 0), ("le", 1)):
        bound = getattr(meta, attr, None)
        if bound is None:
            continue
        if step == 0:
            out.append(inner(bound) if inner in (int, float) else bound)
        elif inner is int:
            out.append(int(bound) + step)
        else:
            out.append(math.nextafter(float(bound), step * math.inf))
    return out


def _required_kwargs(params: list[_Param]) -> dict[str, Any] | None:
    """Trivial values for the required parameters (only strings are guessed; None: cannot build)."""
    kwargs = {}
    for p in params:
        if p.default is inspect.Parameter.empty:
            if p.hint is not str:
                return None
            kwargs[p.name] = "x"
    return kwargs


_CLASSES = _config_classes()


def test_the_walk_covers_the_config_classes():
    names = {c.__name__ for c in _CLASSES}
    expected = {
        "PPOClip", "GPPO", "GSPO", "CISPO", "GPG", "DPPO", "ERC", "ClipCov", "KLCov",
        "CAGrad", "MGDA", "PCGrad", "UPGrad", "Scalarized",
        "EntropyController", "StepEntropyController", "AdaptiveKLController", "SampleTable", "RunSummary", "ExportHF",
        "GRPO", "DrGRPO", "RLOO", "ReinforcePlusPlus", "GAE",
        "PolicyObjective", "EntropyBonus", "KLPenalty", "PositiveNLL",
        "PPOConfig", "OptimConfig", "RolloutConfig", "CriticConfig",
    }  # fmt: skip
    assert expected <= names, expected - names
    bounded = {(c.__name__, p.name) for c in _CLASSES for p in _params(c) or [] if _bounded_members(p.hint)}
    assert {
        ("PPOClip", "eps_low"), ("PPOClip", "clip_ratio_c"), ("GPPO", "beta1"), ("ERC", "beta_low"),
        ("DPPO", "tis_cap"), ("CAGrad", "c"), ("EntropyController", "coef_min"), ("AdaptiveKLController", "horizon"),
        ("GAE", "lam"), ("KLPenalty", "weight"), ("RunSummary", "window"), ("CriticConfig", "cliprange_value"),
        ("OptimConfig", "lr"), ("RolloutConfig", "group_size"),
    } <= bounded  # fmt: skip


@pytest.mark.parametrize("cls", _CLASSES, ids=lambda c: c.__qualname__)
def test_defaults_meet_their_annotations(cls):
    for p in _params(cls) or []:
        if p.default is not inspect.Parameter.empty:
            assert violation(p.default, p.hint) is None, f"{cls.__name__}.{p.name} = {p.default!r}"


@pytest.mark.parametrize("cls", _CLASSES, ids=lambda c: c.__qualname__)
def test_values_just_outside_a_bound_are_refused(cls):
    params = _params(cls)
    bounded = [(p, inner, meta) for p in params or [] for inner, meta in _bounded_members(p.hint)]
    if not bounded:
        pytest.skip(f"{cls.__name__} declares no bound")
    required = _required_kwargs(params)
    if required is None:
        pytest.skip(f"{cls.__name__} has required arguments that cannot be guessed")
    cls(**required)  # the defaults build
    for p, inner, meta in bounded:
        for value in _just_outside(inner, meta):
            assert violation(value, p.hint) is not None, (cls.__name__, p.name, value)
            with pytest.raises(ConfigError) as err:
                cls(**{**required, p.name: value})
            assert re.search(rf"(^|[\s.]){re.escape(p.name)}: ", str(err.value)), str(err.value)


@pytest.mark.parametrize("cls", _CLASSES, ids=lambda c: c.__qualname__)
def test_non_finite_floats_are_refused(cls):
    params = _params(cls)
    required = _required_kwargs(params or [])
    floats = [p for p in params or [] if violation(math.nan, p.hint) == "must be a finite number"]
    if not floats or required is None:
        pytest.skip(f"{cls.__name__}: no float parameter, or required arguments that cannot be guessed")
    for p in floats:
        with pytest.raises(ConfigError, match=rf"(^|[\s.]){re.escape(p.name)}: must be a finite number"):
            cls(**{**required, p.name: math.nan})


# ---------------------------------------------------------------------------------------------------------------
# cross-field rules kept as hand checks
# ---------------------------------------------------------------------------------------------------------------


def test_cross_field_rules():
    from cappo_pl.callbacks import EntropyController, StepEntropyController
    from cappo_pl.losses import CISPO, ClipCov

    with pytest.raises(ConfigError, match=r"CISPO\.ratio_min: must be <= ratio_max"):
        CISPO(ratio_min=2.0, ratio_max=1.5)
    CISPO(ratio_min=0.8, ratio_max=1.2)
    with pytest.raises(ConfigError, match=r"ClipCov\.cov_lb: must be < cov_ub"):
        ClipCov(cov_lb=5.0, cov_ub=5.0)
    ClipCov(cov_lb=-1.0, cov_ub=0.5)  # covariances can be negative
    with pytest.raises(ConfigError, match=r"EntropyController\.coef_min / initial_coef / coef_max"):
        EntropyController(coef_min=0.1, initial_coef=0.05, coef_max=1.0)
    with pytest.raises(ConfigError, match=r"EntropyController\.target / target_ratio: give exactly one"):
        EntropyController(target=0.5, target_ratio=0.5)
    with pytest.raises(ConfigError, match=r"StepEntropyController\.coef_min: must be <= coef_max"):
        StepEntropyController(coef_min=0.5, coef_max=0.1)
    with pytest.raises(ConfigError, match=r"StepEntropyController\.target / target_ratio: give exactly one"):
        StepEntropyController(target=0.5, target_ratio=0.5)


def test_hand_checks_replaced_by_annotations_still_refuse():
    from cappo_pl.callbacks import AdaptiveKLController
    from cappo_pl.combiners import CAGrad
    from cappo_pl.losses import DPPO, ERC, GPPO, PPOClip
    from cappo_pl.objectives import KLPenalty

    cases = [
        (lambda: DPPO("tv"), r"DPPO\.divergence: must be one of"),
        (lambda: KLPenalty(estimator="k4"), r"KLPenalty\.estimator: must be one of"),
        (lambda: CAGrad(c=-0.1), r"CAGrad\.c: must be >= 0"),
        (lambda: AdaptiveKLController(horizon=0), r"AdaptiveKLController\.horizon: must be > 0"),
        (lambda: AdaptiveKLController(target=0.0), r"AdaptiveKLController\.target: must be > 0"),
        (lambda: GPPO(clip_ratio_c=1.0), r"GPPO\.clip_ratio_c: must be > 1"),
        (lambda: PPOClip(agg="mean"), r"PPOClip\.agg: must be one of"),
        (lambda: ERC(beta_low=1.5), r"ERC\.beta_low: must be <= 1"),
    ]
    for build, message in cases:
        with pytest.raises(ConfigError, match=message):
            build()
    PPOClip(clip_ratio_c=None)
    PPOClip(eps_low=1.0, eps_high=3.0)  # eps_low 1: no clipping below; eps_high has no upper bound


def test_config_schema_reads_the_decorated_signatures():
    from cappo_pl.config_schema import _signature
    from cappo_pl.losses import PPOClip

    hints, names = _signature(PPOClip)
    assert names == {"eps_low", "eps_high", "clip_ratio_c", "agg", "loss_scale_factor"}
    assert violation(0.0, hints["eps_high"]) == "must be > 0"
