"""Registry credentials, found where docker, podman and skopeo keep them.

Order: ``--creds`` (explicit) → podman/skopeo ``auth.json`` (``$REGISTRY_AUTH_FILE``,
``$XDG_RUNTIME_DIR/containers/auth.json``) → docker ``config.json`` (``$DOCKER_CONFIG``,
``~/.docker/config.json``): ``credHelpers[host]``, then ``auths[host]``, then ``credsStore``.
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

    @classmethod
    def parse(cls, text: str) -> "Credentials":
        user, sep, password = text.partition(":")
        if not sep or not user:
            raise DirgeError("credentials must be given as USER:PASSWORD")
        return cls(user, password)


def _keys(registry: str) -> tuple[str, ...]:
    if registry == "docker.io":
        return DOCKER_HUB_KEYS
    return (registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/", f"https://{registry}/v2/")


def auth_files() -> list[Path]:
    files = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
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
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except ValueError:
            return None
        return Credentials(user, password)
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return Credentials(entry["username"], entry["password"])
    return None


def find_credentials(registry: str) -> Credentials | None:
    keys = _keys(registry)
    for path in auth_files():
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
