"""Benchmarks that cannot rot: every script in benchmarks/ and `maskstream bench` runs here at its
--smoke size (benchmarks/options.py: a few frames, the tiny model, one round), as a user would run
it (its own process, from another folder), and must finish and write a well-formed results JSON
into a temporary folder. A script that a change elsewhere broke (a stage's interface, a module
moved) fails here, not in front of the next person measuring.

Figures at these sizes mean nothing, so no figure is compared with anything: each JSON is checked
for the keys its script promises and for rates, times and ratios that are finite and positive. A
script that only reads other scripts' JSON (gpu17_summary.py) runs on their smoke results."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from maskstream.pipeline.bench.measure import bench_fields
from maskstream.pipeline.bench.smoke import SMOKE_FRAMES

from tests.nats_cluster import require_binary

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
HELPERS = {"options.py", "golden_state.py"}  # modules the scripts import, never run themselves
SCRIPT_TIMEOUT_S = 300


def positive(*values: Any) -> None:
    for value in values:
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, value


def load_averages(values: Any) -> None:
    assert len(values) == 3 and all(math.isfinite(v) and v >= 0 for v in values), values


def check_cpu_inference(result: dict[str, Any]) -> None:
    assert {"variant", "input_hw", "proposals", "detections", "seconds", "median_s",
            "ratio_torchvision_style_over_ours", "roi_align_box_head_ratio_loop_over_ours", "command"} <= set(result)
    assert result["variant"] == "lite" and result["input_hw"] == [128, 160]
    sides = {"ours", "torchvision_style", "roi_ours", "roi_loop"}
    assert set(result["seconds"]) == set(result["median_s"]) == sides
    for side in sides:
        assert len(result["seconds"][side]) == result["repeats"] == 1
        positive(*result["seconds"][side], result["median_s"][side])
    positive(result["proposals"], result["detections"], result["ratio_torchvision_style_over_ours"],
             result["roi_align_box_head_ratio_loop_over_ours"])


def check_cuda_runner(result: dict[str, Any]) -> None:
    assert {"device", "variant", "input_hw", "gflop_per_frame", "floor_ms_per_frame", "rows", "machine",
            "command"} <= set(result)
    assert result["device"] == "cpu" and result["input_hw"] == [128, 160]
    positive(result["gflop_per_frame"], result["floor_ms_per_frame"])
    rows = result["rows"]
    assert {(row["precision"], row["batch"]) for row in rows} == {("fp16", 1), ("fp32", 1)}
    for row in rows:
        assert "error" not in row, row["error"]
        positive(row["infer_fps"], row["device_fps"], row["device_ms_per_batch"], row["achieved_tflops"],
                 *row["infer_ms_per_batch"].values())
        profile = row["profile"]  # --smoke profiles every row
        assert profile["stages"] and profile["kernels"], profile


def check_decode(result: dict[str, Any]) -> None:
    assert {"video", "rounds", "median_fps", "ratios", "skipped", "machine", "command"} <= set(result)
    sides = {"pyav_decode", "decode_stage", "decode_process"} | ({"ffmpeg_cli"} - set(result["skipped"]))
    assert set(result["median_fps"]) == set(result["rounds"]) == sides
    for side in sides:
        assert len(result["rounds"][side]) == 1
        positive(result["median_fps"][side], *result["rounds"][side], result["ratios"][f"{side}_over_pyav_decode"])
    assert result["video"]["frames"] > 1 and result["video"]["codec"]
    load_averages(result["machine"]["load_average_before"])


def check_memory_format(result: dict[str, Any]) -> None:
    assert {"device", "input", "ms_per_frame_rounds", "ms_per_frame", "speedup_channels_last",
            "max_output_difference", "machine", "command"} <= set(result)
    assert result["device"] == "cpu" and result["input"][2:] == [128, 160]
    assert set(result["ms_per_frame"]) == {"nchw", "channels_last"}
    for layout, ms in result["ms_per_frame"].items():
        positive(ms, *result["ms_per_frame_rounds"][layout])
    positive(result["speedup_channels_last"])
    for difference in result["max_output_difference"].values():
        assert math.isfinite(difference) and difference >= 0


def check_mask_paste(result: dict[str, Any]) -> None:
    assert {"benchmark", "command", "device", "machine", "frame_hw", "input_hw", "batch", "frames",
            "rows"} <= set(result)
    assert result["device"] == "cpu" and result["frames"] == 2 and result["batch"] == 2
    load_averages(result["machine"]["load_average"])
    [row] = result["rows"]
    assert row["boxes"] == 5
    positive(row["cpu_postprocess_ms"], row["device_paste_ms"], row["crops_postprocess_ms"], row["host_pack_paste_ms"],
             row["speedup"], row["postprocess_speedup"], row["probs_message_bytes"], row["crops_message_bytes"],
             row["crop_pixels"])
    assert row["crops_total_ms"] == row["device_paste_ms"] + row["crops_postprocess_ms"]
    # bit-packed: an eighth of a byte a crop pixel, besides the boxes, scores, labels and header
    assert row["crop_pixels"] / 8 < row["crops_message_bytes"] < row["crop_pixels"] / 8 + 4096
    assert row["identical_rle_fraction"] > 0.99  # only pixels within a float32 step of the threshold may differ


def check_nvdec(result: dict[str, Any]) -> None:
    assert {"benchmark", "command", "machine", "video", "rounds", "nvdec_unavailable", "sides"} <= set(result)
    assert result["rounds"] == 1
    load_averages(result["machine"]["load_average"])
    # NVDEC measured where it works, else left out with the reason
    assert ("nvdec" in result["sides"]) == (result["nvdec_unavailable"] is None), result["nvdec_unavailable"]
    assert "cpu" in result["sides"]
    for side in result["sides"].values():
        assert side["frames"] == 12 and len(side["rounds"]) == 1
        positive(side["fps"], side["cpu_cores"], side["rounds"][0]["seconds"])


def check_pipeline(result: dict[str, Any]) -> None:
    assert {"what", "command", "machine", "rounds", "workers", "max_frames", "goal", "runs"} <= set(result)
    load_averages(result["machine"]["load_average_at_start"])
    load_averages(result["machine"]["load_average_at_end"])
    assert result["rounds"] == 1 and result["max_frames"] == SMOKE_FRAMES
    [run] = result["runs"]
    assert run["model"] == "tiny" and Path(run["video"]).name == "sample_clip.mp4"
    assert run["frames"] == SMOKE_FRAMES  # every frame through both sides
    for side in ("bare_loop", "pipeline"):
        assert len(run[f"{side}_fps"]) == len(run["load_average_before"][side]) == result["rounds"]
        positive(*run[f"{side}_fps"], run[f"{side}_fps_median"])
        for load in run["load_average_before"][side]:
            load_averages(load)
        [share] = run["others_cpu_share"][side]
        assert 0 <= share <= 1.05, share  # of all cores, less a rounding of clock ticks
    positive(run["efficiency"], *run["efficiency_per_round"])


def check_roi_align(result: dict[str, Any]) -> None:
    assert {"device", "features", "image_hw", "boxes_per_image", "rows", "timing", "machine", "command"} <= set(result)
    assert result["device"]["device"] == "cpu" and result["image_hw"] == [256, 320]
    assert {(row["batch"], row["dtype"]) for row in result["rows"]} == {(1, "float32"), (1, "float16")}
    for row in result["rows"]:
        assert not row["errors"], row["errors"]
        assert {"op", "per_level_loop"} <= set(row["seconds"])
        for seconds in row["seconds"].values():
            positive(*seconds)
        positive(*row["speedup_over"].values())
        assert sum(row["boxes_per_level"]) == result["boxes_per_image"]


def check_transport(result: dict[str, Any]) -> None:
    assert {"median", "rounds", "ratios", "messages_per_round", "machine", "command"} <= set(result)
    modes = {"zmq_bytes", "ring_copy", "ring_in_place"}
    assert set(result["median"]) == set(result["rounds"]) == modes
    for mode in modes:
        figures = result["median"][mode]
        assert {"prepare_ms", "hop_ms", "preprocess_ms", "total_ms", "wall_ms"} <= set(figures)
        positive(figures["prepare_ms"], figures["preprocess_ms"], figures["total_ms"], figures["wall_ms"])
        assert math.isfinite(figures["hop_ms"])  # a CPU-time difference: near zero it may come out either side
    for ratio in result["ratios"].values():
        assert math.isfinite(ratio)
    load_averages(result["machine"]["load_average_before"])


def check_messages(result: dict[str, Any]) -> None:
    assert {"per_message_us", "rounds", "number", "against", "loadavg", "command"} <= set(result)
    assert result["rounds"] == 1 and result["against"] is None
    assert set(result["per_message_us"]) == {"Frame", "ModelInput", "RawDetections", "Detections", "EndOfStream"}
    for kind, figures in result["per_message_us"].items():
        assert set(figures) == {"run_limits", "unbounded", "in_ring"}, kind
        positive(figures["run_limits"], figures["unbounded"])
        assert figures["in_ring"] is (kind in ("Frame", "ModelInput"))  # pixels travel in the shared-memory ring
    load_averages(result["loadavg"])


def check_soak(result: dict[str, Any]) -> None:
    assert {"what", "command", "run_command", "machine", "model", "rate_fps", "duration_s", "kill_every_s",
            "elapsed_s", "stream_s", "exit_code", "timed_out", "kills", "restarts", "windows_s", "rss", "rss_total",
            "rss_flat", "rss_samples", "frames", "stdout_tail", "stderr_tail"} <= set(result)
    assert result["model"] == "tiny" and result["exit_code"] == 0 and not result["timed_out"], result["stderr_tail"]
    load_averages(result["machine"]["load_average_before"])
    load_averages(result["machine"]["load_average_after"])
    [kill] = result["kills"]  # one kill, restarted by the supervisor
    assert kill["stage"] == "infer.0" and result["restarts"] == {"infer.0": 1}, result["stdout_tail"]
    assert {"supervisor", "infer.0", "preprocess.0", "postprocess.0", "publish.0", "decode.soak"} <= set(result["rss"])
    for memory in result["rss"].values():  # flat or not: a few seconds say nothing about it
        positive(memory["first_window_mb"], memory["last_window_mb"], memory["ratio"])
    positive(result["rss_total"]["ratio"], result["stream_s"])
    frames = result["frames"]
    assert frames["produced"] == result["clip"]["frames"] == round(result["duration_s"] * result["rate_fps"])
    assert frames["published_run"] > 0 and frames["received"] > 0 and frames["malformed"] == 0
    assert frames["accounted_run"] and frames["accounted_subscriber"], frames


def check_fleet_soak(result: dict[str, Any]) -> None:
    assert {"what", "command", "machine", "model", "settings", "setup_s", "soaked_s", "faults", "errors", "windows_s",
            "metrics", "leak_free", "correctness", "correct", "cpu", "nodes_cpu_ok", "node_counters",
            "samples"} <= set(result)
    load_averages(result["machine"]["load_average_before"])
    load_averages(result["machine"]["load_average_after"])
    assert result["errors"] == [] and result["model"] == "tiny", result["errors"]
    assert [fault["kind"] for fault in result["faults"]] == ["pipeline", "node", "server", "link"]  # one of each
    metrics = result["metrics"]
    assert {"node_a_rss_mb", "node_b_rss_mb", "node_a_nats_subscriptions", "stray_processes", "dead_pipelines_rings_mb",
            "server_n0_rss_mb", "consumers_KV_maskstream_leases", "consumers_MASKSTREAM_JOBS"} <= set(metrics)
    for name in ("node_a_rss_mb", "node_b_rss_mb", "server_n0_rss_mb", "server_n1_rss_mb", "server_n2_rss_mb"):
        positive(metrics[name]["first"], metrics[name]["last"])
    # what a smoke's seconds can tell: after a fault of each kind every count is back where it was: the
    # streams' consumers (a watch left behind fails here), the nodes' subscriptions, pipelines'
    # processes and rings left behind (memory flat or not: a few seconds say nothing about it)
    for name, metric in metrics.items():
        if name.startswith("consumers_") or name.endswith("_nats_subscriptions") or name in (
                "stray_processes", "dead_pipelines_rings_mb"):
            assert metric["verdict"] and metric["flat"] is True, (name, metric)
    # each node process's own CPU (its pipelines apart), a share of one core: an idle loop that never
    # sleeps takes a whole core, far above the bound
    cpu = result["cpu"]
    assert set(cpu["processes"]) == {"node_a", "node_b", "server_n0", "server_n1", "server_n2"}, cpu
    for row in cpu["processes"].values():
        positive(row["cpu_s"], row["over_s"], row["mean_share"], row["max_share"])
    assert 0 < cpu["node_mean_share_max"] < 1
    assert cpu["processes"]["node_a"]["within_bound"] and cpu["processes"]["node_b"]["within_bound"], cpu
    assert cpu["nodes_within_bound"] and result["nodes_cpu_ok"], cpu
    for name in ("node_a_cpu_share", "node_b_cpu_share", "server_n0_cpu_share"):
        assert not metrics[name]["verdict"] and metrics[name]["first"] is not None, (name, metrics[name])
    correctness = result["correctness"]
    jobs = correctness["jobs"]
    assert jobs["submitted"] >= 3 and jobs["done_exactly_once"] == jobs["submitted"] and not jobs["bad"], jobs
    assert set(correctness["cameras"]) == {"cam0", "cam1"}
    for camera in correctness["cameras"].values():
        assert camera["results"] > 0 and camera["epochs"] >= 2, camera  # each one ran again at least once
        assert camera["duplicate_seqs_in_an_epoch"] == camera["seqs_not_rising_in_an_epoch"] == 0, camera
        assert camera["epochs_overlapping"] == 0, camera
    assert correctness["never_two_holders"] and result["correct"]
    assert [row["kind"] for row in correctness["after_faults"]] == ["pipeline", "node", "server", "link"]
    for row in correctness["after_faults"]:
        positive(*row["longest_gap_s"].values())


def check_fleet(result: dict[str, Any]) -> None:
    assert {"what", "command", "model", "model_overrides", "machine", "overhead", "failover", "job_failover"} <= set(
        result)
    load_averages(result["machine"]["load_average_at_start"])
    load_averages(result["machine"]["load_average_at_end"])
    overhead = result["overhead"]
    assert len(overhead["files"]) == 1 and overhead["frames"] == 6
    [round_] = overhead["rounds"]
    for side in ("run", "fleet"):
        load_averages(round_["load_average_before"][side])
        positive(round_[f"{side}_s"], round_[f"{side}_steady_s"], round_[f"{side}_fps"], round_[f"{side}_steady_fps"],
                 overhead[f"{side}_fps_median"], overhead[f"{side}_steady_fps_median"])
    positive(overhead["ratio"], overhead["steady_ratio"], round_["ratio"], round_["steady_ratio"])
    failover = result["failover"]
    [kill] = failover["kills"]
    positive(kill["lease_s"], kill["first_result_s"], failover["lease_s_median"], failover["lease_s_max"],
             failover["first_result_s_median"], failover["first_result_s_max"], failover["pipeline_start_s"])
    assert kill["lease_s"] <= kill["first_result_s"]  # the new holder publishes after it holds the lease
    assert (failover["cameras"], failover["standby"], list(kill["cameras"])) == (1, 1, ["cam0"])
    assert kill["cameras"]["cam0"] == {"lease_s": kill["lease_s"], "first_result_s": kill["first_result_s"],
                                       "from": "a", "to": "b"}
    # the smoke restarts the killed node at once: the camera goes to the other node's warm standby, not
    # back to the restart (a new start, cold) by its name
    assert failover["restart_at_once"] is True and failover["moved_to_the_killed_nodes_restart"] == 0
    assert kill["standby_takeovers"] == 1  # the other node's warm standby took the camera over
    load_averages(kill["load_average_at_kill"])
    jobs = result["job_failover"]
    [kill] = jobs["kills"]
    positive(kill["taken_again_s"], kill["first_result_s"], jobs["taken_again_s_median"], jobs["first_result_s_max"])
    assert kill["taken_again_s"] <= kill["first_result_s"] and kill["attempt"] == 2 and jobs["restart_at_once"] is True
    # handed back once the dead start's presence expired and its state fell silent, not at ack_wait_s
    assert kill["taken_again_s"] < jobs["ack_wait_s"] - 2 * jobs["ttl_s"], kill
    load_averages(kill["load_average_at_kill"])


def check_fleet_reads(result: dict[str, Any]) -> None:
    assert {"what", "command", "machine", "trials", "missed_status", "missed_list", "watch_behind",
            "read_ms_median", "read_ms_max"} <= set(result)
    load_averages(result["machine"]["load_average_at_start"])
    load_averages(result["machine"]["load_average_at_end"])
    assert result["trials"] == 3
    assert result["missed_status"] == result["missed_list"] == 0  # every read lists the camera just added
    assert isinstance(result["watch_behind"], int) and result["watch_behind"] >= 0
    positive(result["read_ms_median"], result["read_ms_max"])


def check_kv_churn(result: dict[str, Any]) -> None:
    assert {"what", "command", "machine", "minutes", "speedup", "samples", "rss_mb_median_by_third",
            "cameras_held_at_end", "plateau", "lease_settings"} <= set(result)
    assert result["smoke"] is True and result["minutes"] == 0.5 and result["cameras_held_at_end"] == 6
    assert result["lease_settings"]["ttl_s"] == 1.0 and result["lease_settings"]["renew_interval_s"] == 0.2
    assert len(result["samples"]) >= 10 and result["samples"][-1]["t_s"] >= 30
    assert set(result["rss_mb_median_by_third"]) == {"n0", "n1", "n2"}
    for sample in result["samples"]:
        positive(*(sample[name] for name in ("n0", "n1", "n2")))
    assert isinstance(result["plateau"], bool)
    load_averages(result["machine"]["load_average_at_start"])


def check_record_training(result: dict[str, Any]) -> None:
    assert {"commands", "config", "model_config", "iterations", "wall_seconds", "cpu_seconds",
            "mean_iteration_seconds", "final_losses_mean_of_last_50", "evaluations", "machine"} <= set(result)
    assert result["iterations"] == 3 and result["commands"][0].startswith("maskstream train")
    positive(result["wall_seconds"], result["mean_iteration_seconds"])
    positive(*result["final_losses_mean_of_last_50"].values())
    [evaluation] = result["evaluations"].values()
    assert set(evaluation) == {"bbox", "segm"}
    for metrics in evaluation.values():
        assert all(math.isfinite(value) for value in metrics.values())


# Every benchmark script in benchmarks/, with what its smoke JSON must hold; test_every_script_is_covered
# fails for a script missing here or in SUMMARIES.
SCRIPTS: dict[str, Callable[[dict[str, Any]], None]] = {
    "bench_cpu_inference.py": check_cpu_inference,
    "bench_cuda_runner.py": check_cuda_runner,
    "bench_decode.py": check_decode,
    "bench_fleet.py": check_fleet,
    "fleet_soak.py": check_fleet_soak,
    "bench_fleet_reads.py": check_fleet_reads,
    "bench_kv_churn.py": check_kv_churn,
    "bench_mask_paste.py": check_mask_paste,
    "bench_memory_format.py": check_memory_format,
    "bench_messages.py": check_messages,
    "bench_nvdec.py": check_nvdec,
    "bench_pipeline.py": check_pipeline,
    "bench_roi_align.py": check_roi_align,
    "bench_transport.py": check_transport,
    "record_training.py": check_record_training,
    "soak.py": check_soak,
}
# Scripts that measure nothing themselves but read other scripts' JSON: each has its own test below.
SUMMARIES = {"gpu17_summary.py"}
SMOKE_RESULTS: dict[str, Path] = {}  # script -> the JSON its smoke run wrote in this session


def run_script(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S, env=env)


def test_every_script_is_covered():
    on_disk = {path.name for path in BENCHMARKS.glob("*.py")}
    assert on_disk - HELPERS == set(SCRIPTS) | SUMMARIES, "a benchmark script without a smoke test here (or one gone)"
    for helper in HELPERS:
        assert helper in on_disk
        assert "__main__" not in (BENCHMARKS / helper).read_text(), f"{helper} runs: it is a script, test it"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_smoke_run_writes_well_formed_results(script, tmp_path):
    smoke_result(script, tmp_path)


def smoke_result(script: str, tmp_path: Path) -> Path:
    """Runs `script --smoke` (its CPU path) and checks its JSON; the JSON's path."""
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir(parents=True)
    # the fleet scripts start their own NATS servers: the binary the fleet tests use (skip as they do without one)
    env = {**os.environ, "MASKSTREAM_NATS_SERVER": require_binary()} if "fleet" in script else None
    device = ["--device", "cpu"] if script in device_scripts() else []
    done = run_script(script, "--smoke", *device, "--out", str(out), cwd=work, env=env)
    assert done.returncode == 0, f"{script} --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    written = sorted(out.glob("*.json"))
    assert len(written) == 1, f"{script} wrote {written}, expected one results JSON"
    result = json.loads(written[0].read_text())
    assert result["smoke"] is True
    assert str(written[0]) in done.stdout  # says where it wrote
    SCRIPTS[script](result)
    SMOKE_RESULTS[script] = written[0]
    return written[0]


