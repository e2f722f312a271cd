"""Deployment files: Dockerfile, .dockerignore, the Swarm stack, Prometheus and Grafana.

No Docker engine is needed: the docker CLI validates the stack on its own, promtool checks the
Prometheus configuration and the dashboard's queries, and the image's entrypoint, healthcheck and
the registry service's command run here, outside a container, with the image's paths mapped to
temporary ones.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
import urllib.request
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from proxy.config import load_config
from proxy.host_share import worker_share
from tests.support import (
    REGISTRY_BINARY,
    Process,
    Proxy,
    Registry,
    basic_auth,
    call,
    free_port,
    http_status,
    push_blob,
    wait_until,
)

# The docker CLI, promtool, the registry and the image's scripts run on the files.
pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
STACK = DEPLOY / "stack.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "registry-proxy.json"
ALERTS = DEPLOY / "alerts.yml"
DOCUMENTED_CONFIG = "/etc/registry-proxy/proxy.yml"
ADMIN_PORT = 8081


# --- Dockerfile parsing --------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comments inside a continued instruction are dropped by the builder too
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, args = " ".join(p for p in pending if p).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


def flags(args: str) -> tuple[dict[str, str], str]:
    """`--name=value` options at the start of an instruction's arguments, and the rest."""
    options: dict[str, str] = {}
    rest = args
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        name, _, value = option[2:].partition("=")
        options[name] = value
        rest = rest.strip()
    return options, rest


def env_pairs(args: str) -> dict[str, str]:
    """`ENV a=b c=d` (the `ENV a b` legacy form too)."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def substitute(text: str, variables: dict[str, str]) -> str:
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda m: variables.get(m.group(1) or m.group(2), m.group(0)),
        text,
    )


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"no {keyword} in the stage FROM {self.base}"
        return found[-1]

    def env(self, outside: dict[str, str]) -> dict[str, str]:
        """The environment the stage's ENV instructions build on top of `outside`."""
        env = dict(outside)
        for instruction in self.all("ENV"):
            for name, value in env_pairs(instruction.args).items():
                env[name] = substitute(value, env)
        return env


@cache
def dockerfile() -> list[Stage]:
    instructions = parse_dockerfile((ROOT / "Dockerfile").read_text())
    build_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "ARG" and not stages:
            arg, _, default = instruction.args.partition("=")
            build_args[arg] = default
        elif instruction.keyword == "FROM":
            _, rest = flags(instruction.args)
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(substitute(words[0], build_args), name, []))
        else:
            assert stages, f"line {instruction.line}: {instruction.keyword} before FROM"
            stages[-1].instructions.append(instruction)
    return stages


def final_stage() -> Stage:
    return dockerfile()[-1]


# --- .dockerignore -------------------------------------------------------------------------------


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax (Go filepath.Match plus `**`) as a regular expression."""
    pattern = pattern.strip("/")
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves `path` out: the last pattern matching it or a parent
    directory decides, `!` patterns put things back in."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _ignore_regex(pattern[1:] if negated else pattern)
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


# --- PromQL --------------------------------------------------------------------------------------

_PROMQL_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_PROMQL_MATCHERS = re.compile(r"\{[^{}]*\}")
_PROMQL_RANGE = re.compile(r"\[[^\[\]]*\]")
_PROMQL_LABEL_LIST = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_GRAFANA_VARIABLE = re.compile(r"\$(?:\{[^}]*\}|\w+)")
_IDENTIFIER = re.compile(r"(?<![\w:.])[A-Za-z_:][\w:]*")
_PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, labels, keywords or variables)."""
    text = _PROMQL_STRING.sub(" ", expr)
    text = _PROMQL_MATCHERS.sub(" ", text)
    text = _PROMQL_RANGE.sub(" ", text)
    text = _PROMQL_LABEL_LIST.sub(" ", text)
    text = _GRAFANA_VARIABLE.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group()
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def exposed_series_names(exposition: str) -> set[str]:
    """Series names a Prometheus server scraping this text can be queried for. A histogram `h`
    is only `h_bucket`, `h_sum` and `h_count` (never plain `h`), with or without samples yet."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "summary":
                names |= {name, f"{name}_sum", f"{name}_count"}
            elif kind == "counter":
                names.add(name if name.endswith("_total") else f"{name}_total")
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            sample = _IDENTIFIER.match(line)
            assert sample is not None, line
            names.add(sample.group())
    return names


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels inside collapsed rows
    return panels


def dashboard_expressions() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", []) if "expr" in t]


def dashboard_metric_names() -> set[str]:
    return set().union(*(promql_metric_names(e) for e in dashboard_expressions()))


# Series Prometheus makes itself for every target rather than scraping them.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


# --- The stack as the docker CLI reads it --------------------------------------------------------


@cache
def stack(*overrides: Path, base: Path = STACK) -> dict[str, Any]:
    """`docker stack config`: the stack (with override files on top) after the CLI's own
    validation and interpolation."""
    env = {k: v for k, v in os.environ.items() if k != "PROXY_IMAGE"}
    files = [arg for path in (base, *overrides) for arg in ("-c", str(path))]
    result = subprocess.run(
        ["docker", "stack", "config", *files],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "WARN" not in result.stderr.upper(), result.stderr
    loaded: dict[str, Any] = yaml.safe_load(result.stdout)
    return loaded


def service(name: str) -> dict[str, Any]:
    services: dict[str, Any] = stack()["services"]
    assert name in services, f"no service {name!r} in {STACK}"
    found: dict[str, Any] = services[name]
    return found


def config_source(service_name: str, target: str) -> Path:
    """The file in deploy/ that the stack mounts at `target` in the service's containers."""
    for entry in service(service_name).get("configs", []):
        if entry["target"] == target:
            return Path(stack()["configs"][entry["source"]]["file"])
    raise AssertionError(f"{service_name}: nothing mounted at {target}")


