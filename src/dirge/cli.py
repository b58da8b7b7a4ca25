"""The ``dirge`` command: arguments in, one clear line out on failure (a traceback only with --debug)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .apply.layer import Limits
from .bases import FORMAT_ENV
from .errors import DirgeError
from .oci.image import Platform, parse_platform
from .options import (FIELDS, BaseFormat, BootDisk, DiskFormat, DiskKind, DiskOptions, ExportFormat, PrepareOptions,
                      PullPolicy, Strategy, choices)

if TYPE_CHECKING:
    from .oci.image import Platform
    from .session import Sessions, SessionInfo
    from .sources.auth import Credentials, RegistryOptions


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


if TYPE_CHECKING:
    _PlatformBase = click.ParamType[Platform]
else:  # click before 8.2 has no generic ParamType
    _PlatformBase = click.ParamType


class _Platform(_PlatformBase):
    """``os/arch[/variant]``, parsed when the command line is: a bad one is a usage error naming the option."""

    name = "os/arch[/variant]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Platform:
        if isinstance(value, Platform):
            return value
        try:
            return parse_platform(str(value))
        except DirgeError:
            self.fail(f"{value!r}: a platform is os/arch[/variant], e.g. linux/arm64", param, ctx)


PLATFORM = _Platform()


def _state(ctx: click.Context) -> dict[str, Any]:
    """The options every command shares (--debug, --quiet, --cache-dir), kept in the root context's obj:
    set before the subcommand by the group, after it by the command itself (the later one wins)."""
    obj: dict[str, Any] = ctx.find_root().ensure_object(dict)
    return obj


def _set_flag(name: str) -> Any:
    def callback(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value:
            _state(ctx)[name] = True
    return callback


def _cache_dir_value(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    # A command's own --cache-dir wins over the group's (which also reads $DIRGE_CACHE_DIR).
    if value is not None:
        _state(ctx)["cache_dir"] = value
    cache_dir: Path | None = _state(ctx).get("cache_dir")
    return cache_dir


CACHE_DIR_HELP = "Cache directory (default $DIRGE_CACHE_DIR, else $XDG_CACHE_HOME/dirge or ~/.cache/dirge)."


def _share_options(group: click.Group) -> None:
    """Give every command and group below ``group`` the shared options it lacks (--debug, -q/--quiet,
    --cache-dir), so they work after the subcommand as well as before it. demo keeps its cache in --dir."""
    for command in group.commands.values():
        names = {name for param in command.params for name in param.opts}
        if "--debug" not in names:
            command.params.append(click.Option(["--debug"], is_flag=True, expose_value=False,
                                               callback=_set_flag("debug"), help="Show tracebacks on errors."))
        if "--quiet" not in names:
            command.params.append(click.Option(["--quiet", "-q"], is_flag=True, expose_value=False,
                                               callback=_set_flag("quiet"),
                                               help="No progress display; listings print names only."))
        if "--cache-dir" not in names and command.name != "demo":
            command.params.append(click.Option(["--cache-dir"], type=click.Path(path_type=Path), expose_value=False,
                                               callback=_cache_dir_value, help=CACHE_DIR_HELP))
        if isinstance(command, click.Group):
            _share_options(command)


class _Group(click.Group):
    """A group whose commands may have aliases (``list`` for ``ls``), shown once in help, by their name."""

    aliases: dict[str, str] = {"list": "ls"}

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, self.aliases.get(cmd_name, cmd_name))

    def resolve_command(self, ctx: click.Context,
                        args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        _, command, rest = super().resolve_command(ctx, args)
        return (command.name if command else None), command, rest


CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(package_name="dirge", prog_name="dirge", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, envvar="DIRGE_DEBUG", help="Show tracebacks on errors (also $DIRGE_DEBUG=1).")
@click.option("--quiet", "-q", is_flag=True, help="No progress display (--progress quiet); listings print names only.")
@click.option("--progress", "progress_mode", type=click.Choice(["auto", "tty", "plain", "quiet"]), default="auto",
              envvar="DIRGE_PROGRESS", show_default=True,
              help="Progress on stderr: tty = a live display, plain = periodic lines, auto = tty on a terminal "
                   "else plain ($DIRGE_PROGRESS).")
@click.option("--cache-dir", type=click.Path(path_type=Path), envvar="DIRGE_CACHE_DIR", help=CACHE_DIR_HELP)
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool, progress_mode: str, cache_dir: Path | None) -> None:
    """Turn OCI container images into root filesystems for microVM sandboxes."""
    state = _state(ctx)
    state.update(debug=debug or bool(state.get("debug")), quiet=quiet, progress=progress_mode, cache_dir=cache_dir)


def _progress() -> Any:
    """The progress display (a context manager, itself the ``dirge.events.ProgressFn``), or a
    do-nothing context giving None (quiet)."""
    from contextlib import nullcontext

    state = _state(click.get_current_context())
    if state.get("quiet"):
        return nullcontext(None)  # without loading the display (rich): -q is what scripts pass
    from .progress import open_display

    display = open_display(str(state.get("progress", "auto")))
    return display if display is not None else nullcontext(None)


def _creds(value: str | None) -> "Credentials | None":
    from .sources.auth import Credentials

    return Credentials.parse(value) if value else None


pull_option = click.option("--pull", type=click.Choice(choices(PullPolicy)), default="missing",
                           show_default=True, help="Registry images: when to ask the registry.")
cache_dir_option = click.option("--cache-dir", type=click.Path(path_type=Path), callback=_cache_dir_value,
                                help=CACHE_DIR_HELP)
creds_option = click.option("--creds", metavar="USER:PASSWORD",
                            help="Registry credentials (default: docker/podman auth files and helpers).")

# What every command that may pull takes (skopeo's names), as the command's keywords: ``platform`` (a
# Platform or None), ``creds`` (Credentials or None) and ``registry_options`` (RegistryOptions or None).
_REGISTRY_OPTIONS = (
    click.option("--platform", type=PLATFORM,
                 help="os/arch[/variant] to pick from a multi-platform image (default: the host's)."),
    creds_option,
    click.option("--authfile", type=click.Path(path_type=Path), metavar="PATH",
                 help="The auth.json to read credentials from, alone (default: $REGISTRY_AUTH_FILE, else "
                      "podman's and docker's files; see docs/CONFIG.md)."),
    click.option("--cert-dir", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
                 help="CA *.crt and client *.cert/*.key files for the registry, instead of certs.d/HOST:PORT."),
    click.option("--tls-verify/--no-tls-verify", default=None,
                 help="Require verified HTTPS (even to loopback), or allow any certificate and plain HTTP "
                      "(default: registries.conf's insecure, and plain HTTP to loopback registries)."),
)


def registry_params(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` (a command's, as click parsed them) with the registry options' raw values replaced by
    ``platform``, ``creds`` and ``registry_options``."""
    from .sources.auth import RegistryOptions

    platform, creds = params.pop("platform"), params.pop("creds")
    given = (params.pop("authfile"), params.pop("cert_dir"), params.pop("tls_verify"))
    return {**params, "platform": platform, "creds": _creds(creds),
            "registry_options": RegistryOptions(*given) if given != (None, None, None) else None}


