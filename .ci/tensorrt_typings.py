"""Make tensorrt-stubs usable by mypy: copy its .pyi files to a folder on mypy_path, repaired.

Installed as they are, the stubs check nothing. The wheel puts `tensorrt/__init__.pyi` and
`tensorrt_bindings/*.pyi` into site-packages without a `py.typed` marker, so mypy skips them and,
with ignore_missing_imports, quietly types all of TensorRT as Any. Its generated signatures also
hold syntax errors: parameters named `in` (a keyword) and required parameters after defaulted ones.
Stubs on mypy_path need no marker, so this copies them there, with those signatures repaired:
`in` becomes `in_` and a parameter after a defaulted one gets `= ...`.

    python .ci/tensorrt_typings.py .venv/typings       (run by `make venv`; pyproject's mypy_path)
"""
from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import sys
from pathlib import Path


def split_parameters(text: str) -> list[str]:
    """Top-level comma-separated parts of a parameter list (brackets may hold commas)."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[(" or -(ch in "])")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def repair_signature(line: str) -> str:
    """One `def ...:` line that does not parse -> the same signature in valid syntax."""
    line = re.sub(r"([(,] )in: ", r"\1in_: ", line)
    head, _, rest = line.partition("(")
    parameters, _, tail = rest.rpartition(")")
    defaulted, out = False, []
    for p in split_parameters(parameters):
        if "=" in p:
            defaulted = True
        elif defaulted and ":" in p and not p.strip().startswith("*"):
            p += " = ..."
        out.append(p)
    return f"{head}({','.join(out)}){tail}"


def repair(source: str, name: str) -> str:
    lines = source.split("\n")
    for i, line in enumerate(lines):
        text = line.strip()
        if text.startswith("def ") and text.endswith(":"):
            try:
                ast.parse(text + " ...")
            except SyntaxError:
                lines[i] = repair_signature(line)
    repaired = "\n".join(lines)
    ast.parse(repaired, filename=name)  # anything left unrepaired stops the build here
    return repaired


def main(out: Path) -> None:
    stubs = [f for f in importlib.metadata.files("tensorrt-stubs") or () if str(f).endswith(".pyi")]
    if not stubs:
        sys.exit("tensorrt-stubs is not installed: nothing to copy")
    shutil.rmtree(out, ignore_errors=True)
    for file in stubs:
        target = out / str(file)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(repair(Path(file.locate()).read_text(encoding="utf-8"), str(file)), encoding="utf-8")
    print(f"{len(stubs)} TensorRT stub files repaired into {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
