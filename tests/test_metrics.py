"""Metrics: cheap updates, plain snapshots, merging, Prometheus text that a strict parser accepts,
and the loopback HTTP endpoint."""
from __future__ import annotations

import dataclasses
import math
import re
import urllib.error
import urllib.request

import msgpack
import pytest
from maskstream.pipeline.runtime.metrics import (
    DROPS,
    FRAMES_IN,
    QUEUE_DEPTH,
    STAGE_SECONDS,
    Metric,
    MetricsBoard,
    MetricsServer,
    MetricsSnapshot,
    StageMetrics,
    merge,
    render_prometheus,
)

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
SAMPLE = re.compile(rf"^({NAME})(\{{(?:{LABEL}(?:,{LABEL})*)?\}})? (\S+)$")
COMMENT = re.compile(rf"^# (HELP|TYPE) ({NAME}) (.*)$")


def parse_prometheus(text: str) -> dict[str, dict]:
    """A strict reading of the text exposition format 0.0.4: {family: {type, help, samples}}
    with samples [(name, {label: value}, float)]. Fails on anything a Prometheus server refuses."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families: dict[str, dict] = {}
    current = None
    for number, line in enumerate(text.splitlines(), 1):
        if m := COMMENT.match(line):
            kind, name, rest = m.groups()
            family = families.setdefault(name, {"samples": []})
            assert kind.lower() not in family, f"line {number}: second {kind} for {name}"
            assert not family["samples"], f"line {number}: {kind} after {name}'s samples"
            if kind == "TYPE":
                assert rest in ("counter", "gauge", "histogram", "summary", "untyped"), line
            family[kind.lower()] = rest
            current = name
            continue
        m = SAMPLE.match(line)
        assert m, f"line {number} is not a sample: {line!r}"
        name, labels, value = m.groups()
        owner = current
        assert owner and name in (owner, f"{owner}_bucket", f"{owner}_sum", f"{owner}_count"), (
            f"line {number}: {name} outside its family's block (or before its TYPE)"
        )
        if families[owner]["type"] != "histogram":
            assert name == owner, f"line {number}: {name} in a {families[owner]['type']} family"
        pairs = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or ""))
        families[owner]["samples"].append((name, pairs, float(value)))  # float() reads +Inf and NaN too
    for name, family in families.items():
        assert "type" in family and "help" in family, f"{name}: HELP and TYPE are both expected"
    return families


def check_histogram(family: dict, name: str) -> None:
    """Buckets cumulative and ascending in le, ending at +Inf == _count, for every series."""
    series: dict[tuple, dict] = {}
    for sample_name, labels, value in family["samples"]:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        entry = series.setdefault(key, {"buckets": []})
        if sample_name == f"{name}_bucket":
            entry["buckets"].append((float(labels["le"]), value))
        else:
            entry[sample_name.rsplit("_", 1)[1]] = value
    for key, entry in series.items():
        les = [le for le, _ in entry["buckets"]]
        counts = [c for _, c in entry["buckets"]]
        assert les == sorted(les) and les[-1] == math.inf, key
        assert counts == sorted(counts), f"{key}: buckets not cumulative: {counts}"
        assert counts[-1] == entry["count"], key
        assert "sum" in entry, key


def busy_stage(stage: str = "preprocess", worker: int = 1) -> StageMetrics:
    metrics = StageMetrics(stage, worker=worker)
    for seconds in (0.0004, 0.001, 0.003, 0.003, 0.2, 30.0):  # 0.001 sits exactly on a bound
        metrics.observe(STAGE_SECONDS, "cam0", seconds)
        metrics.inc(FRAMES_IN, "cam0")
    metrics.inc(DROPS, 'cam "quoted"\\1', 2)
    metrics.set(QUEUE_DEPTH, "cam0", 3)
    metrics.inc(FRAMES_IN)  # no stream: not a per-stream metric here
    return metrics


def test_prometheus_text_parses_and_histograms_are_cumulative():
    text = render_prometheus([busy_stage().snapshot(), busy_stage("infer").snapshot()])
    families = parse_prometheus(text)
    assert {n: f["type"] for n, f in families.items()} == {
        "maskstream_frames_in_total": "counter",
        "maskstream_dropped_frames_total": "counter",
        "maskstream_queue_depth": "gauge",
        "maskstream_stage_seconds": "histogram",
    }
    check_histogram(families["maskstream_stage_seconds"], "maskstream_stage_seconds")
    buckets = {
        labels["le"]: value
        for name, labels, value in families["maskstream_stage_seconds"]["samples"]
        if name.endswith("_bucket") and labels["stage"] == "infer"
    }
    assert (buckets["0.0005"], buckets["0.001"], buckets["0.005"], buckets["10.0"], buckets["+Inf"]) == (1, 2, 4, 5, 6)
    frames = {(lb["stage"], lb.get("stream")): v for _, lb, v in families["maskstream_frames_in_total"]["samples"]}
    assert frames == {("preprocess", "cam0"): 6, ("preprocess", None): 1, ("infer", "cam0"): 6, ("infer", None): 1}
    [(_, drop_labels, _), *_] = families["maskstream_dropped_frames_total"]["samples"]
    assert drop_labels["stream"] == 'cam \\"quoted\\"\\\\1'  # escaped on the wire
    assert render_prometheus([]) == ""


def test_snapshot_is_plain_data_that_survives_msgpack_and_merges_across_workers():
    first, second = busy_stage(worker=1).snapshot(), busy_stage(worker=2).snapshot()
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.stage = "x"  # type: ignore[misc]
    wire = msgpack.packb(dataclasses.asdict(first))
    assert MetricsSnapshot.from_dict(msgpack.unpackb(wire)) == first

    board = MetricsBoard()
    board.update(first)
    board.update(second)
    board.update(busy_stage(worker=2).snapshot())  # a newer snapshot replaces that worker's older one
    [merged] = merge(board.snapshots())
    values = {(s.name, s.stream): s.value for s in merged.samples}
    assert values[("maskstream_frames_in_total", "cam0")] == 12 and values[("maskstream_queue_depth", "cam0")] == 6
    [hist] = merged.histograms
    assert (hist.count, hist.counts[-1], hist.sum) == (12, 2, pytest.approx(2 * 30.2074))
    check_histogram(parse_prometheus(board.render())["maskstream_stage_seconds"], "maskstream_stage_seconds")


def test_wrong_use_is_a_clear_error():
    metrics = StageMetrics("decode")
    with pytest.raises(ValueError, match="maskstream_queue_depth: is a gauge, used as a counter"):
        metrics.inc(QUEUE_DEPTH, "cam0")
    with pytest.raises(ValueError, match="a counter only grows"):
        metrics.inc(FRAMES_IN, "cam0", -1)
    with pytest.raises(ValueError, match="buckets must be finite and strictly ascending"):
        Metric("x_seconds", "x", "histogram", (1.0, 0.5))
    with pytest.raises(ValueError, match="expected"):
        Metric("2bad", "x", "counter")


def test_http_endpoint_serves_the_text_on_loopback():
    board = MetricsBoard()
    board.update(busy_stage().snapshot())
    with MetricsServer(0, board.render) as server:
        assert server.port > 0 and server.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(server.url, timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            parse_prometheus(response.read().decode())
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/nothing", timeout=5)
        assert missing.value.code == 404

    def broken() -> str:
        raise RuntimeError("board gone")

    with MetricsServer(0, broken) as server:
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(server.url, timeout=5)
        assert failed.value.code == 500 and b"board gone" in failed.value.read()