def registry_options(command: Any) -> Any:
    """The decorator for every command that may pull: --platform, --creds, --authfile, --cert-dir,
    --tls-verify/--no-tls-verify, handed to ``command`` parsed (``registry_params``)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return command(*args, **registry_params(kwargs))

    for option in reversed(_REGISTRY_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


@cli.command("pull")
@click.argument("image")
@registry_options
@click.option("--pull", "policy", type=click.Choice(choices(PullPolicy)), default="always",
              show_default=True)
@cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def pull_cmd(image: str, platform: Platform | None, policy: PullPolicy, creds: "Credentials | None",
             registry_options: "RegistryOptions | None", cache_dir: Path | None, as_json: bool) -> None:
    """Download IMAGE's manifest, config and layers into the cache; print the manifest digest."""
    from .store.cache import Cache
    from .sources.open import pull_image
    from .variants import build_variant

    with _progress() as progress:
        resolved = pull_image(image, platform, cache=Cache(cache_dir), pull=policy, creds=creds,
                              registry_options=registry_options, progress=progress, build=build_variant)
    if as_json:
        click.echo(json.dumps({"image": image, "digest": str(resolved.manifest_digest),
                               "platform": str(resolved.platform) if resolved.platform else None,
                               "layers": [str(d.digest) for d in resolved.manifest.layers]}, indent=2))
    else:
        click.echo(str(resolved.manifest_digest))


