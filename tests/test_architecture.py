"""The import graph, checked from the source (``ast``; nothing is imported or executed).

Rules (issue 12, PLAN.md; issue 27): no import cycle among ``pipeline`` modules nor among
``unioncam`` modules; ``unioncam``'s modules sit on floors (:data:`LIBRARY_FLOORS`) and
import only from their own floor or below; no module imports another module's
``_private`` name; the method library ``unioncam`` imports neither the
pipeline nor its cluster/storage dependencies; no module over 500 lines; only the faces
import the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("unioncam", "pipeline")
MAX_LINES = 500
#: What the pure-PyTorch library must never import.
FORBIDDEN_IN_LIBRARY = ("ray", "zarr", "pyarrow", "fsspec", "xarray", "tqdm", "matplotlib",
                        "pipeline")  # fmt: skip
#: The library's floors, lowest first: a module imports only from its floor or below, so
#: the tensor operations never reach the model, the engine never reaches a method, and a
#: method never reaches UnionCAM. A new module must be placed here.
LIBRARY_FLOORS: tuple[tuple[str, ...], ...] = (
    ("registry", "ops", "reshape", "checkpoint", "preprocessing"),  # no project imports
    ("hooks", "models", "timm_models"),  # the model: its layers, loading it
    ("engine", "tail"),  # the model's forwards, the network after a layer
    ("cam", "metrics", "road", "sanity"),  # the gradient pass; scoring maps
    ("gradient", "region", "perturbation", "selection"),  # the methods
    ("union",),  # UnionCAM, made of the methods
    ("fusion",),  # Fusion-CAM, UnionCAM's pool fused
    ("names",),  # the method vocabulary: every registered method and UnionCAM's presets
    ("",),  # the package's face: unioncam/__init__.py
)
#: The pipeline's floors, lowest first (``pipeline.<package>``; a plain module is its own
#: entry): arrows run one way, faces -> analysis -> store -> data, and run -> store, so the
#: run and the analysis never import each other and the store's contract (layout, names,
#: status words) sits below both. A new package or top-level module must be placed here.
PIPELINE_FLOORS: tuple[tuple[str, ...], ...] = (
    ("messages", "flags"),  # one-line messages, flags from fields: no project imports
    ("data",),  # locations, manifests, decoding: bytes in
    ("store",),  # the store's contract and its I/O
    ("config",),  # the run's configuration (the report's sanity check reads it too)
    ("run", "analysis"),  # siblings: neither imports the other
    ("cli", "demo", ""),  # the faces
)
CLI = "pipeline.cli"
#: Allowed to import the CLI: the CLI itself (and the console-script entry, not a module).
CLI_IMPORTERS = {"pipeline.cli"}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    return {
        module_name(p, root): p
        for pkg in PACKAGES
        for p in sorted((root / pkg).rglob("*.py"))
    }


def _absolute(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    """The module an ``ImportFrom`` names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(source: str, current: str, is_package: bool, known: set[str]
               ) -> list[tuple[str, str | None, int]]:  # fmt: skip
    """``(module, imported name or None, line)`` for every import in ``source`` (also inside
    functions: lazy imports are still dependencies). ``from pkg import mod`` counts as an
    import of ``pkg.mod`` when that is a module."""
    out: list[tuple[str, str | None, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _absolute(node, current, is_package)
            for a in node.names:
                sub = f"{mod}.{a.name}"
                if sub in known:
                    out.append((sub, None, node.lineno))
                else:
                    out.append((mod, a.name, node.lineno))
    return out


def import_graph(root: Path = ROOT) -> dict[str, dict[str, list[tuple[str | None, int]]]]:
    """module -> imported project module -> [(name, line)]."""
    mods = project_modules(root)
    known = set(mods)
    graph: dict[str, dict[str, list[tuple[str | None, int]]]] = {}
    for name, path in mods.items():
        edges: dict[str, list[tuple[str | None, int]]] = {}
        for mod, what, line in imports_of(path.read_text(encoding="utf-8"), name,
                                          path.name == "__init__.py", known):  # fmt: skip
            if mod in known and mod != name:
                edges.setdefault(mod, []).append((what, line))
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, object]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``) or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, {})):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


GRAPH = import_graph()
MODULES = project_modules()


