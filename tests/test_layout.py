"""The package's shape: imports between its parts run one way, and every part imports alone."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PROXY = Path(__file__).resolve().parent.parent / "proxy"
PACKAGES = ("edge", "auth", "throttle", "access", "relay")


def unit_of(module: str) -> str:
    """A package (`proxy.auth`) or a top-level module (`proxy.gate`) that `module` belongs to."""
    parts = module.split(".")
    return ".".join(parts[:2])


def module_names() -> list[str]:
    names = []
    for path in sorted(PROXY.rglob("*.py")):
        parts = path.relative_to(PROXY.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imports_of(module: str) -> set[str]:
    """The proxy modules that `module` imports, at any depth of its body."""
    relative = module.replace(".", "/")
    path = PROXY.parent / f"{relative}.py"
    if not path.exists():
        path = PROXY.parent / relative / "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("proxy"):
            found.add(node.module)
            # `from proxy.access import catalog` imports the module proxy.access.catalog.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("proxy"))
    known = set(module_names())
    return {name for name in found if name in known}


def test_no_two_units_import_each_other() -> None:
    """No two packages, nor a package and a top-level module, import each other."""
    edges: set[tuple[str, str]] = set()
    for module in module_names():
        for imported in imports_of(module):
            a, b = unit_of(module), unit_of(imported)
            if a != b:
                edges.add((a, b))
    mutual = sorted((a, b) for a, b in edges if (b, a) in edges and a < b)
    assert not mutual, f"units that import each other: {mutual}"


def test_the_packages_are_there() -> None:
    """`ls proxy/` shows the flow: these packages, each with a docstring naming its parts."""
    for package in PACKAGES:
        init = PROXY / package / "__init__.py"
        assert init.exists(), package
        assert ast.get_docstring(ast.parse(init.read_text())), f"{package}/__init__.py"


@pytest.mark.system
@pytest.mark.parametrize("module", [m for m in module_names() if m != "proxy.__main__"])
def test_every_module_imports_alone(module: str) -> None:
    """A fresh interpreter imports each module first: no cycle hides behind an import order."""
    subprocess.run(
        [sys.executable, "-c", f"import {module}"], check=True, cwd=PROXY.parent, timeout=60
    )
