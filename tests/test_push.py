"""dirge push: a converted base as an OCI 1.1 artifact (checked with plain httpx, python zstandard and the
zstd CLI against a local export), the referrers tag, nothing sent twice, cross-repository mounts, chunked
uploads resumed after a reset, TLS + htpasswd, and a local variant pushed as its image; all on loopback
docker-registry processes (tests/registry.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import zstandard

from conftest import needs_root, needs_tool
from dirge.errors import AuthError, DirgeError
from dirge.exporting import export
from dirge.fsimage.erofs import WRITER_VERSION as EROFS_WRITER
from dirge.fsimage.ext4 import WRITER_VERSION as EXT4_WRITER
from dirge.layerbuild import LayerBuilder
from dirge.oci import artifact as art
from dirge.options import DiskOptions
from dirge.publish import push
from dirge.events import Push
from dirge.sources.auth import Credentials
from dirge.sources.layout import LayoutWriter
from dirge.store.cache import Cache
from registry import push_layout

pytestmark = [needs_root, needs_tool("docker-registry", "skopeo"), pytest.mark.usefixtures("registry_env")]
DIRGE = str(Path(sys.executable).parent / "dirge")
MANIFEST_ACCEPT = f"{art.OCI_MANIFEST}, {art.OCI_INDEX}"


def source_image(registry, tmp_path: Path, *, big: bool = False) -> tuple[str, str]:
    """An image pushed to ``registry`` as src/app:1: (its ref, its manifest digest D)."""
    layer = LayerBuilder().dir("etc").file("etc/hostname", b"pushed\n").file("bin/tool", b"\x7fELF" * 300, mode=0o755)
    if big:  # incompressible, so the compressed blob spans many small chunks
        layer.file("data/random.bin", os.urandom(1 << 20))
    layout = tmp_path / "src-layout"
    LayoutWriter(layout).add_image([layer.build(), LayerBuilder().file("etc/motd", b"layer 2\n").build()], tag="1")
    ref = f"{registry.host}/src/app:1"
    return ref, push_layout(layout, "1", ref, **registry.push_kwargs())


def fetch(client: httpx.Client, repo: str, reference: str) -> httpx.Response:
    r = client.get(f"/v2/{repo}/manifests/{reference}", headers={"Accept": MANIFEST_ACCEPT})
    assert r.status_code == 200, r.text
    return r


def blob_bytes(client: httpx.Client, repo: str, digest: str) -> bytes:
    r = client.get(f"/v2/{repo}/blobs/{digest}", follow_redirects=True)
    assert r.status_code == 200
    assert "sha256:" + hashlib.sha256(r.content).hexdigest() == digest
    return r.content


def check_artifact(client: httpx.Client, repo: str, ref: str, subject: str, fmt: str, local: Path,
                   tmp_path: Path, options: dict) -> dict:
    """The artifact at ``repo:ref`` against the spec, its blob against the local file; returns the manifest."""
    manifest = json.loads(fetch(client, repo, ref).content)
    assert manifest["mediaType"] == art.OCI_MANIFEST and manifest["artifactType"] == art.artifact_type(fmt)
    assert manifest["config"] == {"mediaType": art.EMPTY_MEDIA_TYPE, "digest": art.EMPTY_DIGEST, "size": 2}
    assert blob_bytes(client, repo, art.EMPTY_DIGEST) == b"{}"
    assert manifest["subject"]["digest"] == subject
    ann = manifest["annotations"]
    local_sha = "sha256:" + hashlib.sha256(local.read_bytes()).hexdigest()
    assert ann[art.ANNOTATION_SHA256] == local_sha and int(ann[art.ANNOTATION_SIZE]) == local.stat().st_size
    assert ann[art.ANNOTATION_SOURCE_DIGEST] == subject and ann[art.ANNOTATION_PLATFORM] == "linux/amd64"
    writer = EROFS_WRITER if fmt == "erofs" else EXT4_WRITER
    assert ann[art.ANNOTATION_WRITER] == writer and json.loads(ann[art.ANNOTATION_OPTIONS]) == options
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == art.layer_media_type(fmt)
    packed = blob_bytes(client, repo, layer["digest"])
    frames = art.read_seek_table(packed[-4096:])
    assert sum(d for _, d in frames) == local.stat().st_size and all(d == art.FRAME_SIZE for _, d in frames[:-1])
    # any zstd decoder: python's (every frame) and the CLI (skips the seek table's skippable frame)
    plain = b"".join(art.decompress_stream(iter([packed]), local.stat().st_size))
    assert "sha256:" + hashlib.sha256(plain).hexdigest() == local_sha
    assert zstandard.ZstdDecompressor().stream_reader(packed, read_across_frames=True).read() == plain
    if shutil.which("zstd"):
        (tmp_path / "blob.zst").write_bytes(packed)
        out = subprocess.run(["zstd", "-dc", str(tmp_path / "blob.zst")], capture_output=True, check=True).stdout
        assert out == plain
    return manifest


def uploads(fn):
    """A progress callback that hands the Push events' (done, total) to ``fn``."""
    return lambda event: fn(event.done, event.total) if isinstance(event, Push) else None


