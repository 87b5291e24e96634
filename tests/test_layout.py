"""Layout, checked statically (nothing is imported): every package maps its files, and the import graph of gwtf/,
models/, launch/ and benchmarks/ has no cycle and respects the layering.

The repo's models/, launch/ and benchmarks/ install as gwtf.models, gwtf.launch and gwtf.benchmarks (setup.py
package_dir), so a file's module name is its install name: models/staged.py is gwtf.models.staged.

What counts as an import (an edge of the graph), for every .py file of the four trees:
- `import a.b.c`: an edge to module a.b.c (the module named, not its parent packages);
- `from P import n`: an edge to P.n where P.n is a module (a submodule imported by name), otherwise an edge to P
  (the name comes from P itself, for a package from its `__init__`); relative imports are resolved first;
- `importlib.import_module("literal")` (and `import_module(".x", "pkg")`) with string literals: like `import`;
- wherever they stand: at the top, inside functions (a lazy import is still a dependency), inside try/except.
Python runs a package's `__init__` before any of its submodules, but that implicit step is not an edge: a package's
`__init__` that re-exports its children (`gwtf.routing` -> `gwtf.routing.base`) and a child that imports a sibling
directly (`gwtf.routing.registry` -> `gwtf.routing.base`) form no cycle. A child that takes a name from its own
package (`from gwtf.routing import Router` in gwtf/routing/p2p.py) does depend on the `__init__`, and if that
`__init__` imports the child back, it is a cycle (it works only as long as the import order happens to suit it).

Cycles: imports under `if TYPE_CHECKING:` never run, so they are left out of the cycle check; they still count for
the layering rules (a type from a layer above is a dependency on it). A cycle is reported as a chain of modules,
each edge with the file, line and statement that makes it; one shortest cycle through every module of each
strongly connected component, so every module that takes part is named at least once.

Layering: files under gwtf/ (not the folders that install into it) and under models/ never import gwtf.launch or
gwtf.benchmarks; no file (tests included) imports a top-level `models`, `launch` or `benchmarks`, names an install
does not have. Every `gwtf.*` import must resolve to a file of the repo.
"""

from __future__ import annotations

import ast
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# repo folder -> the package it installs as (setup.py: packages and package_dir)
TREES = {"gwtf": "gwtf", "models": "gwtf.models", "launch": "gwtf.launch", "benchmarks": "gwtf.benchmarks"}
TOP_LEVEL_FOLDERS = ("models", "launch", "benchmarks")
UPPER_LAYERS = ("gwtf.launch", "gwtf.benchmarks")
_SKIPPED = {"__pycache__"}


# ---------------------------------------------------------------------------------------------------------------
# The trees


def _py_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*.py") if not _SKIPPED & set(p.parts) and not any(s.startswith(".") for s in p.parts)
    )


def module_files() -> dict[str, Path]:
    """Module name (as installed) -> file, for every .py file of the four trees."""
    modules: dict[str, Path] = {}
    for folder, package in TREES.items():
        for path in _py_files(REPO / folder):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def package_folders() -> list[Path]:
    """Every folder of the four trees that holds a .py file, directly or below it: each must be a package."""
    folders: set[Path] = set()
    for folder in TREES:
        root = REPO / folder
        for path in _py_files(root):
            parent = path.parent
            while True:
                folders.add(parent)
                if parent == root:
                    break
                parent = parent.parent
    return sorted(folders)


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# ---------------------------------------------------------------------------------------------------------------
# Package maps


