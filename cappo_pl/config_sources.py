"""A run's config as the user wrote it: YAML layers and ``--key=value`` flags merged, each value with its origin.

jsonargparse knows what a config means but not where a value came from, so its errors name neither the
file nor the line. ``read_sources`` merges the same inputs the CLI parses (the expanded ``--config`` files
in order, then the command-line flags) into a plain tree, and remembers for every key path the
``file:line`` (or ``command line``) that set it last; ``cappo_pl.config_schema`` checks that tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from cappo_pl.errors import ConfigError

Path = tuple[str | int, ...]
CONFIG_FLAGS = ("--config", "-c")
CLASS_KEYS = ("class_path", "init_args", "dict_kwargs")
"""The keys of a ``class_path`` node that are not the class's own arguments."""


@dataclass
class RawConfig:
    """The merged tree and where each of its key paths was set (``file:line`` or ``command line``)."""

    tree: dict[str, Any] = field(default_factory=dict)
    origins: dict[Path, str] = field(default_factory=dict)

    def origin(self, path: Path) -> str | None:
        """Where ``path`` (or the nearest enclosing key that has an origin) was set."""
        for end in range(len(path), 0, -1):
            if path[:end] in self.origins:
                return self.origins[path[:end]]
        return None


def _yaml_lines(node: yaml.Node, where: str, path: Path = ()) -> dict[Path, int]:
    """Line (1-based) of every key and list item under ``node``; a key repeated in one mapping is an error."""
    lines: dict[Path, int] = {}
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key, line = key_node.value, key_node.start_mark.line + 1
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *anchor' merges keys a later key may override: not a duplicate
            if key in seen:
                raise ConfigError(f"{where}:{line}: duplicate key '{key}' (first at line {seen[key]})")
            seen[key] = line
            lines[(*path, key)] = line
            lines.update(_yaml_lines(value_node, where, (*path, key)))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            lines.update(_yaml_lines(item, where, (*path, i)))
    return lines


def load_yaml(text: str, where: str) -> tuple[Any, dict[Path, int]]:
    """Parse YAML ``text`` into ``(value, line of each key path)``; ``where`` names it in errors."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        # lines first: constructing flattens '<<' merges into the node, which would read as duplicate keys
        lines = _yaml_lines(node, where) if node is not None else {}
        value = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}{line}: not valid YAML ({problem})") from None
    finally:
        loader.dispose()
    return value, lines


def _is_class_node(node: Any) -> bool:
    return isinstance(node, dict) and "class_path" in node


def _merge(low: Any, high: Any) -> Any:
    """``high`` over ``low`` as jsonargparse merges config files: dicts key by key, lists item by item.

    A node whose ``class_path`` changes is replaced, not merged (the old class's arguments do not carry over).
    """
    if isinstance(low, dict) and isinstance(high, dict):
        if _is_class_node(low) and _is_class_node(high) and low["class_path"] != high["class_path"]:
            return high
        return {**low, **{k: _merge(low[k], v) if k in low else v for k, v in high.items()}}
    if isinstance(low, list) and isinstance(high, list):
        return [_merge(low[i], v) if i < len(low) else v for i, v in enumerate(high)]
    return high


def _drop_origins(origins: dict[Path, str], prefix: Path) -> None:
    for path in [p for p in origins if p[: len(prefix)] == prefix and len(p) > len(prefix)]:
        del origins[path]


class _Sources:
    """Accumulates layers into a RawConfig."""

    def __init__(self) -> None:
        self.raw = RawConfig()

    def add_file(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read config file ({err})") from None
        self.add_document(text, path)

    def add_document(self, text: str, where: str, inline: bool = False) -> None:
        value, lines = load_yaml(text, where)
        if value is None:
            return
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: a config must be a mapping of keys, got {type(value).__name__}")
        value = {k: v for k, v in value.items() if k != "base"}
        self._replace_changed_classes(self.raw.tree, value, ())
        self.raw.tree = _merge(self.raw.tree, value)
        for path, line in lines.items():
            self.raw.origins[path] = where if inline else f"{where}:{line}"

    def _replace_changed_classes(self, low: Any, high: Any, path: Path) -> None:
        """Forget the origins below a node that ``high`` replaces wholesale (its class changes)."""
        if isinstance(low, dict) and isinstance(high, dict):
            if _is_class_node(low) and _is_class_node(high) and low["class_path"] != high["class_path"]:
                _drop_origins(self.raw.origins, path)
                return
            for k, v in high.items():
                if k in low:
                    self._replace_changed_classes(low[k], v, (*path, k))
        elif isinstance(low, list) and isinstance(high, list):
            for i, v in enumerate(high[: len(low)]):
                self._replace_changed_classes(low[i], v, (*path, i))
        else:
            _drop_origins(self.raw.origins, path)

    def add_flag(self, key: str, value: str) -> None:
        """``--a.b.c=value``: set the leaf, stepping into ``init_args`` under a class_path node as jsonargparse does."""
        if key.endswith("+") or not key:
            return  # list append: the checks leave that to jsonargparse
        node: Any = self.raw.tree
        path: Path = ()
        parts = key.split(".")
        for i, part in enumerate(parts):
            if _is_class_node(node) and part not in CLASS_KEYS:
                node = node.setdefault("init_args", {})
                path = (*path, "init_args")
            if not isinstance(node, dict):
                return  # a flag into a list or a scalar: left to jsonargparse
            if i == len(parts) - 1:
                if part == "class_path" and _is_class_node(node) and node["class_path"] != value:
                    node.clear()  # another class: the old one's init_args do not carry over
                    _drop_origins(self.raw.origins, path[:-1] if path[-1:] == ("init_args",) else path)
                old = node.get(part)
                if _is_class_node(old) and _looks_like_class_path(value):
                    node[part] = {"class_path": value} if value != old["class_path"] else old
                    if value != old["class_path"]:
                        _drop_origins(self.raw.origins, (*path, part))
                else:
                    node[part] = value
                    _drop_origins(self.raw.origins, (*path, part))
                self.raw.origins[(*path, part)] = "command line"
                return
            node = node.setdefault(part, {})
            path = (*path, part)


def _looks_like_class_path(value: str) -> bool:
    return isinstance(value, str) and value.replace(".", "").replace("_", "").isalnum() and "." in value


def read_sources(args: list[str]) -> RawConfig:
    """The config that ``args`` (after ``fit``/``validate``, ``--config`` already expanded) describe.

    ``--config`` files and inline YAML are merged in order, then each ``--key=value`` / ``--key value`` flag.
    Flag values stay strings (the schema converts them by the field's type, as jsonargparse does).

    Raises:
        ConfigError: a config file that cannot be read, is not YAML, or repeats a key (file:line).

    """
    sources = _Sources()
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("-"):
            continue
        flag, eq, value = arg.partition("=")
        if not eq:
            if i >= len(args) or (args[i].startswith("-") and not _is_number(args[i])):
                continue  # a bare switch (--print_config, --help)
            value, i = args[i], i + 1
        if flag in CONFIG_FLAGS:
            if os.path.isfile(value):
                sources.add_file(value)
            elif isinstance(yaml.safe_load(value) if _is_yaml(value) else None, dict):
                sources.add_document(value, "--config (inline)", inline=True)
            else:
                raise ConfigError(f"--config {value}: no such config file")
        elif flag.startswith("--") and flag != "--base":
            sources.add_flag(flag[2:], value)
    return sources.raw


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_yaml(text: str) -> bool:
    try:
        yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return True