def test_erofs_artifact_referrers_tag_and_a_second_push_sends_no_blob(registry, fault_proxy, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import dirge.publish

    compressions: list[int] = []
    real = dirge.publish.compress_seekable

    def counting(*args, **kwargs):  # the real compressor, counted
        compressions.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dirge.publish, "compress_seekable", counting)
    ref, subject = source_image(registry, tmp_path)
    cache = Cache(tmp_path / "cache")
    local = export(ref, tmp_path / "local.erofs", format="erofs", cache=Cache(tmp_path / "other-cache")).path
    proxy = fault_proxy(registry)
    seen: list[tuple[int, int]] = []
    result = push(ref, f"{proxy.host}/bases/app:erofs", cache=cache, progress=uploads(lambda d, t: seen.append((d, t))))
    assert result.kind == "artifact" and result.subject == subject and result.tag == "erofs"
    assert result.referrers == "tag" and result.manifest_sent and result.bytes_sent > 0
    assert set(result.blobs.values()) == {"uploaded"} and seen[-1][0] == seen[-1][1]

    with httpx.Client(**registry.httpx_kwargs()) as client:
        manifest = check_artifact(client, "bases/app", "erofs", subject, "erofs", local, tmp_path, {})
        assert manifest["annotations"][art.ANNOTATION_SOURCE_REF] == ref
        r = fetch(client, "bases/app", result.digest)
        assert "sha256:" + hashlib.sha256(r.content).hexdigest() == result.digest
        index = json.loads(fetch(client, "bases/app", art.referrers_tag(art.parse_digest(subject))).content)
        assert index["mediaType"] == art.OCI_INDEX
        assert index["manifests"] == [{"mediaType": art.OCI_MANIFEST, "digest": result.digest,
                                       "size": len(r.content), "artifactType": art.artifact_type("erofs")}]

    before = len(proxy.requests)
    again = push(ref, f"{proxy.host}/bases/app:erofs", cache=cache)
    second = proxy.requests[before:]
    assert again.digest == result.digest and again.bytes_sent == 0 and not again.manifest_sent
    assert set(again.blobs.values()) == {"exists"}
    assert not [q for q in second if q[0] in ("POST", "PATCH", "PUT")]
    assert len(compressions) == 1  # the blob's digest was remembered: not compressed again for nothing
    assert (("GET", f"/v2/bases/app/referrers/{subject}", 404) in second  # no referrers API here: the tag
            and [q for q in second if q[1].endswith(art.referrers_tag(art.parse_digest(subject)))])

    # A registry whose referrers API answers (an index) keeps referrers itself: the tag is left alone.
    index = json.dumps({"schemaVersion": 2, "mediaType": art.OCI_INDEX, "manifests": []}).encode()
    proxy.fail(r"/referrers/", "status", status=200, body=index, headers={"Content-Type": art.OCI_INDEX})
    before = len(proxy.requests)
    third = push(ref, f"{proxy.host}/bases/app:erofs", cache=cache)
    assert third.referrers == "api" and not [q for q in proxy.requests[before:] if "sha256-" in q[1]]

    # No mount source known: the remembered blob is made again (same bytes) and uploaded.
    (cache.root / "pushed" / (hashlib.sha256(proxy.host.encode()).hexdigest()[:32] + ".json")).unlink()
    fourth = push(ref, f"{proxy.host}/bases/other:erofs", cache=cache)
    assert fourth.digest == result.digest and fourth.bytes_sent == result.bytes_sent and len(compressions) == 2

    # A base file that is not the one remembered (rebuilt: another inode or time) is compressed again.
    (base_file,) = (cache.root / "bases").glob("*-erofs/rootfs.erofs")
    os.utime(base_file, ns=(0, 0))
    push(ref, f"{proxy.host}/bases/other:erofs", cache=cache)
    assert len(compressions) == 3


