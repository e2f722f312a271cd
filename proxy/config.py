"""Typed configuration: defaults, then the YAML file, then `PROXY_*` environment variables.

Each setting is declared once, as a field of `Config` (or of a section such as `TLSConfig`) whose
`Setting` says how to parse it, its default, how check-config shows it and whether SIGHUP applies
it; the key list, the environment names, `describe` and the reload comparison all derive from it.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property, reduce
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import yaml
from yarl import URL

from proxy.access.immutable import ImmutableTags, parse_immutable_tags
from proxy.access.rules import AccessPolicy, parse_access

ENV_PREFIX = "PROXY_"
CONFIG_ENV = "PROXY_CONFIG"


class ConfigError(Exception):
    """Invalid configuration; the message names the source, the key and what was expected."""


@dataclass(frozen=True)
class Address:
    """A `host:port` to listen on."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# Value parsers: each takes what YAML or the environment gave, or raises ValueError("expected ...").


def _address(value: object) -> Address:
    text = str(value).strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"expected host:port with a port from 1 to 65535, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"expected an IPv6 host in brackets like [::1]:8080, got {value!r}")
    return Address(host or "0.0.0.0", int(port_text))


def _optional_address(value: object) -> Address | None:
    if value is None or str(value).strip() == "":
        return None
    return _address(value)


def _upstream(value: object) -> URL:
    url = URL(str(value).strip())
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"expected an http:// or https:// URL with a host, got {value!r}")
    if url.user or url.password:
        raise ValueError("expected no credentials in the URL: the proxy never forwards any")
    if url.raw_path not in ("", "/") or url.raw_query_string or url.raw_fragment:
        raise ValueError(f"expected only scheme://host:port, got {value!r}")
    return url.origin()


def _path(value: object) -> Path:
    if value is None or str(value).strip() == "":
        raise ValueError("expected a file path")
    return Path(str(value).strip())


def _optional_path(value: object) -> Path | None:
    if value is None or str(value).strip() == "":
        return None
    return Path(str(value).strip())


_DURATION = re.compile(r"([0-9]+)([dhm])")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60}


def parse_duration(text: str) -> float:
    """Seconds in `90d`, `12h` or `30m`; ValueError otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or int(match[1]) == 0:
        raise ValueError(f"expected a duration such as 90d, 12h or 30m, got {text!r}")
    return float(int(match[1]) * _UNIT_SECONDS[match[2]])


def _lifetime(value: object) -> float:
    """A duration (`90d`, `12h`, `30m`) or a number of seconds."""
    try:
        return _seconds(value)
    except ValueError:
        pass
    try:
        return parse_duration(str(value))
    except ValueError:
        raise ValueError(f"expected a duration such as 90d, 12h or 30m, got {value!r}") from None


def _realm(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in '"\\') or not text.isprintable():
        raise ValueError(f"expected printable text without quotes or backslashes, got {value!r}")
    return text


def _seconds(value: object) -> float:
    try:
        seconds = float(str(value))
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {value!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return seconds


def _count(value: object) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"expected a whole number of at least 1, got {value!r}")
    return int(text)


def _workers(value: object) -> int:
    """A count, or `auto`: the CPUs this process may run on (cgroup cpusets included)."""
    if str(value).strip().lower() == "auto":
        return len(os.sched_getaffinity(0))
    try:
        return _count(value)
    except ValueError:
        raise ValueError(f"expected a whole number of at least 1 or auto, got {value!r}") from None


_LOG_LEVELS = ("debug", "info", "warning", "error")


def _log_level(value: object) -> str:
    text = str(value).strip().lower()
    if text not in _LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)}, got {value!r}")
    return text


_ACCESS_LOG_STYLES = ("json", "text", "off")
_LOG_FORMATS = ("text", "json")


def _access_log(value: object) -> str:
    text = str(value).strip().lower()
    if text not in _ACCESS_LOG_STYLES:
        raise ValueError(f"expected one of {', '.join(_ACCESS_LOG_STYLES)}, got {value!r}")
    return text


def _log_format(value: object) -> str:
    text = str(value).strip().lower()
    if text not in _LOG_FORMATS:
        raise ValueError(f"expected one of {', '.join(_LOG_FORMATS)}, got {value!r}")
    return text


def _networks(value: object) -> tuple[Network, ...]:
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValueError(f"expected a list of addresses or CIDR networks, got {value!r}")
    networks = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"expected an address or CIDR network, got {item!r}") from None
    return tuple(networks)


_ORIGIN_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(value: object) -> str:
    """An origin as browsers send it: lower-case `scheme://host`, the port only if not default."""
    text = str(value).strip()
    if "*" in text:
        raise ValueError(
            f"expected named origins, got {value!r}: credentials are allowed, so no wildcard"
        )
    expected = f"expected scheme://host[:port] with http or https and no path, got {value!r}"
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(expected) from None
    scheme, host = parts.scheme.lower(), parts.hostname
    if (
        scheme not in _ORIGIN_DEFAULT_PORTS
        or not host
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or "?" in text
        or "#" in text
        or port == 0
    ):
        raise ValueError(expected)
    if not host.isascii() or not host.isprintable() or " " in host:
        raise ValueError(f"expected an ASCII (punycode) host as browsers send it, got {value!r}")
    if ":" in host:
        host = f"[{host}]"
    suffix = "" if port is None or port == _ORIGIN_DEFAULT_PORTS[scheme] else f":{port}"
    return f"{scheme}://{host}{suffix}"


def _origins(value: object) -> tuple[str, ...]:
    """A list of origins (or one, or several separated by commas), normalised, without repeats."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValueError(f"expected a list of origins like https://ui.example.com, got {value!r}")
    return tuple(dict.fromkeys(_origin(item) for item in items if str(item).strip()))


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _optional_text(value: object) -> str | None:
    text = "" if value is None else str(value).strip()
    return text or None


