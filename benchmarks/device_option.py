"""`--device cpu|cuda` for the benchmark scripts: asking for CUDA where torch sees none is a
usage error (exit status 2, said before any work starts)."""
from __future__ import annotations

import argparse

import torch


def _device(value: str) -> str:
    if value == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda asked for, but torch sees no CUDA device")
    return value


def add_device_option(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """--device; default: `default`, else cuda when torch sees a device, else cpu."""
    if default is None:
        default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", type=_device, choices=["cpu", "cuda"], default=default)
