"""One reading of each request, the registry's: bytes Go and Python could read two ways are refused.

Each test names the class of misreading it guards, and sends the bytes through the proxy to the real
registry: whatever the proxy refuses must never reach it.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from proxy.paths import Action, classify, is_digest
from proxy.reading import go_media_type, target_problem
from proxy.relay.headers import upstream_url
from tests.support import (
    Proxy,
    Registry,
    basic_auth,
    call,
    exchange_raw,
    push_blob,
    push_image,
    wait_until,
)
from tests.support import htpasswd as add_user

OCI_MANIFEST = b"application/vnd.oci.image.manifest.v1+json"
PASSWORDS = {"alice": "alice-secret", "mallory": "mallory-secret"}
RULES = """
access:
  - {users: [alice], repositories: ["team-a/**"], actions: [pull, push, delete]}
  - {users: [alice], repositories: ["**/public"], actions: [pull]}
  - {users: ["*"], actions: [catalog]}
"""


def basic(user: str) -> str:
    return basic_auth(user, PASSWORDS[user])["Authorization"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Proxy, Proxy]]:
    """A registry holding team-b/app, a proxy with RULES and an unrestricted one in front of it."""
    root = tmp_path_factory.mktemp("reading")
    htpasswd = root / "htpasswd"
    for user, password in PASSWORDS.items():
        add_user(htpasswd, "-B", "-C", "4", user=user, password=password)
    registry = Registry(root / "registry")
    registry.start()
    push_image(registry.url, "team-b/app")
    config = root / "proxy.yml"
    config.write_text(RULES)
    env = {"PROXY_AUTH_MAX_FAILURES": "1000000"}
    restricted = Proxy(
        root / "restricted", registry.url, htpasswd, {**env, "PROXY_CONFIG": str(config)}
    )
    unrestricted = Proxy(root / "unrestricted", registry.url, htpasswd, env)
    restricted.start()
    unrestricted.start()
    yield registry, restricted, unrestricted
    unrestricted.stop()
    restricted.stop()
    registry.stop()


def raw(proxy: Proxy, method: str, target: bytes, headers: bytes = b"", body: bytes = b"") -> bytes:
    head = b"%s %s HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\nConnection: close\r\n" % (
        method.encode(), target, proxy.host.encode(), basic("alice").encode())  # fmt: skip
    length = b"Content-Length: %d\r\n" % len(body) if method in ("POST", "PUT", "PATCH") else b""
    return asyncio.run(exchange_raw(proxy, head + headers + length + b"\r\n" + body))


def status_and_body(answer: bytes) -> tuple[int, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def assert_refused_unseen(registry: Registry, answer: bytes, marker: str) -> None:
    """A 400 registry-style JSON error, and the registry never saw a request naming `marker`."""
    status, body = status_and_body(answer)
    assert status == 400, answer
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    sentinel = f"/v2/sentinel-{uuid.uuid4().hex[:8]}/tags/list"
    call(registry.url + sentinel)
    wait_until(lambda: sentinel in registry.requested_uris(), "the sentinel in the registry log")
    assert not [uri for uri in registry.requested_uris() if marker in uri]


def secret_blob(registry: Registry) -> str:
    return push_blob(registry.url, "team-b/app", uuid.uuid4().bytes)


# --- Content-Type as Go's mime.ParseMediaType reads it: Unicode lower-casing, whitespace, params.

# Each is a form body to Go's Request.FormValue (which reads `mount` and `from` from it).
FORM_READINGS = [
    "applİcation/x-www-form-urlencoded",  # U+0130 lower-cases to ASCII i in Go, not in Python
    "multİpart/form-data; boundary=x",
    "APPLICATION/X-WWW-FORM-URLENCODED",
    " application/x-www-form-urlencoded ; charset=utf-8",
    "application/x-www-form-urlencoded;",
    "application/x-www-form-urlencoded; not a parameter",
    "\tmultipart/form-data;boundary=zz",
    "application/x-www-form-urlencoded\u00a0",  # Go's TrimSpace trims Unicode spaces
]
# Not forms to Go, but bytes a Python reading could take otherwise, or a media type Go rejects.
UNREADABLE = ["application/x-\u212aind", "text/", "/plain", "a b/c", "text/plain/x", "é"]


@pytest.mark.parametrize("content_type", FORM_READINGS + UNREADABLE)
@pytest.mark.parametrize("policy", ["restricted", "unrestricted"])
def test_writes_whose_content_type_go_could_read_as_a_form_are_refused(
    site: tuple[Registry, Proxy, Proxy], content_type: str, policy: str
) -> None:
    """Class: Content-Type read differently by Go's mime.ParseMediaType (a form body carrying
    mount/from the proxy never checked; Unicode case folding, whitespace, parameters)."""
    registry, restricted, unrestricted = site
    proxy = restricted if policy == "restricted" else unrestricted
    digest = secret_blob(registry)
    marker = f"team-a/form-{uuid.uuid4().hex[:8]}"
    body = f"mount={digest}&from=team-b/app".encode()
    header = b"Content-Type: " + content_type.encode() + b"\r\n"
    answer = raw(proxy, "POST", f"/v2/{marker}/blobs/uploads/".encode(), header, body)
    assert_refused_unseen(registry, answer, marker)
    assert call(f"{registry.url}/v2/{marker}/blobs/{digest}", "HEAD")[0] == 404


def test_media_types_are_read_as_go_reads_them() -> None:
    """Class: as above, the reading itself (mime.ParseMediaType: lower-case, trim, then check)."""
    assert go_media_type("Text/Plain ; charset=x") == "text/plain"
    assert go_media_type("\ttext\v") == "text"  # a bare token is a media type to Go
    assert (
        go_media_type("APPLICATION/X-WWW-FORM-URLENCODED;;;") == "application/x-www-form-urlencoded"
    )
    for unreadable in ("", "text/", "/plain", "a b/c", "text/plain/x", "text/plain,x", '"a"/b'):
        assert go_media_type(unreadable) is None, unreadable


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_form_bodies_are_refused_on_every_write(
    site: tuple[Registry, Proxy, Proxy], method: str
) -> None:
    """Class: a form body on PUT/PATCH, where Go's FormValue would read `digest` from it."""
    registry, restricted, _ = site
    marker = f"team-a/put-{uuid.uuid4().hex[:8]}"
    header = b"Content-Type: application/x-www-form-urlencoded\r\n"
    target = f"/v2/{marker}/blobs/uploads/some-uuid?digest=sha256%3A00".encode()
    assert_refused_unseen(registry, raw(restricted, method, target, header, b"digest=x"), marker)


