"""Check a run's config against the signatures it will be built from, before anything is built or written.

One pass over the merged tree of ``cappo_pl.config_sources``: every key must be a parameter of the class
(or dataclass) at its place, every scalar must have its field's type, and every value must meet the range
constraints its annotation declares (``cappo_pl.constraints``). An error is one line naming the file:line
(or the command line) that set the value, the full key path and the fix::

    configs/x.yaml:4: model.optim.lrr: unknown key (did you mean 'lr'?)
    command line: model.rollout.group_size: must be > 0, got 0

The pass refuses only what it is sure of: a class it cannot import, a class taking ``**kwargs``, a parameter
without a type hint or of a type it does not model, a flag into a list (``+=``) or into a class given by a short
name is left to jsonargparse, which parses the same config next (and the class checks its ranges when built).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from cappo_pl.config_sources import CLASS_KEYS, Path, RawConfig
from cappo_pl.constraints import union_members, violation
from cappo_pl.errors import ConfigError

_SCALARS = (int, float, bool, str, type(None))


@dataclass(frozen=True)
class Group:
    """A top-level block built from ``cls``'s signature without a ``class_path`` (``model``, ``data``, ``trainer``)."""

    cls: type


def key_path(path: Path) -> str:
    """``("trainer", "callbacks", 0, "init_args", "x")`` -> ``trainer.callbacks[0].x``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "init_args":
            out += f".{part}" if out else part
    return out


def _strip(tp: Any) -> Any:
    """``Annotated[X, ...]`` -> ``X``."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp


def _members(tp: Any) -> tuple[Any, ...]:
    tp = _strip(tp)
    members = union_members(tp)
    return tuple(_strip(m) for m in members) if members is not None else (tp,)


