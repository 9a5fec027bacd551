"""The must-shows of issue 17 side by side, from the JSON files benchmarks/gpu_session.sh wrote:

- pipeline frames/s over runner frames/s (R50-FPN 800x1344 fp16 batch 8), before (CPU decode,
  CPU preprocess stage) and after (NVDEC where available, preprocess in the inference process),
  and after_crops (after, with the masks pasted on the GPU: infer.masks crops);
- host CPU cores per 100 frames/s, before and after (every stage process's CPU time);
- 1080p live streams at 30 frames/s: the streams tried, p99 end to end, drop rate, and whether
  that count is sustained (p99 <= 250 ms and drops < 1%), before and after, per model;
- decode: NVDEC vs CPU frames/s and CPU cores; masks: CPU postprocess vs device paste.

    python benchmarks/gpu17_summary.py RESULTS_DIR TAG [--out FILE]

A file that is missing (a step skipped or failed) leaves its entries null, said in "missing".
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

P99_BOUND_S, MAX_DROP_RATE = 0.25, 0.01


def _load(folder: Path, name: str, missing: list[str]) -> dict[str, Any] | None:
    path = folder / name
    if not path.is_file():
        missing.append(name)
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def runner_fps(data: dict[str, Any] | None) -> float | None:
    """The fp16 row of the largest batch, compiled if there is one (the pipeline's CUDA default)."""
    if data is None:
        return None
    rows = [r for r in data["rows"] if r.get("precision") == "fp16" and not r.get("error")]
    if not rows:
        return None
    batch = max(r["batch"] for r in rows)
    best = sorted((r for r in rows if r["batch"] == batch), key=lambda r: not r.get("compiled"))[0]
    return float(best["infer_fps"])


def pipeline(data: dict[str, Any] | None, runner: float | None) -> dict[str, Any] | None:
    if data is None or data.get("run") is None:
        return None
    run = data["run"]
    fps = run["throughput_fps"]
    cores = sum(p["cpu_percent"] for p in run["processes"].values()) / 100
    return {"command": data["command"], "frames_per_s": fps, "runner_frames_per_s": runner,
            "pipeline_over_runner": fps / runner if fps and runner else None,
            "host_cpu_cores": cores, "host_cpu_cores_per_100_fps": cores / fps * 100 if fps else None,
            "cpu_ms_per_frame": {name: p["cpu_ms_per_frame"] for name, p in run["processes"].items()},
            "gpu_mb": run.get("gpu_memory_mb")}


def live(data: dict[str, Any] | None) -> dict[str, Any] | None:
    if data is None or data.get("run") is None:
        return None
    run = data["run"]
    p99, drops = run["end_to_end_s"]["p99"] if run["end_to_end_s"] else None, run["drops"]["drop_rate"]
    return {"command": data["command"], "streams": run["streams"], "rate_fps_per_stream": run["rate_fps_per_stream"],
            "p99_s": p99, "drop_rate": drops, "published_fps": run["throughput_fps"],
            "sustained": p99 is not None and p99 <= P99_BOUND_S and drops < MAX_DROP_RATE}


def summary(folder: Path, tag: str) -> dict[str, Any]:
    missing: list[str] = []
    runner = runner_fps(_load(folder, f"cuda_runner_{tag}.json", missing))
    result: dict[str, Any] = {"tag": tag, "bounds": {"p99_s": P99_BOUND_S, "drop_rate": MAX_DROP_RATE}}
    result["r50_b8_offline_1080p"] = {side: pipeline(_load(folder, f"bench_r50_1080p_{side}_{tag}.json", missing),
                                                     runner) for side in ("before", "after", "after_crops")}
    result["live_1080p_30fps"] = {
        model: {side: live(_load(folder, f"bench_{model}_live_{side}_{tag}.json", missing))
                for side in ("before", "after")}
        for model in ("r50", "lite")}
    decode = _load(folder, "nvdec_decode.json", missing)
    result["decode_1080p_h264"] = None if decode is None else {
        "sides": {d: {k: s[k] for k in ("fps", "cpu_cores")} for d, s in decode["sides"].items()},
        "nvdec_unavailable": decode.get("nvdec_unavailable"), "nvdec_check": decode.get("nvdec_check"),
        "nvdec_over_cpu_fps": decode.get("nvdec_over_cpu_fps")}
    masks = _load(folder, f"mask_paste_{'cuda' if tag != 'cpu_smoke' else 'cpu'}.json", missing)
    result["masks"] = None if masks is None else masks["rows"]
    result["missing"] = missing
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("tag")
    parser.add_argument("--out", type=Path, help="JSON file (default FOLDER/gpu17_summary_TAG.json)")
    args = parser.parse_args()
    result = summary(args.folder, args.tag)
    out = args.out or args.folder / f"gpu17_summary_{args.tag}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    offline = result["r50_b8_offline_1080p"]
    for side in ("before", "after", "after_crops"):
        row = offline[side]
        if row:
            ratio = row["pipeline_over_runner"]
            print(f"R50 b8 1080p {side:<11}: {row['frames_per_s']:.1f} frames/s, pipeline/runner "
                  f"{'-' if ratio is None else f'{ratio:.2f}'}, host CPU {row['host_cpu_cores_per_100_fps']:.2f} "
                  "cores per 100 frames/s")
    for model, sides in result["live_1080p_30fps"].items():
        for side, row in sides.items():
            if row:
                print(f"live {model} {side:<6}: {row['streams']} x 30 fps: p99 {row['p99_s']}, drops "
                      f"{row['drop_rate']:.2%}, sustained {row['sustained']}")
    if result["decode_1080p_h264"]:
        print("decode:", json.dumps(result["decode_1080p_h264"]["sides"]))
    print("missing:", ", ".join(result["missing"]) or "none")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
