"""Options and help shared by the subcommands: the help format, logging and progress options,
and `--model`."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from maskstream.pipeline.logs import LEVELS

__all__ = ["HelpFormatter", "add_logging", "config_file", "add_model_name", "add_progress", "subcommand"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default after its help (none shown where there is none to show: an unset
    option's help says what happens instead); descriptions and example epilogs as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in help_text:
            return help_text
        return super()._get_help_string(action)


def subcommand(subparsers: Any, name: str, help: str, examples: str, description: str | None = None,
               **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand's parser with the shared help format and an `examples:` epilog."""
    return subparsers.add_parser(name, help=help, description=description or help[0].upper() + help[1:],
                                 epilog="examples:\n" + examples.strip("\n"), formatter_class=HelpFormatter, **kwargs)


def add_logging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", choices=LEVELS, default="info",
                        help="least severe log lines shown (timestamped, on stderr; stage processes too)")


def add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")
    parser.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                        help="when stderr is not a terminal: a timestamped progress line this often")


def add_model_name(parser: argparse.ArgumentParser, what: str = "the model to run") -> None:
    from maskstream.model.zoo import MODELS

    parser.add_argument(
        "--model", metavar="NAME",
        help=f"{what}: a named model ({', '.join(MODELS)}; torchvision's COCO weights are downloaded on first use, "
             "SHA-256 checked, and cached; MASKSTREAM_MODEL_MIRROR=<base URL> fetches them from a mirror), or the "
             "URL of a checkpoint named name-<sha256 prefix>.pth; default: the bundled bundled_lite_shapes")


def config_file(text: str) -> Path:
    """argparse type of a config option: a file, or a shipped config's name (maskstream.configs.find_config)."""
    from maskstream.configs import find_config

    try:
        return find_config(text)
    except FileNotFoundError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
