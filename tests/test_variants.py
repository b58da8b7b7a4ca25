"""Local variants (images/NAME/Dockerfile) built with a real buildah (vfs, chroot isolation), FROM images
in a loopback docker-registry; exported as OCI layouts and applied like every other source."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from treecmp import diff, ext4_disk_differences, snapshot

from dirge.store.cache import Cache
from dirge.cli import main
from dirge.errors import BuildError, DirgeError, LockTimeout
from dirge.layerbuild import LayerBuilder
from dirge.oci.reference import LocalReference, RegistryReference, parse_reference
from dirge.rootfs import prepare
from dirge.sources.buildah import Buildah, LocalImage, export_image, open_local, retire_image
from dirge.sources.layout import LayoutWriter
from dirge.flatten import unpack
from dirge.variants import build_guest_image, dockerfile_bases, find_variant, list_variants
from registry import push_layout

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "rm", "mkdir", "echo", "chown", "cat", "ls", "touch", "chmod")

TEST_DOCKERFILE = """\
# a busybox guest: add a user, delete a file of the base, replace a directory of the base
FROM {base}
RUN echo "tester:x:1234:1234::/home/tester:/bin/sh" >> /etc/passwd && mkdir -p /home/tester && chown 1234:1234 /home/tester
RUN rm /etc/motd
RUN rm -rf /opt/data && mkdir -p /opt/data && echo new > /opt/data/new.txt && chown 1234:1234 /opt/data/new.txt
COPY hello.txt /etc/hello.txt
"""


@pytest.fixture(scope="module")
def busybox_base(module_registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A busybox image with files the variant deletes and replaces, in the module's loopback registry."""
    if not BUSYBOX.exists():
        pytest.skip("needs /bin/busybox (apt-get install busybox-static)")
    base = LayerBuilder()
    for d in ("bin", "etc", "home", "opt", "opt/data", "tmp"):
        base.dir(d)
    base.file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
    for applet in APPLETS:
        base.symlink(f"bin/{applet}", "busybox")
    base.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    base.file("etc/group", b"root:x:0:\n")
    base.file("etc/motd", b"from the base\n")
    base.file("opt/data/old.txt", b"old\n", uid=7, gid=7)
    layout = tmp_path_factory.mktemp("busybox") / "layout"
    LayoutWriter(layout).add_image([base.build()], tag="1")
    ref = f"{module_registry.host}/base/busybox:1"
    push_layout(layout, "1", ref)
    return ref


