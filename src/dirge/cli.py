"""The ``dirge`` command: arguments in, one clear line out on failure (a traceback only with --debug)."""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from .apply.layer import Limits
from .errors import DirgeError
from .image import parse_platform


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
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Turn OCI container images into root filesystems for microVM sandboxes."""
    ctx.obj = {"debug": debug}


@cli.command("unpack")
@click.argument("image")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--platform", help="os/arch[/variant] to pick from a multi-platform image.")
@click.option("--rootless", is_flag=True, help="Unpack as an unprivileged user would (automatic when not root).")
@click.option("--limit", "limits", multiple=True, metavar="NAME=N",
              help="Override a safety limit: max_total_bytes, max_entries, max_depth, max_file_bytes.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def unpack_cmd(image: str, dest: Path, platform: str | None, rootless: bool, limits: tuple[str, ...],
               as_json: bool) -> None:
    """Write the flattened rootfs of IMAGE (e.g. oci:PATH[:TAG]) into DEST (absent or empty)."""
    from .unpack import unpack

    result = unpack(image, dest, platform=parse_platform(platform) if platform else None,
                    rootless=True if rootless else None, limits=_limits(limits))
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
              show_default=True, help="Where to build the demo layout and rootfs.")
def demo_cmd(workdir: Path) -> None:
    """Build a tiny busybox image offline, unpack it, and run a shell inside it."""
    from .demo import run_demo

    result, output = run_demo(workdir)
    click.echo(f"unpacked oci:{workdir / 'layout'}:demo ({result.image.manifest_digest.short}, "
               f"{result.report.entries} entries) into {workdir / 'rootfs'}")
    click.echo(output, nl=False)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="dirge", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("dirge: aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except DirgeError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"dirge: error: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("dirge: interrupted", err=True)
        return 130
    except Exception as exc:  # a bug: still one line, with the way to see more
        if debug:
            traceback.print_exc()
        click.echo(f"dirge: internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)",
                   err=True)
        return 70
    return 0


if __name__ == "__main__":
    sys.exit(main())
