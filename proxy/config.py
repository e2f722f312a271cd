"""Typed configuration: defaults, then the YAML file, then `PROXY_*` environment variables."""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
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


@dataclass(frozen=True)
class TLSConfig:
    """Certificate and key for serving HTTPS on `listen`; both unset means plain HTTP."""

    cert: Path | None = None
    key: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class Config:
    """Everything the proxy needs to run, validated once at start."""

    htpasswd: Path
    listen: Address
    upstream: URL
    realm: str
    admin_listen: Address | None
    connect_timeout: float
    read_timeout: float
    keepalive_timeout: float
    body_timeout: float
    max_connections: int
    workers: int
    shutdown_timeout: float
    upstream_connections: int
    auth_cache_ttl: float
    auth_cache_size: int
    auth_workers: int
    log_level: str
    access_log: str
    trusted_proxies: tuple[Network, ...]
    proxy_protocol: bool
    upstream_probe_interval: float
    read_only: bool
    auth_max_failures: int
    auth_failure_window: float
    auth_block: float
    access: AccessPolicy
    immutable_tags: ImmutableTags
    # `groups` and `access` as given (YAML values), so check-config can print the rules in effect.
    access_given: dict[str, object]
    tls: TLSConfig
    max_connections_per_client: int
    upstream_connections_per_user: int
    auth_max_failures_per_user: int
    auth_known_client_ttl: float
    auth_max_pending_per_client: int
    fast_blob_relay: bool = True
    # redis://HOST:PORT/DB: the throttle's counts shared by every proxy naming it (or None).
    shared_state: str | None = None


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


def _access_log(value: object) -> str:
    text = str(value).strip().lower()
    if text not in _ACCESS_LOG_STYLES:
        raise ValueError(f"expected one of {', '.join(_ACCESS_LOG_STYLES)}, got {value!r}")
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


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


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


@dataclass(frozen=True)
class _Setting:
    parse: Callable[[object], Any]
    default: object
    # Lists and mappings are allowed in YAML (the environment gives a string to parse).
    structured: bool = False


# Dotted key -> how to parse it and its default (in the form a user would write it).
SETTINGS: dict[str, _Setting] = {
    "listen": _Setting(_address, "0.0.0.0:8080"),
    "upstream": _Setting(_upstream, "http://127.0.0.1:5000"),
    "htpasswd": _Setting(_path, None),
    "realm": _Setting(_realm, "Registry"),
    "admin_listen": _Setting(_optional_address, "127.0.0.1:8081"),
    "connect_timeout": _Setting(_seconds, 5),
    "read_timeout": _Setting(_seconds, 300),
    "keepalive_timeout": _Setting(_seconds, 75),
    "body_timeout": _Setting(_seconds, 60),
    "max_connections": _Setting(_count, 4096),
    "max_connections_per_client": _Setting(_count, 256),
    "workers": _Setting(_workers, 1),
    "shutdown_timeout": _Setting(_seconds, 30),
    "upstream_connections": _Setting(_count, 100),
    "upstream_connections_per_user": _Setting(_count, 25),
    "auth_cache_ttl": _Setting(_seconds, 300),
    "auth_cache_size": _Setting(_count, 10000),
    "auth_workers": _Setting(_count, 2),
    "log_level": _Setting(_log_level, "info"),
    "access_log": _Setting(_access_log, "json"),
    "trusted_proxies": _Setting(_networks, None, structured=True),
    "proxy_protocol": _Setting(_bool, False),
    "upstream_probe_interval": _Setting(_seconds, 5),
    "read_only": _Setting(_bool, False),
    "auth_max_failures": _Setting(_count, 10),
    "auth_failure_window": _Setting(_seconds, 300),
    "auth_block": _Setting(_seconds, 300),
    "auth_max_failures_per_user": _Setting(_count, 20),
    "auth_known_client_ttl": _Setting(_seconds, 7 * 86400),
    "auth_max_pending_per_client": _Setting(_count, 8),
    "groups": _Setting(_raw, None, structured=True),
    "access": _Setting(_raw, None, structured=True),
    "immutable_tags": _Setting(_raw, None, structured=True),
    "fast_blob_relay": _Setting(_bool, True),
    "shared_state": _Setting(_shared_state, None),
    "tls.cert": _Setting(_optional_path, None),
    "tls.key": _Setting(_optional_path, None),
}
_SECTIONS = {key.rpartition(".")[0] for key in SETTINGS if "." in key}


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

    values: dict[str, Any] = {}
    for key, setting in SETTINGS.items():
        raw, where = given.get(key, (setting.default, "default"))
        try:
            values[key] = setting.parse(raw)
        except ValueError as exc:
            if where == "default":
                raise ConfigError(_required_message(key, path)) from None
            raise ConfigError(f"{where}: {key}: {exc}") from None

    if values["proxy_protocol"] and not values["trusted_proxies"]:
        where = given["proxy_protocol"][1]
        raise ConfigError(
            f"{where}: proxy_protocol: true needs trusted_proxies, the balancers allowed to "
            "send PROXY headers (anyone else could name any client address)"
        )

    groups, rules = values.pop("groups"), values.pop("access")
    values["access_given"] = {"groups": groups, "access": rules}
    try:
        values["access"] = parse_access(groups, rules)
    except ValueError as exc:
        key = "groups" if str(exc).startswith("groups") else "access"
        raise ConfigError(f"{given.get(key, (None, 'default'))[1]}: {exc}") from None
    immutable = values.pop("immutable_tags")
    values["access_given"]["immutable_tags"] = immutable
    try:
        values["immutable_tags"] = parse_immutable_tags(immutable)
    except ValueError as exc:
        raise ConfigError(f"{given.get('immutable_tags', (None, 'default'))[1]}: {exc}") from None

    tls = TLSConfig(cert=values.pop("tls.cert"), key=values.pop("tls.key"))
    if (tls.cert is None) != (tls.key is None):
        missing = "tls.key" if tls.key is None else "tls.cert"
        raise ConfigError(f"{missing}: expected both tls.cert and tls.key, or neither")
    return Config(tls=tls, **values)


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
    return " (see the configuration reference in README.md or config/proxy.yml)"


