"""The suite's own rules: shared helpers live in tests/support; WITH_WORKERS names real tests."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import WITH_WORKERS

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, as `import a.b` and `from a.b import c` name it (with
    `from tests import test_x` counted as tests.test_x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_module_of_the_suite_imports_a_test_module() -> None:
    """Guards against helpers shared by importing another test module (which also collects
    that module's tests a second time when a test function comes along): they go to
    tests/support, fixtures to tests/conftest.py."""
    offenders = {
        f"{path.relative_to(TESTS)} imports {'.'.join(module.split('.')[:2])}"
        for path in TESTS.rglob("*.py")
        for module in imported_modules(path)
        if module.startswith("tests.test_")
    }
    assert not offenders, sorted(offenders)


def test_the_rule_sees_every_form_of_import(tmp_path: Path) -> None:
    """Guards the check above against forms of import it would miss."""
    for line in [
        "from tests.test_operations import scrape",
        "import tests.test_operations",
        "from tests import test_operations",
    ]:
        path = tmp_path / "test_example.py"
        path.write_text(line + "\n")
        assert "tests.test_operations" in imported_modules(path), line


def test_every_test_run_with_workers_exists() -> None:
    """Guards WITH_WORKERS against a renamed or moved test silently no longer running twice."""
    for module, names in WITH_WORKERS.items():
        tree = ast.parse((TESTS / module).read_text())
        defined = {
            node.name
            for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        assert set(names) <= defined, (module, sorted(set(names) - defined))
