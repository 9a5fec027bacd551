"""Typed configs: frozen dataclasses loaded from YAML, checked against their type hints.

Every stage and tool describes its settings as a dataclass; a YAML file mirrors it key
for key and `--set a.b=c` overrides single values on top. Anything the dataclass does
not declare, or a value of the wrong type, is a `ConfigError` naming the file (or the
override), the dotted key and what was expected, so a typo fails at start-up instead of
silently running with a default.

Supported field types: int, float, str, bool, pathlib.Path, Literal[...], X | None,
unions, tuple[X, ...], tuple[X, Y], list[X], dict[str, X] and nested dataclasses. The type
rules and their errors are the package's one codec (configs/codec.py, shared with engine
manifests and message headers); this module adds YAML and the overrides on top.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from maskstream.configs import codec

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
        raise ConfigError(f"{source}: expected a mapping at the top level, got {codec.given(data)}")

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
    try:
        return codec.from_plain(cls, data)
    except codec.CodecError as exc:
        raise _blame(exc, source, origins) from exc


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
    out = codec.to_plain(obj)
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
        section = codec.dataclass_in(tp)
        where = ".".join(keys[:depth])
        if section is None:
            raise ConfigError(
                f"{label}: {where} is a {codec.describe(tp)} value, not a section; it has no key {key!r}"
            )
        hints = codec.field_types(section)
        if key not in hints:
            raise ConfigError(
                f"{label}: unknown key {'.'.join(keys[: depth + 1])!r}"
                f"{codec.valid_keys_hint(key, hints)}"
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


def _blame(exc: codec.CodecError, source: str, origins: list[tuple[tuple[str, ...], str]]) -> ConfigError:
    """The codec's error, blaming the last override that covers its path, else the file."""
    for keys, label in origins:
        if exc.path[: len(keys)] == keys:
            source = label
    return ConfigError(f"{source}: {exc}")
