"""Where commands write: a fresh numbered run directory by default, never over earlier results.

    new_run_dir(Path("runs"), "run")          # runs/run-1, then runs/run-2, ... (made here, empty)
    refuse_existing([out, coco], overwrite)   # OutputExists naming them, unless overwrite (then removed)
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["OutputExists", "new_run_dir", "refuse_existing"]


class OutputExists(ValueError):
    """Outputs of an earlier run are where this one would write."""


def new_run_dir(parent: Path, prefix: str) -> Path:
    """parent/<prefix>-N, made now, N one more than the highest N there (1 in a new folder), so
    directories sort in the order the runs were started; two runs starting together get two."""
    pattern = re.compile(rf"{re.escape(prefix)}-(\d+)")
    parent.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in parent.iterdir() if (m := pattern.fullmatch(p.name))]
    n = max(taken, default=0) + 1
    while True:
        path = parent / f"{prefix}-{n}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another run took it meanwhile
            n += 1


def refuse_existing(paths: Iterable[Path], overwrite: bool) -> list[Path]:
    """The paths that exist: OutputExists unless overwrite, in which case they are removed now
    (outputs are appended to while a run goes, so an old file must not be there when it starts)."""
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        listed = ", ".join(str(p) for p in existing)
        raise OutputExists(f"{listed}: already there (an earlier run's results?); refusing to overwrite: "
                           "choose another output, or add --overwrite")
    for path in existing:
        if path.is_dir() and not path.is_symlink():
            raise OutputExists(f"{path}: is a directory, expected a file to write")
        path.unlink()
    return existing
