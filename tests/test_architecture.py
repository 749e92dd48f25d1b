"""The layering of docs/architecture.md, checked on the source: who may import whom, and how long a function may be."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distkfac", "jobs", "launch", "hpo_worker", "study")
# What each package may never import, anywhere (the layers above it). Imports go one way: distkfac <- jobs <-
# hpo_worker <- study; launch starts and joins processes, and imports no training code at module level.
FORBIDDEN_ANYWHERE = {
    "distkfac": {"jobs", "launch", "hpo_worker", "study"},
    "jobs": {"hpo_worker", "study"},
    "hpo_worker": {"study"},
    "launch": {"hpo_worker", "study"},
    "study": set(),
}
FORBIDDEN_AT_MODULE_LEVEL = {"launch": {"jobs", "distkfac"}, "jobs": {"launch"}}
MAX_FUNCTION_LINES = 60
# Functions allowed to be longer, and why (docs/architecture.md repeats this list).
LONG_FUNCTIONS: dict[str, str] = {}


def _modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path


def _imports(tree: ast.Module) -> Iterator[tuple[str, bool]]:
    """(top-level package imported, whether the import runs when the module is imported)."""
    module_level = set()
    for node in tree.body:  # imports directly in the module, or in a top-level try/if (not `if TYPE_CHECKING:`)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in ast.walk(node) if isinstance(node, ast.Try | ast.If | ast.Import | ast.ImportFrom) else ():
            module_level.add(id(child))
    for found in ast.walk(tree):
        if isinstance(found, ast.Import):
            names = [alias.name for alias in found.names]
        elif isinstance(found, ast.ImportFrom) and found.level == 0 and found.module:
            names = [found.module]
        else:
            continue
        for name in names:
            yield name.split(".")[0], id(found) in module_level


@pytest.mark.parametrize("package,path", list(_modules()), ids=lambda v: str(v).replace(str(ROOT) + "/", ""))
def test_imports_go_one_way(package: str, path: Path) -> None:
    tree = ast.parse(path.read_text())
    wrong = sorted(
        f"{name}{' (at module level)' if at_top else ''}"
        for name, at_top in _imports(tree)
        if name in FORBIDDEN_ANYWHERE[package] or (at_top and name in FORBIDDEN_AT_MODULE_LEVEL.get(package, set()))
    )
    assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}: see docs/architecture.md for what {package} may use"


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")


def test_functions_are_short() -> None:
    long = []
    for _, path in _modules():
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for name, node in _functions(ast.parse(path.read_text())):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            if lines > MAX_FUNCTION_LINES and f"{module}.{name}" not in LONG_FUNCTIONS:
                long.append(f"{module}.{name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them, or list them in LONG_FUNCTIONS): {long}"


def test_the_import_scan_sees_where_an_import_runs() -> None:
    """The import scan finds module-level and nested imports (so that an empty result means something)."""
    source = "import torch\ntry:\n    from jobs.x import y\nexcept ImportError:\n    pass\ndef f():\n    import study\n"
    source += "if TYPE_CHECKING:\n    import distkfac\n"
    tree = ast.parse(source)
    assert sorted(_imports(tree)) == [("distkfac", False), ("jobs", True), ("study", False), ("torch", True)]
