"""What the tests share: real processes, requests, fake upstreams, images, and one way to wait.

- `harness`: child processes on loopback ports (the registry, Redis), shared with `bench/`.
- `proxy`: registry-proxy as a child process, and what its log says.
- `polling`: `wait_until` (blocking) and `eventually` (awaited), one polling loop.
- `client`: requests as the tests send them; `metrics`: what /metrics says.
- `upstreams`: fake upstreams; `edges`: HAProxy and nginx in front; `clients`: docker, skopeo
  and podman in sealed environments; `containers`: root podman and the stand-in base image;
  `images`: OCI images from bytes; `tls`: certificates; `clock`: a clock the test moves by hand;
  `ldap`: a real OpenLDAP slapd; `browser`: headless Chromium, and sites served beside it.

Fixtures live in tests/conftest.py. A test module imports from here, never from another test
module (tests/test_suite.py checks it).
"""

from tests.support.browser import (
    CHROMIUM,
    DESKTOP,
    PHONE,
    Browser,
    Viewport,
    artifacts_dir,
    browser_missing,
    serve_in_thread,
    start_browser,
)
from tests.support.client import (
    call,
    exchange_raw,
    push_blob,
    push_image,
    session_from,
    start_download,
    start_stalled_download,
    status_of,
    token,
)
from tests.support.clients import CLIENT_TIMEOUT, Clients, Podman
from tests.support.containers import (
    CONTAINERS_CONF,
    RootPodman,
    build_stand_in_base,
    why_unavailable,
)
from tests.support.edges import Edge, start_haproxy, start_nginx
from tests.support.harness import (
    HTPASSWD_BIN,
    REDIS_BIN,
    REGISTRY_BIN,
    Process,
    RedisServer,
    Registry,
    basic_auth,
    free_port,
    htpasswd,
    http_status,
    sha256,
    unread_bytes,
)
from tests.support.images import OCI_MANIFEST, tar_gz, write_oci_layout
from tests.support.ldap import LDAP_USERS, SLAPD_BIN, Slapd, user_dn
from tests.support.metrics import Samples, gauge, scrape, value
from tests.support.pages import (
    UI_IMMUTABLE,
    UI_RULES,
    PageClient,
    fetch,
    listed_repositories,
    push_labelled,
    signed_in,
    ui_env,
    ui_proxy,
)
from tests.support.polling import STARTUP_DEADLINE, eventually, wait_until
from tests.support.proxy import NO_CACHE, Proxy, access_records, rss, serving, worker_pids
from tests.support.tls import write_certificate
from tests.support.tokens import create_token, token_cli
from tests.support.upstreams import Behaviour, CountingUpstream, counting_upstream, fake_upstream

# The name test_deploy knows the registry binary by.
REGISTRY_BINARY = REGISTRY_BIN

__all__ = [
    "CHROMIUM",
    "CLIENT_TIMEOUT",
    "CONTAINERS_CONF",
    "DESKTOP",
    "HTPASSWD_BIN",
    "LDAP_USERS",
    "NO_CACHE",
    "OCI_MANIFEST",
    "PHONE",
    "REDIS_BIN",
    "REGISTRY_BIN",
    "REGISTRY_BINARY",
    "SLAPD_BIN",
    "STARTUP_DEADLINE",
    "UI_IMMUTABLE",
    "UI_RULES",
    "Behaviour",
    "Browser",
    "Clients",
    "CountingUpstream",
    "Edge",
    "PageClient",
    "Podman",
    "Process",
    "Proxy",
    "RedisServer",
    "Registry",
    "RootPodman",
    "Samples",
    "Slapd",
    "Viewport",
    "access_records",
    "artifacts_dir",
    "basic_auth",
    "browser_missing",
    "build_stand_in_base",
    "call",
    "counting_upstream",
    "create_token",
    "eventually",
    "exchange_raw",
    "fake_upstream",
    "fetch",
    "free_port",
    "gauge",
    "htpasswd",
    "http_status",
    "listed_repositories",
    "push_blob",
    "push_image",
    "push_labelled",
    "rss",
    "scrape",
    "serve_in_thread",
    "serving",
    "session_from",
    "sha256",
    "signed_in",
    "start_browser",
    "start_download",
    "start_haproxy",
    "start_nginx",
    "start_stalled_download",
    "status_of",
    "tar_gz",
    "token",
    "token_cli",
    "ui_env",
    "ui_proxy",
    "unread_bytes",
    "user_dn",
    "value",
    "wait_until",
    "why_unavailable",
    "worker_pids",
    "write_certificate",
    "write_oci_layout",
]
