"""The layout rules import-linter does not check (docs/architecture.md), and proof that the checks bite.

- no import cycle anywhere in spotd/, type-checking imports included;
- no module named with another module's name as a prefix (controller_config beside controller);
- no two public classes with one name;
- a deliberate upward import fails `lint-imports`, and a deliberate cycle fails `import_cycles`.
"""

from __future__ import annotations

import ast
import collections
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent


def import_cycles(package: str) -> list[list[str]]:
    """Every strongly connected set of more than one module in `package` (Tarjan), sorted."""
    graph = grimp.build_graph(package, exclude_type_checking_imports=False)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in graph.modules:
                continue
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return sorted(found)


def _module_names(root: Path) -> list[str]:
    return sorted({p.stem for p in root.rglob("*.py") if p.stem != "__init__"} | {p.name for p in root.rglob("*/")})


def test_no_import_cycle() -> None:
    assert import_cycles("spotd") == []


def test_no_module_named_after_another_as_prefix() -> None:
    names = _module_names(ROOT / "spotd")
    clashes = [(a, b) for a in names for b in names if a != b and b.startswith(a + "_")]
    assert clashes == []


def test_public_class_names_are_unique() -> None:
    where: dict[str, list[str]] = collections.defaultdict(list)
    for path in sorted((ROOT / "spotd").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                where[node.name].append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}


def _copy_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "spotd", tmp_path / "spotd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _lint_imports(where: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "lint-imports"
    return subprocess.run(
        [str(exe), "--no-cache"], cwd=where, capture_output=True, text=True, env={"PYTHONPATH": str(where)}
    )


def test_contract_holds_on_this_tree(tmp_path: Path) -> None:
    result = _lint_imports(_copy_package(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:]


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    tree = _copy_package(tmp_path)
    keys = tree / "spotd" / "kube" / "keys.py"
    keys.write_text(keys.read_text() + "\nimport spotd.agent.responder  # noqa\n")
    result = _lint_imports(tree)
    assert result.returncode != 0
    assert "spotd.kube is not allowed to import spotd.agent" in result.stdout


def test_an_io_import_in_a_pure_module_breaks_the_contract(tmp_path: Path) -> None:
    tree = _copy_package(tmp_path)
    plan = tree / "spotd" / "drain" / "plan.py"
    plan.write_text(plan.read_text() + "\nimport spotd.kube.client  # noqa\n")
    result = _lint_imports(tree)
    assert result.returncode != 0
    assert "spotd.drain.plan is not allowed to import spotd.kube.client" in result.stdout


def test_a_cycle_is_found(tmp_path: Path) -> None:
    tree = _copy_package(tmp_path)
    keys = tree / "spotd" / "kube" / "keys.py"
    keys.write_text(
        keys.read_text() + "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import spotd.drain.plan\n"
    )
    script = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]);"
        "from test_layout import import_cycles; print(json.dumps(import_cycles('spotd')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tree), str(ROOT / "tests")], capture_output=True, text=True, check=True
    )
    assert '"spotd.kube.keys"' in result.stdout
    assert '"spotd.drain.plan"' in result.stdout