def secret_path(service_name: str, source: str) -> str:
    for entry in service(service_name).get("secrets", []):
        if entry["source"] == source:
            target = entry.get("target", source)
            return str(target if target.startswith("/") else f"/run/secrets/{target}")
    raise AssertionError(f"{service_name}: no secret {source}")


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(number) * units[unit]
    return total


def proxy_settings() -> dict[str, Any]:
    """deploy/proxy.yml, the configuration the image ships and the stack mounts."""
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "proxy.yml").read_text())
    return loaded


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# --- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_and_runs_as_non_root() -> None:
    stages = dockerfile()
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", final.base), final.base
    assert build.name, "the build stage is named, for COPY --from"
    copied_from = [flags(i.args)[0].get("from") for i in final.all("COPY")]
    assert build.name in copied_from, "the final stage takes the build stage's output"
    assert not [i for i in final.all("RUN") if "pip install" in i.args], "no builds in the image"

    user = final.last("USER").args.split(":")[0]
    assert user not in ("", "0", "root"), "the final stage runs as root"
    # The user exists in the image: created in the final stage with that uid (or name).
    creations = " ".join(i.args for i in final.all("RUN") if "useradd" in i.args)
    assert f"--uid {user}" in creations or re.search(rf"\buseradd\b.*\b{user}\b", creations)
    # USER comes after every RUN: nothing later runs as root again.
    user_line = final.last("USER").line
    assert all(i.line < user_line for i in final.all("RUN"))


def test_dockerfile_installs_the_console_script_and_the_documented_config() -> None:
    final = final_stage()
    env = final.env({"PATH": "/usr/local/bin:/usr/bin:/bin"})
    assert env["PROXY_CONFIG"] == DOCUMENTED_CONFIG
    copies = [flags(i.args)[1].split() for i in final.all("COPY")]
    assert ["deploy/proxy.yml", DOCUMENTED_CONFIG] in copies
    assert final.last("ENTRYPOINT").exec_form() == ["registry-proxy"]
    assert final.last("CMD").exec_form() == ["serve"]

    # The console script comes from the build stage's virtual environment, first on PATH.
    venv_bin = env["PATH"].split(":")[0]
    venv = str(Path(venv_bin).parent)
    build = dockerfile()[0]
    assert any(f"-m venv {venv}" in i.args for i in build.all("RUN"))
    assert any(f"{venv_bin}/pip install ." in i.args for i in build.all("RUN"))
    assert [venv, venv] in [flags(i.args)[1].split() for i in final.all("COPY")]

    # Both listeners of the shipped configuration are EXPOSEd.
    exposed = {int(p.split("/")[0]) for i in final.all("EXPOSE") for p in i.args.split()}
    settings = proxy_settings()
    assert {port_of(settings["listen"]), port_of(settings["admin_listen"])} <= exposed


def test_dockerfile_healthcheck_needs_nothing_but_python() -> None:
    final = final_stage()
    options, rest = flags(final.last("HEALTHCHECK").args)
    assert {"interval", "timeout", "retries"} <= set(options)
    assert rest.startswith("CMD ")
    command = Instruction("CMD", rest[4:], 0).exec_form()
    assert command is not None, "exec form: no shell needed"
    # `python` is on PATH in the final stage: the base image's and the virtual environment's.
    assert command[0] == "python" and final.base.startswith("python:")
    assert f"http://127.0.0.1:{ADMIN_PORT}/healthz" in command[-1]
    assert port_of(proxy_settings()["admin_listen"]) == ADMIN_PORT
    # The stack's healthcheck is the same command.
    assert service("proxy")["healthcheck"]["test"] == ["CMD", *command]