@cli.command("unpack")
@click.argument("image")
@click.argument("dest", type=click.Path(path_type=Path))
@registry_options
@pull_option
@cache_dir_option
@click.option("--rootless", is_flag=True, help="Unpack as an unprivileged user would (automatic when not root).")
@click.option("--limit", "limits", multiple=True, metavar="NAME=N",
              help="Override a safety limit: " + ", ".join(f.name for f in dataclasses.fields(Limits)) +
                   " (max_layer_bytes: decompressed bytes of one layer).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def unpack_cmd(image: str, dest: Path, platform: Platform | None, pull: PullPolicy, creds: "Credentials | None",
               registry_options: "RegistryOptions | None", cache_dir: Path | None, rootless: bool,
               limits: tuple[str, ...], as_json: bool) -> None:
    """Write the flattened rootfs of IMAGE (oci:PATH[:TAG] or a registry ref) into DEST (absent or empty)."""
    from .flatten import unpack
    from .oci.reference import canonicalize_image_ref, parse_reference
    from .store.cache import Cache

    # the arguments first: a bad --limit or reference makes no cache directory
    parsed_limits = _limits(limits)
    parse_reference(canonicalize_image_ref(image))
    cache = None if image.startswith("oci:") else Cache(cache_dir)
    with _progress() as progress:
        result = unpack(image, dest, platform=platform,
                        rootless=True if rootless else None, limits=parsed_limits, cache=cache, pull=pull,
                        creds=creds, registry_options=registry_options, progress=progress)
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
@click.option("--disk", type=click.Choice(choices(BootDisk)), default="dir", show_default=True,
              help="What the microVM boots from (see dirge boot).")
