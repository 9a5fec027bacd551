"""`maskstream bench`'s measurements: run the real pipeline, collect every published frame's
stage stamps, sample the stage processes' CPU and memory, and reduce them to figures.

    result = measure(cfg)                       # one run of pipeline.run_config.plan(cfg)
    summary = summarize(result, mode="offline")  # a JSON-ready dict (fields: bench_fields)
    table(summary)                               # the same as text

Where the figures come from:
- Frames: a `pipeline.client.Subscriber` on the publish stage's PUB socket (the public
  output, with the publish stamp; the bench's own ipc endpoint unless --publish names one),
  drained from the supervisor's progress callback, so the bench needs no thread.
- Per frame, the header's stamps (one per stage, host monotonic clock) split the end-to-end
  time exactly into stage times (stamp end - start) and queue waits (a stage's start - the
  previous stage's end); end to end = publish end - the source stamp (frame decoded). Decoding
  itself comes before the source stamp: its cost shows as the decode process's CPU.
- Warm-up: frames decoded before the first frame was published waited for the model to load,
  so waits and end-to-end latency leave them out (with fewer than 2 frames after it, all but
  the first frame are used and the summary says so); stage times leave out only the first
  frame of the run (lazy initialisation). Throughput runs from the first published frame to
  the last. The frame accounting always covers every frame.
- Drops: the EndOfStream's per-stage counts (published + drops = frames the source produced);
  live drop rates over the window after warm-up, from the cumulative counts in the headers.
- Processes: /proc/PID/stat (utime + stime) and /proc/PID/status (VmRSS, VmHWM) of every stage
  process, sampled every sample_s; GPU memory per process from `nvidia-smi` where CUDA is
  available and it lists our process ids, else the peak the process's own torch allocator
  reserved, from its heartbeat (in a container nvidia-smi often lists host ids instead; the
  allocator's figure leaves out the CUDA context's few hundred MB).

Library code: raises BenchError (a failed run, no frames) and never prints.
"""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from maskstream.pipeline.client import Subscriber
from maskstream.pipeline.run_config import ChosenModel, RunConfig, plan, run_folder
from maskstream.pipeline.runtime.messages import Detections, EndOfStream, MessageError, StageReport, StageStamp
from maskstream.pipeline.runtime.metrics import MetricsBoard
from maskstream.pipeline.runtime.supervisor import RunReport, Supervisor

__all__ = ["BenchError", "Measurement", "bench_fields", "live_config", "machine", "measure", "search_rate",
           "summarize", "table"]

