"""The ``dirge`` command: arguments in, one clear line out on failure (a traceback only with --debug)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .apply.layer import Limits
from .bases import FORMAT_CHOICES, FORMAT_ENV
from .errors import DirgeError
from .oci.image import parse_platform
from .options import FIELDS, DiskOptions, PrepareOptions
from .session.backends import STRATEGIES

if TYPE_CHECKING:
    from .session import Sessions, SessionInfo
    from .sources.auth import Credentials


def _size(value: str) -> int | None:
    """``auto`` → None; else bytes, with an optional K/M/G/T suffix (powers of 1024)."""
    if value == "auto":
        return None
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = value.rstrip("KMGTkmgtiIbB"), value[len(value.rstrip("KMGTkmgtiIbB")):].upper()
    unit = unit.removesuffix("B").removesuffix("I")
    if not number.isdigit() or unit not in units:
        raise click.BadParameter(f"{value!r}: give bytes, a size like 2G, or auto", param_hint="--size")
    return int(number) * units[unit]


def _limits(values: tuple[str, ...]) -> Limits:
    names = {f.name for f in dataclasses.fields(Limits)}
    kwargs: dict[str, int] = {}
    for item in values:
        key, sep, num = item.partition("=")
        if not sep or key not in names or not num.isdigit():
            raise click.BadParameter(f"{item!r}: use NAME=N with NAME one of {', '.join(sorted(names))}")
        kwargs[key] = int(num)
    try:
        return Limits(**kwargs)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group()
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Turn OCI container images into root filesystems for microVM sandboxes."""
    ctx.obj = {"debug": debug, "quiet": quiet}


def _progress() -> Any:
    """A rich display on a terminal (unless --quiet), else a do-nothing context."""
    from contextlib import nullcontext

    from .progress import TerminalProgress

    quiet = bool(click.get_current_context().find_root().obj.get("quiet"))
    return TerminalProgress() if TerminalProgress.wanted(quiet) else nullcontext(None)


def _creds(value: str | None) -> "Credentials | None":
    from .sources.auth import Credentials

    return Credentials.parse(value) if value else None


pull_option = click.option("--pull", type=click.Choice(["always", "missing", "never"]), default="missing",
                           show_default=True, help="Registry images: when to ask the registry.")
creds_option = click.option("--creds", metavar="USER:PASSWORD",
                            help="Registry credentials (default: docker/podman auth files and helpers).")


@cli.command("pull")
@click.argument("image")
@click.option("--platform", help="os/arch[/variant] to pick from a multi-platform image.")
@click.option("--pull", "policy", type=click.Choice(["always", "missing", "never"]), default="always",
              show_default=True)
@creds_option
@click.option("--cache-dir", type=click.Path(path_type=Path), envvar="DIRGE_CACHE_DIR")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def pull_cmd(image: str, platform: str | None, policy: str, creds: str | None, cache_dir: Path | None,
             as_json: bool) -> None:
    """Download IMAGE's manifest, config and layers into the cache; print the manifest digest."""
    from .store.cache import Cache
    from .sources.open import pull_image
    from .variants import build_variant

    with _progress() as progress:
        resolved = pull_image(image, parse_platform(platform) if platform else None, cache=Cache(cache_dir),
                              pull=policy, creds=_creds(creds), on_bytes=progress.download if progress else None,
                              build=build_variant)
    if as_json:
        click.echo(json.dumps({"image": image, "digest": str(resolved.manifest_digest),
                               "platform": str(resolved.platform) if resolved.platform else None,
                               "layers": [str(d.digest) for d in resolved.manifest.layers]}, indent=2))
    else:
        click.echo(str(resolved.manifest_digest))


@cli.command("unpack")
@click.argument("image")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--platform", help="os/arch[/variant] to pick from a multi-platform image.")
@pull_option
@creds_option
@click.option("--cache-dir", type=click.Path(path_type=Path), envvar="DIRGE_CACHE_DIR",
              help="Where registry blobs are kept.")
