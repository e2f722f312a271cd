"""Picking up changed files without a restart: the htpasswd table and the TLS certificate."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from proxy.auth.credentials import CredentialChecker, decoy_hash, measure_check
from proxy.auth.htpasswd_file import HtpasswdError, load_htpasswd
from proxy.config import ConfigError, TLSConfig
from proxy.edge.tls import server_context
from proxy.log import count
from proxy.metrics import Metrics

log = logging.getLogger("registry_proxy.reload")

# Within the 2 s users expect a new or removed account to take effect.
POLL_INTERVAL = 1.0

Signature = tuple[int, int, int, int] | None


def signature(path: Path) -> Signature:
    """What changes when a file is rewritten in place or replaced by rename (Swarm, Kubernetes)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


async def watch(paths: list[Path], on_change: Callable[[], Awaitable[None]]) -> None:
    """Call `on_change` whenever any of `paths` changes; runs until cancelled."""
    seen = [signature(p) for p in paths]
    while True:
        await asyncio.sleep(POLL_INTERVAL)
        now = [signature(p) for p in paths]
        if now != seen:
            seen = now
            await on_change()


class CredentialReloader:
    """Swaps in a re-read htpasswd table; a bad file keeps the last good one."""

    def __init__(self, path: Path, checker: CredentialChecker, metrics: Metrics) -> None:
        self._path = path
        self._checker = checker
        self._metrics = metrics
        self._lock = asyncio.Lock()
        metrics.users.set(checker.user_count)
        metrics.last_reload.set(time.time())

    async def reload(self, reason: str) -> None:
        """Re-read the file (parsing and decoy hashing off the event loop)."""
        async with self._lock:
            try:
                users, decoy, decoy_cost = await asyncio.to_thread(self._load)
            except HtpasswdError as exc:
                self._metrics.reloads.labels("failure").inc()
                log.error("htpasswd reload (%s) failed, keeping %s: %s",
                          reason, count(self._checker.user_count, "user"), exc)  # fmt: skip
                return
            self._checker.replace_users(users, decoy, decoy_cost)
            self._metrics.reloads.labels("success").inc()
            self._metrics.users.set(len(users))
            self._metrics.last_reload.set(time.time())
            log.info("htpasswd reloaded (%s): %s", reason, count(len(users), "user"))

    def _load(self) -> tuple[dict[str, str], str, float]:
        users = load_htpasswd(self._path)
        decoy = decoy_hash(users)
        return users, decoy, measure_check(decoy)

    async def watch(self) -> None:
        """Reload whenever the file changes."""
        await watch([self._path], lambda: self.reload("file changed"))


class CertificateReloader:
    """Serves new handshakes with a re-read certificate; existing connections keep theirs.

    asyncio binds one SSLContext to the listener, so the listener's context hands each
    handshake to the current one from its SNI callback, which OpenSSL calls for every
    ClientHello, with or without a server name.
    """

    def __init__(self, tls: TLSConfig) -> None:
        self._tls = tls
        self._current = server_context(tls)
        self.listener_context = server_context(tls)
        self.listener_context.sni_callback = self._select
        self.expires_at = certificate_expiry(tls)
        self._metrics: Metrics | None = None

    def report_to(self, metrics: Metrics) -> None:
        """Export the expiry time and count the reloads in `metrics`."""
        self._metrics = metrics
        metrics.certificate_expiry.source = lambda: self.expires_at

    def _select(self, connection: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        connection.context = self._current

    async def reload(self, reason: str) -> None:
        """Load the files into a fresh context; a broken pair keeps the current one."""
        try:
            context, expires_at = await asyncio.to_thread(self._load)
        except ConfigError as exc:
            self._count("failure")
            log.error("certificate reload (%s) failed, keeping the current one: %s", reason, exc)
            return
        self._current, self.expires_at = context, expires_at
        self._count("success")
        log.info("certificate reloaded (%s)", reason)

    def _load(self) -> tuple[ssl.SSLContext, float]:
        return server_context(self._tls), certificate_expiry(self._tls)

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.tls_reloads.labels(result).inc()

    async def watch(self) -> None:
        """Reload whenever the certificate or key file changes."""
        assert self._tls.cert is not None and self._tls.key is not None
        await watch([self._tls.cert, self._tls.key], lambda: self.reload("file changed"))


def certificate_expiry(tls: TLSConfig) -> float:
    """Unix time the first certificate in `tls.cert` (the one served) stops being valid."""
    assert tls.cert is not None
    # Imported here: a proxy without TLS never loads it.
    from cryptography import x509

    try:
        served = x509.load_pem_x509_certificates(tls.cert.read_bytes())[0]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tls.cert: cannot read the expiry date of {tls.cert}: {exc}") from None
    return served.not_valid_after_utc.timestamp()