def _ldap_url(value: object) -> str | None:
    """Empty (no directory), or ldap://HOST[:PORT] / ldaps://HOST[:PORT]."""
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if (
        parts.scheme not in ("ldap", "ldaps")
        or not parts.hostname
        or port == 0
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ValueError(f"expected ldap://HOST[:PORT] or ldaps://HOST[:PORT], got {text!r}")
    return text


def _filter_template(*placeholders: str) -> Callable[[object], str]:
    """An LDAP filter in parentheses naming at least one of `placeholders` (`{user}`)."""

    def parse(value: object) -> str:
        text = str(value).strip()
        if not (text.startswith("(") and text.endswith(")")) or not any(
            placeholder in text for placeholder in placeholders
        ):
            raise ValueError(
                f"expected a filter in parentheses with {' or '.join(placeholders)}, got {text!r}"
            )
        return text

    return parse


def _attribute_name(value: object) -> str:
    text = str(value).strip()
    if not text or not text.isascii() or not all(c.isalnum() or c == "-" for c in text):
        raise ValueError(f"expected an attribute name like cn, got {value!r}")
    return text


def redacted(url: str) -> str:
    """The URL without its password, for logs: everything between `://` and the last `@`
    after a `:` goes, even where a `/`, `?` or `#` in the password keeps the URL from parsing."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{host}"


def _shared_state(value: object) -> str | None:
    """Empty, or a Redis URL: redis:// (rediss:// for TLS), a host, an optional port and DB."""
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    expected = f"expected redis://HOST:PORT/DB (or rediss://), got {redacted(text)!r}"
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(expected) from None
    database = parts.path.removeprefix("/")
    if (
        parts.scheme not in ("redis", "rediss")
        or not parts.hostname
        or port == 0
        or (database and not (database.isascii() and database.isdigit()))
        or parts.query
        or parts.fragment
    ):
        raise ValueError(expected)
    return text


def _raw(value: object) -> object:
    """Kept as given; validated together with related keys (`groups` with `access`)."""
    return value


# How check-config shows a parsed value: plain YAML, in the form a user would write it.


def _as_is(value: object) -> object:
    return value


def _text(value: object) -> str:
    return str(value)


def _text_or_empty(value: object) -> str:
    return str(value) if value else ""


def _text_or_none(value: object) -> str | None:
    return str(value) if value else None


def _texts(values: Iterable[object]) -> list[str]:
    return [str(value) for value in values]


def _list_or_empty(value: object) -> object:
    return value or []


def _mapping_or_empty(value: object) -> object:
    return value or {}


def _redacted_or_empty(value: str | None) -> str:
    return redacted(value) if value else ""


_SETTING = "setting"
_SECTION = "section"


@dataclass(frozen=True)
class Setting:
    """One configuration key: how to parse it, its default, how check-config shows it."""

    parse: Callable[[object], Any]
    # In the form a user would write it; parsed like a given value.
    default: object = None
    # What check-config prints for the parsed value (secrets redacted).
    show: Callable[[Any], object] = _as_is
    # Lists and mappings are allowed in YAML (the environment gives a string to parse).
    structured: bool = False
    # SIGHUP applies it; a change to any other setting is only warned about, until a restart.
    reloadable: bool = False
    # The key, where it is not the field's name.
    key: str | None = None


def setting(
    parse: Callable[[object], Any],
    default: object = None,
    *,
    show: Callable[[Any], object] = _as_is,
    structured: bool = False,
    reloadable: bool = False,
    key: str | None = None,
) -> dict[str, Setting]:
    """The metadata of a dataclass field that is a setting."""
    return {_SETTING: Setting(parse, default, show, structured, reloadable, key)}


def section(kind: type) -> dict[str, type]:
    """The metadata of a dataclass field holding a section of settings (`tls.cert`, `tls.key`)."""
    return {_SECTION: kind}


@dataclass(frozen=True)
class TLSConfig:
    """Certificate and key for serving HTTPS on `listen`; both unset means plain HTTP."""

    cert: Path | None = field(metadata=setting(_optional_path, show=_text_or_none))
    key: Path | None = field(metadata=setting(_optional_path, show=_text_or_none))

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class LdapConfig:
    """The directory that logs in users the htpasswd file does not name; no `url` means none."""

    url: str | None = field(metadata=setting(_ldap_url, show=_text_or_none))
    start_tls: bool = field(metadata=setting(_bool, False))
    ca_file: Path | None = field(metadata=setting(_optional_path, show=_text_or_none))
    # The service account that searches; none means an anonymous search.
    bind_dn: str | None = field(metadata=setting(_optional_text))
    bind_password_file: Path | None = field(metadata=setting(_optional_path, show=_text_or_none))
    user_base: str | None = field(metadata=setting(_optional_text))
    user_filter: str = field(metadata=setting(_filter_template("{user}"), "(uid={user})"))
    # Directory groups are read only with a group_base.
    group_base: str | None = field(metadata=setting(_optional_text))
    group_filter: str = field(metadata=setting(_filter_template("{dn}", "{user}"), "(member={dn})"))
    group_name_attribute: str = field(metadata=setting(_attribute_name, "cn"))
    timeout: float = field(metadata=setting(_seconds, 5))

    @property
    def enabled(self) -> bool:
        return self.url is not None


@dataclass(frozen=True)
class Config:
    """Everything the proxy needs to run, validated once at start; check-config keeps the order."""

    listen: Address = field(metadata=setting(_address, "0.0.0.0:8080", show=_text))
    upstream: URL = field(metadata=setting(_upstream, "http://127.0.0.1:5000", show=_text))
    htpasswd: Path = field(metadata=setting(_path, show=_text))
    # The access tokens file (`registry-proxy token`), or None for no tokens.
    tokens: Path | None = field(metadata=setting(_optional_path, show=_text_or_empty))
    token_max_lifetime: float = field(metadata=setting(_lifetime, "90d"))
    realm: str = field(metadata=setting(_realm, "Registry"))
    admin_listen: Address | None = field(
        metadata=setting(_optional_address, "127.0.0.1:8081", show=_text_or_empty)
    )
    connect_timeout: float = field(metadata=setting(_seconds, 5))
    read_timeout: float = field(metadata=setting(_seconds, 300))
    keepalive_timeout: float = field(metadata=setting(_seconds, 75))
    tls_handshake_timeout: float = field(metadata=setting(_seconds, 10))
    body_timeout: float = field(metadata=setting(_seconds, 60))
    max_connections: int = field(metadata=setting(_count, 4096))
    max_connections_per_client: int = field(metadata=setting(_count, 256))
    workers: int = field(metadata=setting(_workers, 1))
    shutdown_timeout: float = field(metadata=setting(_seconds, 30))
    upstream_connections: int = field(metadata=setting(_count, 100))
    upstream_connections_per_user: int = field(metadata=setting(_count, 25))
    auth_cache_ttl: float = field(metadata=setting(_seconds, 300))
    auth_cache_size: int = field(metadata=setting(_count, 10000))
    auth_workers: int = field(metadata=setting(_count, 2))
    log_level: str = field(metadata=setting(_log_level, "info"))
    access_log: str = field(metadata=setting(_access_log, "json"))
    # The proxy's own stderr lines: text, or one JSON object per line like the access log.
    log_format: str = field(metadata=setting(_log_format, "text"))
    trusted_proxies: tuple[Network, ...] = field(
        metadata=setting(_networks, show=_texts, structured=True)
    )
    proxy_protocol: bool = field(metadata=setting(_bool, False))
    upstream_probe_interval: float = field(metadata=setting(_seconds, 5))
    read_only: bool = field(metadata=setting(_bool, False, reloadable=True))
    auth_max_failures: int = field(metadata=setting(_count, 10))
    auth_failure_window: float = field(metadata=setting(_seconds, 300))
    auth_block: float = field(metadata=setting(_seconds, 300))
    auth_max_failures_per_user: int = field(metadata=setting(_count, 20))
    auth_known_client_ttl: float = field(metadata=setting(_seconds, 7 * 86400))
    auth_max_pending_per_client: int = field(metadata=setting(_count, 8))
    # `groups`, `access` and `immutable_tags` are kept as given (YAML values), so check-config
    # prints the rules in effect; `access` and `immutable_tags` below are built from them.
    groups: object = field(
        metadata=setting(_raw, show=_mapping_or_empty, structured=True, reloadable=True)
    )
    access_given: object = field(
        metadata=setting(_raw, show=_list_or_empty, structured=True, reloadable=True, key="access")
    )
    immutable_tags_given: object = field(
        metadata=setting(
            _raw, show=_list_or_empty, structured=True, reloadable=True, key="immutable_tags"
        )
    )
    fast_blob_relay: bool = field(metadata=setting(_bool, True))
    # redis://HOST:PORT/DB: the throttle's counts shared by every proxy naming it (or None).
    shared_state: str | None = field(metadata=setting(_shared_state, show=_redacted_or_empty))
    # Browser origins allowed to call the API with credentials (CORS); none by default.
    cors_origins: tuple[str, ...] = field(metadata=setting(_origins, show=_texts, structured=True))
    # The registry browser under /ui/ (sign-in form, session cookie signed with the key file).
    ui: bool = field(metadata=setting(_bool, False))
    ui_session_key_file: Path | None = field(metadata=setting(_optional_path, show=_text_or_empty))
    ui_session_lifetime: float = field(metadata=setting(_lifetime, "8h"))
    tls: TLSConfig = field(metadata=section(TLSConfig))
    ldap: LdapConfig = field(metadata=section(LdapConfig))

    @cached_property
    def access(self) -> AccessPolicy:
        """The `access` rules with `groups` expanded; ValueError names the key."""
        return parse_access(self.groups, self.access_given, directory_groups=self.ldap.enabled)

    @cached_property
    def immutable_tags(self) -> ImmutableTags:
        """The parsed `immutable_tags`; ValueError names the entry."""
        return parse_immutable_tags(self.immutable_tags_given)


class _Declared(NamedTuple):
    key: str  # dotted: `tls.cert`
    attributes: tuple[str, ...]  # from a Config: ("tls", "cert")
    setting: Setting


def _declared(kind: type, prefix: str = "", within: tuple[str, ...] = ()) -> Iterator[_Declared]:
    """Every setting of a dataclass, sections included, in declaration order."""
    for declared in fields(kind):
        attributes = (*within, declared.name)
        if _SECTION in declared.metadata:
            yield from _declared(
                declared.metadata[_SECTION], f"{prefix}{declared.name}.", attributes
            )
        elif _SETTING in declared.metadata:
            spec: Setting = declared.metadata[_SETTING]
            yield _Declared(prefix + (spec.key or declared.name), attributes, spec)
        else:
            raise TypeError(f"{kind.__name__}.{declared.name} is neither a setting nor a section")


_DECLARED = tuple(_declared(Config))
# Dotted key -> how to parse it, its default (in the form a user would write it), how it is shown.
SETTINGS: dict[str, Setting] = {declared.key: declared.setting for declared in _DECLARED}
_SECTIONS = {key.rpartition(".")[0] for key in SETTINGS if "." in key}


def _value(config: Config, attributes: tuple[str, ...]) -> Any:
    return reduce(getattr, attributes, config)


def _build(
    kind: type, parsed: Mapping[tuple[str, ...], object], within: tuple[str, ...] = ()
) -> Any:
    """An instance of `kind` (`Config`, or a section) from values keyed by attribute path."""
    arguments: dict[str, object] = {}
    for declared in fields(kind):
        attributes = (*within, declared.name)
        if _SECTION in declared.metadata:
            arguments[declared.name] = _build(declared.metadata[_SECTION], parsed, attributes)
        else:
            arguments[declared.name] = parsed[attributes]
    return kind(**arguments)


def env_name(key: str) -> str:
    """`tls.cert` -> `PROXY_TLS_CERT`."""
    return ENV_PREFIX + key.replace(".", "_").upper()


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from defaults, the optional YAML file and the environment."""
    environ = os.environ if environ is None else environ
    given: dict[str, tuple[object, str]] = {}
    if path is not None:
        given.update(_read_yaml(path))
    given.update(_read_environment(environ))

    parsed: dict[tuple[str, ...], object] = {}
    for key, attributes, spec in _DECLARED:
        raw, where = given.get(key, (spec.default, "default"))
        try:
            parsed[attributes] = spec.parse(raw)
        except ValueError as exc:
            if where == "default":
                raise ConfigError(_required_message(key, path)) from None
            raise ConfigError(f"{where}: {key}: {exc}") from None
    config: Config = _build(Config, parsed)
    _check_together(config, given)
    return config


def _check_together(config: Config, given: Mapping[str, tuple[object, str]]) -> None:
    """Refuse settings that are valid one by one but not together."""

    def source(key: str) -> str:
        return given.get(key, (None, "default"))[1]

    if config.proxy_protocol and not config.trusted_proxies:
        raise ConfigError(
            f"{source('proxy_protocol')}: proxy_protocol: true needs trusted_proxies, the "
            "balancers allowed to send PROXY headers (anyone else could name any client address)"
        )
    # Reading the rules builds them (once, kept by the Config), so a bad rule fails the load.
    try:
        _ = config.access
    except ValueError as exc:
        key = "groups" if str(exc).startswith("groups") else "access"
        raise ConfigError(f"{source(key)}: {exc}") from None
    try:
        _ = config.immutable_tags
    except ValueError as exc:
        raise ConfigError(f"{source('immutable_tags')}: {exc}") from None
    if (config.tls.cert is None) != (config.tls.key is None):
        given_key, missing = (
            ("tls.cert", "tls.key") if config.tls.key is None else ("tls.key", "tls.cert")
        )
        raise ConfigError(
            f"{source(given_key)}: {missing}: not set; expected both tls.cert and tls.key, "
            f"or neither (set {missing} beside {given_key})"
        )
    _check_ldap(config.ldap, source)
    if config.ui and config.ui_session_key_file is None:
        raise ConfigError(
            f"{source('ui')}: ui_session_key_file: not set; the browser's sessions are signed "
            "with a secret key file (e.g. `head -c 32 /dev/urandom | base64 > ui-session.key`)"
        )


def _check_ldap(ldap: LdapConfig, source: Callable[[str], str]) -> None:
    if not ldap.enabled:
        return
    if ldap.user_base is None:
        raise ConfigError(f"{source('ldap.url')}: ldap.user_base: not set; the directory "
                          "needs the base DN under which users are searched")  # fmt: skip
    if ldap.start_tls and urlsplit(ldap.url or "").scheme == "ldaps":
        raise ConfigError(
            f"{source('ldap.start_tls')}: ldap.start_tls: ldaps:// is TLS already; "
            "use ldap:// with start_tls, or ldaps:// without"
        )
    if (ldap.bind_dn is None) != (ldap.bind_password_file is None):
        given_key, missing = (
            ("ldap.bind_dn", "ldap.bind_password_file")
            if ldap.bind_dn
            else ("ldap.bind_password_file", "ldap.bind_dn")
        )
        raise ConfigError(
            f"{source(given_key)}: {missing}: not set; expected both ldap.bind_dn and "
            "ldap.bind_password_file, or neither"
        )


def _read_environment(environ: Mapping[str, str]) -> Iterator[tuple[str, tuple[object, str]]]:
    known = {env_name(key): key for key in SETTINGS}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        if name not in known:
            raise ConfigError(f"environment {name}: unknown setting{_env_suggestion(name)}")
        key = known[name]
        parsed: object = value
        if SETTINGS[key].structured:
            # Lists and mappings come as YAML (or JSON) text: PROXY_TRUSTED_PROXIES=[10.0.0.0/8]
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"environment {name}: {key}: expected YAML or JSON") from None
        yield key, (parsed, f"environment {name}")


def _read_yaml(path: Path) -> dict[str, tuple[object, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{path}: cannot read configuration file: {reason}") from None

    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        found: dict[str, tuple[object, str]] = {}
        if root is not None:
            _collect(loader, root, "", path, found)
        return found
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 0
        raise ConfigError(f"{path}:{line}: invalid YAML: {exc.problem}") from None
    finally:
        loader.dispose()


def _collect(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    prefix: str,
    path: Path,
    found: dict[str, tuple[object, str]],
) -> None:
    where = f"{path}:{node.start_mark.line + 1}"
    if not isinstance(node, yaml.MappingNode):
        section = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"{where}: {section}: expected a mapping of settings")
    for key_node, value_node in node.value:
        line = f"{path}:{key_node.start_mark.line + 1}"
        key = prefix + str(key_node.value)
        if key in found or (key in _SECTIONS and any(k.startswith(key + ".") for k in found)):
            raise ConfigError(f"{line}: {key}: set more than once")
        if key in _SECTIONS:
            if not (isinstance(value_node, yaml.ScalarNode) and value_node.tag.endswith(":null")):
                _collect(loader, value_node, key + ".", path, found)
        elif key in SETTINGS:
            if not SETTINGS[key].structured and not isinstance(value_node, yaml.ScalarNode):
                raise ConfigError(f"{line}: {key}: expected a single value")
            found[key] = (loader.construct_object(value_node, deep=True), line)
        else:
            raise ConfigError(f"{line}: unknown key {key!r}{_suggestion(key, SETTINGS)}")


def _suggestion(name: str, known: Iterable[str]) -> str:
    """`; did you mean 'listen'?` for the closest known name, else a pointer to the reference."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return " (see docs/configuration.md or config/proxy.yml)"


def _env_suggestion(name: str) -> str:
    """The suggestion for a `PROXY_*` name, compared without the prefix every name shares."""
    keys = {env_name(key).removeprefix(ENV_PREFIX).lower(): key for key in SETTINGS}
    close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX).lower(), keys, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {env_name(keys[close[0]])}?"
    return " (see docs/configuration.md)"