def test_constraints_pin_every_runtime_dependency() -> None:
    """Guards reproducible images: every dependency in pyproject.toml has an exact pin in
    constraints.txt (which the Dockerfile installs with) that its requirement accepts."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.partition(";")[0].split("==")
            pins[canonicalize_name(name)] = version.strip()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dependency in project["dependencies"]:
        requirement = Requirement(dependency)
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned, f"{requirement.name} is not in constraints.txt (run scripts/pin-deps)"
        assert requirement.specifier.contains(pinned), f"{dependency} refuses the pin {pinned}"
    build = dockerfile()[0]
    assert any("pip install . --constraint constraints.txt" in i.args for i in build.all("RUN"))
    # The version label's default is the package's version.
    args = dict(i.args.split("=", 1) for i in final_stage().all("ARG") if "=" in i.args)
    assert args["VERSION"] == project["version"]


def test_dockerignore_sends_only_what_the_image_needs() -> None:
    patterns = dockerignore_patterns()
    needed: list[str] = []
    for stage in dockerfile():
        for copy in stage.all("COPY"):
            options, rest = flags(copy.args)
            if "from" not in options:
                needed.extend(s.rstrip("/") for s in rest.split()[:-1])
    pyproject = (ROOT / "pyproject.toml").read_text()
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', pyproject, re.MULTILINE)
    assert readme and readme.group(1) in needed, "pyproject's readme is needed to build"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for source in needed:
        inside = [f for f in files if f == source or f.startswith(source + "/")]
        assert inside, f"COPY {source}: nothing in the repository"
        for path in inside:
            assert not dockerignore_excludes(path, patterns), f"{path} is needed but ignored"
    for path in [
        ".git/HEAD",
        ".venv/bin/python",
        "tests/conftest.py",
        "bench/run",
        "deploy/stack.yml",
        "proxy/__pycache__/app.cpython-311.pyc",
        "htpasswd",
        "secrets/tls.key",
    ]:
        assert dockerignore_excludes(path, patterns), f"{path} would be sent to the builder"


def test_dockerignore_matcher_follows_docker_semantics() -> None:
    patterns = ["*", "!proxy/", "!deploy/proxy.yml", "**/__pycache__"]
    assert dockerignore_excludes("README.md", patterns)
    assert not dockerignore_excludes("proxy/app.py", patterns)
    assert dockerignore_excludes("proxy/__pycache__/app.pyc", patterns)
    assert dockerignore_excludes("deploy/stack.yml", patterns)
    assert not dockerignore_excludes("deploy/proxy.yml", patterns)


# --- The image's entrypoint and healthcheck, outside a container ---------------------------------


def image_environment(config: Path) -> dict[str, str]:
    """The final stage's environment with the image's paths mapped to this checkout: the
    virtual environment to the one running the tests, the documented config path to `config`."""
    outside = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env = final_stage().env({**outside, "PATH": outside.get("PATH", "/usr/bin:/bin")})
    venv_bin = env["PATH"].split(":")[0]
    env["PATH"] = env["PATH"].replace(venv_bin, str(Path(sys.executable).parent), 1)
    assert env["PROXY_CONFIG"] == DOCUMENTED_CONFIG
    env["PROXY_CONFIG"] = str(config)
    return env


def run_healthcheck(env: dict[str, str], admin: str) -> int:
    _, rest = flags(final_stage().last("HEALTHCHECK").args)
    command = Instruction("CMD", rest[4:], 0).exec_form()
    assert command is not None
    command = [c.replace(f"127.0.0.1:{ADMIN_PORT}", admin) for c in command]
    executable = shutil.which(command[0], path=env["PATH"])
    assert executable, f"{command[0]} is not on the image's PATH"
    return subprocess.run([executable, *command[1:]], env=env, capture_output=True).returncode


def test_entrypoint_serves_from_the_documented_config_path(
    registry: Registry, htpasswd_file: Path, users: dict[str, str], tmp_path: Path
) -> None:
    # The image's /etc/registry-proxy/proxy.yml, under a temporary root.
    config = tmp_path / DOCUMENTED_CONFIG.lstrip("/")
    config.parent.mkdir(parents=True)
    shutil.copy(DEPLOY / "proxy.yml", config)
    env = image_environment(config)
    final = final_stage()
    entrypoint = final.last("ENTRYPOINT").exec_form()
    cmd = final.last("CMD").exec_form()
    assert entrypoint and cmd
    executable = shutil.which(entrypoint[0], path=env["PATH"])
    assert executable, f"{entrypoint[0]} is not on the image's PATH"

    # check-config reads the file PROXY_CONFIG names: its container settings show through.
    env["PROXY_HTPASSWD"] = str(htpasswd_file)
    checked = subprocess.run(
        [executable, *entrypoint[1:], "check-config"], env=env, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    effective = yaml.safe_load(checked.stdout)
    settings = proxy_settings()
    for key in ("listen", "upstream", "admin_listen", "realm", "shutdown_timeout"):
        assert effective[key] == settings[key], key
    assert settings["admin_listen"] == f"0.0.0.0:{ADMIN_PORT}", "Prometheus scrapes it over overlay"
    assert settings["htpasswd"] == secret_path("proxy", "htpasswd")

    # ENTRYPOINT + CMD serve; only the addresses of this machine are overridden.
    port, admin_port = free_port(), free_port()
    admin = f"127.0.0.1:{admin_port}"
    env.update(
        PROXY_LISTEN=f"127.0.0.1:{port}",
        PROXY_ADMIN_LISTEN=admin,
        PROXY_UPSTREAM=registry.url,
    )
    process = Process([executable, *entrypoint[1:], *cmd], tmp_path / "proxy.log", env=env)
    process.start()
    try:
        assert process.popen is not None
        popen = process.popen

        def healthy() -> bool:
            assert popen.poll() is None, process.log()
            return run_healthcheck(env, admin) == 0

        wait_until(healthy, "the image's HEALTHCHECK to pass")
        auth = basic_auth("alice", users["alice"])
        assert http_status(f"http://127.0.0.1:{port}/v2/", auth) == 200
        assert http_status(f"http://127.0.0.1:{port}/v2/") == 401
        assert http_status(f"http://{admin}/metrics") == 200
        assert http_status(f"http://{admin}/readyz") == 200

        process.signal(signal.SIGTERM)
        assert process.wait(timeout=settings["shutdown_timeout"] + 5) == 0, process.log()
        assert run_healthcheck(env, admin) != 0, "the healthcheck fails once the proxy is gone"
    finally:
        process.stop()


# --- The Swarm stack -----------------------------------------------------------------------------


def test_stack_config_validates() -> None:
    assert set(stack()["services"]) == {"registry", "proxy", "prometheus", "grafana"}


def test_an_edge_task_uses_the_nodes_cores() -> None:
    """One task per edge node (host mode): one process would use one core of it (issue 12)."""
    environment = service("proxy")["environment"]
    assert environment["PROXY_WORKERS"] == "auto"
    assert load_config(None, {**environment, "PROXY_HTPASSWD": "x"}).workers >= 1


def test_the_commented_redis_service_works_once_uncommented(tmp_path: Path) -> None:
    """The optional shared store: uncommenting its lines gives a valid stack in which the
    proxy names the redis service, on a network they share, and publishes nothing more."""
    text = STACK.read_text()
    block = re.compile(r"^  # redis:\n(?:  #.*\n)+", re.MULTILINE)
    assert block.search(text), "no commented redis service in the stack"
    text = block.sub(lambda found: re.sub(r"^  # ?", "  ", found.group(0), flags=re.M), text)
    text = text.replace("# PROXY_SHARED_STATE:", "PROXY_SHARED_STATE:")
    uncommented = tmp_path / "stack.yml"
    uncommented.write_text(text)
    services = stack(base=uncommented)["services"]
    url = services["proxy"]["environment"]["PROXY_SHARED_STATE"]
    assert url == "redis://redis:6379/0"
    assert load_config(None, {"PROXY_SHARED_STATE": url, "PROXY_HTPASSWD": "x"}).shared_state
    assert set(services["redis"]["networks"]) & set(services["proxy"]["networks"])
    assert "ports" not in services["redis"]


def published_ports(services: dict[str, Any]) -> dict[str, tuple[int, int, str | None]]:
    published = {}
    for name, spec in services.items():
        for port in spec.get("ports", []):
            published[name] = (int(port["published"]), int(port["target"]), port.get("mode"))
    return published


def test_only_the_public_port_and_the_registry_port_are_published() -> None:
    """The proxy's 443 in host mode keeps client addresses (the ingress mesh replaces them)."""
    assert published_ports(stack()["services"]) == {
        "proxy": (443, port_of(proxy_settings()["listen"]), "host"),
        "registry": (5000, 5000, "ingress"),
    }


