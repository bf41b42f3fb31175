"""`make test` (the tests not marked slow) still reaches every module of the project: each module of
stages/, pipelines/ and cluster/ is named by a fast test, in the test's own body or in a fixture or
helper of its file that it uses. Read from the tests' syntax, so a module whose only test moves to
`make test-slow` fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "pipelines", "cluster")


def project_modules(root: Path) -> set[str]:
    """Dotted names of the modules of ``PACKAGES`` (a package's ``__init__`` is its registry, not code
    of its own)."""
    return {
        ".".join(path.relative_to(root).with_suffix("").parts)
        for package in PACKAGES
        for path in (root / package).rglob("*.py")
        if path.name != "__init__.py"
    }


def _imported_names(nodes) -> dict[str, str]:
    """Local name -> the dotted name it was imported as."""
    names = {}
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                local = alias.asname or alias.name.split(".")[0]
                names[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.update({alias.asname or alias.name: f"{node.module}.{alias.name}" for alias in node.names})
    return names


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


class ParsedTestFile:
    def __init__(self, path: Path, modules: set[str], conftest: ParsedTestFile | None = None):
        tree = ast.parse(path.read_text(), str(path))
        self.modules, self.conftest = modules, conftest
        self.imports = _imported_names(tree.body)
        self.functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
        self.all_slow = any(
            isinstance(node, ast.Assign)
            and any(isinstance(target, ast.Name) and target.id == "pytestmark" for target in node.targets)
            and "slow" in ast.unparse(node.value)
            for node in tree.body
        )

    def _module_of(self, dotted: str) -> str | None:
        parts = dotted.split(".")
        return next(
            (".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in self.modules), None
        )

    def _named(self, function: ast.FunctionDef) -> tuple[set[str], set[str]]:
        """The project modules a function names, and the other names it uses (calls, fixtures)."""
        imports = {**self.imports, **_imported_names(ast.walk(function))}
        modules, names = set(), {argument.arg for argument in function.args.args}
        for node in ast.walk(function):
            dotted = _dotted(node) if isinstance(node, (ast.Name, ast.Attribute)) else None
            if dotted:
                root, _, rest = dotted.partition(".")
                names.add(root)
                if root in imports and (module := self._module_of(".".join(filter(None, [imports[root], rest])))):
                    modules.add(module)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):  # "pipelines/full.py", -m x.y
                modules |= {
                    module
                    for module in self.modules
                    if module.replace(".", "/") + ".py" in node.value
                    or re.search(rf"(^|\s){re.escape(module)}(\s|$)", node.value)
                }
        return modules, names

    def reached(self, name: str, seen: set[str]) -> set[str]:
        """Modules named by ``name`` (a function of this file or of conftest) and what it uses, recursively."""
        if name in seen:
            return set()
        seen.add(name)
        if name not in self.functions:
            return self.conftest.reached(name, seen) if self.conftest else set()
        modules, names = self._named(self.functions[name])
        for used in names:
            modules |= self.reached(used, seen)
        return modules

    def fast_tests(self) -> list[str]:
        if self.all_slow:
            return []
        return [
            name
            for name, node in self.functions.items()
            if name.startswith("test_") and not any("slow" in ast.unparse(d) for d in node.decorator_list)
        ]


def unreached_modules(root: Path) -> set[str]:
    modules = project_modules(root)
    conftest_path = root / "tests" / "conftest.py"
    conftest = ParsedTestFile(conftest_path, modules) if conftest_path.exists() else None
    reached = set()
    for path in sorted((root / "tests").glob("test_*.py")):
        test_file = ParsedTestFile(path, modules, conftest)
        for name in test_file.fast_tests():
            reached |= test_file.reached(name, set())
    return modules - reached


def test_every_module_is_named_by_a_test_that_make_test_runs():
    assert not sorted(unreached_modules(ROOT)), "add a fast test for these modules, or keep one out of `slow`"


def test_the_rule_sees_a_module_whose_only_test_is_slow(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "pipelines" / "used.py").write_text("")
    (tmp_path / "pipelines" / "helped.py").write_text("")
    (tmp_path / "pipelines" / "run_by_path.py").write_text("")
    (tmp_path / "cluster" / "only_slow.py").write_text("")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "import pytest\n"
        "from pipelines import used\n"
        "from pipelines.helped import thing\n"
        "from cluster import only_slow\n\n"
        "def helper():\n    return thing()\n\n"
        "def test_fast():\n    used.go(); helper(); run(['pipelines/run_by_path.py'])\n\n"
        "@pytest.mark.slow\ndef test_slow():\n    only_slow.go()\n"
    )
    assert unreached_modules(tmp_path) == {"cluster.only_slow"}
