"""The package's shape, drawn from the code with ``ast`` (docs/architecture.md): no import circles,
no import running back up the layer order, few modules at the top, short functions, few imports
hidden inside functions, old module paths kept as aliases only, and a CLI that imports no torch
before it has set MKL's reproducible mode."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from kvseg._compat import OLD_PATHS

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "kvseg"

#: Layers, low to high: a module may import its own layer and those below it, never above.
LAYERS = (
    ("kvseg.errors", "kvseg.utils", "kvseg._compat"),
    ("kvseg.layers",),
    ("kvseg.models",),
    ("kvseg.data",),
    ("kvseg.config",),
    ("kvseg.training",),
    ("kvseg.inference",),
    ("kvseg.experiments",),
    ("kvseg.cli", "kvseg.__main__", "kvseg"),
)
MAX_TOP_MODULES = 12
MAX_FUNCTION_LINES = 100
MAX_FUNCTION_IMPORTS = 50


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


#: the 0.1.0 module paths, answered by kvseg._compat's finder (no files of their own)
SHIMS = set(OLD_PATHS)


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str) -> list[tuple[str, int, bool]]:
    """``(imported kvseg module, line, inside a function)`` for every import in module ``name``
    (module level and function level)."""
    tree, path = TREES[name], MODULES[name]
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef,
                                                             ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[:len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            if target in SHIMS:  # an old path: kept by name for the test that forbids it
                out.append((target, node.lineno, id(node) in inner))
                continue
            resolved = _resolve(target) if target.startswith("kvseg") else None
            if resolved and resolved != name:
                out.append((resolved, node.lineno, id(node) in inner))
    return out


GRAPH = {name: sorted({t for t, _, _ in _imports(name) if t not in SHIMS}) for name in MODULES}


def _layer(name: str) -> int:
    best, rank = -1, None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{name}: in no layer of LAYERS (add it there)"
    return rank


def test_the_graph_is_drawn_from_the_code():
    # a known edge of each kind: module level, function level (the CLI's lazy commands)
    assert "kvseg.training.checkpoint" in GRAPH["kvseg.training.train"]
    assert "kvseg.experiments.reproduce" in GRAPH["kvseg.cli"]
    assert "kvseg.models.registry" in GRAPH["kvseg"]


def _circles(graph: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_import_circles():
    assert _circles(GRAPH) == []


def test_a_circle_would_be_found():
    """The check above can fail: one made-up import back from utils to the trainer closes a
    circle through the trainer's own imports."""
    graph = {**GRAPH, "kvseg.utils": [*GRAPH["kvseg.utils"], "kvseg.training.train"]}
    circles = _circles(graph)
    assert len(circles) == 1 and {"kvseg.utils", "kvseg.training.train"} <= set(circles[0])


def test_imports_point_down_the_layers():
    up = [f"{name}:{line} imports {target}"
          for name in MODULES
          for target, line, _ in _imports(name)
          if target not in SHIMS and _layer(target) > _layer(name)]
    assert up == []


def test_nothing_in_the_package_imports_an_old_path():
    users = [f"{name}:{line} imports {target}" for name in MODULES
             for target, line, _ in _imports(name) if target in SHIMS]
    assert users == []


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_old_paths_are_aliases_of_the_new_modules():
    import importlib

    assert len(SHIMS) >= 23
    for name, home in OLD_PATHS.items():
        old = importlib.import_module(name)
        assert old is importlib.import_module(home), name
        assert old.__name__ == home and old.__spec__.name == home, name  # the real module
        assert not (PACKAGE / f"{name.rpartition('.')[2]}.py").exists(), name
    from kvseg.checkpoint import load_run

    from kvseg.training.checkpoint import load_run as new

    assert load_run is new


def test_an_old_path_warns_with_its_new_home():
    import importlib
    import sys

    sys.modules.pop("kvseg.stats", None)  # the alias only: the real module stays loaded
    with pytest.warns(FutureWarning, match="kvseg.stats moved to kvseg.experiments.stats"):
        old = importlib.import_module("kvseg.stats")
    assert old is importlib.import_module("kvseg.experiments.stats")


def test_few_modules_at_the_top():
    top = [p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"]
    assert len(top) + 1 <= MAX_TOP_MODULES, sorted(top)  # + the front door


def test_no_long_functions():
    long = [f"{MODULES[name].relative_to(SRC)}:{f.lineno} {f.name} "
            f"({f.end_lineno - f.lineno + 1} lines)"
            for name, tree in TREES.items() for f in ast.walk(tree)
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            and f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_few_imports_inside_functions():
    inner = [(name, node.lineno) for name, tree in TREES.items()
             for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for node in ast.walk(f) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert len(inner) <= MAX_FUNCTION_IMPORTS, len(inner)


@pytest.mark.parametrize("module", ["kvseg.cli", "kvseg.utils"])
def test_modules_the_cli_loads_first_import_no_torch(module):
    """kvseg.cli sets MKL_CBWR before torch loads (MKL reads it once); importing the CLI must
    therefore not import torch, or runs stop being bit-reproducible (a retrained run differed
    in the last bits of its loss when kvseg.utils imported torch at the top)."""
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False"