def demo_cmd(workdir: Path, boot: bool | None, disk: BootDisk) -> None:
    """Build a tiny busybox image offline, unpack it, and run a shell inside it."""
    from .demo import run_demo

    with _progress() as progress:
        _, output, how = run_demo(workdir, boot=boot, disk=disk, console=click.echo, progress=progress)
    if how != "boot":
        click.echo(output, nl=False)


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
@click.option("--disk", type=click.Choice(choices(BootDisk)), default="dir", show_default=True,
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
@registry_options
@pull_option
@cache_dir_option
@click.option("--artifacts", "artifacts", multiple=True, metavar="REGISTRY/REPO",
              help="Fetch a cold erofs/ext4 base as a prepared artifact from this repository (repeatable; "
                   "default: the config's [fleet] artifacts; docs/FLEET.md).")
def boot_cmd(image: str, command: tuple[str, ...], disk: BootDisk, kernel: Path | None, initrd: Path | None,
             memory: int, cpus: int, accel: str, timeout: float, keep: bool, virtiofsd: str | None,
             kernel_log: bool, user: str | None, env: tuple[str, ...], platform: Platform | None,
             creds: "Credentials | None", registry_options: "RegistryOptions | None", pull: PullPolicy,
             cache_dir: Path | None, artifacts: tuple[str, ...]) -> int:
    """Boot IMAGE in a QEMU microVM and run its command (or CMD); exit with the command's status.

    Exit status: the guest command's; 124 when the guest does not finish within --timeout; 125 when
    it fails to boot; 1 when no kernel, QEMU or busybox is found."""
    from .errors import GuestFailed
    from .vm import boot
    from .vm.boot import BOOT_FAILED, BOOT_TIMED_OUT

    debug = bool(_state(click.get_current_context()).get("debug"))
    try:
        with _progress() as progress:
            result = boot(image, cache_dir, disk=disk, command=list(command) or None, kernel=kernel, initrd=initrd,
                          memory=memory, cpus=cpus, accel=accel, timeout=timeout, keep=keep,
                          console=click.echo, virtiofsd=virtiofsd, pull=pull, kernel_log=kernel_log, user=user,
                          env=_key_values(env, "--env"), platform=platform, creds=creds,
                          registry_options=registry_options, progress=progress,
                          artifacts=artifacts or None)
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
@click.option("--json", "as_json", is_flag=True, help="Print the variant, image and whether it was built as JSON.")
def build_cmd(name: str, build_args: tuple[str, ...], no_cache: bool, cache_dir: Path | None, as_json: bool) -> None:
    """Build local variant NAME (images/NAME/Dockerfile) with buildah unless it is current."""
    from .store.cache import Cache
    from .variants import build_guest_image

    from contextlib import nullcontext

    from .progress import line_events

    with _progress() as progress:
        # buildah's output becomes Build events: plain lines on a pipe, one folded line on a terminal
        with line_events(progress) if progress is not None else nullcontext(None) as output:
            result = build_guest_image(name, cache_root=Cache(cache_dir).root,
                                       build_args=_key_values(build_args, "--build-arg"), no_cache=no_cache,
                                       output=output)
    if as_json:
        click.echo(json.dumps({"name": result.variant.name, "tag": result.variant.tag, "id": result.image.id,
                               "built": result.built, "path": str(result.variant.path)}, indent=2))
        return
    state = "built" if result.built else "current, not rebuilt"
    click.echo(f"{result.variant.tag} {result.image.id[:12]} ({state})")


@cli.command("variants")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
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
    elif _quiet():
        click.echo("".join(f"{item['name']}\n" for item in items), nl=False)
    else:
        _table(("NAME", "STATUS", "ORIGIN", "PATH"),
               [(str(item["name"]), str(item["status"]), str(item["origin"]), str(item["path"])) for item in items])


@cli.command("export")
@click.argument("image")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(choices(ExportFormat)), default="erofs",
              show_default=True, help="erofs: a read-only root disk image; ext4: a writable root disk image; "
                                      "tar: a flattened tar; dir: a directory tree.")
@click.option("--size", default="auto", show_default=True, metavar="SIZE|auto",
              help="ext4: the disk's size (bytes, or with K, M, G, T), auto = the content plus headroom.")
@click.option("--no-journal", is_flag=True, help="ext4: no jbd2 journal.")
@click.option("--inodes", type=click.IntRange(min=1), help="ext4: the inode count (default: the entries plus headroom).")
@registry_options
@pull_option
@cache_dir_option
@click.option("--limit", "limits", multiple=True, metavar="NAME=N", help="Override a safety limit (see unpack).")
@click.option("--artifacts", "artifacts", multiple=True, metavar="REGISTRY/REPO",
              help="erofs/ext4: fetch the image file as a prepared artifact from this repository when not cached "
                   "(repeatable; default: the config's [fleet] artifacts; docs/FLEET.md).")
@click.option("--json", "as_json", is_flag=True, help="Print path, format, size, digest and sha256 as JSON.")
def export_cmd(image: str, out: Path, fmt: ExportFormat, size: str, no_journal: bool, inodes: int | None,
               platform: Platform | None, creds: "Credentials | None", registry_options: "RegistryOptions | None",
               pull: PullPolicy, cache_dir: Path | None, limits: tuple[str, ...], artifacts: tuple[str, ...],
               as_json: bool) -> None:
    """Write IMAGE as one artifact OUT: an erofs or ext4 disk image, a flattened tar or a directory."""
    from .store.cache import Cache
    from .exporting import export
    from .oci.reference import canonicalize_image_ref

    with _progress() as progress:
        result = export(canonicalize_image_ref(image), out, format=fmt,
                        # no --cache-dir: the default cache, made only when needed (a layout's export needs none)
                        platform=platform, cache=Cache(cache_dir) if cache_dir is not None else None,
                        pull=pull, creds=creds, registry_options=registry_options, limits=_limits(limits),
                        progress=progress,
                        disk=DiskOptions(_size(size), not no_journal, inodes), artifacts=artifacts or None)
    if as_json:
        click.echo(json.dumps({"path": str(result.path), "format": result.format, "size": result.size,
                               "digest": result.digest, "sha256": result.sha256,
                               "from_cache": result.from_cache, "base_source": result.base_source}, indent=2))
    else:
        click.echo(f"{result.path}: {result.format}, {result.size} bytes, image {result.digest}")


