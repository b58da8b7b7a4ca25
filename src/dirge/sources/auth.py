"""Registry credentials, found where docker, podman and skopeo keep them, and how registries are reached.

Order: ``--creds`` (explicit) → the auth file given (``--authfile``, else ``$REGISTRY_AUTH_FILE``: then it
is the only file read, as podman and skopeo do) → podman's ``$XDG_RUNTIME_DIR/containers/auth.json`` →
``$XDG_CONFIG_HOME/containers/auth.json`` (``~/.config/...``) → docker's ``config.json``
(``$DOCKER_CONFIG``, ``~/.docker/config.json``). In each file: ``credHelpers[host]``, then ``auths``
(``host/namespace/repo`` keys most specific first, then ``host``), then ``credsStore``. An ``auths``
entry's ``identitytoken`` is an OAuth2 refresh token for the registry's bearer realm.
Credentials never appear in messages, reprs or the cache.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DirgeError

DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    identity_token: str | None = field(default=None, repr=False)  # docker's identitytoken (OAuth2 refresh)

    @classmethod
    def parse(cls, text: str) -> "Credentials":
        user, sep, password = text.partition(":")
        if not sep or not user:
            raise DirgeError("credentials must be given as USER:PASSWORD")
        return cls(user, password)


@dataclass(frozen=True)
class RegistryOptions:
    """How registries are reached, beyond the config files: skopeo's ``--authfile``, ``--cert-dir``,
    ``--tls-verify``. The default is the files' say everywhere."""

    authfile: Path | None = None  # the only auth file read (else $REGISTRY_AUTH_FILE, else the defaults)
    cert_dir: Path | None = None  # CA *.crt and client *.cert/*.key, instead of certs.d/HOST[:PORT]
    tls_verify: bool | None = None  # True: verified HTTPS only; False: any TLS or plain HTTP; None: config


def _keys(registry: str) -> tuple[str, ...]:
    if registry == "docker.io":
        return DOCKER_HUB_KEYS
    return (registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/", f"https://{registry}/v2/")


def auth_files(authfile: Path | None = None) -> list[Path]:
    """The files credentials are looked up in, in order (see the module's doc)."""
    if authfile is not None:
        if not authfile.is_file():
            raise DirgeError(f"--authfile {authfile}: no such file; give the auth.json podman login or "
                             "docker login wrote")
        return [authfile]
    if os.environ.get("REGISTRY_AUTH_FILE"):
        return [Path(os.environ["REGISTRY_AUTH_FILE"])]
    files = []
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    config_home = Path(os.environ["XDG_CONFIG_HOME"]) if os.environ.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    files.append(config_home / "containers" / "auth.json")
    docker_dir = Path(os.environ["DOCKER_CONFIG"]) if os.environ.get("DOCKER_CONFIG") else Path.home() / ".docker"
    files.append(docker_dir / "config.json")
    return files


def _from_helper(helper: str, registry: str) -> Credentials | None:
    server = "https://index.docker.io/v1/" if registry == "docker.io" else registry
    try:
        proc = subprocess.run([f"docker-credential-{helper}", "get"], input=server, capture_output=True,
                              text=True, timeout=30)
    except FileNotFoundError:
        raise DirgeError(f"credential helper docker-credential-{helper} (configured for {registry}) is not "
                         "installed; install it or remove it from your docker config") from None
    except subprocess.TimeoutExpired:
        raise DirgeError(f"credential helper docker-credential-{helper} did not answer for {registry}") from None
    if proc.returncode != 0:
        return None  # "credentials not found": anonymous access may still work
    try:
        data = json.loads(proc.stdout)
        return Credentials(data["Username"], data["Secret"])
    except (ValueError, KeyError, TypeError):
        raise DirgeError(f"credential helper docker-credential-{helper} gave an unreadable answer for {registry}") from None


def _from_entry(entry: object) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    token = entry.get("identitytoken")
    token = token if isinstance(token, str) and token else None
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except ValueError:
            return None
        return Credentials(user, password, token)
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return Credentials(entry["username"], entry["password"], token)
    return Credentials("", "", token) if token else None


def find_credentials(registry: str, repository: str | None = None, authfile: Path | None = None) -> Credentials | None:
    """The credentials for ``registry`` (and ``repository``: podman's per-repository auth.json keys)."""
    parts = (repository or "").split("/") if repository else []
    keys = tuple(f"{registry}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)) + _keys(registry)
    for path in auth_files(authfile):
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(config, dict):
            continue
        helpers = config.get("credHelpers") or {}
        for key in keys:
            if isinstance(helpers, dict) and key in helpers:
                return _from_helper(helpers[key], registry)
        auths = config.get("auths") or {}
        for key in keys:
            if isinstance(auths, dict) and key in auths:
                creds = _from_entry(auths[key])
                if creds:
                    return creds
        if isinstance(config.get("credsStore"), str) and config["credsStore"]:
            return _from_helper(config["credsStore"], registry)
    return None
