"""deploy/compose.yml: as Docker Compose reads it, and run for real with podman-compose.

The first tests read what `docker-compose config` (Debian's docker-compose 1.29) makes of the
file, alone and with compose.edge.yml. The last one runs it: docker-compose resolves the file
(with a small override, below) and podman-compose starts it with root podman (runc, cgroupfs,
the storage of tests/test_image.py), builds the proxy from the Dockerfile, and skopeo pushes and
pulls through the proxy's published port over TLS. Two stand-ins, and nothing else differs:
- registry:3.1.1 cannot be pulled here, so the registry service runs an image made from the
  stand-in base with the registry binary of this machine (/work/shared/bin/registry-3.1.1 when
  present, else Debian's docker-registry) at /bin/registry, and a `wget` of a few lines of
  Python for the healthcheck (the real image's is busybox's);
- the proxy's PYTHON_IMAGE build argument is the stand-in base (tests/support/containers.py).
podman-compose 1.0.3 has no profiles, so the services of a profile are left out, as compose
leaves them out by default; nor network aliases (for Prometheus only), so they are left out
too; and it garbles a CMD healthcheck of several words, so the test hands it the same command as
CMD-SHELL. Without the tools the tests skip, saying why, except in CI (CI=true).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import ssl
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from tests.support import (
    CONTAINERS_CONF,
    REGISTRY_BIN,
    RootPodman,
    build_stand_in_base,
    call,
    free_port,
    htpasswd,
    wait_until,
    why_unavailable,
    write_oci_layout,
)

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yml"
EDGE = DEPLOY / "compose.edge.yml"
SECRET_FILES = ("htpasswd", "tls.crt", "tls.key", "registry_http_secret", "ui-session.key")
# The busybox `wget -q -O /dev/null URL` the registry image's healthcheck runs.
WGET = """#!/usr/bin/python3
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[-1], timeout=4).close()
except Exception:
    sys.exit(1)