def test_ingress_variant_changes_only_the_proxy_publishing() -> None:
    """deploy/stack-ingress.yml on top: ingress port, replicas, start-first, and the per-client
    connection cap lifted (every client comes from the ingress address); nothing else."""
    override = DEPLOY / "stack-ingress.yml"
    merged, base = stack(override)["services"], stack()["services"]
    assert published_ports(merged)["proxy"] == (443, port_of(proxy_settings()["listen"]), "ingress")
    deploy = merged["proxy"]["deploy"]
    assert deploy["mode"] == "replicated" and deploy["replicas"] >= 2
    assert deploy["update_config"]["order"] == "start-first"
    assert deploy["rollback_config"]["order"] == "start-first"
    assert {k: v for k, v in merged.items() if k != "proxy"} == {
        k: v for k, v in base.items() if k != "proxy"
    }
    environment = merged["proxy"]["environment"]
    # Per host: each worker of a node of up to 16 cores still gets all of max_connections.
    cap = int(environment.pop("PROXY_MAX_CONNECTIONS_PER_CLIENT"))
    assert worker_share(cap, 16) >= int(proxy_settings().get("max_connections", 4096))
    assert environment == base["proxy"]["environment"]
    unchanged = {"ports", "deploy"}
    assert {k: v for k, v in merged["proxy"].items() if k not in unchanged} == {
        k: v for k, v in base["proxy"].items() if k not in unchanged
    }


