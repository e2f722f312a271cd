"""What `serve` refuses before it listens, checked in one place so `check-config` refuses it too."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Mapping
from pathlib import Path

from proxy.app import warn_about_unknown_users
from proxy.auth.directory import (
    Directory,
    DirectoryUnavailable,
    ServiceAccountRefused,
    read_bind_password,
)
from proxy.auth.htpasswd_file import HtpasswdError, HtpasswdUnreadableError, load_htpasswd
from proxy.auth.tokens_file import TokensError, load_tokens
from proxy.config import Address, Config, ConfigError, source_of
from proxy.edge.internals import MissingInternal, require_private_names
from proxy.edge.listen import c_parser_in_use
from proxy.edge.tls import server_context
from proxy.ui.session import read_session_key

log = logging.getLogger("registry_proxy")

_WILDCARDS = ("0.0.0.0", "::", "")


def check_startable(
    config: Config, config_path: Path | None, *, connect: bool = True, strict: bool = False
) -> dict[str, str]:
    """Raise ConfigError or HtpasswdError for whatever would stop `serve`; return the users.

    With `connect` the LDAP service account binds: `serve` refuses to start when the directory
    refuses it, and starts (logging a warning) when the directory does not answer, since
    htpasswd users and cached logins need no directory. `strict` (check-config) refuses both;
    check-config `--no-connect` skips the bind, to check a configuration away from its directory.
    """
    require_aiohttp()
    _check_listeners(config, config_path)
    users = _load_users(config, config_path)
    _check_tokens(config, config_path, users)
    if config.tls.enabled:
        try:
            server_context(config.tls)
        except ConfigError as exc:
            raise ConfigError(f"{source_of('tls.cert', config_path)}: {exc}") from None
    if config.ldap.enabled:
        _check_directory(config, config_path, connect, strict)
    _check_session_key(config, config_path)
    return users


def _check_session_key(config: Config, config_path: Path | None) -> None:
    """With `ui` on, the key that signs the browser's sessions is readable and long enough."""
    if not config.ui or config.ui_session_key_file is None:
        return
    try:
        read_session_key(config.ui_session_key_file)
    except (OSError, ValueError) as exc:
        where = source_of("ui_session_key_file", config_path)
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ConfigError(
            f"{where}: ui_session_key_file: {config.ui_session_key_file}: {reason}"
        ) from None


def _check_directory(config: Config, config_path: Path | None, connect: bool, strict: bool) -> None:
    """The bind password file is readable, and (with `connect`) the service account binds."""
    settings = config.ldap
    try:
        password = read_bind_password(settings)
    except (OSError, UnicodeDecodeError) as exc:
        where = source_of("ldap.bind_password_file", config_path)
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(
            f"{where}: ldap.bind_password_file: cannot read {settings.bind_password_file}: {reason}"
        ) from None
    if settings.ca_file is not None and not settings.ca_file.is_file():
        where = source_of("ldap.ca_file", config_path)
        raise ConfigError(f"{where}: ldap.ca_file: no such file {settings.ca_file}")
    if not connect:
        return
    directory = Directory(settings, password)
    try:
        asyncio.run(directory.check())
    except DirectoryUnavailable as exc:
        where = source_of("ldap.url", config_path)
        account = settings.bind_dn or "anonymous"
        if not strict and not isinstance(exc, ServiceAccountRefused):
            log.warning(
                "ldap: %s does not answer (%s); directory users cannot log in until it does",
                settings.url,
                exc,
            )
            return
        raise ConfigError(
            f"{where}: ldap: cannot bind to {settings.url} as {account}: {exc} "
            "(check-config --no-connect skips this check)"
        ) from None
    finally:
        directory.close()


def require_aiohttp() -> None:
    """Raise ConfigError unless this aiohttp has what the edge relies on (every process)."""
    try:
        require_private_names()
    except MissingInternal as exc:
        raise ConfigError(str(exc)) from None
    require_c_parser()


def require_c_parser() -> None:
    """The pure-Python parser is slower and has had request smuggling bugs the C one had not."""
    if not c_parser_in_use():
        raise ConfigError(
            "aiohttp's C HTTP parser is not in use (AIOHTTP_NO_EXTENSIONS set, or aiohttp "
            "installed without its extensions); refusing to serve the internet with the Python one"
        )


def _overlap(a: Address, b: Address) -> bool:
    """Whether both cannot be bound at once: same port, and same host or a wildcard."""
    return a.port == b.port and (a.host == b.host or a.host in _WILDCARDS or b.host in _WILDCARDS)


def _check_listeners(config: Config, config_path: Path | None) -> None:
    admin = config.admin_listen
    if admin is not None and _overlap(admin, config.listen):
        where = source_of("admin_listen", config_path)
        if where == "default":
            where = source_of("listen", config_path)
        raise ConfigError(
            f"{where}: admin_listen: {admin} is the same port as listen {config.listen}; "
            "give the admin listener a port of its own"
        )


def _load_users(config: Config, config_path: Path | None) -> dict[str, str]:
    try:
        return load_htpasswd(config.htpasswd)
    except HtpasswdUnreadableError as exc:
        # A missing file is usually a wrong path: say which line or variable gave it.
        where = source_of("htpasswd", config_path)
        raise HtpasswdError(f"{where}: htpasswd: {exc}") from None


def _check_tokens(config: Config, config_path: Path | None, users: Mapping[str, str]) -> None:
    """The tokens file loads, and no token shares a name with a user."""
    if config.tokens is None:
        return
    try:
        tokens = load_tokens(config.tokens)
    except TokensError as exc:
        raise ConfigError(f"{source_of('tokens', config_path)}: tokens: {exc}") from None
    clash = sorted(set(users) & set(tokens))
    if clash:
        raise ConfigError(
            f"{', '.join(clash)}: both a user in {config.htpasswd} and a token in "
            f"{config.tokens}; a login could not say which it means"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_about_cleartext(config: Config) -> None:
    """Basic credentials on a plain-HTTP public listener cross the network readable by anyone."""
    if _is_loopback(config.listen.host) or config.tls.enabled or config.trusted_proxies:
        return
    log.warning(
        "listen %s is not loopback and has no TLS and no trusted_proxies: passwords would "
        "cross the network in clear; set tls.cert and tls.key, or terminate TLS in a proxy "
        "listed in trusted_proxies",
        config.listen,
    )


def startup_warnings(config: Config, users: Mapping[str, str], config_path: Path | None) -> None:
    """Log what `serve` warns about at start (`check-config` too)."""
    warn_about_cleartext(config)
    warn_about_unknown_users(config.access, users, config_path, directory=config.ldap.enabled)