@pytest.fixture
def buildah_env(module_registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Variants under tmp/images, buildah's calls logged (a wrapper in front of the real one), the loopback
    registry marked insecure for buildah, and docker.io mapped to it. Returns the log path."""
    images = tmp_path / "images"
    images.mkdir()
    monkeypatch.setenv("DIRGE_IMAGES_PATH", str(images))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # the user's own variants stay out
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{module_registry.host}"\ninsecure = true\n\n'
                    f'[[registry]]\nprefix = "docker.io"\nlocation = "{module_registry.host}"\ninsecure = true\n')
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(conf))
    log = tmp_path / "buildah.log"
    real = shutil.which("buildah")
    if real is None or os.geteuid() != 0:
        pytest.skip("needs root and buildah (installed by scripts/setup.sh --test)")
    wrapper = tmp_path / "bin" / "buildah"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    return log


def builds(log: Path) -> int:
    return sum(" bud " in f" {line} " for line in log.read_text().splitlines()) if log.exists() else 0


def write_variant(tmp_path: Path, name: str, base: str, extra: str = "") -> Path:
    d = tmp_path / "images" / name
    d.mkdir(parents=True)
    (d / "Dockerfile").write_text(TEST_DOCKERFILE.format(base=base) + extra)
    (d / "hello.txt").write_text("hello\n")
    return d


def test_variant_prepared_with_deletions_replacements_and_owners(busybox_base, buildah_env, tmp_path) -> None:
    write_variant(tmp_path, "testvm", busybox_base)
    cache_dir = tmp_path / "cache"
    with prepare("testvm", cache_dir, strategy="copy") as prepared:
        root = prepared.path
        assert not (root / "etc/motd").exists() and not (root / "etc/motd").is_symlink()
        assert sorted(os.listdir(root / "opt/data")) == ["new.txt"]
        assert (root / "opt/data/new.txt").read_text() == "new\n"
        assert (root / "opt/data/new.txt").stat().st_uid == 1234
        assert "tester:x:1234:1234:" in (root / "etc/passwd").read_text()
        home = (root / "home/tester").stat()
        assert (home.st_uid, home.st_gid) == (1234, 1234)
        assert (root / "etc/hello.txt").read_text() == "hello\n"
        assert os.readlink(root / "bin/sh") == "busybox"
    assert builds(buildah_env) == 1
    # The same image by its local:// name (already in dirge's buildah storage): no build, same tree.
    unpack("local://dirge-microvm:testvm", tmp_path / "again", cache=Cache(cache_dir))
    assert sorted(os.listdir(tmp_path / "again/opt/data")) == ["new.txt"]
    assert builds(buildah_env) == 1


def test_edit_rebuilds_exactly_once(busybox_base, buildah_env, tmp_path: Path) -> None:
    d = write_variant(tmp_path, "editvm", busybox_base)
    cache_dir = tmp_path / "cache"
    first = build_guest_image("editvm", cache_root=cache_dir)
    assert first.built and builds(buildah_env) == 1
    assert not build_guest_image("editvm", cache_root=cache_dir).built  # unchanged: not rebuilt
    with prepare("editvm", cache_dir, strategy="copy") as p:
        assert not (p.path / "etc/edited").exists()
    assert builds(buildah_env) == 1

    (d / "Dockerfile").write_text((d / "Dockerfile").read_text() + "RUN echo edited > /etc/edited\n")
    with prepare("editvm", cache_dir, strategy="copy") as p:
        assert (p.path / "etc/edited").read_text() == "edited\n"
    assert builds(buildah_env) == 2
    with prepare("editvm", cache_dir, strategy="copy") as p:
        assert (p.path / "etc/edited").exists()
    assert builds(buildah_env) == 2

    (d / "hello.txt").write_text("changed context\n")  # a context file counts too
    with prepare("editvm", cache_dir, strategy="copy") as p:
        assert (p.path / "etc/hello.txt").read_text() == "changed context\n"
    assert builds(buildah_env) == 3
    exports = [e.name for e in (cache_dir / "exports").iterdir()]
    assert len(exports) == 1, f"stale exports of replaced images are removed, temp dirs too: {exports}"

    # Rebuilt while the current export is being read: the build succeeds and the old image stays
    # while it is read; the next build frees it.
    buildah = Buildah(cache_dir)
    held = buildah.inspect("dirge-microvm:editvm")
    assert held is not None
    reader, _ = open_local(LocalReference("dirge-microvm:editvm"), cache_dir)
    try:
        (d / "hello.txt").write_text("again\n")
        assert build_guest_image("editvm", cache_root=cache_dir).built
        assert buildah.inspect(held.id) is not None and (cache_dir / "exports" / held.id / "index.json").is_file()
    finally:
        reader.close()
    (d / "hello.txt").write_text("once more\n")
    newest = build_guest_image("editvm", cache_root=cache_dir)
    assert builds(buildah_env) == 5
    assert buildah.inspect(held.id) is None and not (cache_dir / "exports" / held.id).exists()
    assert buildah.labelled("dev.dirge.variant", "editvm") == [newest.image.id]


def test_concurrent_prepares_build_once(busybox_base, buildah_env, tmp_path: Path) -> None:
    write_variant(tmp_path, "concvm", busybox_base)
    cache_dir = tmp_path / "cache"
    script = ("import sys; from dirge.rootfs import prepare; p = prepare('concvm', sys.argv[1], strategy='copy');"
              "p.detach(); print(p.path)")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(cache_dir)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = [Path(out.strip()) for out, _ in outs]
    assert paths[0] != paths[1]
    for path in paths:
        assert (path / "opt/data/new.txt").read_text() == "new\n"
    assert builds(buildah_env) == 1


def test_build_args_pass_through_and_cli(busybox_base, buildah_env, tmp_path: Path, capsys) -> None:
    write_variant(tmp_path, "argvm", busybox_base, 'ARG GREETING=hi\nRUN echo "$GREETING" > /etc/greeting\n')
    cache_dir = tmp_path / "cache"
    assert main(["-q", "build", "argvm", "--build-arg", "GREETING=bonjour", "--cache-dir", str(cache_dir)]) == 0
    assert "(built)" in capsys.readouterr().out
    assert main(["-q", "build", "argvm", "--build-arg", "GREETING=bonjour", "--cache-dir", str(cache_dir)]) == 0
    assert "(current, not rebuilt)" in capsys.readouterr().out
    with prepare("argvm", cache_dir, strategy="copy") as p:  # any args accepted: the built image is used
        assert (p.path / "etc/greeting").read_text() == "bonjour\n"
    assert builds(buildah_env) == 1
    assert main(["-q", "build", "argvm", "--no-cache", "--cache-dir", str(cache_dir)]) == 0  # forced
    assert "(built)" in capsys.readouterr().out and builds(buildah_env) == 2
    with prepare("argvm", cache_dir, strategy="copy") as p:
        assert (p.path / "etc/greeting").read_text() == "hi\n"  # no --build-arg this time: the default
    assert main(["variants", "--json", "--cache-dir", str(cache_dir)]) == 0
    listed = {v["name"]: v for v in json.loads(capsys.readouterr().out)}
    assert listed["argvm"]["status"] == "current" and listed["argvm"]["origin"] == str(tmp_path / "images")
    assert listed["debian"]["origin"] == "built-in" and listed["debian"]["status"] == "not built"
    assert listed["debian"]["from"] == ["docker.io/library/debian:bookworm-slim"]
    assert listed["argvm"]["from"] == [busybox_base]


def build_mine(cache: Cache, base: str, ctx: Path) -> None:
    """``mine:1`` in dirge's buildah storage, built straight with buildah (not a variant): ``base`` minus
    /opt/data."""
    ctx.mkdir()
    (ctx / "Containerfile").write_text(f"FROM {base}\nRUN rm -rf /opt/data\n")
    subprocess.run(Buildah(cache.root).command("bud", "--quiet", "--isolation", "chroot", "-t", "mine:1",
                                               "-f", str(ctx / "Containerfile"), str(ctx)), check=True,
                   capture_output=True)


def test_local_ref_to_an_image_in_buildah_storage(busybox_base, buildah_env, tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    build_mine(cache, busybox_base, tmp_path / "ctx")
    unpack("local://mine:1", tmp_path / "out", cache=cache)
    assert not (tmp_path / "out/opt/data").exists() and (tmp_path / "out/bin/busybox").is_file()

    # A rebuild cannot pull an export from under a reader: readers share its lock, retiring waits.
    buildah = Buildah(cache.root)
    image = buildah.inspect("mine:1")
    assert image is not None
    export = cache.root / "exports" / image.id
    reader, _ = open_local(LocalReference("mine:1"), cache.root)
    try:
        second, _ = open_local(LocalReference("mine:1"), cache.root)  # readers do not block each other
        second.close()
        with pytest.raises(LockTimeout, match="held by another process"):
            retire_image(buildah, cache.root, image.id, timeout=0.2)
        assert (export / "index.json").is_file() and buildah.inspect(image.id) is not None
    finally:
        reader.close()
    retire_image(buildah, cache.root, image.id, timeout=0.2)  # the last reader is gone
    assert not export.exists() and buildah.inspect(image.id) is None
    with pytest.raises(BuildError, match=r"no image .nothere:1. in buildah storage .* \$DIRGE_BUILDAH_ROOT"):
        unpack("local://nothere:1", tmp_path / "none", cache=cache)


def test_exports_are_counted_evicted_and_removed_with_their_image(busybox_base, buildah_env, tmp_path: Path) -> None:
    """A local image's OCI export under CACHE/exports counts toward the budget, is evicted least recently
    used like a base (never while a prepare reads it), comes back when needed, and goes with rmi."""
    from dirge.lifecycle import collect, images, rmi, usage
    from dirge.store.records import disk_usage

    cache = Cache(tmp_path / "cache")
    build_mine(cache, busybox_base, tmp_path / "ctx")
    prepare("local://mine:1", cache.root, base_format="tree").close()
    (export,) = [p for p in (cache.root / "exports").iterdir()]
    (info,) = images(cache)
    assert info.exports == [export.name] and "local://mine:1" in info.refs
    assert usage(cache) >= disk_usage(export) + sum(disk_usage(cache.base_dir(k)) for k in cache.base_keys())

    reader, _ = open_local(LocalReference("mine:1"), cache.root)  # what a prepare reading it holds
    try:
        report = collect(cache, max_size=0, grace=0)
        assert export.is_dir() and any(s.startswith("export ") for s in report.skipped), report.skipped
        assert cache.base_keys() == []  # the base was idle: evicted
        with pytest.raises(DirgeError, match="nothing was removed"):
            rmi(cache, ["local://mine:1"])
        assert export.is_dir() and images(cache)[0].refs
    finally:
        reader.close()
    dry = collect(cache, max_size=0, grace=0, dry_run=True)
    assert ("export", export.name) in {(r.kind, r.name) for r in dry.removed} and export.is_dir()
    report = collect(cache, max_size=0, grace=0)
    assert [r.name for r in report.removed if r.kind == "export"] == [export.name] and not export.exists()

    with prepare("local://mine:1", cache.root, base_format="tree") as again:  # exported again from storage
        assert not (again.path / "opt/data").exists() and (again.path / "bin/busybox").is_file()
    assert export.is_dir()
    removed = rmi(cache, ["local://mine:1"])
    assert removed.exports == [export.name] and not export.exists() and images(cache) == []


def test_export_of_an_image_removed_meanwhile_says_so(buildah_env, tmp_path: Path) -> None:
    # What a prepare sees when a concurrent rebuild removed the image it had just looked up.
    root = tmp_path / "cache"
    with pytest.raises(BuildError, match="replaced by a rebuild meanwhile; run the command again"):
        export_image(Buildah(root), LocalImage("ab" * 32, {}, []), root, "local://gone")
    assert [p.name for p in (root / "exports").iterdir()] == []


def test_unknown_variant_error_lists_known_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("DIRGE_IMAGES_PATH", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("DIRGE_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["session", "create", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "no Dockerfile found for variant 'nope'" in err
    assert "known variants: alpine, debian, dev" in err and "full reference such as docker.io/" in err


def test_missing_buildah_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no buildah here
    with pytest.raises(BuildError, match="buildah is not installed; install buildah .*apt-get install buildah"):
        build_guest_image("debian", cache_root=tmp_path / "cache")
    # Listing still works: the variants are known, their build state is not.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("DIRGE_IMAGES_PATH", raising=False)
    assert main(["variants", "--json", "--cache-dir", str(tmp_path / "cache")]) == 0
    listed = {v["name"]: v["status"] for v in json.loads(capsys.readouterr().out)}
    assert listed == {"alpine": "unknown", "debian": "unknown", "dev": "unknown"}


def test_user_variants_win_over_built_ins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for d in (first / "debian", second / "debian", second / "extra"):
        d.mkdir(parents=True)
        (d / "Dockerfile").write_text("FROM scratch\n")
    monkeypatch.setenv("DIRGE_IMAGES_PATH", f"{first}:{second}")
    assert find_variant("debian").path == first / "debian"
    assert find_variant("extra").origin == str(second)
    assert find_variant("alpine").origin == "built-in"
    names = [v.name for v in list_variants()]
    assert names == sorted(set(names)) and {"alpine", "debian", "dev", "extra"} <= set(names)
    monkeypatch.setenv("DIRGE_IMAGES_PATH", "")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    (tmp_path / "cfg/dirge/images/alpine").mkdir(parents=True)
    (tmp_path / "cfg/dirge/images/alpine/Dockerfile").write_text("FROM scratch\n")
    assert find_variant("alpine").path == tmp_path / "cfg/dirge/images/alpine"


@pytest.mark.parametrize("name, expected", [
    ("debian", [RegistryReference("docker.io", "library/debian", "bookworm-slim")]),
    ("alpine", [RegistryReference("docker.io", "library/alpine", "3.21")]),
    ("dev", [RegistryReference("docker.io", "library/debian", "bookworm-slim")]),
])
def test_shipped_variants_parse_and_resolve_their_from(name: str, expected, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    monkeypatch.setenv("DIRGE_IMAGES_PATH", "")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    variant = find_variant(name)
    assert variant.origin == "built-in"
    text = variant.dockerfile.read_text()
    for need in ("openssh-server", "sandbox", "/var/empty"):
        assert need in text, f"{name}: the guest needs {need}"
    assert dockerfile_bases(variant.dockerfile) == expected


def test_dockerfile_from_parsing(tmp_path: Path) -> None:
    df = tmp_path / "Dockerfile"
    df.write_text("# syntax=docker/dockerfile:1\nARG REG=127.0.0.1:5000\nARG TAG\n"
                  "FROM --platform=linux/amd64 ${REG}/tools/build:${TAG:-9} AS build\n"
                  "RUN make \\\n  # a comment inside\n  all\n"
                  "FROM build AS again\nFROM scratch\nFROM busybox\n")
    assert dockerfile_bases(df) == [RegistryReference("127.0.0.1:5000", "tools/build", "9"),
                                    RegistryReference("docker.io", "library/busybox", "latest")]
    assert dockerfile_bases(df, {"TAG": "2"})[0].tag == "2"
    df.write_text('ARG A=one B="two"\nFROM reg.example:5000/x/${A}:${B} \\\n\n  AS s\nFROM s\n')
    assert dockerfile_bases(df) == [RegistryReference("reg.example:5000", "x/one", "two")]
    df.write_text("ARG MSG=it's\nFROM busybox\n")
    with pytest.raises(BuildError, match=f"parse {df}: ARG .*fix the quoting"):
        dockerfile_bases(df)
    df.write_text("ARG REG\nFROM ${REG}/x:1\n")
    with pytest.raises(BuildError, match=rf"parse {df}: FROM \$\{{REG\}}/x:1: .*set the ARG"):
        dockerfile_bases(df)


def test_cache_path_with_a_colon_is_refused_before_buildah_runs(tmp_path: Path) -> None:
    root = tmp_path / "a:b"
    with pytest.raises(BuildError, match="contains ':'.*use a cache directory without ':'"):
        export_image(Buildah(root), LocalImage("0" * 64, {}, []), root, "local://x")
    # A variant is refused before its build, not after minutes of it: buildah never ran.
    ref = parse_reference("debian")
    assert isinstance(ref, LocalReference)
    with pytest.raises(BuildError, match="contains ':'"):
        open_local(ref, root)
    assert not (root / "buildah").exists() and not (root / "locks").exists()


@pytest.fixture(scope="module")
def bookworm_base(module_registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Debian bookworm minbase made offline-from-registries with mmdebstrap (Debian's apt mirror is
    reachable), pushed to the loopback registry as library/debian:bookworm-slim."""
    if shutil.which("mmdebstrap") is None or os.geteuid() != 0:
        pytest.skip("needs root and mmdebstrap (installed by scripts/setup.sh --test)")
    work = tmp_path_factory.mktemp("bookworm")
    tar = work / "bookworm.tar"
    proc = subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", "--format=tar", "bookworm", str(tar)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"mmdebstrap failed: {proc.stderr[-2000:]}"
    LayoutWriter(work / "layout").add_image([tar.read_bytes()], tag="bookworm-slim")
    tar.unlink()
    ref = f"{module_registry.host}/library/debian:bookworm-slim"
    push_layout(work / "layout", "bookworm-slim", ref)
    return ref


def test_shipped_debian_variant_builds_for_real(bookworm_base, buildah_env, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The shipped Dockerfile, unchanged: FROM docker.io/library/debian:bookworm-slim reaches the loopback
    # registry through registries.conf (as a site mirror would), and its RUN apt-get steps really run.
    monkeypatch.setenv("DIRGE_IMAGES_PATH", "")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))
    cache_dir = tmp_path / "cache"
    with prepare("debian", cache_dir, strategy="copy", base_format="tree") as prepared:
        root = prepared.path
        sshd = (root / "usr/sbin/sshd").stat()
        assert sshd.st_mode & 0o111 and sshd.st_uid == 0
        assert (root / "var/empty").is_dir() and (root / "bin/mount").exists() and (root / "bin/sh").exists()
        assert "sandbox:x:1000:1000:" in (root / "etc/passwd").read_text()
        assert not list((root / "etc/ssh").glob("ssh_host_*_key")), "host keys are per session, not per image"
        ident = subprocess.run(["chroot", str(root), "id", "sandbox"], capture_output=True, text=True)
        assert ident.stdout.startswith("uid=1000(sandbox) gid=1000(sandbox)"), ident
        assert prepared.info.image == "local://dirge-microvm:debian"
        # The same image as an erofs base (root): the mounted image equals the tree base, no rebuild.
        with prepare("debian", cache_dir, base_format="erofs") as on_erofs:
            assert on_erofs.base_format == "erofs" and on_erofs.digest == prepared.digest
            differences = diff(snapshot(on_erofs.path), snapshot(root))
            assert not differences, "\n".join(differences[:20])
            image = cache_dir / "bases" / on_erofs.info.base / "rootfs.erofs"
            fsck = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True)
            assert fsck.returncode == 0, fsck.stderr
        # And as an ext4 disk (issue 11): e2fsck-clean, loop-mounted equal to the tree base.
        from dirge import export

        disk = export("debian", tmp_path / "debian.ext4", format="ext4", cache=Cache(cache_dir)).path
        differences = ext4_disk_differences(disk, snapshot(root), tmp_path / "mnt")
        assert not differences, "\n".join(differences[:20])
    assert builds(buildah_env) == 1
    # And it boots from an ext4 disk (issue 12): sshd accepts its config once the session has a host key
    # (/run is a fresh tmpfs in the guest, as on a booted Debian), and User sandbox runs as uid 1000.
    from test_boot import _boot_missing

    if _boot_missing():
        pytest.skip(f"boot part: {_boot_missing()}")
    from dirge.vm import boot

    lines: list[str] = []
    sshd = boot("debian", cache_dir, disk="ext4", accel="tcg", timeout=240, console=lines.append, command=[
        "/bin/sh", "-c", "mkdir -p /run/sshd && ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key "
                         "&& /usr/sbin/sshd -t && echo sshd-t-ok"])
    assert (sshd.status, lines[-1:]) == (0, ["sshd-t-ok"]), lines
    lines.clear()
    as_user = boot("debian", cache_dir, disk="ext4", accel="tcg", timeout=240, console=lines.append, user="sandbox",
                   command=["/bin/sh", "-c", 'id; echo "HOME=$HOME"; pwd'])
    assert as_user.status == 0
    assert lines == ["uid=1000(sandbox) gid=1000(sandbox) groups=1000(sandbox)", "HOME=/home/sandbox", "/"]
    assert builds(buildah_env) == 1


