"""`registry-proxy doctor` against real deployments: one that is right, and one wrong in each way.

A deployment is the real proxy with a certificate from the test CA in front of the real
registry. The registry listens on 127.0.0.1 only; the right deployment's proxy listens on
DEPLOYED (another loopback address), and the doctor is pointed at the registry's real port
there with --registry-port: the registry runs, but not where a client of the public address
reaches it, as on a host whose firewall closes the port. Port 80 of DEPLOYED is free, so the
plain-HTTP check finds no listener there unless a test starts one.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from proxy import cli
from proxy.doctor import Probe, Result, Status, check_headers, check_plain_http, parse_target
from tests.support import (
    Process,
    Proxy,
    Registry,
    fake_upstream,
    free_port,
    start_nginx,
    wait_until,
)

DEPLOYED = "127.0.0.5"
NGINX = "/usr/sbin/nginx"
ALL_CHECKS = [
    "challenge",
    "registry-port",
    "certificate",
    "plain-http",
    "upload-location",
    "headers",
    "catalog",
]


def doctor(*args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m proxy doctor ARGS`, the password (if any) on stdin."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "doctor", *args],
        input=None if password is None else password + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def statuses(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """check name -> status, from --json output."""
    report = json.loads(result.stdout)
    assert report["exit"] == result.returncode
    return {check["name"]: check["status"] for check in report["checks"]}


def details(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, str]]:
    """check name -> the whole check, from --json output."""
    return {check["name"]: check for check in json.loads(result.stdout)["checks"]}


def only_failing(result: subprocess.CompletedProcess[str], *names: str) -> None:
    """Exactly the checks `names` failed (no others), and the exit status says so."""
    found = statuses(result)
    assert sorted(found) == sorted(ALL_CHECKS)
    assert {name for name, status in found.items() if status == "fail"} == set(names), found
    assert result.returncode == (1 if names else 0), result.stderr


def issue(ca: trustme.CA, directory: Path, *hosts: str, days: int = 90) -> dict[str, str]:
    """A certificate for `hosts` expiring in `days`, as the proxy's PROXY_TLS_* settings."""
    directory.mkdir(parents=True, exist_ok=True)
    not_after = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)
    cert = ca.issue_cert(*hosts, not_after=not_after)
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    return {
        "PROXY_TLS_CERT": str(directory / "cert.pem"),
        "PROXY_TLS_KEY": str(directory / "key.pem"),
    }


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    """The test CA's certificate: the doctor's --ca-file."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def deploy(
    start_proxy: Callable[..., Proxy], registry: Registry, ca: trustme.CA, tmp_path: Path
) -> Callable[..., str]:
    """Start a proxy with TLS on `host` (a certificate for `names`, `days` left) in front of
    `upstream` (the session's registry by default); return its public URL."""

    def start(
        *,
        host: str = DEPLOYED,
        names: tuple[str, ...] = (DEPLOYED,),
        days: int = 90,
        upstream: str | None = None,
        **env: str,
    ) -> str:
        port = free_port()
        tls = issue(ca, tmp_path / f"tls-{port}", *names, days=days)
        start_proxy(upstream or registry.url, PROXY_LISTEN=f"{host}:{port}", **tls, **env)
        return f"https://{host}:{port}"

    return start


def test_a_right_deployment_passes_every_check(
    deploy: Callable[..., str],
    registry: Registry,
    ca_file: str,
    users: dict[str, str],
) -> None:
    """Guards the doctor against false alarms: TLS proxy, registry unreachable, upload
    Location on the public host; exit 0; the password appears nowhere."""
    url = deploy()
    result = doctor(
        url,
        "--ca-file",
        ca_file,
        "--registry-port",
        str(registry.port),
        "--user",
        "alice",
        "--password-stdin",
        "--json",
        password=users["alice"],
    )
    only_failing(result)
    assert set(statuses(result).values()) == {"pass"}
    checks = details(result)
    assert "upload cancelled" in checks["upload-location"]["detail"]
    assert f"Location {url}/v2/doctor/probe/blobs/uploads/" in checks["upload-location"]["detail"]
    assert users["alice"] not in result.stdout + result.stderr


def test_without_user_the_upload_check_is_skipped_and_says_so(
    deploy: Callable[..., str], registry: Registry, ca_file: str
) -> None:
    """Guards the text report: one line per check, the skip named, exit 0."""
    url = deploy()
    result = doctor(url, "--ca-file", ca_file, "--registry-port", str(registry.port))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"registry-proxy doctor: {url}"
    marks = {line.split()[1]: line.split()[0] for line in lines[1:-1]}
    assert marks == {name: "skip" if name == "upload-location" else "pass" for name in ALL_CHECKS}
    assert "needs --user" in next(line for line in lines if "upload-location" in line)
    assert lines[-1] == "6 pass, 0 warn, 0 fail, 1 skip"


def test_an_open_registry_port_fails_and_prints_the_docker_user_rule(
    deploy: Callable[..., str], registry: Registry, ca_file: str
) -> None:
    """Guards the registry's own port: reachable where the proxy is, it fails with the
    DOCKER-USER rule that closes it."""
    url = deploy(host="127.0.0.1", names=("127.0.0.1",))
    result = doctor(url, "--ca-file", ca_file, "--registry-port", str(registry.port))
    assert result.returncode == 1
    assert "FAIL  registry-port" in result.stdout
    assert (
        f"iptables -I DOCKER-USER -o docker_gwbridge -p tcp -m conntrack "
        f"--ctorigdstport {registry.port} --ctdir ORIGINAL -j DROP"
    ) in result.stdout
    only_failing(
        doctor(url, "--ca-file", ca_file, "--registry-port", str(registry.port), "--json"),
        "registry-port",
    )


def test_a_certificate_expiring_within_14_days_fails(
    deploy: Callable[..., str], registry: Registry, ca_file: str
) -> None:
    """Guards the expiry margin: a valid chain with 10 days left is a failure."""
    url = deploy(days=10)
    result = doctor(url, "--ca-file", ca_file, "--registry-port", str(registry.port), "--json")
    only_failing(result, "certificate")
    assert "in 9 days" in details(result)["certificate"]["detail"]


def test_a_certificate_for_another_host_name_fails_and_no_credentials_are_sent(
    deploy: Callable[..., str], registry: Registry, ca_file: str, users: dict[str, str]
) -> None:
    """Guards host name verification, and that the login goes only to a verified host."""
    url = deploy(names=("registry.example.com",))
    result = doctor(
        url,
        "--ca-file",
        ca_file,
        "--registry-port",
        str(registry.port),
        "--user",
        "alice",
        "--password-stdin",
        "--json",
        password=users["alice"],
    )
    only_failing(result, "certificate")
    checks = details(result)
    assert "mismatch" in checks["certificate"]["detail"]
    assert "subjectAltName names 127.0.0.5" in checks["certificate"]["fix"]
    assert checks["upload-location"]["status"] == "skip"
    assert "credentials not sent" in checks["upload-location"]["detail"]


def test_a_certificate_from_an_untrusted_ca_fails_without_ca_file(
    deploy: Callable[..., str], registry: Registry
) -> None:
    """Guards the trust root: without --ca-file the system store is used, which lacks the CA."""
    url = deploy()
    result = doctor(url, "--registry-port", str(registry.port), "--json")
    only_failing(result, "certificate")


def need_nginx() -> None:
    """Skip without Debian's nginx, except in CI (CI=true), where the test then fails."""
    if not Path(NGINX).exists() and os.environ.get("CI") != "true":
        pytest.skip(f"{NGINX} is not installed")


def can_bind_port_80(host: str) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, 80))
        except OSError:
            return False
    return True


