"""Typed dataclasses <-> plain data (dicts, lists, scalars): the one set of type rules of the package.

Configs read from YAML (pipeline/config.py), engine manifests read from JSON (model/engine.py) and
message headers read from msgpack (pipeline/runtime/messages.py) are all frozen dataclasses checked
against their type hints here, with the same rules and the same errors:

    from_plain(ModelConfig, {"rpn": {"nms_thresh": "x"}})
    -> CodecError: rpn.nms_thresh: expected float, got str 'x'

Rules: int is not bool; an int is a fine float (converted); str, bytes and bool are exact; a
Path takes a str; Literal[...] matches value and type (`1` is not `True`); `X | None`, unions
(first member that fits), tuple[X, ...], tuple[X, Y], list[X], dict[K, V] and nested dataclasses
(a mapping: unknown keys are errors unless the Codec ignores them, missing keys take the field's
default or are errors). A
dataclass's own __post_init__ errors (TypeError, ValueError) come back as a CodecError at its path.

Each type is compiled once into a decoder (closures, cached per Codec), so a small message header
decodes without walking type hints again. A `Codec` may add leaf types of its own (messages add
numpy arrays, whose decoders read the message's buffers through `context`).

This module is the bottom layer: standard library only (no torch, numpy, zmq or yaml).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union

__all__ = [
    "Codec",
    "CodecError",
    "Decoder",
    "check",
    "dataclass_in",
    "describe",
    "field_types",
    "format_path",
    "from_plain",
    "given",
    "to_plain",
    "valid_keys_hint",
]

T = TypeVar("T")
KeyPath = tuple[str | int, ...]  # keys and list indices from the top
# value, context -> typed value; raises CodecError with the path below this value
Decoder = Callable[[Any, Any], Any]
_NONE = type(None)


class CodecError(ValueError):
    """Plain data that does not match its type; `path` says where (keys and list indices)."""

    def __init__(self, path: KeyPath, problem: str):
        super().__init__(path, problem)
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        where = format_path(self.path)
        return f"{where}: {self.problem}" if where else self.problem


# --------------------------------------------------------------------------- decoding


class Codec:
    """Decoders compiled per type, with optional extra leaf types: {type: decoder(value, context)}.
    unknown_keys="ignore" skips a mapping's keys its dataclass has no field for, instead of raising:
    for records that a newer build may have written with fields added (every known field is still
    checked as strictly)."""

    def __init__(self, leaves: Mapping[Any, Decoder] | None = None,
                 unknown_keys: Literal["error", "ignore"] = "error"):
        if unknown_keys not in ("error", "ignore"):
            raise ValueError(f"unknown_keys: expected 'error' or 'ignore', got {unknown_keys!r}")
        self._leaves = dict(leaves or {})
        self._strict_keys = unknown_keys == "error"
        self._cache: dict[Any, Decoder] = {}
        self._fields: dict[type, Callable[[Any, Any], dict[str, Any]]] = {}

    def from_plain(self, tp: type[T], data: Any, context: Any = None) -> T:
        """`data` as a `tp` (usually a dataclass), checked all the way down; raises CodecError."""
        value: T = self.decoder(tp)(data, context)
        return value

    def decoder(self, tp: Any) -> Decoder:
        found = self._cache.get(tp)
        if found is None:
            found = self._cache[tp] = self._compile(tp)
        return found

    def fields_decoder(self, cls: type) -> Callable[[Any, Any], dict[str, Any]]:
        """A dataclass's init fields from a mapping, decoded, without calling the class."""
        found = self._fields.get(cls)
        if found is None:
            found = self._fields[cls] = self._compile_fields(cls)
        return found

    def _compile_fields(self, cls: type) -> Callable[[Any, Any], dict[str, Any]]:
        hints = field_types(cls)
        names = frozenset(hints)
        specs = []
        for f in dataclasses.fields(cls):
            if f.init:
                required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                specs.append((f.name, self._field_decoder(cls, f.name, hints[f.name]), required, hints[f.name]))
        name = cls.__name__
        strict_keys = self._strict_keys

        def decode(value: Any, context: Any) -> dict[str, Any]:
            if type(value) is not dict and not isinstance(value, Mapping):
                raise CodecError((), f"expected a mapping for {name}, got {given(value)}")
            if strict_keys and not value.keys() <= names:
                key = str(next(k for k in value if k not in names))
                raise CodecError((key,), f"unknown key{valid_keys_hint(key, hints)}")
            kwargs = {}
            for field, decode_field, required, hint in specs:
                if field in value:
                    try:
                        kwargs[field] = decode_field(value[field], context)
                    except CodecError as exc:
                        exc.path = (field, *exc.path)
                        raise
                elif required:
                    raise CodecError((field,), f"missing required key (expected {describe(hint)})")
            return kwargs

        return decode

    def _field_decoder(self, cls: type, name: str, tp: Any) -> Decoder:
        try:
            return self.decoder(tp)
        except _Unsupported as exc:
            raise TypeError(f"{cls.__name__}.{name}: unsupported type annotation {exc.args[0]!r}") from None

    def _compile(self, tp: Any) -> Decoder:
        if tp in self._leaves:
            return self._leaves[tp]
        if tp is Any:
            return _any
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            return self._dataclass(tp)
        if tp in _SCALARS:
            return _SCALARS[tp]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Literal:
            return _literal(tp, args)
        if origin in (Union, types.UnionType):
            return self._union(tp, args)
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return _sequence(tuple, tp, args[0], self.decoder(args[0]))
            return _fixed_tuple(tp, [self.decoder(a) for a in args])
        if origin is list and args:
            return _sequence(list, tp, args[0], self.decoder(args[0]))
        if origin is dict:
            key_tp, value_tp = args if args else (str, Any)
            return _mapping(tp, self.decoder(key_tp), self.decoder(value_tp))
        raise _Unsupported(tp)

    def _dataclass(self, cls: type) -> Decoder:
        fields = self.fields_decoder(cls)

        def decode(value: Any, context: Any) -> Any:
            kwargs = fields(value, context)
            try:
                return cls(**kwargs)
            except (TypeError, ValueError) as exc:  # the dataclass's own __post_init__ checks
                raise CodecError((), str(exc)) from exc

        return decode

    def _union(self, tp: Any, args: tuple[Any, ...]) -> Decoder:
        allows_none = _NONE in args
        members = [self.decoder(a) for a in args if a is not _NONE]
        null = f"expected {describe(tp)}, got null"
        if len(members) == 1:  # X | None: X's own message is the most precise one
            (member,) = members

            def optional(value: Any, context: Any) -> Any:
                if value is None:
                    if allows_none:
                        return None
                    raise CodecError((), null)
                return member(value, context)

            return optional

        def union(value: Any, context: Any) -> Any:
            if value is None:
                if allows_none:
                    return None
                raise CodecError((), null)
            for member in members:
                try:
                    return member(value, context)
                except CodecError:
                    continue
            raise CodecError((), f"expected {describe(tp)}, got {given(value)}")

        return union