@pytest.mark.parametrize(
    "content_type", ["application/octet-stream", "application/vnd.oci.image.manifest.v1+json"]
)
def test_ordinary_content_types_still_pass(
    site: tuple[Registry, Proxy, Proxy], content_type: str
) -> None:
    restricted = site[1]
    header = b"Content-Type: " + content_type.encode() + b"\r\n"
    answer = raw(restricted, "POST", b"/v2/team-a/ordinary/blobs/uploads/", header)
    assert status_and_body(answer)[0] == 202, answer


# --- The request target: what is checked is byte for byte what is forwarded.


def test_a_fragment_cannot_smuggle_a_mount_source(site: tuple[Registry, Proxy, Proxy]) -> None:
    """Class: bytes Go's url.ParseRequestURI keeps but yarl drops ('#'): the proxy checked
    from=team-b/app#/public against **/public, the registry mounted from team-b/app."""
    registry, restricted, _ = site
    digest = secret_blob(registry).replace(":", "%3A")
    marker = f"team-a/frag-{uuid.uuid4().hex[:8]}"
    target = f"/v2/{marker}/blobs/uploads/?mount={digest}&from=team-b/app#/public".encode()
    answer = raw(restricted, "POST", target)
    assert_refused_unseen(registry, answer, marker)


def test_a_fragment_cannot_lift_the_catalog_cap(site: tuple[Registry, Proxy, Proxy]) -> None:
    """Class: as above; `n=5000#` was not capped, then forwarded as n=5000."""
    registry, _, unrestricted = site
    answer = raw(unrestricted, "GET", b"/v2/_catalog?n=5000#")
    assert_refused_unseen(registry, answer, "n=5000")


