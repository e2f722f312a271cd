"""`registry-proxy doctor`: probe a running deployment as a client on the internet sees it.

Each check is one function taking a `Probe` and returning a `Result`; `run` calls them in
order and `render_text` / `render_json` print what they found. Everything is synchronous and
uses the standard library only, with a timeout on every connection.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from email.message import Message
from enum import StrEnum
from pathlib import Path
from urllib.parse import urljoin, urlsplit

DEFAULT_REGISTRY_PORT = 5000
DEFAULT_REPOSITORY = "doctor/probe"
# The distribution spec's repository name grammar.
REPOSITORY_NAME = re.compile(
    r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
)
TIMEOUT = 5.0
# A certificate expiring within this many days fails: renewal has visibly stalled.
MIN_DAYS_LEFT = 14
# Bodies are read only so that a connection ends cleanly; nothing needs more.
MAX_BODY = 64 * 1024
API_VERSION_HEADER = "Docker-Distribution-Api-Version"
# OpenSSL's verify codes for a certificate that names another host or address.
_NAME_MISMATCH = {62, 64}
_EXPIRED = 10


class Status(StrEnum):
    """How a check came out; only `fail` makes the doctor exit 1."""

    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Result:
    """One check's verdict, what was seen, and for a failure (or warning) what to do."""

    name: str
    status: Status
    detail: str
    fix: str = ""


class UsageError(ValueError):
    """The command line cannot be probed as given (exit 2)."""


@dataclass(frozen=True)
class Target:
    """The deployment to probe: its public URL and what the command line added."""

    scheme: str
    host: str
    port: int
    ca_file: Path | None = None
    registry_port: int = DEFAULT_REGISTRY_PORT
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    repository: str = DEFAULT_REPOSITORY
    timeout: float = TIMEOUT

    @property
    def bracketed_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def netloc(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.bracketed_host if self.port == default else f"{self.bracketed_host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}"


def parse_target(
    url: str,
    *,
    ca_file: Path | None = None,
    registry_port: int = DEFAULT_REGISTRY_PORT,
    user: str | None = None,
    password: str | None = None,
    repository: str = DEFAULT_REPOSITORY,
    timeout: float = TIMEOUT,
) -> Target:
    """A `Target` for `url` (scheme://host[:port], nothing else); UsageError names the problem."""
    if not REPOSITORY_NAME.fullmatch(repository):
        raise UsageError(f"--repository {repository!r}: not a repository name")
    parts = urlsplit(url)
    if "@" in parts.netloc:
        # Not echoed: the URL holds a password.
        raise UsageError("no credentials in the URL; use --user and --password-stdin")
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"{url!r}: expected an https:// (or http://) URL")
    if not parts.hostname:
        raise UsageError(f"{url!r}: no host name")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(f"{url!r}: the registry API lives at the host's root; give only the host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UsageError(f"{url!r}: invalid port") from None
    if ca_file is not None:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"--ca-file {ca_file}: cannot load: {exc}") from None
    return Target(
        parts.scheme,
        parts.hostname,
        port,
        ca_file,
        registry_port,
        user,
        password,
        repository,
        timeout,
    )


# --- probing ---------------------------------------------------------------------------------


class ProbeError(Exception):
    """No HTTP answer: refused, timed out, closed, TLS failed, or not HTTP."""

    def __init__(self, reason: str, cause: BaseException | None = None) -> None:
        super().__init__(reason)
        self.cause = cause


@dataclass(frozen=True)
class Response:
    """What one request got back (the body only as far as MAX_BODY)."""

    status: int
    headers: Message
    body: bytes


def trust_context(target: Target) -> ssl.SSLContext:
    """Verification as a client does it: --ca-file as the only root, else the system store."""
    return ssl.create_default_context(cafile=target.ca_file)