@click.option("--rootless", is_flag=True, help="Unpack as an unprivileged user would (automatic when not root).")
@click.option("--limit", "limits", multiple=True, metavar="NAME=N",
              help="Override a safety limit: " + ", ".join(f.name for f in dataclasses.fields(Limits)) +
                   " (max_layer_bytes: decompressed bytes of one layer).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def unpack_cmd(image: str, dest: Path, platform: str | None, pull: str, creds: str | None, cache_dir: Path | None,
               rootless: bool, limits: tuple[str, ...], as_json: bool) -> None:
    """Write the flattened rootfs of IMAGE (oci:PATH[:TAG] or a registry ref) into DEST (absent or empty)."""
    from .store.cache import Cache
    from .unpack import unpack

    cache = None if image.startswith("oci:") else Cache(cache_dir)
    with _progress() as progress:
        result = unpack(image, dest, platform=parse_platform(platform) if platform else None,
                        rootless=True if rootless else None, limits=_limits(limits), cache=cache, pull=pull,
                        creds=_creds(creds), on_bytes=progress.download if progress else None,
                        progress=progress.apply if progress else None)
    summary: dict[str, Any] = {
        "image": image,
        "digest": str(result.image.manifest_digest),
        "dest": str(dest),
        "layers": result.report.layers,
        "entries": result.report.entries,
        "bytes": result.report.bytes,
        "skipped": result.report.skipped,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(f"{dest}: {summary['layers']} layers, {summary['entries']} entries, "
                   f"{summary['bytes']} bytes from {summary['digest']}")
        for line in result.report.skipped:
            click.echo(f"skipped {line}", err=True)


@cli.command("demo")
@click.option("--dir", "workdir", type=click.Path(path_type=Path), default=Path("/var/tmp/dirge-demo"),
              show_default=True, help="Where to build the demo layout, rootfs and cache.")
@click.option("--boot/--no-boot", default=None,
              help="Run it in a QEMU microVM (default: when QEMU and a kernel are found), else in a chroot.")
@click.option("--disk", type=click.Choice(["dir", "ext4", "erofs"]), default="dir", show_default=True,
              help="What the microVM boots from (see dirge boot).")
def demo_cmd(workdir: Path, boot: bool | None, disk: str) -> None:
    """Build a tiny busybox image offline, unpack it, and run a shell inside it."""
    from .demo import run_demo

    _, output, how = run_demo(workdir, boot=boot, disk=disk, console=click.echo)
    if how != "boot":
        click.echo(output, nl=False)


cache_dir_option = click.option(
    "--cache-dir", type=click.Path(path_type=Path), envvar="DIRGE_CACHE_DIR",
    help="Cache directory (default $DIRGE_CACHE_DIR, else $XDG_CACHE_HOME/dirge or ~/.cache/dirge).")


def _key_values(values: tuple[str, ...], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: use KEY=VALUE", param_hint=option)
        out[key] = value
    return out


@cli.command("boot")
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[-- CMD ARGS...]")
@click.option("--disk", type=click.Choice(["dir", "ext4", "erofs"]), default="dir", show_default=True,
              help="dir: the session directory over virtio-9p; ext4: the session's own disk; "
                   "erofs: the shared erofs base plus a scratch disk for an overlay.")
@click.option("--kernel", type=click.Path(path_type=Path), envvar="DIRGE_KERNEL",
              help="A vmlinuz (default $DIRGE_KERNEL, else the newest /boot/vmlinuz-*).")
@click.option("--initrd", type=click.Path(path_type=Path), help="An initramfs instead of the one dirge builds.")
@click.option("--memory", type=click.IntRange(min=64), default=512, show_default=True, metavar="MIB")
@click.option("--cpus", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
              help="auto: KVM where a probe boot proves it works, else TCG.")
@click.option("--timeout", type=click.FloatRange(min=1), default=300.0, show_default=True, metavar="S",
              help="Seconds from launch to the guest command's exit.")
@click.option("--keep", is_flag=True, help="Keep the session afterwards (dirge session rm removes it).")
@click.option("--virtiofsd", metavar="PATH", help="--disk dir: share over virtio-fs with this virtiofsd instead of 9p.")
@click.option("--kernel-log", is_flag=True, help="Show the kernel's console messages too.")
@click.option("--user", "-u", help="Run as this user instead of the image's (name, uid, uid:gid, user:group).")
@click.option("--env", "-e", "env", multiple=True, metavar="KEY=VALUE", help="Add to the image's environment.")
@pull_option
@cache_dir_option
@click.option("--artifacts", "artifacts", multiple=True, metavar="REGISTRY/REPO",
              help="Fetch a cold erofs/ext4 base as a prepared artifact from this repository (repeatable; "
                   "default: the config's [fleet] artifacts; docs/FLEET.md).")
def boot_cmd(image: str, command: tuple[str, ...], disk: str, kernel: Path | None, initrd: Path | None,
             memory: int, cpus: int, accel: str, timeout: float, keep: bool, virtiofsd: str | None,
             kernel_log: bool, user: str | None, env: tuple[str, ...], pull: str, cache_dir: Path | None,
             artifacts: tuple[str, ...]) -> int:
    """Boot IMAGE in a QEMU microVM and run its command (or CMD); exit with the command's status.

    Exit status: the guest command's; 124 when the guest does not finish within --timeout; 125 when
    it fails to boot; 1 when no kernel, QEMU or busybox is found."""
    from .errors import GuestFailed
    from .vm import boot
    from .vm.boot import BOOT_FAILED, BOOT_TIMED_OUT

    debug = bool(click.get_current_context().find_root().obj.get("debug"))
    try:
        result = boot(image, cache_dir, disk=disk, command=list(command) or None, kernel=kernel, initrd=initrd,
                      memory=memory, cpus=cpus, accel=accel, timeout=timeout, keep=keep,
                      console=click.echo, virtiofsd=virtiofsd, pull=pull, kernel_log=kernel_log, user=user,
                      env=_key_values(env, "--env"), artifacts=artifacts or None)
    except GuestFailed as exc:
        if debug and exc.console_tail:
            click.echo(exc.console_tail, err=True)
        click.echo(f"dirge: error: {exc}", err=True)
        return BOOT_TIMED_OUT if exc.timed_out else BOOT_FAILED
    if keep:
        click.echo(f"dirge: kept session {result.session}", err=True)
    return result.status


@cli.command("build")
@click.argument("name")
@click.option("--build-arg", "build_args", multiple=True, metavar="KEY=VALUE", help="Passed to the Dockerfile.")
@click.option("--no-cache", is_flag=True, help="Rebuild even if current, without buildah's layer cache; pulls the FROM images again "
              "(their registry must be reachable).")
@cache_dir_option
def build_cmd(name: str, build_args: tuple[str, ...], no_cache: bool, cache_dir: Path | None) -> None:
    """Build local variant NAME (images/NAME/Dockerfile) with buildah unless it is current."""
    from .store.cache import Cache
    from .variants import build_guest_image

    quiet = bool(click.get_current_context().find_root().obj.get("quiet"))
    result = build_guest_image(name, cache_root=Cache(cache_dir).root, build_args=_key_values(build_args, "--build-arg"),
                               no_cache=no_cache, output=None if quiet else sys.stderr)
    state = "built" if result.built else "current, not rebuilt"
    click.echo(f"{result.variant.tag} {result.image.id[:12]} ({state})")


@cli.command("variants")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True)
def variants_cmd(cache_dir: Path | None, as_json: bool) -> None:
    """List local variants: where each comes from and whether its image is built and current.

    Status is current, stale (inputs changed since the build), not built, or unknown (no buildah)."""
    from .store.cache import Cache
    from .variants import list_variants, variant_bases, variant_status

    root = Cache(cache_dir).root
    items = [{"name": v.name, "origin": v.origin, "path": str(v.path), "status": variant_status(v, root),
              "from": variant_bases(v)} for v in list_variants()]
    if as_json:
        click.echo(json.dumps(items, indent=2))
    for item in [] if as_json else items:
        click.echo(f"{item['name']:12} {item['status']:10} {item['origin']}  {item['path']}")


@cli.command("export")
@click.argument("image")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["erofs", "ext4", "tar", "dir"]), default="erofs",
              show_default=True, help="erofs: a read-only root disk image; ext4: a writable root disk image; "
                                      "tar: a flattened tar; dir: a directory tree.")