# shape -> (target, a marker only that target contains)
TARGETS = {
    "fragment-in-path": (b"/v2/team-a/frag-path#x/tags/list", "frag-path"),
    "fragment-in-query": (b"/v2/team-a/frag-query/tags/list?last=a#", "frag-query"),
    "absolute-form": (b"http://evil.example/v2/team-a/absolute/tags/list", "absolute"),
    "bad-percent-in-path": (b"/v2/team-a/bad%zzpercent/tags/list", "percent"),
    "bad-percent-in-query": (b"/v2/team-a/badq/blobs/uploads/?mount=%zz&x=1", "badq"),
    "semicolon-in-query": (b"/v2/team-a/semi/blobs/uploads/?mount=x;from=team-b/app", "semi"),
    "backslash": (b"/v2/team-a/backmark\\x/tags/list", "backmark"),
    "brackets": (b"/v2/team-a/brackmark[x]/tags/list", "brackmark"),
    "pipe-and-braces": (b"/v2/team-a/pipemark|{x}/tags/list", "pipemark"),
}


@pytest.mark.parametrize("shape", TARGETS)
@pytest.mark.parametrize("policy", ["restricted", "unrestricted"])
def test_request_targets_read_two_ways_are_refused_before_anything(
    site: tuple[Registry, Proxy, Proxy], shape: str, policy: str
) -> None:
    """Class: request targets Go and yarl/aiohttp read differently, or Go versions differ on
    (`;` separators), or that are not origin-form: 400 before authentication, never forwarded."""
    registry, restricted, unrestricted = site
    proxy = restricted if policy == "restricted" else unrestricted
    target, marker = TARGETS[shape]
    # Without credentials: the bytes are refused before anything else.
    head = b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (
        target,
        proxy.host.encode(),
    )
    assert_refused_unseen(registry, asyncio.run(exchange_raw(proxy, head)), marker)


@pytest.mark.parametrize(
    "path", ["/v2/team-a%2F..%2Fteam-b/app/tags/list", "/v2/x%2F.%2Fy/tags/list"]
)
def test_dot_segments_hidden_in_escaped_slashes_are_not_forwarded(
    site: tuple[Registry, Proxy, Proxy], path: str
) -> None:
    """Class: path cleaning: Go decodes %2F before gorilla/mux cleans the path, so an escaped
    slash can carry a dot segment past a check made on the raw segments."""
    registry, _, unrestricted = site
    answer = raw(unrestricted, "GET", path.encode())
    assert status_and_body(answer)[0] == 404, answer
    settle = f"/v2/sentinel-{uuid.uuid4().hex[:8]}/tags/list"
    call(registry.url + settle)
    wait_until(lambda: settle in registry.requested_uris(), "the sentinel in the registry log")
    assert path not in registry.requested_uris()


def test_percent_escapes_registry_clients_send_still_pass(
    site: tuple[Registry, Proxy, Proxy],
) -> None:
    registry, restricted, _ = site
    assert status_and_body(raw(restricted, "GET", b"/v2/team-b%2Fapp/tags/list"))[0] == 403
    digest = push_blob(registry.url, "team-a/escaped", b"escaped")
    answer = raw(restricted, "GET", f"/v2/team-a%2Fescaped/blobs/{digest}".encode())
    assert status_and_body(answer) == (200, b"escaped")


