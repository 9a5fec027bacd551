"""Per-stage, per-stream metrics: cheap to update in a stage, shipped as plain snapshots,
merged and served in Prometheus' text format by the supervisor.

In a stage process:

    stage_metrics = StageMetrics("preprocess")
    stage_metrics.inc(FRAMES_IN, stream_id)
    stage_metrics.observe(STAGE_SECONDS, stream_id, end - start)
    send(stage_metrics.snapshot())          # a frozen dataclass of scalars and tuples

In the supervisor:

    board = MetricsBoard()
    board.update(snapshot)                  # keeps the latest snapshot of each worker process
    server = MetricsServer(9100, board.render).start()   # GET http://127.0.0.1:9100/metrics

Updating is a dict lookup and an add (a bisect for histograms); nothing is formatted or
locked on the hot path. Counters only grow within a process; when a stage restarts, its new
process (new pid) counts from zero beside the old one's last snapshot, so the merged sums
never go backwards.
"""

from __future__ import annotations

import bisect
import dataclasses
import http.server
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

__all__ = [
    "BATCH_SIZE",
    "DROPS",
    "END_TO_END_SECONDS",
    "ERRORS",
    "FRAMES_IN",
    "FRAMES_OUT",
    "LATENCY_BUCKETS_S",
    "QUEUE_DEPTH",
    "STAGE_SECONDS",
    "HistogramSample",
    "Metric",
    "MetricsBoard",
    "MetricsServer",
    "MetricsSnapshot",
    "Sample",
    "StageMetrics",
    "merge",
    "render_prometheus",
]

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class Metric:
    """What a metric is. name: Prometheus name (counters end in _total, times in _seconds);
    buckets: a histogram's ascending upper bounds (le), +Inf is implied."""

    name: str
    help: str
    kind: Kind
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_:" for c in self.name) or self.name[0].isdigit():
            raise ValueError(f"metric name {self.name!r}: expected [a-zA-Z_:][a-zA-Z0-9_:]*")
        if self.kind not in ("counter", "gauge", "histogram"):
            raise ValueError(f"metric {self.name}: kind {self.kind!r}, expected counter, gauge or histogram")
        if (self.kind == "histogram") != bool(self.buckets):
            raise ValueError(f"metric {self.name}: buckets are for histograms, and every histogram needs them")
        if list(self.buckets) != sorted(set(self.buckets)) or not all(math.isfinite(b) for b in self.buckets):
            raise ValueError(f"metric {self.name}: buckets must be finite and strictly ascending, got {self.buckets}")


# 0.5 ms .. 10 s: one frame's stage time on a GPU up to a CPU-bound R50-FPN frame.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

FRAMES_IN = Metric("maskstream_frames_in_total", "Messages a stage received.", "counter")
FRAMES_OUT = Metric("maskstream_frames_out_total", "Messages a stage sent on.", "counter")
DROPS = Metric("maskstream_dropped_frames_total", "Frames a stage dropped (stale or over budget).", "counter")
ERRORS = Metric("maskstream_errors_total", "Messages a stage failed to process.", "counter")
QUEUE_DEPTH = Metric("maskstream_queue_depth", "Messages waiting at a stage's input.", "gauge")
STAGE_SECONDS = Metric(
    "maskstream_stage_seconds", "Time a stage spent on one message, in seconds.", "histogram", LATENCY_BUCKETS_S
)
END_TO_END_SECONDS = Metric(
    "maskstream_end_to_end_seconds", "From decode start to publish, per frame, in seconds.", "histogram",
    LATENCY_BUCKETS_S,
)
BATCH_SIZE = Metric(
    "maskstream_batch_size", "Frames per inference batch.", "histogram", (1, 2, 4, 8, 16, 32, 64)
)


# ---------------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class Sample:
    """One counter or gauge series."""

    name: str
    help: str
    kind: str
    stream: str
    value: float


@dataclass(frozen=True)
class HistogramSample:
    """One histogram series. counts[i]: observations in (bounds[i-1], bounds[i]] (not
    cumulative); the last entry, one past the bounds, counts those above the top bound."""

    name: str
    help: str
    stream: str
    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float
    count: int