def test_ext4_options_recorded_and_bytes_equal_to_an_export_cli(registry, tmp_path: Path) -> None:
    ref, subject = source_image(registry, tmp_path)
    local = export(ref, tmp_path / "local.ext4", format="ext4", cache=Cache(tmp_path / "other-cache"),
                   disk=DiskOptions(64 << 20, False)).path
    env = {**os.environ, "DIRGE_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([DIRGE, "push", ref, f"{registry.host}/bases/app", "--format", "ext4", "--size", "64M",
                           "--no-journal", "--json"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["format"] == "ext4" and out["tag"] is None and out["ref"].endswith("@" + out["digest"])
    with httpx.Client(**registry.httpx_kwargs()) as client:
        manifest = check_artifact(client, "bases/app", out["digest"], subject, "ext4", local, tmp_path,
                                  {"inodes": None, "journal": False, "size": 64 << 20})
        assert manifest["annotations"][art.ANNOTATION_PLATFORM] == "linux/amd64"
    wrong = subprocess.run([DIRGE, "push", ref, f"{registry.host}/bases/app", "--size", "64M"], capture_output=True,
                           text=True, env=env)
    assert wrong.returncode != 0 and "--format ext4" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1
    bad = subprocess.run([DIRGE, "push", ref, f"{registry.host}/bases/app@{subject}"], capture_output=True,
                         text=True, env=env)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "no digest" in bad.stderr


def test_same_artifact_to_a_second_repository_is_mounted(registry, fault_proxy, tmp_path: Path) -> None:
    ref, subject = source_image(registry, tmp_path)
    cache = Cache(tmp_path / "cache")
    proxy = fault_proxy(registry)
    first = push(ref, f"{proxy.host}/team-a/base:1", cache=cache)
    before = len(proxy.requests)
    second = push(ref, f"{proxy.host}/team-b/base:1", cache=cache)
    mounts = [(p, s) for m, p, s in proxy.requests[before:] if m == "POST" and "mount=" in p]
    assert len(mounts) == 2 and all(s == 201 for _, s in mounts)  # the config and the layer
    for path, _ in mounts:
        assert parse_qs(urlsplit(path).query)["from"] == ["team-a/base"]
    assert second.digest == first.digest and second.bytes_sent == 0 and set(second.blobs.values()) == {"mounted"}
    assert not [q for q in proxy.requests[before:] if q[0] in ("PATCH",) or (q[0] == "PUT" and "/blobs/" in q[1])]


def test_bearer_tokens_cover_the_push_and_the_mount_and_faults_are_retried(registry, fault_proxy,
                                                                             tmp_path: Path) -> None:
    ref, subject = source_image(registry, tmp_path)
    cache = Cache(tmp_path / "cache")
    proxy = fault_proxy(registry, bearer=True, bearer_creds=("bob", "pw"))
    proxy.fail(r"/blobs/uploads/", "status", status=429, retry_after="0", method="POST")
    proxy.fail(r"/manifests/", "status", status=503, method="PUT")
    push(ref, f"{proxy.host}/team-a/base:1", cache=cache, creds=Credentials("bob", "pw"))
    assert proxy.pending_faults == 0
    proxy.token_requests.clear()
    before = len(proxy.requests)
    result = push(ref, f"{proxy.host}/team-b/base:1", cache=cache, creds=Credentials("bob", "pw"))
    assert set(result.blobs.values()) == {"mounted"}
    # a mount's scope names the source repository too: one challenge (401) for its token, then mounted
    assert [s for m, p, s in proxy.requests[before:] if m == "POST" and "mount=" in p] == [401, 201, 201]
    scopes = {s for t in proxy.token_requests for s in t.scopes}
    assert {"repository:team-b/base:pull,push", "repository:team-a/base:pull"} <= scopes
    assert all(t.username == "bob" and t.status == 200 for t in proxy.token_requests)


def test_a_mirror_serves_the_source_pull_never_the_push(registry, fault_proxy, tmp_path: Path) -> None:
    ref, subject = source_image(registry, tmp_path)
    mirror = fault_proxy(registry)
    Path(os.environ["DIRGE_REGISTRIES_CONFIG"]).write_text(
        f'[registries."{registry.host}"]\nmirrors = ["{mirror.url}"]\n')
    result = push(ref, f"{registry.host}/bases/app:1", cache=Cache(tmp_path / "cache"))
    assert result.subject == subject
    assert mirror.requests and all(m == "GET" and "/src/app/" in p for m, p, _ in mirror.requests)


def test_chunked_upload_resumes_after_a_reset_mid_upload(registry, fault_proxy, tmp_path: Path) -> None:
    ref, subject = source_image(registry, tmp_path, big=True)
    proxy = fault_proxy(registry)
    chunk = 128 << 10
    fired: list[int] = []

    def on_bytes(done: int, total: int) -> None:
        if done >= 3 * chunk and not fired:  # after the third chunk: the next PATCH is reset unanswered
            fired.append(done)
            proxy.fail(r"/blobs/uploads/", "close", method="PATCH")

    result = push(ref, f"{proxy.host}/bases/app:big", cache=Cache(tmp_path / "cache"), chunk_size=chunk,
                  progress=uploads(on_bytes))
    assert fired and [k for _, _, k in proxy.faults_fired] == ["close"]
    patches = [s for m, p, s in proxy.requests if m == "PATCH"]
    assert patches.count(0) == 1 and patches.count(202) >= 8  # ~1 MiB in 128 KiB chunks, one lost
    status = [s for m, p, s in proxy.requests if m == "GET" and "/blobs/uploads/" in p]
    assert status == [204]  # where the upload stood, then resumed from there (no new upload session)
    assert len([1 for m, p, _ in proxy.requests if m == "POST" and "/blobs/uploads/" in p]) == 2  # config, layer
    local = export(ref, tmp_path / "local.erofs", format="erofs", cache=Cache(tmp_path / "other-cache")).path
    with httpx.Client(**registry.httpx_kwargs()) as client:
        manifest = check_artifact(client, "bases/app", "big", subject, "erofs", local, tmp_path, {})
    assert result.bytes_sent == manifest["layers"][0]["size"] + 2


def test_chunk_kept_but_its_answer_lost_restarts_the_upload(registry, fault_proxy, tmp_path: Path) -> None:
    # distribution forgets an upload asked about with an outdated state token: the upload starts again
    ref, subject = source_image(registry, tmp_path, big=True)
    proxy = fault_proxy(registry)
    chunk = 256 << 10
    armed: list[int] = []

    def on_bytes(done: int, total: int) -> None:
        if done >= chunk and not armed:
            armed.append(done)
            proxy.fail(r"/blobs/uploads/", "lost_answer", method="PATCH")

    result = push(ref, f"{proxy.host}/bases/app:lost", cache=Cache(tmp_path / "cache"), chunk_size=chunk,
                  progress=uploads(on_bytes))
    assert [k for _, _, k in proxy.faults_fired] == ["lost_answer"]
    posts = [s for m, p, s in proxy.requests if m == "POST" and "/blobs/uploads/" in p]
    assert posts == [202, 202, 202]  # the config, the layer, the layer again
    local = export(ref, tmp_path / "local.erofs", format="erofs", cache=Cache(tmp_path / "other-cache")).path
    with httpx.Client(**registry.httpx_kwargs()) as client:
        manifest = check_artifact(client, "bases/app", "lost", subject, "erofs", local, tmp_path, {})
    # what the lost session accepted (one chunk) counts: it was sent
    assert result.bytes_sent == manifest["layers"][0]["size"] + 2 + chunk


def test_tls_registry_with_htpasswd(tls_registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    certs = tmp_path / "certs.d" / tls_registry.host
    certs.mkdir(parents=True)
    shutil.copyfile(tls_registry.ca_cert, certs / "ca.crt")
    monkeypatch.setenv("DIRGE_CERTS_DIRS", str(tmp_path / "certs.d"))
    ref, subject = source_image(tls_registry, tmp_path)
    # the source is pulled with the auth file's credentials; --creds (creds=) are DEST's
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    (tmp_path / "docker").mkdir()
    auth = f"{tls_registry.username}:{tls_registry.password}"
    (tmp_path / "docker/config.json").write_text(json.dumps(
        {"auths": {tls_registry.host: {"auth": __import__("base64").b64encode(auth.encode()).decode()}}}))
    cache = Cache(tmp_path / "cache")
    with pytest.raises(AuthError, match="refused|unauthorized|credentials"):
        push(ref, f"{tls_registry.host}/bases/app:1", cache=cache, creds=Credentials("alice", "wrong"))
    result = push(ref, f"{tls_registry.host}/bases/app:1", cache=cache,
                  creds=Credentials(tls_registry.username, tls_registry.password))
    assert result.subject == subject and result.referrers == "tag"
    with httpx.Client(**tls_registry.httpx_kwargs()) as client:
        assert json.loads(fetch(client, "bases/app", "1").content)["subject"]["digest"] == subject


def test_local_image_flags_and_destination_are_checked(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    with pytest.raises(DirgeError, match="local image is pushed as its OCI image"):
        push("debian", "127.0.0.1:1/x/y:1", format="erofs", cache=cache)
    with pytest.raises(DirgeError, match="registry repository"):
        push("oci:/nowhere:1", "oci:/somewhere", cache=cache)


BUSYBOX = Path("/bin/busybox")


def test_local_variant_pushed_as_its_image(registry, fault_proxy, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("buildah") is None or not BUSYBOX.exists():
        pytest.skip("needs buildah and /bin/busybox (scripts/setup.sh --test)")
    base = LayerBuilder().dir("bin").dir("etc").file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
    base.symlink("bin/sh", "busybox").symlink("bin/echo", "busybox")
    layout = tmp_path / "busybox"
    LayoutWriter(layout).add_image([base.build()], tag="1")
    from_ref = f"{registry.host}/base/busybox:1"
    push_layout(layout, "1", from_ref)
    images = tmp_path / "images"
    (images / "pushvm").mkdir(parents=True)
    (images / "pushvm/Dockerfile").write_text(f"FROM {from_ref}\nRUN echo built > /etc/built\n")
    monkeypatch.setenv("DIRGE_IMAGES_PATH", str(images))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n')
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))
    (tmp_path / "docker").mkdir()  # buildah wants the auth file it is pointed at to exist
    (tmp_path / "docker/config.json").write_text("{}")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    cache = Cache(tmp_path / "cache")
    proxy = fault_proxy(registry)
    with pytest.raises(DirgeError, match="--format"):
        push("pushvm", f"{proxy.host}/vms/pushvm:1", format="ext4", cache=cache)
    result = push("pushvm", f"{proxy.host}/vms/pushvm:1", cache=cache)
    assert result.kind == "image" and result.referrers is None and result.bytes_sent > 0
    again = push("pushvm", f"{proxy.host}/vms/pushvm:1", cache=cache)
    assert again.bytes_sent == 0 and not again.manifest_sent
    # what was pushed is an image dirge pulls back to the same manifest
    with httpx.Client(**registry.httpx_kwargs()) as client:
        r = fetch(client, "vms/pushvm", "1")
        assert "sha256:" + hashlib.sha256(r.content).hexdigest() == result.digest
        manifest = json.loads(r.content)
        for desc in [manifest["config"], *manifest["layers"]]:
            blob_bytes(client, "vms/pushvm", desc["digest"])
    from dirge.flatten import unpack

    unpack(f"{registry.host}/vms/pushvm:1", tmp_path / "tree", cache=Cache(tmp_path / "cache2"))
    assert (tmp_path / "tree/etc/built").read_text() == "built\n"


def test_cli_push_on_a_terminal_shows_progress_and_succeeds(registry, tmp_path: Path) -> None:
    import threading

    ref, _ = source_image(registry, tmp_path)
    primary, secondary = os.openpty()  # stderr a TTY: the rich display runs (build, then upload)
    shown = bytearray()

    def drain() -> None:  # read while it runs, so a full terminal buffer never blocks the child
        try:
            while chunk := os.read(primary, 65536):
                shown.extend(chunk)
        except OSError:  # EIO: the terminal's other side is closed
            pass

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        proc = subprocess.run([DIRGE, "push", ref, f"{registry.host}/bases/tty:1"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=secondary, text=True, timeout=300,
                              env={**os.environ, "DIRGE_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "100",
                                   "DIRGE_PROGRESS": "auto"})  # the suite sets quiet
    finally:
        os.close(secondary)
        reader.join()
        os.close(primary)
    assert proc.returncode == 0, shown.decode(errors="replace")
    assert proc.stdout.startswith(f"{registry.host}/bases/tty:1@sha256:") and "blob bytes sent" in proc.stdout
    assert b"push" in shown  # the upload's bar was drawn on the terminal


def test_credentials_never_go_to_an_upload_location_of_another_origin(registry, fault_proxy,
                                                                      tmp_path: Path) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    seen: list[tuple[str, str | None]] = []

    class Recorder(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(201)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        ref, _ = source_image(registry, tmp_path)
        proxy = fault_proxy(registry, bearer=True, bearer_creds=("bob", "pw"))
        elsewhere = f"http://127.0.0.1:{server.server_address[1]}/upload/1?state=x"
        proxy.fail(r"/blobs/uploads/", "status", status=202, method="POST", headers={"Location": elsewhere})
        with pytest.raises(DirgeError):  # the registry never got that blob: the manifest is refused
            push(ref, f"{proxy.host}/bases/app:1", cache=Cache(tmp_path / "cache"), creds=Credentials("bob", "pw"))
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert len(seen) == 1 and seen[0][0].startswith("/upload/1?") and seen[0][1] is None
