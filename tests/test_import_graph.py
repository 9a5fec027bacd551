"""The package's modules import each other without cycles.

A cycle hidden behind an import inside a function still ties two modules into one: neither can
be read, tested or replaced alone, and the lazy import only hides the order problem until the
day someone moves it to the top. So every import that can run counts here, wherever it is
written (module level, inside functions and methods), and the graph of the package's own modules
must be acyclic. Imports under `if TYPE_CHECKING:` never run and are left out. The modules are
the files of the design card's four folders, parsed with `ast`, not imported: the graph is what
the source says, whatever is installed.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# pyproject's package-dir: each folder installs as maskstream.<folder>.
PACKAGE_DIRS = {f"maskstream.{folder}": ROOT / folder for folder in ("pipeline", "model", "plugins", "configs")}


def modules(dirs: dict[str, Path]) -> dict[str, Path]:
    """Every module under `dirs`: dotted name -> file (a package is its __init__.py)."""
    found = {}
    for package, folder in dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of `known` that `module` imports, anywhere in its file.

    `import a.b` is an edge to a.b; `from a import n` to the module a.n when there is one, else
    to a (n is a name defined in a); relative imports are resolved against `module`."""
    edges = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            edges.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return {name for name in edges if name in known and name != module}


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of `tree` except the bodies of `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    nodes, todo = [], [tree]
    while todo:
        node = todo.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))
    return nodes


def import_graph(dirs: dict[str, Path]) -> dict[str, set[str]]:
    known = modules(dirs)
    return {module: imports_of(module, path, known) for module, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_reads_the_package():
    graph = import_graph(PACKAGE_DIRS)
    # Fixed points, so that a misread mapping cannot pass the cycle check on an empty graph.
    assert {"maskstream.model.ops.roi_align", "maskstream.pipeline.runtime.messages",
            "maskstream.plugins.roi_align.kernel", "maskstream.configs"} <= graph.keys()
    assert "maskstream.model.ops.roi_align" in graph["maskstream.model.ops"]  # from .roi_align import ...
    assert "maskstream.pipeline.runtime.messages" in graph["maskstream.pipeline.runtime.transport"]


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_lazy_relative_and_from_package_imports_are_edges_type_only_ones_not(tmp_path):
    folder = tmp_path / "pkg"
    (folder / "sub").mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "sub" / "__init__.py").write_text("from .c import VALUE\n")
    (folder / "a.py").write_text("def f():\n    from . import b\n    return b\n")
    (folder / "b.py").write_text("from pkg.sub import VALUE\n\ndef g():\n    import pkg.a\n")
    (folder / "sub" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.b\n"
                                         "else:\n    import pkg.sub\nVALUE = 1\n")
    graph = import_graph({"pkg": folder})
    assert graph == {"pkg": set(), "pkg.sub": {"pkg.sub.c"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub", "pkg.a"},
                     "pkg.sub.c": {"pkg.sub"}}  # a type-only import is no edge
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def test_no_import_cycles():
    graph = import_graph(PACKAGE_DIRS)
    cycles = []
    while (cycle := find_cycle(graph)) is not None:  # report them all, not only the first
        cycles.append(" -> ".join(cycle))
        graph[cycle[-2]].discard(cycle[-1])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_kernels_and_shared_pieces_are_leaves():
    """The Triton kernels import only their contract (besides triton and torch), and what several
    layers share sits below all of them, importing nothing of the package."""
    graph = import_graph(PACKAGE_DIRS)
    assert graph["maskstream.plugins.roi_align.kernel"] == {"maskstream.plugins.roi_align.contract"}
    assert graph["maskstream.model.ops.nms_triton"] == {"maskstream.model.ops.iou_threshold"}
    for leaf in ("maskstream.configs.codec", "maskstream.plugins.roi_align.contract",
                 "maskstream.model.ops.iou_threshold", "maskstream.plugins.tensorrt_env",
                 "maskstream.model.dataset_error"):
        assert graph[leaf] == set(), leaf
