"""The fence around aiohttp's internals: only proxy/edge uses them, and start-up checks them."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError
from proxy.edge.internals import ASYNCIO_PRIVATE_NAMES, PRIVATE_NAMES
from proxy.preflight import require_aiohttp
from tests.support import free_port

PROXY = Path(__file__).resolve().parent.parent / "proxy"
EDGE = PROXY / "edge"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


# The private parts of the names the start-up check looks for (`_http_parser` of a module).
LISTED = {
    part
    for module, path in PRIVATE_NAMES
    for part in f"{module}.{path}".split(".")
    if _private(part)
}

# Private aiohttp names the proxy used (or uses in the edge), and aiohttp's private modules.
FENCED = sorted(
    {
        "_ErrInfo",
        "_prepare_headers",
        "_handle_request",
        "_kwargs",
        "_request_in_progress",
        "_acquired",
        "_pause_reading_for_buffer",
        "_test_decode_cert",
        "_loop",
        "_messages",
        "_waiter",
        *LISTED,
    }
)
FENCED_PATTERN = re.compile(
    r"\b(?:" + "|".join(FENCED) + r")\b|\baiohttp\._[A-Za-z]|\bweb_protocol\b|\bbase_protocol\b"
)


def test_private_aiohttp_names_stay_in_the_edge() -> None:
    """Guards the fence: aiohttp's internals used outside proxy/edge, where nothing checks
    them at start and no comment says why."""
    found = []
    for path in sorted(PROXY.rglob("*.py")):
        if EDGE in path.parents:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FENCED_PATTERN.search(line):
                found.append(f"{path.relative_to(PROXY.parent)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def _edge_sources() -> dict[str, ast.Module]:
    return {f"proxy.edge.{p.stem}": ast.parse(p.read_text()) for p in sorted(EDGE.glob("*.py"))}


def _own_names(trees: dict[str, ast.Module]) -> set[str]:
    """Private names the edge defines itself: attributes it assigns, slots, functions, classes."""
    own = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
            ):
                own.update(
                    c.value
                    for c in ast.walk(node.value)
                    if isinstance(c, ast.Constant) and isinstance(c.value, str)
                )
    return {name for name in own if _private(name)}


def _overrides(module_names: list[str]) -> set[str]:
    """Private methods edge classes define over an aiohttp base class's (aiohttp's, then)."""
    found: set[str] = set()
    for module_name in module_names:
        module = importlib.import_module(module_name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module_name:
                continue
            bases = [b for b in cls.__mro__[1:] if b.__module__.startswith("aiohttp")]
            found.update(
                name
                for name, value in vars(cls).items()
                if inspect.isfunction(value)
                and _private(name)
                and any(hasattr(base, name) for base in bases)
            )
    return found


def private_aiohttp_names_in_the_edge() -> set[str]:
    """Every private name proxy/edge takes from aiohttp: attributes it reads but does not
    define, names it imports from aiohttp, methods it overrides, aiohttp module names."""
    trees = _edge_sources()
    used = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                used.add(node.attr)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiohttp"):
                used.update(alias.name for alias in node.names if _private(alias.name))
            elif isinstance(node, ast.Constant) and re.fullmatch(
                r"aiohttp(\.\w+)*\._\w+", str(node.value)
            ):
                used.add(str(node.value).rpartition(".")[2])
    return (used - _own_names(trees)) | _overrides(list(trees))


def test_the_start_up_check_lists_every_private_name_the_edge_uses() -> None:
    """Guards the list going stale: a private aiohttp name used in the edge that the start-up
    check does not look for (or a listed one nothing uses any more)."""
    assert private_aiohttp_names_in_the_edge() == LISTED


@pytest.mark.parametrize(
    ("module_name", "path"), PRIVATE_NAMES + ASYNCIO_PRIVATE_NAMES, ids=lambda v: str(v)
)
def test_the_start_up_check_names_a_missing_private_name(
    module_name: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guards each entry of the lists (aiohttp's, and asyncio's for the TLS layer): without it,
    the proxy refuses to start, naming it, instead of serving with a name that is not there."""
    owner_path, _, leaf = path.rpartition(".")
    owner: object = importlib.import_module(module_name)
    for part in filter(None, owner_path.split(".")):
        owner = getattr(owner, part)
    monkeypatch.delattr(owner, leaf)
    with pytest.raises(ConfigError) as refused:
        require_aiohttp()
    assert f"{module_name}.{path}" in str(refused.value)


def run_without(name: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m proxy ARGS` with `name` (a class attribute in aiohttp.web_protocol) deleted."""
    owner, _, attribute = name.rpartition(".")
    code = (
        "import sys, aiohttp.web_protocol as p\n"
        f"delattr(p.{owner}, {attribute!r})\n"
        "from proxy.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_check_config_and_serve_exit_2_naming_a_missing_private_name(
    command: str, htpasswd_file: Path
) -> None:
    """Guards the start-up check's place: both commands refuse an aiohttp without a name the
    edge relies on, with one line naming it, before serving anything."""
    env = {
        "PROXY_HTPASSWD": str(htpasswd_file),
        "PROXY_LISTEN": f"127.0.0.1:{free_port()}",
        "PROXY_ADMIN_LISTEN": "",
    }
    result = run_without("RequestHandler._handle_request", command, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "aiohttp.web_protocol.RequestHandler._handle_request" in result.stderr
