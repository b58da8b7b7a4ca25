"""``dirge inspect``: digests, platforms, layers and config of registry images and layouts, without
unpacking anything; ``--raw``/``--config`` print the bytes as fetched (they hash to their digests)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dirge.store.cache import Cache
from dirge.oci.image import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, Platform, host_platform
from dirge.inspect import inspect_image
from dirge.layerbuild import LayerBuilder
from dirge.oci.reference import parse_digest
from dirge.sources.layout import LayoutWriter
from registry import push_layout

DIRGE = [str(Path(sys.executable).parent / "dirge")]
HOST = host_platform()
OTHER = Platform("linux", "arm64") if HOST.architecture != "arm64" else Platform("linux", "amd64")
RUNTIME = {"Env": ["PATH=/usr/bin:/bin", "MODE=test"], "Cmd": ["--serve"], "Entrypoint": ["/app/run"],
           "WorkingDir": "/app", "User": "1000:1000", "Labels": {"org.example.team": "sandbox"},
           "ExposedPorts": {"8080/tcp": {}, "53/udp": {}}}
HISTORY = [{"created": "2024-05-01T10:00:00Z", "created_by": "ADD base /"},
           {"created": "2024-05-01T10:00:01Z", "created_by": "ENV MODE=test", "empty_layer": True},
           {"created": "2024-05-01T10:00:02Z", "created_by": "COPY run /app/run"}]


pytestmark = pytest.mark.usefixtures("registry_env")  # conftest: no user config, fast retries


def add_image(w: LayoutWriter, layers: list[bytes], platform: Platform) -> dict[str, Any]:
    """A manifest whose config has a runtime part, ``created`` and ``history`` (LayoutWriter writes none)."""
    descs = [w.add_blob(layer, "application/vnd.oci.image.layer.v1.tar") for layer in layers]
    config = {"created": "2024-05-01T10:00:02Z", "architecture": platform.architecture, "os": platform.os,
              "config": RUNTIME, "history": HISTORY,
              "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers]}}
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": w.add_json(config, OCI_CONFIG),
                "layers": descs}
    desc = w.add_json(manifest, OCI_MANIFEST)
    desc["platform"] = {"os": platform.os, "architecture": platform.architecture}
    return desc


def layers_for(name: str) -> list[bytes]:
    return [LayerBuilder().dir("etc").file("etc/arch", name.encode()).build(),
            LayerBuilder().dir("app").file("app/run", b"#!/bin/sh\n", mode=0o755).build()]


@pytest.fixture
def layouts(tmp_path: Path) -> tuple[Path, Path]:
    """(a layout tagged ``t`` holding one manifest, one tagged ``t`` holding an index of HOST and OTHER)."""
    single = tmp_path / "single"
    w = LayoutWriter(single)
    w.tag(add_image(w, layers_for("single"), HOST), "t")
    multi = tmp_path / "multi"
    w = LayoutWriter(multi)
    manifests = [add_image(w, layers_for(str(p)), p) for p in (HOST, OTHER)]
    w.tag(w.add_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}, OCI_INDEX), "t")
    return single, multi


def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(DIRGE + list(args), capture_output=True)


def inspect_json(*args: str) -> dict[str, Any]:
    proc = run("inspect", "--json", *args)
    assert proc.returncode == 0, proc.stderr.decode()
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def assert_config_fields(info: dict[str, Any]) -> None:
    assert info["env"] == RUNTIME["Env"] and info["cmd"] == ["--serve"] and info["entrypoint"] == ["/app/run"]
    assert info["working_dir"] == "/app" and info["user"] == "1000:1000"
    assert info["labels"] == {"org.example.team": "sandbox"} and info["exposed_ports"] == ["53/udp", "8080/tcp"]
    assert info["created"] == "2024-05-01T10:00:02Z" and info["history"] == HISTORY


def test_multi_platform_index_on_registry(registry, layouts, tmp_path: Path) -> None:
    _, multi = layouts
    ref = f"{registry.host}/i/multi:1"
    index_digest = push_layout(multi, "t", ref, all_platforms=True)
    cache = str(tmp_path / "cache")
    info = inspect_json("--cache-dir", cache, ref)
    assert info["digest"] == index_digest and info["media_type"] == OCI_INDEX
    assert info["platforms"] == [str(HOST), str(OTHER)] and info["platform"] == str(HOST)
    index = json.loads(run("inspect", "--raw", "--cache-dir", cache, ref).stdout)
    assert info["manifest_digest"] == index["manifests"][0]["digest"] != index_digest
    assert [layer["size"] for layer in info["layers"]] == [len(x) for x in layers_for(str(HOST))]
    assert_config_fields(info)

    raw = run("inspect", "--raw", "--cache-dir", cache, ref)
    assert raw.returncode == 0 and sha256(raw.stdout) == index_digest
    config = run("inspect", "--config", "--platform", str(OTHER), "--cache-dir", cache, ref)
    other = inspect_json("--platform", str(OTHER), "--cache-dir", cache, ref)
    assert other["manifest_digest"] == index["manifests"][1]["digest"] and other["platform"] == str(OTHER)
    assert config.returncode == 0 and sha256(config.stdout) == other["config_digest"] != info["config_digest"]
    assert json.loads(config.stdout)["architecture"] == OTHER.architecture

    text = run("inspect", "--cache-dir", cache, ref)
    assert text.returncode == 0
    out = text.stdout.decode()
    assert index_digest in out and f"{HOST}, {OTHER}" in out and info["layers"][1]["digest"] in out
    assert "MODE=test" in out and "org.example.team=sandbox" in out and "COPY run /app/run" in out
    # Nothing was unpacked or downloaded beyond manifests and configs.
    c = Cache(cache)
    assert not c.bases() and not any(c.blob_path(parse_digest(layer["digest"])).exists()
                                     for layer in info["layers"] + other["layers"])


def test_single_manifest_on_registry_and_offline(registry, layouts, tmp_path: Path) -> None:
    single, _ = layouts
    ref = f"{registry.host}/i/single:1"
    digest = push_layout(single, "t", ref)
    cache = tmp_path / "cache"
    result = inspect_image(ref, cache=Cache(cache), pull="always")
    assert result.digest == result.manifest_digest == digest and result.media_type == OCI_MANIFEST
    assert result.platforms == [] and sha256(result.raw) == digest and sha256(result.config_raw) == result.config_digest
    assert [layer.media_type for layer in result.layers] == ["application/vnd.oci.image.layer.v1.tar"] * 2
    raw = run("inspect", "--raw", "--cache-dir", str(cache), ref)
    assert raw.stdout == result.raw and sha256(raw.stdout) == digest

    registry.stop()  # from the cache only
    offline = inspect_json("--pull", "never", "--cache-dir", str(cache), ref)
    assert offline["digest"] == digest and offline["config_digest"] == result.config_digest
    assert_config_fields(offline)
    again = run("inspect", "--config", "--pull", "never", "--cache-dir", str(cache), ref)
    assert again.returncode == 0 and again.stdout == result.config_raw
    failed = run("inspect", "--cache-dir", str(cache), ref)  # the default asks the (stopped) registry
    assert failed.returncode == 1 and failed.stderr.decode().startswith("dirge: error: ")


def test_oci_layout(layouts) -> None:
    single, multi = layouts
    info = inspect_json(f"oci:{single}:t")
    index = json.loads((single / "index.json").read_text())
    assert info["digest"] == index["manifests"][0]["digest"] and info["media_type"] == OCI_MANIFEST
    assert_config_fields(info)
    raw = run("inspect", "--raw", f"oci:{multi}:t")
    assert sha256(raw.stdout) == json.loads((multi / "index.json").read_text())["manifests"][0]["digest"]
    other = inspect_image(f"oci:{multi}:t", platform=OTHER)
    assert other.platforms == [str(HOST), str(OTHER)] and other.platform == str(OTHER)


def test_usage_and_errors(layouts, tmp_path: Path) -> None:
    single, _ = layouts
    assert run("inspect", "--raw", "--json", f"oci:{single}:t").returncode == 2
    proc = run("inspect", f"oci:{tmp_path}/nowhere")
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "not an OCI image layout" in lines[0]


def test_local_image_in_buildah_storage(layouts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local:// ref goes through the same source as prepare (buildah's export of the image)."""
    import os
    import shutil

    from dirge.sources.buildah import Buildah

    if shutil.which("buildah") is None or os.geteuid() != 0:
        pytest.skip("needs root and buildah (installed by scripts/setup.sh --test)")
    single, _ = layouts
    monkeypatch.delenv("DOCKER_CONFIG")  # buildah refuses a $DOCKER_CONFIG without a config.json
    cache = Cache(tmp_path / "cache")
    buildah = Buildah(cache.root)
    pulled = subprocess.run(buildah.command("pull", "--quiet", f"oci:{single}:t"), capture_output=True, text=True)
    assert pulled.returncode == 0, pulled.stderr
    image_id = pulled.stdout.strip().splitlines()[-1]
    subprocess.run(buildah.command("tag", image_id, "inspected:1"), check=True, capture_output=True)
    info = inspect_json("--cache-dir", str(cache.root), "local://inspected:1")
    assert info["image"] == "local://inspected:1" and len(info["layers"]) == 2
    assert info["env"] == RUNTIME["Env"] and info["entrypoint"] == ["/app/run"] and info["user"] == "1000:1000"
    assert info["labels"] == {"org.example.team": "sandbox"}
    raw = run("inspect", "--raw", "--cache-dir", str(cache.root), "local://inspected:1")
    assert raw.returncode == 0 and sha256(raw.stdout) == info["digest"]
