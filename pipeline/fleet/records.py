"""The fleet's control records (cameras, leases, nodes, jobs) as msgpack, decoded strictly.

A record is a frozen dataclass that `maskstream.configs.codec` can check (str, int, float, bool,
None, Literal, tuple[X, ...], dict[str, X], nested records). On the wire: a msgpack map
{"v": RECORD_VERSION, "kind": class name, "fields": {...}}. `unpack` trusts nothing: a foreign
kind or version, a missing field or a value of the wrong type raises `RecordError` naming the
field, with the rules configs and message headers use. Nothing decoded here can run code (no
pickle, no msgpack extension types).

One exception to strictness: a field this build does not know is skipped. A fleet is upgraded one
host at a time, and a newer node adds fields (with defaults) to the records it writes; an older
node that refused them would take the newer one's presence for garbage and plan without it, and
`fleet jobs` of an older install could not list a newer node's jobs. A field whose meaning changed
is a new field or a new RECORD_VERSION, never a new type under an old name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import msgpack
from maskstream.configs.codec import Codec, CodecError, to_plain

__all__ = ["RECORD_VERSION", "RecordError", "pack", "unpack"]

RECORD_VERSION = 1
T = TypeVar("T")
_CODEC = Codec(unknown_keys="ignore")


class RecordError(ValueError):
    """A stored record that is not what this build writes."""


def pack(record: Any) -> bytes:
    if not dataclasses.is_dataclass(record) or isinstance(record, type):
        raise TypeError(f"pack: expected a record dataclass, got {record!r}")
    data: bytes = msgpack.packb({"v": RECORD_VERSION, "kind": type(record).__name__, "fields": to_plain(record)},
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
    try:
        return _CODEC.from_plain(cls, meta["fields"])
    except CodecError as exc:
        raise RecordError(f"{where}: {exc}") from None