def test_gpu17_summary_reads_what_the_scripts_write(tmp_path):
    """gpu17_summary.py on the smoke JSON of the scripts it reads (the ones this session's smoke runs
    wrote, else made here), named as gpu_session.sh --cpu-smoke names them; the maskstream bench
    runs it also reads are missing and must be said to be."""
    folder = tmp_path / "results"
    folder.mkdir()
    for script, name in (("bench_cuda_runner.py", "cuda_runner_cpu_smoke.json"),
                         ("bench_nvdec.py", "nvdec_decode.json"), ("bench_mask_paste.py", "mask_paste_cpu.json")):
        made = SMOKE_RESULTS.get(script) or smoke_result(script, tmp_path / script)
        shutil.copy(made, folder / name)
    out = tmp_path / "summary.json"
    done = run_script("gpu17_summary.py", str(folder), "cpu_smoke", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-6000:]
    assert str(out) in done.stdout
    result = json.loads(out.read_text())
    assert result["tag"] == "cpu_smoke"
    assert set(result["missing"]) == {f"bench_r50_1080p_{side}_cpu_smoke.json"
                                      for side in ("before", "after", "after_crops")} | {
        f"bench_{model}_live_{side}_cpu_smoke.json" for model in ("r50", "lite") for side in ("before", "after")}
    assert result["r50_b8_offline_1080p"] == {"before": None, "after": None, "after_crops": None}
    decode = result["decode_1080p_h264"]
    assert "cpu" in decode["sides"] and decode["nvdec_unavailable"] == json.loads(
        (folder / "nvdec_decode.json").read_text())["nvdec_unavailable"]
    positive(decode["sides"]["cpu"]["fps"], decode["sides"]["cpu"]["cpu_cores"])
    assert result["masks"] == json.loads((folder / "mask_paste_cpu.json").read_text())["rows"]