def test_pull_never_never_builds_a_variant(busybox_base, buildah_env, tmp_path: Path, capsys) -> None:
    """Offline means offline (issue 20, point 4): --pull never reads a built, current variant and refuses one
    not built or changed since (a build would pull its FROM image and run the Dockerfile), in the library
    and on the command line, without starting buildah's build."""
    d = write_variant(tmp_path, "offvm", busybox_base)
    cache_dir = tmp_path / "cache"
    with pytest.raises(BuildError, match=r"image offvm is not built .*run `dirge build offvm`"):
        prepare("offvm", cache_dir, pull="never")
    for args in (["inspect", "offvm"], ["session", "create", "offvm"], ["unpack", "offvm", str(tmp_path / "u")],
                 ["pull", "local://dirge-microvm:offvm"]):
        assert main([*args, "--pull", "never", "--cache-dir", str(cache_dir)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "image offvm is not built" in err and "dirge build offvm" in err, err
    assert builds(buildah_env) == 0 and not (tmp_path / "u").exists()

    build_guest_image("offvm", cache_root=cache_dir)
    assert builds(buildah_env) == 1
    with prepare("offvm", cache_dir, pull="never", strategy="copy") as p:
        assert (p.path / "etc/hello.txt").read_text() == "hello\n"
    (d / "hello.txt").write_text("edited\n")
    with pytest.raises(BuildError, match=r"image offvm changed since it was built .*run `dirge build offvm`"):
        prepare("offvm", cache_dir, pull="never")
    assert main(["inspect", "offvm", "--pull", "never", "--cache-dir", str(cache_dir)]) == 1
    assert "changed since it was built" in capsys.readouterr().err
    assert builds(buildah_env) == 1
    with prepare("offvm", cache_dir, strategy="copy") as p:  # allowed to pull: it rebuilds
        assert (p.path / "etc/hello.txt").read_text() == "edited\n"
    assert builds(buildah_env) == 2
