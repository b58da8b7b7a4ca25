"""Shared fixtures: image layouts built from layer tars, and skip rules that say what a test needs."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# The CLI's progress goes to stderr (plain lines when it is not a terminal); tests that check stderr
# for exactly one error line run without it. tests/test_progress.py turns it on for each command.
os.environ["DIRGE_PROGRESS"] = "quiet"

from dirge.sources.layout import LayoutWriter  # noqa: E402
from dirge.store.cache import default_cache_dir  # noqa: E402

pytest_plugins = ["ci_skips"]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, device nodes, setpriv)")


def needs_tool(*tools: str) -> pytest.MarkDecorator:
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (installed by scripts/setup.sh --test)")


def require(condition: bool, reason: str) -> None:
    """Inside a test, for a capability one part of it needs: skip the test unless ``condition`` (under
    ``CI=true`` tests/ci_skips.py turns the skip into a failure). Never check less instead of skipping."""
    if not condition:
        pytest.skip(reason)


def erofs_mounts() -> bool:
    """Root on a kernel that mounts erofs (what erofs bases and their sessions need)."""
    from dirge.fsimage.mount import erofs_supported

    return os.geteuid() == 0 and erofs_supported()


@pytest.fixture(autouse=True)
def _unmount_leftovers(request: pytest.FixtureRequest):
    """Erofs bases stay mounted in their cache (that is the design): unmount whatever a test left under
    its tmp_path, so no mount outlives the test, even a failed one."""
    where = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if where is None or os.geteuid() != 0:
        return
    from dirge.fsimage.mount import mounts_under, unmount

    for point in mounts_under(where):
        unmount(point)


# The caller's own default cache (~/.cache/dirge, as the environment names it before any test changes it)
# and home, which no test may touch
_USERS_CACHE = default_cache_dir()
_HOME = Path.home()


@pytest.fixture(autouse=True)
def _users_cache_untouched():
    """No test may create the caller's real default cache (each uses its own, under tmp_path) or change
    the mode or owner of the caller's home. A test that did fails here, named; the cache is removed."""
    existed = _USERS_CACHE.exists()
    home = os.stat(_HOME)
    yield
    if not existed and _USERS_CACHE.exists():
        shutil.rmtree(_USERS_CACHE, ignore_errors=True)
        pytest.fail(f"the test wrote the caller's default cache {_USERS_CACHE}; give it a cache of its own")
    now = os.stat(_HOME)
    if (now.st_mode, now.st_uid, now.st_gid) != (home.st_mode, home.st_uid, home.st_gid):
        pytest.fail(f"the test changed {_HOME}: mode {home.st_mode:o} -> {now.st_mode:o}, "
                    f"owner {home.st_uid}:{home.st_gid} -> {now.st_uid}:{now.st_gid}")


@pytest.fixture(scope="module")
def boot_cache(tmp_path_factory: pytest.TempPathFactory):
    """One cache for a module of boot tests: the initramfs images are built once per root kind. Its erofs
    bases stay mounted while it lives (the design); they are unmounted at the end, even after a failure."""
    from dirge.fsimage.mount import mounts_under, unmount

    where = tmp_path_factory.mktemp("boot-cache")
    yield where
    for point in mounts_under(where):
        unmount(point)


@pytest.fixture
def registry_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Registry tests see none of the user's auth files, registries.conf, certs.d or dirge config, and retry fast."""
    monkeypatch.setenv("DIRGE_RETRY_BASE", "0.01")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    monkeypatch.setenv("DIRGE_REGISTRIES_CONFIG", str(tmp_path / "no-registries.toml"))
    monkeypatch.setenv("DIRGE_CONFIG", str(tmp_path / "no-config.toml"))
    # An empty registries.conf, not a missing one: buildah (local:// tests) cannot resolve even a local short
    # name like "inspected:1" when the file it is pointed at does not exist.
    empty_conf = tmp_path / "no-registries-conf" / "registries.conf"
    empty_conf.parent.mkdir(exist_ok=True)
    empty_conf.touch()
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(empty_conf))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-xdg-config"))
    monkeypatch.setenv("DIRGE_CERTS_DIRS", str(tmp_path / "no-certs.d"))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def make_image(tmp_path: Path):
    """``make_image([layer_tar, ...], **add_image_kwargs) -> "oci:PATH:TAG"`` in a fresh layout."""
    counter = iter(range(1_000_000))

    def make(layers: list[bytes], *, tag: str = "t", **kwargs) -> str:
        layout = tmp_path / f"layout{next(counter)}"
        LayoutWriter(layout).add_image(layers, tag=tag, **kwargs)
        return f"oci:{layout}:{tag}"

    return make