STAGES = ("decode", "preprocess", "infer", "postprocess", "publish")
_CLOCK_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A benchmark run failed or produced nothing to measure; the message says which and why."""


@dataclass(frozen=True)
class FrameRecord:
    stream_id: str
    seq: int
    stamps: tuple[StageStamp, ...]
    drops: int  # the stream's cumulative drops over all stages, as this frame's header counts them

    @property
    def decoded_at(self) -> float:
        return self.stamps[0].start

    @property
    def published_at(self) -> float:
        return self.stamps[-1].end


@dataclass(frozen=True)
class StreamEnd:
    seq: int  # frames the source produced
    drops: dict[str, int]
    error: str


@dataclass
class ProcessTrace:
    """One stage process: (monotonic time, CPU seconds so far) samples and its memory."""

    name: str
    pid: int
    samples: list[tuple[float, float]] = field(default_factory=list)
    rss_kb: int = 0
    peak_rss_kb: int = 0
    gpu_mb: float | None = None


@dataclass
class Measurement:
    frames: list[FrameRecord]
    ends: dict[str, StreamEnd]
    processes: list[ProcessTrace]
    report: RunReport
    workers: int
    staleness_s: float  # infer.staleness_s: live frames older than this at inference are dropped
    malformed: int = 0


# ---------------------------------------------------------------------------- running


def live_config(cfg: RunConfig, rate_fps: float, streams: int, max_frames: int | None) -> RunConfig:
    """cfg with its sources played live at rate_fps each, every source repeated `streams` times."""
    if not rate_fps > 0 or not math.isfinite(rate_fps):
        raise ValueError(f"rate: expected frames/s > 0, got {rate_fps}")
    source = dataclasses.replace(cfg.source, policy="live", rate_fps=float(rate_fps), max_frames=max_frames)
    return dataclasses.replace(cfg, sources=repeat_sources(cfg.sources, streams), source=source)


def repeat_sources(sources: tuple[str, ...], streams: int) -> tuple[str, ...]:
    if streams < 1:
        raise ValueError(f"streams: expected >= 1, got {streams}")
    return tuple(url for url in sources for _ in range(streams))


def measure(cfg: RunConfig, sample_s: float = 0.5, drain_s: float = 3.0,
            on_progress: Callable[[Supervisor], None] | None = None, board: MetricsBoard | None = None,
            log_level: str = "warning", model: ChosenModel | None = None) -> Measurement:
    """Run cfg's pipeline to the end of every stream and record what it published.

    on_progress: called with the supervisor on every pass of its loop (the CLI's progress);
    board: collects the stages' metrics; log_level and model: as for run_config.plan."""
    folder = None
    if cfg.outputs.publish is None:  # the bench's own PUB endpoint, beside nothing else
        folder = run_folder(cfg.transport.endpoint_dir, prefix="maskstream-bench-")  # a killed bench's goes too
        cfg = dataclasses.replace(cfg, outputs=dataclasses.replace(cfg.outputs, publish=f"ipc://{folder / 'out'}"))
    assert cfg.outputs.publish is not None
    the_plan = plan(cfg, log_level, model)
    frames: list[FrameRecord] = []
    ends: dict[str, StreamEnd] = {}
    traces: dict[int, ProcessTrace] = {}
    counts = {"malformed": 0}
    gpu = _GpuMemory()
    next_sample = [0.0]
    # Room for every message of a run: the bench is the only reader and must not lose any.
    subscriber = Subscriber(cfg.outputs.publish, high_water_mark=1_000_000)

    def drain(timeout_s: float) -> None:
        while True:
            try:
                message = subscriber.recv(timeout_s)
            except TimeoutError:
                return
            except MessageError:
                counts["malformed"] += 1
                continue
            _record(message, frames, ends)
            if timeout_s and len(ends) == len(the_plan.streams):
                return

    def watch(supervisor: Supervisor) -> None:
        drain(0.0)
        now = time.monotonic()
        if now >= next_sample[0]:
            next_sample[0] = now + sample_s
            _sample(supervisor, traces, gpu)
        if on_progress is not None:
            on_progress(supervisor)

    try:
        supervisor = Supervisor(the_plan.specs, the_plan.reports, the_plan.streams, cfg.supervisor, board)
        report = supervisor.run(watch)
        if on_progress is not None:
            on_progress(supervisor)
        drain(drain_s)  # what the publish stage sent just before it was stopped
    finally:
        subscriber.close()
        the_plan.close()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    if report.failure:
        raise BenchError(f"the pipeline run failed: {report.failure}")
    failed = [f"{s.stream_id}: {s.error or 'did not finish'}" for s in report.failed_streams]
    if failed:
        raise BenchError("streams failed: " + "; ".join(failed))
    if not frames:
        raise BenchError("no frame was published: nothing to measure")
    return Measurement(frames, ends, list(traces.values()), report, cfg.workers, cfg.infer.staleness_s,
                       counts["malformed"])


def _record(message: Detections | EndOfStream, frames: list[FrameRecord], ends: dict[str, StreamEnd]) -> None:
    header = message.header
    drops = dict(header.drops)
    if isinstance(message, EndOfStream):
        ends[header.stream_id] = StreamEnd(header.seq, drops, message.error)
    elif header.stamps:
        frames.append(FrameRecord(header.stream_id, header.seq, header.stamps, sum(drops.values())))


def _sample(supervisor: Supervisor, traces: dict[int, ProcessTrace], gpu: _GpuMemory) -> None:
    now = time.monotonic()
    gpu_by_pid = gpu.by_pid()
    for name, process in supervisor.processes.items():
        pid = process.pid
        if pid is None:
            continue
        try:
            cpu_s, rss_kb, peak_kb = _proc_usage(pid)
        except (OSError, ValueError, IndexError):
            continue  # exited between the listing and the read
        trace = traces.setdefault(pid, ProcessTrace(name, pid))
        trace.samples.append((now, cpu_s))
        trace.rss_kb, trace.peak_rss_kb = rss_kb, max(trace.peak_rss_kb, peak_kb)
        seen = process_gpu_mb(pid, gpu_by_pid, supervisor.latest.get(name))
        if seen is not None:
            trace.gpu_mb = max(trace.gpu_mb or 0.0, seen)


def process_gpu_mb(pid: int, gpu_by_pid: dict[int, float], heartbeat: StageReport | None) -> float | None:
    """GPU MB of process `pid`: nvidia-smi's figure when it lists the pid, else what the process's
    last heartbeat said (a heartbeat of an earlier process of the same stage does not count)."""
    if pid in gpu_by_pid:
        return gpu_by_pid[pid]
    return heartbeat.gpu_mb if heartbeat is not None and heartbeat.pid == pid else None


def _proc_usage(pid: int) -> tuple[float, int, int]:
    """(CPU seconds, user + system, all threads; VmRSS kB; VmHWM kB) of a process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": comm may hold spaces
    cpu_s = (int(fields[11]) + int(fields[12])) * _CLOCK_TICK_S  # utime, stime: fields 14, 15 of stat
    memory = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            memory[key] = int(value.split()[0])
    return cpu_s, memory.get("VmRSS", 0), memory.get("VmHWM", 0)


class _GpuMemory:
    """Per-process GPU memory (MB) from nvidia-smi; empty without CUDA (then reported as null)."""

    def __init__(self) -> None:
        self.enabled = shutil.which("nvidia-smi") is not None and _cuda_available()

    def by_pid(self) -> dict[int, float]:
        if not self.enabled:
            return {}
        try:
            query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
            out = subprocess.run(query, capture_output=True, text=True, timeout=5, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
        usage = {}
        for line in out.splitlines():
            pid, _, mb = line.partition(",")
            if pid.strip().isdigit() and mb.strip().replace(".", "", 1).isdigit():
                usage[int(pid)] = float(mb)
        return usage


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# ---------------------------------------------------------------------------- figures


def percentiles(values: list[float] | np.ndarray) -> dict[str, float] | None:
    """p50/p95/p99/max/mean of seconds, and n; None without values."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return None
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(a.max()), "mean": float(a.mean()),
            "n": int(a.size)}


