"""Typed configs: frozen dataclasses loaded from YAML, checked against their type hints.

Every stage and tool describes its settings as a dataclass; a YAML file mirrors it key
for key and `--set a.b=c` overrides single values on top. Anything the dataclass does
not declare, or a value of the wrong type, is a `ConfigError` naming the file (or the
override), the dotted key and what was expected, so a typo fails at start-up instead of
silently running with a default.

Supported field types: int, float, str, bool, pathlib.Path, Literal[...], X | None,
unions, tuple[X, ...], tuple[X, Y], list[X], dict[str, X] and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "ConfigError",
    "config_to_dict",
    "dump_config",
    "load_config",
    "loads_config",
    "parse_override",
]

T = TypeVar("T")

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_MISSING = object()


class ConfigError(ValueError):
    """A config file or override that does not match its dataclass."""


# PyYAML follows YAML 1.1, where `1e-3` is a *string* (a float needs a dot). A learning
# rate written that way would then fail the float check, so both the loader and the
# dumper also resolve YAML 1.2 style exponent floats; the dumper needs it too so that a
# str field holding "1e-3" gets quoted and round-trips as a str.
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789."))


# --------------------------------------------------------------------------- public API


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from the YAML file at `path` (None: defaults only), then `overrides`.

    Keys missing from the file take the dataclass defaults. Each override is
    `dotted.key=value`, the value parsed as YAML (`3`, `0.5`, `[1, 2]`, `null`, `abc`);
    it replaces whatever the file had at that key (a mapping replaces a whole section).
    """
    if path is None:
        return loads_config(cls, "", overrides, source="<defaults>")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from exc
    return loads_config(cls, text, overrides, source=str(path))