@click.option("--size", default="auto", show_default=True, metavar="SIZE|auto",
              help="ext4: the disk's size (bytes, or with K, M, G, T), auto = the content plus headroom.")
@click.option("--no-journal", is_flag=True, help="ext4: no jbd2 journal.")
@click.option("--inodes", type=click.IntRange(min=1), help="ext4: the inode count (default: the entries plus headroom).")
@click.option("--platform", help="os/arch[/variant] to pick from a multi-platform image.")
@pull_option
@creds_option
@cache_dir_option
@click.option("--limit", "limits", multiple=True, metavar="NAME=N", help="Override a safety limit (see unpack).")
@click.option("--artifacts", "artifacts", multiple=True, metavar="REGISTRY/REPO",
              help="erofs/ext4: fetch the image file as a prepared artifact from this repository when not cached "
                   "(repeatable; default: the config's [fleet] artifacts; docs/FLEET.md).")
@click.option("--json", "as_json", is_flag=True, help="Print path, format, size, digest and sha256 as JSON.")
def export_cmd(image: str, out: Path, fmt: str, size: str, no_journal: bool, inodes: int | None,
               platform: str | None, pull: str,
               creds: str | None, cache_dir: Path | None, limits: tuple[str, ...], artifacts: tuple[str, ...],
               as_json: bool) -> None:
    """Write IMAGE as one artifact OUT: an erofs or ext4 disk image, a flattened tar or a directory."""
    from .store.cache import Cache
    from .export import export
    from .oci.reference import canonicalize_image_ref

    with _progress() as progress:
        result = export(canonicalize_image_ref(image), out, format=fmt,
                        platform=parse_platform(platform) if platform else None, cache=Cache(cache_dir),
                        pull=pull, creds=_creds(creds), limits=_limits(limits),
                        progress=progress.apply if progress else None,
                        disk=DiskOptions(_size(size), not no_journal, inodes), artifacts=artifacts or None)
    if as_json:
        click.echo(json.dumps({"path": str(result.path), "format": result.format, "size": result.size,
                               "digest": result.digest, "sha256": result.sha256,
                               "from_cache": result.from_cache, "base_source": result.base_source}, indent=2))
    else:
        click.echo(f"{result.path}: {result.format}, {result.size} bytes, image {result.digest}")


