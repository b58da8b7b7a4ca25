"""``--pull never`` is offline: a cached image needs no registry; a missing blob is one clear error, and
no registry client, connection or credential helper is involved (a trap proves it: a helper that leaves a
marker and a listening socket on the registry's port that records every connection)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import needs_root, needs_tool
from dirge.store.cache import Cache
from dirge.errors import DirgeError
from dirge.layerbuild import LayerBuilder
from dirge.rootfs import cleanup, prepare
from dirge.sources.layout import LayoutWriter
from dirge.sources.open import pull_image
from dirge.flatten import unpack
from registry import push_layout

DIRGE = [str(Path(sys.executable).parent / "dirge")]
REPO = "off/app:1"


class Listener:
    """A TCP socket on 127.0.0.1:``port`` that counts connections and closes each at once."""

    def __init__(self, port: int) -> None:
        self.accepted = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # shut down by stop()
                return
            self.accepted += 1
            conn.close()

    def stop(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


pytestmark = pytest.mark.usefixtures("registry_env")  # conftest: no user config, fast retries


@pytest.fixture
def cached(registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An image pulled into a cache, then the registry stopped and its port taken by a ``Listener``, and
    a credential helper for that host (in docker's config.json and podman's auth.json) that writes
    ``marker`` when run. Yields (ref, cache, layer digests, config digest, marker, listener)."""
    layout = tmp_path / "layout"
    layers = [LayerBuilder().dir("etc").file("etc/base", b"one\n").build(),
              LayerBuilder().dir("app").file("app/run", b"#!/bin/sh\n", mode=0o755).build()]
    LayoutWriter(layout).add_image(layers, tag="t")
    ref = f"{registry.host}/{REPO}"
    push_layout(layout, "t", ref)
    cache = Cache(tmp_path / "cache")
    resolved = pull_image(ref, cache=cache)
    port = int(registry.host.rsplit(":", 1)[1])
    registry.stop()

    marker = tmp_path / "helper-ran"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-dirgetrap"
    helper.write_text(f"#!/bin/sh\ntouch {marker}\necho '{{\"Username\": \"u\", \"Secret\": \"s\"}}'\n")
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    config = {"credHelpers": {registry.host: "dirgetrap"}, "credsStore": "dirgetrap"}
    docker_dir = tmp_path / "docker"
    docker_dir.mkdir()
    (docker_dir / "config.json").write_text(json.dumps(config))
    (tmp_path / "auth.json").write_text(json.dumps(config))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_dir))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))

    listener = Listener(port)
    try:
        yield (ref, cache, [d.digest for d in resolved.manifest.layers], resolved.manifest.config.digest,
               marker, listener)
    finally:
        listener.stop()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(DIRGE + list(args), capture_output=True, text=True)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("dirge: error: "), proc.stderr
    return lines[0]


def test_cached_image_needs_no_registry(cached, tmp_path: Path) -> None:
    ref, cache, _, _, marker, listener = cached
    with prepare(ref, cache.root, pull="never") as rootfs:
        assert (rootfs.path / "etc/base").read_bytes() == b"one\n"
        assert (rootfs.path / "app/run").stat().st_mode & 0o777 == 0o755
    proc = run("unpack", "--pull", "never", "--cache-dir", str(cache.root), ref, str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out/etc/base").read_bytes() == b"one\n" and (tmp_path / "out/app/run").exists()
    # A cached tag with the default policy needs no client either: no helper, no connection.
    with prepare(ref, cache.root) as rootfs:
        assert (rootfs.path / "etc/base").read_bytes() == b"one\n"
    assert listener.accepted == 0 and not marker.exists()


def _drop_layer_and_bases(cache: Cache, digest) -> None:
    cache.blob_path(digest).unlink()
    for base in cache.bases():  # no base: prepare must apply the layers again
        cleanup(base)
    assert not cache.bases()


def test_missing_layer_is_one_clear_error_without_network(cached, tmp_path: Path) -> None:
    ref, cache, layers, _, marker, listener = cached
    with prepare(ref, cache.root, pull="never"):  # a base exists first, as after normal use
        pass
    _drop_layer_and_bases(cache, layers[1])

    with pytest.raises(DirgeError) as caught:
        prepare(ref, cache.root, pull="never")
    message = str(caught.value)
    assert str(layers[1]) in message and ref in message and "--pull missing" in message
    assert "\n" not in message
    with pytest.raises(DirgeError, match=str(layers[1])):
        pull_image(ref, cache=cache, pull="never")
    with pytest.raises(DirgeError, match=str(layers[1])):
        unpack(ref, tmp_path / "lib-out", cache=cache, pull="never")
    assert not (tmp_path / "lib-out").exists()

    common = ["--pull", "never", "--cache-dir", str(cache.root), ref]
    for args in (["session", "create", *common], ["unpack", *common, str(tmp_path / "cli-out")]):
        line = one_error_line(run(*args))
        assert str(layers[1]) in line and "--pull missing" in line
    assert not (tmp_path / "cli-out").exists() and not cache.bases()
    assert listener.accepted == 0, "a connection was attempted with --pull never"
    assert not marker.exists(), "a credential helper ran with --pull never"

    # The trap works: the same prepare allowed to pull runs the helper and connects.
    with pytest.raises(DirgeError):
        prepare(ref, cache.root, pull="missing")
    assert marker.exists() and listener.accepted > 0


def test_missing_config_is_one_clear_error_without_network(cached) -> None:
    ref, cache, _, config, marker, listener = cached
    cache.blob_path(config).unlink()
    with pytest.raises(DirgeError) as caught:
        pull_image(ref, cache=cache, pull="never")
    assert f"config {config}" in str(caught.value) and "--pull missing" in str(caught.value)
    line = one_error_line(run("inspect", "--pull", "never", "--cache-dir", str(cache.root), ref))
    assert f"config {config}" in line
    assert listener.accepted == 0 and not marker.exists()


def test_uncached_ref_is_one_clear_error_without_network(cached) -> None:
    ref, cache, _, _, marker, listener = cached
    other = ref.replace(REPO, "off/other:2")
    line = one_error_line(run("unpack", "--pull", "never", "--cache-dir", str(cache.root), other, "/nonexistent/x"))
    assert other in line and "--pull never" in line
    assert listener.accepted == 0 and not marker.exists()


@needs_root
@needs_tool("buildah")
def test_inspect_of_an_unbuilt_variant_offline_says_to_build_it(tmp_path: Path) -> None:
    """`dirge inspect alpine --pull never` used to start a buildah build reaching for Docker Hub, failing
    with advice to fix the Dockerfile: offline it is one line naming the command that builds it."""
    cache = tmp_path / "cache"
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "DIRGE_IMAGES_PATH": ""}
    for image in ("alpine", "local://dirge-microvm:alpine"):
        proc = subprocess.run(DIRGE + ["inspect", image, "--pull", "never", "--cache-dir", str(cache)],
                              capture_output=True, text=True, env=env)
        line = one_error_line(proc)
        assert "image alpine is not built" in line and "run `dirge build alpine`" in line
        assert "Dockerfile" not in line
    storage = cache / "buildah" / "storage"
    assert not any(storage.glob("vfs-images/*/manifest*")), "nothing was pulled or built"