@given(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60))
def test_every_target_the_proxy_accepts_is_forwarded_byte_for_byte(tail: str) -> None:
    """Class: the upstream URL built from the target differs from the target that was checked."""
    target = "/v2/" + tail
    if target_problem(target) is None:
        url = upstream_url("http://127.0.0.1:5000", target)
        # A lone trailing `?` goes: Go reads `/x?` as `/x` (an empty query).
        sent = target.removesuffix("?") if target.count("?") == 1 else target
        assert url.raw_path_qs == sent
        assert str(url) == "http://127.0.0.1:5000" + sent


def test_a_question_mark_ending_a_query_is_forwarded_as_part_of_it(
    site: tuple[Registry, Proxy, Proxy],
) -> None:
    """Class: a valid target answered 500: `?x=?` ends in `?`, which only a lone `?` may drop."""
    registry, _, unrestricted = site
    assert upstream_url("http://h", "/v2/?x=?").raw_path_qs == "/v2/?x=?"
    answer = raw(unrestricted, "GET", b"/v2/team-b/app/tags/list?qmark=?")
    assert status_and_body(answer)[0] == 200, answer
    assert "/v2/team-b/app/tags/list?qmark=?" in registry.requested_uris()


def test_a_target_yarl_would_alter_never_becomes_an_upstream_url() -> None:
    with pytest.raises(ValueError, match="would be forwarded as"):
        upstream_url("http://127.0.0.1:5000", "/v2/x#y")
    assert URL("http://h/v2/x#y", encoded=True).raw_path_qs == "/v2/x"  # what yarl does


# --- HTTP/1.0 with Transfer-Encoding (RFC 9112 §6.1): answer, then close.


def test_http_1_0_with_transfer_encoding_is_answered_and_closed(
    site: tuple[Registry, Proxy, Proxy],
) -> None:
    """Class: faulty framing kept alive: an HTTP/1.0 message with Transfer-Encoding must not
    leave the connection open for what a peer reads as the next request."""
    registry, restricted, _ = site
    marker = f"team-a/ten-{uuid.uuid4().hex[:8]}"
    auth = b"Host: %s\r\nAuthorization: %s\r\n" % (
        restricted.host.encode(),
        basic("alice").encode(),
    )
    request = (
        b"POST /v2/%s/blobs/uploads/ HTTP/1.0\r\n%sConnection: keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        # What a peer reading the framing otherwise might take for the next request.
        b"GET /v2/%s-next/tags/list HTTP/1.1\r\n%s\r\n"
    ) % (marker.encode(), auth, marker.encode(), auth)
    # exchange_raw() returns only once the proxy closes the connection.
    answer = asyncio.run(exchange_raw(restricted, request))
    assert len(re.findall(rb"HTTP/1\.[01] [0-9]{3} ", answer)) == 1, answer
    assert_refused_unseen(registry, answer, marker)


@pytest.mark.parametrize("coding", [b"identity, chunked", b"gzip, chunked", b"gzip,chunked"])
def test_transfer_codings_go_refuses_are_refused_and_never_forwarded(
    site: tuple[Registry, Proxy, Proxy], coding: bytes
) -> None:
    """Class: framing read two ways: llhttp takes any coding list ending in `chunked`, Go's
    net/http only a lone `chunked` (else 501), so the proxy would forward coded bytes as a body."""
    registry, _, unrestricted = site
    marker = f"team-a/coding-{uuid.uuid4().hex[:8]}"
    request = (
        b"POST /v2/%s/blobs/uploads/ HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\n"
        b"Transfer-Encoding: %s\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ) % (marker.encode(), unrestricted.host.encode(), basic("alice").encode(), coding)
    assert_refused_unseen(registry, asyncio.run(exchange_raw(unrestricted, request)), marker)


@pytest.mark.parametrize("target", [b"/v2/%0a", b"/v2/team-b/app%0A/tags/list"])
def test_an_escaped_newline_in_the_path_still_meets_authentication(
    site: tuple[Registry, Proxy, Proxy], target: bytes
) -> None:
    """Class: a path the catch-all route missed (its `.` skips a decoded newline), so aiohttp
    answered a plain-text 404 itself: no credentials asked, no registry-style error, no id."""
    _, restricted, _ = site
    head = b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (
        target,
        restricted.host.encode(),
    )
    status, body = status_and_body(asyncio.run(exchange_raw(restricted, head)))
    assert status == 401, body
    assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"


def test_an_asterisk_form_target_gets_the_registry_style_400(
    site: tuple[Registry, Proxy, Proxy],
) -> None:
    """Class: a target no route takes: `OPTIONS *` got aiohttp's own plain-text 404, outside
    the gate (no registry-style error, no request id)."""
    _, restricted, _ = site
    head = b"OPTIONS * HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (
        restricted.host.encode()
    )
    answer = asyncio.run(exchange_raw(restricted, head))
    status, body = status_and_body(answer)
    assert status == 400, answer
    assert json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"
    assert b"X-Request-Id: " in answer