"""


def missing(*tools: str) -> str | None:
    """The first of `tools` not on PATH, as a skip reason."""
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is missing (scripts/install-deps installs it)"
    return None


def skip_unless_ci(reason: str | None) -> None:
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"compose test cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"compose test: {reason}")


def compose_config(*overrides: Path, **env: str) -> dict[str, Any]:
    """What `docker-compose config` makes of compose.yml with `overrides` and `env`."""
    skip_unless_ci(missing("docker-compose"))
    files = [arg for path in (COMPOSE, *overrides) for arg in ("-f", str(path))]
    result = subprocess.run(
        ["docker-compose", *files, "config"],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return compose_config()


def published(service: Mapping[str, Any]) -> list[str]:
    """The host side of each published port, as `address:port`."""
    ports = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.append(f"{port.get('host_ip', '0.0.0.0')}:{port['published']}")
        else:
            host = str(port).rsplit(":", 1)[0]
            ports.append(host if ":" in host else f"0.0.0.0:{host}")
    return ports


# --- the file as docker-compose reads it ----------------------------------------------------


def test_the_registry_is_pinned_and_its_port_not_published(config: dict[str, Any]) -> None:
    """Guards the one-host shape: the registry answers anyone without credentials, so only the
    proxy may reach it; and it is the registry version the tests run against."""
    registry = config["services"]["registry"]
    assert registry["image"] == "registry:3.1.1"
    assert "ports" not in registry and "network_mode" not in registry
    assert published(config["services"]["proxy"]) == ["0.0.0.0:443"]
    # Prometheus is not published either (the admin and debug ports never are).
    assert "ports" not in config["services"]["prometheus"]


def test_secrets_come_from_files_and_reach_the_settings_that_read_them(
    config: dict[str, Any],
) -> None:
    """Guards secrets from files: every secret is a file in SECRETS_DIR, none is in the
    environment or the compose file, and the paths the proxy and the registry read are where
    compose mounts them."""
    assert {name: entry["file"] for name, entry in config["secrets"].items()} == {
        "htpasswd": str(DEPLOY / "secrets" / "htpasswd"),
        "tls_cert": str(DEPLOY / "secrets" / "tls.crt"),
        "tls_key": str(DEPLOY / "secrets" / "tls.key"),
        "registry_http_secret": str(DEPLOY / "secrets" / "registry_http_secret"),
        "ui_session_key": str(DEPLOY / "secrets" / "ui-session.key"),
    }
    elsewhere = compose_config(SECRETS_DIR="/etc/registry-proxy/secrets")["secrets"]
    assert {e["file"] for e in elsewhere.values()} == {
        f"/etc/registry-proxy/secrets/{name}" for name in SECRET_FILES
    }
    proxy, registry = config["services"]["proxy"], config["services"]["registry"]
    assert [s["source"] for s in proxy["secrets"]] == [
        "htpasswd",
        "tls_cert",
        "tls_key",
        "ui_session_key",
    ]
    assert [s["source"] for s in registry["secrets"]] == ["registry_http_secret"]
    assert proxy["environment"]["PROXY_TLS_CERT"] == "/run/secrets/tls_cert"
    assert proxy["environment"]["PROXY_TLS_KEY"] == "/run/secrets/tls_key"
    # The browser is on, its session key from a secret file.
    (key,) = [s for s in proxy["secrets"] if s["source"] == "ui_session_key"]
    assert proxy["environment"]["PROXY_UI"] == "true"
    assert proxy["environment"]["PROXY_UI_SESSION_KEY_FILE"] == f"/run/secrets/{key['target']}"
    assert yaml.safe_load((DEPLOY / "proxy.yml").read_text())["htpasswd"] == "/run/secrets/htpasswd"
    assert "cat /run/secrets/registry_http_secret" in registry["command"][0]
    for service in config["services"].values():
        for value in service.get("environment", {}).values():
            assert not re.search(r"secret|password", str(value), re.I) or "/run/secrets/" in value


def test_every_service_has_a_healthcheck_and_restarts(config: dict[str, Any]) -> None:
    """Guards healthchecks and restart policies; the proxy's check is the image's HEALTHCHECK
    and its grace period outlasts the drain."""
    for name, service in config["services"].items():
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"][0] == "CMD", name
    proxy = config["services"]["proxy"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    image_check = json.loads(re.search(r"HEALTHCHECK .*\n\s+CMD (\[.*\])", dockerfile)[1])  # type: ignore[index]
    assert proxy["healthcheck"]["test"] == ["CMD", *image_check]
    assert proxy["depends_on"] == {"registry": {"condition": "service_healthy"}}
    registry_check = config["services"]["registry"]["healthcheck"]["test"]
    assert registry_check[-1] == "http://127.0.0.1:5000/"
    shutdown = yaml.safe_load((DEPLOY / "proxy.yml").read_text())["shutdown_timeout"]
    assert int(proxy["stop_grace_period"].removesuffix("s")) > shutdown


def test_prometheus_is_a_profile_and_finds_its_targets(config: dict[str, Any]) -> None:
    """Guards the optional Prometheus: off unless asked for, and deploy/prometheus.yml's
    tasks.<service> names answered by the services' aliases."""
    assert config["services"]["prometheus"]["profiles"] == ["monitoring"]
    assert "profiles" not in config["services"]["proxy"]
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    names = {name for job in scrape for sd in job.get("dns_sd_configs", []) for name in sd["names"]}
    aliases = {
        alias
        for service in config["services"].values()
        for network in (service.get("networks") or {}).values()
        for alias in (network or {}).get("aliases", [])
    }
    assert names == {"tasks.proxy", "tasks.registry"}
    assert names <= aliases


def test_the_edge_variant_serves_plain_http_to_this_host_only() -> None:
    """Guards compose.edge.yml: no TLS, the published port on 127.0.0.1 only, no certificate to
    mount, and X-Forwarded-* believed from the project's own network only."""
    config = compose_config(EDGE, PROXY_PUBLISH="127.0.0.1:8080")
    proxy = config["services"]["proxy"]
    assert published(proxy) == ["127.0.0.1:8080"]
    assert proxy["environment"]["PROXY_TLS_CERT"] == ""
    assert proxy["environment"]["PROXY_TLS_KEY"] == ""
    subnet = config["networks"]["default"]["ipam"]["config"][0]["subnet"]
    assert proxy["environment"]["PROXY_TRUSTED_PROXIES"] == f"[{subnet}]"
    assert (
        config["secrets"]["tls_cert"]["file"] == config["secrets"]["tls_key"]["file"] == "/dev/null"
    )
    assert "ports" not in config["services"]["registry"]


# --- compose.yml run for real -----------------------------------------------------------------


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> RootPodman:
    """Root podman as tests/test_image.py runs it, for podman-compose too."""
    skip_unless_ci(missing("docker-compose", "podman-compose") or why_unavailable())
    runc = shutil.which("runc")
    assert runc is not None
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return RootPodman(runc, conf)


