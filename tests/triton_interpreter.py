"""Running a test module's Triton kernel cases under the interpreter (TRITON_INTERPRET=1) on CPU.

The variable must be set before triton decorates a kernel and applies to the whole process, so
the cases run in one subprocess: this process's kernels stay compiled (for the GPU tests)."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpret(run: Callable[[dict], Any], cases: dict[str, dict], folder: Path) -> dict[str, Any]:
    """`run(case)` for every case, under the interpreter. `run` is a test module's top-level
    function: the subprocess imports it from there."""
    if INTERPRETING:  # this whole process interprets already
        return {name: run(case) for name, case in cases.items()}
    path = folder / "cases.pt"
    torch.save(cases, path)
    code = (f"import sys; from tests.triton_interpreter import run_saved_cases; "
            f"from {run.__module__} import {run.__name__}; run_saved_cases(sys.argv[1], {run.__name__})")
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": pythonpath}
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"the interpreter subprocess failed:\n{done.stderr[-4000:]}")
    return torch.load(str(path) + ".out")


def run_saved_cases(path: str, run: Callable[[dict], Any]) -> None:
    """In the subprocess: `run` every case saved at `path`, and save the outputs beside it."""
    import numpy as np

    cases = torch.load(path)
    with np.errstate(all="ignore"):  # NaN/inf boxes are part of the cases
        outputs = {name: run(case) for name, case in cases.items()}
    torch.save(outputs, path + ".out")