def test_a_plain_http_listener_on_port_80_asking_for_credentials_fails(
    deploy: Callable[..., str],
    start_proxy: Callable[..., Proxy],
    registry: Registry,
    ca_file: str,
) -> None:
    """Guards the plain-HTTP check: the proxy itself on port 80 without TLS, beside the right
    deployment, challenges for Basic credentials that would cross the network in clear."""
    if not can_bind_port_80(DEPLOYED):
        pytest.skip("cannot bind port 80 here (not root, no CAP_NET_BIND_SERVICE)")
    url = deploy()
    start_proxy(registry.url, PROXY_LISTEN=f"{DEPLOYED}:80")
    result = doctor(url, "--ca-file", ca_file, "--registry-port", str(registry.port), "--json")
    only_failing(result, "plain-http")
    assert (
        f"http://{DEPLOYED}:80/v2/ asks for Basic credentials"
        in (details(result)["plain-http"]["detail"])
    )


def test_the_proxy_on_plain_http_fails_the_plain_http_and_certificate_checks(
    start_proxy: Callable[..., Proxy], registry: Registry
) -> None:
    """Guards an http:// URL: the listener itself takes credentials in clear."""
    port = free_port()
    start_proxy(registry.url, PROXY_LISTEN=f"{DEPLOYED}:{port}")
    result = doctor(f"http://{DEPLOYED}:{port}", "--registry-port", str(registry.port), "--json")
    only_failing(result, "plain-http", "certificate")
    assert details(result)["upload-location"]["status"] == "skip"


