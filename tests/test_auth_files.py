"""Credentials and TLS as the containers ecosystem keeps them (sources/auth.py, ssl_context): podman's auth.json
locations, ``--authfile``, docker's ``identitytoken``, ``--cert-dir``, ``--tls-verify``, against real loopback
registries (tests/registry.py)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from dirge.cli import main
from dirge.errors import AuthError
from dirge.layerbuild import LayerBuilder
from dirge.sources.auth import Credentials, RegistryOptions, find_credentials
from dirge.sources.layout import LayoutWriter
from dirge.sources.open import pull_image
from dirge.store.cache import Cache
from registry import FaultProxy, Registry, TokenIssuer, push_layout

pytestmark = pytest.mark.usefixtures("registry_env")  # conftest: no user config, fast retries


def auth_json(path: Path, host: str, user: str, password: str, **extra: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"auth": base64.b64encode(f"{user}:{password}".encode()).decode(), **extra}
    path.write_text(json.dumps({"auths": {host: entry}}))
    return path


@pytest.fixture
def tls_image(tls_registry: Registry, tmp_path: Path) -> str:
    layout = tmp_path / "layout"
    LayoutWriter(layout).add_image([LayerBuilder().file("f", b"secret image").build()], tag="t")
    tls_registry.push(layout, "t", "priv/app:1")
    return f"{tls_registry.host}/priv/app:1"


def pull(ref: str, tmp_path: Path, *args: str) -> int:
    return main(["pull", ref, "--cache-dir", str(tmp_path / "c"), *args])


def test_podmans_runtime_auth_json_is_used(tls_registry: Registry, tls_image: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    cert_dir = ["--cert-dir", str(tls_registry.cert_dir)]
    assert pull(tls_image, tmp_path, *cert_dir) == 1  # no credentials anywhere: refused
    auth_json(tmp_path / "run/containers/auth.json", tls_registry.host, tls_registry.username, tls_registry.password)
    assert pull(tls_image, tmp_path, *cert_dir) == 0


def test_the_config_home_auth_json_and_per_repository_keys(tls_registry: Registry, tls_image: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config_home = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    path = config_home / "containers/auth.json"
    path.parent.mkdir(parents=True)
    good = base64.b64encode(f"{tls_registry.username}:{tls_registry.password}".encode()).decode()
    bad = base64.b64encode(b"someone:else").decode()
    # podman's most specific key wins: the repository's entry over the registry's
    path.write_text(json.dumps({"auths": {tls_registry.host: {"auth": bad}, f"{tls_registry.host}/priv": {"auth": good}}}))
    assert find_credentials(tls_registry.host, "priv/app") == Credentials(tls_registry.username, tls_registry.password)
    assert find_credentials(tls_registry.host, "other/app") == Credentials("someone", "else")
    pull_image(tls_image, cache=Cache(tmp_path / "c"), registry_options=RegistryOptions(cert_dir=tls_registry.cert_dir))


def test_authfile_is_the_only_file_read(tls_registry: Registry, tls_image: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    auth_json(tmp_path / "run/containers/auth.json", tls_registry.host, "wrong", "creds")
    given = auth_json(tmp_path / "mine.json", tls_registry.host, tls_registry.username, tls_registry.password)
    cert_dir = ["--cert-dir", str(tls_registry.cert_dir)]
    assert pull(tls_image, tmp_path, *cert_dir) == 1  # the runtime file's wrong password
    assert pull(tls_image, tmp_path, *cert_dir, "--authfile", str(given)) == 0
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(given))  # the environment's spelling of the same
    assert pull(tls_image, tmp_path / "2", *cert_dir) == 0
    capsys.readouterr()
    assert pull(tls_image, tmp_path / "3", *cert_dir, "--authfile", str(tmp_path / "missing.json")) == 1
    assert "--authfile" in capsys.readouterr().err


def test_cert_dir_trusts_the_registry_and_nothing_else_does(tls_registry: Registry, tls_image: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    creds = ["--creds", f"{tls_registry.username}:{tls_registry.password}"]
    assert pull(tls_image, tmp_path, *creds) == 1
    assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err  # says why
    assert pull(tls_image, tmp_path, *creds, "--cert-dir", str(tls_registry.cert_dir)) == 0
    capsys.readouterr()
    assert pull(tls_image, tmp_path / "2", *creds, "--cert-dir", str(tmp_path / "nope")) == 1
    assert f"--cert-dir {tmp_path / 'nope'}: not a directory" in capsys.readouterr().err


def test_certs_d_beside_containers_config_is_read(tls_registry: Registry, tls_image: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIRGE_CERTS_DIRS")  # the real list: ~/.config/containers/certs.d first
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = tmp_path / "home/.config/containers/certs.d" / tls_registry.host
    folder.mkdir(parents=True)
    (folder / "ca.crt").write_bytes(tls_registry.ca_cert.read_bytes())  # type: ignore[union-attr]
    pull_image(tls_image, cache=Cache(tmp_path / "c"), creds=Credentials(tls_registry.username, tls_registry.password))


def test_no_tls_verify_accepts_any_certificate(tls_registry: Registry, tls_image: str, tmp_path: Path) -> None:
    creds = ["--creds", f"{tls_registry.username}:{tls_registry.password}"]
    assert pull(tls_image, tmp_path, *creds, "--no-tls-verify") == 0


def test_tls_verify_refuses_plain_http_even_on_loopback(registry: Registry, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    layout = tmp_path / "layout"
    LayoutWriter(layout).add_image([LayerBuilder().file("f", b"plain").build()], tag="t")
    push_layout(layout, "t", f"{registry.host}/plain/app:1")
    ref = f"{registry.host}/plain/app:1"
    assert pull(ref, tmp_path, "--tls-verify") == 1
    assert registry.host in capsys.readouterr().err
    assert pull(ref, tmp_path) == 0  # loopback's plain-HTTP fallback, by default


def test_identitytoken_is_a_refresh_token_at_the_bearer_realm(registry: Registry, fault_proxy, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    layout = tmp_path / "layout"
    LayoutWriter(layout).add_image([LayerBuilder().file("f", b"oauth2").build()], tag="t")
    push_layout(layout, "t", f"{registry.host}/tok/app:1")
    proxy: FaultProxy = fault_proxy(registry, bearer=True, bearer_creds=("nobody", "nothing"),
                                    refresh_token="refresh-me-123")
    docker = tmp_path / "docker"
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    ref = f"{proxy.host}/tok/app:1"
    # docker login against an OAuth2 registry stores "<token>" as the user and the refresh token beside it
    auth_json(docker / "config.json", proxy.host, "<token>", "", identitytoken="wrong-token")
    with pytest.raises(AuthError, match="identitytoken"):
        pull_image(ref, cache=Cache(tmp_path / "c0"))
    auth_json(docker / "config.json", proxy.host, "<token>", "", identitytoken="refresh-me-123")
    pull_image(ref, cache=Cache(tmp_path / "c"))
    granted = [t for t in proxy.token_requests if t.status == 200]
    assert granted and all(t.method == "POST" and t.grant == "refresh_token" and t.client_id == "dirge"
                           for t in proxy.token_requests)
    assert all(t.scopes == ("repository:tok/app:pull",) for t in granted)
    assert "refresh-me-123" not in repr(find_credentials(proxy.host))  # never in a repr


def test_a_cert_dirs_client_certificate_needs_its_key(registry_tls_files, tmp_path: Path) -> None:
    from dirge.errors import DirgeError
    from dirge.sources.registry import ssl_context

    folder = tmp_path / "certs"
    folder.mkdir()
    (folder / "client.cert").write_bytes(registry_tls_files.cert.read_bytes())
    with pytest.raises(DirgeError, match="client.key"):
        ssl_context("h:1", folder)
    (folder / "client.key").write_bytes(registry_tls_files.key.read_bytes())
    assert ssl_context("h:1", folder).verify_mode.name == "CERT_REQUIRED"  # loaded, still verifying


def test_every_command_that_may_pull_takes_the_registry_options() -> None:
    from dirge.cli import cli

    wanted = {"--platform", "--creds", "--authfile", "--cert-dir", "--tls-verify", "--no-tls-verify"}
    commands = {"pull": cli.commands["pull"], "unpack": cli.commands["unpack"], "inspect": cli.commands["inspect"],
                "export": cli.commands["export"], "boot": cli.commands["boot"],
                "session create": cli.commands["session"].commands["create"]}  # type: ignore[attr-defined]
    for name, command in commands.items():
        flags = {flag for p in command.params for flag in (*p.opts, *p.secondary_opts)}
        assert wanted <= flags, f"dirge {name} lacks {wanted - flags}"


@pytest.fixture
def token_registry(tmp_path_factory: pytest.TempPathFactory):
    """(a docker-registry with distribution's token auth, its TokenIssuer): the JWTs are checked by the registry."""
    issuer = TokenIssuer(tmp_path_factory.mktemp("issuer"), refresh_token="rt-from-docker-login",
                         pusher=("pusher", "push-pw")).start()
    reg = Registry(tmp_path_factory.mktemp("token-registry"), token_auth=issuer.registry_auth())
    try:
        yield reg.start(), issuer
    finally:
        reg.stop()
        issuer.stop()


def test_identitytoken_against_a_registry_with_distributions_token_auth(token_registry, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    reg, issuer = token_registry
    layout = tmp_path / "layout"
    LayoutWriter(layout).add_image([LayerBuilder().file("f", b"jwt").build()], tag="t")
    push_layout(layout, "t", f"{reg.host}/tok/app:1", creds=("pusher", "push-pw"))
    docker = tmp_path / "docker"
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    ref = f"{reg.host}/tok/app:1"
    with pytest.raises(AuthError):  # anonymous: the issuer grants nothing
        pull_image(ref, cache=Cache(tmp_path / "c0"))
    auth_json(docker / "config.json", reg.host, "<token>", "", identitytoken="rt-from-docker-login")
    issuer.requests.clear()
    pull_image(ref, cache=Cache(tmp_path / "c"))
    assert issuer.requests and all(r[:3] == ("POST", "refresh_token", "dirge") and r[4] == 200
                                   for r in issuer.requests)
    # the registry really checks the JWTs: a token whose signature is wrong is refused
    sign = issuer._sign
    monkeypatch.setattr(issuer, "_sign", lambda access: sign(access)[:-4] + "AAAA")
    with pytest.raises(AuthError):
        pull_image(ref, cache=Cache(tmp_path / "c2"))
