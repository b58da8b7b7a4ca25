"""Prepared bases from OCI artifacts (issue 21, points 2-4) on real registries on loopback: Debian's
docker-registry (no referrers API: the tag schema runs), a loopback referrers-API server in front of it,
htpasswd + TLS, a pull-only mirror, and SIGKILL mid-download."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from artifacts import ReferrersServer, push_artifact
from conftest import REGISTRY_PASSWORD, REGISTRY_USER, erofs_mounts, require
from dirge import export
from dirge.apply.layer import Limits
from dirge.cli import main
from dirge.oci.artifact import artifact_options
from dirge.rootfs import prepare
from dirge.sources.auth import Credentials
from dirge.sources.layout import LayoutWriter
from dirge.store.cache import Cache
from images import layered

pytestmark = pytest.mark.usefixtures("registry_env")

IMAGE_REPO, BASES = "team/app", "fleet/bases"


def _setup(tmp_path: Path, registry, fmt: str, **push: object) -> tuple[str, bytes]:
    """The image pushed to ``registry`` and its ``fmt`` file converted locally (the reference bytes);
    with ``push``, also pushed as an artifact to BASES (push_artifact's keywords)."""
    layout = tmp_path / "layout"
    LayoutWriter(layout).add_image(layered(), tag="t")
    registry.push(layout, "t", f"{IMAGE_REPO}:1")
    _remember_layers(layout)
    local = export(f"oci:{layout}:t", tmp_path / f"local.{fmt}", format=fmt, cache=Cache(tmp_path / "local-cache"))
    if push.pop("push", True):
        with httpx.Client(**registry.httpx_kwargs()) as client:
            push_artifact(client, BASES, f"{IMAGE_REPO}:1", fmt, local.path, **push)  # type: ignore[arg-type]
    return f"{IMAGE_REPO}:1", local.path.read_bytes()


def _remember_layers(layout: Path) -> None:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]).read_text())
    _LAYERS.update(layer["digest"].split(":")[1] for layer in manifest["layers"])


def _layer_gets(requests: list[tuple[str, ...]]) -> list[str]:
    """Layer blobs asked for (the config is a blob too, and resolving the image needs it)."""
    layers = {f"sha256:{h}" for h in _LAYERS}
    return [r[1] for r in requests if r[0] == "GET" and r[1].rsplit("/", 1)[-1] in layers]


_LAYERS: set[str] = set()


def _fetch_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dirge.artifacts"]