def test_an_upload_location_on_another_host_fails(
    deploy: Callable[..., str], ca_file: str, users: dict[str, str], tmp_path: Path
) -> None:
    """Guards the upload Location: a registry whose http.host names an internal http:// URL
    sends clients there; the upload is still cancelled, through the public host."""
    internal = Registry(
        tmp_path / "registry", env={"REGISTRY_HTTP_HOST": "http://registry.internal:5000"}
    )
    internal.start()
    try:
        url = deploy(upstream=internal.url)
        result = doctor(
            url,
            "--ca-file",
            ca_file,
            "--registry-port",
            str(internal.port),
            "--user",
            "alice",
            "--password-stdin",
            "--json",
            password=users["alice"],
        )
        only_failing(result, "upload-location")
        detail = details(result)["upload-location"]["detail"]
        assert "Location http://registry.internal:5000/v2/doctor/probe/blobs/uploads/" in detail
        assert "upload cancelled" in detail
        assert "http.request.method=DELETE" in internal.log()
    finally:
        internal.stop()


def test_a_port_80_that_redirects_to_https_passes(
    deploy: Callable[..., str], registry: Registry, ca_file: str, tmp_path: Path
) -> None:
    """Guards the plain-HTTP check's other side: nginx on port 80 answering every request with
    a redirect to https:// is the right setup, not a failure."""
    if not can_bind_port_80(DEPLOYED):
        pytest.skip("cannot bind port 80 here (not root, no CAP_NET_BIND_SERVICE)")
    need_nginx()
    url = deploy()
    config = tmp_path / "nginx.conf"
    config.write_text(
        f"""daemon off;
master_process off;
error_log {tmp_path}/error.log info;
pid {tmp_path}/nginx.pid;
events {{ worker_connections 16; }}
http {{
    access_log off;
    server {{
        listen {DEPLOYED}:80;
        return 301 https://$host$request_uri;
    }}
}}
"""
    )
    nginx = Process([NGINX, "-p", str(tmp_path), "-c", str(config)], tmp_path / "log")

    def redirecting() -> bool:
        nginx.check_alive()
        return accepts(DEPLOYED, 80)

    nginx.start()
    try:
        wait_until(redirecting, "nginx to listen on port 80")
        result = doctor(url, "--ca-file", ca_file, "--registry-port", str(registry.port), "--json")
    finally:
        nginx.stop()
    only_failing(result)
    redirect = f"http://{DEPLOYED}:80/v2/ redirects to https://{DEPLOYED}/v2/"
    assert redirect in details(result)["plain-http"]["detail"]


def accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def test_a_server_banner_from_an_edge_fails(
    start_proxy: Callable[..., Proxy],
    registry: Registry,
    ca: trustme.CA,
    ca_file: str,
    users: dict[str, str],
    tmp_path: Path,
) -> None:
    """Guards the banner check: nginx's default `Server: nginx/1.x` in front of the proxy."""
    need_nginx()
    proxy = start_proxy(registry.url, PROXY_TRUSTED_PROXIES="127.0.0.1/32")
    edge = start_nginx(tmp_path / "nginx", proxy.port, issue(ca, tmp_path / "tls", "127.0.0.1"))
    try:
        result = doctor(
            f"https://127.0.0.1:{edge.port}",
            "--ca-file",
            ca_file,
            "--registry-port",
            str(free_port()),
            "--user",
            "alice",
            "--password-stdin",
            "--json",
            password=users["alice"],
        )
    finally:
        edge.stop()
    only_failing(result, "headers")
    assert "Server: nginx/" in details(result)["headers"]["detail"]
    assert "names a version" in details(result)["headers"]["detail"]