def device_scripts() -> list[str]:
    """The scripts with benchmarks/options.py's --device."""
    return sorted(name for name in SCRIPTS if "add_device_option(" in (BENCHMARKS / name).read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a CUDA device here")
@pytest.mark.parametrize("script", device_scripts())
def test_cuda_without_a_device_is_a_usage_error(script, tmp_path):
    done = run_script(script, "--smoke", "--device", "cuda", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "cuda asked for, but torch sees no CUDA device" in done.stderr
    assert not (tmp_path / "out").exists()


def test_device_scripts_are_the_gpu_ones():
    assert device_scripts() == ["bench_cuda_runner.py", "bench_mask_paste.py", "bench_memory_format.py",
                                "bench_roi_align.py"]


def load_options() -> Any:
    spec = importlib.util.spec_from_file_location("benchmark_options", BENCHMARKS / "options.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_defaults_shrink_only_what_the_command_line_leaves_out():
    options = load_options()
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    options.add_output_options(parser)
    assert vars(options.parse_args(parser, {"rounds": 1, "iters": 2}, ["--iters", "7"])) == \
        {"rounds": 5, "iters": 7, "smoke": False, "out": None}
    assert vars(options.parse_args(parser, {"rounds": 1, "iters": 2}, ["--smoke", "--iters", "7"])) == \
        {"rounds": 1, "iters": 7, "smoke": True, "out": None}


def test_smoke_results_never_go_into_benchmarks_results(tmp_path, capsys):
    options = load_options()
    parser = argparse.ArgumentParser()
    options.add_output_options(parser)

    def path(*argv: str) -> Path:
        return options.results_file(parser, parser.parse_args(list(argv)), "x.json")

    assert path() == BENCHMARKS / "results" / "x.json"
    assert path("--out", str(tmp_path)) == tmp_path / "x.json"
    assert path("--out", str(tmp_path / "y.json")) == tmp_path / "y.json"
    smoke = path("--smoke")
    assert smoke.name == "x.json" and smoke.parent.is_dir() and BENCHMARKS not in smoke.parents
    smoke.parent.rmdir()
    assert path("--smoke", "--out", str(tmp_path)) == tmp_path / "x.json"
    for out in (BENCHMARKS / "results", BENCHMARKS / "results" / "y.json"):
        with pytest.raises(SystemExit) as stopped:
            path("--smoke", "--out", str(out))
        assert stopped.value.code == 2
        assert re.search(r"--smoke figures mean nothing and never go into \S+results", capsys.readouterr().err)


def test_maskstream_bench_smoke_run_writes_well_formed_results(tmp_path):
    out = tmp_path / "out" / "bench.json"
    done = subprocess.run([sys.executable, "-m", "maskstream.pipeline.cli", "bench", "--smoke", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-6000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["max_frames"] == SMOKE_FRAMES
    assert result["model"]["input"] == [1, 3, 128, 160] and result["model"]["variant"] == "lite"
    run = result["run"]
    assert set(bench_fields()) <= set(run)
    assert run["frames"]["published"] == SMOKE_FRAMES and run["frames"]["all_accounted"]
    positive(run["throughput_fps"], run["end_to_end_s"]["p50"], run["stages"]["infer"]["time_s"]["p50"])
    assert len(result["plots"]) == 3 and all(Path(plot).is_file() for plot in result["plots"])
