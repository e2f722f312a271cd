"""Loggers and the access log; nothing secret (credentials, query strings) is ever written.

The proxy's own lines go to stderr; the access log (the audit trail) goes to stdout, one JSON
object per line, whatever `log_level` says. Client bytes are escaped before they reach either.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from aiohttp.abc import AbstractAccessLogger
from aiohttp.http import HttpProcessingError
from aiohttp.web import BaseRequest, StreamResponse

from proxy.edge.connection import TLS_HELLO
from proxy.exchange import EXCHANGE_KEY, Exchange
from proxy.metrics import Metrics, code_label, method_label, status_class
from proxy.paths import Action, Target, is_digest
from proxy.reading import parse_query
from proxy.refusal import Refusal

access_log = logging.getLogger("registry_proxy.access")

# C0 and C1 controls, DEL, the backslash (so that escapes stay unambiguous), Unicode line and
# paragraph separators, and the bidirectional overrides terminals honour (Trojan Source).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\\\\\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_USER_AGENT_LIMIT = 256
_PATH_LIMIT = 2048
_FIELD_LIMIT = 256
_TRIED_USER_LIMIT = 64


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """`text` with every control character as a visible `\\xNN` / `\\uNNNN` escape."""
    return _UNSAFE.sub(_escape_one, text) if _UNSAFE.search(text) else text


def bounded(text: str | None, limit: int = _FIELD_LIMIT) -> str | None:
    """Escaped and cut to `limit` characters (a trailing `...` says it was cut)."""
    if text is None:
        return None
    safe = escape(text)
    return safe if len(safe) <= limit else safe[:limit] + "..."


def cut(text: str | None, limit: int) -> str | None:
    """The first `limit` characters as sent, then escaped (a trailing `...` says it was cut).

    Cut before escaping, so no escape is ever split and the field shows what the client sent.
    """
    if text is None:
        return None
    return escape(text[:limit]) + ("..." if len(text) > limit else "")


class EscapingFormatter(logging.Formatter):
    """Escapes control characters in each message, so no argument can start a forged line.

    A safety net under the `escape()` calls at the log calls: backslashes are left alone here,
    so text escaped there is not escaped twice.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _CONTROLS.sub(_escape_one, record.message)
        return super().formatMessage(record)


class ClientFaultFilter(logging.Filter):
    """Drops aiohttp's reports of what a client did wrong (a malformed request or body, a
    dropped connection): the internet's noise, answered 4xx or not at all. Whatever else
    aiohttp reports, a fault of the proxy's, stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            return not 400 <= exc.code < 500
        return not isinstance(exc, ConnectionError)


def count(number: int, noun: str) -> str:
    """`1 user`, `3 users`."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


