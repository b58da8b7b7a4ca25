"""The loopback registry fixtures themselves, checked with httpx and skopeo only (never dirge's own client)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import httpx
import pytest

from dirge.oci.image import Platform
from dirge.layerbuild import LayerBuilder
from dirge.sources.layout import LayoutWriter
from registry import (
    DOCKER_MANIFEST,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
    Registry,
    layout_manifest_digest,
    push_layout,
    sha256_digest,
    skopeo_inspect_raw,
    ssl_context,
)

OCI_ACCEPT = {"Accept": MANIFEST_ACCEPT}


def _layout(tmp_path: Path, *, compression: str = "gzip", data: bytes = b"hi", tag: str = "t") -> Path:
    layout = tmp_path / f"layout-{compression}-{tag}"
    LayoutWriter(layout).add_image([LayerBuilder().file("hello", data).build()], tag=tag, compression=compression)
    return layout


def _blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def _manifest(layout: Path, digest: str) -> dict:
    return json.loads(_blob_path(layout, digest).read_bytes())


def _big_layout(tmp_path: Path) -> tuple[Path, str, int]:
    """A layout whose one (uncompressed) layer is 256 KiB of random bytes: (layout, layer digest, size)."""
    layout = tmp_path / "big"
    LayoutWriter(layout).add_image([LayerBuilder().file("blob", os.urandom(256 << 10)).build()], tag="t",
                                   compression="none")
    layer = _manifest(layout, layout_manifest_digest(layout, "t"))["layers"][0]
    return layout, layer["digest"], layer["size"]


# -- plain registry, pushes ------------------------------------------------------------------------------------


def test_plain_registry_push_keeps_gzip_manifest_digest(registry: Registry, tmp_path: Path) -> None:
    assert registry.host.startswith("127.0.0.1:") and registry.url == f"http://{registry.host}"
    layout = _layout(tmp_path)
    want = layout_manifest_digest(layout, "t")
    assert push_layout(layout, "t", f"{registry.host}/demo/hello:v1") == want
    with httpx.Client(**registry.httpx_kwargs()) as c:
        r = c.get("/v2/demo/hello/manifests/v1", headers=OCI_ACCEPT)
        assert r.status_code == 200
        assert r.headers["content-type"] == OCI_MANIFEST
        assert r.headers["docker-content-digest"] == want == sha256_digest(r.content)
        assert r.content == _blob_path(layout, want).read_bytes()
        layer = r.json()["layers"][0]
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        blob = c.get(f"/v2/demo/hello/blobs/{layer['digest']}")
        assert blob.status_code == 200 and sha256_digest(blob.content) == layer["digest"]
    assert sha256_digest(skopeo_inspect_raw(f"{registry.host}/demo/hello:v1")) == want


def test_registry_stop_kills_and_frees_port(registry: Registry) -> None:
    proc, port = registry.process, registry.port
    assert proc is not None and registry.running
    registry.stop()
    assert proc.returncode is not None and not registry.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    registry.stop()  # idempotent; the fixture's teardown calls it again


def test_zstd_multi_arch_index_pushes_with_all(registry: Registry, tmp_path: Path) -> None:
    layout = tmp_path / "multi"
    w = LayoutWriter(layout)
    amd = w.add_image([LayerBuilder().file("arch", b"amd64").build()], platform=Platform("linux", "amd64"),
                      compression="zstd")
    arm = w.add_image([LayerBuilder().file("arch", b"arm64").build()], platform=Platform("linux", "arm64", "v8"),
                      compression="zstd")
    index = w.add_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [amd, arm]}, OCI_INDEX)
    w.tag(index, "multi")
    assert registry.push(layout, "multi", "multi:latest", all_platforms=True) == index["digest"]
    with httpx.Client(**registry.httpx_kwargs()) as c:
        r = c.get("/v2/multi/manifests/latest", headers=OCI_ACCEPT)
        assert r.status_code == 200 and r.headers["content-type"] == OCI_INDEX
        assert sha256_digest(r.content) == index["digest"]
        for child in (amd, arm):
            m = c.get(f"/v2/multi/manifests/{child['digest']}", headers=OCI_ACCEPT)
            assert m.status_code == 200 and sha256_digest(m.content) == child["digest"]
            layer = m.json()["layers"][0]
            assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
            blob = c.get(f"/v2/multi/blobs/{layer['digest']}")
            assert blob.content == _blob_path(layout, layer["digest"]).read_bytes()


def test_push_as_docker_schema2_converts(module_registry: Registry, tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    digest = module_registry.push(layout, "t", "converted:v2s2", format="v2s2")
    assert digest != layout_manifest_digest(layout, "t")
    with httpx.Client(**module_registry.httpx_kwargs()) as c:
        r = c.get("/v2/converted/manifests/v2s2", headers=OCI_ACCEPT)
        assert r.status_code == 200 and r.headers["content-type"] == DOCKER_MANIFEST
        assert r.headers["docker-content-digest"] == digest == sha256_digest(r.content)


# -- TLS + basic auth ----------------------------------------------------------------------------------------------


def test_tls_registry_with_basic_auth(tls_registry: Registry, tmp_path: Path) -> None:
    assert tls_registry.url == f"https://{tls_registry.host}"
    assert (tls_registry.username, tls_registry.password) == ("alice", "s3cret")
    layout = _layout(tmp_path, compression="zstd")
    want = layout_manifest_digest(layout, "t")
    assert push_layout(layout, "t", f"{tls_registry.host}/secure/img:1", tls_verify=True,
                       creds=(tls_registry.username, tls_registry.password), cert_dir=tls_registry.cert_dir) == want
    ctx = ssl_context(tls_registry.ca_cert)
    with httpx.Client(base_url=tls_registry.url, verify=ctx, trust_env=False) as c:
        assert c.get("/v2/").status_code == 401
        assert c.get("/v2/secure/img/manifests/1", headers=OCI_ACCEPT).status_code == 401
        assert c.get("/v2/", auth=("alice", "wrong")).status_code == 401
        r = c.get("/v2/secure/img/manifests/1", headers=OCI_ACCEPT, auth=("alice", "s3cret"))
        assert r.status_code == 200 and r.headers["docker-content-digest"] == want
    with httpx.Client(base_url=tls_registry.url, trust_env=False) as c:  # system CAs only: must not verify
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            c.get("/v2/")
    # The certificate names DNS localhost too (checked without relying on how localhost resolves).
    with socket.create_connection(("127.0.0.1", tls_registry.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() is not None


# -- pull-through mirror -------------------------------------------------------------------------------------------


def test_mirror_pulls_through_from_upstream(registry: Registry, mirror_registry, fault_proxy, tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    want = registry.push(layout, "t", "lib/app:1")
    watch = fault_proxy(registry)  # between mirror and upstream, to see what the mirror fetches
    mirror = mirror_registry(watch.url)
    assert mirror.upstream_url == watch.url and mirror.port not in (registry.port, watch.port)
    layer = _manifest(layout, want)["layers"][0]["digest"]
    with httpx.Client(**mirror.httpx_kwargs()) as c:
        r = c.get("/v2/lib/app/manifests/1", headers=OCI_ACCEPT)
        assert r.status_code == 200 and sha256_digest(r.content) == want
        assert sha256_digest(c.get(f"/v2/lib/app/blobs/{layer}").content) == layer
    fetched = [(m, p) for m, p, s in watch.requests if s == 200]
    assert ("GET", f"/v2/lib/app/blobs/{layer}") in fetched
    assert ("GET", "/v2/lib/app/manifests/1") in fetched


def test_mirror_of_tls_upstream(registry_tls_files, tmp_path: Path, mirror_registry) -> None:
    with Registry(tmp_path / "tls-noauth", tls=registry_tls_files) as upstream:
        want = upstream.push(_layout(tmp_path), "t", "private/app:1")
        mirror = mirror_registry(upstream)  # the mirror process trusts the test CA (SSL_CERT_FILE)
        with httpx.Client(**mirror.httpx_kwargs()) as c:
            r = c.get("/v2/private/app/manifests/1", headers=OCI_ACCEPT)
            assert r.status_code == 200 and sha256_digest(r.content) == want
    assert not upstream.running


def test_mirror_logs_in_to_bearer_upstream(registry: Registry, mirror_registry, fault_proxy, tmp_path: Path) -> None:
    want = registry.push(_layout(tmp_path), "t", "private/app:1")
    front = fault_proxy(registry, bearer=True, bearer_creds=("bob", "pw"))
    mirror = mirror_registry(front.url, username="bob", password="pw")
    with httpx.Client(**mirror.httpx_kwargs()) as c:
        r = c.get("/v2/private/app/manifests/1", headers=OCI_ACCEPT)
        assert r.status_code == 200 and sha256_digest(r.content) == want
    assert any(t.username == "bob" and t.status == 200 for t in front.token_requests)


# -- fault proxy ---------------------------------------------------------------------------------------------------


def test_fault_proxy_429_then_success(module_registry: Registry, fault_proxy, tmp_path: Path) -> None:
    layout = _layout(tmp_path, tag="rl")
    want = module_registry.push(layout, "rl", "ratelimited:1")
    proxy = fault_proxy(module_registry.url)
    assert proxy.url == f"http://{proxy.host}" and proxy.host.startswith("127.0.0.1:")
    proxy.fail(r"/manifests/", "status", status=429, retry_after="1")
    path = "/v2/ratelimited/manifests/1"
    with httpx.Client(base_url=proxy.url, trust_env=False) as c:
        r = c.get(path, headers=OCI_ACCEPT)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        r = c.get(path, headers=OCI_ACCEPT)
        assert r.status_code == 200 and r.headers["docker-content-digest"] == want
    assert proxy.requests == [("GET", path, 429), ("GET", path, 200)]
    assert proxy.faults_fired == [("GET", path, "status")] and proxy.pending_faults == 0


def test_fault_proxy_reset_mid_body_truncates(module_registry: Registry, fault_proxy, tmp_path: Path) -> None:
    layout, layer, size = _big_layout(tmp_path)
    module_registry.push(layout, "t", "big:1")
    proxy = fault_proxy(module_registry)
    proxy.fail(r"/blobs/sha256:", "reset_mid_body")
    got = bytearray()
    with httpx.Client(base_url=proxy.url, trust_env=False) as c:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            with c.stream("GET", f"/v2/big/blobs/{layer}") as r:
                assert r.status_code == 200 and int(r.headers["content-length"]) == size
                for chunk in r.iter_raw():
                    got += chunk
        assert len(got) == size // 2  # exactly the first half arrives, then the reset
        assert bytes(got) == _blob_path(layout, layer).read_bytes()[: len(got)]
        # Only the queued request is faulted; the next one (a Range resume) goes through.
        r = c.get(f"/v2/big/blobs/{layer}", headers={"Range": f"bytes={len(got)}-"})
        assert r.status_code == 206 and bytes(got) + r.content == _blob_path(layout, layer).read_bytes()


def test_fault_proxy_corrupt_body_and_no_range(module_registry: Registry, fault_proxy, tmp_path: Path) -> None:
    layout, layer, size = _big_layout(tmp_path)
    module_registry.push(layout, "t", "big2:1")
    proxy = fault_proxy(module_registry)
    proxy.fail(r"/blobs/", "corrupt_body").fail(r"/blobs/", "no_range").fail(r"/blobs/", "close")
    url = f"/v2/big2/blobs/{layer}"
    with httpx.Client(base_url=proxy.url, trust_env=False) as c:
        bad = c.get(url)
        assert bad.status_code == 200 and len(bad.content) == size and sha256_digest(bad.content) != layer
        full = c.get(url, headers={"Range": "bytes=0-9"})
        assert full.status_code == 200 and sha256_digest(full.content) == layer
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            c.get(url)
        part = c.get(url, headers={"Range": "bytes=0-9"})
        assert part.status_code == 206 and len(part.content) == 10
    assert [k for _, _, k in proxy.faults_fired] == ["corrupt_body", "no_range", "close"]
    assert [s for _, _, s in proxy.requests] == [200, 200, 0, 206]


def test_fault_proxy_bearer_token_flow(module_registry: Registry, fault_proxy, tmp_path: Path) -> None:
    layout = _layout(tmp_path, tag="b")
    want = module_registry.push(layout, "b", "team/app:1")
    proxy = fault_proxy(module_registry, bearer=True, bearer_creds=("bob", "pw"))
    path = "/v2/team/app/manifests/1"
    with httpx.Client(base_url=proxy.url, trust_env=False) as c:
        r = c.get(path, headers=OCI_ACCEPT)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == (f'Bearer realm="{proxy.url}/token",service="test-registry",'
                                                 f'scope="repository:team/app:pull"')
        params = {"service": "test-registry", "scope": "repository:team/app:pull"}
        assert c.get("/token", params=params, auth=("bob", "nope")).status_code == 401
        assert c.get("/token", params=params).status_code == 401  # anonymous is refused when creds are set
        tok = c.get("/token", params=params, auth=("bob", "pw"))
        assert tok.status_code == 200
        token = tok.json()["token"]
        assert tok.json()["access_token"] == token
        r = c.get(path, headers={**OCI_ACCEPT, "Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.headers["docker-content-digest"] == want
        other = c.get("/v2/other/manifests/1", headers={"Authorization": f"Bearer {token}"})
        assert other.status_code == 401 and 'scope="repository:other:pull"' in other.headers["www-authenticate"]
    assert [(t.username, t.status, t.scopes) for t in proxy.token_requests] == [
        ("bob", 401, ("repository:team/app:pull",)),
        (None, 401, ("repository:team/app:pull",)),
        ("bob", 200, ("repository:team/app:pull",)),
    ]


def test_fault_proxy_bearer_works_for_skopeo_push_and_pull(registry: Registry, fault_proxy, tmp_path: Path) -> None:
    """A real client through the bearer front: push (POST/PATCH/PUT, rewritten Locations) and inspect."""
    proxy = fault_proxy(registry, bearer=True, bearer_creds=("bob", "pw"))
    layout = _layout(tmp_path)
    want = push_layout(layout, "t", f"{proxy.host}/via/proxy:1", creds=("bob", "pw"))
    assert sha256_digest(skopeo_inspect_raw(f"{proxy.host}/via/proxy:1", creds="bob:pw")) == want
    assert any(t.status == 200 and "repository:via/proxy:pull,push" in t.scopes for t in proxy.token_requests)
    assert any(m == "PUT" and "/manifests/1" in p and s == 201 for m, p, s in proxy.requests)
    # Upload Locations point at the proxy, not the upstream, so the uploads themselves came through it.
    assert any(m == "PUT" and "/blobs/uploads/" in p and s == 201 for m, p, s in proxy.requests)
    with httpx.Client(**registry.httpx_kwargs()) as c:  # it really landed upstream
        assert c.get("/v2/via/proxy/manifests/1", headers=OCI_ACCEPT).headers["docker-content-digest"] == want


def test_fault_proxy_in_front_of_tls_basic_registry(tls_registry: Registry, fault_proxy, tmp_path: Path) -> None:
    want = tls_registry.push(_layout(tmp_path), "t", "secure/img:1")
    proxy = fault_proxy(tls_registry)  # HTTPS upstream trusted via its CA; Authorization is passed through
    proxy.fail(r"/manifests/", "status", status=503)
    with httpx.Client(base_url=proxy.url, auth=tls_registry.auth, trust_env=False) as c:
        assert c.get("/v2/secure/img/manifests/1", headers=OCI_ACCEPT).status_code == 503
        r = c.get("/v2/secure/img/manifests/1", headers=OCI_ACCEPT)
        assert r.status_code == 200 and r.headers["docker-content-digest"] == want
        assert c.get("/v2/", auth=("alice", "wrong")).status_code == 401
        upload = c.post("/v2/secure/img/blobs/uploads/")
        assert upload.status_code == 202 and upload.headers["location"].startswith(f"{proxy.url}/v2/")