def components(frame: FrameRecord) -> dict[str, float]:
    """The frame's end-to-end time split in pipeline order: "wait:S" (queue before stage S) and
    "S" (stage S's own time); they add up to published_at - decoded_at."""
    out = {}
    for previous, stamp in zip(frame.stamps, frame.stamps[1:]):
        out[f"wait:{stamp.stage}"] = stamp.start - previous.end
        out[stamp.stage] = stamp.end - stamp.start
    return out


def summarize(result: Measurement, mode: str, rate_fps: float | None = None,
              timeline_windows: int = 20) -> dict[str, Any]:
    """The figures of one run, as a JSON-ready dict (keys: bench_fields)."""
    frames = sorted(result.frames, key=lambda f: f.published_at)
    first_published = frames[0].published_at
    steady = [f for f in frames if f.decoded_at > first_published]
    latency_frames = "decoded after the first frame was published"
    if len(steady) < 2:
        steady = frames[1:] or frames
        latency_frames = "all but the first (too few frames after start-up: start-up waits included)"
    span = frames[-1].published_at - first_published
    parts = [components(f) for f in steady]
    service = [components(f) for f in (frames[1:] or frames)]
    stages: dict[str, Any] = {}
    for stage in STAGES:
        times = [p[stage] for p in service if stage in p]
        ends = [s.end for f in frames for s in f.stamps if s.stage == stage]
        stages[stage] = {
            "frames": len(ends),
            "fps": (len(ends) - 1) / (max(ends) - min(ends)) if len(ends) > 1 and max(ends) > min(ends) else None,
            "time_s": percentiles(times),
            "queue_wait_s": percentiles([p[f"wait:{stage}"] for p in parts if f"wait:{stage}" in p]),
        }
    breakdown = {key: float(np.mean([p[key] for p in parts if key in p]))
                 for key in parts[0]} if parts else {}
    e2e = [f.published_at - f.decoded_at for f in steady]
    to_infer = [_to_stage(f, "infer") for f in steady]
    streams = _accounting(result, frames)
    drops_by_stage: dict[str, int] = {}
    for end in result.ends.values():
        for stage, n in end.drops.items():
            drops_by_stage[stage] = drops_by_stage.get(stage, 0) + n
    window = _window_drops(frames, steady, result.ends)
    return {
        "mode": mode,
        "rate_fps_per_stream": rate_fps,
        "streams": len(result.ends),
        "workers": result.workers,
        "frames": {
            "published": len(frames),
            "dropped": sum(drops_by_stage.values()),
            "produced": sum(e.seq for e in result.ends.values()),
            "missed_by_bench": sum(s["missed_by_bench"] for s in streams.values()),
            "all_accounted": all(s["missed_by_bench"] == 0 for s in streams.values()),
            "per_stream": streams,
            "latency_frames": latency_frames,
            "latency_frame_count": len(steady),
        },
        "throughput_fps": (len(frames) - 1) / span if span > 0 else None,
        "end_to_end_s": percentiles(e2e),
        "decoded_to_infer_s": percentiles([t for t in to_infer if t is not None]),
        "staleness_budget_s": result.staleness_s,
        "drops": {"by_stage": drops_by_stage, "after_warm_up": window,
                  "drop_rate": window["dropped"] / window["produced"] if window["produced"] else 0.0},
        "stages": stages,
        "breakdown_mean_s": breakdown,
        "processes": _processes(result, first_published, frames[-1].published_at, len(frames)),
        "gpu_memory_mb": _gpu_total(result),
        "timeline": _timeline([f.published_at - first_published for f in frames], timeline_windows),
        "elapsed_s": result.report.elapsed_s,
        "restarts": dict(result.report.restarts),
        "malformed": result.malformed + result.report.malformed,
        "end_to_end_values_s": [round(v, 6) for v in e2e],
    }