def test_ext4_disk_from_the_tag_schema_is_the_local_conversion(registry, fault_proxy, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    ref, expected = _setup(tmp_path, registry, "ext4")
    proxy = fault_proxy(registry)  # counts what dirge asks for
    cache = Cache(tmp_path / "cache")
    with prepare(f"{proxy.host}/{ref}", cache.root, disk="ext4", artifacts=[f"{proxy.host}/{BASES}"]) as s:
        assert s.base_source == "artifact" and s.disk is not None
        base = cache.load_base(s.info.base)
        assert base is not None and base.image_file.read_bytes() == expected
        assert base.image_file.stat().st_blocks * 512 < len(expected) // 2  # its zeros stay holes
    assert not _layer_gets(proxy.requests), "the artifact path fetched a layer blob"
    assert any("/manifests/sha256-" in r[1] for r in proxy.requests)  # found through the referrers tag
    meta = json.loads((base.path / "image.json").read_text())
    assert meta["source"]["from"] == "artifact" and meta["source"]["repository"] == f"{proxy.host}/{BASES}"
    assert not {p.name for p in cache.blobs_dir.iterdir()} & _LAYERS  # no layer blob, no compressed artifact
    assert all(p.stat().st_size < 1 << 16 for p in cache.blobs_dir.iterdir())  # manifests and config only
    assert not _fetch_warnings(caplog)
    from dirge.lifecycle import images
    from dirge.verify import verify_cache

    report = verify_cache(cache)  # the base's record (written at publish) holds: cache verify, images work
    assert report.ok and report.bases == 1, report.problems
    [info] = [i for i in images(cache) if str(i.digest) == str(base.digest)]
    assert info.artifacts == [f"{proxy.host}/{BASES}@{meta['source']['artifact']}"]  # for verify-artifact
    # export takes the same path (from the cache now), and says where the file came from
    out = export(f"{proxy.host}/{ref}", tmp_path / "out.ext4", format="ext4", cache=cache,
                 artifacts=(f"{proxy.host}/{BASES}",))
    assert out.path.read_bytes() == expected and out.base_source == "artifact"
    # the CLI on an empty cache: export --artifacts --json reports base_source
    assert main(["export", f"{proxy.host}/{ref}", str(tmp_path / "cli.ext4"), "--format", "ext4", "--artifacts",
                 f"{proxy.host}/{BASES}", "--cache-dir", str(tmp_path / "cache2"), "--json"]) == 0
    assert (tmp_path / "cli.ext4").read_bytes() == expected


def test_erofs_base_through_the_referrers_api(registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require(erofs_mounts(), "needs root and a kernel that mounts erofs (an erofs base is mounted)")
    server = ReferrersServer(registry.host).start()
    try:
        layout = tmp_path / "layout"
        LayoutWriter(layout).add_image(layered(), tag="t")
        registry.push(layout, "t", f"{IMAGE_REPO}:1")
        _remember_layers(layout)
        local = export(f"oci:{layout}:t", tmp_path / "local.erofs", format="erofs", cache=Cache(tmp_path / "lc"))
        with httpx.Client(base_url=f"http://{server.host}", trust_env=False) as client:
            push_artifact(client, BASES, f"{IMAGE_REPO}:1", "ext4", local.path, options=artifact_options("ext4"))
            push_artifact(client, BASES, f"{IMAGE_REPO}:1", "erofs", local.path)
        assert not [r for r in server.requests if "/manifests/sha256-" in r[1]]  # OCI-Subject: no tag pushed
        server.requests.clear()
        cache = tmp_path / "cache"
        assert main(["session", "create", f"{server.host}/{IMAGE_REPO}:1", "--base-format", "erofs", "--artifacts",
                     f"{server.host}/{BASES}", "--cache-dir", str(cache), "--json"]) == 0
        made = json.loads(capsys.readouterr().out)
        assert made["base_source"] == "artifact" and made["base_format"] == "erofs"
        assert Path(made["path"], "etc/passwd").read_bytes().startswith(b"root:")
        assert (cache / "bases" / made["base"] / "rootfs.erofs").read_bytes() == local.path.read_bytes()
        referrers = [r[1] for r in server.requests if "/referrers/" in r[1]]
        assert referrers and "artifactType=application%2Fvnd.dirge.rootfs.erofs.v1" in referrers[0]
        assert not _layer_gets(server.requests)
        assert main(["session", "rm", made["id"], "--cache-dir", str(cache)]) == 0
    finally:
        server.stop()


def _damage_blob(blob: bytes) -> bytes:
    mid = len(blob) // 3
    return blob[:mid] + bytes([blob[mid] ^ 0xFF]) + blob[mid + 1:]


@pytest.mark.parametrize("case", ["damaged blob", "blob corrupted in transit", "oversized blob", "wrong annotation",
                                  "unknown writer version", "other options", "missing artifact",
                                  "file over the limits"])
def test_a_bad_or_missing_artifact_falls_back_to_the_layers(case: str, registry, fault_proxy, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    push: dict[str, object] = {
        "damaged blob": {"blob_edit": _damage_blob},
        "blob corrupted in transit": {},
        "oversized blob": {"blob_edit": lambda blob: blob + bytes(32 << 20)},  # > the 21 MiB file: never fetched
        "wrong annotation": {"sha256": "sha256:" + "ab" * 32},
        "unknown writer version": {"writer_version": "999"},
        "other options": {"options": artifact_options("ext4", journal=False)},
        "missing artifact": {"push": False},
        "file over the limits": {},  # 21 MiB: more than max_total_bytes (1 MiB, twice) lets a conversion make
    }[case]
    ref, expected = _setup(tmp_path, registry, "ext4", **push)
    proxy = fault_proxy(registry)
    if case == "blob corrupted in transit":  # every copy of the artifact's blob arrives wrong
        proxy.fail(rf"/v2/{BASES}/blobs/", "corrupt_body", times=50)
    cache = Cache(tmp_path / "cache")
    caplog.set_level(logging.WARNING, logger="dirge.artifacts")
    limits = Limits(max_total_bytes=1 << 20) if case == "file over the limits" else Limits()
    with prepare(f"{proxy.host}/{ref}", cache.root, disk="ext4", artifacts=(f"{proxy.host}/{BASES}",),
                 limits=limits) as s:
        assert s.base_source == "layers"
        base = cache.load_base(s.info.base)
        assert base is not None and base.image_file.read_bytes() == expected  # converted as today
    warnings = _fetch_warnings(caplog)
    assert len(warnings) == 1 and "converting from the layers" in warnings[0], warnings
    assert _layer_gets(proxy.requests)
    if case in ("oversized blob", "file over the limits"):
        assert not [r for r in proxy.requests if f"/v2/{BASES}/blobs/" in r[1]], warnings
    assert not [p for p in (tmp_path / "cache" / "staging").iterdir()]
    assert not [p for p in cache.blobs_dir.iterdir() if p.name.startswith(".tmp-")]


def test_tls_htpasswd_registry(tls_registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    certs = tmp_path / "certs.d" / tls_registry.host
    certs.mkdir(parents=True)
    (certs / "ca.crt").write_bytes(tls_registry.ca_cert.read_bytes())
    monkeypatch.setenv("DIRGE_CERTS_DIRS", str(tmp_path / "certs.d"))
    ref, expected = _setup(tmp_path, tls_registry, "ext4")
    cache = Cache(tmp_path / "cache")
    with prepare(f"{tls_registry.host}/{ref}", cache.root, disk="ext4", artifacts=(f"{tls_registry.host}/{BASES}",),
                 creds=Credentials(REGISTRY_USER, REGISTRY_PASSWORD)) as s:
        assert s.base_source == "artifact"
        base = cache.load_base(s.info.base)
        assert base is not None and base.image_file.read_bytes() == expected


def test_pull_only_mirror(registry, mirror_registry, fault_proxy, tmp_path: Path) -> None:
    ref, expected = _setup(tmp_path, registry, "ext4")
    mirror = mirror_registry(registry)
    origin = fault_proxy(registry)  # the origin refuses the artifact repository: only the mirror serves it
    origin.fail(rf"/v2/{BASES}/(manifests|blobs)/", "status", times=1000, status=503)
    Path(os.environ["DIRGE_REGISTRIES_CONFIG"]).write_text(
        f'[registries."{origin.host}"]\nmirrors = ["{mirror.url}"]\n')
    cache = Cache(tmp_path / "cache")
    with prepare(f"{origin.host}/{ref}", cache.root, disk="ext4", artifacts=(f"{origin.host}/{BASES}",)) as s:
        assert s.base_source == "artifact"
        base = cache.load_base(s.info.base)
        assert base is not None and base.image_file.read_bytes() == expected


def test_fleet_artifacts_from_the_config(registry, tmp_path: Path) -> None:
    ref, expected = _setup(tmp_path, registry, "ext4")
    Path(os.environ["DIRGE_CONFIG"]).write_text(f'[fleet]\nartifacts = ["{registry.host}/{BASES}"]\n')
    cache = Cache(tmp_path / "cache")
    with prepare(f"{registry.host}/{ref}", cache.root, disk="ext4") as s:
        assert s.base_source == "artifact"
    with prepare(f"{registry.host}/{ref}", Cache(tmp_path / "c2").root, disk="ext4", artifacts=()) as s:
        assert s.base_source == "layers"  # an explicit empty list reads no repository


def test_sigkill_mid_download_publishes_nothing(registry, fault_proxy, tmp_path: Path) -> None:
    import threading

    # big enough that the blob arrives in several reads: the stall is mid-body
    ref, expected = _setup(tmp_path, registry, "ext4")
    proxy = fault_proxy(registry)
    release = threading.Event()
    proxy.fail(rf"/v2/{BASES}/blobs/sha256:", "stall_mid_body", release=release, method="GET")
    cache = tmp_path / "cache"
    code = ("import sys; from dirge.rootfs import prepare; "
            "prepare(sys.argv[1], sys.argv[2], disk='ext4', artifacts=(sys.argv[3],)).detach()")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    child = subprocess.Popen([sys.executable, "-c", code, f"{proxy.host}/{ref}", str(cache), f"{proxy.host}/{BASES}"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not proxy.faults_fired and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # polling for the stall to begin, not timing
        assert proxy.faults_fired, child.stderr.read() if child.stderr else b""
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        release.set()
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not [p for p in (cache / "bases").iterdir()], "a base was published by a killed fetch"
    # the next prepare succeeds at once from the artifact (the killed one's staging and temp blob swept)
    with prepare(f"{proxy.host}/{ref}", cache, disk="ext4", artifacts=(f"{proxy.host}/{BASES}",)) as s:
        assert s.base_source == "artifact"
        base = Cache(cache).load_base(s.info.base)
        assert base is not None and base.image_file.read_bytes() == expected
    assert not [p for p in (cache / "staging").iterdir()]


def test_verify_artifact(registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref, expected = _setup(tmp_path, registry, "ext4")
    with httpx.Client(**registry.httpx_kwargs()) as client:
        good = push_artifact(client, BASES, ref, "ext4", tmp_path / "local.ext4")
        forged_file = tmp_path / "forged.ext4"
        forged_file.write_bytes(expected[:-1] + b"X")  # a writer of the repository swapped the content
        forged = push_artifact(client, BASES, ref, "ext4", forged_file)
        other = push_artifact(client, BASES, ref, "ext4", tmp_path / "local.ext4", writer_version="999")
    args = ["verify-artifact", f"{registry.host}/{ref}", "--cache-dir", str(tmp_path / "cache"), "--json"]
    assert main([*args[:2], f"{registry.host}/{BASES}@{good}", *args[2:]]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main([*args[:2], f"{registry.host}/{BASES}@{forged}", *args[2:]]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and "not this image" in out["problems"][0]
    assert main([*args[:2], f"{registry.host}/{BASES}@{other}", *args[2:]]) == 1
    assert "cannot reproduce" in json.loads(capsys.readouterr().out)["problems"][0]


def test_boot_takes_artifacts() -> None:
    """``dirge boot --artifacts`` reaches ``vm.boot`` (booting itself is test_boot.py's)."""
    import inspect

    from dirge.cli import CONTEXT, boot_cmd
    from dirge.vm import boot

    # with the group's context settings: click caches a command's help option from the first context it
    # sees, and one without them would take ``-h`` away from later tests' ``dirge boot -h``
    ctx = boot_cmd.make_context("boot", ["IMAGE", "--artifacts", "r.example/a", "--artifacts", "r.example/b"],
                                **CONTEXT)
    assert ctx.params["artifacts"] == ("r.example/a", "r.example/b")
    assert "artifacts" in inspect.signature(boot).parameters


def test_an_api_that_lists_none_falls_through_to_the_tag(registry, tmp_path: Path) -> None:
    """The artifact was pushed before the registry had the referrers API (only the tag names it): the API
    answers an empty index, and the tag finds it."""
    ref, expected = _setup(tmp_path, registry, "ext4")  # pushed to docker-registry itself: the tag schema
    server = ReferrersServer(registry.host).start()
    try:
        with prepare(f"{server.host}/{ref}", tmp_path / "cache", disk="ext4",
                     artifacts=(f"{server.host}/{BASES}",)) as s:
            assert s.base_source == "artifact"
            base = Cache(tmp_path / "cache").load_base(s.info.base)
            assert base is not None and base.image_file.read_bytes() == expected
        paths = [r[1] for r in server.requests]
        assert any("/referrers/" in p for p in paths) and any("/manifests/sha256-" in p for p in paths)
    finally:
        server.stop()


def test_the_cli_says_it_converts_in_one_line(registry, tmp_path: Path) -> None:
    ref, _ = _setup(tmp_path, registry, "ext4", push=False)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    proc = subprocess.run([sys.executable, "-m", "dirge.cli", "-q", "session", "create", f"{registry.host}/{ref}",
                           "--disk", "ext4", "--artifacts", f"{registry.host}/{BASES}", "--cache-dir",
                           str(tmp_path / "cache"), "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["base_source"] == "layers"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dirge: no usable ext4 artifact"), proc.stderr
    session = json.loads(proc.stdout)["id"]
    assert main(["session", "rm", session, "--cache-dir", str(tmp_path / "cache")]) == 0