@cli.command("verify-artifact")
@click.argument("image")
@click.argument("ref", metavar="REF")
@click.option("--platform", help="os/arch[/variant] to pick from a multi-platform image.")
@pull_option
@creds_option
@cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def verify_artifact_cmd(image: str, ref: str, platform: str | None, pull: str, creds: str | None,
                        cache_dir: Path | None, as_json: bool) -> int:
    """Rebuild IMAGE from its layers and compare it with the prepared-base artifact REF
    (REGISTRY/REPO@sha256:...); exit 1 on any difference (docs/FLEET.md)."""
    from .fleet import verify_artifact
    from .oci.reference import canonicalize_image_ref
    from .store.cache import Cache

    check = verify_artifact(canonicalize_image_ref(image), ref, platform=parse_platform(platform) if platform else None,
                            cache=Cache(cache_dir), pull=pull, creds=_creds(creds))
    if as_json:
        click.echo(json.dumps({**dataclasses.asdict(check), "ok": check.ok}, indent=2))
    elif check.ok:
        click.echo(f"{ref}: {check.format} {check.expected_sha256} is {image} ({check.image_digest}), rebuilt "
                   "from its layers")
    else:
        for problem in check.problems:
            click.echo(f"dirge: artifact {ref} differs: {problem}", err=True)
    return 0 if check.ok else 1


