"""Loggers and the access log; nothing secret (credentials, upload `_state` tokens) is written."""

from __future__ import annotations

import logging

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

access_log = logging.getLogger("registry_proxy.access")

# Request key the app stores the authenticated user under (see proxy.app).
USER_KEY = "registry_proxy.user"


def setup_logging(level: str) -> None:
    """One line per event on stderr."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiohttp logs every malformed request from the internet at ERROR with a traceback.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


class AccessLogger(AbstractAccessLogger):
    """One line per request: who, what (path without the query), outcome, size and time."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        user = request.get(USER_KEY) or "-"
        self.logger.info(
            '%s %s "%s %s" %d %d %.3f',
            request.remote or "-",
            user,
            request.method,
            request.rel_url.path,
            response.status,
            response.body_length,
            time,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
