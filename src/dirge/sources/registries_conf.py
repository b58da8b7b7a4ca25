"""containers-registries.conf(5), version 2: where a registry image is really fetched from.

The files buildah, podman and skopeo read, so mirrors are configured once: ``$CONTAINERS_REGISTRIES_CONF``
if set, else ``$HOME/.config/containers/registries.conf`` if it exists, else
``/etc/containers/registries.conf``; then ``registries.conf.d/*.conf`` beside it, in lexical order, a later
``[[registry]]`` replacing an earlier one with the same prefix. dirge's deprecated ``registries.toml``
(``[registries."host"] mirrors/insecure``) is read as if it were one more drop-in.

For a reference, the ``[[registry]]`` with the longest matching ``prefix`` applies (``host[:port]``,
``host[:port]/namespace...``, optionally ``:tag``/``@digest``, or ``*.example.com``):

- ``blocked = true``: pulling is an error naming the file;
- ``location``: the repository is fetched from there (the prefix replaced); the ref's identity (its
  name in the cache, its records) stays what the user wrote;
- ``[[registry.mirror]]``: tried first, in order (``pull-from-mirror``: all, digest-only, tag-only;
  the registry's ``mirror-by-digest-only`` is the old spelling of digest-only);
- ``insecure = true`` (the registry's, or a mirror's): plain HTTP and unverified TLS are allowed.

``unqualified-search-registries``, ``short-name-mode``, ``[aliases]`` and ``credential-helpers`` are
read past, not used: dirge names images by its own explicit rules (README, image references).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, load_config
from ..errors import DirgeError

SYSTEM_FILE = Path("/etc/containers/registries.conf")
PULL_FROM_MIRROR = ("all", "digest-only", "tag-only")


@dataclass(frozen=True)
class Mirror:
    location: str
    insecure: bool = False
    pull_from_mirror: str = "all"


@dataclass(frozen=True)
class RegistryEntry:
    """One ``[[registry]]`` table, and the file it came from (for errors)."""

    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirrors: tuple[Mirror, ...] = ()
    mirror_by_digest_only: bool = False
    source: str = ""


@dataclass(frozen=True)
class Location:
    """Where one pull of a ref goes: ``host`` and ``repository`` (after the prefix was replaced)."""

    host: str
    repository: str
    insecure: bool = False


@dataclass(frozen=True)
class Route:
    """The mirrors (in order) and the primary location for one ref."""

    mirrors: tuple[Location, ...]
    primary: Location


def registries_conf_path() -> Path:
    env = os.environ.get("CONTAINERS_REGISTRIES_CONF")
    if env:
        return Path(env)
    home = os.environ.get("HOME")
    user = Path(home) / ".config" / "containers" / "registries.conf" if home else None
    return user if user is not None and user.exists() else SYSTEM_FILE


def registries_conf_files(path: Path | None = None) -> list[Path]:
    """The main file (if it exists) and its drop-ins, in the order they apply."""
    main = path or registries_conf_path()
    files = [main] if main.is_file() else []
    dropins = main.parent / "registries.conf.d"
    if dropins.is_dir():
        files += sorted(p for p in dropins.glob("*.conf") if p.is_file())
    return files


def _fail(path: Path | str, what: str) -> DirgeError:
    return DirgeError(f"read {path}: {what} (see containers-registries.conf(5))")


def _bool(path: Path, table: dict[str, object], key: str, where: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise _fail(path, f"{where}.{key} must be true or false")
    return value


def _str(path: Path, table: dict[str, object], key: str, where: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise _fail(path, f"{where}.{key} must be a string")
    return value.rstrip("/")


def _parse_file(path: Path) -> list[RegistryEntry]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _fail(path, str(exc)) from None
    if isinstance(data.get("registries"), dict):
        raise _fail(path, "this is the V1 format ([registries.search] / [registries.insecure] / "
                          "[registries.block]), which dirge does not read; rewrite it as V2 [[registry]] tables")
    tables = data.get("registry", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise _fail(path, "[[registry]] must be an array of tables")
    out = []
    for i, table in enumerate(tables):
        where = f"registry[{i}]"
        location = _str(path, table, "location", where)
        prefix = _str(path, table, "prefix", where) or location
        if not prefix:
            raise _fail(path, f"{where} has neither prefix nor location")
        if prefix.startswith("*.") and location:
            raise _fail(path, f"{where}: a wildcard prefix ({prefix}) cannot have a location")
        wildcard = prefix.startswith("*.")
        if "*" in (prefix[2:] if wildcard else prefix) or (wildcard and "/" in prefix):
            raise _fail(path, f"{where}: prefix {prefix!r}: a wildcard is only allowed as *.host")
        raw_mirrors = table.get("mirror", [])
        if not isinstance(raw_mirrors, list) or not all(isinstance(m, dict) for m in raw_mirrors):
            raise _fail(path, f"{where}: [[registry.mirror]] must be an array of tables")
        mirrors = []
        for j, m in enumerate(raw_mirrors):
            mwhere = f"{where}.mirror[{j}]"
            mloc = _str(path, m, "location", mwhere)
            if not mloc:
                raise _fail(path, f"{mwhere} has no location")
            pull_from = m.get("pull-from-mirror", "all") or "all"
            if pull_from not in PULL_FROM_MIRROR:
                raise _fail(path, f"{mwhere}.pull-from-mirror must be one of {', '.join(PULL_FROM_MIRROR)}")
            mirrors.append(Mirror(mloc, _bool(path, m, "insecure", mwhere), str(pull_from)))
        out.append(RegistryEntry(prefix, location or ("" if prefix.startswith("*.") else prefix),
                                 _bool(path, table, "insecure", where), _bool(path, table, "blocked", where),
                                 tuple(mirrors), _bool(path, table, "mirror-by-digest-only", where), str(path)))
    return out


def _legacy_entries(config: Config, source: str) -> list[RegistryEntry]:
    """registries.toml's ``[registries."host"]`` as registries.conf would say it."""
    out = []
    for host, reg in config.registries.items():
        # registries.toml mirrors are URLs; a scheme of http:// there meant plain HTTP (insecure)
        mirrors = tuple(Mirror(m.split("://", 1)[-1], m.startswith("http://")) for m in reg.mirrors)
        out.append(RegistryEntry(host, host, reg.insecure, False, mirrors, False, source))
    return out