def _env_suggestion(name: str) -> str:
    """The suggestion for a `PROXY_*` name, compared without the prefix every name shares."""
    keys = {env_name(key).removeprefix(ENV_PREFIX).lower(): key for key in SETTINGS}
    close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX).lower(), keys, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {env_name(keys[close[0]])}?"
    return " (see the configuration reference in README.md)"


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


# Settings SIGHUP applies; every other change waits for a restart.
RELOADABLE = frozenset({"access", "groups", "read_only", "immutable_tags"})


def restart_only_changes(running: Config, fresh: Config) -> list[str]:
    """Keys whose value differs in `fresh` but that only a restart applies."""
    old, new = _flatten(describe(running)), _flatten(describe(fresh))
    return [key for key in new if key not in RELOADABLE and old.get(key) != new[key]]


def _flatten(described: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in described.items():
        if isinstance(value, Mapping) and key in _SECTIONS:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def describe(config: Config) -> dict[str, object]:
    """The effective configuration as plain values, in the file's shape, for `check-config`."""
    flat: dict[str, object] = {
        "listen": str(config.listen),
        "upstream": str(config.upstream),
        "htpasswd": str(config.htpasswd),
        "realm": config.realm,
        "admin_listen": str(config.admin_listen) if config.admin_listen else "",
        "connect_timeout": config.connect_timeout,
        "read_timeout": config.read_timeout,
        "keepalive_timeout": config.keepalive_timeout,
        "body_timeout": config.body_timeout,
        "max_connections": config.max_connections,
        "max_connections_per_client": config.max_connections_per_client,
        "workers": config.workers,
        "shutdown_timeout": config.shutdown_timeout,
        "upstream_connections": config.upstream_connections,
        "upstream_connections_per_user": config.upstream_connections_per_user,
        "auth_cache_ttl": config.auth_cache_ttl,
        "auth_cache_size": config.auth_cache_size,
        "auth_workers": config.auth_workers,
        "log_level": config.log_level,
        "access_log": config.access_log,
        "trusted_proxies": [str(network) for network in config.trusted_proxies],
        "proxy_protocol": config.proxy_protocol,
        "upstream_probe_interval": config.upstream_probe_interval,
        "read_only": config.read_only,
        "auth_max_failures": config.auth_max_failures,
        "auth_failure_window": config.auth_failure_window,
        "auth_block": config.auth_block,
        "auth_max_failures_per_user": config.auth_max_failures_per_user,
        "auth_known_client_ttl": config.auth_known_client_ttl,
        "auth_max_pending_per_client": config.auth_max_pending_per_client,
        "groups": config.access_given["groups"] or {},
        "access": config.access_given["access"] or [],
        "immutable_tags": config.access_given.get("immutable_tags") or [],
        "fast_blob_relay": config.fast_blob_relay,
        "shared_state": redacted(config.shared_state) if config.shared_state else "",
        "tls": {
            "cert": str(config.tls.cert) if config.tls.cert else None,
            "key": str(config.tls.key) if config.tls.key else None,
        },
    }
    return flat
