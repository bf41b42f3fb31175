"""The folders import each other one way only (docs/design.md, "Layout and conventions"), read
from every module's import statements, so a new import against the grain fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each folder's modules may import of the project: a folder imports only those below it.
MAY_IMPORT = {
    "stages": {"stages"},
    "cluster": {"cluster"},
    "pipelines": {"pipelines", "cluster", "stages"},
    "bench": {"bench", "pipelines", "cluster", "stages"},
    "tests": {"tests", "bench", "pipelines", "cluster", "stages"},
}
# tests/ is no package: a module of it is imported by its own name (as conftest is, by pytest).
TEST_MODULES = {path.stem for path in (ROOT / "tests").glob("*.py")}


def imported(path: Path) -> set[str]:
    """The top-level names of what a module imports, function-level imports included; a relative
    import stays within its own package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def project_imports(path: Path) -> set[str]:
    """The project's folders a module imports (a module of tests/ counted as ``tests``)."""
    names = imported(path)
    return (names & set(MAY_IMPORT)) | ({"tests"} if names & TEST_MODULES else set())


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(MAY_IMPORT))
def test_each_folder_imports_only_the_layers_below_it(folder):
    assert modules(folder), f"no modules in {folder}/"
    wrong = {
        str(path.relative_to(ROOT)): sorted(project_imports(path) - MAY_IMPORT[folder]) for path in modules(folder)
    }
    assert not {path: names for path, names in wrong.items() if names}, (
        f"{folder}/ may import only {sorted(MAY_IMPORT[folder])}: move the code, or pass what it needs as arguments"
    )


def test_the_rule_sees_an_import_against_the_grain(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "import cluster.budget\n\ndef f():\n    from pipelines.plan import dry_run\n"
        "    from conftest import demo_set\n    from . import sibling\n"
    )
    assert project_imports(module) == {"cluster", "pipelines", "tests"}


def test_tests_reach_bench_without_editing_sys_path():
    # pytest puts the repository root on the path (pyproject's pythonpath): a test that edits
    # sys.path itself hides which copy of a module it runs.
    editing = [
        str(path.relative_to(ROOT))
        for path in modules("tests")
        if any(
            isinstance(node, ast.Attribute)
            and node.attr == "path"
            and isinstance(node.value, ast.Name)
            and node.value.id == "sys"
            for node in ast.walk(ast.parse(path.read_text()))
        )
    ]
    assert not editing