def _matches(name: str, prefix: str) -> int:
    """How long a match ``prefix`` is for ``name`` (``registry/repo[:tag][@digest]``), or -1 (containers/image's
    refMatchingPrefix, except that ``host`` does not match ``host:port``)."""
    if prefix.startswith("*."):
        host = name.split("/", 1)[0]
        hostname = host.rsplit(":", 1)[0] if not host.startswith("[") else host
        return len(prefix) if hostname.endswith(prefix[1:]) else -1
    if name == prefix:
        return len(prefix)
    if not name.startswith(prefix):
        return -1
    follow = name[len(prefix)]
    if follow in "/@" or (follow == ":" and "/" in prefix):
        return len(prefix)
    return -1


@dataclass(frozen=True)
class RegistriesConf:
    entries: tuple[RegistryEntry, ...] = ()

    def find(self, name: str) -> RegistryEntry | None:
        best, best_len = None, -1
        for entry in self.entries:
            n = _matches(name, entry.prefix)
            if n > best_len:
                best, best_len = entry, n
        return best

    def route(self, registry: str, repository: str, tag: str | None, digest: str | None) -> Route:
        """Where ``registry/repository`` (pulled by ``digest`` if given, else ``tag``) is fetched from."""
        name = f"{registry}/{repository}" + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
        entry = self.find(name)
        if entry is None:
            return Route((), Location(registry, repository))
        if entry.blocked:
            raise DirgeError(f"{registry}/{repository}: pulling from {entry.prefix} is blocked by {entry.source} "
                             "(blocked = true); remove that or pull another image")

        def rewrite(location: str, insecure: bool) -> Location:
            # the matched part of the name is replaced by ``location``: the prefix, or for *.host the host
            matched = registry if entry.prefix.startswith("*.") else entry.prefix
            name = f"{registry}/{repository}"
            rest = name[len(matched):] if name.startswith(matched) else ""
            host, _, repo = (location + rest).partition("/")
            return Location(host, repo.strip("/") or repository, insecure)

        mirrors = []
        for m in entry.mirrors:
            mode = "digest-only" if entry.mirror_by_digest_only else m.pull_from_mirror
            if (mode == "digest-only" and not digest) or (mode == "tag-only" and digest):
                continue
            mirrors.append(rewrite(m.location, m.insecure))
        return Route(tuple(mirrors), rewrite(entry.location or registry, entry.insecure))

    def insecure_host(self, host: str) -> bool:
        """Whether ``host[:port]`` is a location (registry or mirror) configured insecure."""
        for entry in self.entries:
            if entry.insecure and (entry.location.split("/", 1)[0] == host or _matches(host, entry.prefix) >= 0):
                return True
            if any(m.insecure and m.location.split("/", 1)[0] == host for m in entry.mirrors):
                return True
        return False


def load_registries_conf(path: Path | None = None, config: Config | None = None) -> RegistriesConf:
    """Every registries.conf file, then dirge's deprecated registries.toml, a later prefix replacing an earlier."""
    by_prefix: dict[str, RegistryEntry] = {}
    for file in registries_conf_files(path):
        for entry in _parse_file(file):
            by_prefix[entry.prefix] = entry
    config = config if config is not None else load_config()
    for entry in _legacy_entries(config, str(config.source)):
        by_prefix[entry.prefix] = entry
    return RegistriesConf(tuple(by_prefix.values()))
