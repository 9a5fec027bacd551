"""One log format for every process of a run: the CLI and each stage process it starts.

Each line carries the wall-clock time, the level and the logger's name, so a camera's
reconnect warning from a decode process and the CLI's progress lines read as one timeline:

    2026-05-01 12:00:03 WARNING maskstream.sources: rtsp://cam0/stream: ... reconnecting in 0.5 s

`configure` is an entry point's business (the CLI's `main`, a stage process's set-up), never a
library's: logging is process-wide.
"""
from __future__ import annotations

import logging

__all__ = ["DATE_FORMAT", "FORMAT", "LEVELS", "configure"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
LEVELS = ("debug", "info", "warning", "error")


def configure(level: str) -> None:
    """Timestamped lines on stderr at `level` (one of LEVELS, any case) and above."""
    if level.lower() not in LEVELS:
        raise ValueError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    logging.basicConfig(level=level.upper(), format=FORMAT, datefmt=DATE_FORMAT, force=True)
