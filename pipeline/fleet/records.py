"""The fleet's control records (cameras, leases, nodes, jobs) as msgpack, decoded strictly.

A record is a frozen dataclass of str, int, float, bool, None, Literal, tuple[X, ...],
dict[str, X] and nested records. On the wire: a msgpack map {"v": RECORD_VERSION, "kind":
class name, "fields": {...}}. `unpack` trusts nothing: a foreign kind, an unknown or missing field
or a value of the wrong type raises `RecordError` naming the field, as messages.decode does for
the data plane. Nothing decoded here can run code (no pickle, no extension types).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import msgpack

__all__ = ["RECORD_VERSION", "RecordError", "pack", "unpack"]

RECORD_VERSION = 1
T = TypeVar("T")


class RecordError(ValueError):
    """A stored record that is not what this build writes."""


def pack(record: Any) -> bytes:
    if not dataclasses.is_dataclass(record) or isinstance(record, type):
        raise TypeError(f"pack: expected a record dataclass, got {record!r}")
    data: bytes = msgpack.packb({"v": RECORD_VERSION, "kind": type(record).__name__, "fields": _plain(record)},
                                use_bin_type=True)
    return data


def unpack(cls: type[T], data: bytes, where: str = "") -> T:
    where = where or cls.__name__
    try:
        meta = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise RecordError(f"{where}: not a msgpack record ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or set(meta) != {"v", "kind", "fields"}:
        raise RecordError(f"{where}: expected a map with keys v, kind, fields")
    if meta["v"] != RECORD_VERSION:
        raise RecordError(f"{where}: record version {meta['v']!r}, this build reads {RECORD_VERSION}")
    if meta["kind"] != cls.__name__:
        raise RecordError(f"{where}: expected a {cls.__name__} record, got {meta['kind']!r}")
    record: T = _build(cls, meta["fields"], where)
    return record


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: expected a map of fields, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise RecordError(f"{where}: unknown field(s) {sorted(unknown)}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{where}: missing field {name!r}")
            continue
        values[name] = _convert(_hints(cls)[name], raw[name], f"{where}.{name}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:  # the record's own checks
        raise RecordError(f"{where}: {exc}") from None


def _convert(hint: Any, raw: Any, where: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _build(hint, raw, where)
    if origin in (Union, types.UnionType):
        if raw is None and type(None) in args:
            return None
        errors = []
        for member in (a for a in args if a is not type(None)):
            try:
                return _convert(member, raw, where)
            except RecordError as exc:
                errors.append(str(exc))
        raise RecordError(errors[0] if len(errors) == 1 else f"{where}: {raw!r} matches none of {hint}")
    if origin is Literal:
        if any(raw == a and type(raw) is type(a) for a in args):
            return raw
        raise RecordError(f"{where}: expected one of {list(args)}, got {raw!r}")
    if origin is tuple:
        if not isinstance(raw, list):
            raise RecordError(f"{where}: expected a list, got {type(raw).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(raw))
        if len(raw) != len(args):
            raise RecordError(f"{where}: expected {len(args)} items, got {len(raw)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, raw)))
    if origin is dict:
        if not isinstance(raw, dict):
            raise RecordError(f"{where}: expected a map, got {type(raw).__name__}")
        return {_convert(args[0], k, f"{where} key"): _convert(args[1], v, f"{where}[{k!r}]") for k, v in raw.items()}
    if hint is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if hint in (int, float, str, bytes, bool):
        if type(raw) is not hint:
            raise RecordError(f"{where}: expected {hint.__name__}, got {type(raw).__name__}")
        return raw
    raise TypeError(f"{where}: unsupported record field type {hint!r}")