@pytest.fixture(scope="module")
def registry_stand_in(
    podman: RootPodman, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """The registry:3.1.1 stand-in image and the stand-in base; removed afterwards."""
    base, _ = build_stand_in_base(podman)
    context = tmp_path_factory.mktemp("registry-image")
    shutil.copy(REGISTRY_BIN, context / "registry")
    (context / "wget").write_text(WGET)
    (context / "wget").chmod(0o755)
    (context / "Containerfile").write_text(
        f"FROM {base}\nCOPY registry /bin/registry\nCOPY wget /usr/bin/wget\n"
    )
    name = f"localhost/registry-proxy-test/registry-stand-in:{uuid.uuid4().hex[:12]}"
    podman.run("build", "--isolation", "chroot", "--network", "host", "--format", "docker",
               "--layers=false", "--tag", name, str(context), timeout=300)  # fmt: skip
    try:
        yield name, base
    finally:
        podman.run("rmi", "--force", name, check=False)


def write_secrets(directory: Path, ca: trustme.CA, users: Mapping[str, str]) -> None:
    """The five secret files, as docs/deployment.md has the operator make them."""
    directory.mkdir()
    for user, password in users.items():
        htpasswd(directory / "htpasswd", "-B", user=user, password=password)
    certificate = ca.issue_cert("127.0.0.1", "localhost")
    certificate.private_key_pem.write_to_path(str(directory / "tls.key"))
    certificate.cert_chain_pems[0].write_to_path(str(directory / "tls.crt"))
    (directory / "registry_http_secret").write_text(secrets.token_hex(32))
    (directory / "ui-session.key").write_text(secrets.token_urlsafe(32))
    # The proxy runs as uid 10001: that group reads its files, nobody else does.
    for name in ("htpasswd", "tls.key", "ui-session.key"):
        os.chown(directory / name, 0, 10001)
        (directory / name).chmod(0o640)


@pytest.mark.image
def test_podman_compose_runs_it_and_skopeo_pushes_and_pulls_over_tls(
    podman: RootPodman,
    registry_stand_in: tuple[str, str],
    users: dict[str, str],
    tmp_path: Path,
    report_figure: Callable[[str, str], None],
) -> None:
    """Guards compose.yml end to end: the proxy built from the Dockerfile as the file says, its
    secrets mounted as files (TLS key, htpasswd, the browser's session key), the registry reading
    its http secret and reachable by service name only, both healthchecks passing, a push and a
    pull through the published port over TLS, and the browser's sign-in page."""
    registry_image, base = registry_stand_in
    ca = trustme.CA()
    write_secrets(tmp_path / "secrets", ca, {"alice": users["alice"]})
    project = f"rptest{uuid.uuid4().hex[:8]}"
    port = free_port()
    override = tmp_path / "compose.test.yml"
    override.write_text(
        yaml.safe_dump(
            {
                "services": {
                    "registry": {"image": registry_image},
                    "proxy": {"build": {"args": {"PYTHON_IMAGE": base}}},
                }
            }
        )
    )
    env = {
        "SECRETS_DIR": str(tmp_path / "secrets"),
        "PROXY_PUBLISH": f"127.0.0.1:{port}",
        "PROXY_IMAGE": f"localhost/registry-proxy-test/compose-proxy:{project}",
    }
    resolved = compose_config(override, **env)
    resolved["services"] = {
        name: service
        for name, service in resolved["services"].items()
        if not service.get("profiles")
    }
    # podman-compose 1.0.3 reads a service's `networks:` as a list of names only; what the
    # mapping adds are the tasks.* aliases for Prometheus, which this run leaves out.
    # And it quotes a CMD healthcheck's arguments wrongly (a one-word command survives, the
    # proxy's `python -c SCRIPT` does not): the same command as CMD-SHELL, which it passes whole.
    for service in resolved["services"].values():
        assert set(service.pop("networks")) == {"default"}
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD"
        service["healthcheck"]["test"] = ["CMD-SHELL", shlex.join(test[1:])]
    compose_file = tmp_path / "compose.resolved.yml"
    compose_file.write_text(yaml.safe_dump(resolved))
    # podman-compose runs this podman: the test's storage and runtime (tests/support/containers).
    wrapper = tmp_path / "podman"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.join(podman.command())} "$@"\n')
    wrapper.chmod(0o755)
    build_args = "--isolation chroot --network host --format docker --layers=false"

    def compose(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "podman-compose",
                "--podman-path",
                str(wrapper),
                "--podman-build-args",
                build_args,
                "-p",
                project,
                "-f",
                str(compose_file),
                *args,
            ],
            capture_output=True,
            text=True,
            errors="replace",
            env={**podman.env, **env},
            timeout=timeout,
            check=False,
        )

    try:
        up = compose("up", "-d", timeout=900)
        assert up.returncode == 0, f"{up.stdout[-4000:]}\n{up.stderr[-4000:]}"
        names = {service: f"{project}_{service}_1" for service in resolved["services"]}

        def logs(service: str) -> str:
            result = podman.run("logs", names[service], check=False)
            return result.stdout + result.stderr

        def healthy(service: str) -> bool:
            state = podman.inspect("container", "inspect", names[service])["State"]
            assert state["Running"], f"{service} exited {state['ExitCode']}:\n{logs(service)}"
            return podman.run("healthcheck", "run", names[service], check=False).returncode == 0

        for service in ("registry", "proxy"):
            try:
                wait_until(partial(healthy, service), f"the {service}'s healthcheck to pass")
            except AssertionError as exc:
                config = podman.inspect("container", "inspect", names[service])["Config"]
                check = podman.run("healthcheck", "run", names[service], check=False)
                raise AssertionError(
                    f"{exc}\n--- healthcheck {config.get('Healthcheck')}: {check.stdout}"
                    f"{check.stderr}\n--- {service}:\n{logs(service)}"
                ) from None
        registry_ports = podman.inspect("container", "inspect", names["registry"])
        assert not any(registry_ports["NetworkSettings"]["Ports"].values()), "nothing published"
        proxy = podman.inspect("container", "inspect", names["proxy"])
        assert proxy["Config"]["User"] == "10001:10001"
        assert proxy["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
        mounts = {m["Destination"]: m for m in proxy["Mounts"]}
        for secret in ("htpasswd", "tls_cert", "tls_key", "ui_session_key"):
            assert not mounts[f"/run/secrets/{secret}"]["RW"], secret

        certs = tmp_path / "certs"
        certs.mkdir()
        ca.cert_pem.write_to_path(str(certs / "ca.crt"))
        layers: list[Mapping[str, bytes]] = [
            {"hello.txt": os.urandom(4096)},
            {"big.bin": os.urandom(3 << 20)},
        ]
        digests = write_oci_layout(tmp_path / "source", "v1", layers)
        target = f"docker://127.0.0.1:{port}/compose/skopeo:v1"
        home = tmp_path / "home"
        home.mkdir()
        client_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
        credentials = f"alice:{users['alice']}"

        def skopeo(*args: str) -> None:
            result = subprocess.run(["skopeo", *args], capture_output=True, text=True,
                                    env=client_env, timeout=120, check=False)  # fmt: skip
            assert result.returncode == 0, f"{result.stderr}\n--- proxy:\n{logs('proxy')}"

        skopeo("copy", "--dest-cert-dir", str(certs), "--dest-creds", credentials,
               f"oci:{tmp_path / 'source'}:v1", target)  # fmt: skip
        skopeo("copy", "--src-cert-dir", str(certs), "--src-creds", credentials,
               target, f"oci:{tmp_path / 'pulled'}:v1")  # fmt: skip
        for digest in digests:
            pulled = tmp_path / "pulled" / "blobs" / "sha256" / digest.split(":")[1]
            assert f"sha256:{hashlib.sha256(pulled.read_bytes()).hexdigest()}" == digest
        # The browser answers over TLS, its cookies marked Secure (it read its key file).
        trusted = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        status, headers, _ = call(f"https://127.0.0.1:{port}/ui/login", context=trusted)
        assert status == 200 and "secure" in headers["Set-Cookie"].lower(), logs("proxy")
        report_figure("compose test", f"podman-compose up, push and pull through {target}")
    finally:
        compose("down", "-v", timeout=180)
        podman.run("rmi", "--force", env["PROXY_IMAGE"], check=False)
        podman.run("network", "rm", "--force", f"{project}_default", check=False)
        for volume in ("registry_data", "prometheus_data"):
            podman.run("volume", "rm", "--force", f"{project}_{volume}", check=False)
