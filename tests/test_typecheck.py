"""The TensorRT-touching modules type-check with mypy against tensorrt-stubs: TensorRT itself
cannot be installed on this project's machines, so its types are what checks our use of its API.

The stubs reach mypy through .venv/typings (pyproject's mypy_path; `make venv` repairs them there,
.ci/tensorrt_typings.py says why), so a probe that misuses TensorRT must fail first: otherwise
TensorRT would be typed as Any and the modules' check would prove nothing."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TYPINGS = ROOT / ".venv" / "typings" / "tensorrt_bindings" / "tensorrt.pyi"
TENSORRT_MODULES = ["-m", "maskstream.model.engine", "-m", "maskstream.model.runners",
                    "-m", "maskstream.plugins.tensorrt_env", "-p", "maskstream.plugins.roi_align"]
VIEW = ROOT / ".venv" / "srcview" / "maskstream"  # the package as mypy finds it (`make venv`)
MISUSE = """import tensorrt as trt
logger: trt.ILogger = trt.Logger(trt.Logger.WARNING)
runtime = trt.Runtime(logger, "one argument too many")
"""


def mypy(*paths: str, cache: Path) -> tuple[str, int]:
    api = pytest.importorskip("mypy.api", reason="mypy not installed (the dev extra)")
    stdout, stderr, status = api.run(
        ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(cache), *paths])
    return stdout + stderr, status


def test_tensorrt_modules_type_check_against_the_stubs(tmp_path):
    if not TYPINGS.is_file():
        pytest.skip(f"{TYPINGS} missing: `make venv` repairs tensorrt-stubs into .venv/typings")
    probe = tmp_path / "misuse.py"
    probe.write_text(MISUSE)
    report, status = mypy(str(probe), cache=tmp_path / "cache")
    assert status == 1 and 'Too many arguments for "Runtime"' in report, report  # the stubs are in use
    if not (VIEW / "model").is_dir():
        pytest.skip(f"{VIEW} missing: `make venv` links the package's folders there for mypy")
    report, status = mypy(*TENSORRT_MODULES, cache=tmp_path / "cache")
    assert status == 0, report