def test_images_are_pinned() -> None:
    for name, spec in stack()["services"].items():
        image = spec["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag and tag not in ("", "latest"), f"{name}: {image}"
    assert re.fullmatch(r"registry:\d+\.\d+\.\d+", service("registry")["image"])


def test_declared_networks_secrets_volumes_and_configs() -> None:
    declared = stack()
    for name, spec in declared["services"].items():
        for network in spec.get("networks", {}):
            assert network in declared["networks"], f"{name}: network {network}"
        for secret in spec.get("secrets", []):
            assert secret["source"] in declared["secrets"], f"{name}: secret {secret}"
        for config in spec.get("configs", []):
            assert config["source"] in declared["configs"], f"{name}: config {config}"
        for volume in spec.get("volumes", []):
            assert volume["type"] == "volume" and volume["source"] in declared["volumes"]
    for secret in declared["secrets"].values():
        assert secret.get("external") is True, "secrets are created by hand, never files here"
    for config in declared["configs"].values():
        path = Path(config["file"])
        assert path.is_file() and path.is_relative_to(DEPLOY), path
    for network in declared["networks"].values():
        assert network["driver"] == "overlay"


def test_registry_service() -> None:
    registry = service("registry")
    assert {"type": "volume", "source": "registry_data", "target": "/var/lib/registry"} in (
        registry["volumes"]
    )
    constraints = registry["deploy"]["placement"]["constraints"]
    assert any(c.replace(" ", "") == "node.labels.registry==true" for c in constraints)
    # A local volume: a second task beside the old one would be a second writer (or, on another
    # labelled node, a registry on an empty volume).
    assert registry["deploy"]["replicas"] == 1
    assert registry["deploy"]["update_config"]["order"] == "stop-first"
    assert registry["deploy"]["rollback_config"]["order"] == "stop-first"
    # The shared http.secret comes from a Swarm secret, never from a file in the repository.
    script = " ".join(registry["command"])
    assert secret_path("registry", "registry_http_secret") in script
    assert "REGISTRY_HTTP_SECRET" in script
    assert not any(k.startswith("REGISTRY_HTTP_HOST") for k in registry.get("environment", {}))

    config = yaml.safe_load(config_source("registry", "/etc/distribution/config.yml").read_text())
    http = config["http"]
    assert "host" not in http, "with http.host the 127.0.0.1:5000 path gets wrong Locations"
    assert "secret" not in http
    assert port_of(http["addr"]) == 5000
    assert port_of(http["debug"]["addr"]) == 5001
    assert http["debug"]["prometheus"] == {"enabled": True, "path": "/metrics"}
    assert config["storage"]["filesystem"]["rootdirectory"] == "/var/lib/registry"

    # The S3 example differs only in its storage.
    s3 = yaml.safe_load((DEPLOY / "registry-s3.yml").read_text())
    assert "s3" in s3["storage"] and "filesystem" not in s3["storage"]
    assert {k: v for k, v in s3.items() if k != "storage"} == {
        k: v for k, v in config.items() if k != "storage"
    }


def test_registry_command_and_config_run_the_real_registry(tmp_path: Path) -> None:
    """The registry service's command with Debian's registry binary: the config loads, the
    secret is read, /v2/ and the debug listener's /metrics answer."""
    registry = service("registry")
    entrypoint, script = registry["entrypoint"], registry["command"]
    assert entrypoint == ["/bin/sh", "-c"] and len(script) == 1
    secret = tmp_path / "registry_http_secret"
    secret.write_text("a-shared-secret-of-the-replicas\n")
    config = tmp_path / "config.yml"
    shutil.copy(config_source("registry", "/etc/distribution/config.yml"), config)
    command = (
        script[0]
        .replace(secret_path("registry", "registry_http_secret"), str(secret))
        .replace("/etc/distribution/config.yml", str(config))
        .replace("/bin/registry", REGISTRY_BINARY)
    )
    port, debug_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env.update(registry.get("environment", {}))
    env.update(
        REGISTRY_HTTP_ADDR=f"127.0.0.1:{port}",
        REGISTRY_HTTP_DEBUG_ADDR=f"127.0.0.1:{debug_port}",
        REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY=str(tmp_path / "data"),
    )
    process = Process(["/bin/sh", "-c", command], tmp_path / "registry.log", env=env)
    process.start()
    try:
        assert process.popen is not None
        popen = process.popen

        def answers() -> bool:
            assert popen.poll() is None, f"the registry exited:\n{process.log()}"
            return http_status(f"http://127.0.0.1:{port}/v2/") == 200

        wait_until(answers, "the registry")
        with urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/metrics", timeout=5) as r:
            assert r.status == 200
            assert b"# TYPE " in r.read()
        assert "No HTTP secret provided" not in process.log(), process.log()
    finally:
        process.stop()


def test_proxy_service() -> None:
    proxy = service("proxy")
    deploy = proxy["deploy"]
    # One task per edge node: a host port binds once per node.
    assert deploy["mode"] == "global" and "replicas" not in deploy
    constraints = deploy["placement"]["constraints"]
    assert [c.replace(" ", "") for c in constraints] == ["node.labels.edge==true"]
    # start-first could not bind the host port beside the old task.
    assert deploy["update_config"]["order"] == "stop-first"
    assert deploy["rollback_config"]["order"] == "stop-first"
    assert deploy["update_config"]["parallelism"] == 1
    shutdown_timeout = float(proxy_settings()["shutdown_timeout"])
    assert seconds(proxy["stop_grace_period"]) >= shutdown_timeout + 10
    assert "PROXY_SHUTDOWN_TIMEOUT" not in proxy.get("environment", {})

    assert config_source("proxy", DOCUMENTED_CONFIG) == DEPLOY / "proxy.yml"
    settings = proxy_settings()
    assert settings["htpasswd"] == secret_path("proxy", "htpasswd")
    assert settings["upstream"] == "http://registry:5000"
    environment = proxy["environment"]
    assert environment["PROXY_TLS_CERT"] == secret_path("proxy", "tls_cert")
    assert environment["PROXY_TLS_KEY"] == secret_path("proxy", "tls_key")
    # Key and user list readable by the proxy's user only.
    uid = final_stage().last("USER").args.split(":")[0]
    for name in ("htpasswd", "tls_key"):
        (entry,) = [s for s in proxy["secrets"] if s["source"] == name]
        assert entry["uid"] == uid and entry["mode"] == 0o400, entry
    healthcheck = proxy["healthcheck"]
    assert {"interval", "timeout", "retries"} <= set(healthcheck)


def test_the_stack_turns_the_browser_on_with_its_key_from_a_secret() -> None:
    """Guards the browser off in the stack, or its session key in a file of the repository, one
    other users could read, or a secret the Swarm guide never says to create."""
    proxy = service("proxy")
    environment = proxy["environment"]
    key_file = secret_path("proxy", "ui_session_key")
    assert environment["PROXY_UI_SESSION_KEY_FILE"] == key_file
    config = load_config(None, {**environment, "PROXY_HTPASSWD": "x"})
    assert config.ui and str(config.ui_session_key_file) == key_file
    uid = final_stage().last("USER").args.split(":")[0]
    (entry,) = [s for s in proxy["secrets"] if s["source"] == "ui_session_key"]
    assert entry["uid"] == uid and entry["mode"] == 0o400, entry
    secret = stack()["secrets"]["ui_session_key"]
    assert secret["external"] is True
    assert f"docker secret create {secret['name']}" in (ROOT / "docs" / "swarm.md").read_text()


def test_stack_networks_connect_what_talks() -> None:
    def networks(name: str) -> set[str]:
        return set(service(name).get("networks", {}))

    assert networks("proxy") & networks("registry"), "proxy -> registry:5000"
    assert networks("prometheus") & networks("proxy"), "prometheus -> tasks.proxy"
    assert networks("prometheus") & networks("registry"), "prometheus -> tasks.registry"
    assert networks("grafana") & networks("prometheus"), "grafana -> prometheus"


# --- Prometheus ----------------------------------------------------------------------------------


def test_promtool_accepts_the_prometheus_config() -> None:
    path = config_source("prometheus", "/etc/prometheus/prometheus.yml")
    assert path == DEPLOY / "prometheus.yml"
    result = subprocess.run(
        ["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_discovers_every_proxy_task_and_the_registry() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    discovered = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                discovered[name] = (sd["type"], sd["port"], job.get("metrics_path", "/metrics"))
    admin_port = port_of(proxy_settings()["admin_listen"])
    assert discovered["tasks.proxy"] == ("A", admin_port, "/metrics")
    registry_config = yaml.safe_load((DEPLOY / "registry.yml").read_text())
    debug = registry_config["http"]["debug"]
    assert discovered["tasks.registry"] == (
        "A",
        port_of(debug["addr"]),
        debug["prometheus"]["path"],
    )
    for name in discovered:
        assert name.removeprefix("tasks.") in stack()["services"]


# --- Grafana -------------------------------------------------------------------------------------


def test_grafana_provisioning_points_at_the_stack() -> None:
    datasources = yaml.safe_load(
        config_source("grafana", "/etc/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        config_source(
            "grafana", "/etc/grafana/provisioning/dashboards/registry-proxy.yml"
        ).read_text()
    )
    (provider,) = providers["providers"]
    folder = provider["options"]["path"]
    assert config_source("grafana", f"{folder}/registry-proxy.json") == DASHBOARD

    board = dashboard()
    assert board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == source["uid"]
    for panel in dashboard_panels():
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    names = dashboard_metric_names()
    for wanted in [
        "registry_proxy_requests_total",
        "registry_proxy_request_duration_seconds_bucket",
        "registry_proxy_sent_bytes_total",
        "registry_proxy_received_bytes_total",
        "registry_proxy_auth_total",
        "registry_proxy_requests_in_flight",
        "registry_proxy_upstream_errors_total",
    ]:
        assert wanted in names
    expressions = " ".join(dashboard_expressions())
    assert "by (action)" in expressions and "by (status_class)" in expressions
    assert "by (code)" in expressions and "by (reason)" in expressions
    for wanted in [
        "registry_proxy_refusals_total",
        "registry_proxy_upstream_time_to_headers_seconds_bucket",
        "registry_proxy_upstream_connections_in_use",
        "registry_proxy_tls_certificate_expiry_timestamp_seconds",
        "registry_proxy_config_reloads_total",
        # The registry's own: storage action latency and HTTP by handler.
        "registry_storage_action_seconds_bucket",
        "registry_http_requests_total",
        "up",
    ]:
        assert wanted in names, wanted
    assert "by (handler, code)" in expressions
    assert "throttled" in expressions
    titles = " ".join(p["title"].lower() for p in dashboard_panels())
    for word in ["action", "status", "latency", "throughput", "auth", "throttl", "in-flight"]:
        assert word in titles, word
    assert "upstream errors" in titles


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every query (Grafana's variables replaced by what they expand to)."""
    rules = []
    for number, expr in enumerate(dashboard_expressions()):
        concrete = (
            expr.replace("$__rate_interval", "1m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h")
            .replace("$instance", ".*")
        )
        assert "$" not in concrete, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{number}", "expr": concrete})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promql_metric_names_are_parsed_robustly() -> None:
    assert promql_metric_names(
        'histogram_quantile(0.95, sum by (le, action) (rate(foo_seconds_bucket{a="b",'
        'c=~"x|y"}[$__rate_interval])))'
    ) == {"foo_seconds_bucket"}
    assert promql_metric_names(
        "sum(rate(a_total[5m] offset 1h)) by (job) / on(instance) group_left(version) "
        "b_info * 1e3 > bool 0.5 and c unless d:recorded"
    ) == {"a_total", "b_info", "c", "d:recorded"}
    assert promql_metric_names('count_values("version", x) or vector(0) - time()') == {"x"}
    assert promql_metric_names('label_replace(up, "dst", "$1", "instance", "(.*):.*")') == {"up"}
    assert promql_metric_names("max_over_time(g{job='x'}[${__range}])") == {"g"}


def test_exposed_series_names_follow_the_metric_types() -> None:
    exposition = "\n".join(
        [
            "# TYPE h_seconds histogram",
            "# TYPE c_total counter",
            "# TYPE g gauge",
            "g 1",
            "# TYPE s summary",
        ]
    )
    assert exposed_series_names(exposition) == {
        "h_seconds_bucket",
        "h_seconds_sum",
        "h_seconds_count",
        "c_total",
        "g",
        "s",
        "s_sum",
        "s_count",
    }


def alert_expressions() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def registry_exposition(tmp_path: Path) -> str:
    """The real registry's debug /metrics after a push and a pull (its histograms and counters
    appear only once something was observed)."""
    port, debug_port = free_port(), free_port()
    config = tmp_path / "registry-metrics.yml"
    config.write_text(
        f"""version: 0.1
storage:
  filesystem:
    rootdirectory: {tmp_path / "registry-data"}
http:
  addr: 127.0.0.1:{port}
  debug:
    addr: 127.0.0.1:{debug_port}
    prometheus: {{enabled: true, path: /metrics}}
"""
    )
    process = Process([REGISTRY_BINARY, "serve", str(config)], tmp_path / "registry-metrics.log")
    process.start()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_status(base + "/v2/") == 200, "the registry")
        digest = push_blob(base, "metrics/probe", b"probe")
        assert call(f"{base}/v2/metrics/probe/blobs/{digest}")[0] == 200
        assert call(f"{base}/v2/metrics/probe/manifests/v1")[0] == 404
        status, _, body = call(f"http://127.0.0.1:{debug_port}/metrics")
        assert status == 200
        return body.decode()
    finally:
        process.stop()


def test_dashboard_and_alert_metrics_are_exported_by_the_proxy_or_the_registry(
    proxy: Proxy, tmp_path: Path
) -> None:
    """Every name a dashboard query or an alert selects is one a running proxy or registry
    exports (or Prometheus makes itself); a renamed metric would leave an empty panel."""
    with urllib.request.urlopen(proxy.admin_url + "/metrics", timeout=10) as response:
        exposition = response.read().decode()
    exported = exposed_series_names(exposition) | exposed_series_names(
        registry_exposition(tmp_path)
    )
    queried = dashboard_metric_names()
    assert queried, "no metric names found in the dashboard"
    unknown = sorted(queried - exported - PROMETHEUS_SERIES)
    assert not unknown, f"the dashboard queries metrics nobody exports: {unknown}"
    alerted = set().union(*(promql_metric_names(e) for e in alert_expressions()))
    unknown = sorted(alerted - exported - PROMETHEUS_SERIES)
    assert not unknown, f"the alerts query metrics nobody exports: {unknown}"
    # Prometheus's own per-target series only for jobs that exist.
    jobs = {
        j["job_name"]
        for j in yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    }
    for expr in dashboard_expressions():
        if promql_metric_names(expr) & PROMETHEUS_SERIES:
            for job in re.findall(r'job="([^"]*)"', expr):
                assert job in jobs, expr


# --- The Swarm runbooks (docs/swarm.md) against the stack -----------------------------------------

SWARM_DOC = ROOT / "docs" / "swarm.md"


def swarm_doc_section(title: str) -> str:
    text = SWARM_DOC.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def shell_lines(section: str) -> list[str]:
    """The commands of the section's ```sh blocks, comments dropped."""
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def stack_name() -> str:
    names: set[str] = set(
        re.findall(
            r"docker stack deploy -c deploy/stack\.yml (?:-c \S+ )?(\w+)", SWARM_DOC.read_text()
        )
    )
    assert len(names) == 1, names
    return names.pop()


def test_gc_runbook_names_the_stacks_registry_service_and_config() -> None:
    """The runbook's service names and config path are the ones the stack creates."""
    commands = shell_lines(swarm_doc_section("Garbage collection"))
    service_name = f"{stack_name()}_registry"
    assert "registry" in stack()["services"]
    updates = [c for c in commands if c.startswith("docker service update")]
    assert len(updates) == 2 and all(shlex.split(c)[-1] == service_name for c in updates)
    assert "--env-add REGISTRY_STORAGE_MAINTENANCE_READONLY=" in updates[0]
    assert "--env-rm REGISTRY_STORAGE_MAINTENANCE_READONLY" in updates[1]
    collects = [c for c in commands if "garbage-collect" in c]
    assert collects
    config_path = "/etc/distribution/config.yml"
    config_source("registry", config_path)  # mounted there
    for command in collects:
        assert f"label=com.docker.swarm.service.name={service_name}" in command
        assert shlex.split(command)[-1] == config_path
    # The order: read-only first, collect, then writable again.
    assert commands.index(updates[0]) < commands.index(collects[0])
    assert commands.index(collects[-1]) < commands.index(updates[1])


def test_gc_runbook_works_on_the_real_registry(tmp_path: Path) -> None:
    """The runbook's maintenance variable makes the real registry refuse writes while pulls go
    on, and its garbage-collect command line collects in that state."""
    commands = shell_lines(swarm_doc_section("Garbage collection"))
    add = next(c for c in commands if "--env-add" in c)
    words = shlex.split(add)
    name, _, value = words[words.index("--env-add") + 1].partition("=")
    registry = Registry(tmp_path / "registry")
    registry.start()
    blob = os.urandom(4096)
    digest = push_blob(registry.url, "gc/orphan", blob)
    registry.stop()

    registry.env[name] = value
    registry.start()
    try:
        assert call(f"{registry.url}/v2/gc/other/blobs/uploads/", "POST")[0] == 405
        status, _, body = call(f"{registry.url}/v2/gc/orphan/blobs/{digest}")
        assert status == 200 and body == blob
        stored = tmp_path / "registry" / "data" / "docker/registry/v2/blobs/sha256"
        data = stored / digest[7:9] / digest[7:] / "data"
        assert data.is_file()
        for command in (c for c in commands if "garbage-collect" in c):
            arguments = shlex.split(command)
            gc = arguments[arguments.index("garbage-collect") :]
            gc[-1] = str(tmp_path / "registry" / "config.yml")
            result = subprocess.run(
                [REGISTRY_BINARY, *gc], capture_output=True, text=True, timeout=60
            )
            assert result.returncode == 0, result.stdout + result.stderr
        assert not data.exists(), "the unreferenced blob was collected"
    finally:
        registry.stop()
    del registry.env[name]
    registry.start()
    try:
        assert call(f"{registry.url}/v2/gc/other/blobs/uploads/", "POST")[0] == 202
    finally:
        registry.stop()


def iptables_rules(text: str) -> list[str]:
    return re.findall(r"iptables -[IDA] DOCKER-USER ([^\n`]*)", text)


def test_port_5000_rule_covers_every_forwarded_path_and_the_unit_matches() -> None:
    """The DROP rule is not limited to one input interface, and the boot unit adds the same."""
    section = swarm_doc_section("The registry's own port")
    rules = iptables_rules(section)
    drops = {rule for rule in rules if rule.endswith("-j DROP")}
    assert len(drops) == 1, drops
    (drop,) = drops
    assert "-i " not in drop and "-o docker_gwbridge" in drop
    assert "--ctorigdstport 5000 --ctdir ORIGINAL" in drop
    unit = re.search(r"```ini\n(.*?)```", section, re.DOTALL)
    assert unit is not None
    assert sorted(iptables_rules(unit.group(1))) == [drop, drop]


# --- Alerts and stack hygiene ---------------------------------------------------------------------


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = subprocess.run(
        ["promtool", "test", "rules", "alerts.test.yml"],
        cwd=DEPLOY,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_in_the_stack_loads_the_alert_rules() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    # Relative rule files are read next to the configuration file: /etc/prometheus here.
    assert config["rule_files"] == ["alerts.yml"]
    assert config_source("prometheus", "/etc/prometheus/alerts.yml") == ALERTS
    names = {
        rule["alert"]
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
    }
    assert names >= {
        "RegistryProxyTaskDown",
        "RegistryUpstreamDown",
        "RegistryProxyHigh5xxRatio",
        "RegistryProxyRefusalSurge",
        "RegistryProxyCertificateExpiresSoon",
        "RegistryStorageErrors",
        "RegistryProxyReloadFailed",
        "RegistryProxyThrottleStoreDown",
        "RegistryProxyBusy",
        "RegistryProxyReadOnlyLeftOn",
    }
    tested = (DEPLOY / "alerts.test.yml").read_text()
    for name in names:
        assert f"alertname: {name}" in tested, f"{name} has no promtool unit test"


def test_every_service_logs_to_bounded_json_files() -> None:
    for name, spec in stack()["services"].items():
        logging = spec.get("logging", {})
        assert logging.get("driver") == "json-file", name
        assert {"max-size", "max-file"} <= set(logging.get("options", {})), name


def test_prometheus_and_grafana_have_healthchecks_and_resources() -> None:
    for name in ("prometheus", "grafana"):
        spec = service(name)
        assert {"test", "interval", "timeout", "retries"} <= set(spec["healthcheck"]), name
        assert spec["healthcheck"]["test"][0] == "CMD"
        resources = spec["deploy"]["resources"]
        assert {"cpus", "memory"} <= set(resources["reservations"]), name
        assert {"cpus", "memory"} <= set(resources["limits"]), name


def test_the_proxy_and_the_registry_have_cpu_and_memory_limits() -> None:
    """Guards a proxy or registry task free to take a node's every core and all its memory."""
    for name in ("proxy", "registry"):
        resources = service(name)["deploy"]["resources"]
        assert {"cpus", "memory"} <= set(resources["reservations"]), name
        assert {"cpus", "memory"} <= set(resources["limits"]), name
        assert float(resources["limits"]["cpus"]) >= float(resources["reservations"]["cpus"])
        assert int(resources["limits"]["memory"]) >= int(resources["reservations"]["memory"])
    # The proxy's limit holds the workers the comment allows (about 70 MB each at their peak).
    proxy_limits = service("proxy")["deploy"]["resources"]["limits"]
    workers = int(float(proxy_limits["cpus"]))
    assert int(proxy_limits["memory"]) >= (workers + 1) * 70 * 10**6


def docker_size(text: str) -> int:
    """The json-file driver's `max-size` in bytes (its units are powers of 1024)."""
    found = re.fullmatch(r"(\d+)([kmg]?)", text.lower())
    assert found, text
    number, unit = found.groups()
    return int(number) << 10 * " kmg".index(unit or " ")


def test_the_stack_says_how_long_its_log_files_keep_the_access_log(
    proxy: Proxy, users: dict[str, str]
) -> None:
    """Guards a log retention nobody computed: the stack's comment on how many requests its
    json-file settings hold must match a real access-log line as the driver stores it."""
    password = users["alice"]
    push_blob(proxy.url, "retention/probe", os.urandom(64), basic_auth("alice", password))

    def put_lines() -> list[str]:
        lines = proxy.log().splitlines()
        return [line for line in lines if '"method":"PUT","path":"/v2/retention/probe/' in line]

    # The access line is written just after the answer is sent.
    wait_until(lambda: bool(put_lines()), "the upload's access line")
    pushed = put_lines()[-1]
    stored = json.dumps(
        {"log": pushed + "\n", "stream": "stdout", "time": "2026-12-03T10:09:20.931862341Z"},
        separators=(",", ":"),
    )
    options = service("proxy")["logging"]["options"]
    kept = docker_size(options["max-size"]) * int(options["max-file"]) // (len(stored) + 1)
    said = re.search(r"about ([\d,]+) requests in 5 x 10 MB", STACK.read_text())
    assert said, "the stack does not say how many requests its log files hold"
    assert abs(int(said.group(1).replace(",", "")) - kept) <= kept * 0.15, kept


def test_the_commented_loki_logging_works_once_uncommented(tmp_path: Path) -> None:
    """The Loki example is a valid stack once uncommented, for every service."""
    text = STACK.read_text()
    block = re.compile(r"^# x-logging: &logging\n(?:#  .*\n)+", re.MULTILINE)
    assert block.search(text), "no commented Loki logging in the stack"
    text = re.sub(r"^x-logging: &logging\n(?:  .*\n)+", "", text, flags=re.MULTILINE)
    text = block.sub(lambda found: re.sub(r"^# ", "", found.group(0), flags=re.M), text)
    uncommented = tmp_path / "stack.yml"
    uncommented.write_text(text)
    for name, spec in stack(base=uncommented)["services"].items():
        assert spec["logging"]["driver"] == "loki", name
        assert spec["logging"]["options"]["loki-url"].endswith("/loki/api/v1/push"), name