@cli.command("inspect")
@click.argument("image")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.option("--raw", is_flag=True, help="Print the manifest (or index) bytes exactly as fetched.")
@click.option("--config", "config", is_flag=True, help="Print the config bytes exactly as fetched.")
@click.option("--platform", help="os/arch[/variant] to pick from a multi-platform image (default: the host's).")
@click.option("--pull", type=click.Choice(["always", "missing", "never"]), default="always", show_default=True,
              help="Registry images: always ask the registry, or (never) read the cache only.")
@creds_option
@cache_dir_option
def inspect_cmd(image: str, as_json: bool, raw: bool, config: bool, platform: str | None, pull: str,
                creds: str | None, cache_dir: Path | None) -> None:
    """Show IMAGE's digest, media type, platforms, layers and config without unpacking anything."""
    from .store.cache import Cache
    from .inspect import inspect_image
    from .oci.reference import canonicalize_image_ref

    if sum((as_json, raw, config)) > 1:
        raise click.UsageError("choose one of --json, --raw and --config")
    result = inspect_image(canonicalize_image_ref(image), cache=None if image.startswith("oci:") else Cache(cache_dir),
                           pull=pull, platform=parse_platform(platform) if platform else None, creds=_creds(creds))
    if raw or config:
        sys.stdout.flush()
        sys.stdout.buffer.write(result.raw if raw else result.config_raw)  # as fetched: they hash to the digest
        sys.stdout.buffer.flush()
        return
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=2))
        return
    click.echo(f"image:        {result.image}\ndigest:       {result.digest}\nmedia type:   {result.media_type}")
    if result.platforms:
        click.echo(f"platforms:    {', '.join(result.platforms)}")
        click.echo(f"manifest:     {result.manifest_digest} ({result.manifest_media_type})")
    click.echo(f"platform:     {result.platform or '-'}\nconfig:       {result.config_digest}\n"
               f"created:      {result.created or '-'}")
    for label, value in (("entrypoint", result.entrypoint), ("cmd", result.cmd)):
        click.echo(f"{label + ':':13} {json.dumps(value) if value is not None else '-'}")
    click.echo(f"workdir:      {result.working_dir or '-'}\nuser:         {result.user or '-'}")
    click.echo(f"ports:        {' '.join(result.exposed_ports) or '-'}")
    for title, lines in (("env", result.env), ("labels", [f"{k}={v}" for k, v in sorted(result.labels.items())])):
        click.echo(f"{title}:" + "".join(f"\n  {line}" for line in lines))
    click.echo(f"layers ({len(result.layers)}):")
    for layer in result.layers:
        click.echo(f"  {layer.digest}  {layer.size:>12}  {layer.media_type}")
    click.echo(f"history ({len(result.history)}):")
    for step in result.history:
        by = str(step.get("created_by") or step.get("comment") or "")
        click.echo(f"  {step.get('created') or '-'}  {by}" + ("  (empty layer)" if step.get("empty_layer") else ""))


def _when(ts: float | None) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"


@cli.command("images")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True)
def images_cmd(cache_dir: Path | None, as_json: bool) -> None:
    """List cached images: refs, digest, platform, base formats, bytes on disk, created, last used, sessions."""
    from .store.cache import Cache
    from .gc import images

    items = images(Cache(cache_dir))
    if as_json:
        click.echo(json.dumps([{k: v for k, v in dataclasses.asdict(i).items() if k != "ref_files"}
                               for i in items], indent=2))
        return
    for i in items:
        click.echo(f"{i.digest[7:19]}  {','.join(i.formats) or '-':10} {_human(i.bytes):>7} "
                   f"(+{_human(i.shared_bytes)} shared)  {i.platform or '-':12} created {_when(i.created)}  "
                   f"used {_when(i.last_used)}  {len(i.live_sessions)} live  {' '.join(i.refs) or '<none>'}")