# --- Routes: the proxy classifies a path as distribution's router (gorilla/mux) routes it.

ROUTES = [
    "/v2/x/manifests/sha256:totallywrong",
    "/v2/x/manifests/sha256:" + "a" * 63,
    "/v2/x/manifests/sha256:" + "A" * 64,
    "/v2/x/manifests/sha256:" + "Z" * 64,
    "/v2/x/manifests/sha512:" + "a" * 64,
    "/v2/x/manifests/sha384:" + "a" * 96,
    "/v2/x/manifests/sha256:abc=_-",
    "/v2/x/manifests/a+b.c:x",
    "/v2/x/manifests/a__b:x",
    "/v2/x/manifests/SHA256:abc",
    "/v2/x/manifests/_v1",
    "/v2/x/manifests/-v1",
    "/v2/x/manifests/" + "v" * 128,
    "/v2/x/manifests/" + "v" * 129,
    "/v2/x/blobs/sha256:totallywrong",
    "/v2/x/blobs/Sha256:0123",
    "/v2/x/blobs/sha256:" + "a" * 64,
    "/v2/x/blobs/uploads/sha256:x",
    "/v2/x/blobs/uploads/abc=",
    "/v2/x/blobs/uploads/",
    "/v2/x/tags/list",
    "/v2/a--b/tags/list",
    "/v2/a__b/tags/list",
    "/v2/a___b/tags/list",
    "/v2/a-/tags/list",
    "/v2/A/tags/list",
    "/v2/Example.com:5000/app/tags/list",
    "/v2/localhost:5000/app/manifests/v1",
    "/v2/-bad.example/app/tags/list",
    "/v2/x%2Fy/tags/list",
    "/v2/x/manifests/v1%2Fx",
    "/v2/_catalog",
    "/v2/",
]


@pytest.mark.parametrize("path", ROUTES)
def test_paths_are_classified_as_the_registry_routes_them(
    site: tuple[Registry, Proxy, Proxy], path: str
) -> None:
    """Class: route patterns (digest, tag, name, upload id) that differ from distribution's, so
    the proxy authorizes one thing and the registry routes another."""
    registry = site[0]
    status, _, body = call(registry.url + path)
    routed = body != b"404 page not found\n" and status != 301
    target = classify(path)
    assert (target.action is not Action.OTHER) == routed, (status, body[:200])
    if routed and b'"name"' in body:
        assert json.loads(body)["errors"][0]["detail"]["name"] == target.repository


# --- Digests: what 2.8.2's and v3's go-digest read differently, or read as a tag.

# Each contains ':' and routes as a manifest; only the valid ones are digests to every registry.
MANIFEST_REFERENCES = {
    "sha256-63-hex": "sha256:" + "a" * 63,
    "sha256-upper-hex": "sha256:" + "A" * 64,  # a digest to 2.8.2's older go-digest
    "sha256-64-Z": "sha256:" + "Z" * 64,  # likewise
    "sha512-64-hex": "sha512:" + "a" * 64,
    "sha256-loose": "sha256:totallywrong",
    "sha256-base64": "sha256:" + "a" * 63 + "=",
    "unknown-algorithm": "md5:" + "a" * 32,
    "sha256+b64": "sha256+b64:" + "a" * 43,
    "sha256": "sha256:" + "a" * 64,
    "sha384": "sha384:" + "b" * 96,
    "sha512": "sha512:" + "c" * 128,
}


