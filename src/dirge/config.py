"""dirge's own configuration: registry mirrors and insecure registries.

``$DIRGE_REGISTRIES_CONFIG``, else ``$XDG_CONFIG_HOME/dirge/registries.toml`` (``~/.config/...``)::

    [registries."docker.io"]
    mirrors = ["http://127.0.0.1:5001"]    # tried first, in order; the origin is the fallback

    [registries."build.internal:5000"]
    insecure = true                         # plain HTTP allowed (loopback registries always are)

    [cache]
    max_size = "20G"                        # run gc after a prepare that leaves the cache bigger

    [fleet]
    artifacts = ["registry.internal/dirge-bases"]   # where prepared bases (OCI artifacts) may come from

``$DIRGE_CACHE_MAX_SIZE`` overrides ``[cache] max_size``.
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
    cache_max_size: int | None = None  # bytes; [cache] max_size
    fleet_artifacts: tuple[str, ...] = ()  # [fleet] artifacts: "REGISTRY/REPO" read for prebuilt bases

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
    cache = data.get("cache") or {}
    if not isinstance(cache, dict):
        raise DirgeError(f"read config {path}: [cache] must be a table")
    max_size = cache.get("max_size")
    try:
        budget = None if max_size is None else parse_size(str(max_size))
    except ValueError as exc:
        raise DirgeError(f"read config {path}: cache.max_size: {exc}") from None
    fleet = data.get("fleet") or {}
    artifacts = fleet.get("artifacts", []) if isinstance(fleet, dict) else None
    if not isinstance(artifacts, list) or not all(isinstance(a, str) and "/" in a for a in artifacts):
        raise DirgeError(f"read config {path}: [fleet] artifacts must be a list of \"REGISTRY/REPO\" strings")
    return Config(out, budget, tuple(artifacts))


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``512M``, ``2G``, ``2GiB`` (powers of 1024)."""
    value = text.strip()
    number = value.rstrip("KMGTkmgtiIbB")
    unit = value[len(number):].upper().removesuffix("B").removesuffix("I")
    if not number.isdigit() or unit not in _UNITS:
        raise ValueError(f"{text!r}: give bytes or a size like 512M or 2G")
    return int(number) * _UNITS[unit]


_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``12h``, ``7d``, ``2w``."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in _SECONDS else "s"
    number = value[:-1] if value[-1:] in _SECONDS else value
    try:
        seconds = float(number)
    except ValueError:
        raise ValueError(f"{text!r}: give a duration like 90s, 15m, 12h or 7d") from None
    if seconds < 0:
        raise ValueError(f"{text!r}: a duration cannot be negative")
    return seconds * _SECONDS[unit]


def cache_max_size() -> int | None:
    """The cache's size budget: ``$DIRGE_CACHE_MAX_SIZE``, else ``[cache] max_size``, else None."""
    env = os.environ.get("DIRGE_CACHE_MAX_SIZE")
    if env:
        try:
            return parse_size(env)
        except ValueError as exc:
            raise DirgeError(f"$DIRGE_CACHE_MAX_SIZE: {exc}") from None
    return load_config().cache_max_size