def test_the_registry_itself_answering_v2_without_credentials_fails(registry: Registry) -> None:
    """Guards the challenge check: the registry exposed directly, /v2/ and the catalog open."""
    result = doctor(registry.url, "--registry-port", str(free_port()), "--json")
    found = statuses(result)
    assert found["challenge"] == "fail"
    assert found["catalog"] == "fail"
    assert result.returncode == 1


def test_a_catalog_granted_to_anonymous_clients_only_warns(
    deploy: Callable[..., str], registry: Registry, ca_file: str, tmp_path: Path
) -> None:
    """Guards the catalog check: a rule meant to show @anonymous the catalog is a warning,
    exit 0, the challenge on /v2/ still in place."""
    config = tmp_path / "proxy.yml"
    config.write_text(
        "access:\n"
        '  - {users: ["@anonymous"], actions: [catalog]}\n'
        '  - {users: ["*"], repositories: ["**"], actions: [pull, push, delete, catalog]}\n'
    )
    url = deploy(PROXY_CONFIG=str(config))
    result = doctor(url, "--ca-file", ca_file, "--registry-port", str(registry.port), "--json")
    only_failing(result)
    assert statuses(result)["catalog"] == "warn"
    assert "@anonymous" in details(result)["catalog"]["detail"]


@pytest.mark.parametrize(
    "argv",
    [
        ["ftp://registry.example.com"],
        ["registry.example.com"],
        ["https://registry.example.com/v2/"],
        ["ftp://user:secret-pw@registry.example.com"],
        ["https://registry.example.com", "--password-stdin"],
        ["https://registry.example.com", "--ca-file", "/nonexistent/ca.pem"],
        ["https://registry.example.com", "--repository", "Team/../app"],
    ],
)
def test_a_command_line_it_cannot_probe_exits_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Guards exit status 2 for usage errors, before any probe is sent."""
    assert cli.main(["doctor", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("registry-proxy: doctor: ")
    assert "secret-pw" not in err


@pytest.mark.parametrize(
    "argv", [[], ["https://x", "--registry-port", "0"], ["https://x", "--bogus"]]
)
def test_argument_errors_exit_2(argv: list[str]) -> None:
    """Guards argparse's usage errors: exit 2 too."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["doctor", *argv])
    assert exited.value.code == 2


async def check_against(
    check: Callable[[Probe], Result], status: int, headers: dict[str, str]
) -> Result:
    """`check` run against a plain-HTTP fake answering every request `status` with `headers`."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            writer.write(f"HTTP/1.1 {status} X\r\n{head}Content-Length: 0\r\n\r\n".encode())
            await writer.drain()

    async with fake_upstream(answer) as url:
        # The doctor blocks: it runs in a thread while the fake serves on this loop.
        return await asyncio.to_thread(check, Probe(parse_target(url, timeout=2.0)))


API = {"Docker-Distribution-Api-Version": "registry/2.0", "WWW-Authenticate": 'Basic realm="R"'}


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (API, Status.PASS),
        ({**API, "Server": "nginx"}, Status.WARN),
        ({**API, "Server": "nginx/1.22.1"}, Status.FAIL),
        ({**API, "X-Powered-By": "Express"}, Status.FAIL),
        ({"WWW-Authenticate": 'Basic realm="R"'}, Status.FAIL),
    ],
    ids=["clean", "bare-server-name", "server-version", "x-powered-by", "no-api-version"],
)
async def test_headers_check_tells_a_banner_from_a_bare_name(
    headers: dict[str, str], expected: Status
) -> None:
    """Guards the banner rule: a version or X-Powered-By fails, a bare name only warns, and
    the API version header must be there."""
    assert (await check_against(check_headers, 401, headers)).status is expected


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (301, {"Location": "https://registry.example.com/v2/"}, Status.PASS),
        (301, {"Location": "http://registry.example.com:8080/v2/"}, Status.FAIL),
        (401, API, Status.FAIL),
        (200, {}, Status.FAIL),
        (400, {}, Status.PASS),
        (404, {}, Status.PASS),
    ],
    ids=["redirect-https", "redirect-http", "challenge", "open", "bad-request", "not-found"],
)
async def test_plain_http_check_passes_only_what_takes_no_credentials(
    status: int, headers: dict[str, str], expected: Status
) -> None:
    """Guards the plain-HTTP rule: a 2xx, a Basic challenge or a redirect to http:// fails."""
    assert (await check_against(check_plain_http, status, headers)).status is expected