class JsonFormatter(logging.Formatter):
    """`log_format: json`: one JSON object per record and per line (json.dumps escapes every
    control character), the traceback a field of its own rather than lines of its own."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {
            "time": _stamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if self._worker is not None:
            fields["worker"] = self._worker
        fields["message"] = record.getMessage()
        if record.exc_info:
            fields["traceback"] = self.formatException(record.exc_info)
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        return json.dumps(fields, separators=(",", ":"))


def _formatter(log_format: str, worker: int | None) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(worker)
    # Every worker shares the supervisor's stderr: each line says which one wrote it.
    tag = "" if worker is None else f"[worker {worker}] "
    return EscapingFormatter(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s")


def setup_logging(level: str, log_format: str = "text", worker: int | None = None) -> None:
    """The proxy's lines on stderr at `level` as `log_format` (text or json), tagged with the
    `worker` index in a worker process; access records on stdout, unprefixed."""
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(_formatter(log_format, worker))
    logging.basicConfig(level=level.upper(), handlers=[stderr])
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientFaultFilter) for f in server_log.filters):
        server_log.addFilter(ClientFaultFilter())
    stdout = logging.StreamHandler(sys.stdout)
    stdout.setFormatter(logging.Formatter("%(message)s"))
    access_log.handlers[:] = [stdout]
    access_log.setLevel(logging.INFO)
    access_log.propagate = False


def _stamp(seconds: float) -> str:
    """RFC 3339 in UTC with milliseconds."""
    milliseconds = int(seconds % 1 * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{milliseconds:03d}Z"


def _now() -> str:
    """RFC 3339 in UTC with milliseconds."""
    return _stamp(time.time())


def _event(method: str, status: int, exchange: Exchange, query: dict[str, str]) -> str | None:
    """What an auditor asks about: push, pull, delete, mount and login (successes only)."""
    if exchange.event is not None:
        # A browser page's: set only once the registry or the sign-in said yes.
        return exchange.event
    if not 200 <= status < 300:
        return None
    action = exchange.target.action
    if action is Action.MANIFEST:
        return {"PUT": "push", "GET": "pull", "DELETE": "delete"}.get(method)
    if action is Action.BLOB and method == "DELETE":
        return "delete"
    if action is Action.UPLOAD and method == "POST" and status == 201 and "mount" in query:
        return "mount"
    if action is Action.PING and method == "GET" and exchange.user is not None:
        return "login"
    return None


def _digest(
    method: str, response: StreamResponse, target: Target, query: dict[str, str]
) -> str | None:
    """The content digest a request wrote, read or removed, when there is one."""
    if target.action in (Action.MANIFEST, Action.BLOB):
        header = response.headers.get("Docker-Content-Digest")
        if header:
            return header
        if target.reference and is_digest(target.reference):
            return target.reference
    if target.action is Action.UPLOAD:
        # The upload's final PUT names its digest, a mount POST the blob it mounts.
        return query.get({"PUT": "digest", "POST": "mount"}.get(method, ""))
    return None


def _unparsed_refusal(request: BaseRequest, status: int) -> Refusal:
    """Why aiohttp answered a request it could not parse."""
    if status in (413, 431):
        return Refusal.TOO_LARGE
    if request.get(TLS_HELLO):
        return Refusal.TLS_ON_PLAIN_HTTP
    return Refusal.BAD_REQUEST


def access_record(
    request: BaseRequest, response: StreamResponse, seconds: float
) -> dict[str, object]:
    """The audit fields of one finished request; the query string itself is never written."""
    exchange = request.get(EXCHANGE_KEY)
    raw_path, _, raw_query = request.raw_path.partition("?")
    path: str | None = raw_path
    if not isinstance(exchange, Exchange):
        # aiohttp answered (a 400 for a malformed request) before the proxy saw it.
        exchange = Exchange(
            request.remote or "",
            request.scheme,
            Target(Action.OTHER),
            refusal=_unparsed_refusal(request, response.status),
        )
        path, raw_query = None, ""
    target = exchange.target
    method = request.method
    forwarded = exchange.upstream_query
    query = parse_query(raw_query if forwarded is None else forwarded)
    event = _event(method, response.status, exchange, query)
    return {
        "time": _now(),
        "request_id": exchange.request_id,
        "client": exchange.client,
        "user": bounded(exchange.user),
        "tried_user": cut(exchange.tried_user, _TRIED_USER_LIMIT),
        "method": bounded(method, 32),
        "path": bounded(path, _PATH_LIMIT),
        "action": str(target.action),
        "repository": target.repository,
        "reference": target.reference,
        "digest": bounded(_digest(method, response, target, query), 160),
        "event": event,
        "mount_from": bounded(query.get("from")) if event == "mount" else None,
        "status": response.status,
        "upstream_status": exchange.upstream_status,
        "bytes_in": request.content.total_bytes,
        "bytes_out": bytes_out(request, response),
        "duration_ms": round(seconds * 1000, 3),
        "upstream_ms": exchange.upstream_ms,
        "user_agent": bounded(request.headers.get("User-Agent"), _USER_AGENT_LIMIT),
        "auth": exchange.auth_outcome,
        "decision": "allowed" if exchange.refusal is None else str(exchange.refusal),
        "reason": bounded(exchange.refusal_detail),
    }


_TEXT_FIELDS = (
    "time", "request_id", "client", "user", "request", "status", "upstream_status", "bytes_in",
    "bytes_out", "duration_ms", "decision", "event", "digest", "user_agent",
)  # fmt: skip


def bytes_out(request: BaseRequest, response: StreamResponse) -> int:
    """Bytes sent to the client, head included, also for a transfer cut short."""
    # body_length is only set at the end of the body: a cut transfer would count 0.
    return response.body_length or request.writer.output_size


def text_line(record: dict[str, object]) -> str:
    """`access_log: text`: the same fields, space-separated, `-` for none."""
    fields = dict(record)
    fields["request"] = f'"{record["method"]} {record["path"]}"'
    agent = record["user_agent"]
    fields["user_agent"] = None if agent is None else '"' + str(agent).replace('"', '\\"') + '"'
    return " ".join("-" if fields[k] is None else str(fields[k]) for k in _TEXT_FIELDS)


def access_logger_class(metrics: Metrics, style: str) -> type[AbstractAccessLogger]:
    """An aiohttp access logger that feeds `metrics` and writes `style` lines (json, text, off)."""

    class AccessLogger(AbstractAccessLogger):
        def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
            record = access_record(request, response, time)
            action = str(record["action"])
            status = response.status
            metrics.requests.labels(
                method_label(request.method), action, status_class(status), code_label(status)
            ).inc()
            metrics.request_duration.labels(action).observe(time)
            metrics.received_bytes.labels(action).inc(request.content.total_bytes)
            metrics.sent_bytes.labels(action).inc(bytes_out(request, response))
            if record["decision"] != "allowed":
                metrics.refusals.labels(record["decision"]).inc()
            if style == "json":
                self.logger.info("%s", json.dumps(record, separators=(",", ":")))
            elif style == "text":
                self.logger.info("%s", text_line(record))

        @property
        def enabled(self) -> bool:
            return True

    return AccessLogger
