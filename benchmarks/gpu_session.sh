#!/usr/bin/env bash
# The must-shows of issue 17 (the GPU data path) in one device call, for a CUDA machine without
# network access; R50-FPN v1 800x1344 fp16 batch 8 unless said, on a synthetic 1080p H.264 clip
# (the clip writer's, 1920x1080, 30 frames/s: no real 1080p clip is at hand), every pair measured
# in this one run, side by side. "before" = CPU decode + the CPU preprocess stage (main's path),
# "after" = --decode auto (NVDEC where FFmpeg opens the device) + --preprocess infer:
#   1. bench_cuda_runner: the runner alone, fp16 batch 8, compiled (the pipeline's CUDA default);
#   2. maskstream bench offline, 8 streams, after and before: pipeline/runner ratio, per-stage
#      shares, host CPU per process (-> CPU cores per 100 frames/s);
#   3. bench_nvdec: the decode stage on NVDEC vs on the CPU (frames/s, CPU cores);
#   4. maskstream bench live at 30 frames/s per stream, N streams where N is 90% of the offline
#      rate over 30, after and before: p99 end to end and drops (sustained: p99 <= 250 ms, < 1%);
#   5. bench_mask_paste: today's CPU postprocess vs the masks pasted on the device in the inference
#      process (infer.masks crops) + postprocess's RLE of the crops, per frame of a batch of 8, and the
#      bytes of a RawDetections of each form; then pipeline_after_crops: step 2's after with
#      --masks crops (the pipeline/runner ratio with the masks pasted on the GPU);
#   6. with time left: the lite model's pair likewise.
#   Then benchmarks/gpu17_summary.py puts them side by side: $OUT/gpu17_summary_$TAG.json.
# (Issues 3 and 6's steps, whose results are in benchmarks/results, are in this file's git history.)
# Each step is time-boxed and the run goes on past a failed one; a global deadline (BUDGET_S) keeps
# the whole under the device call's limit, most important steps first. Everything is logged to
# $OUT/gpu_session.log, and after every step the results folder is re-packed into
# $OUT/gpu_results.tar.gz, so a run cut short still returns what it finished.
#
# Prepare here (no GPU needed), once per checkout:   make gpu-carry
#   -> .whl/: the wheels the GPU image lacks (av, pyzmq, pycocotools), installed to /tmp/site there.
# Then one device call (the workplace's `run` tool):
#   command:   bash benchmarks/gpu_session.sh
#   carry:     [".whl"]
#   timeout_s: 560          (BUDGET_S below is 520: the steps end before the call's limit)
# To redo some steps at once on the warm machine:
#   command:   ONLY="pipeline_after live_r50_after" BUDGET_S=200 bash benchmarks/gpu_session.sh
# (step names as in the summary; the environment and the clip always run).
# Afterwards: tar -xzf <files_at>/gpu_results.tar.gz -C benchmarks/results/ (files named *_$TAG.*),
# read gpu_session.log and gpu17_summary_$TAG.json, and summarise in README.md and issue 17.
#
# Dry run on a CPU machine (tiny model and clip, device cpu, .venv's python, no install):
#   bash benchmarks/gpu_session.sh --cpu-smoke        # OUT defaults to /tmp/gpu_out
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD

SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
OUT=${OUT:-/tmp/gpu_out}
BUDGET_S=${BUDGET_S:-520}
ONLY=${ONLY:-}  # space-separated step names to run; empty: all
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
RESULTS=$(mktemp -d /tmp/gpu_results.XXXXXX)
trap 'rm -rf "$RESULTS" "${PACKAGE_DIR:-}"' EXIT  # everything in RESULTS is packed into $OUT after each step
LOG=$OUT/gpu_session.log
mkdir -p "$OUT"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
STATUS=()

archive() {
    tar -czf "$OUT/gpu_results.tar.gz.tmp" -C "$RESULTS" . && mv "$OUT/gpu_results.tar.gz.tmp" "$OUT/gpu_results.tar.gz"
}

# step NAME MAX_SECONDS COMMAND...: run with `timeout` (whole process group, SIGKILL 10 s after),
# capped by what is left before the deadline (20 s kept for the summary); skipped when too little is left.
step() {
    local name=$1 max=$2
    shift 2
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
        return
    fi
    local left=$((DEADLINE - $(date +%s) - 20))
    if ((left < 30)); then
        echo "=== $name: skipped, ${left}s left before the deadline"
        STATUS+=("$name: skipped (time)")
        return
    fi
    local limit=$((max < left ? max : left))
    echo
    echo "=== $name (limit ${limit}s, $(($(date +%s) - START))s in): $*"
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - t0))s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
    STATUS+=("$name: exit $rc, $(($(date +%s) - t0))s")
    archive
}