def _unverified_context() -> ssl.SSLContext:
    # For requests without credentials: the certificate check reports on trust by itself.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def request(
    target: Target,
    method: str,
    path: str,
    *,
    scheme: str | None = None,
    port: int | None = None,
    headers: Mapping[str, str] | None = None,
    verify: bool = False,
) -> Response:
    """One request to the target's host; ProbeError when no HTTP answer comes."""
    scheme = scheme or target.scheme
    port = port or target.port
    connection: http.client.HTTPConnection
    if scheme == "https":
        context = trust_context(target) if verify else _unverified_context()
        connection = http.client.HTTPSConnection(
            target.host, port, timeout=target.timeout, context=context
        )
    else:
        connection = http.client.HTTPConnection(target.host, port, timeout=target.timeout)
    try:
        connection.request(method, path, headers=dict(headers or {}))
        response = connection.getresponse()
        body = response.read(MAX_BODY)
        return Response(response.status, response.msg, body)
    except ssl.SSLCertVerificationError as exc:
        raise ProbeError(f"certificate not trusted: {exc.verify_message}", exc) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise ProbeError(_describe(exc), exc) from exc
    finally:
        connection.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError):
        return "closed without an answer"
    if isinstance(exc, http.client.BadStatusLine):
        return "answered, but not with HTTP"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _credentials(target: Target) -> dict[str, str]:
    token = base64.b64encode(f"{target.user}:{target.password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _is_basic_challenge(response: Response) -> bool:
    challenges = response.headers.get_all("WWW-Authenticate") or []
    return any(str(value).strip().lower().startswith("basic") for value in challenges)


@dataclass
class Probe:
    """The target and the answers several checks share: /v2/ and the catalog, unauthenticated."""

    target: Target
    _answers: dict[str, Response | ProbeError] = field(default_factory=dict, init=False)

    def get(self, path: str) -> Response:
        """GET `path` without credentials, once; ProbeError when nothing answered."""
        if path not in self._answers:
            try:
                self._answers[path] = request(self.target, "GET", path)
            except ProbeError as exc:
                self._answers[path] = exc
        answer = self._answers[path]
        if isinstance(answer, ProbeError):
            raise answer
        return answer


# --- the checks ------------------------------------------------------------------------------

NOT_EXPOSED_FIX = (
    "put registry-proxy in front of the registry and publish only the proxy's port; "
    "the registry itself must not be reachable from outside"
)


def check_challenge(probe: Probe) -> Result:
    """`/v2/` without credentials is a 401 with a Basic challenge, never a 200."""
    name = "challenge"
    try:
        ping = probe.get("/v2/")
    except ProbeError as exc:
        return Result(
            name,
            Status.FAIL,
            f"GET {probe.target.url}/v2/: {exc}",
            "check the URL, and that the proxy runs and its port is open",
        )
    if ping.status == 401 and _is_basic_challenge(ping):
        challenge = ping.headers.get("WWW-Authenticate")
        return Result(name, Status.PASS, f"/v2/ without credentials: 401, {challenge}")
    if 200 <= ping.status < 300:
        return Result(
            name,
            Status.FAIL,
            f"/v2/ answers {ping.status} without credentials: anyone may pull and push",
            NOT_EXPOSED_FIX,
        )
    challenge = ping.headers.get("WWW-Authenticate") or "no challenge"
    return Result(
        name,
        Status.FAIL,
        f"/v2/ without credentials: {ping.status} ({challenge}), not 401 with Basic",
        "the URL must reach registry-proxy (or an edge passing its answers on)",
    )


def firewall_rule(port: int) -> str:
    """The DOCKER-USER rule docs/swarm.md gives for the registry's own port, for `port`."""
    return (
        "iptables -I DOCKER-USER -o docker_gwbridge -p tcp -m conntrack "
        f"--ctorigdstport {port} --ctdir ORIGINAL -j DROP"
    )


def check_registry_port(probe: Probe) -> Result:
    """The registry's own port on the same host does not accept connections from here."""
    name = "registry-port"
    target = probe.target
    port = target.registry_port
    if port == target.port:
        return Result(
            name,
            Status.WARN,
            f"port {port} is the URL's own port: not checked",
            "name the registry's own port with --registry-port",
        )
    where = f"{target.bracketed_host}:{port}"
    try:
        socket.create_connection((target.host, port), timeout=target.timeout).close()
    except OSError as exc:
        return Result(name, Status.PASS, f"{where}: {_describe(exc)} (closed to this client)")
    try:
        answer = request(target, "GET", "/v2/", scheme="http", port=port)
        seen = f"; plain HTTP /v2/ answers {answer.status}"
    except ProbeError:
        seen = ""
    return Result(
        name,
        Status.FAIL,
        f"{where} accepts connections{seen}: the registry's own port allows everything the "
        "registry does, without the proxy's logins and access rules",
        "close it to the outside. Compose: do not publish the registry's port. Swarm stack: on "
        f"every node, `{firewall_rule(port)}` (docs/swarm.md: the registry's own port); or a cloud "
        f"firewall that allows nothing on {port}",
    )


def check_certificate(probe: Probe) -> Result:
    """The chain verifies for the host (against --ca-file or the system store) and has more
    than MIN_DAYS_LEFT days left."""
    name = "certificate"
    target = probe.target
    if target.scheme != "https":
        return Result(
            name,
            Status.FAIL,
            f"{target.url} is plain HTTP: clients would send passwords in clear",
            "serve HTTPS: tls.cert and tls.key, or a TLS edge in front",
        )
    roots = f"--ca-file {target.ca_file}" if target.ca_file else "the system's trust store"
    try:
        with (
            socket.create_connection((target.host, target.port), timeout=target.timeout) as raw,
            trust_context(target).wrap_socket(raw, server_hostname=target.host) as tls,
        ):
            certificate = tls.getpeercert()
    except ssl.SSLCertVerificationError as exc:
        return Result(
            name,
            Status.FAIL,
            f"not trusted by {roots}: {exc.verify_message}",
            _trust_fix(exc.verify_code, target.host),
        )
    except (OSError, ssl.SSLError) as exc:
        return Result(
            name,
            Status.FAIL,
            f"TLS handshake failed: {_describe(exc)}",
            "the URL's port must speak TLS (tls.cert and tls.key, or a TLS edge)",
        )
    not_after = str(certificate["notAfter"]) if certificate else ""
    expires = ssl.cert_time_to_seconds(not_after)
    days = int((expires - time.time()) // 86400)
    when = time.strftime("%Y-%m-%d", time.gmtime(expires))
    if days <= MIN_DAYS_LEFT:
        return Result(
            name,
            Status.FAIL,
            f"valid for {target.host}, but expires {when} (in {days} days)",
            "renew it now; check that automatic renewal runs (the proxy re-reads "
            "tls.cert and tls.key when they change)",
        )
    return Result(
        name, Status.PASS, f"valid for {target.host} by {roots}, expires {when} (in {days} days)"
    )


def _trust_fix(code: int, host: str) -> str:
    if code in _NAME_MISMATCH:
        return f"issue a certificate whose subjectAltName names {host}"
    if code == _EXPIRED:
        return "renew the certificate"
    return (
        "serve the full chain (the certificate, then its intermediates) from a CA the clients "
        "trust (or name your private CA with --ca-file)"
    )


def check_plain_http(probe: Probe) -> Result:
    """No plain-HTTP listener on the URL's port or port 80 takes credentials.

    A listener takes credentials when its /v2/ answers 2xx or asks for Basic credentials (the
    client then sends them in clear). No listener, a closed connection, a redirect to https://
    or any other answer (a 400 for plain HTTP on a TLS port, a 404 from a web server) passes.
    """
    name = "plain-http"
    target = probe.target
    ports = [target.port] if target.scheme == "http" else [target.port, 80]
    seen, wrong = [], []
    for port in dict.fromkeys(ports):
        verdict, bad = _plain_http_verdict(target, port)
        seen.append(f"http://{target.bracketed_host}:{port}/v2/ {verdict}")
        if bad:
            wrong.append(port)
    if wrong:
        return Result(
            name,
            Status.FAIL,
            "; ".join(seen),
            "serve only HTTPS: close plain HTTP, or redirect it to https:// "
            "(nginx: `return 301 https://$host$request_uri;`)",
        )
    return Result(name, Status.PASS, "; ".join(seen))


def _plain_http_verdict(target: Target, port: int) -> tuple[str, bool]:
    try:
        answer = request(target, "GET", "/v2/", scheme="http", port=port)
    except ProbeError as exc:
        return f"{exc}: no plain-HTTP answer", False
    if 300 <= answer.status < 400:
        location = answer.headers.get("Location") or ""
        if location.lower().startswith("https://"):
            return f"redirects to {location}", False
        return f"redirects to {location or 'nowhere'}, not to https://", True
    if answer.status == 401 and _is_basic_challenge(answer):
        return "asks for Basic credentials over plain HTTP", True
    if 200 <= answer.status < 300:
        return f"answers {answer.status} over plain HTTP", True
    return f"answers {answer.status}, takes no credentials", False


def check_upload_location(probe: Probe) -> Result:
    """With --user: an upload's `Location` is on the public https host; the upload is cancelled.

    The DELETE that cancels it goes to the Location's path on the public URL, so the
    credentials never go to whatever host a wrong Location names.
    """
    name = "upload-location"
    target = probe.target
    if target.user is None:
        return Result(name, Status.SKIP, "skipped: it starts an upload, which needs --user")
    if target.scheme != "https":
        return Result(name, Status.SKIP, "skipped: the URL is plain HTTP, credentials not sent")
    path = f"/v2/{target.repository}/blobs/uploads/"
    login = _credentials(target)
    try:
        started = request(
            target, "POST", path, headers={**login, "Content-Length": "0"}, verify=True
        )
    except ProbeError as exc:
        if isinstance(exc.cause, ssl.SSLCertVerificationError):
            return Result(
                name, Status.SKIP, "skipped: the certificate is not trusted, credentials not sent"
            )
        return Result(name, Status.FAIL, f"POST {path}: {exc}")
    location = started.headers.get("Location")
    if started.status != 202 or not location:
        return Result(
            name,
            Status.FAIL,
            f"POST {path} as {target.user}: {started.status}",
            _upload_refused_fix(started.status),
        )
    public = urlsplit(target.url)
    resolved = urlsplit(urljoin(target.url + path, location))
    cancelled = _cancel(target, resolved.path + (f"?{resolved.query}" if resolved.query else ""))
    shown = location if len(location) <= 80 else location[:77] + "..."
    if resolved.scheme == "https" and (resolved.hostname, resolved.port or 443) == (
        public.hostname,
        public.port or 443,
    ):
        return Result(name, Status.PASS, f"Location {shown} is on {target.url}; {cancelled}")
    return Result(
        name,
        Status.FAIL,
        f"Location {shown} is not on {target.url}: clients would follow it; {cancelled}",
        "the registry builds it from the Host and X-Forwarded-Proto it gets: behind "
        "a TLS edge, list the edge in trusted_proxies; leave the registry's http.host "
        "unset or set it to the public https:// URL",
    )


def _upload_refused_fix(status: int) -> str:
    if status == 401:
        return "the login was refused: check --user and the password"
    if status == 403:
        return "the user may not push there: name a repository it may push to with --repository"
    return "the proxy or the registry refused the upload; see their logs"


def _cancel(target: Target, path: str) -> str:
    try:
        answer = request(target, "DELETE", path, headers=_credentials(target), verify=True)
    except ProbeError as exc:
        return f"cancelling it failed ({exc}); the registry purges stale uploads"
    if 200 <= answer.status < 300:
        return "upload cancelled"
    return f"cancelling it got {answer.status}; the registry purges stale uploads"


def check_headers(probe: Probe) -> Result:
    """`Docker-Distribution-Api-Version` is sent; no `Server` or `X-Powered-By` banner is."""
    name = "headers"
    try:
        answers = [probe.get("/v2/")]
    except ProbeError as exc:
        return Result(name, Status.FAIL, f"GET /v2/: {exc}")
    with contextlib.suppress(ProbeError):
        answers.append(probe.get("/v2/_catalog"))
    failures, warnings, fixes = [], [], []
    if not answers[0].headers.get(API_VERSION_HEADER):
        failures.append(f"/v2/ lacks {API_VERSION_HEADER}")
        fixes.append(f"the edge must pass the registry's {API_VERSION_HEADER} header on")
    banners = _values(answers, "Server")
    for banner in banners:
        # A version helps an attacker pick an exploit; a bare name (nginx with server_tokens
        # off, which cannot drop the header without a module) only warns.
        if any(character.isdigit() for character in banner):
            failures.append(f"Server: {banner} names a version")
        else:
            warnings.append(f"Server: {banner} names the software")
    if banners:
        fixes.append("drop the Server banner at the edge (nginx: `server_tokens off;`)")
    powered = [f"X-Powered-By: {value}" for value in _values(answers, "X-Powered-By")]
    if powered:
        failures.extend(powered)
        fixes.append("drop X-Powered-By at the edge (nginx: `proxy_hide_header X-Powered-By;`)")
    found = "; ".join(failures + warnings)
    if failures:
        return Result(name, Status.FAIL, found, "; ".join(fixes))
    version = answers[0].headers.get(API_VERSION_HEADER)
    if warnings:
        return Result(name, Status.WARN, f"{API_VERSION_HEADER}: {version}; {found}", fixes[0])
    return Result(name, Status.PASS, f"{API_VERSION_HEADER}: {version}; no Server, no X-Powered-By")


def _values(answers: list[Response], header: str) -> list[str]:
    """Every distinct value of `header` in `answers`, in order."""
    found = (str(value) for answer in answers for value in answer.headers.get_all(header) or [])
    return list(dict.fromkeys(found))


def check_catalog(probe: Probe) -> Result:
    """The catalog without credentials is refused; allowed only warns when /v2/ is guarded
    (the proxy then answers it because a rule grants `@anonymous` the catalog)."""
    name = "catalog"
    try:
        catalog = probe.get("/v2/_catalog")
    except ProbeError as exc:
        return Result(name, Status.FAIL, f"GET /v2/_catalog: {exc}")
    if catalog.status in (401, 403, 404, 405):
        return Result(name, Status.PASS, f"/v2/_catalog without credentials: {catalog.status}")
    if catalog.status != 200:
        return Result(name, Status.FAIL, f"/v2/_catalog without credentials: {catalog.status}")
    try:
        guarded = probe.get("/v2/").status == 401
    except ProbeError:
        guarded = False
    if not guarded:
        return Result(
            name,
            Status.FAIL,
            "/v2/_catalog lists repositories without credentials, and /v2/ is open",
            NOT_EXPOSED_FIX,
        )
    return Result(
        name,
        Status.WARN,
        "/v2/_catalog lists repositories without credentials: right only if an "
        "access rule is meant to grant @anonymous the catalog",
        "if it is not meant, remove `catalog` from the rules naming @anonymous",
    )


CHECKS: tuple[Callable[[Probe], Result], ...] = (
    check_challenge,
    check_registry_port,
    check_certificate,
    check_plain_http,
    check_upload_location,
    check_headers,
    check_catalog,
)


def run(target: Target) -> list[Result]:
    """Every check, in order."""
    probe = Probe(target)
    return [check(probe) for check in CHECKS]


def exit_status(results: list[Result]) -> int:
    """1 when any check failed, else 0 (warnings and skips included)."""
    return 1 if any(result.status is Status.FAIL for result in results) else 0


def render_text(target: Target, results: list[Result]) -> str:
    """One line per check (`pass`, `FAIL`, `warn`, `skip`), each fix indented below it."""
    width = max(len(result.name) for result in results)
    lines = [f"registry-proxy doctor: {target.url}"]
    for result in results:
        mark = "FAIL" if result.status is Status.FAIL else result.status.value
        lines.append(f"{mark:<4}  {result.name:<{width}}  {result.detail}")
        if result.fix and result.status in (Status.FAIL, Status.WARN):
            lines.append(f"      {'':<{width}}  fix: {result.fix}")
    counts = {status: sum(r.status is status for r in results) for status in Status}
    lines.append(", ".join(f"{counts[status]} {status.value}" for status in Status))
    return "\n".join(lines) + "\n"


def render_json(target: Target, results: list[Result]) -> str:
    """The results as one JSON object: the URL, the checks, and the exit status."""
    checks = [{**asdict(result), "status": result.status.value} for result in results]
    document = {"url": target.url, "checks": checks, "exit": exit_status(results)}
    return json.dumps(document, indent=2) + "\n"
