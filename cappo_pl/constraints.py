"""Range constraints of config fields, declared in their type hints, checked the same way everywhere.

A field says what it accepts in its annotation, with ``annotated_types`` metadata (the vocabulary pydantic
and jsonargparse share)::

    lr: PositiveFloat = 1e-4          # Annotated[float, Gt(0)]
    clip_eps: Annotated[float, Interval(gt=0, lt=1)] = 0.2

Two readers of the same declaration: ``cappo_pl.config_schema`` checks a YAML/command-line config before
anything is built (the error names the key path and the file:line that set it); ``check_fields`` checks a
dataclass in ``__post_init__`` and ``checked_init`` a class's ``__init__`` arguments (configs built in
Python). jsonargparse would enforce the metadata too, but not in modules with postponed annotations
(``from __future__ import annotations``, all of ours), so it is not relied on. Every float must be finite.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal, Union

from annotated_types import Ge, Gt, Interval

from cappo_pl.errors import ConfigError

PositiveInt = Annotated[int, Gt(0)]
NonNegativeInt = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0)]
NonNegativeFloat = Annotated[float, Ge(0)]
UnitFloat = Annotated[float, Interval(ge=0, le=1)]
"""A fraction or probability in [0, 1]."""
OpenUnitFloat = Annotated[float, Interval(gt=0, lt=1)]
"""A fraction strictly between 0 and 1 (a clip range, a decay)."""

_BOUNDS: tuple[tuple[str, str, Callable[[float, float], bool]], ...] = (
    ("gt", ">", lambda v, b: v > b),
    ("ge", ">=", lambda v, b: v >= b),
    ("lt", "<", lambda v, b: v < b),
    ("le", "<=", lambda v, b: v <= b),
)


def _bound_violation(value: float, meta: object) -> str | None:
    """The first bound of ``meta`` (Gt, Ge, Lt, Le or Interval) that ``value`` breaks, as ``"must be > 0"``."""
    for attr, sign, holds in _BOUNDS:
        bound = getattr(meta, attr, None)
        if bound is not None and not holds(value, bound):
            return f"must be {sign} {bound}"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def union_members(tp: Any) -> tuple[Any, ...] | None:
    """The members of ``X | Y`` / ``Optional[X]``, or None when ``tp`` is not a union."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return None


def violation(value: Any, tp: Any) -> str | None:
    """Why ``value`` breaks the constraints of annotation ``tp`` (None when it does not, or when unsure).

    Only what the annotation states is checked: bounds in ``Annotated`` metadata, finiteness of floats,
    ``Literal`` choices, and the items of ``list[...]``; a value of another type is left to the type checker
    (jsonargparse), so this never refuses a value it does not understand.
    """
    if typing.get_origin(tp) is Annotated:
        inner, *metadata = typing.get_args(tp)
        if isinstance(value, bool) and inner in (int, float):
            return "must be a number, not a boolean"
        problem = violation(value, inner)
        if problem is None and _is_number(value):
            problem = next((p for m in metadata if (p := _bound_violation(value, m))), None)
        return problem
    members = union_members(tp)
    if members is not None:
        if value is None and type(None) in members:
            return None
        literals = [m for m in members if typing.get_origin(m) is Literal]
        if literals and len(literals) == len([m for m in members if m is not type(None)]):
            # one set of choices, however the annotation splits them (Lightning's precision is 3 Literals)
            return violation(value, Literal[tuple(c for m in literals for c in typing.get_args(m))])
        # a member that is another class than the value's (``str`` for a number) has nothing to say about it
        applicable = [
            m for m in members
            if m is not type(None) and not (isinstance(m, type) and m not in (int, float) and not isinstance(value, m))
        ]  # fmt: skip
        problems = [violation(value, m) for m in applicable]
        return None if not problems or any(p is None for p in problems) else problems[0]
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}"
    if tp is float and _is_number(value) and not math.isfinite(value):
        return "must be a finite number"
    if typing.get_origin(tp) is list and isinstance(value, list | tuple):
        (item_tp,) = typing.get_args(tp) or (Any,)
        for i, item in enumerate(value):
            if (problem := violation(item, item_tp)) is not None:
                return f"item {i}: {problem}"
    return None


def _message(key: str, value: Any, problem: str) -> str:
    return f"{key}: {problem}, got {value!r}"


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every field of dataclass ``obj`` against its annotation (call it from ``__post_init__``).

    Raises:
        ConfigError: ``<prefix><field>: must be > 0, got -1``.

    """
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if (problem := violation(value, hints.get(f.name, Any))) is not None:
            raise ConfigError(_message(prefix + f.name, value, problem))


def checked_init(init: Callable[..., None]) -> Callable[..., None]:
    """Decorate a class's ``__init__``: its arguments are checked against their annotations first.

    The signature is kept (``functools.wraps``), so jsonargparse still reads the parameters and their docs.

    Raises:
        ConfigError: ``<Class>.<param>: must be > 0, got -1``.

    """
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        hints = typing.get_type_hints(init, include_extras=True)
        for name, value in list(bound.arguments.items())[1:]:
            if (problem := violation(value, hints.get(name, Any))) is not None:
                raise ConfigError(_message(f"{type(self).__name__}.{name}", value, problem))
        init(self, *args, **kwargs)

    return wrapper
