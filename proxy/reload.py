"""Picking up changed files without a restart: htpasswd, the tokens file, the TLS certificate."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from proxy.auth.credentials import CredentialChecker, decoy_hash, measure_check
from proxy.auth.htpasswd_file import HtpasswdError, load_htpasswd
from proxy.auth.tokens import TokenTable
from proxy.auth.tokens_file import Token, TokensError, load_tokens
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


def name_clash(users: Mapping[str, str], tokens: Mapping[str, Token]) -> list[str]:
    """Names that are both a user and a token: a login could not say which it means."""
    return sorted(set(users) & set(tokens))


def token_expiries(tokens: Mapping[str, Token]) -> dict[str, float]:
    """Token name -> expiry, for the tokens not revoked."""
    return {t.name: t.expires for t in tokens.values() if t.revoked is None}


def read_token_expiries(path: Path) -> dict[str, float]:
    """`token_expiries` of the file as it is now; nothing if it cannot be read."""
    try:
        return token_expiries(load_tokens(path))
    except TokensError:
        return {}


class CredentialReloader:
    """Swaps in a re-read htpasswd table; a bad file keeps the last good one.

    So does a table naming a user that is also a token (`tokens`, when given).
    """

    def __init__(
        self,
        path: Path,
        checker: CredentialChecker,
        metrics: Metrics,
        tokens: TokenTable | None = None,
        tokens_path: Path | None = None,
    ) -> None:
        self._path = path
        self._checker = checker
        self._metrics = metrics
        self._tokens = tokens
        self._tokens_path = tokens_path
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
            clash = name_clash(users, self._tokens.tokens) if self._tokens is not None else []
            if clash:
                self._metrics.reloads.labels("failure").inc()
                log.error("htpasswd reload (%s) failed, keeping %s: %s in %s are tokens in %s",
                          reason, count(self._checker.user_count, "user"), ", ".join(clash),
                          self._path, self._tokens_path)  # fmt: skip
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


class TokenReloader:
    """Swaps in a re-read tokens file; a bad file, or one naming a user, keeps the last good one.

    Polled like htpasswd: a revocation written to a file every proxy reads (a shared volume)
    reaches them all within the poll interval.
    """

    def __init__(
        self,
        path: Path,
        table: TokenTable,
        checker: CredentialChecker,
        metrics: Metrics,
        htpasswd: Path,
    ) -> None:
        self._path = path
        self._table = table
        self._checker = checker
        self._metrics = metrics
        self._htpasswd = htpasswd
        self._lock = asyncio.Lock()
        metrics.token_expiry.source = lambda: token_expiries(self._table.tokens)

    async def reload(self, reason: str) -> None:
        """Re-read the tokens file off the event loop."""
        async with self._lock:
            kept = count(len(self._table.tokens), "token")
            try:
                tokens = await asyncio.to_thread(load_tokens, self._path)
                fresh = TokenTable(tokens)
            except (TokensError, ValueError) as exc:
                self._metrics.token_reloads.labels("failure").inc()
                log.error("tokens reload (%s) failed, keeping %s: %s", reason, kept, exc)
                return
            clash = name_clash(self._checker.users, tokens)
            if clash:
                self._metrics.token_reloads.labels("failure").inc()
                log.error("tokens reload (%s) failed, keeping %s: %s in %s are users in %s",
                          reason, kept, ", ".join(clash), self._path, self._htpasswd)  # fmt: skip
                return
            self._table.replace(fresh.tokens)
            self._metrics.token_reloads.labels("success").inc()
            log.info("tokens reloaded (%s): %s", reason, count(len(tokens), "token"))

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
