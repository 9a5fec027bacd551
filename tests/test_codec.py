"""configs.codec: the one set of type rules for configs, engine manifests and message headers."""
from __future__ import annotations

import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from maskstream.configs.codec import Codec, CodecError, check, describe, from_plain, to_plain


@dataclass(frozen=True)
class Stamp:
    stage: str
    start: float


@dataclass(frozen=True)
class Positive:
    n: int = 1

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


@dataclass(frozen=True)
class Record:
    name: str
    seq: int
    pts: float | None = None
    mode: Literal["live", "offline"] = "live"
    ended: bool = False
    stamps: tuple[Stamp, ...] = ()
    size: tuple[int, int] = (0, 0)
    tags: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    where: Path = Path("out")
    limit: int | str = 3
    positive: Positive = field(default_factory=Positive)
    blob: bytes = b""


def error(tp, data) -> str:
    with pytest.raises(CodecError) as info:
        from_plain(tp, data)
    return str(info.value)


def test_round_trip_through_plain_data():
    record = Record("cam", 3, 0.5, "offline", True, (Stamp("decode", 1.0),), (2, 3), ["a"], {"x": 1},
                    {"any": [1, {"k": [2]}]}, Path("a/b"), "all", Positive(4), b"\x00")
    plain = to_plain(record)
    assert plain["stamps"] == [{"stage": "decode", "start": 1.0}] and plain["where"] == "a/b"
    assert list(plain) == [f for f in Record.__dataclass_fields__]  # field order
    assert from_plain(Record, plain) == record
    check(record)


def test_number_rules():
    assert from_plain(Stamp, {"stage": "s", "start": 2}).start == 2.0  # an int is a fine float...
    assert type(from_plain(Stamp, {"stage": "s", "start": 2}).start) is float
    assert error(Stamp, {"stage": "s", "start": True}) == "start: expected float, got bool True"  # ...a bool is not
    assert error(Record, {"name": "a", "seq": True}) == "seq: expected int, got bool True"
    assert error(Record, {"name": "a", "seq": 1.0}) == "seq: expected int, got float 1.0"
    assert error(Record, {"name": "a", "seq": 1, "ended": 1}) == "ended: expected bool, got int 1"
    assert error(Record, {"name": 5, "seq": 1}) == "name: expected str, got int 5"
    assert error(Record, {"name": "a", "seq": 1, "blob": "x"}) == "blob: expected bytes, got str 'x'"


def test_literal_union_and_null():
    assert error(Record, {"name": "a", "seq": 1, "mode": "fast"}) == (
        "mode: expected one of 'live', 'offline', got str 'fast'")
    assert from_plain(Record, {"name": "a", "seq": 1, "pts": None}).pts is None
    assert error(Record, {"name": "a", "seq": None}) == "seq: expected int, got null"
    assert from_plain(Record, {"name": "a", "seq": 1, "limit": 4}).limit == 4
    assert from_plain(Record, {"name": "a", "seq": 1, "limit": "many"}).limit == "many"
    assert error(Record, {"name": "a", "seq": 1, "limit": 1.5}) == "limit: expected int or str, got float 1.5"
    assert error(Record, {"name": "a", "seq": 1, "limit": None}) == "limit: expected int or str, got null"


def test_errors_name_the_path():
    bad = {"name": "a", "seq": 1, "stamps": [{"stage": "d", "start": 1}, {"stage": "e", "start": "x"}]}
    assert error(Record, bad) == "stamps[1].start: expected float, got str 'x'"
    assert error(Record, {"name": "a", "seq": 1, "counts": {"k": "v"}}) == "counts.k: expected int, got str 'v'"
    assert error(Record, {"name": "a", "seq": 1, "size": [1]}) == (
        "size: expected a list [int, int] (2 items), got list of 1 [1]")
    assert error(Record, {"name": "a", "seq": 1, "tags": "abc"}) == "tags: expected a list of str, got str 'abc'"
    assert error(Record, {"name": "a", "seq": 1, "stamps": [3]}) == "stamps[0]: expected a mapping for Stamp, got int 3"


def test_unknown_and_missing_keys():
    assert error(Record, {"name": "a", "seq": 1, "sqe": 2}).startswith(
        "sqe: unknown key (valid keys: name, seq, pts, mode,")
    assert "did you mean 'seq'?" in error(Record, {"name": "a", "seq": 1, "sqe": 2})
    assert error(Record, {"name": "a"}) == "seq: missing required key (expected int)"
    assert error(Record, {"name": "a", "seq": 1, "stamps": [{"stage": "d"}]}) == (
        "stamps[0].start: missing required key (expected float)")


def test_post_init_errors_come_back_at_the_dataclass_path():
    assert error(Record, {"name": "a", "seq": 1, "positive": {"n": 0}}) == "positive: n must be >= 1, got 0"
    assert error(Positive, {"n": 0}) == "n must be >= 1, got 0"


def test_unsupported_annotation_is_a_programming_error():
    @dataclass
    class Odd:
        values: set[int]

    with pytest.raises(TypeError, match=r"Odd.values: unsupported type annotation set\[int\]"):
        from_plain(Odd, {"values": [1]})


def test_check_a_dataclass_built_in_code():
    check(Stamp("s", 1))  # an int is a fine float
    with pytest.raises(CodecError, match=r"size: expected tuple \(a list \[int, int\]\), got list of 2 \[1, 2\]"):
        check(Record("a", 1, size=[1, 2]))  # type: ignore[arg-type]
    with pytest.raises(CodecError, match=r"where: expected PosixPath"):
        check(Record("a", 1, where="x"))  # type: ignore[arg-type]
    with pytest.raises(CodecError, match=r"stamps\[0\].start: expected float, got str 'x'"):
        check(Record("a", 1, stamps=(Stamp("s", "x"),)))  # type: ignore[arg-type]


def test_extra_leaf_types_read_a_context():
    @dataclass(frozen=True)
    class Ref:
        payload: bytearray

    def payload(value, buffers):
        if not isinstance(value, int) or not 0 <= value < len(buffers):
            raise CodecError((), f"no buffer {value!r}")
        return buffers[value]

    codec = Codec(leaves={bytearray: payload})
    assert codec.from_plain(Ref, {"payload": 1}, [bytearray(b"a"), bytearray(b"b")]).payload == b"b"
    with pytest.raises(CodecError, match=r"payload: no buffer 5"):
        codec.from_plain(Ref, {"payload": 5}, [])
    assert to_plain(Ref(bytearray(b"z")), leaf=lambda v: f"<{len(v)}>") == {"payload": "<1>"}


def test_describe():
    assert describe(tuple[int, ...]) == "a list of int"
    assert describe(typing.Optional[Path]) == "str (a path) or null"  # noqa: UP045
    assert describe(dict[str, Any]) == "a mapping" and describe(dict[str, int]) == "a mapping of int"
    assert describe(Stamp) == "a mapping (Stamp)"


def test_the_codec_is_a_leaf_of_the_standard_library():
    """The bottom layer: importing it loads none of torch, numpy, zmq, msgpack or yaml."""
    code = ("import sys, maskstream.configs.codec; "
            "print(sorted({'torch', 'numpy', 'zmq', 'msgpack', 'yaml', 'cv2'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