def files_map(doc: str) -> list[str] | None:
    """The entries of a docstring's "Files:" section (its first word per entry line), or None without one.

    The section starts at a line "Files:" (or "Files (...):") and ends at the first blank line or the first line
    indented no deeper than that header; entries are the lines at the first entry's indentation, deeper lines
    continue an entry's description."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if re.fullmatch(r"\s*Files\b.*:\s*", line):
            header_indent = len(line) - len(line.lstrip())
            entries: list[str] = []
            entry_indent = None
            for item in lines[i + 1 :]:
                indent = len(item) - len(item.lstrip())
                if not item.strip() or indent <= header_indent:
                    break
                if entry_indent is None:
                    entry_indent = indent
                if indent == entry_indent:
                    entries.append(item.split()[0])
            return entries
    return None


def map_problems(folder: Path) -> list[str]:
    init = folder / "__init__.py"
    if not init.exists():
        return [f"{rel(folder)}/ holds .py files but no __init__.py (a package needs one, with a Files: map)"]
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")), clean=False)
    if not doc:
        return [f"{rel(init)}: no docstring (it should map the package's files under 'Files:')"]
    entries = files_map(doc)
    if entries is None:
        return [f"{rel(init)}: the docstring has no 'Files:' section"]
    packages = set(package_folders())
    expected = {p.name for p in folder.glob("*.py") if p.name != "__init__.py"}
    expected |= {f"{d.name}/" for d in folder.iterdir() if d in packages}
    problems = []
    missing = sorted(expected - set(entries))
    if missing:
        problems.append(f"{rel(init)}: Files: does not list {', '.join(missing)}")
    for entry in entries:
        target = folder / entry.rstrip("/")
        exists = target.is_dir() if entry.endswith("/") else target.is_file()
        if not exists:
            kind = "folder" if entry.endswith("/") else "file"
            hint = " (write a folder as name/)" if target.is_dir() else ""
            problems.append(f"{rel(init)}: Files: lists {entry}, no such {kind} in {rel(folder)}/{hint}")
    duplicated = sorted({e for e in entries if entries.count(e) > 1})
    if duplicated:
        problems.append(f"{rel(init)}: Files: lists {', '.join(duplicated)} more than once")
    return problems


def test_every_package_maps_its_files():
    """Every package under gwtf/, models/, launch/ and benchmarks/ has an __init__.py whose docstring maps, under
    "Files:", every .py file and subpackage (as name/) it holds, and nothing that does not exist (other files the
    folder holds, such as setup.sh or scenarios/, may be listed too)."""
    problems = [p for folder in package_folders() for p in map_problems(folder)]
    assert not problems, "package maps out of date:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------------------------------------------------------
# The import graph


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    name: str  # the absolute module name the statement names (before resolving to a file)
    target: str | None  # the module of the repo it resolves to (None: not in the repo)
    path: Path
    line: int
    statement: str
    type_checking: bool  # under `if TYPE_CHECKING:`: never runs

    def where(self) -> str:
        return f"{rel(self.path)}:{self.line}  {self.statement}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module"
    )


def _absolute(module: str | None, level: int, package: str) -> str:
    """`from <level dots><module> import ...` written in `package`, as an absolute name."""
    if level == 0:
        return module or ""
    parts = package.split(".")
    base = parts[: len(parts) - (level - 1)] if level - 1 < len(parts) else []
    return ".".join([*base, *([module] if module else [])])


class _Collector(ast.NodeVisitor):
    def __init__(self, source: str, path: Path, is_package: bool, modules: dict[str, Path], text: str):
        self.source = source
        self.path = path
        self.package = source if is_package else source.rpartition(".")[0]
        self.modules = modules
        self.lines = text.splitlines()
        self.type_checking = 0
        self.found: list[Import] = []

    def _add(self, node: ast.AST, name: str, target: str | None) -> None:
        line = getattr(node, "lineno", 0)
        statement = self.lines[line - 1].strip() if 0 < line <= len(self.lines) else ""
        self.found.append(Import(self.source, name, target, self.path, line, statement, self.type_checking > 0))

    def _known(self, name: str) -> str | None:
        return name if name in self.modules else None

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.type_checking += 1
            for child in node.body:
                self.visit(child)
            self.type_checking -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name, self._known(alias.name))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _absolute(node.module, node.level, self.package)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if alias.name != "*" and sub in self.modules:
                self._add(node, sub, sub)  # a submodule imported by name
            else:
                self._add(node, base, self._known(base))

    def visit_Call(self, node: ast.Call) -> None:
        if _is_import_module(node.func) and node.args:
            args = [a.value if isinstance(a, ast.Constant) and isinstance(a.value, str) else None for a in node.args]
            if args[0] is not None:
                name = args[0]
                if name.startswith("."):
                    level = len(name) - len(name.lstrip("."))
                    anchor = args[1] if len(args) > 1 and args[1] is not None else self.package
                    name = _absolute(name.lstrip(".") or None, level, anchor)
                self._add(node, name, self._known(name))
        self.generic_visit(node)


def collect_imports(modules: dict[str, Path], extra_files: list[Path] | None = None) -> list[Import]:
    """Every import of every module of the repo (and of `extra_files`, named by their path)."""
    found: list[Import] = []
    sources = [(name, path, path.name == "__init__.py") for name, path in modules.items()]
    sources += [(rel(path), path, False) for path in extra_files or []]
    for source, path, is_package in sources:
        text = path.read_text(encoding="utf-8")
        collector = _Collector(source, path, is_package, modules, text)
        collector.visit(ast.parse(text, filename=str(path)))
        found.extend(collector.found)
    return found


def _graph(imports: list[Import]) -> dict[str, dict[str, list[Import]]]:
    graph: dict[str, dict[str, list[Import]]] = {}
    for imp in imports:
        if imp.target is not None and imp.target != imp.source and not imp.type_checking:
            graph.setdefault(imp.source, {}).setdefault(imp.target, []).append(imp)
    return graph


def _components(graph: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    nodes = sorted(set(graph) | {t for targets in graph.values() for t in targets})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    result: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, {}))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    result.append(sorted(component))
    return sorted(result)


def _shortest_cycle(graph: dict[str, dict[str, list[Import]]], start: str, members: set[str]) -> list[str]:
    """The shortest chain start -> ... -> start within one component (breadth first, alphabetical on ties)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph.get(node, {})):
            if child not in members:
                continue
            if child == start:
                chain = [node]
                while chain[-1] != start:
                    chain.append(parent[chain[-1]])
                return [*reversed(chain), start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is in a component but on no cycle")


def find_cycles(imports: list[Import]) -> list[list[str]]:
    """One shortest cycle through every module of every strongly connected component, without repeats."""
    graph = _graph(imports)
    cycles: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for component in _components(graph):
        for module in component:
            chain = _shortest_cycle(graph, module, set(component))
            ring = chain[:-1]
            key = tuple(ring[ring.index(min(ring)) :] + ring[: ring.index(min(ring))])
            if key not in seen:
                seen.add(key)
                cycles.append([*key, key[0]])
    return cycles


def describe_cycles(imports: list[Import], cycles: list[list[str]]) -> str:
    graph = _graph(imports)
    out = []
    for n, chain in enumerate(cycles, 1):
        out.append(f"cycle {n}: {' -> '.join(chain)}")
        for a, b in zip(chain, chain[1:]):
            edge = graph[a][b]
            more = f"  (+{len(edge) - 1} more)" if len(edge) > 1 else ""
            out.append(f"    {a} -> {b}: {edge[0].where()}{more}")
    return "\n".join(out)


def test_no_import_cycles():
    """No module of gwtf/, models/, launch/ or benchmarks/ reaches itself through imports (module docstring: what
    counts as an import). The message names each cycle as a chain and the statement behind every link of it."""
    imports = collect_imports(module_files())
    cycles = find_cycles(imports)
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + describe_cycles(imports, cycles)


def test_gwtf_and_models_import_no_command_or_benchmark_code():
    """The layers: files under gwtf/ (what installs from models/, launch/, benchmarks/ aside) and under models/ never
    import gwtf.launch or gwtf.benchmarks, not even lazily or for type checking."""
    modules = module_files()
    lower = {
        name
        for name, path in modules.items()
        if path.is_relative_to(REPO / "gwtf") or path.is_relative_to(REPO / "models")
    }
    bad = [
        imp
        for imp in collect_imports(modules)
        if imp.source in lower and any(imp.name == up or imp.name.startswith(up + ".") for up in UPPER_LAYERS)
    ]
    assert not bad, "gwtf/ and models/ import an upper layer:\n  " + "\n  ".join(
        f"{imp.source} -> {imp.name}: {imp.where()}" for imp in bad
    )


def test_nothing_imports_a_top_level_models_launch_or_benchmarks():
    """An install has no top-level `models`, `launch` or `benchmarks` (only gwtf.models, gwtf.launch,
    gwtf.benchmarks): an import of one works from the repo's root by accident and nowhere else."""
    extra = _py_files(REPO / "tests")
    bad = [
        imp
        for imp in collect_imports(module_files(), extra)
        if imp.name.split(".")[0] in TOP_LEVEL_FOLDERS and imp.target is None
    ]
    assert not bad, "imports of a top-level name an install does not have (use gwtf.<name>):\n  " + "\n  ".join(
        f"{imp.name}: {imp.where()}" for imp in bad
    )


def test_every_gwtf_import_resolves_to_a_file():
    """Every `gwtf.*` module a file imports exists in the repo (a module moved or removed leaves none behind)."""
    bad = [
        imp
        for imp in collect_imports(module_files())
        if (imp.name == "gwtf" or imp.name.startswith("gwtf.")) and imp.target is None
    ]
    assert not bad, "imports of gwtf modules that do not exist:\n  " + "\n  ".join(
        f"{imp.source} -> {imp.name}: {imp.where()}" for imp in bad
    )


# ---------------------------------------------------------------------------------------------------------------
# The checker itself, on made-up graphs


def _imp(source: str, target: str, type_checking: bool = False) -> Import:
    return Import(source, target, target, REPO / "x.py", 1, f"import {target}", type_checking)


def test_cycle_finder_on_made_up_graphs():
    chain = [_imp("a", "b"), _imp("b", "c"), _imp("c", "a"), _imp("c", "d")]
    assert find_cycles(chain) == [["a", "b", "c", "a"]]
    assert find_cycles([_imp("p", "p.x"), _imp("p.y", "p.x"), _imp("p", "p.y")]) == []  # __init__ re-exports
    assert find_cycles([_imp("p", "p.x"), _imp("p.x", "p")]) == [["p", "p.x", "p"]]  # a child using its __init__
    assert find_cycles([_imp("a", "b"), _imp("b", "a", type_checking=True)]) == []
    two = find_cycles([_imp("a", "b"), _imp("b", "a"), _imp("b", "c"), _imp("c", "b")])
    assert two == [["a", "b", "a"], ["b", "c", "b"]]
    assert "cycle 1: a -> b -> c -> a" in describe_cycles(chain, find_cycles(chain))


def test_import_collector_resolves_relative_and_submodule_imports(tmp_path):
    modules = {"gwtf": REPO / "g", "gwtf.pkg": REPO / "p", "gwtf.pkg.sub": REPO / "s", "gwtf.pkg.other": REPO / "o"}
    code = (
        "from . import sub, Name\n"
        "from .other import f\n"
        "from gwtf.pkg import other\n"
        "import gwtf.pkg.sub as s\n"
        "def lazy():\n"
        "    import importlib\n"
        "    importlib.import_module('gwtf.pkg.other')\n"
        "    importlib.import_module('.sub', 'gwtf.pkg')\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from gwtf.missing import X\n"
    )
    path = tmp_path / "m.py"
    path.write_text(code)
    collector = _Collector("gwtf.pkg.mod", path, False, modules, code)
    collector.visit(ast.parse(code))
    got = [(imp.name, imp.target, imp.type_checking) for imp in collector.found]
    assert got == [
        ("gwtf.pkg.sub", "gwtf.pkg.sub", False),
        ("gwtf.pkg", "gwtf.pkg", False),
        ("gwtf.pkg.other", "gwtf.pkg.other", False),
        ("gwtf.pkg.other", "gwtf.pkg.other", False),
        ("gwtf.pkg.sub", "gwtf.pkg.sub", False),
        ("importlib", None, False),
        ("gwtf.pkg.other", "gwtf.pkg.other", False),
        ("gwtf.pkg.sub", "gwtf.pkg.sub", False),
        ("typing", None, False),
        ("gwtf.missing", None, True),
    ]
    assert files_map('"""Doc.\n\nFiles (note):\n    a.py   x\n           more\n    b/     y\n\nAfter.\n"""') == [
        "a.py",
        "b/",
    ]