@pytest.fixture
def loop_fs(tmp_path: Path):
    """``loop_fs("xfs"|"btrfs"|"ext4", size=512 MiB, options=()) -> mountpoint``: a loop-mounted filesystem
    (``losetup -f --show``); teardown unmounts everything under it and detaches it, even after a failure."""
    import subprocess

    from dirge.fsimage.mount import mounts_under, unmount

    attached: list[tuple[Path, str]] = []

    def make(fstype: str, size: int = 512 << 20, options: tuple[str, ...] = ()) -> Path:
        mkfs = {"xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q"],
                "ext4": ["mkfs.ext4", "-q", "-F"]}[fstype] + list(options)
        if os.geteuid() != 0 or shutil.which(mkfs[0]) is None or shutil.which("losetup") is None:
            pytest.skip(f"needs root, {mkfs[0]} and losetup for a loop-mounted {fstype}")
        n = len(attached)
        image = tmp_path / f"{fstype}{n}.img"
        with open(image, "wb") as f:
            f.truncate(size)
        subprocess.run(mkfs + [str(image)], check=True, capture_output=True)
        device = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True,
                                text=True).stdout.strip()
        mnt = tmp_path / f"{fstype}{n}-mnt"
        mnt.mkdir()
        attached.append((mnt, device))
        subprocess.run(["mount", device, str(mnt)], check=True)
        return mnt

    yield make
    for mnt, device in reversed(attached):
        for point in sorted(mounts_under(mnt), key=lambda p: len(str(p)), reverse=True):
            unmount(point)
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        subprocess.run(["losetup", "-d", device], capture_output=True)


# -- real registries on loopback (helpers in tests/registry.py) ----------------------------------------------------

from registry import FaultProxy, Registry, TLSFiles, make_tls_files  # noqa: E402

REGISTRY_USER, REGISTRY_PASSWORD = "alice", "s3cret"


@pytest.fixture(scope="session")
def registry_tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A test CA and a server certificate for 127.0.0.1/localhost (made once per session with openssl)."""
    return make_tls_files(tmp_path_factory.mktemp("registry-tls"))


def _run_registry(tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs):
    reg = Registry(tmp_path_factory.mktemp(name), **kwargs)
    try:
        yield reg.start()
    finally:
        reg.stop()


@pytest.fixture
def registry(tmp_path_factory: pytest.TempPathFactory):
    """A plain-HTTP, no-auth docker-registry on 127.0.0.1 (``.host``, ``.url``, ``.stop()``), stopped after the test."""
    yield from _run_registry(tmp_path_factory, "registry")


@pytest.fixture(scope="module")
def module_registry(tmp_path_factory: pytest.TempPathFactory):
    """Like ``registry``, shared by the tests of one module."""
    yield from _run_registry(tmp_path_factory, "registry")


@pytest.fixture
def tls_registry(tmp_path_factory: pytest.TempPathFactory, registry_tls_files: TLSFiles):
    """HTTPS + htpasswd basic auth (``.ca_cert``, ``.cert_dir``, ``.username``, ``.password``, ``.host``, ``.url``)."""
    yield from _run_registry(tmp_path_factory, "tls-registry", tls=registry_tls_files,
                             auth=(REGISTRY_USER, REGISTRY_PASSWORD))


@pytest.fixture(scope="module")
def module_tls_registry(tmp_path_factory: pytest.TempPathFactory, registry_tls_files: TLSFiles):
    """Like ``tls_registry``, shared by the tests of one module."""
    yield from _run_registry(tmp_path_factory, "tls-registry", tls=registry_tls_files,
                             auth=(REGISTRY_USER, REGISTRY_PASSWORD))


@pytest.fixture
def mirror_registry(tmp_path_factory: pytest.TempPathFactory):
    """``mirror_registry(upstream, *, username=None, password=None, upstream_ca=None) -> Registry``.

    A plain-HTTP pull-through cache (``proxy: remoteurl``) of ``upstream``, a URL or a ``Registry`` (then its CA is
    trusted). docker-registry 2.8 hands ``username``/``password`` only to a *bearer* token realm of the upstream,
    never to HTTP basic auth: put a ``fault_proxy(reg, bearer=True, bearer_creds=...)`` in between for that.
    """
    started: list[Registry] = []

    def make(upstream: "str | Registry", *, username: str | None = None, password: str | None = None,
             upstream_ca: str | None = None) -> Registry:
        if isinstance(upstream, Registry):
            if upstream.auth:
                raise ValueError("docker-registry 2.8 cannot mirror an upstream with basic auth; "
                                 "mirror a fault_proxy(upstream, bearer=True, bearer_creds=...) instead")
            upstream_ca = upstream_ca or upstream.ca_cert
            upstream = upstream.url
        reg = Registry(tmp_path_factory.mktemp("mirror"), proxy_remote=upstream, proxy_ca=upstream_ca,
                       proxy_auth=(username, password or "") if username is not None else None)
        started.append(reg)
        return reg.start()

    try:
        yield make
    finally:
        for reg in reversed(started):
            reg.stop()


@pytest.fixture
def fault_proxy():
    """``fault_proxy(upstream, *, bearer=False, bearer_creds=None, allow_anonymous=None, upstream_ca=None)``.

    Returns a started ``FaultProxy`` in front of ``upstream`` (URL or ``Registry``); all are stopped after the test.
    """
    started: list[FaultProxy] = []

    def make(upstream: "str | Registry", **kwargs) -> FaultProxy:
        if isinstance(upstream, Registry):
            kwargs.setdefault("upstream_ca", upstream.ca_cert)
            upstream = upstream.url
        proxy = FaultProxy(upstream, **kwargs)
        started.append(proxy)
        return proxy.start()

    try:
        yield make
    finally:
        for proxy in reversed(started):
            proxy.stop()