def _signature(cls: type) -> tuple[dict[str, Any], set[str] | None]:
    """``(type hints, parameter names)`` of what builds ``cls``; names is None when it takes ``**kwargs``."""
    try:
        if dataclasses.is_dataclass(cls):
            hints = typing.get_type_hints(cls, include_extras=True)
            return hints, {f.name for f in dataclasses.fields(cls) if f.init}
        init = cls.__init__
        params = list(inspect.signature(init).parameters.values())[1:]
        hints = typing.get_type_hints(init, include_extras=True)
    except Exception:  # unresolvable annotations (TYPE_CHECKING imports): check nothing inside
        return {}, None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return hints, None
    return hints, {p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def _subclasses(cls: type) -> list[type]:
    out, todo = [], [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            out.append(sub)
            todo.append(sub)
    return out


def resolve_class(name: Any, bases: tuple[Any, ...]) -> type | None:
    """The class a ``class_path`` names: a dotted import path, or the short name of a loaded subclass of ``bases``."""
    if not isinstance(name, str):
        return None
    if "." in name:
        module, _, attr = name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            return None
        return found if inspect.isclass(found) else None
    matches = {c for b in bases if inspect.isclass(b) for c in [b, *_subclasses(b)] if c.__name__ == name}
    return matches.pop() if len(matches) == 1 else None


def _coerce(value: Any, tp: Any) -> Any:
    """A command-line string as jsonargparse reads it for a scalar field (YAML, then float for a float field)."""
    members = _members(tp)
    if not isinstance(value, str) or str in members:
        return value
    try:
        loaded = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(loaded, str) and float in members:
        try:
            return float(loaded)
        except ValueError:
            return value
    return loaded


def _is_scalar_type(tp: Any) -> bool:
    return all(m in _SCALARS or typing.get_origin(m) is Literal for m in _members(tp))


def _type_problem(value: Any, tp: Any) -> str | None:
    """Why ``value`` is not of scalar type ``tp`` (None when it is, or when ``tp`` is not a plain scalar type)."""
    members = _members(tp)
    if not _is_scalar_type(tp):
        return None
    for m in members:
        if typing.get_origin(m) is Literal or m is str:
            return None  # Literal choices are checked by violation(); anything can be read as a string
        if m is type(None) and value is None:
            return None
        if m is bool and isinstance(value, bool):
            return None
        if m is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if m is float and isinstance(value, int | float) and not isinstance(value, bool):
            return None
    names = " or ".join("null" if m is type(None) else m.__name__ for m in members)
    return f"expected {names}"


class _Checker:
    def __init__(self, raw: RawConfig) -> None:
        self.raw = raw

    def fail(self, path: Path, problem: str) -> None:
        where = self.raw.origin(path) or "config"
        raise ConfigError(f"{where}: {key_path(path)}: {problem}")

    def value(self, value: Any, tp: Any, path: Path) -> None:
        if isinstance(tp, Group):
            if isinstance(value, dict):
                self.params(value, tp.cls, path)
            return
        if value is None:
            return
        if isinstance(value, str) and str not in _members(tp):
            if _is_scalar_type(tp) and (_type_problem(value, tp) or violation(value, tp)) is None:
                return  # a string that is itself valid (a Literal choice such as 'bf16-mixed')
            value = _coerce(value, tp)  # a command-line string: read as jsonargparse would (YAML, numbers)
            if value is None:
                return
        cls = self.class_of(value, tp)
        if cls is not None:
            self.class_node(value, cls, path)
            return
        if isinstance(value, list | tuple):
            items = [typing.get_args(m)[0] for m in _members(tp) if typing.get_origin(m) is list and typing.get_args(m)]
            if len(items) == 1:
                for i, item in enumerate(value):
                    self.value(item, items[0], (*path, i))
            return
        if isinstance(value, dict):
            return
        problem = _type_problem(value, tp) or violation(value, tp)
        if problem is not None:
            self.fail(path, f"{problem}, got {value!r}")

    def class_of(self, value: Any, tp: Any) -> type | None:
        """The class whose signature governs dict ``value`` at a field of type ``tp`` (None: unknown)."""
        if not isinstance(value, dict):
            return None
        classes = tuple(m for m in _members(tp) if inspect.isclass(m) and m not in _SCALARS)
        if "class_path" in value:
            return resolve_class(value["class_path"], classes)
        dataclass_members = [m for m in classes if dataclasses.is_dataclass(m)]
        return dataclass_members[0] if len(dataclass_members) == 1 else None

    def class_node(self, value: dict[str, Any], cls: type, path: Path) -> None:
        if "class_path" not in value:
            self.params(value, cls, path)
            return
        init_args = value.get("init_args")
        if isinstance(init_args, dict):
            self.params(init_args, cls, (*path, "init_args"))
        rest = {k: v for k, v in value.items() if k not in CLASS_KEYS}
        self.params(rest, cls, path)

    def params(self, params: dict[str, Any], cls: type, path: Path) -> None:
        hints, names = _signature(cls)
        for key, value in params.items():
            if names is not None and key not in names:
                self.fail((*path, key), _unknown(key, cls, names))
            self.value(value, hints.get(key, Any), (*path, key))


def _unknown(key: str, cls: type, names: set[str]) -> str:
    close = difflib.get_close_matches(str(key), sorted(names), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"{cls.__name__} takes {', '.join(sorted(names))}"
    return f"unknown key ({hint})"


def check_raw_config(raw: RawConfig, roots: dict[str, Any]) -> None:
    """Check every key and value of ``raw`` against ``roots`` (top-level key -> ``Group`` or type hint).

    Raises:
        ConfigError: one line, ``<file:line or command line>: <key path>: <problem>``.

    """
    checker = _Checker(raw)
    for key, value in raw.tree.items():
        if key not in roots:
            checker.fail((key,), _unknown(key, type("config", (), {}), set(roots)))
        checker.value(value, roots[key], (key,))


_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value",
    "Expected a <class 'NoneType'>",
    "Problem with given class_path",
    "For further information",
    "Subclass types expect",
    "- a class path",
    "- a dict",
    "Not a valid subclass of",
)


def condense_parser_error(message: str) -> str:
    """A jsonargparse error (a multi-line dump of every Union branch) as one line: the key path and the reason."""
    keys: list[str] = []
    for raw_line in message.splitlines():
        line = raw_line.strip().removeprefix("- ").strip()
        if not line or any(line.startswith(n) for n in _NOISE):
            continue
        if line.startswith('Parser key "') and line.endswith(":"):
            keys.append(line[len('Parser key "') : -2])
            continue
        where = ".".join(k for k in keys if k != "init_args")
        return f"{where}: {line}" if where else line
    return " ".join(message.split())
