"""The package layout's rules (docs/architecture.md, "Import rules"), checked on the source itself.

1. The math modules import neither Ray nor the CLI, not even through what they import or inside a function,
   and they load with Ray made unimportable; no package's ``__init__`` imports anything of weight.
2. No import circle between modules, counting imports inside functions (typing-only imports excepted).
3. No function over 100 lines, no class over 250.
4. Every package the architecture page's stage table names exists.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "sqsd_ray"

MATH_MODULES = [
    "sqsd_ray.scoring.kernel",
    "sqsd_ray.scoring.hooks",
    "sqsd_ray.scoring.scorer",
    "sqsd_ray.models.directions",
    "sqsd_ray.training.objectives",
    "sqsd_ray.training.spf",
    "sqsd_ray.mitigation.restore",
    "sqsd_ray.dynamics.sensitivity",
]
FORBIDDEN_IN_MATH = ("ray", "sqsd_ray.cli", "sqsd_ray.runtime")
# The only modules that hand work to Ray (docs/architecture.md, rule 2), and only inside functions.
RAY_EDGE = {
    "sqsd_ray.runtime",
    "sqsd_ray.scoring.ray_pool",
    "sqsd_ray.training.loop",
    "sqsd_ray.evaluation.job",
    "sqsd_ray.evaluation.vllm_engine",  # generation through ray.data.llm
    "sqsd_ray.mitigation.restore_job",
    "sqsd_ray.demo.pipeline",
}


def _module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = path
    return files


def _typing_only_nodes(tree: ast.AST) -> set[int]:
    """Nodes under ``if TYPE_CHECKING:``: never executed, so they make no run-time edge."""
    return {id(node) for branch in ast.walk(tree)
            if isinstance(branch, ast.If) and getattr(branch.test, "id", None) == "TYPE_CHECKING"
            for stmt in branch.body for node in ast.walk(stmt)}


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, anywhere in the file (module level or inside functions), as absolute names."""
    tree = ast.parse(path.read_text())
    skip = _typing_only_nodes(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # ``from pkg import module``
    return found


def _graph() -> dict[str, set[str]]:
    files = _module_files()
    graph = {}
    for name, path in files.items():
        edges = set()
        for target in _imports(name, path):
            while target not in files and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in files and target not in (name, "sqsd_ray"):
                edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_circle_through_an_import_inside_a_function(tmp_path):
    """The oracle for the next test: a circle made by a function-level import is found, a typing-only one is not."""
    pkg = tmp_path / "sqsd_ray"
    pkg.mkdir()
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def x():\n    from .a import y\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\n")
    graph = {f"sqsd_ray.{p.stem}": {t for t in _imports(f"sqsd_ray.{p.stem}", p) if t.count(".") == 1}
             for p in pkg.glob("*.py")}
    graph = {k: {t for t in v if t in graph} for k, v in graph.items()}
    assert _cycles(graph) == [["sqsd_ray.a", "sqsd_ray.b"]]
    assert graph["sqsd_ray.c"] == set()


def test_no_import_circle_between_modules():
    assert _cycles(_graph()) == []


def test_math_modules_reach_neither_ray_nor_the_cli():
    """Statically: the math modules, and every sqsd_ray module they reach by any import, import no Ray or CLI."""
    files = _module_files()
    graph = _graph()
    reached, todo = set(), list(MATH_MODULES)
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(graph[name])
    offenders = {}
    for name in sorted(reached):
        bad = sorted(t for t in _imports(name, files[name])
                     if any(t == f or t.startswith(f + ".") for f in FORBIDDEN_IN_MATH))
        if bad:
            offenders[name] = bad
    assert offenders == {}, f"reached from the math modules: {sorted(reached)}"


def test_math_modules_load_with_ray_unimportable():
    code = (
        "import sys\n"
        "sys.modules['ray'] = None  # any `import ray` now raises ImportError\n"
        f"for name in {MATH_MODULES!r}:\n"
        "    __import__(name)\n"
        "assert 'sqsd_ray.cli' not in sys.modules and 'sqsd_ray.runtime' not in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def _is_ray(name: str) -> bool:
    return name == "ray" or name.startswith("ray.")


def test_ray_is_imported_only_at_the_edges_and_only_inside_functions():
    files = _module_files()
    importers = {name for name, path in files.items() if any(_is_ray(t) for t in _imports(name, path))}
    assert importers <= RAY_EDGE, f"import Ray outside the edge modules: {sorted(importers - RAY_EDGE)}"
    for name, path in files.items():
        for node in ast.parse(path.read_text()).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(_is_ray(n) for n in names), f"{name} imports Ray at module level"


def test_package_inits_import_nothing():
    """A package's ``__init__`` is its docstring: importing ``sqsd_ray.scoring`` must not pull Ray or torch in."""
    for init in PACKAGE.rglob("__init__.py"):
        tree = ast.parse(init.read_text())
        imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
        assert imports == [], f"{init.relative_to(REPO)} imports something"


@pytest.mark.parametrize("kind, limit", [("function", 100), ("class", 250)])
def test_no_function_or_class_a_reader_has_to_decode(kind, limit):
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            is_kind = isinstance(node, ast.ClassDef) if kind == "class" else isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef))
            if is_kind and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} "
                                f"({node.end_lineno - node.lineno + 1} lines)")
    assert too_long == []


def test_every_stage_in_the_architecture_table_is_a_package():
    page = (REPO / "docs" / "architecture.md").read_text()
    table = page[page.index("## Stages"):].split("\n## ")[0]
    packages = re.findall(r"\|\s*`sqsd_ray/(\w+)/`\s*\|", table)
    assert len(packages) >= 7, "the stage table names a package per stage of the paper"
    for name in packages:
        assert (PACKAGE / name / "__init__.py").is_file(), f"docs/architecture.md names sqsd_ray/{name}/"
