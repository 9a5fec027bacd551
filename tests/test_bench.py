"""`maskstream bench` for real (stage processes, ZeroMQ, the tiny untrained lite model of
test_pipeline on generated clips), the rate search on a stand-in, and the sources' pacing and
frame limit that live benchmarks use. No timed assertions: latency bounds come from the
stamps the pipeline itself writes, as in test_pipeline."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
import torch
from maskstream.pipeline.bench.measure import bench_fields, process_gpu_mb, search_rate
from maskstream.pipeline.cli.main import main
from maskstream.pipeline.media.sources import SourceSpec, VideoSource
from maskstream.pipeline.media.video import write_test_clip
from maskstream.pipeline.runtime.messages import StageReport
from maskstream.pipeline.runtime.stage import gpu_memory_mb

from tests.pipeline_runs import AFTER_INFERENCE_S, INFER_STALENESS_S, ROOT, STAGES, TINY_MODEL_SETS


def maskstream_bench(args, tmp_path):
    sets = [x for s in (*TINY_MODEL_SETS, f"transport.endpoint_dir={tmp_path}") for x in ("--set", s)]
    cmd = [sys.executable, "-m", "maskstream.pipeline.cli", "bench", *sets, *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    return done.returncode, done.stdout, done.stderr


def stats_dicts(node):
    """Every percentile dict anywhere in a summary."""
    if isinstance(node, dict):
        if "p50" in node:
            yield node
        for value in node.values():
            yield from stats_dicts(value)


def test_offline_bench_reports_every_field_accounts_every_frame_and_draws_plots(tmp_path):
    clip = write_test_clip(tmp_path / "clip.mp4", frames=10, size=(160, 120))
    out = tmp_path / "result" / "bench.json"
    code, stdout, stderr = maskstream_bench(["--source", str(clip), "--streams", "2", "--out", str(out)], tmp_path)
    assert code == 0, stderr
    assert "end to end" in stdout and "all accounted for" in stdout
    result = json.loads(out.read_text())
    assert result["command"].startswith("maskstream bench") and result["machine"]["cores"]
    assert result["model"]["trained"] is False and "untrained" in stderr
    run = result["run"]
    assert set(bench_fields()) <= set(run)
    frames = run["frames"]
    assert frames["produced"] == frames["published"] == 20 and frames["dropped"] == 0 and frames["all_accounted"]
    # the second copy of a source takes the next free id (run_config.stream_sources)
    assert {s: v["published"] for s, v in frames["per_stream"].items()} == {"clip": 10, "clip-2": 10}
    for stream in ("clip", "clip-2"):  # progress off a terminal: timestamped lines, against the real frame count
        assert re.search(r"\d\d:\d\d:\d\d INFO maskstream.progress: " + stream + r": 10/10 frames \(100%\)", stderr)
    for stage in STAGES:
        assert run["stages"][stage]["frames"] == 20 and run["stages"][stage]["time_s"]["n"] > 0
    for stats in stats_dicts(run):
        assert 0 <= stats["p50"] <= stats["p95"] <= stats["p99"] <= stats["max"]
    assert run["throughput_fps"] > 0 and run["gpu_memory_mb"] is None
    assert {name.split(".")[0] for name in run["processes"]} == set(STAGES)
    for usage in run["processes"].values():
        assert usage["cpu_s"] > 0 and usage["peak_rss_mb"] >= usage["rss_mb"] > 0
    # the parts of a frame's time add up to its end-to-end latency
    assert math.isclose(sum(run["breakdown_mean_s"].values()), run["end_to_end_s"]["mean"], rel_tol=1e-6)
    assert len(result["plots"]) == 3
    for plot in result["plots"]:
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert cv2.imread(plot).shape[2] == 3


def test_live_bench_over_capacity_drops_counted_and_latency_bounded(tmp_path):
    # 60 frames/s into a model that does ~5-20 here: most frames must be dropped and counted,
    # and latency must stay within the staleness budget instead of queues growing.
    clip = write_test_clip(tmp_path / "fast.mp4", frames=120, size=(160, 120), fps=30)
    out = tmp_path / "live.json"
    code, stdout, stderr = maskstream_bench(
        ["--source", str(clip), "--mode", "live", "--rate", "60", "--max-frames", "120", "--no-plots",
         "--out", str(out)], tmp_path)
    assert code == 0, stderr
    run = json.loads(out.read_text())["run"]
    frames = run["frames"]
    assert frames["produced"] == 120 and frames["all_accounted"]
    assert frames["published"] + frames["dropped"] == 120
    assert frames["dropped"] > 0 and run["drops"]["drop_rate"] > 0
    assert run["rate_fps_per_stream"] == 60
    assert run["decoded_to_infer_s"]["max"] <= run["staleness_budget_s"] == INFER_STALENESS_S
    assert run["end_to_end_s"]["p99"] <= INFER_STALENESS_S + AFTER_INFERENCE_S


def test_gpu_memory_from_nvidia_smi_else_from_the_process_heartbeat():
    heartbeat = StageReport("infer.0", 41, 1.0, gpu_mb=900.0)
    assert process_gpu_mb(41, {41: 1400.0}, heartbeat) == 1400.0  # nvidia-smi lists it: context included
    assert process_gpu_mb(41, {7: 1400.0}, heartbeat) == 900.0  # host pids in a container: its own figure
    assert process_gpu_mb(42, {}, heartbeat) is None  # an earlier process of the stage said that
    assert process_gpu_mb(41, {}, None) is None


def test_gpu_memory_mb_is_the_allocator_peak_or_none_without_cuda():
    if torch.cuda.is_available():
        torch.ones(1024, device="cuda")
        assert gpu_memory_mb() >= 1024 * 4 / 2**20
    else:
        assert gpu_memory_mb() is None


def test_rate_search_brackets_then_bisects_to_the_highest_sustained_rate():
    capacity = 7.3

    def run_at(rate):
        ok = rate <= capacity
        return {"end_to_end_s": {"p99": 0.5 if ok else 5.0}, "drops": {"drop_rate": 0.0 if ok else 0.4},
                "throughput_fps": min(rate, capacity), "frames": {"published": 10}}

    search = search_rate(run_at, start_fps=2.0, p99_bound_s=1.0, max_drop_rate=0.05, steps=4)
    assert [r["rate_fps"] for r in search["runs"][:3]] == [2.0, 4.0, 8.0]
    assert 6.5 <= search["highest_sustained_fps"] <= capacity < search["lowest_failed_fps"] <= 8.0
    assert all(r["sustained"] == (r["rate_fps"] <= capacity) for r in search["runs"])
    nothing = search_rate(lambda rate: run_at(rate * 100), start_fps=1.0, p99_bound_s=1.0, max_drop_rate=0.05)
    assert nothing["highest_sustained_fps"] is None


def test_bad_bench_input_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "missing.mp4"
    cases = [
        (["--source", str(missing)], f"--source {missing}: no such video file"),
        (["--mode", "live", "--rate", "-1"], "--rate: expected frames/s > 0, got -1"),
        (["--mode", "live"], "--mode live needs --rate"),
        (["--rate", "5"], "--rate paces live sources"),
        (["--streams", "0"], "--streams: expected >= 1, got 0"),
    ]
    for args, message in cases:
        assert main(["bench", *args, "--out", str(tmp_path / "b.json")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_file_played_live_at_a_rate_and_sources_cut_at_max_frames(tmp_path):
    clip = write_test_clip(tmp_path / "c.mp4", frames=20, size=(160, 120), fps=100)
    with VideoSource(SourceSpec(str(clip), policy="offline", max_frames=5)) as source:
        assert [f.index for f in source] == [0, 1, 2, 3, 4]  # a prefix, not an error about truncation
    start = time.monotonic()
    with VideoSource(SourceSpec(str(clip), policy="live", rate_fps=25, max_frames=6, staleness_s=5.0)) as source:
        frames = [source.read(timeout_s=10) for _ in range(6)]
        assert source.read(timeout_s=10) is None  # ended after 6 frames
    assert [f.index for f in frames] == list(range(6))
    # Paced at 25 frames/s, not the file's 100: frame k is due k / 25 s after the first (a lower
    # bound only, which a loaded host cannot break).
    assert frames[-1].decoded_at - frames[0].decoded_at >= 5 / 25 - 0.01
    assert time.monotonic() - start >= 5 / 25 - 0.01
    for bad, message in ((dict(rate_fps=0.0), "rate_fps must be > 0"), (dict(max_frames=0), "max_frames must be >= 1")):
        with pytest.raises(ValueError, match=message):
            SourceSpec(str(clip), **bad)