@cli.command("push")
@click.argument("image")
@click.argument("dest")
@click.option("--format", "fmt", type=click.Choice(choices(DiskKind)), default=None,
              help="The base pushed as an artifact (default erofs); not for a local variant, pushed as its image.")
@click.option("--size", default=None, metavar="SIZE|auto", help="ext4: the disk's size, as for export.")
@click.option("--no-journal", is_flag=True, help="ext4: no jbd2 journal.")
@click.option("--inodes", type=click.IntRange(min=1), help="ext4: the inode count.")
@click.option("--platform", type=PLATFORM, help="os/arch[/variant] to pick from a multi-platform image.")
@pull_option
@creds_option
@cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print ref, digest, subject, blobs and bytes sent as JSON.")
def push_cmd(image: str, dest: str, fmt: DiskKind | None, size: str | None, no_journal: bool, inodes: int | None,
             platform: Platform | None, pull: PullPolicy, creds: str | None, cache_dir: Path | None, as_json: bool) -> None:
    """Publish IMAGE's converted base to DEST (REGISTRY/REPO[:TAG]) as an OCI artifact; a local variant
    NAME is pushed as its OCI image. --creds are DEST's."""
    from .store.cache import Cache
    from .oci.reference import canonicalize_image_ref
    from .publish import push

    with _progress() as progress:
        result = push(canonicalize_image_ref(image), dest, format=fmt,
                      size=_size(size) if size is not None else None, journal=not no_journal, inodes=inodes,
                      platform=platform, cache=Cache(cache_dir), pull=pull,
                      creds=_creds(creds), progress=progress)
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=2))
    else:
        what = f"{result.format} artifact of {result.subject}" if result.kind == "artifact" else "image"
        click.echo(f"{result.ref}: {what}, {result.bytes_sent} blob bytes sent"
                   + (f", referrers {result.referrers}" if result.referrers else ""))


