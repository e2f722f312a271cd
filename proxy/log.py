"""Loggers and the access log; nothing secret (credentials, query strings) is ever written."""

from __future__ import annotations

import json
import logging
import time

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from proxy.exchange import EXCHANGE_KEY, Exchange
from proxy.metrics import Metrics, method_label, status_class
from proxy.paths import Action, Target

access_log = logging.getLogger("registry_proxy.access")


def setup_logging(level: str) -> None:
    """One line per event on stderr."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiohttp logs every malformed request from the internet at ERROR with a traceback.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


def access_record(
    request: BaseRequest, response: StreamResponse, seconds: float
) -> dict[str, object]:
    """The audit fields of one finished request (the path without its query: `_state` tokens)."""
    exchange = request.get(EXCHANGE_KEY)
    path: str | None = request.rel_url.path
    if not isinstance(exchange, Exchange):
        # aiohttp answered (a 400 for a malformed request) before the proxy saw it.
        exchange = Exchange(request.remote or "", request.scheme, Target(Action.OTHER))
        path = None
    target = exchange.target
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "client": exchange.client,
        "user": exchange.user,
        "method": request.method,
        "action": str(target.action),
        "repository": target.repository,
        "reference": target.reference,
        "path": path,
        "status": response.status,
        "bytes_in": request.content.total_bytes,
        "bytes_out": bytes_out(request, response),
        "duration": round(seconds, 6),
        "upstream_status": exchange.upstream_status,
    }


def bytes_out(request: BaseRequest, response: StreamResponse) -> int:
    """Bytes sent to the client, head included, also for a transfer cut short."""
    # body_length is only set at the end of the body: a cut transfer would count 0.
    return response.body_length or request.writer.output_size


_TEXT_FORMAT = (
    '{client} {user} "{method} {path}" {status} {bytes_in} {bytes_out} {duration} {upstream_status}'
)


def _text(record: dict[str, object]) -> str:
    return _TEXT_FORMAT.format(**{k: "-" if v is None else v for k, v in record.items()})


def access_logger_class(metrics: Metrics, style: str) -> type[AbstractAccessLogger]:
    """An aiohttp access logger that feeds `metrics` and writes `style` lines (json, text, off)."""

    class AccessLogger(AbstractAccessLogger):
        def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
            record = access_record(request, response, time)
            action = str(record["action"])
            metrics.requests.labels(
                method_label(request.method), action, status_class(response.status)
            ).inc()
            metrics.request_duration.labels(action).observe(time)
            metrics.received_bytes.labels(action).inc(request.content.total_bytes)
            metrics.sent_bytes.labels(action).inc(bytes_out(request, response))
            if style == "json":
                self.logger.info("%s", json.dumps(record, separators=(",", ":")))
            elif style == "text":
                self.logger.info("%s", _text(record))

        @property
        def enabled(self) -> bool:
            return True

    return AccessLogger