def _to_stage(frame: FrameRecord, stage: str) -> float | None:
    for stamp in frame.stamps:
        if stamp.stage == stage:
            return stamp.start - frame.decoded_at
    return None


def _accounting(result: Measurement, frames: list[FrameRecord]) -> dict[str, dict[str, int]]:
    out = {}
    for sid, end in result.ends.items():
        published = sum(1 for f in frames if f.stream_id == sid)
        dropped = sum(end.drops.values())
        out[sid] = {"produced": end.seq, "published": published, "dropped": dropped,
                    "missed_by_bench": end.seq - published - dropped}
    for s in result.report.streams:  # ended at publish, yet its EndOfStream never reached the bench
        if s.stream_id not in out:
            published = sum(1 for f in frames if f.stream_id == s.stream_id)
            out[s.stream_id] = {"produced": s.frames + s.lost, "published": published, "dropped": s.lost,
                                "missed_by_bench": s.frames - published or 1}
    return out


def _window_drops(frames: list[FrameRecord], steady: list[FrameRecord],
                  ends: dict[str, StreamEnd]) -> dict[str, int]:
    """Frames produced and dropped from each stream's first steady frame to its end: the
    headers' cumulative drop counts make the difference exact (a seq gap = the drops between)."""
    produced = dropped = 0
    for sid, end in ends.items():
        own = [f for f in steady if f.stream_id == sid] or [f for f in frames if f.stream_id == sid]
        if not own:
            produced, dropped = produced + end.seq, dropped + sum(end.drops.values())
            continue
        first = min(own, key=lambda f: f.seq)
        produced += end.seq - first.seq
        dropped += sum(end.drops.values()) - first.drops
    return {"produced": produced, "dropped": dropped}


def _processes(result: Measurement, start: float, stop: float, frames: int) -> dict[str, dict[str, Any]]:
    out = {}
    for trace in result.processes:
        times = np.array([t for t, _ in trace.samples])
        cpu = np.array([c for _, c in trace.samples])
        steady_cpu = float(np.interp(stop, times, cpu) - np.interp(start, times, cpu)) if len(times) > 1 else 0.0
        out[trace.name] = {
            "pid": trace.pid,
            "cpu_s": float(cpu[-1]) if len(cpu) else 0.0,
            # over the published window (start-up and model load left out)
            "cpu_percent": 100 * steady_cpu / (stop - start) if stop > start else None,
            "cpu_ms_per_frame": 1000 * steady_cpu / max(frames - 1, 1),
            "rss_mb": trace.rss_kb / 1024,
            "peak_rss_mb": trace.peak_rss_kb / 1024,
            "gpu_mb": trace.gpu_mb,
        }
    return out


def _gpu_total(result: Measurement) -> float | None:
    values = [t.gpu_mb for t in result.processes if t.gpu_mb is not None]
    return float(sum(values)) if values else None