# ---------------------------------------------------------------------------------------
# the checks
def test_no_import_cycle_among_pipeline_modules():
    pipeline = {n: {m: e for m, e in edges.items() if m.startswith("pipeline")}
                for n, edges in GRAPH.items() if n.startswith("pipeline")}  # fmt: skip
    cycle = find_cycle(pipeline)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycle_among_library_modules():
    library = {n: {m: e for m, e in edges.items() if m.startswith("unioncam")}
               for n, edges in GRAPH.items() if n.startswith("unioncam")}  # fmt: skip
    cycle = find_cycle(library)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _floor(module: str) -> int:
    short = module.removeprefix("unioncam").removeprefix(".")
    for i, floor in enumerate(LIBRARY_FLOORS):
        if short in floor:
            return i
    raise AssertionError(f"{module} is on no floor of LIBRARY_FLOORS; place it there")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("unioncam")))
def test_library_module_imports_only_its_floor_or_below(module):
    mine = _floor(module)
    up = [f"{m} (line {edges[0][1]})" for m, edges in GRAPH[module].items()
          if m.startswith("unioncam") and _floor(m) > mine]  # fmt: skip
    assert not up, f"{module} (floor {mine}) imports from a floor above: {up}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_imported_from_another_module(module):
    bad = [f"line {line}: from {mod} import {what}"
           for mod, edges in GRAPH[module].items() for what, line in edges
           if what is not None and what.startswith("_") and not what.startswith("__")]  # fmt: skip
    assert not bad, f"{module} imports private names: {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("unioncam")))
def test_library_imports_no_pipeline_or_cluster_dependency(module):
    path = MODULES[module]
    found = [f"line {line}: {mod}" for mod, _what, line in
             imports_of(path.read_text(encoding="utf-8"), module, path.name == "__init__.py",
                        set(MODULES))
             if mod.split(".")[0] in FORBIDDEN_IN_LIBRARY]  # fmt: skip
    assert not found, f"{module} imports {found}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_at_most_700_lines(module):
    n = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines (at most {MAX_LINES}); split it by concern"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_the_cli_imports_the_cli(module):
    if module in CLI_IMPORTERS:
        return
    assert CLI not in GRAPH[module], f"{module} imports {CLI} (line {GRAPH[module][CLI][0][1]})"


def test_console_script_points_at_the_cli():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'unioncam = "pipeline.cli:main"' in text
    assert CLI in MODULES


def _pipeline_floor(module: str) -> tuple[int, str]:
    part = module.split(".")[1] if module.count(".") else ""
    for i, floor in enumerate(PIPELINE_FLOORS):
        if part in floor:
            return i, part
    raise AssertionError(f"{module} is on no floor of PIPELINE_FLOORS; place it there")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("pipeline")))
def test_pipeline_module_imports_only_its_floor_or_below(module):
    """run/ and analysis/ share a floor but not imports: each may import only itself."""
    mine, part = _pipeline_floor(module)
    bad = []
    for m, edges in GRAPH[module].items():
        if not m.startswith("pipeline"):
            continue
        theirs, other = _pipeline_floor(m)
        if theirs > mine or (theirs == mine and other != part and mine == 4):
            bad.append(f"{m} (line {edges[0][1]})")
    assert not bad, f"{module} imports upward or across: {bad}"


# ---------------------------------------------------------------------------------------
# the checker itself can fail
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")


def test_checker_finds_a_cycle_a_private_import_and_a_cli_import(tmp_path):
    _write(tmp_path, {
        "unioncam/__init__.py": "import ray\n",
        "pipeline/__init__.py": "",
        "pipeline/cli.py": "",
        "pipeline/a.py": "from pipeline.b import _helper\n",
        "pipeline/b.py": "def f():\n    from pipeline import a\n",
        "pipeline/c.py": "from . import cli\n",
    })  # fmt: skip
    graph = import_graph(tmp_path)
    assert find_cycle(graph) in (["pipeline.a", "pipeline.b", "pipeline.a"],
                                 ["pipeline.b", "pipeline.a", "pipeline.b"])  # fmt: skip
    assert graph["pipeline.a"]["pipeline.b"] == [("_helper", 1)]
    assert CLI in graph["pipeline.c"]
    lib = imports_of("import ray\n", "unioncam", True, set())
    assert lib == [("ray", None, 1)]
    _write(tmp_path, {"pipeline/b.py": "X = 1\n"})
    assert find_cycle(import_graph(tmp_path)) is None
    # the old unioncam.models <-> unioncam.timm_models cycle (a lazy import is still one)
    _write(tmp_path, {"unioncam/__init__.py": "", "unioncam/models.py":
                      "def load():\n    from unioncam.timm_models import load_timm\n",
                      "unioncam/timm_models.py": "from unioncam.models import LoadedModel\n"})
    assert find_cycle(import_graph(tmp_path)) in (
        ["unioncam.models", "unioncam.timm_models", "unioncam.models"],
        ["unioncam.timm_models", "unioncam.models", "unioncam.timm_models"])
    with pytest.raises(AssertionError, match="on no floor"):
        _floor("unioncam.newcomer")