def _required_message(key: str, path: Path | None) -> str:
    """What to set when a setting without a default was given nowhere."""
    if path is not None:
        return f"{key}: not set; add `{key}:` to {path} or set {env_name(key)}"
    return (
        f"{key}: not set; set the environment variable {env_name(key)}, or give a configuration "
        f"file (--config or {CONFIG_ENV}) that sets `{key}`"
    )


def source_of(key: str, path: Path | None, environ: Mapping[str, str] | None = None) -> str:
    """Where `key` was set: `environment PROXY_X`, `file:line`, or `default`."""
    environ = os.environ if environ is None else environ
    name = env_name(key)
    if name in environ:
        return f"environment {name}"
    if path is not None:
        with contextlib.suppress(ConfigError):
            return _read_yaml(path).get(key, (None, "default"))[1]
    return "default"


def lines_naming(
    word: str, keys: Iterable[str], path: Path | None, environ: Mapping[str, str] | None = None
) -> list[str]:
    """Where `word` is a value under one of the top-level `keys`: `file:line` for each place in
    the file, `environment PROXY_X` for a key set there."""
    environ = os.environ if environ is None else environ
    found = [f"environment {env_name(k)}" for k in keys if env_name(k) in environ]
    if path is None:
        return found
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return found
    if not isinstance(root, yaml.MappingNode):
        return found
    nodes = [
        value
        for key, value in root.value
        if key.value in keys and env_name(key.value) not in environ
    ]
    while nodes:
        node = nodes.pop(0)
        if isinstance(node, yaml.ScalarNode) and node.value == word:
            found.append(f"{path}:{node.start_mark.line + 1}")
        elif isinstance(node, yaml.SequenceNode):
            nodes.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            nodes.extend(value for _, value in node.value)
    return found


def restart_only_changes(running: Config, fresh: Config) -> list[str]:
    """Keys whose value differs in `fresh` but that only a restart applies."""
    return [
        key
        for key, attributes, spec in _DECLARED
        if not spec.reloadable and _value(running, attributes) != _value(fresh, attributes)
    ]


def describe(config: Config) -> dict[str, object]:
    """The effective configuration as plain values, in the file's shape, for `check-config`."""
    described: dict[str, Any] = {}
    for key, attributes, spec in _DECLARED:
        *sections, name = key.split(".")
        place = described
        for section_name in sections:
            place = place.setdefault(section_name, {})
        place[name] = spec.show(_value(config, attributes))
    return described
