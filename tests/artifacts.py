"""Test helpers for prepared-base artifacts: a minimal pusher (until ``dirge push`` is merged) and a loopback
server with the distribution-spec 1.1 referrers API in front of a docker-registry (which has none)."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from dirge.oci import artifact as art
from dirge.oci.image import OCI_INDEX, OCI_MANIFEST, Descriptor, Platform
from dirge.oci.reference import parse_digest


def _digest(data: bytes) -> Any:
    return parse_digest("sha256:" + hashlib.sha256(data).hexdigest())


def push_artifact(client: httpx.Client, repo: str, image_ref: str, fmt: str, image_file: Path, *,
                  writer_version: str = "1", options: dict[str, Any] | None = None, sha256: str | None = None,
                  blob_edit: Any = None, frame_size: int = art.FRAME_SIZE) -> str:
    """Push ``image_file`` as the ``fmt`` artifact of ``image_ref``'s manifest (``client`` has base_url and
    auth): blobs by monolithic POST+PUT, the manifest, then the referrers tag unless the registry answered
    ``OCI-Subject`` (it has the referrers API). ``sha256``/``blob_edit`` forge annotation or bytes."""
    name, tag = image_ref.rsplit(":", 1)
    got = client.get(f"/v2/{name}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
    got.raise_for_status()
    subject = Descriptor(got.headers["Content-Type"].split(";")[0], _digest(got.content), len(got.content))
    data = image_file.read_bytes()
    out = io.BytesIO()
    art.compress_seekable(io.BytesIO(data), out, frame_size)
    blob = out.getvalue() if blob_edit is None else blob_edit(out.getvalue())
    for payload in (blob, art.EMPTY_DATA):
        start = client.post(f"/v2/{repo}/blobs/uploads/")
        assert start.status_code == 202, start.text
        where = httpx.URL(start.headers["Location"]).copy_merge_params({"digest": str(_digest(payload))})
        client.put(where, content=payload, headers={"Content-Type": "application/octet-stream"}).raise_for_status()
    layer = Descriptor(art.layer_media_type(fmt), _digest(blob), len(blob))
    manifest = art.artifact_manifest(fmt, layer, subject, sha256=parse_digest(sha256) if sha256 else _digest(data),
                                     size=len(data), source_ref=image_ref, platform=Platform("linux", "amd64"),
                                     writer_version=writer_version,
                                     options=options if options is not None else art.artifact_options(fmt),
                                     frame_size=frame_size)
    digest = str(_digest(manifest))
    put = client.put(f"/v2/{repo}/manifests/{digest}", content=manifest, headers={"Content-Type": OCI_MANIFEST})
    put.raise_for_status()
    if "OCI-Subject" not in put.headers:
        tag_url = f"/v2/{repo}/manifests/{art.referrers_tag(subject.digest)}"
        old = client.get(tag_url, headers={"Accept": OCI_INDEX})
        index = art.referrers_index(old.content if old.status_code == 200 else None,
                                    Descriptor(OCI_MANIFEST, _digest(manifest), len(manifest)), art.artifact_type(fmt))
        client.put(tag_url, content=index, headers={"Content-Type": OCI_INDEX}).raise_for_status()
    return digest


_REFERRERS = re.compile(r"^/v2/(?P<name>.+)/referrers/(?P<digest>sha256:[0-9a-f]{64})$")
_MANIFEST_PUT = re.compile(r"^/v2/(?P<name>.+)/manifests/[^/]+$")


class ReferrersServer:
    """Loopback HTTP: ``GET /v2/<name>/referrers/<digest>`` answered as distribution-spec 1.1 says (an OCI
    index of the manifests PUT through this server whose subject is ``digest``, ``?artifactType=`` honoured
    with ``OCI-Filters-Applied: artifactType``); manifest PUTs with a subject answer ``OCI-Subject``; every
    other request is relayed to ``upstream`` (host:port, plain HTTP). ``requests`` lists (method, path)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.referrers: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer._handle(self)

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def start(self) -> "ReferrersServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(5)
        self._server.server_close()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        with self._lock:
            self.requests.append((h.command, h.path))
        match = _REFERRERS.match(url.path)
        if match and h.command == "GET":
            wanted = parse_qs(url.query).get("artifactType")
            with self._lock:
                items = list(self.referrers.get((match["name"], match["digest"]), []))
            if wanted:
                items = [i for i in items if i.get("artifactType") == wanted[0]]
            data = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": items}).encode()
            h.send_response(200)
            h.send_header("Content-Type", OCI_INDEX)
            if wanted:
                h.send_header("OCI-Filters-Applied", "artifactType")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection")}
            conn.request(h.command, h.path, body=body if body or h.command in ("PUT", "POST", "PATCH") else None,
                         headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        extra: list[tuple[str, str]] = []
        put = _MANIFEST_PUT.match(url.path)
        if put and h.command == "PUT" and resp.status == 201:
            obj = json.loads(body)
            if isinstance(obj.get("subject"), dict):
                entry = {"mediaType": obj.get("mediaType"), "digest": "sha256:" + hashlib.sha256(body).hexdigest(),
                         "size": len(body), "artifactType": obj.get("artifactType"),
                         "annotations": obj.get("annotations", {})}
                with self._lock:
                    self.referrers.setdefault((put["name"], obj["subject"]["digest"]), []).append(entry)
                extra.append(("OCI-Subject", obj["subject"]["digest"]))
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                h.send_header(k, v.replace(f"http://{self.upstream}", f"http://{self.host}"))
        for k, v in extra:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
