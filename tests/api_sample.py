"""A program that uses the whole public API, for ``mypy --strict`` (tests/test_api_surface.py). It is only
type-checked, never run: the functions below are what a user would write."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import dirge
from dirge import aio


def sync_use(image: str, cache: str | os.PathLike[str] | dirge.Cache, work: Path) -> list[object]:
    version: str = dirge.__version__
    platform: dirge.Platform = dirge.parse_platform("linux/arm64")
    pull: dirge.PullPolicy = "never"
    fmt: dirge.ExportFormat = "tar"
    with dirge.prepare(image, cache, files={"/etc/hostname": b"vm\n", "/etc/motd": dirge.FileSpec(b"hi", mode=0o600)},
                       platform="linux/arm64", pull=pull, base_format="tree", strategy="copy",
                       limits=dirge.Limits(max_entries=1000), creds=dirge.Credentials("u", "p")) as rootfs:
        dirge.add_user(rootfs, "sandbox", 1000)
        dirge.write_krun_config(rootfs, rootfs.config)
        path: Path = rootfs.path
    disk: dirge.PreparedRootfs = dirge.prepare(image, cache=dirge.Cache(work), disk="ext4", disk_format="qcow2")
    disk.close()
    again = dirge.restore("snap", cache, strategy="overlay")
    again.detach()
    dirge.cleanup(work / "tree")
    unpacked: dirge.UnpackResult = dirge.unpack(image, work / "rootfs", platform=platform, cache=cache, pull="missing")
    exported: dirge.ExportResult = dirge.export(image, work / "out.ext4", format="ext4", platform="linux/amd64",
                                                cache=cache, disk=dirge.DiskOptions(size=1 << 30, journal=False))
    exported_tar = dirge.export(image, work / "out.tar", format=fmt)
    resolved: dirge.ResolvedImage = dirge.pull(image, "linux/arm64", cache=cache, pull="always")
    report: dirge.GcReport = dirge.gc(cache, max_size=10 << 30, keep=3600.0, dry_run=True)
    pushed: dirge.PushResult = dirge.push(image, "registry.internal/bases/app:1", format="ext4", size=1 << 30,
                                          journal=False, platform="linux/arm64", cache=cache, pull="missing")
    ref = dirge.parse_reference(dirge.canonicalize_image_ref(image))
    local: str | None = dirge.local_variant_name(image)
    return [version, path, unpacked.report.entries, exported.sha256, exported_tar.size, resolved.manifest_digest,
            report.freed(), ref, local, pushed.digest, pushed.bytes_sent]


async def async_use(image: str, cache: Path) -> None:
    events = aio.ProgressStream()
    async with aio.prepare(image, cache, platform="linux/arm64", progress=events, disk="erofs") as rootfs:
        print(rootfs.disk, rootfs.scratch)
    session = await aio.prepare(image, cache=cache, base_format="erofs")
    await aio.close(session)
    resolved: dirge.ResolvedImage = await aio.pull(image, "linux/amd64", cache=cache, pull="missing")
    result: dirge.ExportResult = await aio.export(image, cache / "x.erofs", format="erofs", cache=cache)
    report: dirge.GcReport = await aio.gc(cache, max_size=1 << 30, dry_run=True)
    print(resolved, result, report)


def errors() -> None:
    try:
        asyncio.run(async_use("oci:/images/app:1.0", Path("/tmp/cache")))
    except dirge.PlatformNotFound as err:
        print(err)
    except (dirge.InvalidReference, dirge.ImageError, dirge.IntegrityError, dirge.UnsafeLayer, dirge.LimitExceeded,
            dirge.UnpackError, dirge.SinkError, dirge.AuthError, dirge.NotFound, dirge.RateLimited,
            dirge.RegistryError, dirge.BuildError, dirge.LockTimeout, dirge.UnsafeCache, dirge.SessionError,
            dirge.Cancelled, dirge.GuestFailed, dirge.BootError, dirge.NoSpace) as err:
        print(type(err).__name__, err)
    except dirge.DirgeError:
        raise