@dataclass(frozen=True)
class MetricsSnapshot:
    """The metrics of one worker process of a stage at one moment; only scalars and tuples,
    so any encoder (msgpack, pipeline.runtime.messages-style) can carry it. `from_dict` rebuilds it
    from `dataclasses.asdict` output after a round trip."""

    stage: str
    worker: int
    taken_at: float  # time.time(), for humans and staleness checks
    samples: tuple[Sample, ...] = ()
    histograms: tuple[HistogramSample, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MetricsSnapshot:
        try:
            return cls(
                stage=str(raw["stage"]),
                worker=int(raw["worker"]),
                taken_at=float(raw["taken_at"]),
                samples=tuple(Sample(**s) for s in raw["samples"]),
                histograms=tuple(
                    HistogramSample(**{**h, "bounds": tuple(h["bounds"]), "counts": tuple(h["counts"])})
                    for h in raw["histograms"]
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"metrics snapshot: expected MetricsSnapshot fields, got {raw!r:.200} ({exc})") from None


# ---------------------------------------------------------------------------- in a stage


class StageMetrics:
    """The metrics one stage process updates. Not thread-safe: one stage loop owns it."""

    def __init__(self, stage: str, worker: int | None = None) -> None:
        self.stage = stage
        self.worker = os.getpid() if worker is None else worker
        # Keyed by (metric name, stream): hashing two short strings is cheaper than the
        # Metric dataclass, and the Metric itself is looked up only when a snapshot is taken.
        self._metrics: dict[str, Metric] = {}
        self._values: dict[tuple[str, str], float] = {}
        # [per-bucket counts..., overflow count, sum]; the total count is the sum of the buckets
        self._histograms: dict[tuple[str, str], list[float]] = {}

    def inc(self, metric: Metric, stream: str = "", amount: float = 1.0) -> None:
        key = (metric.name, stream)
        value = self._values.get(key)
        if value is None:
            value = self._first_use(metric, "counter")
        if amount < 0:
            raise ValueError(f"{metric.name}: a counter only grows, got inc by {amount}")
        self._values[key] = value + amount

    def set(self, metric: Metric, stream: str = "", value: float = 0.0) -> None:
        key = (metric.name, stream)
        if key not in self._values:
            self._first_use(metric, "gauge")
        self._values[key] = value

    def observe(self, metric: Metric, stream: str = "", value: float = 0.0) -> None:
        key = (metric.name, stream)
        slots = self._histograms.get(key)
        if slots is None:
            self._first_use(metric, "histogram")
            slots = self._histograms[key] = [0.0] * (len(metric.buckets) + 2)
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le = "<=")
        slots[bisect.bisect_left(metric.buckets, value)] += 1
        slots[-1] += value

    def snapshot(self) -> MetricsSnapshot:
        samples = []
        for (name, stream), value in self._values.items():
            metric = self._metrics[name]
            samples.append(Sample(name, metric.help, metric.kind, stream, value))
        histograms = []
        for (name, stream), slots in self._histograms.items():
            metric = self._metrics[name]
            counts = tuple(int(c) for c in slots[:-1])
            histograms.append(
                HistogramSample(name, metric.help, stream, metric.buckets, counts, slots[-1], sum(counts))
            )
        return MetricsSnapshot(self.stage, self.worker, time.time(), tuple(samples), tuple(histograms))

    def _first_use(self, metric: Metric, kind: str) -> float:
        if metric.kind != kind:
            raise ValueError(f"{metric.name}: is a {metric.kind}, used as a {kind}")
        known = self._metrics.setdefault(metric.name, metric)
        if known != metric:
            raise ValueError(f"{metric.name}: two different metrics share this name ({known} and {metric})")
        return 0.0


# ---------------------------------------------------------------------------- in the supervisor


def merge(snapshots: Iterable[MetricsSnapshot]) -> tuple[MetricsSnapshot, ...]:
    """One snapshot per stage: the series of its workers added up (counters, gauges such as
    queue depths, and histogram buckets alike). worker is 0 in the result; taken_at the latest."""
    by_stage: dict[str, list[MetricsSnapshot]] = {}
    for snap in snapshots:
        by_stage.setdefault(snap.stage, []).append(snap)
    merged = []
    for stage, snaps in by_stage.items():
        values: dict[tuple[str, str], Sample] = {}
        histograms: dict[tuple[str, str], HistogramSample] = {}
        for snap in snaps:
            for s in snap.samples:
                key = (s.name, s.stream)
                old = values.get(key)
                values[key] = s if old is None else dataclasses.replace(old, value=old.value + s.value)
            for h in snap.histograms:
                key = (h.name, h.stream)
                prev = histograms.get(key)
                if prev is None:
                    histograms[key] = h
                    continue
                if prev.bounds != h.bounds:
                    raise ValueError(
                        f"{h.name} of stage {stage}: workers use different buckets {prev.bounds} and {h.bounds}"
                    )
                histograms[key] = dataclasses.replace(
                    prev,
                    counts=tuple(a + b for a, b in zip(prev.counts, h.counts)),
                    sum=prev.sum + h.sum,
                    count=prev.count + h.count,
                )
        merged.append(
            MetricsSnapshot(
                stage, 0, max(s.taken_at for s in snaps), tuple(values.values()), tuple(histograms.values())
            )
        )
    return tuple(merged)


class MetricsBoard:
    """The latest snapshot of every worker process, for the supervisor to render on demand.
    Thread-safe: the HTTP server thread renders while the supervisor loop updates."""

    def __init__(self) -> None:
        self._latest: dict[tuple[str, int], MetricsSnapshot] = {}
        self._lock = threading.Lock()

    def update(self, snapshot: MetricsSnapshot) -> None:
        with self._lock:
            self._latest[(snapshot.stage, snapshot.worker)] = snapshot

    def snapshots(self) -> tuple[MetricsSnapshot, ...]:
        with self._lock:
            return tuple(self._latest.values())

    def render(self) -> str:
        return render_prometheus(merge(self.snapshots()))


def render_prometheus(snapshots: Iterable[MetricsSnapshot]) -> str:
    """Prometheus text exposition format 0.0.4: per metric one HELP and one TYPE line, then
    its series labelled stage and (when not empty) stream; histograms as cumulative
    _bucket{le=...} lines ending at le="+Inf", then _sum and _count."""
    families: dict[str, tuple[str, str, list[str]]] = {}  # name -> (help, kind, lines)
    for snap in snapshots:
        for s in snap.samples:
            lines = _family(families, s.name, s.help, s.kind)
            lines.append(f"{s.name}{_labels(snap.stage, s.stream)} {_number(s.value)}")
        for h in snap.histograms:
            lines = _family(families, h.name, h.help, "histogram")
            cumulative = 0
            for bound, count in zip((*h.bounds, math.inf), h.counts):
                cumulative += count
                # le as Go/client_python print it ("1.0", "+Inf"), one spelling per bound
                le = _labels(snap.stage, h.stream, ("le", "+Inf" if math.isinf(bound) else repr(float(bound))))
                lines.append(f"{h.name}_bucket{le} {cumulative}")
            labels = _labels(snap.stage, h.stream)
            lines.append(f"{h.name}_sum{labels} {_number(h.sum)}")
            lines.append(f"{h.name}_count{labels} {h.count}")
    out = []
    for name, (help_text, kind, lines) in sorted(families.items()):
        out.append(f"# HELP {name} {_escape_help(help_text)}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(lines)
    return "\n".join(out) + "\n" if out else ""


def _family(families: dict[str, tuple[str, str, list[str]]], name: str, help_text: str, kind: str) -> list[str]:
    family = families.setdefault(name, (help_text, kind, []))
    if family[1] != kind:
        raise ValueError(f"metric {name}: reported as both {family[1]} and {kind}")
    return family[2]


def _labels(stage: str, stream: str, *extra: tuple[str, str]) -> str:
    pairs = [("stage", stage), *([("stream", stream)] if stream else []), *extra]
    return "{" + ",".join(f'{key}="{_escape_label(value)}"' for key, value in pairs) + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


# ---------------------------------------------------------------------------- HTTP


class MetricsServer:
    """Serves `get_text()` at http://127.0.0.1:PORT/metrics (and /) from a daemon thread.

    port 0 picks a free port; `.port` says which once started. Loopback only: metrics show
    stream ids and rates, which are not for other hosts unless someone puts a proxy in front."""

    def __init__(self, port: int, get_text: Callable[[], str], host: str = "127.0.0.1") -> None:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"metrics port: expected 0..65535, got {port!r}")
        self.host, self.port, self.get_text = host, port, get_text
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        if self._server is not None:
            return self
        get_text = self.get_text

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?")[0] not in ("/", "/metrics"):
                    self._reply(404, "not found: metrics are at /metrics\n")
                    return
                try:
                    body = get_text()
                except Exception as exc:  # a broken snapshot must not kill the server thread
                    self._reply(500, f"metrics unavailable: {type(exc).__name__}: {exc}\n")
                    return
                self._reply(200, body, "text/plain; version=0.0.4; charset=utf-8")

            def _reply(self, status: int, body: str, content_type: str = "text/plain; charset=utf-8") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # library code does not print; requests are not worth a log line

        try:
            self._server = http.server.ThreadingHTTPServer((self.host, self.port), Handler)
        except OSError as exc:
            raise OSError(f"metrics server: cannot listen on {self.host}:{self.port} ({exc.strerror or exc})") from None
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