@cli.command("rmi")
@click.argument("images", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Remove the live sessions using them first.")
@cache_dir_option
def rmi_cmd(images: tuple[str, ...], force: bool, cache_dir: Path | None) -> None:
    """Remove cached IMAGES (a ref or a digest prefix): ref records, bases, disks, local variants' exports.
    Blobs are left to gc."""
    from .store.cache import Cache
    from .gc import rmi

    report = rmi(Cache(cache_dir), list(images), force=force)
    for sid in report.sessions:
        click.echo(f"removed session {sid}")
    for digest in report.images:
        click.echo(f"removed {digest}")


@cli.command("gc")
@click.option("--max-size", metavar="SIZE", help="Evict least-recently-used bases, disks and exports (then images that are only "
              "ref records and blobs) until the cache is this big.")
@click.option("--keep", metavar="DURATION", help="Never evict a base used within this long (e.g. 12h, 7d).")
@click.option("--dry-run", is_flag=True, help="Remove nothing; report what gc would remove.")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True)
def gc_cmd(max_size: str | None, keep: str | None, dry_run: bool, cache_dir: Path | None, as_json: bool) -> None:
    """Remove dead sessions, leftovers of killed processes, unreferenced blobs, then LRU bases over budget."""
    from .store.cache import Cache
    from .config import parse_duration, parse_size
    from .gc import collect

    try:
        budget = parse_size(max_size) if max_size else None
        keep_s = parse_duration(keep) if keep else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    report = collect(Cache(cache_dir), max_size=budget, keep=keep_s, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    for r in report.removed:
        click.echo(f"{verb} {r.kind} {r.name} ({_human(r.bytes)})")
    freed = ", ".join(f"{kind} {_human(n)}" for kind, n in report.freed().items()) or "nothing"
    click.echo(f"{'would free' if dry_run else 'freed'}: {freed}; cache {_human(report.size_before)} -> "
               f"{_human(report.size_after)}")


@cli.group("cache")
def cache_group() -> None:
    """Check the cache's integrity."""


@cache_group.command("verify")
@click.option("--repair", is_flag=True, help="Remove corrupt blobs and bases so the next prepare rebuilds them.")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def cache_verify(ctx: click.Context, repair: bool, cache_dir: Path | None, as_json: bool) -> int:
    """Rehash every blob and check every base against its record; exit 1 if anything is corrupt or missing."""
    from .store.cache import Cache
    from .verify import verify_cache

    report = verify_cache(Cache(cache_dir), repair=repair)
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        for p in report.problems:
            click.echo(f"{p.what}: {p.kind} {p.name} {p.detail}".rstrip())
        for name in report.repaired:
            click.echo(f"repaired: removed {name}")
        click.echo(f"{report.blobs} blobs, {report.bases} bases: "
                   f"{'ok' if report.ok else f'{len(report.problems)} problem(s)'}")
    return 0 if report.ok else 1


def _sessions(cache_dir: Path | None) -> "Sessions":
    from .store.cache import Cache
    from .session import Sessions

    return Sessions(Cache(cache_dir))


def _session_json(info: "SessionInfo", sessions: "Sessions") -> dict[str, Any]:
    # A disk session has no rootfs directory: its "path" is null, its "disk" the VM's root disk.
    path = None if info.disk else str(sessions.rootfs(info.id))
    return {**dataclasses.asdict(info), "path": path, "alive": info.alive()}


@cli.group("session")
def session_group() -> None:
    """Create, list, remove and snapshot session rootfs."""


# One click option per PrepareOptions field, each named as its field: ``_prepare_options`` reads every
# field from the command's parameters, so a field without its option fails loudly, never silently.
_PREPARE_OPTIONS = {
    "strategy": click.option("--strategy", type=click.Choice(list(STRATEGIES)),
                             help="How to make the session (default: the fastest available)."),
    "base_format": click.option("--base-format", type=click.Choice(FORMAT_CHOICES), envvar=FORMAT_ENV,
                                help=f"What the cached base is built as (default: ${FORMAT_ENV}, else auto)."),
    "platform": click.option("--platform", help="os/arch[/variant] to pick from a multi-platform image."),
    "rootless": click.option("--rootless", is_flag=True,
                             help="Build the base as an unprivileged user would (automatic when not root)."),
    "limits": click.option("--limit", "limits", multiple=True, metavar="NAME=N",
                           help="Override a safety limit (see unpack)."),
    "lock_timeout": click.option("--lock-timeout", type=click.FloatRange(min=0), default=600.0, show_default=True,
                                 metavar="S", help="Seconds to wait for a base another process is building."),
    "pull": pull_option,
    "creds": creds_option,
    "disk": click.option("--disk", type=click.Choice(["ext4", "erofs"]),
                         help="A disk session for a block-device VM: its own ext4 disk, or the shared erofs image "
                              "plus its own scratch ext4 (no mount, no root)."),
    "disk_format": click.option("--disk-format", type=click.Choice(["raw", "qcow2"]), default="raw",
                                show_default=True,
                                help="--disk ext4: a raw copy (reflink where possible) or a qcow2 overlay on the "
                                     "base disk."),
    "disk_size": click.option("--disk-size", default="auto", show_default=True, metavar="SIZE|auto",
                              help="--disk ext4: the base disk's size (e.g. 2G); --disk erofs: the scratch disk's "
                                   "(256M)."),
    "disk_journal": click.option("--disk-journal/--no-disk-journal", default=True, show_default=True,
                                 help="--disk ext4: whether the base disk has a jbd2 journal."),
    "disk_inodes": click.option("--disk-inodes", type=click.IntRange(min=1),
                                help="--disk ext4: the base disk's inode count (default: the entries plus headroom)."),
    "artifacts": click.option("--artifacts", "artifacts", multiple=True, metavar="REGISTRY/REPO",
                              help="Fetch a cold erofs/ext4 base as a prepared artifact from this repository "
                                   "(repeatable; default: the config's [fleet] artifacts; docs/FLEET.md)."),
}
# How a field's command-line value becomes the option's value (the others are taken as they are).
_PREPARE_CONVERT: dict[str, Any] = {
    "platform": lambda v: parse_platform(v) if v else None,
    "rootless": lambda v: True if v else None,
    "limits": lambda v: _limits(v),
    "creds": lambda v: _creds(v),
    "disk_size": lambda v: _size(v),
    "artifacts": lambda v: tuple(v) if v else None,
}


def prepare_options(command: Any) -> Any:
    """The decorator that gives ``command`` every PrepareOptions field as an option."""
    for name in reversed(FIELDS):
        command = _PREPARE_OPTIONS[name](command)
    return command


def _prepare_options(params: dict[str, Any]) -> PrepareOptions:
    """The PrepareOptions of a command decorated with ``prepare_options``: its fields taken out of ``params``."""
    return PrepareOptions(**{name: _PREPARE_CONVERT.get(name, lambda v: v)(params.pop(name)) for name in FIELDS})


@session_group.command("create")
@click.argument("image")
@cache_dir_option
@click.option("--owner-pid", type=int, help="Process whose exit makes the session prunable (default: the caller).")
@prepare_options
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of the path.")
def session_create(image: str, cache_dir: Path | None, owner_pid: int | None, as_json: bool, **params: Any) -> None:
    """Make a new session rootfs of IMAGE and print its path (a disk session: its disk's)."""
    from .rootfs import prepare_with

    options = _prepare_options(params)
    if options.disk is None and (options.disk_format != "raw" or options.disk_size is not None
                                 or not options.disk_journal or options.disk_inodes is not None):
        raise click.UsageError("--disk-format, --disk-size, --no-disk-journal and --disk-inodes need --disk")
    prepared = prepare_with(image, options, cache_dir, owner_pid=owner_pid or os.getppid())
    prepared.detach()
    if as_json:
        click.echo(json.dumps({**_prepared_json(prepared), "base_created": prepared.base_created,
                               "base_format": prepared.base_format, "base_source": prepared.base_source},
                              indent=2))
    else:
        click.echo(prepared.disk if prepared.is_disk else prepared.path)


def _prepared_json(prepared: Any) -> dict[str, Any]:  # a rootfs.PreparedRootfs (imported lazily)
    # session.json's fields (disk, disk_strategy, scratch included); "path" null for a disk session
    return {**dataclasses.asdict(prepared.info), "path": None if prepared.is_disk else str(prepared.path)}


@session_group.command("ls")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True)
def session_ls(cache_dir: Path | None, as_json: bool) -> None:
    """List sessions, with whether their creating process is still alive."""
    sessions = _sessions(cache_dir)
    items = [_session_json(s, sessions) for s in sessions.list()]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    for item in items:
        click.echo(f"{item['id']}  {item['strategy']:8} {'alive' if item['alive'] else 'dead ':5}  "
                   f"{item['image']}  {item['path']}")