def _timeline(published_s: list[float], windows: int) -> dict[str, Any]:
    """Published frames/s over time: at each frame, k frames over the time they took (k about
    1/windows of the run), so that a slow run's few frames still draw a steady line."""
    t = np.sort(np.asarray(published_s, np.float64))
    k = max(1, len(t) // windows)
    took = t[k:] - t[:-k]
    keep = took > 0
    return {"t_s": [float(v) for v in t[k:][keep]], "fps": [float(v) for v in k / took[keep]], "window_frames": k}


# ---------------------------------------------------------------------------- rate search


def search_rate(run_at: Callable[[float], dict[str, Any]], start_fps: float, p99_bound_s: float,
                max_drop_rate: float, steps: int = 4, max_fps: float = 240.0) -> dict[str, Any]:
    """The highest rate (frames/s per stream) whose run keeps end-to-end p99 under p99_bound_s
    and the drop rate at most max_drop_rate: double from start_fps until a rate fails (halve
    while the first fails), then bisect between the best passing and the lowest failing rate
    for `steps` more runs. run_at(rate) returns summarize()'s dict."""
    runs: list[dict[str, Any]] = []

    def sustained(rate: float) -> bool:
        summary = run_at(rate)
        p99 = (summary["end_to_end_s"] or {}).get("p99")
        ok = p99 is not None and p99 <= p99_bound_s and summary["drops"]["drop_rate"] <= max_drop_rate
        runs.append({"rate_fps": rate, "sustained": ok, "p99_s": p99, "drop_rate": summary["drops"]["drop_rate"],
                     "throughput_fps": summary["throughput_fps"], "frames": summary["frames"]["published"]})
        return ok

    good, bad = 0.0, math.inf
    rate = start_fps
    while len(runs) < steps + 8:
        if sustained(rate):
            good = rate
            if rate * 2 > max_fps:
                break
            rate *= 2
        else:
            bad = rate
            if good:
                break
            if rate / 2 < 0.25:
                break
            rate /= 2
    for _ in range(steps if good and math.isfinite(bad) else 0):
        rate = round((good + bad) / 2, 2)
        if sustained(rate):
            good = rate
        else:
            bad = rate
    return {"p99_bound_s": p99_bound_s, "max_drop_rate": max_drop_rate, "highest_sustained_fps": good or None,
            "lowest_failed_fps": bad if math.isfinite(bad) else None, "runs": runs}


# ---------------------------------------------------------------------------- reporting


def bench_fields() -> tuple[str, ...]:
    """The keys every summarize() dict has (the JSON's "runs" entries)."""
    return ("mode", "rate_fps_per_stream", "streams", "workers", "frames", "throughput_fps", "end_to_end_s",
            "decoded_to_infer_s", "staleness_budget_s", "drops", "stages", "breakdown_mean_s", "processes",
            "gpu_memory_mb", "timeline", "elapsed_s", "restarts", "malformed", "end_to_end_values_s")


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = None
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (OSError, ValueError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": memory_gb, "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": os.getloadavg()}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}" if value >= 0.01 else f"{value * 1000:.2f}"


def table(summary: dict[str, Any]) -> str:
    """A text table of one run's figures."""
    f = summary["frames"]
    lines = [f"{'stage':<12} {'frames':>6} {'fps':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
             f"{'wait p50':>9} {'wait p99':>9}"]
    for stage, s in summary["stages"].items():
        t, w = s["time_s"] or {}, s["queue_wait_s"] or {}
        fps = "-" if s["fps"] is None else f"{s['fps']:.2f}"
        lines.append(f"{stage:<12} {s['frames']:>6} {fps:>7} {_ms(t.get('p50')):>8} {_ms(t.get('p95')):>8} "
                     f"{_ms(t.get('p99')):>8} {_ms(w.get('p50')):>9} {_ms(w.get('p99')):>9}")
    e = summary["end_to_end_s"] or {}
    fps = summary["throughput_fps"]
    lines.append(f"{'end to end':<12} {f['published']:>6} {'-' if fps is None else f'{fps:.2f}':>7} "
                 f"{_ms(e.get('p50')):>8} {_ms(e.get('p95')):>8} {_ms(e.get('p99')):>8}")
    lines.append("")
    lines.append(f"{'process':<22} {'cpu %':>7} {'cpu ms/frame':>13} {'rss MB':>8} {'peak MB':>8} {'gpu MB':>7}")
    for name, p in summary["processes"].items():
        cpu = "-" if p["cpu_percent"] is None else f"{p['cpu_percent']:.0f}"
        gpu = "-" if p["gpu_mb"] is None else f"{p['gpu_mb']:.0f}"
        lines.append(f"{name:<22} {cpu:>7} {p['cpu_ms_per_frame']:>13.1f} {p['rss_mb']:>8.0f} "
                     f"{p['peak_rss_mb']:>8.0f} {gpu:>7}")
    d = summary["drops"]
    lines.append("")
    lines.append(f"frames: {f['produced']} produced, {f['published']} published, {f['dropped']} dropped "
                 f"({', '.join(f'{k} {v}' for k, v in d['by_stage'].items() if v) or 'none'}), "
                 f"{'all accounted for' if f['all_accounted'] else str(f['missed_by_bench']) + ' unaccounted'}; "
                 f"drop rate after warm-up {d['drop_rate']:.1%}; latency over {f['latency_frame_count']} frames "
                 f"{f['latency_frames']}")
    return "\n".join(lines)
