"""The command-line conventions every benchmark script in benchmarks/ shares:

  --smoke      the script's own code paths at tiny sizes (a few frames, the tiny model of
               pipeline.bench.smoke, one round): done in seconds on a CPU, figures that mean
               nothing; CI runs every script this way (tests/test_benchmarks.py). Options given
               on the command line keep their values, only the defaults shrink.
  --out PATH   where the JSON goes: a folder (the script names the file) or a file ending in
               .json. Default benchmarks/results/; with --smoke a fresh temporary folder, and a
               smoke run never writes into benchmarks/results/.
  --device     (scripts that have one) cpu or cuda: cuda where torch sees no device is a usage
               error (exit status 2, said before any work starts).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
NO_CUDA = "cuda asked for, but torch sees no CUDA device"


def _device(value: str) -> str:
    import torch  # here: the scripts without --device need not load it

    if value == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(NO_CUDA)
    return value


def add_device_option(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """--device; default: `default`, else cuda when torch sees a device, else cpu."""
    import torch

    if default is None:
        default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", type=_device, choices=["cpu", "cuda"], default=default)


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """--smoke and --out."""
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (a few frames, the tiny model, one round): checks that the script works, "
                             "measures nothing; JSON into a temporary folder unless --out")
    parser.add_argument("--out", type=Path, metavar="PATH",
                        help="folder for the JSON (or a .json file); default benchmarks/results/, "
                             "with --smoke a temporary folder")


def parse_args(parser: argparse.ArgumentParser, smoke: dict[str, Any], argv: list[str] | None = None
               ) -> argparse.Namespace:
    """The parsed command line; with --smoke, `smoke` replaces those options' defaults."""
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
    return args


def results_file(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str) -> Path:
    """Where the JSON called `name` goes (see --out); a smoke run aimed at benchmarks/results/ is a usage error."""
    out = args.out
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="maskstream-smoke-")) if args.smoke else RESULTS
    path = out if out.suffix == ".json" else out / name
    if args.smoke and RESULTS.resolve() in path.resolve().parents:
        parser.error(f"--out {args.out}: --smoke figures mean nothing and never go into {RESULTS}")
    return path