@session_group.command("rm")
@click.argument("session_id", required=False)
@click.option("--all", "remove_all", is_flag=True, help="Remove every session.")
@cache_dir_option
def session_rm(session_id: str | None, remove_all: bool, cache_dir: Path | None) -> None:
    """Remove a session (unmounting it first), or all with --all."""
    sessions = _sessions(cache_dir)
    if bool(session_id) == remove_all:
        raise click.UsageError("give a session ID or --all")
    for sid in [s.id for s in sessions.list()] if remove_all else [session_id or ""]:
        sessions.get(sid)
        sessions.remove(sid)


@session_group.command("prune")
@cache_dir_option
def session_prune(cache_dir: Path | None) -> None:
    """Remove sessions whose creating process has exited."""
    for sid in _sessions(cache_dir).prune():
        click.echo(f"removed {sid}")


@session_group.group("snapshot")
def snapshot_group() -> None:
    """Save a session's state under a name and start new sessions from it."""


@snapshot_group.command("save")
@click.argument("session_id")
@click.argument("name")
@cache_dir_option
def snapshot_save(session_id: str, name: str, cache_dir: Path | None) -> None:
    click.echo(_sessions(cache_dir).snapshot_save(session_id, name))


@snapshot_group.command("list")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True)
def snapshot_list(cache_dir: Path | None, as_json: bool) -> None:
    items = _sessions(cache_dir).snapshot_list()
    if as_json:
        click.echo(json.dumps(items, indent=2))
    for item in [] if as_json else items:
        click.echo(f"{item['name']}  {item['kind']:5}  {item['image']}  from session {item['session']}")


