"""Which TensorRT this process has, and the error raised when something needs it and it is missing.

Detection only: nothing here imports TensorRT at module level, so every layer (the plugin's
registration, the engine build, the runners, the CLI's doctor) can ask without paying for it.

Trap: with `tensorrt-stubs` installed, `import tensorrt` succeeds as an empty namespace package, so
the import alone proves nothing; a real TensorRT has `__version__` and `Builder`.
"""
from __future__ import annotations

__all__ = ["INSTALL_HINT", "TensorRTUnavailable", "tensorrt_version", "torch_tensorrt_version"]

INSTALL_HINT = (
    "install it with `pip install 'maskstream[tensorrt]'` on a machine with an NVIDIA GPU "
    "(TensorRT's wheels come from NVIDIA's index; torch-tensorrt 2.11/2.12/2.13 pair with torch 2.11/2.12/2.13 "
    "and TensorRT 10.15/10.16/11.0)"
)


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or torch-tensorrt) is missing or too old for what was asked."""


def tensorrt_version() -> str | None:
    """The installed TensorRT's version, or None (see the module docstring for why not the import alone)."""
    try:
        import tensorrt
    except (ImportError, OSError):  # OSError: the bindings are there but libnvinfer is not
        return None
    version = getattr(tensorrt, "__version__", None)
    if not isinstance(version, str) or not hasattr(tensorrt, "Builder"):
        return None
    return version


def torch_tensorrt_version() -> str | None:
    """torch-tensorrt's version if it imports (it needs a real TensorRT), else None."""
    if tensorrt_version() is None:
        return None
    try:
        import torch_tensorrt
    except Exception:  # it fails in many ways when its pins do not match torch/TensorRT
        return None
    version = getattr(torch_tensorrt, "__version__", None)
    return version if isinstance(version, str) else None