class _Unsupported(TypeError):
    pass


def _any(value: Any, context: Any) -> Any:
    return value


def _bool(value: Any, context: Any) -> bool:
    if value is True or value is False:
        return value
    raise CodecError((), f"expected bool, got {given(value)}")


def _int(value: Any, context: Any) -> int:
    if type(value) is int or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise CodecError((), f"expected int, got {given(value)}")


def _float(value: Any, context: Any) -> float:
    if type(value) is float:
        return value
    # An int is a fine float (`lr: 1`); a bool is not, although Python says it is.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise CodecError((), f"expected float, got {given(value)}")


def _str(value: Any, context: Any) -> str:
    if isinstance(value, str):
        return value
    raise CodecError((), f"expected str, got {given(value)}")


def _bytes(value: Any, context: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    raise CodecError((), f"expected bytes, got {given(value)}")


def _path(value: Any, context: Any) -> Path:
    if isinstance(value, (str, PurePath)):
        return Path(value)
    raise CodecError((), f"expected {describe(Path)}, got {given(value)}")


def _null(value: Any, context: Any) -> None:
    if value is None:
        return None
    raise CodecError((), f"expected null, got {given(value)}")


_SCALARS: dict[Any, Decoder] = {bool: _bool, int: _int, float: _float, str: _str, bytes: _bytes, Path: _path,
                                _NONE: _null}
# Items that decode to themselves when their type is exactly this: a sequence of them is checked
# with one pass of `type(v) is X`, without a call per item.
_EXACT_ITEMS: dict[Any, type] = {str: str, bytes: bytes, int: int, float: float, bool: bool}


def _literal(tp: Any, options: tuple[Any, ...]) -> Decoder:
    def decode(value: Any, context: Any) -> Any:
        # Compare with the type too: `1` must not match Literal[True].
        for option in options:
            if value == option and type(value) is type(option):
                return option
        raise CodecError((), f"expected {describe(tp)}, got {given(value)}")

    return decode


def _sequence(kind: type, tp: Any, item_tp: Any, item: Decoder) -> Decoder:
    exact = _EXACT_ITEMS.get(item_tp)

    def decode(value: Any, context: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise CodecError((), f"expected {describe(tp)}, got {given(value)}")
        if exact is not None and all(type(v) is exact for v in value):
            return kind(value)
        return kind(_each([item] * len(value), value, context))

    return decode


def _fixed_tuple(tp: Any, items: list[Decoder]) -> Decoder:
    n = len(items)

    def decode(value: Any, context: Any) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)):
            raise CodecError((), f"expected {describe(tp)}, got {given(value)}")
        if len(value) != n:
            raise CodecError((), f"expected {describe(tp)} ({n} items), got {given(value)}")
        return tuple(_each(items, value, context))

    return decode