@cli.command("verify-artifact")
@click.argument("image")
@click.argument("ref", metavar="REF")
@click.option("--platform", type=PLATFORM, help="os/arch[/variant] to pick from a multi-platform image.")
@pull_option
@creds_option
@cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def verify_artifact_cmd(image: str, ref: str, platform: Platform | None, pull: PullPolicy, creds: str | None,
                        cache_dir: Path | None, as_json: bool) -> int:
    """Rebuild IMAGE from its layers and compare it with the prepared-base artifact REF
    (REGISTRY/REPO@sha256:...); exit 1 on any difference (docs/FLEET.md)."""
    from .fleet import verify_artifact
    from .oci.reference import canonicalize_image_ref
    from .store.cache import Cache

    check = verify_artifact(canonicalize_image_ref(image), ref, platform=platform,
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
@registry_options
@click.option("--pull", type=click.Choice(choices(PullPolicy)), default="always", show_default=True,
              help="Registry images: always ask the registry, or (never) read the cache only.")
@cache_dir_option
def inspect_cmd(image: str, as_json: bool, raw: bool, config: bool, platform: Platform | None,
                creds: "Credentials | None", registry_options: "RegistryOptions | None", pull: str,
                cache_dir: Path | None) -> None:
    """Show IMAGE's digest, media type, platforms, layers and config without unpacking anything."""
    from .store.cache import Cache
    from .inspect import inspect_image
    from .oci.reference import canonicalize_image_ref

    if sum((as_json, raw, config)) > 1:
        raise click.UsageError("choose one of --json, --raw and --config")
    result = inspect_image(canonicalize_image_ref(image), cache=None if image.startswith("oci:") else Cache(cache_dir),
                           pull=pull, platform=platform, creds=creds, registry_options=registry_options)
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


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> None:
    """Print rows under a header row, columns as wide as their widest cell (``right``: numbers)."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        click.echo("  ".join(cells).rstrip())


def _quiet() -> bool:
    return bool(_state(click.get_current_context()).get("quiet"))


@cli.command("images")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True)
def images_cmd(cache_dir: Path | None, as_json: bool) -> None:
    """List cached images: refs, digest, platform, base formats, bytes on disk, created, last used, sessions.

    -q prints only the refs (an image without one: its digest)."""
    from .store.cache import Cache
    from .lifecycle import images

    items = images(Cache(cache_dir))
    if as_json:
        click.echo(json.dumps([{k: v for k, v in dataclasses.asdict(i).items() if k != "ref_files"}
                               for i in items], indent=2))
        return
    if _quiet():  # what rmi takes: each ref, or the digest of an image no ref names
        for i in items:
            click.echo("\n".join(i.refs) if i.refs else i.digest)
        return
    _table(("DIGEST", "FORMATS", "SIZE", "SHARED", "PLATFORM", "CREATED", "LAST USED", "LIVE", "REFS"),
           [(i.digest[7:19], ",".join(i.formats) or "-", _human(i.bytes), _human(i.shared_bytes), i.platform or "-",
             _when(i.created), _when(i.last_used), str(len(i.live_sessions)), " ".join(i.refs) or "<none>")
            for i in items], right=(2, 3, 7))


@cli.command("rmi")
@click.argument("images", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Remove the live sessions using them first.")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as a JSON object.")
def rmi_cmd(images: tuple[str, ...], force: bool, cache_dir: Path | None, as_json: bool) -> None:
    """Remove cached IMAGES (a ref or a digest prefix): ref records, bases, disks, local variants' exports.
    Blobs are left to gc."""
    from .store.cache import Cache
    from .lifecycle import rmi

    report = rmi(Cache(cache_dir), list(images), force=force)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(report), indent=2))
        return
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
    from .lifecycle import collect

    try:
        budget = parse_size(max_size) if max_size else None
        keep_s = parse_duration(keep) if keep else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    from .events import Step

    with _progress() as progress:
        if progress is not None:
            progress(Step("gc", "collecting (sessions, leftovers, blobs, bases over budget)"))
        report = collect(Cache(cache_dir), max_size=budget, keep=keep_s, dry_run=dry_run)
        if progress is not None:
            progress(Step("gc", f"done: {len(report.removed)} removed"))
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    if report.removed:
        _table(("ACTION", "KIND", "NAME", "SIZE"),
               [(verb, r.kind, r.name, _human(r.bytes)) for r in report.removed], right=(3,))
    freed = ", ".join(f"{kind} {_human(n)}" for kind, n in report.freed().items()) or "nothing"
    click.echo(f"{'would free' if dry_run else 'freed'}: {freed}; cache {_human(report.size_before)} -> "
               f"{_human(report.size_after)}")


@cli.group("cache", cls=_Group)
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
        if report.problems:
            _table(("PROBLEM", "KIND", "NAME", "DETAIL"), [(p.what, p.kind, p.name, p.detail) for p in report.problems])
        for name in report.repaired:
            click.echo(f"repaired: removed {name}")
        click.echo(f"{report.blobs} blobs, {report.bases} bases: "
                   f"{'ok' if report.ok else f'{len(report.problems)} problem(s)'}")
    return 0 if report.ok else 1


def _sessions(cache_dir: Path | None) -> "Sessions":
    from .store.cache import Cache
    from .session import Sessions

    return Sessions(Cache(cache_dir))


def _session_id(sessions: "Sessions", given: str) -> str:
    """The ID of the session ``given`` names: its ID, or a path session create printed (the rootfs, the
    session's directory or a file in it; an erofs session's disk is the shared base image, so that path
    names a session only while one session alone uses it)."""
    import re

    if re.fullmatch(r"[0-9a-f]{32}", given):
        return given
    path = Path(os.path.realpath(given))
    top = Path(os.path.realpath(sessions.dir))
    if path.is_relative_to(top) and path != top:
        return path.relative_to(top).parts[0]
    users = [s.id for s in sessions.list() if s.disk and Path(os.path.realpath(s.disk)) == path]
    if len(users) == 1:
        return users[0]
    from .errors import SessionError

    if users:
        raise SessionError(f"session {given}: {len(users)} sessions share this disk ({', '.join(users)}); "
                           "give the session's ID")
    raise SessionError(f"session {given!r}: neither a session ID (32 hex digits) nor a path in {sessions.dir}; "
                       "`dirge session ls` lists them")


def _session_json(info: "SessionInfo", sessions: "Sessions") -> dict[str, Any]:
    # A disk session has no rootfs directory: its "path" is null, its "disk" the VM's root disk.
    path = None if info.disk else str(sessions.rootfs(info.id))
    return {**dataclasses.asdict(info), "path": path, "alive": info.alive()}


@cli.group("session", cls=_Group)
def session_group() -> None:
    """Create, list, remove and snapshot session rootfs."""


# One click option per PrepareOptions field, each named as its field: ``_prepare_options`` reads every
# field from the command's parameters, so a field without its option fails loudly, never silently.
_PREPARE_OPTIONS = {
    "strategy": click.option("--strategy", type=click.Choice(choices(Strategy)),
                             help="How to make the session (default: the fastest available)."),
    "base_format": click.option("--base-format", type=click.Choice(choices(BaseFormat)), envvar=FORMAT_ENV,
                                help=f"What the cached base is built as (default: ${FORMAT_ENV}, else auto)."),
    "rootless": click.option("--rootless", is_flag=True,
                             help="Build the base as an unprivileged user would (automatic when not root)."),
    "limits": click.option("--limit", "limits", multiple=True, metavar="NAME=N",
                           help="Override a safety limit (see unpack)."),
    "lock_timeout": click.option("--lock-timeout", type=click.FloatRange(min=0), default=600.0, show_default=True,
                                 metavar="S", help="Seconds to wait for a base another process is building."),
    "pull": pull_option,
    "disk": click.option("--disk", type=click.Choice(choices(DiskKind)),
                         help="A disk session for a block-device VM: its own ext4 disk, or the shared erofs image "
                              "plus its own scratch ext4 (no mount, no root)."),
    "disk_format": click.option("--disk-format", type=click.Choice(choices(DiskFormat)), default="raw",
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
    "rootless": lambda v: True if v else None,
    "limits": lambda v: _limits(v),
    "disk_size": lambda v: _size(v),
    "artifacts": lambda v: tuple(v) if v else None,
}


_REGISTRY_FIELDS = ("platform", "creds", "registry_options")  # registry_options (the decorator) gives them


def prepare_options(command: Any) -> Any:
    """The decorator that gives ``command`` every PrepareOptions field as an option."""
    for name in reversed(FIELDS):
        if name not in _REGISTRY_FIELDS:
            command = _PREPARE_OPTIONS[name](command)
    return registry_options(command)


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
    with _progress() as progress:
        prepared = prepare_with(image, options, cache_dir, owner_pid=owner_pid or os.getppid(), progress=progress)
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
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def session_ls(cache_dir: Path | None, as_json: bool) -> None:
    """List sessions, with whether their creating process is still alive (alias: list; -q: IDs only)."""
    sessions = _sessions(cache_dir)
    items = [_session_json(s, sessions) for s in sessions.list()]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    if _quiet():
        click.echo("".join(f"{item['id']}\n" for item in items), nl=False)
        return
    _table(("ID", "STRATEGY", "OWNER", "IMAGE", "PATH"),
           [(item["id"], item["strategy"], "alive" if item["alive"] else "dead", item["image"],
             str(item["path"] or item["disk"])) for item in items])


@session_group.command("rm")
@click.argument("session_id", required=False, metavar="[SESSION]")
@click.option("--all", "remove_all", is_flag=True, help="Remove every session.")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the removed sessions' IDs as a JSON list.")
def session_rm(session_id: str | None, remove_all: bool, cache_dir: Path | None, as_json: bool) -> None:
    """Remove a session (unmounting it first), or all with --all.

    SESSION is its ID or what session create printed (its path)."""
    sessions = _sessions(cache_dir)
    if bool(session_id) == remove_all:
        raise click.UsageError("give a session (its ID or path) or --all")
    removed = [s.id for s in sessions.list()] if remove_all else [_session_id(sessions, session_id or "")]
    for sid in removed:
        sessions.get(sid)
        sessions.remove(sid)
    if as_json:
        click.echo(json.dumps(removed))


@session_group.command("prune")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the removed sessions' IDs as a JSON list.")
def session_prune(cache_dir: Path | None, as_json: bool) -> None:
    """Remove sessions whose creating process has exited."""
    removed = _sessions(cache_dir).prune()
    if as_json:
        click.echo(json.dumps(removed))
    for sid in [] if as_json else removed:
        click.echo(f"removed {sid}")


@session_group.group("snapshot", cls=_Group)
def snapshot_group() -> None:
    """Save a session's state under a name and start new sessions from it."""


@snapshot_group.command("save")
@click.argument("session_id", metavar="SESSION")
@click.argument("name")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot's record and path as a JSON object.")
def snapshot_save(session_id: str, name: str, cache_dir: Path | None, as_json: bool) -> None:
    """Save SESSION (its ID or path) as snapshot NAME; print the snapshot's directory."""
    sessions = _sessions(cache_dir)
    path = sessions.snapshot_save(_session_id(sessions, session_id), name)
    click.echo(json.dumps({**sessions.snapshot_meta(name), "path": str(path)}, indent=2) if as_json else path)


@snapshot_group.command("ls")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def snapshot_list(cache_dir: Path | None, as_json: bool) -> None:
    """List snapshots (alias: list; -q: names only)."""
    items = _sessions(cache_dir).snapshot_list()
    if as_json:
        click.echo(json.dumps(items, indent=2))
    elif _quiet():
        click.echo("".join(f"{item['name']}\n" for item in items), nl=False)
    else:
        _table(("NAME", "KIND", "IMAGE", "SESSION"),
               [(str(i["name"]), str(i["kind"]), str(i["image"]), str(i["session"])) for i in items])


@snapshot_group.command("restore")
@click.argument("name")
@cache_dir_option
@click.option("--owner-pid", type=int, help="Process whose exit makes the session prunable (default: the caller).")
@click.option("--json", "as_json", is_flag=True, help="Print the new session as a JSON object instead of its path.")
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
@click.option("--json", "as_json", is_flag=True, help="Print the deleted snapshot's record as a JSON object.")
def snapshot_delete(name: str, cache_dir: Path | None, as_json: bool) -> None:
    """Delete snapshot NAME."""
    sessions = _sessions(cache_dir)
    meta = sessions.snapshot_meta(name) if as_json else None
    sessions.snapshot_delete(name)
    if as_json:
        click.echo(json.dumps(meta, indent=2))


_share_options(cli)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    state: dict[str, Any] = {}  # the commands' shared options, read back here for --debug
    try:
        status = cli.main(args=args, prog_name="dirge", standalone_mode=False, obj=state)
    except click.exceptions.Abort:
        click.echo("dirge: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except DirgeError as exc:
        if state.get("debug"):
            traceback.print_exc()
        # The kind says whose failure it is: the image's, an output format's, the host's.
        click.echo(f"dirge: error: {exc.kind + ': ' if exc.kind else ''}{exc}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("dirge: interrupted", err=True)
        return 130
    except OSError as exc:  # not wrapped with context on its way up: still say what and where
        if state.get("debug"):
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"dirge: error: {where}{exc.strerror or exc}; check permissions and free space "
                   "(rerun with --debug for a traceback)", err=True)
        return 1
    except Exception as exc:  # a bug: still one line, with the way to see more
        if state.get("debug"):
            traceback.print_exc()
        click.echo(f"dirge: internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)",
                   err=True)
        return 70
    return status if isinstance(status, int) else 0  # a command's own exit status (boot)


if __name__ == "__main__":
    sys.exit(main())
