"""An LDAP directory: search a user with the service account, bind as the DN found, read groups.

python-ldap (libldap) blocks, so every call runs in a small thread pool of its own, each
operation bounded by libldap's network and operation timeouts, and the whole login by
`asyncio.wait_for`: a directory that hangs fills at most this pool, never the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import ldap
from ldap.dn import escape_dn_chars
from ldap.filter import escape_filter_chars

from proxy.config import LdapConfig

log = logging.getLogger("registry_proxy")

T = TypeVar("T")

# libldap connections open at once; logins past it wait (bounded by the login's deadline).
DIRECTORY_THREADS = 4
# Each operation is bounded by `timeout`; a login waiting longer (queued behind logins stuck on
# a hung directory) counts as the directory not answering.
_DEADLINE_TIMEOUTS = 2
# The directory is not answering, or refuses the service account: nobody new can log in.
_UNREACHABLE = (
    ldap.SERVER_DOWN,
    ldap.TIMEOUT,
    ldap.CONNECT_ERROR,
    ldap.UNAVAILABLE,
    ldap.BUSY,
    ldap.UNWILLING_TO_PERFORM,
    OSError,
)


_PLACEHOLDER = re.compile(r"\{(dn|user)\}")


class DirectoryUnavailable(Exception):
    """The directory did not answer in time, or not as configured; the login is undecided."""


class ServiceAccountRefused(DirectoryUnavailable):
    """The directory answers but refuses `bind_dn` with its password: a configuration error."""


def read_bind_password(settings: LdapConfig) -> str:
    """The service account's password: `bind_password_file`'s one line (OSError if unreadable)."""
    if settings.bind_password_file is None:
        return ""
    return settings.bind_password_file.read_text(encoding="utf-8").rstrip("\r\n")


def user_filter(template: str, user: str) -> str:
    """`user_filter` for this user, escaped as RFC 4515 says (`*`, `(`, `)`, `\\`, NUL)."""
    return template.replace("{user}", escape_filter_chars(user))


def group_filter(template: str, dn: str, user: str) -> str:
    """`group_filter` for this member: its DN and name escaped as RFC 4515 says."""
    values = {"dn": escape_filter_chars(dn), "user": escape_filter_chars(user)}
    # One pass: a `{user}` inside the DN is the DN's text, not a placeholder.
    return _PLACEHOLDER.sub(lambda match: values[match[1]], template)


def user_base(template: str, user: str) -> str:
    """`user_base`, with `{user}` (if any) escaped as a DN value (RFC 4514)."""
    return template.replace("{user}", escape_dn_chars(user))


# Operational attributes that change with every change to an entry: the standard one (whole
# seconds), OpenLDAP's change sequence number and Active Directory's (finer than a second).
_STAMPS = ["modifyTimestamp", "entryCSN", "uSNChanged"]


@dataclass(frozen=True)
class DirectoryUser:
    """What a lookup finds: the user's groups, and a stamp of the entry's last change."""

    groups: frozenset[str]
    stamp: str


class Directory:
    """Logins against one LDAP directory, run off the event loop."""

    def __init__(self, settings: LdapConfig, bind_password: str) -> None:
        self._settings = settings
        # Read once at start; kept only here, in memory.
        self._bind_password = bind_password
        self._pool = concurrent.futures.ThreadPoolExecutor(
            DIRECTORY_THREADS, thread_name_prefix="ldap"
        )

    @property
    def deadline(self) -> float:
        """Seconds a whole login may take before it counts as the directory not answering."""
        return self._settings.timeout * _DEADLINE_TIMEOUTS

    async def login(self, user: str, password: str) -> frozenset[str] | None:
        """The user's groups if the password is right, else None; DirectoryUnavailable: unsure."""
        if not password:
            # A simple bind with an empty password is an unauthenticated bind: it succeeds.
            return None
        return await self._run(lambda: self._login(user, password))

    async def lookup(self, user: str) -> DirectoryUser | None:
        """The user's groups and entry stamp, if the directory still holds the user, else None.

        Asked as the service account: no password, so what ends a browser session is a change
        to the entry (a new password, a lock-out, a disabled account all change its stamp).
        """
        return await self._run(lambda: self._lookup(user))

    async def check(self) -> None:
        """Connect and bind as the service account (check-config); DirectoryUnavailable if not."""
        await self._run(lambda: _close(self._service_connection()))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, call: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._pool, call), self.deadline)
        except TimeoutError:
            raise DirectoryUnavailable(f"no answer within {self.deadline:g} s") from None

    def _connect(self) -> Any:
        settings = self._settings
        connection = ldap.initialize(settings.url)
        connection.set_option(ldap.OPT_PROTOCOL_VERSION, ldap.VERSION3)
        # A referral would send the user's password to another server: follow none.
        connection.set_option(ldap.OPT_REFERRALS, 0)
        connection.set_option(ldap.OPT_NETWORK_TIMEOUT, settings.timeout)
        connection.set_option(ldap.OPT_TIMEOUT, settings.timeout)
        connection.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
        if settings.ca_file is not None:
            connection.set_option(ldap.OPT_X_TLS_CACERTFILE, str(settings.ca_file))
        # Applies the TLS options above to this connection (libldap reads them at NEWCTX).
        connection.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
        if settings.start_tls:
            connection.start_tls_s()
        return connection

    def _service_connection(self) -> Any:
        try:
            connection = self._connect()
        except _UNREACHABLE as exc:
            raise DirectoryUnavailable(_describe(exc)) from None
        try:
            connection.simple_bind_s(self._settings.bind_dn or "", self._bind_password)
        except ldap.INVALID_CREDENTIALS:
            _close(connection)
            raise ServiceAccountRefused(
                "the directory refuses the password of ldap.bind_dn"
            ) from None
        except _UNREACHABLE as exc:
            _close(connection)
            raise DirectoryUnavailable(_describe(exc)) from None
        except BaseException:
            _close(connection)
            raise
        return connection

    def _login(self, user: str, password: str) -> frozenset[str] | None:
        connection = self._service_connection()
        try:
            dn = self._find_user(connection, user)
            if dn is None:
                return None
            groups = self._groups(connection, dn, user)
            try:
                connection.simple_bind_s(dn, password)
            except ldap.INVALID_CREDENTIALS:
                return None
            return groups
        except _UNREACHABLE as exc:
            raise DirectoryUnavailable(_describe(exc)) from None
        except ldap.LDAPError as exc:
            # A malformed filter or base from the configuration, a size limit: not this user.
            log.warning("ldap: login of a user refused: %s", _describe(exc))
            return None
        finally:
            _close(connection)

    def _lookup(self, user: str) -> DirectoryUser | None:
        connection = self._service_connection()
        try:
            found = self._find_entry(connection, user)
            if found is None:
                return None
            dn, stamp = found
            return DirectoryUser(self._groups(connection, dn, user), stamp)
        except _UNREACHABLE as exc:
            raise DirectoryUnavailable(_describe(exc)) from None
        except ldap.LDAPError as exc:
            log.warning("ldap: lookup of a user refused: %s", _describe(exc))
            return None
        finally:
            _close(connection)

    def _find_user(self, connection: Any, user: str) -> str | None:
        """The DN of the one entry the user filter matches; None for none or several."""
        found = self._find_entry(connection, user)
        return None if found is None else found[0]

    def _find_entry(self, connection: Any, user: str) -> tuple[str, str] | None:
        """The DN and change stamp of the one entry the user filter matches, or None."""
        settings = self._settings
        assert settings.user_base is not None
        try:
            found = connection.search_ext_s(
                user_base(settings.user_base, user),
                ldap.SCOPE_SUBTREE,
                user_filter(settings.user_filter, user),
                # Operational attributes, sent only when asked for.
                _STAMPS,
                timeout=settings.timeout,
                sizelimit=2,
            )
        except (ldap.SIZELIMIT_EXCEEDED, ldap.NO_SUCH_OBJECT):
            return None
        # Referrals and continuation references come without a DN: never followed.
        entries = [(dn, attributes) for dn, attributes in found if dn]
        if len(entries) != 1:
            return None
        dn, attributes = entries[0]
        # Attribute names are case-insensitive, and directories spell them as they like.
        named = {name.lower(): values for name, values in attributes.items()}
        stamp = b"\0".join(value for name in _STAMPS for value in named.get(name.lower(), ()))
        return dn, stamp.decode("utf-8", "replace")

    def _groups(self, connection: Any, dn: str, user: str) -> frozenset[str]:
        settings = self._settings
        if settings.group_base is None:
            return frozenset()
        attribute = settings.group_name_attribute
        found = connection.search_ext_s(
            settings.group_base,
            ldap.SCOPE_SUBTREE,
            group_filter(settings.group_filter, dn, user),
            [attribute],
            timeout=settings.timeout,
        )
        names: set[str] = set()
        for group_dn, attributes in found:
            if not group_dn:
                continue
            for value in attributes.get(attribute, ()):
                names.add(value.decode("utf-8", "replace"))
        return frozenset(names)


def _close(connection: Any) -> None:
    """Unbind; a connection the directory already broke has nothing left to close."""
    with contextlib.suppress(ldap.LDAPError, OSError):
        connection.unbind_s()


def _describe(exc: BaseException) -> str:
    """libldap's description of an error, without anything the client sent."""
    if isinstance(exc, ldap.LDAPError) and exc.args and isinstance(exc.args[0], dict):
        info = exc.args[0]
        return str(info.get("desc", type(exc).__name__))
    return type(exc).__name__
