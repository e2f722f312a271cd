"""A bug in the proxy is logged with its traceback; the internet's malformed requests are not."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from proxy.app import create_app
from proxy.config import load_config
from proxy.exchange import REQUEST_ID_HEADER
from proxy.gate import Gate
from proxy.log import access_log, setup_logging
from proxy.relay.forward import Forwarder
from tests.support import Proxy, Registry, access_records, call, wait_until


class Planted(RuntimeError):
    """The bug planted in a handler."""


@pytest.fixture
def logging_as_served() -> Iterator[None]:
    """The proxy's logging set-up, undone after the test (it changes process-wide loggers)."""
    touched = [logging.getLogger(), logging.getLogger("aiohttp.server"), access_log]
    saved = [(logger, logger.level, logger.handlers[:], logger.propagate) for logger in touched]
    setup_logging("info")
    yield
    for logger, level, handlers, propagate in saved:
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate = propagate


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request meets a RuntimeError where the gate checks it."""

    async def check(*args: object, **kwargs: object) -> None:
        raise Planted("planted bug")

    monkeypatch.setattr(Gate, "check", check)


@pytest.fixture
async def client(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> TestClient[web.Request, web.Application]:
    """The public application in process, its upstream never reached (nothing on port 1)."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("")
    config = load_config(
        None, {"PROXY_HTPASSWD": str(htpasswd), "PROXY_UPSTREAM": "http://127.0.0.1:1"}
    )
    return await aiohttp_client(create_app(config, {}))


def _failure_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.exc_info is not None and isinstance(record.exc_info[1], Planted)
    ]


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("GET", {}),
        # Answered from the expect handler, which aiohttp runs before any middleware.
        ("PUT", {"Expect": "100-continue", "Content-Length": "4"}),
    ],
)
async def test_an_exception_in_a_handler_is_logged_once_with_its_traceback_and_request_id(
    logging_as_served: None,
    planted: None,
    client: TestClient[web.Request, web.Application],
    caplog: pytest.LogCaptureFixture,
    method: str,
    headers: dict[str, str],
) -> None:
    """Guards against a muted logger turning a bug into a bare 500 with no trace anywhere."""
    caplog.set_level(logging.INFO)
    data = b"body" if method == "PUT" else None
    response = await client.request(method, "/v2/library/app/manifests/v1", headers=headers,
                                    data=data)  # fmt: skip
    assert response.status == 500
    failures = _failure_records(caplog)
    assert len(failures) == 1, caplog.text
    assert failures[0].levelno == logging.ERROR
    assert response.headers[REQUEST_ID_HEADER] in failures[0].getMessage()
    assert "Traceback" in caplog.text and "planted bug" in caplog.text
    # Still the registry's JSON envelope, which clients can read.
    assert (await response.json())["errors"][0]["code"] == "UNKNOWN"


MALFORMED = [
    # Refused before its body is read, which then breaks the chunked framing.
    b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"zz\r\n" * 10,
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),  # a TLS ClientHello
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
    b"GET /v2/ HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\n"
    + b"X-Pad: "
    + b"p" * 8000
    + b"\r\n" * 1
    + b"X: "
    + b"q" * 8000 * 4
    + b"\r\n\r\n",
]


def _send_raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_malformed_requests_leave_no_error_or_traceback_in_the_log(
    registry: Registry, start_proxy: Callable[..., Proxy]
) -> None:
    """Guards against the internet's garbage filling the log once the bug logger is unmuted."""
    proxy = start_proxy(registry.url)
    for port in (proxy.port, proxy.admin_port):
        for data in MALFORMED:
            answer = _send_raw(port, data)
            assert answer == b"" or answer.split(b" ", 2)[1].startswith(b"4"), answer[:80]
    # A request after them all: once its access line is out, so is anything logged before it.
    last = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert _send_raw(proxy.port, last).startswith(b"HTTP/1.1 401")
    wait_until(
        lambda: any(r["status"] == 401 for r in access_records(proxy.log())),
        "the last request's access line",
    )
    log = proxy.log()
    assert "Traceback" not in log
    assert " ERROR " not in log and " WARNING " not in log, log


async def test_an_exception_after_the_response_began_cuts_the_connection_and_is_logged_once(
    logging_as_served: None,
    client: TestClient[web.Request, web.Application],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Guards against a half-sent response ending as if complete, or its bug logged twice."""

    async def allow(*args: object, **kwargs: object) -> None:
        return None

    async def begin_then_fail(
        self: object, request: web.Request, *args: object, **kwargs: object
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100"})
        await response.prepare(request)
        await response.write(b"partial")
        raise Planted("planted bug")

    monkeypatch.setattr(Gate, "check", allow)
    monkeypatch.setattr(Gate, "confirm", allow)
    monkeypatch.setattr(Forwarder, "__call__", begin_then_fail)
    caplog.set_level(logging.INFO)
    response = await client.get("/v2/library/app/blobs/sha256:" + "0" * 64)
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    failures = _failure_records(caplog)
    assert len(failures) == 1, caplog.text
    assert response.headers[REQUEST_ID_HEADER] in failures[0].getMessage()


# Loaded by the proxy's interpreter at start-up (Python imports `sitecustomize` from its path),
# before `-m` puts the working directory on the path: without it, `proxy` would be imported
# from wherever the environment installed it.
PLANT = """
import os
import sys

sys.path.insert(0, os.getcwd())

from proxy.gate import Gate

_check = Gate.check


async def check(self, request, exchange):
    if "planted-bug" in request.raw_path:
        raise RuntimeError("planted bug")
    return await _check(self, request, exchange)


Gate.check = check
"""


def test_a_bug_in_a_serving_proxy_leaves_its_traceback_on_stderr(
    registry: Registry, start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """Guards the served process's logging set-up, not only the application's."""
    (tmp_path / "plant").mkdir()
    (tmp_path / "plant" / "sitecustomize.py").write_text(PLANT)
    proxy = start_proxy(registry.url, PYTHONPATH=str(tmp_path / "plant"))
    status, headers, _ = call(proxy.url + "/v2/planted-bug/manifests/v1")
    assert status == 500
    request_id = headers[REQUEST_ID_HEADER]
    wait_until(lambda: "RuntimeError: planted bug" in proxy.log(), "the traceback")
    log = proxy.log()
    assert log.count("Traceback") == 1
    assert f"request {request_id} failed: GET /v2/planted-bug/manifests/v1" in log


async def test_a_client_gone_while_its_answer_is_written_is_no_bug(
    client: TestClient[web.Request, web.Application],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    logging_as_served: None,
) -> None:
    """Guards the failure log against the internet's noise: a client that closes its connection
    as the proxy writes its answer (wrk at the end of a run, a cancelled pull) makes aiohttp
    raise ClientConnectionResetError in the handler. That is no bug: no ERROR line, no
    traceback (seen as hundreds of tracebacks in a benchmark's log)."""

    async def check(self: Gate, request: web.Request, *args: object) -> None:
        assert request.transport is not None
        request.transport.close()
        raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")

    monkeypatch.setattr(Gate, "check", check)
    with pytest.raises(aiohttp.ClientError):
        await client.get("/v2/", headers={"Authorization": "Basic Og=="})
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert not [r for r in caplog.records if r.exc_info]
