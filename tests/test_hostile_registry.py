"""Hostile registries on loopback: every misbehaviour ends in one clear DirgeError, in bounded time and
memory, with nothing cached from it and no credentials sent to another origin (issue 14 item 5).

The server is a small ``ThreadingHTTPServer`` here whose routes each test sets. Timeouts are made short
through ``DIRGE_REGISTRY_TIMEOUT`` (per read), ``DIRGE_REGISTRY_DEADLINE`` (a whole manifest or token
fetch) and ``DIRGE_REGISTRY_MIN_RATE`` (a blob download slower than this, over one read timeout, is a stall).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import tracemalloc
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dirge.store.cache import Cache
from dirge.errors import DirgeError
from dirge.oci.image import Platform
from dirge.layerbuild import LayerBuilder
from dirge.sources.auth import Credentials
from dirge.sources.open import pull_image

pytestmark = pytest.mark.usefixtures("registry_env")  # conftest: no user config, fast retries

AMD64 = Platform("linux", "amd64")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
CREDS = Credentials("alice", "s3cret-pw")
BASIC = "Basic " + base64.b64encode(b"alice:s3cret-pw").decode()
BOUND = 20.0  # seconds: bounds a hang, not a speed assertion


@pytest.fixture(autouse=True)
def _short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIRGE_REGISTRY_TIMEOUT", "1.5")
    monkeypatch.setenv("DIRGE_REGISTRY_DEADLINE", "4")
    monkeypatch.setenv("DIRGE_REGISTRY_MIN_RATE", "1024")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Image:
    """One valid single-layer image: its blobs by digest and its manifest."""

    def __init__(self, text: bytes = b"hello") -> None:
        tar = LayerBuilder().file("greeting", text).build()
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": [sha(tar)]}}).encode()
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config),
                       "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(tar),
                        "size": len(tar)}],
        }).encode()
        self.blobs = {sha(config): config, sha(tar): tar}
        self.digest = sha(self.manifest)


Route = Callable[["Handler"], None]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "Hostile"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.seen.append((self.path, dict(self.headers.items())))
        for pattern, route in self.server.routes:
            if re.fullmatch(pattern, self.path.split("?")[0]):
                try:
                    route(self)
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    self.close_connection = True
                return
        if self.path == "/v2/":
            self.reply(200, b"{}")
        else:
            self.reply(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}')

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              length: int | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.write(body)

    def write(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()
        self.server.sent += len(data)


class Hostile(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), Handler)
        self.routes: list[tuple[str, Route]] = []
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.sent = 0
        self.stop = threading.Event()  # ends endless bodies when the test is over

    @property
    def host(self) -> str:
        return f"{self.server_address[0]}:{self.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def route(self, pattern: str, fn: Route) -> None:
        self.routes.append((pattern, fn))

    def serve_image(self, image: Image, repo: str = "r/app", tag: str = "1") -> None:
        def manifest(h: Handler) -> None:
            h.reply(200, image.manifest, {"Content-Type": OCI_MANIFEST})

        def blob(h: Handler) -> None:
            h.reply(200, image.blobs[h.path.rsplit("/", 1)[1]])

        self.route(f"/v2/{repo}/manifests/({tag}|{image.digest})", manifest)
        self.route(f"/v2/{repo}/blobs/sha256:[0-9a-f]+", blob)

    def auth_headers(self) -> list[str]:
        return [h["Authorization"] for _, h in self.seen if "Authorization" in h]


def _serve(host: str):
    server = Hostile(host)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def hostile():
    yield from _serve("127.0.0.1")


@pytest.fixture
def other():
    """Another origin: 127.0.0.2 (all of 127/8 is loopback on Linux)."""
    yield from _serve("127.0.0.2")


def pull(server: Hostile, cache: Cache, ref: str = "r/app:1", creds: Credentials | None = None):
    return pull_image(f"{server.host}/{ref}", AMD64, cache=cache, pull="always", creds=creds)


def fails(server: Hostile, cache: Cache, *words: str, ref: str = "r/app:1", creds: Credentials | None = None,
          bound: float = BOUND) -> DirgeError:
    """Pull ``ref``: one DirgeError whose message has ``words``, within ``bound`` s; nothing cached."""
    start = time.monotonic()
    with pytest.raises(DirgeError) as info:
        pull(server, cache, ref, creds)
    elapsed = time.monotonic() - start
    assert elapsed < bound, f"took {elapsed:.1f}s"
    message = str(info.value).lower()
    for word in words:
        assert word.lower() in message, message
    assert_nothing_cached(cache)
    if creds is not None:
        assert creds.password not in str(info.value)
    return info.value


def assert_nothing_cached(cache: Cache) -> None:
    blobs = [p.name for p in cache.blobs_dir.glob("*")] if cache.blobs_dir.exists() else []
    assert not blobs, f"cached from a hostile registry: {blobs}"
    assert not cache.ref_records(), cache.ref_records()


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache")


# -- redirects ----------------------------------------------------------------------------------------------


def test_redirect_loop(hostile: Hostile, cache: Cache) -> None:
    hostile.route("/v2/r/app/manifests/1", lambda h: h.reply(302, b"", {"Location": h.path}))
    fails(hostile, cache, "redirect")


def test_redirect_ping_pong_between_hosts(hostile: Hostile, other: Hostile, cache: Cache) -> None:
    hostile.route("/v2/r/app/manifests/1", lambda h: h.reply(307, b"", {"Location": other.url + h.path}))
    other.route("/v2/r/app/manifests/1", lambda h: h.reply(307, b"", {"Location": hostile.url + h.path}))
    fails(hostile, cache, "redirect", creds=CREDS)
    assert not other.auth_headers()


def _basic_origin(server: Hostile, target: Hostile) -> None:
    def redirect(h: Handler) -> None:
        if h.headers.get("Authorization") != BASIC:
            h.reply(401, b"{}", {"WWW-Authenticate": 'Basic realm="r"'})
        else:
            h.reply(307, b"", {"Location": target.url + h.path})

    server.route("/v2/r/app/(manifests|blobs)/.*", redirect)


def _bearer_origin(server: Hostile, target: Hostile) -> None:
    def token(h: Handler) -> None:
        if h.headers.get("Authorization") != BASIC:
            h.reply(401, b"{}")
        else:
            h.reply(200, b'{"token": "tok-123"}', {"Content-Type": "application/json"})

    def redirect(h: Handler) -> None:
        if h.headers.get("Authorization") != "Bearer tok-123":
            h.reply(401, b"{}", {"WWW-Authenticate": f'Bearer realm="{server.url}/token",service="s"'})
        else:
            h.reply(307, b"", {"Location": target.url + h.path})

    server.route("/token", token)
    server.route("/v2/r/app/(manifests|blobs)/.*", redirect)


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
def test_redirect_to_other_host_gets_no_credentials(hostile: Hostile, other: Hostile, cache: Cache,
                                                     scheme: str) -> None:
    image = Image()
    (_basic_origin if scheme == "basic" else _bearer_origin)(hostile, other)
    other.serve_image(image)
    resolved = pull(hostile, cache, creds=CREDS)  # a legitimate redirect (S3-style) works
    assert str(resolved.manifest_digest) == image.digest
    assert str(cache.lookup_ref(f"{hostile.host}/r/app:1")) == image.digest  # cached once resolved
    assert cache.blob_path(resolved.manifest_digest).exists()
    assert hostile.auth_headers(), "the origin should have been sent credentials"
    assert len(other.seen) >= 3 and not other.auth_headers()


def test_redirect_target_asking_for_credentials_gets_none(hostile: Hostile, other: Hostile, cache: Cache) -> None:
    _basic_origin(hostile, other)
    other.route("/v2/.*", lambda h: h.reply(401, b"{}", {"WWW-Authenticate": 'Basic realm="give"'}))
    fails(hostile, cache, "unauthorized", creds=CREDS)
    assert other.seen and not other.auth_headers()


# -- bodies -------------------------------------------------------------------------------------------------

CAP = 256 << 20  # the server gives up after this much (so a broken client fails the test, not the machine)


def _endless(h: Handler, chunked: bool) -> None:
    h.send_response(200)
    h.send_header("Content-Type", OCI_MANIFEST)
    if chunked:
        h.send_header("Transfer-Encoding", "chunked")
    else:
        h.send_header("Content-Length", str(8 << 30))
    h.end_headers()
    piece = b"[" * 65536
    while h.server.sent < CAP and not h.server.stop.is_set():
        h.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
    h.close_connection = True


@pytest.mark.parametrize("chunked", [False, True], ids=["gigabytes", "endless"])
def test_oversized_manifest(hostile: Hostile, cache: Cache, chunked: bool) -> None:
    hostile.route("/v2/r/app/manifests/1", lambda h: _endless(h, chunked))
    tracemalloc.start()
    try:
        fails(hostile, cache, "manifest", "bytes")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert hostile.sent < 64 << 20, hostile.sent  # stopped near its 4 MiB limit, not at the server's cap
    assert peak < 64 << 20, peak


def test_content_length_shorter_than_body(hostile: Hostile, cache: Cache) -> None:
    image = Image()
    hostile.serve_image(image)
    hostile.routes.insert(0, ("/v2/r/app/manifests/1", lambda h: h.reply(
        200, image.manifest, {"Content-Type": OCI_MANIFEST}, length=len(image.manifest) // 2)))
    fails(hostile, cache, "manifest")


def test_content_length_longer_than_body_then_close(hostile: Hostile, cache: Cache) -> None:
    image = Image()

    def short(h: Handler) -> None:
        h.reply(200, image.manifest, {"Content-Type": OCI_MANIFEST}, length=len(image.manifest) + 100)
        h.close_connection = True

    hostile.route("/v2/r/app/manifests/1", short)
    fails(hostile, cache, "manifest")


def test_content_length_longer_than_body_kept_open(hostile: Hostile, cache: Cache) -> None:
    image = Image()

    def short(h: Handler) -> None:
        h.reply(200, image.manifest, {"Content-Type": OCI_MANIFEST}, length=len(image.manifest) + 100)
        h.server.stop.wait(30)  # keep the connection open, silent
        h.close_connection = True

    hostile.route("/v2/r/app/manifests/1", short)
    fails(hostile, cache, "manifest")


def test_blob_content_length_longer_than_body(hostile: Hostile, cache: Cache) -> None:
    image = Image()
    hostile.serve_image(image)

    def short(h: Handler) -> None:
        data = image.blobs[h.path.rsplit("/", 1)[1]]
        h.reply(200, data[:-10], length=len(data))
        h.close_connection = True

    hostile.routes.insert(0, ("/v2/r/app/blobs/.*", short))
    fails(hostile, cache, "download", "complete")


def _drip(h: Handler, body: bytes, every: float) -> None:
    h.send_response(200)
    h.send_header("Content-Type", OCI_MANIFEST)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    for i in range(len(body)):
        if h.server.stop.wait(every):
            break
        h.write(body[i:i + 1])
    h.close_connection = True


def test_slow_drip_manifest(hostile: Hostile, cache: Cache) -> None:
    image = Image()
    hostile.route("/v2/r/app/manifests/1", lambda h: _drip(h, image.manifest, 0.2))  # ~100 s whole
    fails(hostile, cache, "manifest", "slow")


def test_slow_drip_blob(hostile: Hostile, cache: Cache) -> None:
    image = Image()
    hostile.serve_image(image)
    hostile.routes.insert(0, ("/v2/r/app/blobs/.*", lambda h: _drip(h, image.blobs[h.path.rsplit("/", 1)[1]], 0.1)))
    # the config is a blob too: it drips first. Each of 5 tries stalls after one read timeout (1.5 s).
    fails(hostile, cache, "slow", bound=BOUND + 10)


# -- auth ---------------------------------------------------------------------------------------------------


def test_401_loop_with_fresh_tokens(hostile: Hostile, cache: Cache) -> None:
    issued = []

    def token(h: Handler) -> None:
        issued.append(1)
        h.reply(200, json.dumps({"token": f"t{len(issued)}"}).encode(), {"Content-Type": "application/json"})

    hostile.route("/token", token)
    hostile.route("/v2/r/app/manifests/1", lambda h: h.reply(
        401, b"{}", {"WWW-Authenticate": f'Bearer realm="{hostile.url}/token",service="s"'}))
    fails(hostile, cache, "unauthorized", creds=CREDS)
    assert len(issued) <= 5


def test_401_loop_basic(hostile: Hostile, cache: Cache) -> None:
    hostile.route("/v2/r/app/manifests/1", lambda h: h.reply(401, b"{}", {"WWW-Authenticate": 'Basic realm="x"'}))
    fails(hostile, cache, "unauthorized", creds=CREDS)


@pytest.mark.parametrize("challenge", [
    "", "Bearer", "Bearer realm", "Bearer realm=unquoted,service=x", 'Bearer realm=""', 'Bearer realm="/token"',
    'Bearer realm="ftp://127.0.0.1/token"', 'Bearer realm="http://[::1"', 'Bearer realm="http://127.0.0.1:0/t"',
    'Negotiate abc', 'Basic', "\x00\x01garbage", "Bearer " + "x" * 60000,
    'Bearer realm="http://127.0.0.1:0/t",' + "y" * 8000,
])
def test_malformed_www_authenticate(hostile: Hostile, cache: Cache, challenge: str) -> None:
    def answer(h: Handler) -> None:
        h.send_response(401)
        h.send_header("WWW-Authenticate", challenge)
        h.send_header("Content-Length", "2")
        h.end_headers()
        h.write(b"{}")

    hostile.route("/v2/r/app/manifests/1", answer)
    creds = None if challenge == "Basic" else CREDS
    err = fails(hostile, cache, ref="r/app:1", creds=creds)
    assert any(w in str(err).lower() for w in ("401", "credentials", "challenge", "token", "unauthorized", "header")), err


@pytest.mark.parametrize("kind", ["html", "no-token", "list", "number", "control", "huge", "endless", "drip"])
def test_token_endpoint_garbage(hostile: Hostile, cache: Cache, kind: str) -> None:
    def token(h: Handler) -> None:
        if kind == "endless":
            _endless(h, chunked=True)
        elif kind == "drip":
            _drip(h, b'{"token": "' + b"a" * 1000 + b'"}', 0.2)
        else:
            body = {"html": b"<html>oops</html>", "no-token": b'{"expires_in": 300}', "list": b"[1, 2]",
                    "number": b'{"token": 12}', "control": b'{"token": "a\\r\\nX-Injected: 1"}',
                    "huge": b'{"token": "' + b"a" * (8 << 20) + b'"}'}[kind]
            h.reply(200, body, {"Content-Type": "application/json"})

    hostile.route("/token", token)
    hostile.route("/v2/r/app/manifests/1", lambda h: h.reply(
        401, b"{}", {"WWW-Authenticate": f'Bearer realm="{hostile.url}/token",service="s"'}))
    fails(hostile, cache, "token", creds=CREDS)
    assert hostile.sent < 64 << 20


# -- content ------------------------------------------------------------------------------------------------


def test_digest_ref_whose_manifest_hashes_differently(hostile: Hostile, cache: Cache) -> None:
    image, other_image = Image(b"one"), Image(b"two")
    hostile.route(f"/v2/r/app/manifests/{image.digest}",
                  lambda h: h.reply(200, other_image.manifest, {"Content-Type": OCI_MANIFEST}))
    fails(hostile, cache, "manifest", "expected", ref=f"r/app@{image.digest}")


def test_tag_with_wrong_docker_content_digest(hostile: Hostile, cache: Cache) -> None:
    image = Image()
    hostile.route("/v2/r/app/manifests/1", lambda h: h.reply(
        200, image.manifest, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": sha(b"other")}))
    fails(hostile, cache, "digest")


def _index(child_digest: str, media_type: str = OCI_INDEX, size: int = 100) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": media_type, "digest": child_digest, "size": size,
         "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()


def test_index_that_lists_itself(hostile: Hostile, cache: Cache) -> None:
    # An index cannot name its own digest; the hostile registry serves it again for whatever it names.
    index = _index(sha(b"anything"))
    hostile.route("/v2/r/app/manifests/.*", lambda h: h.reply(200, index, {"Content-Type": OCI_INDEX}))
    fails(hostile, cache, "manifest", "expected")


def test_cycle_of_two_indexes(hostile: Hostile, cache: Cache) -> None:
    a, b = _index(sha(b"b")), _index(sha(b"a"))  # each names the other's (impossible) digest
    hostile.route("/v2/r/app/manifests/1", lambda h: h.reply(200, a, {"Content-Type": OCI_INDEX}))
    hostile.route(f"/v2/r/app/manifests/{sha(b'b')}", lambda h: h.reply(200, b, {"Content-Type": OCI_INDEX}))
    hostile.route(f"/v2/r/app/manifests/{sha(b'a')}", lambda h: h.reply(200, a, {"Content-Type": OCI_INDEX}))
    fails(hostile, cache, "manifest", "expected")


def test_indexes_nested_too_deep(hostile: Hostile, cache: Cache) -> None:
    image = Image()
    hostile.serve_image(image)
    docs = [image.manifest]
    child, child_type = image.digest, OCI_MANIFEST
    for _ in range(6):  # real nesting, each naming the one below by its true digest
        doc = _index(child, child_type, len(docs[-1]))
        docs.append(doc)
        child, child_type = sha(doc), OCI_INDEX
    by_digest = {sha(d): d for d in docs}
    hostile.routes.insert(0, ("/v2/r/app/manifests/1", lambda h: h.reply(200, docs[-1], {"Content-Type": OCI_INDEX})))
    hostile.routes.insert(0, ("/v2/r/app/manifests/sha256:.*", lambda h: h.reply(
        200, by_digest[h.path.rsplit("/", 1)[1]], {"Content-Type": OCI_INDEX})))
    fails(hostile, cache, "nested")


def test_top_manifest_not_json_is_not_cached(hostile: Hostile, cache: Cache) -> None:
    hostile.route("/v2/r/app/manifests/1", lambda h: h.reply(200, b"<html>login page</html>",
                                                             {"Content-Type": "text/html"}))
    fails(hostile, cache, "manifest")
