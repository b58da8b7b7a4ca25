"""dirge's own configuration: registry mirrors and insecure registries.

``$DIRGE_REGISTRIES_CONFIG``, else ``$XDG_CONFIG_HOME/dirge/registries.toml`` (``~/.config/...``)::

    [registries."docker.io"]
    mirrors = ["http://127.0.0.1:5001"]    # tried first, in order; the origin is the fallback

    [registries."build.internal:5000"]
    insecure = true                         # plain HTTP allowed (loopback registries always are)
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DirgeError


@dataclass(frozen=True)
class RegistryConfig:
    mirrors: tuple[str, ...] = ()
    insecure: bool = False


@dataclass(frozen=True)
class Config:
    registries: dict[str, RegistryConfig] = field(default_factory=dict)

    def registry(self, host: str) -> RegistryConfig:
        return self.registries.get(host, RegistryConfig())


def config_path() -> Path:
    if os.environ.get("DIRGE_REGISTRIES_CONFIG"):
        return Path(os.environ["DIRGE_REGISTRIES_CONFIG"])
    base = Path(os.environ["XDG_CONFIG_HOME"]) if os.environ.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "dirge" / "registries.toml"


def load_config(path: Path | None = None) -> Config:
    path = path or config_path()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return Config()
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DirgeError(f"read config {path}: {exc}") from None
    out: dict[str, RegistryConfig] = {}
    for host, entry in (data.get("registries") or {}).items():
        if not isinstance(entry, dict):
            raise DirgeError(f"read config {path}: [registries.{host!r}] must be a table")
        mirrors = entry.get("mirrors", [])
        if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
            raise DirgeError(f"read config {path}: registries.{host!r}.mirrors must be a list of URLs")
        out[host] = RegistryConfig(tuple(m.rstrip("/") for m in mirrors), bool(entry.get("insecure", False)))
    return Config(out)