def loads_config(
    cls: type[T], text: str, overrides: Sequence[str] = (), source: str = "<string>"
) -> T:
    """Like `load_config`, from YAML text; `source` names it in error messages."""
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"load_config: expected a dataclass type, got {cls!r}")
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {_given(data)}")

    # Overrides are merged into the raw mapping before building, so an override can also
    # supply a required key the file lacks. `origins` remembers which keys came from which
    # override so errors blame the override rather than the file.
    origins: list[tuple[tuple[str, ...], str]] = []
    for item in overrides:
        keys, value = parse_override(item)
        label = f"--set {item}"
        _check_override_path(cls, keys, label)
        _assign(data, keys, value)
        origins.append((keys, label))
    return _Builder(source, origins).build(cls, data, ())


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """Split `a.b=value` into (("a", "b"), parsed YAML value)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not _KEY_RE.fullmatch(key):
        raise ConfigError(
            f"--set {item}: expected KEY=VALUE where KEY is a dotted field path such as "
            f"model.num_classes=2"
        )
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item}: value is not valid YAML: {exc}") from exc
    return tuple(key.split(".")), value


def config_to_dict(obj: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass: field order kept, tuples as lists, Paths as str."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"config_to_dict: expected a dataclass instance, got {obj!r}")
    out = _plain(obj)
    assert isinstance(out, dict)
    return out


def dump_config(obj: Any) -> str:
    """YAML text of a config dataclass that `loads_config` reads back to an equal object."""
    return yaml.dump(
        config_to_dict(obj),
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=None,
        allow_unicode=True,
    )


# --------------------------------------------------------------------------- overrides


def _check_override_path(cls: type, keys: tuple[str, ...], label: str) -> None:
    """Reject an override naming a key the dataclass tree does not have."""
    tp: Any = cls
    for depth, key in enumerate(keys):
        section = _dataclass_in(tp)
        where = ".".join(keys[:depth])
        if section is None:
            raise ConfigError(
                f"{label}: {where} is a {_describe(tp)} value, not a section; it has no key {key!r}"
            )
        hints = _field_types(section)
        if key not in hints:
            raise ConfigError(
                f"{label}: unknown key {'.'.join(keys[: depth + 1])!r}"
                f"{_valid_keys_hint(key, hints)}"
            )
        tp = hints[key]


def _assign(data: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):  # absent, null or a wrong scalar: the override wins
            child = node[key] = {}
        node = child
    node[keys[-1]] = value


# --------------------------------------------------------------------------- building


class _Builder:
    """Converts raw YAML data to typed values; knows where each value came from."""

    def __init__(self, source: str, origins: list[tuple[tuple[str, ...], str]]):
        self.source = source
        self.origins = origins

    def error(self, path: tuple[str | int, ...], message: str) -> ConfigError:
        source = self.source
        for keys, label in self.origins:  # the last override covering `path` set it
            if path[: len(keys)] == keys:
                source = label
        where = _format_path(path)
        return ConfigError(f"{source}: {where + ': ' if where else ''}{message}")

    def build(self, cls: type[T], data: Any, path: tuple[str | int, ...]) -> T:
        if not isinstance(data, Mapping):
            raise self.error(path, f"expected a mapping for {cls.__name__}, got {_given(data)}")
        hints = _field_types(cls)
        for key in data:
            if key not in hints:
                hint = _valid_keys_hint(str(key), hints)
                raise self.error((*path, str(key)), f"unknown key{hint}")
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            if not field.init:
                continue
            value = data.get(field.name, _MISSING)
            if value is _MISSING:
                no_default = (
                    field.default is dataclasses.MISSING
                    and field.default_factory is dataclasses.MISSING
                )
                if no_default:
                    raise self.error(
                        (*path, field.name),
                        f"missing required key (expected {_describe(hints[field.name])})",
                    )
                continue
            kwargs[field.name] = self.convert(value, hints[field.name], (*path, field.name))
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:  # the dataclass's own __post_init__ checks
            raise self.error(path, str(exc)) from exc

    def convert(self, value: Any, tp: Any, path: tuple[str | int, ...]) -> Any:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)

        if tp is Any:
            return value
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            return self.build(tp, value, path)
        if tp is bool:
            if isinstance(value, bool):
                return value
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif tp is float:
            # An int is a fine float (`lr: 1`); a bool is not, although Python says it is.
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif tp is str:
            if isinstance(value, str):
                return value
        elif tp is Path:
            if isinstance(value, (str, Path)):
                return Path(value)
        elif tp is type(None):
            if value is None:
                return None
        elif origin is Literal:
            # Compare with the type too: YAML `1` must not match Literal[True].
            for option in args:
                if value == option and type(value) is type(option):
                    return option
        elif origin in (Union, types.UnionType):
            return self._convert_union(value, args, tp, path)
        elif origin is tuple:
            if isinstance(value, (list, tuple)):
                return self._convert_tuple(value, args, tp, path)
        elif origin is list:
            if isinstance(value, (list, tuple)):
                return [self.convert(v, args[0], (*path, i)) for i, v in enumerate(value)]
        elif origin is dict:
            if isinstance(value, Mapping):
                return self._convert_dict(value, args, path)
        else:
            where = _format_path(path)
            raise TypeError(f"config field {where}: unsupported type annotation {tp!r}")
        raise self.error(path, f"expected {_describe(tp)}, got {_given(value)}")

    def _convert_union(
        self, value: Any, args: tuple[Any, ...], tp: Any, path: tuple[str | int, ...]
    ) -> Any:
        if value is None:
            if type(None) in args:
                return None
            raise self.error(path, f"expected {_describe(tp)}, got null")
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # Optional[X]: X's own message is the most precise one
            return self.convert(value, members[0], path)
        for member in members:
            try:
                return self.convert(value, member, path)
            except ConfigError:
                continue
        raise self.error(path, f"expected {_describe(tp)}, got {_given(value)}")

    def _convert_tuple(
        self, value: Sequence[Any], args: tuple[Any, ...], tp: Any, path: tuple[str | int, ...]
    ) -> tuple[Any, ...]:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(self.convert(v, args[0], (*path, i)) for i, v in enumerate(value))
        if len(value) != len(args):
            raise self.error(
                path, f"expected {_describe(tp)} ({len(args)} items), got {_given(value)}"
            )
        return tuple(self.convert(v, a, (*path, i)) for i, (v, a) in enumerate(zip(value, args)))

    def _convert_dict(
        self, value: Mapping[Any, Any], args: tuple[Any, ...], path: tuple[str | int, ...]
    ) -> dict[Any, Any]:
        key_tp, value_tp = args if args else (str, Any)
        out = {}
        for k, v in value.items():
            key = self.convert(k, key_tp, (*path, str(k)))
            out[key] = self.convert(v, value_tp, (*path, str(k)))
        return out


# --------------------------------------------------------------------------- helpers


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved hints of the init fields; works with `from __future__ import annotations`."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError as exc:
        raise TypeError(
            f"config dataclass {cls.__name__}: cannot resolve a type hint ({exc}); "
            f"define the types it names at module level"
        ) from exc
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass inside `tp` (itself, or X of `X | None`), else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if len(found) == 1 and isinstance(found[0], type):
            return found[0]
    return None


def _valid_keys_hint(key: str, hints: Mapping[str, Any]) -> str:
    valid = list(hints)
    close = difflib.get_close_matches(key, valid, n=1)
    guess = f"; did you mean {close[0]!r}?" if close else ""
    return f" (valid keys: {', '.join(valid) or 'none'}){guess}"


def _format_path(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _describe(tp: Any) -> str:
    """Human wording of a type hint for error messages."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return f"a mapping ({tp.__name__})"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list [{', '.join(_describe(a) for a in args)}]"
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a mapping of {_describe(args[1])}" if args else "a mapping"
    if tp is Path:
        return "str (a path)"
    return getattr(tp, "__name__", repr(tp))


def _given(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        text = repr(list(value))
        kind = f"list of {len(value)}"
    else:
        text = repr(value)
        kind = type(value).__name__
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value
