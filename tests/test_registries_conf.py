"""containers-registries.conf(5) (sources/registries_conf.py): the files, their precedence, and what each key does
to a pull, against real loopback registries (tests/registry.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from dirge import unpack
from dirge.cli import main
from dirge.config import load_config
from dirge.errors import DirgeError
from dirge.layerbuild import LayerBuilder
from dirge.oci.reference import parse_reference
from dirge.sources.layout import LayoutWriter
from dirge.sources.registries_conf import Location, load_registries_conf, registries_conf_files
from dirge.sources.registry import RegistryClient
from dirge.store.cache import Cache
from registry import FaultProxy, Registry, push_layout

pytestmark = pytest.mark.usefixtures("registry_env")  # conftest: no user config, fast retries


def conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, name: str = "registries.conf") -> Path:
    """Write ``text`` as $CONTAINERS_REGISTRIES_CONF (or a drop-in beside it, ``name`` with a slash)."""
    main_file = tmp_path / "containers" / "registries.conf"
    path = tmp_path / "containers" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", str(main_file))
    return path


def push(tmp_path: Path, registry: Registry, repo: str, content: bytes) -> None:
    layout = tmp_path / f"layout-{repo.replace('/', '-').replace(':', '-')}"
    LayoutWriter(layout).add_image([LayerBuilder().file("f", content).build()], tag="t")
    push_layout(layout, "t", f"{registry.host}/{repo}")


def dead_host() -> str:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# -- the files and their rules ----------------------------------------------------------------


def test_the_longest_prefix_wins_and_location_rewrites_the_repository(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    conf(tmp_path, monkeypatch, """
        unqualified-search-registries = ["docker.io"]
        [[registry]]
        prefix = "example.com"
        location = "mirror.example.net/all"
        [[registry]]
        prefix = "example.com/team"
        location = "internal.example.net:5000/team-copy"
        insecure = true
        [[registry]]
        prefix = "*.corp.example"
        insecure = true
        [[registry.mirror]]
        location = "cache.example/corp"
        [aliases]
        "fedora" = "registry.fedoraproject.org/fedora"
    """)
    rc = load_registries_conf()
    route = rc.route("example.com", "team/app", "1", None)
    assert route.primary == Location("internal.example.net:5000", "team-copy/app", True)
    assert rc.route("example.com", "teamwork/app", "1", None).primary == \
        Location("mirror.example.net", "all/teamwork/app")  # a prefix matches whole path components only
    wild = rc.route("build.corp.example:5000", "x", None, None)
    assert wild.primary == Location("build.corp.example:5000", "x", True)
    assert wild.mirrors == (Location("cache.example", "corp/x"),)  # the matched host replaced
    assert not rc.route("corp.example", "x", None, None).primary.insecure  # *.corp.example needs a subdomain
    assert rc.route("other.org", "x", "1", None).primary == Location("other.org", "x")  # unmatched: as written


def test_host_does_not_match_host_with_a_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf(tmp_path, monkeypatch, '[[registry]]\nlocation = "localhost"\nblocked = true\n')
    rc = load_registries_conf()
    rc.route("localhost:5000", "a", "1", None)  # no error: another registry
    with pytest.raises(DirgeError, match="blocked"):
        rc.route("localhost", "a", "1", None)


def test_drop_ins_apply_in_lexical_order_and_replace_a_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf(tmp_path, monkeypatch, '[[registry]]\nprefix = "a.example"\nlocation = "one.example"\n')
    conf(tmp_path, monkeypatch, '[[registry]]\nprefix = "a.example"\nlocation = "three.example"\n',
         "registries.conf.d/20-b.conf")
    conf(tmp_path, monkeypatch, '[[registry]]\nprefix = "a.example"\nlocation = "two.example"\n',
         "registries.conf.d/10-a.conf")
    (tmp_path / "containers/registries.conf.d/30-ignored.txt").write_text("not toml at all [")
    assert [p.name for p in registries_conf_files()] == ["registries.conf", "10-a.conf", "20-b.conf"]
    assert load_registries_conf().route("a.example", "r", "1", None).primary.host == "three.example"


def test_the_user_file_is_preferred_to_the_system_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dirge.sources.registries_conf import SYSTEM_FILE, registries_conf_path

    monkeypatch.delenv("CONTAINERS_REGISTRIES_CONF")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert registries_conf_path() == SYSTEM_FILE
    user = tmp_path / ".config/containers/registries.conf"
    user.parent.mkdir(parents=True)
    user.write_text("")
    assert registries_conf_path() == user


def test_a_v1_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = conf(tmp_path, monkeypatch, '[registries.search]\nregistries = ["docker.io"]\n')
    with pytest.raises(DirgeError) as info:
        load_registries_conf()
    assert str(path) in str(info.value) and "V1" in str(info.value) and "[[registry]]" in str(info.value)


def test_mirror_selection_by_pull_from_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf(tmp_path, monkeypatch, """
        [[registry]]
        location = "origin.example"
        [[registry.mirror]]
        location = "digests.example"
        pull-from-mirror = "digest-only"
        [[registry.mirror]]
        location = "tags.example/m"
        pull-from-mirror = "tag-only"
        insecure = true
        [[registry.mirror]]
        location = "any.example"
    """)
    rc = load_registries_conf()
    by_tag = rc.route("origin.example", "r", "1", None)
    assert by_tag.mirrors == (Location("tags.example", "m/r", True), Location("any.example", "r"))
    by_digest = rc.route("origin.example", "r", None, "sha256:" + "a" * 64)
    assert [m.host for m in by_digest.mirrors] == ["digests.example", "any.example"]


def test_insecure_lets_a_remote_host_fall_back_to_plain_http(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf(tmp_path, monkeypatch, '[[registry]]\nlocation = "build.internal:5000"\ninsecure = true\n')
    ref = parse_reference("build.internal:5000/app:1")
    other = parse_reference("other.internal:5000/app:1")
    client = RegistryClient("build.internal:5000")
    try:
        [(endpoint, repository)] = client.routes(ref)  # type: ignore[arg-type]
        assert endpoint.fallback_http and repository == "app" and endpoint.clear_ok("http://build.internal:5000/v2/")
        [(strict, _)] = client.routes(other)  # type: ignore[arg-type]
        assert not strict.fallback_http and not strict.clear_ok("http://other.internal:5000/v2/")
    finally:
        client.close()


def test_the_deprecated_registries_toml_is_read_and_warns_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    legacy = tmp_path / "old-registries.toml"
    legacy.write_text('[registries."old.example"]\nmirrors = ["http://127.0.0.1:5001"]\ninsecure = true\n'
                      '[cache]\nmax_size = "1G"\n')
    monkeypatch.setenv("DIRGE_REGISTRIES_CONFIG", str(legacy))
    route = load_registries_conf().route("old.example", "r", "1", None)
    assert route.mirrors == (Location("127.0.0.1:5001", "r", True),) and route.primary.insecure
    assert load_config().cache_max_size == 1 << 30
    load_registries_conf()
    err = capsys.readouterr().err
    assert err.count("is deprecated") == 1 and str(legacy) in err
    assert 'location = "127.0.0.1:5001"' in err and "registries.conf" in err  # the equivalent, spelled out


def test_config_toml_holds_the_cache_budget_and_fleet_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[cache]\nmax_size = "2G"\n[fleet]\nartifacts = ["reg.example/dirge/bases", "127.0.0.1:5000/b"]\n')
    monkeypatch.setenv("DIRGE_CONFIG", str(config))
    loaded = load_config()
    assert loaded.cache_max_size == 2 << 30
    assert loaded.fleet_artifacts == ("reg.example/dirge/bases", "127.0.0.1:5000/b")
    config.write_text('[fleet]\nartifacts = "reg.example/one"\n')
    with pytest.raises(DirgeError, match="fleet.artifacts must be a list"):
        load_config()
    monkeypatch.delenv("DIRGE_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg/dirge").mkdir(parents=True)
    (tmp_path / "xdg/dirge/config.toml").write_text('[fleet]\nartifacts = ["x.example/y"]\n')
    assert load_config().fleet_artifacts == ("x.example/y",)


# -- against real registries ------------------------------------------------------------------


def test_a_mirror_serves_the_pull_while_the_origin_is_unreachable(registry: Registry, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    origin = dead_host()
    push(tmp_path, registry, "lib/app:1", b"from the mirror")
    conf(tmp_path, monkeypatch, f'[[registry]]\nlocation = "{origin}"\n[[registry.mirror]]\nlocation = "{registry.host}"\n')
    cache = Cache(tmp_path / "c")
    unpack(f"{origin}/lib/app:1", tmp_path / "out", cache=cache)
    assert (tmp_path / "out/f").read_bytes() == b"from the mirror"
    assert cache.lookup_ref(f"{origin}/lib/app:1") is not None  # the ref keeps its own name


def test_location_rewrites_where_the_repository_is_fetched(registry: Registry, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    push(tmp_path, registry, "copies/team/app:2", b"rewritten")
    conf(tmp_path, monkeypatch, f'[[registry]]\nprefix = "images.example.invalid/team"\n'
                                f'location = "{registry.host}/copies/team"\n')
    cache = Cache(tmp_path / "c")
    assert main(["unpack", "images.example.invalid/team/app:2", str(tmp_path / "out"), "--cache-dir",
                 str(tmp_path / "c")]) == 0
    assert (tmp_path / "out/f").read_bytes() == b"rewritten"
    assert cache.lookup_ref("images.example.invalid/team/app:2") is not None


def test_blocked_is_an_error_naming_the_file(registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    push(tmp_path, registry, "no/app:1", b"never")
    path = conf(tmp_path, monkeypatch, f'[[registry]]\nprefix = "{registry.host}/no"\nblocked = true\n',
                "registries.conf.d/50-block.conf")
    assert main(["pull", f"{registry.host}/no/app:1", "--cache-dir", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "blocked" in err and str(path) in err
    assert not any(p.is_file() for p in (tmp_path / "c").rglob("*"))  # nothing fetched, no ref recorded


def test_insecure_accepts_an_unverified_tls_registry(tls_registry: Registry, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    layout = tmp_path / "layout"
    LayoutWriter(layout).add_image([LayerBuilder().file("f", b"any cert").build()], tag="t")
    tls_registry.push(layout, "t", "sec/app:1")
    ref = f"{tls_registry.host}/sec/app:1"
    creds = ["--creds", f"{tls_registry.username}:{tls_registry.password}"]
    assert main(["pull", ref, "--cache-dir", str(tmp_path / "c"), *creds]) == 1  # unknown CA: refused
    conf(tmp_path, monkeypatch, f'[[registry]]\nlocation = "{tls_registry.host}"\ninsecure = true\n')
    assert main(["pull", ref, "--cache-dir", str(tmp_path / "c"), *creds]) == 0


def test_insecure_in_registries_conf_lets_credentials_go_to_a_plain_http_realm(
        registry: Registry, fault_proxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        registry_tls_files) -> None:
    from test_registry_tls_creds import PASSWORD, USER, TLSFront

    push(tmp_path, registry, "sec/app:1", b"over tls")
    proxy: FaultProxy = fault_proxy(registry, bearer=True, bearer_creds=(USER, PASSWORD))
    front = TLSFront(registry_tls_files, proxy.port)
    try:
        certs = tmp_path / "certs"
        certs.mkdir()
        (certs / "ca.crt").write_bytes(registry_tls_files.ca_cert.read_bytes())
        args = ["pull", f"{front.host}/sec/app:1", "--cache-dir", str(tmp_path / "c"), "--creds", f"{USER}:{PASSWORD}",
                "--cert-dir", str(certs)]
        assert main(args) == 1 and proxy.token_requests == []  # a plain-HTTP realm gets no password
        conf(tmp_path, monkeypatch, f'[[registry]]\nlocation = "{proxy.host}"\ninsecure = true\n')
        assert main(args) == 0
        assert [t.username for t in proxy.token_requests if t.status == 200] == [USER]
    finally:
        front.close()


@pytest.mark.parametrize("prefix", ["*.example.com/ns", "ex*.com", "example.com/*"])
def test_a_wildcard_is_only_a_leading_host_label(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    conf(tmp_path, monkeypatch, f'[[registry]]\nprefix = "{prefix}"\n')
    with pytest.raises(DirgeError, match="wildcard"):
        load_registries_conf()