def _each(items: list[Decoder], values: Any, context: Any) -> list[Any]:
    """Each value through its decoder; an error's path starts with the value's index."""
    out = []
    for i, (item, v) in enumerate(zip(items, values)):
        try:
            out.append(item(v, context))
        except CodecError as exc:
            exc.path = (i, *exc.path)
            raise
    return out


def _mapping(tp: Any, key: Decoder, item: Decoder) -> Decoder:
    def decode(value: Any, context: Any) -> dict[Any, Any]:
        if not isinstance(value, Mapping):
            raise CodecError((), f"expected {describe(tp)}, got {given(value)}")
        out = {}
        for k, v in value.items():
            try:
                out[key(k, context)] = item(v, context)
            except CodecError as exc:
                exc.path = (str(k), *exc.path)
                raise
        return out

    return decode


_DEFAULT = Codec()


def from_plain(tp: type[T], data: Any) -> T:
    """`data` as a `tp` with the standard rules (see the module docstring); raises CodecError."""
    return _DEFAULT.from_plain(tp, data)


def check(obj: Any) -> None:
    """Raise CodecError unless the dataclass instance `obj`, built in code rather than read, is what
    `from_plain` would make of its plain form: that form decodes (so what is written reads back),
    and each field holds the type decoding gives it (a tuple field a tuple, a Path field a Path;
    an int is still a fine float)."""
    cls: type = type(obj)
    values = _DEFAULT.fields_decoder(cls)(to_plain(obj), None)
    for name, hint in field_types(cls).items():
        value, decoded = getattr(obj, name), values[name]
        if type(value) is not type(decoded) and not (type(decoded) is float and type(value) is int):
            raise CodecError((name,), f"expected {type(decoded).__name__} ({describe(hint)}), got {given(value)}")


# --------------------------------------------------------------------------- encoding

_PLAIN = frozenset({str, int, float, bool, bytes, _NONE})


def to_plain(value: Any, leaf: Callable[[Any], Any] | None = None) -> Any:
    """Plain data of `value`: a dataclass becomes a dict of its init fields in field order, tuples
    lists, Paths str; anything else is `leaf(value)` (default: itself)."""
    if type(value) in _PLAIN:
        return value
    if isinstance(value, (tuple, list)):
        return [to_plain(v, leaf) for v in value]
    kind: type = type(value)
    names = _init_fields(kind)
    if names is not None:
        return {name: to_plain(getattr(value, name), leaf) for name in names}
    if isinstance(value, dict):
        return {k: to_plain(v, leaf) for k, v in value.items()}
    if isinstance(value, PurePath):
        return str(value)
    return leaf(value) if leaf is not None else value


@functools.cache
def _init_fields(cls: type) -> tuple[str, ...] | None:
    if not dataclasses.is_dataclass(cls):
        return None
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


# --------------------------------------------------------------------------- wording and hints


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved hints of a dataclass's init fields; works with `from __future__ import annotations`."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError as exc:
        raise TypeError(
            f"dataclass {cls.__name__}: cannot resolve a type hint ({exc}); define the types it names at module level"
        ) from exc
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def dataclass_in(tp: Any) -> type | None:
    """The dataclass inside `tp` (itself, or X of `X | None`), else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if len(found) == 1 and isinstance(found[0], type):
            return found[0]
    return None


def valid_keys_hint(key: str, names: Mapping[str, Any] | Sequence[str]) -> str:
    valid = list(names)
    close = difflib.get_close_matches(key, valid, n=1)
    guess = f"; did you mean {close[0]!r}?" if close else ""
    return f" (valid keys: {', '.join(valid) or 'none'}){guess}"


def format_path(path: Sequence[str | int]) -> str:
    """("model", "sizes", 1) -> "model.sizes[1]"."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def describe(tp: Any) -> str:
    """Human wording of a type hint for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is _NONE:
        return "null"
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return f"a mapping ({tp.__name__})"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {describe(args[0])}"
        return f"a list [{', '.join(describe(a) for a in args)}]"
    if origin is list:
        return f"a list of {describe(args[0])}"
    if origin is dict or tp is dict:
        return f"a mapping of {describe(args[1])}" if args and args[1] is not Any else "a mapping"
    if tp is Path:
        return "str (a path)"
    return getattr(tp, "__name__", repr(tp))


def given(value: Any) -> str:
    """A value as an error message shows it: its type and a short repr."""
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
