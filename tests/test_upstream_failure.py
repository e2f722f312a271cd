"""The one mapping from an upstream failure to the client's answer and the error metric."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry, Counter
from yarl import URL

from proxy.relay.failure import UpstreamFailures

UPSTREAM = URL("http://registry.internal:5000/ignored")


def _failures() -> tuple[UpstreamFailures, Counter]:
    counter = Counter("errors", "upstream errors", ["kind"], registry=CollectorRegistry())
    return UpstreamFailures(UPSTREAM, counter), counter


def _request(method: str, path: str, *, client_left: bool = False) -> web.Request:
    request = make_mocked_request(method, path)
    assert request.transport is not None
    request.transport.is_closing.return_value = client_left  # type: ignore[attr-defined]
    return request


def _counted(counter: Counter) -> dict[str, float]:
    (family,) = counter.collect()
    samples = family.samples
    return {s.labels["kind"]: s.value for s in samples if s.name.endswith("_total")}


def _refused() -> aiohttp.ClientConnectorError:
    key = ConnectionKey("registry.internal", 5000, False, True, None, None, None)
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "Connection refused"))


@pytest.mark.parametrize(
    ("exc", "connecting", "status", "kind"),
    [
        (TimeoutError(), False, 504, "timeout"),
        (TimeoutError(), True, 504, "timeout"),
        (aiohttp.ServerTimeoutError("read"), False, 504, "timeout"),
        (_refused(), False, 502, "connect"),
        (ConnectionRefusedError(111, "Connection refused"), True, 502, "connect"),
        (ConnectionResetError(104, "reset"), False, 502, "reset"),
        (aiohttp.ServerDisconnectedError(), False, 502, "reset"),
    ],
)
def test_a_failure_before_the_headers_is_one_json_error_counted_once(
    exc: BaseException, connecting: bool, status: int, kind: str
) -> None:
    """Guards the mapping the relays share: 504 for a timeout, 502 otherwise, one count."""
    failures, counter = _failures()
    request = _request("GET", "/v2/a/blobs/sha256:0")
    response = failures.before_headers(request, exc, connecting=connecting)
    assert response.status == status
    assert response.content_type == "application/json"
    assert _counted(counter) == {kind: 1.0}


def test_an_upload_whose_client_left_is_not_counted_against_the_upstream() -> None:
    failures, counter = _failures()
    request = _request("PUT", "/v2/a/blobs/uploads/x", client_left=True)
    assert failures.before_headers(request, aiohttp.ClientOSError()).status == 502
    assert _counted(counter) == {}


@pytest.mark.parametrize(("exc", "kind"), [(TimeoutError(), "timeout"), (OSError(), "reset")])
def test_a_failure_mid_body_cuts_the_client_connection(exc: BaseException, kind: str) -> None:
    """Guards against a truncated body ending cleanly, which would look complete."""
    failures, counter = _failures()
    request = _request("GET", "/v2/a/blobs/sha256:0")
    failures.mid_body(request, exc)
    assert request.transport is not None
    request.transport.abort.assert_called_once()  # type: ignore[attr-defined]
    assert _counted(counter) == {kind: 1.0}
