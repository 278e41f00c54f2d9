"""The layout's rules, read from the code itself (docs/architecture.md): imports point one way,
from a layer only to the layers below it; no import cycle anywhere (imports inside functions
included); no module over 500 lines, no function over 80; every package is installed.

Imports are read with `ast` from the source files, never by importing them.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOUNDATION = "foundation"

# Which layer a module is in: the first matching prefix (a module or a package).
LAYER_OF = [
    ("oss_mlx.checkpoint", FOUNDATION),
    ("oss_mlx.errors", FOUNDATION),
    ("oss_mlx.config", FOUNDATION),
    ("oss_mlx.defaults", FOUNDATION),
    ("oss_mlx.store", FOUNDATION),
    ("oss_mlx.model", "model"),
    ("oss_mlx.harmony", "harmony"),
    ("oss_mlx.engine", "engine"),
    ("oss_mlx.tools", "tools"),
    ("oss_mlx.server", "server"),
    ("oss_mlx.eval", "eval"),
    ("oss_mlx.convert", "convert"),
    ("oss_mlx.bench", "bench"),
    ("oss_mlx.cli", "cli"),
]
# What each layer may import (besides itself). The package root (`oss_mlx`: __version__ and
# load()) is a facade anyone may import; it imports the model only inside load().
BELOW = {
    FOUNDATION: set(),
    "model": {FOUNDATION},
    "harmony": {FOUNDATION},
    "engine": {FOUNDATION, "model", "harmony"},
    "tools": {FOUNDATION, "harmony", "engine"},
    "server": {FOUNDATION, "harmony", "engine", "tools"},
    "eval": {FOUNDATION, "harmony", "engine", "tools", "server"},
    "convert": {FOUNDATION},
    "bench": {FOUNDATION, "model", "harmony", "engine", "tools", "server", "eval", "convert"},
    "cli": {FOUNDATION, "model", "harmony", "engine", "tools", "server", "eval", "convert",
            "bench"},
    "root": {FOUNDATION, "model"},
}


def modules() -> dict[str, Path]:
    """Every module of the distribution by its dotted name (convert/ installs as
    oss_mlx.convert)."""
    out = {}
    for path in sorted((REPO / "oss_mlx").rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((REPO / "convert").glob("*.py")):
        name = "oss_mlx.convert" + ("" if path.stem == "__init__" else f".{path.stem}")
        out[name] = path
    return out


def layer(module: str) -> str:
    if module == "oss_mlx":
        return "root"
    for prefix, name in LAYER_OF:
        if module == prefix or module.startswith(prefix + "."):
            return name
    raise AssertionError(f"{module} is in no layer: add it to LAYER_OF")


def imports(name: str, path: Path, known: dict) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, inside functions too; `from X
    import Y` names the module X.Y when that is a module, else X."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("oss_mlx")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            if not base.startswith("oss_mlx"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in known else base, node.lineno))
    return out


def graph() -> dict[str, list[tuple[str, int]]]:
    known = modules()
    return {name: [(m, line) for m, line in imports(name, path, known) if m != name]
            for name, path in known.items()}


def test_every_module_is_in_a_layer():
    for name in modules():
        layer(name)


def test_imports_point_down():
    wrong = []
    for name, targets in graph().items():
        mine = layer(name)
        for target, line in targets:
            theirs = layer(target)
            if theirs != mine and theirs != "root" and theirs not in BELOW[mine]:
                wrong.append(f"{modules()[name].relative_to(REPO)}:{line}: {mine} imports "
                             f"{theirs} ({target})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    edges = {name: {t for t, _ in targets} for name, targets in graph().items()}
    found = cycles(edges)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def test_modules_and_functions_stay_small():
    """What a reader holds in mind: no module over 500 lines, no function over 80 (its body
    from `def` to its last line, docstring included)."""
    big = []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            big.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    big.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.name} is {n} lines")
    assert not big, "too big to read at once:\n" + "\n".join(big)


def test_every_package_is_installed():
    """pyproject's explicit package list names every package folder (a wheel would miss one
    that it does not name)."""
    text = (REPO / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(oss_mlx(?:\.\w+)*)"', text.split("[tool.setuptools]")[1]))
    folders = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert folders <= listed, f"not in pyproject's packages: {sorted(folders - listed)}"


@pytest.mark.parametrize("bad, expected", [
    ("from oss_mlx.server.app import create_app\n", "model imports server"),
    ("def f():\n    from oss_mlx.cli import main\n", "model imports cli"),
])
def test_an_upward_import_is_caught(tmp_path, monkeypatch, bad, expected):
    """The checker itself: a model module that imports upward, at module level or inside a
    function, is reported."""
    fake = tmp_path / "oss_mlx" / "model"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text(bad)
    (tmp_path / "convert").mkdir()
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    with pytest.raises(AssertionError, match=expected):
        test_imports_point_down()