@snapshot_group.command("restore")
@click.argument("name")
@cache_dir_option
@click.option("--owner-pid", type=int)
@click.option("--json", "as_json", is_flag=True)
def snapshot_restore(name: str, cache_dir: Path | None, owner_pid: int | None, as_json: bool) -> None:
    """Make a new session from the snapshot's base plus the snapshot (the base stays pristine)."""
    from .rootfs import restore

    prepared = restore(name, cache_dir, owner_pid=owner_pid or os.getppid())
    prepared.detach()
    click.echo(json.dumps(_prepared_json(prepared), indent=2)
               if as_json else (prepared.disk if prepared.is_disk else prepared.path))


@snapshot_group.command("delete")
@click.argument("name")
@cache_dir_option
def snapshot_delete(name: str, cache_dir: Path | None) -> None:
    _sessions(cache_dir).snapshot_delete(name)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        status = cli.main(args=args, prog_name="dirge", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("dirge: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except DirgeError as exc:
        if debug:
            traceback.print_exc()
        # The kind says whose failure it is: the image's, an output format's, the host's.
        click.echo(f"dirge: error: {exc.kind + ': ' if exc.kind else ''}{exc}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("dirge: interrupted", err=True)
        return 130
    except OSError as exc:  # not wrapped with context on its way up: still say what and where
        if debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"dirge: error: {where}{exc.strerror or exc}; check permissions and free space "
                   "(rerun with --debug for a traceback)", err=True)
        return 1
    except Exception as exc:  # a bug: still one line, with the way to see more
        if debug:
            traceback.print_exc()
        click.echo(f"dirge: internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)",
                   err=True)
        return 70
    return status if isinstance(status, int) else 0  # a command's own exit status (boot)


if __name__ == "__main__":
    sys.exit(main())
