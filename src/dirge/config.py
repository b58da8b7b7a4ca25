"""dirge's own configuration file: the cache's budget and the fleet's artifact repositories.

``$DIRGE_CONFIG``, else ``$XDG_CONFIG_HOME/dirge/config.toml`` (``~/.config/dirge/config.toml``)::

    [cache]
    max_size = "20G"                        # run gc after a prepare that leaves the cache bigger

    [fleet]
    artifacts = ["registry.example/dirge/bases"]   # where prepared bases are published as OCI artifacts

``$DIRGE_CACHE_MAX_SIZE`` overrides ``[cache] max_size``. Mirrors, locations, insecure and blocked
registries are the containers ecosystem's ``registries.conf`` (sources/registries_conf.py), read by
buildah and podman too. The old ``registries.toml`` (``$DIRGE_REGISTRIES_CONFIG``, else beside
config.toml) with ``[registries."host"] mirrors/insecure`` is still read, with a warning, once.
"""

from __future__ import annotations

import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DirgeError


@dataclass(frozen=True)
class RegistryConfig:
    """A deprecated registries.toml entry."""

    mirrors: tuple[str, ...] = ()
    insecure: bool = False


@dataclass(frozen=True)
class Config:
    registries: dict[str, RegistryConfig] = field(default_factory=dict)  # deprecated registries.toml
    cache_max_size: int | None = None  # bytes; [cache] max_size
    fleet_artifacts: tuple[str, ...] = ()  # [fleet] artifacts: REGISTRY/REPO where bases are published
    source: Path | None = None  # the registries.toml the registries came from (for messages)

    def registry(self, host: str) -> RegistryConfig:
        return self.registries.get(host, RegistryConfig())


def _config_dir() -> Path:
    base = Path(os.environ["XDG_CONFIG_HOME"]) if os.environ.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "dirge"


def config_path() -> Path:
    """dirge's config file: ``$DIRGE_CONFIG``, else ``$XDG_CONFIG_HOME/dirge/config.toml``."""
    if os.environ.get("DIRGE_CONFIG"):
        return Path(os.environ["DIRGE_CONFIG"])
    return _config_dir() / "config.toml"


def legacy_registries_path() -> Path:
    """The deprecated registries.toml: ``$DIRGE_REGISTRIES_CONFIG``, else beside config.toml."""
    if os.environ.get("DIRGE_REGISTRIES_CONFIG"):
        return Path(os.environ["DIRGE_REGISTRIES_CONFIG"])
    return _config_dir() / "registries.toml"


def _read_toml(path: Path) -> dict[str, object] | None:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DirgeError(f"read config {path}: {exc}") from None


def _table(path: Path, data: dict[str, object], name: str) -> dict[str, object]:
    value = data.get(name) or {}
    if not isinstance(value, dict):
        raise DirgeError(f"read config {path}: [{name}] must be a table")
    return value


_warned: set[Path] = set()


def _warn_legacy(path: Path, registries: dict[str, RegistryConfig]) -> None:
    """Once per process and file: registries.toml is deprecated, and what registries.conf says instead."""
    if path in _warned or not registries:
        return
    _warned.add(path)
    lines = []
    for host, reg in registries.items():
        lines.append(f'  [[registry]]\n  prefix = "{host}"\n  location = "{host}"'
                     + ("\n  insecure = true" if reg.insecure else ""))
        for m in reg.mirrors:
            lines.append(f'  [[registry.mirror]]\n  location = "{m.split("://", 1)[-1]}"'
                         + ("\n  insecure = true" if m.startswith("http://") else ""))
    print(f"dirge: warning: {path} is deprecated: mirrors and insecure registries belong in "
          "registries.conf (containers-registries.conf(5), which buildah and podman read too), "
          "e.g. ~/.config/containers/registries.conf:\n" + "\n".join(lines), file=sys.stderr)


def _legacy_registries(path: Path, data: dict[str, object]) -> dict[str, RegistryConfig]:
    out: dict[str, RegistryConfig] = {}
    for host, entry in _table(path, data, "registries").items():
        if not isinstance(entry, dict):
            raise DirgeError(f"read config {path}: [registries.{host!r}] must be a table")
        mirrors = entry.get("mirrors", [])
        if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
            raise DirgeError(f"read config {path}: registries.{host!r}.mirrors must be a list of URLs")
        out[host] = RegistryConfig(tuple(m.rstrip("/") for m in mirrors), bool(entry.get("insecure", False)))
    return out


def _max_size(path: Path, data: dict[str, object]) -> int | None:
    max_size = _table(path, data, "cache").get("max_size")
    try:
        return None if max_size is None else parse_size(str(max_size))
    except ValueError as exc:
        raise DirgeError(f"read config {path}: cache.max_size: {exc}") from None


def load_config(path: Path | None = None) -> Config:
    """config.toml, plus the deprecated registries.toml's registries (and its [cache], under config.toml's)."""
    path = path or config_path()
    data = _read_toml(path) or {}
    legacy_path = legacy_registries_path()
    legacy = _read_toml(legacy_path) if legacy_path != path else None
    registries: dict[str, RegistryConfig] = {}
    source = None
    for where, table in ((legacy_path, legacy), (path, data)):
        if table and table.get("registries") is not None:
            registries.update(_legacy_registries(where, table))
            _warn_legacy(where, registries)
            source = where
    budget = _max_size(path, data)
    if budget is None and legacy:
        budget = _max_size(legacy_path, legacy)
    artifacts = _table(path, data, "fleet").get("artifacts", [])
    if not isinstance(artifacts, list) or not all(isinstance(a, str) and "/" in a for a in artifacts):
        raise DirgeError(f'read config {path}: fleet.artifacts must be a list of "REGISTRY/REPO" strings')
    return Config(registries, budget, tuple(a.rstrip("/") for a in artifacts), source)


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