export PYTHONUNBUFFERED=1
# The import package without installing it: maskstream/ of links to the four folders (pyproject's
# package-dir; maskstream is a namespace package), first on PYTHONPATH, also for the stage processes.
PACKAGE_DIR=$(mktemp -d /tmp/gpu_package.XXXXXX)
mkdir -p "$PACKAGE_DIR/maskstream"
for folder in pipeline model plugins configs; do ln -s "$ROOT/$folder" "$PACKAGE_DIR/maskstream/$folder"; done
if ((SMOKE)); then
    PY=${PY:-$ROOT/.venv/bin/python}
    TAG=cpu_smoke
    export PYTHONPATH=$PACKAGE_DIR:$ROOT:$ROOT/benchmarks
else
    PY=${PY:-python3}
    TAG=${TAG:-h200}
    # The image's python3 has torch, triton, numpy, cv2, yaml, msgpack; the rest comes as wheels.
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || echo "WARNING: installing the carried wheels failed"
    else
        echo "WARNING: no .whl/*.whl carried (make gpu-carry, and carry [\".whl\"]): av/zmq/pycocotools missing"
    fi
    export PYTHONPATH=/tmp/site:$PACKAGE_DIR:$ROOT:$ROOT/benchmarks
fi
# Goldens travel inside .whl where carried (../shared does not travel).
[ -d "$ROOT/.whl/shared" ] && export MASKSTREAM_SHARED=$ROOT/.whl/shared

echo "=== environment ($(date -u +%FT%TZ), smoke=$SMOKE, budget ${BUDGET_S}s)"
(git rev-parse HEAD && git status --short) 2>/dev/null || echo "git: not available (working tree copy)"
command -v nvidia-smi >/dev/null && nvidia-smi
$PY - <<'EOF' 2>&1 | tee "$RESULTS/environment_$TAG.txt"
import importlib, platform, sys
print("python", sys.version.split()[0], sys.executable, platform.platform())
for name in ["torch", "triton", "numpy", "cv2", "av", "zmq", "pycocotools", "msgpack", "yaml", "torchvision",
             "cuda.bindings", "tensorrt", "torch_tensorrt", "pytest_timeout"]:
    try:
        mod = importlib.import_module(name)
        print(f"{name:<14} {getattr(mod, '__version__', 'present')}  {getattr(mod, '__file__', '')}")
    except Exception as exc:
        print(f"{name:<14} MISSING ({type(exc).__name__}: {exc})")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
nproc
archive

# The 1080p H.264 clip (the clip writer's; 240 frames = 8 s at 30 frames/s).
CLIP_DIR=$(mktemp -d /tmp/gpu_clip.XXXXXX)
CLIP=$CLIP_DIR/synthetic_1080p.mp4
if ((SMOKE)); then CLIP_SIZE="(192, 108)"; CLIP_FRAMES=24; else CLIP_SIZE="(1920, 1080)"; CLIP_FRAMES=240; fi
$PY -c "from maskstream.pipeline.media.video import write_test_clip
write_test_clip('$CLIP', frames=$CLIP_FRAMES, size=$CLIP_SIZE, fps=30.0, codec='libx264')" \
    || echo "WARNING: could not write the 1080p clip"
$PY -c "from maskstream.pipeline.media.hwdecode import nvdec_problem; print('NVDEC:', nvdec_problem() or 'available')"

if ((SMOKE)); then
    MODEL=(--model-config configs/model_lite.yaml --device cpu --precision fp16
           --set model.static.height=128 --set model.static.width=160 --set model.static.detections=10
           --set model.roi_heads.detections_per_img=10 --set model.rpn.pre_nms_top_n_test=200
           --set model.rpn.post_nms_top_n_test=100 --set model.static.batch=2)
    RUNNER=(--device cpu --variant lite --height 128 --width 160 --set roi_heads.detections_per_img=10
            --set static.detections=10 --set rpn.pre_nms_top_n_test=200 --set rpn.post_nms_top_n_test=100
            --batches 2 --precisions fp16 --iters 2 --warmup 0)
    STREAMS=2; FRAMES=4; WORKERS=1; LIVE_S=1; MASK=(--device cpu --smoke)
    LITE=("${MODEL[@]}")
else
    MODEL=(--model-config configs/model_v1.yaml --device cuda --precision fp16 --set model.static.batch=8)
    RUNNER=(--device cuda --variant v1 --batches 8 --precisions fp16 --compile on --iters 30)
    STREAMS=8; FRAMES=150; WORKERS=4; LIVE_S=8; MASK=(--device cuda --boxes 10 50 100 --batch 8 --batches 4)
    LITE=(--model-config configs/model_lite.yaml --device cuda --precision fp16 --set model.static.batch=8)