def registry_reads_a_digest(registry: Registry, repository: str, reference: str) -> bool:
    """Whether the registry read `reference` as a digest: only then does it name a revision."""
    status, _, body = call(f"{registry.url}/v2/{repository}/manifests/{reference}")
    return status == 200 or b"evision" in body


@pytest.mark.parametrize("shape", MANIFEST_REFERENCES)
def test_manifest_references_are_digests_only_where_every_registry_agrees(
    site: tuple[Registry, Proxy, Proxy], shape: str
) -> None:
    """Class: a manifest reference read two ways: the proxy took any reference with ':' for a
    digest, Go's digest.Parse takes fewer (and fewer on v3 than on 2.8.2) and reads the rest as a
    tag. What is not a digest to both is refused before authentication and never forwarded."""
    registry, restricted, unrestricted = site
    reference = MANIFEST_REFERENCES[shape]
    assert is_digest(reference) == registry_reads_a_digest(registry, "team-b/app", reference)
    marker = f"team-a/ref-{uuid.uuid4().hex[:8]}"
    path = f"/v2/{marker}/manifests/{reference}".encode()
    for proxy in (restricted, unrestricted):
        for method in ("GET", "HEAD", "DELETE", "PUT"):
            answer = raw(proxy, method, path, b"Content-Type: " + OCI_MANIFEST + b"\r\n")
            if is_digest(reference):
                continue
            if method == "HEAD":  # no body to read the error from
                assert status_and_body(answer)[0] == 400, answer
            else:
                assert_refused_unseen(registry, answer, marker)
        if is_digest(reference):
            # Forwarded: the registry answers (404, or 400 for the empty PUT) itself.
            wait_until(lambda: path.decode() in registry.requested_uris(), "the forwarded GET")
            continue
        head = b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (
            path, proxy.host.encode())  # fmt: skip
        assert_refused_unseen(registry, asyncio.run(exchange_raw(proxy, head)), marker)


def test_a_manifest_by_a_valid_digest_still_passes(site: tuple[Registry, Proxy, Proxy]) -> None:
    """Guards against over-refusing: a pull by a valid digest is forwarded as before."""
    registry, _, unrestricted = site
    digest = push_image(registry.url, "team-a/bydigest", "v1")
    headers = {"Authorization": basic("alice"), "Accept": OCI_MANIFEST.decode()}
    status, reply, _ = call(f"{unrestricted.url}/v2/team-a/bydigest/manifests/{digest}",
                            headers=headers)  # fmt: skip
    assert (status, reply["Docker-Content-Digest"]) == (200, digest)


@pytest.mark.parametrize("kind", ["blobs", "referrers"])
@pytest.mark.parametrize("shape", [s for s, r in MANIFEST_REFERENCES.items() if not is_digest(r)])
def test_blob_and_referrers_digests_are_valid_to_every_registry(
    site: tuple[Registry, Proxy, Proxy], kind: str, shape: str
) -> None:
    """Class: as above, for a blob or referrers digest (400 DIGEST_INVALID on v3, a digest to
    2.8.2's older go-digest for some): refused before anything, never forwarded."""
    registry, restricted, unrestricted = site
    reference = MANIFEST_REFERENCES[shape]
    if kind == "blobs":
        status, _, body = call(f"{registry.url}/v2/team-b/app/blobs/{reference}")
        assert (status, json.loads(body)["errors"][0]["code"]) == (400, "DIGEST_INVALID")
    marker = f"team-a/{kind}-{uuid.uuid4().hex[:8]}"
    for proxy in (restricted, unrestricted):
        answer = raw(proxy, "GET", f"/v2/{marker}/{kind}/{reference}".encode())
        assert_refused_unseen(registry, answer, marker)
