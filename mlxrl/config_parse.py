"""YAML and command-line overrides into typed dataclasses, with errors that say where.

Generic machinery behind `mlxrl.config`: it knows nothing of the schema itself.

- YAML is read with line numbers and with YAML 1.2 floats (`5e-5` is a float, as users expect;
  plain PyYAML follows YAML 1.1 and reads it as a string).
- Overrides come in Oumi's forms: `--a.b 5`, `--a.b=5`, `a.b=5`, list items `a.l[0].x` or
  `a.l.0.x`, and whole values in YAML flow syntax (`--a.l '[{x: 1}]'`).
- Unknown keys and wrong types are errors naming the key, where it came from, and the nearest
  valid name. Nothing is coerced except int -> float.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mlxrl.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader that records key lines and reads `5e-5` as a float (YAML 1.2)."""


_FLOAT_12 = re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
    r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def parse_value(text: str) -> Any:
    """A command-line value, read as YAML (so `5` is an int, `[..]` a list, `true` a bool)."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError:
        return text


def load_yaml(path: Path) -> tuple[dict, dict[tuple, int]]:
    """Read a YAML mapping; return it and the line (1-based) of each key path."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                          f"{e.start}); save the file as UTF-8") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections, got {type(data).__name__}")
    lines: dict[tuple, int] = {}
    _record_lines(node, (), lines)
    return data, lines


def _record_lines(node, prefix: tuple, lines: dict) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = prefix + (key_node.value,)
            lines[key] = key_node.start_mark.line + 1
            _record_lines(value_node, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[prefix + (i,)] = item.start_mark.line + 1
            _record_lines(item, prefix + (i,), lines)


def split_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """Turn CLI words into (dotted key, value) pairs; accepts all of Oumi's spellings."""
    pairs, i = [], 0
    while i < len(args):
        word = args[i]
        if word.startswith("--"):
            word = word[2:]
            if "=" in word:
                key, text = word.split("=", 1)
            elif i + 1 < len(args):
                key, text = word, args[i + 1]
                i += 1
            else:
                raise ConfigError(f"override --{word} has no value")
        elif "=" in word:
            key, text = word.split("=", 1)
        else:
            raise ConfigError(f"cannot read argument {word!r}: expected --section.key VALUE or section.key=VALUE")
        pairs.append((key, parse_value(text)))
        i += 1
    return pairs


def key_path(dotted: str) -> tuple:
    """`a.l[0].x` and `a.l.0.x` -> ('a', 'l', 0, 'x'); a command line's `max-steps` spelling is
    the field `max_steps` (no field name has a hyphen)."""
    parts: list = []
    for piece in dotted.replace("[", ".").replace("]", "").split("."):
        if piece == "":
            raise ConfigError(f"malformed key {dotted!r}")
        parts.append(int(piece) if piece.isdigit() else piece.replace("-", "_"))
    return tuple(parts)


def apply_override(data: dict, path: tuple, value: Any, origin: str) -> None:
    """Set `value` at `path` inside nested dicts/lists, creating mappings on the way."""
    node = data
    for depth, part in enumerate(path[:-1]):
        nxt = path[depth + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise ConfigError(f"{origin}: {_dotted(path[:depth + 1])} does not exist (lists can't grow by index; "
                                  f"give the whole list instead)")
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{origin}: {_dotted(path[:depth])} is not a section")
        if node.get(part) is None:
            if isinstance(nxt, int):
                raise ConfigError(f"{origin}: {_dotted(path[:depth + 1])} is empty; give the whole list instead")
            node[part] = {}
        node = node[part]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise ConfigError(f"{origin}: {_dotted(path)} does not exist (lists can't grow by index)")
    elif not isinstance(node, dict):
        raise ConfigError(f"{origin}: {_dotted(path[:-1])} is not a section")
    node[last] = value


def _dotted(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


class Builder:
    """Builds a dataclass tree from plain data, checking names and types."""

    def __init__(self, source: str, lines: dict[tuple, int], origins: dict[tuple, str]):
        self.source, self.lines, self.origins = source, lines, origins

    def where(self, path: tuple) -> str:
        if path in self.origins:
            return self.origins[path]
        # a key the command line introduced (`--trainig.max_steps 3`): the override, not the file
        for key, origin in self.origins.items():
            if key[:len(path)] == path and path not in self.lines:
                return origin
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return f"{self.source}:{self.lines[path[:n]]}"
        return self.source

    def build(self, cls, data: Any, path: tuple = ()):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{self.where(path)}: {_dotted(path) or 'config'} must be a mapping, "
                              f"got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in data.items():
            if key not in fields:
                self._unknown(key, list(fields), path + (key,))
            kwargs[key] = self.convert(hints[key], value, path + (key,))
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as e:
            named = [k for k in data if re.search(rf"\b{re.escape(str(k))}\b", str(e))]
            where = self.where(path + (named[0],)) if named else self.where(path)
            raise ConfigError(f"{where}: {_dotted(path) or 'config'}: {e}") from None

    def _unknown(self, key, valid: list[str], path: tuple):
        close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
        hint = f"; did you mean {_dotted(path[:-1] + (close[0],))!r}?" if close else ""
        raise ConfigError(f"{self.where(path)}: unknown key {_dotted(path)!r}{hint}")

    def convert(self, hint, value, path: tuple):
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            options = typing.get_args(hint)
            if value is None and type(None) in options:
                return None
            errors = []
            for option in options:
                if option is type(None):
                    continue
                try:
                    return self.convert(option, value, path)
                except ConfigError as e:
                    errors.append(e)
            raise errors[0]
        if dataclasses.is_dataclass(hint):
            return self.build(hint, value, path)
        if origin is list:
            if not isinstance(value, list):
                if hint is not list and typing.get_args(hint) == (str,) and isinstance(value, str):
                    return [value]
                self._wrong_type(path, "a list", value)
            (item,) = typing.get_args(hint) or (Any,)
            return [self.convert(item, v, path + (i,)) for i, v in enumerate(value)]
        if origin is dict or hint is dict:
            if not isinstance(value, dict):
                self._wrong_type(path, "a mapping", value)
            return dict(value)
        return self._scalar(hint, value, path)

    def _scalar(self, hint, value, path: tuple):
        if hint is Any:
            return value
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if hint is int and isinstance(value, bool):
            self._wrong_type(path, "an integer", value)
        if isinstance(value, hint):
            return value
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
        self._wrong_type(path, names.get(hint, getattr(hint, "__name__", str(hint))), value)

    def _wrong_type(self, path: tuple, expected: str, value):
        raise ConfigError(f"{self.where(path)}: {_dotted(path)} must be {expected}, "
                          f"got {value!r} ({type(value).__name__})")