fi
AFTER=(--decode auto --preprocess infer)
BEFORE=(--decode cpu --preprocess stage)
BENCH=("$PY" -m maskstream.pipeline.cli bench --source "$CLIP" --no-plots --overwrite --workers "$WORKERS")

# streams N for a live run at 30 frames/s: 90% of the offline frames/s in FILE over 30, at least 1
live_streams() {
    $PY -c "import json, sys; print(max(1, int(json.load(open(sys.argv[1]))['run']['throughput_fps'] * 0.9 // 30)))" \
        "$1" 2>/dev/null || echo 1
}

# 1-2. The runner alone, then the pipeline after and before (the ratio and CPU use).
step bench_cuda_runner 150 $PY benchmarks/bench_cuda_runner.py "${RUNNER[@]}" --out "$RESULTS/cuda_runner_$TAG.json"
step pipeline_after 120 "${BENCH[@]}" "${MODEL[@]}" "${AFTER[@]}" --streams "$STREAMS" --max-frames "$FRAMES" \
    --out "$RESULTS/bench_r50_1080p_after_$TAG.json"
step pipeline_before 120 "${BENCH[@]}" "${MODEL[@]}" "${BEFORE[@]}" --streams "$STREAMS" --max-frames "$FRAMES" \
    --out "$RESULTS/bench_r50_1080p_before_$TAG.json"
# 3. Decode alone.
step bench_nvdec 60 $PY benchmarks/bench_nvdec.py --video "$CLIP" --rounds 2 --out "$RESULTS/nvdec_decode.json"
# 4. Live 1080p streams at 30 frames/s, as many as the offline rate suggests.
step live_r50_after 90 "${BENCH[@]}" "${MODEL[@]}" "${AFTER[@]}" --mode live --rate 30 \
    --streams "$(live_streams "$RESULTS/bench_r50_1080p_after_$TAG.json")" --duration "$LIVE_S" \
    --out "$RESULTS/bench_r50_live_after_$TAG.json"
step live_r50_before 90 "${BENCH[@]}" "${MODEL[@]}" "${BEFORE[@]}" --mode live --rate 30 \
    --streams "$(live_streams "$RESULTS/bench_r50_1080p_before_$TAG.json")" --duration "$LIVE_S" \
    --out "$RESULTS/bench_r50_live_before_$TAG.json"
# 5. Masks.
step bench_mask_paste 45 $PY benchmarks/bench_mask_paste.py "${MASK[@]}" --out "$RESULTS"
step pipeline_after_crops 120 "${BENCH[@]}" "${MODEL[@]}" "${AFTER[@]}" --masks crops --streams "$STREAMS" \
    --max-frames "$FRAMES" --out "$RESULTS/bench_r50_1080p_after_crops_$TAG.json"
# 6. The lite model's pair, with time left: offline for N, then live.
step lite_offline_after 60 "${BENCH[@]}" "${LITE[@]}" "${AFTER[@]}" --streams "$STREAMS" --max-frames "$FRAMES" \
    --out "$RESULTS/bench_lite_1080p_after_$TAG.json"
step live_lite_after 60 "${BENCH[@]}" "${LITE[@]}" "${AFTER[@]}" --mode live --rate 30 \
    --streams "$(live_streams "$RESULTS/bench_lite_1080p_after_$TAG.json")" --duration "$LIVE_S" \
    --out "$RESULTS/bench_lite_live_after_$TAG.json"
step lite_offline_before 60 "${BENCH[@]}" "${LITE[@]}" "${BEFORE[@]}" --streams "$STREAMS" --max-frames "$FRAMES" \
    --out "$RESULTS/bench_lite_1080p_before_$TAG.json"
step live_lite_before 60 "${BENCH[@]}" "${LITE[@]}" "${BEFORE[@]}" --mode live --rate 30 \
    --streams "$(live_streams "$RESULTS/bench_lite_1080p_before_$TAG.json")" --duration "$LIVE_S" \
    --out "$RESULTS/bench_lite_live_before_$TAG.json"

$PY benchmarks/gpu17_summary.py "$RESULTS" "$TAG" && cp "$RESULTS/gpu17_summary_$TAG.json" "$OUT/"
rm -rf "$CLIP_DIR"

echo
echo "=== summary ($(($(date +%s) - START))s)"
printf '  %s\n' "${STATUS[@]}"
archive
ls -la "$RESULTS" "$OUT"
sleep 1  # let tee write the last lines into the log before the call collects $OUT
