"""One options value for a prepare: ``rootfs.prepare``, ``aio.prepare`` and ``dirge session create``
take exactly ``PrepareOptions``' fields (plus their own few), with its defaults, so they cannot drift."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import click
import pytest

from dirge import aio, rootfs
from dirge.apply.layer import Limits
from dirge.cli import _prepare_options, main, registry_params, session_create
from dirge.oci.image import Platform
from dirge.options import FIELDS, PrepareOptions
from dirge.sources.auth import RegistryOptions
from images import layered

OWN = {"image", "cache", "files", "snapshot", "owner_pid", "progress"}  # each prepare's own keywords
DEPRECATED = {"cache_dir"}  # still taken by prepare and aio.prepare, with a DeprecationWarning
# Fields the public functions take in a wider form than the options value holds (parsed by PrepareOptions.pick)
WIDER = {"platform": "PlatformLike | None"}


@pytest.mark.parametrize("prepare", [rootfs.prepare, aio.prepare], ids=["rootfs", "aio"])
def test_prepare_keywords_are_the_option_fields(prepare: object) -> None:
    params = inspect.signature(prepare).parameters  # type: ignore[arg-type]
    assert set(params) == OWN | DEPRECATED | set(FIELDS)
    for field in dataclasses.fields(PrepareOptions):
        param = params[field.name]
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, field.name
        assert param.default == field.default, field.name
        # (strings: both modules postpone annotations)
        assert param.annotation == WIDER.get(field.name, field.type), field.name


def test_prepare_with_takes_the_same_own_keywords() -> None:
    params = inspect.signature(rootfs.prepare_with).parameters
    assert set(params) == OWN | {"options"}
    assert set(inspect.signature(rootfs.prepare).parameters) - set(FIELDS) == OWN | DEPRECATED


def _cli_options(args: list[str]) -> PrepareOptions:
    """What ``dirge session create IMAGE ARGS`` would prepare with: click's real parsing, then the
    command's own conversion."""
    ctx = session_create.make_context("create", ["IMAGE", *args])
    params = registry_params(dict(ctx.params))  # what the shared registry decorator does
    for own in ("image", "cache_dir", "owner_pid", "as_json"):
        params.pop(own)
    options = _prepare_options(params)
    assert not params, f"session create has parameters that are neither its own nor options: {params}"
    return options


def test_cli_session_create_passes_every_field() -> None:
    # registry_options is three options (--authfile, --cert-dir, --tls-verify), the others one each
    assert {p.name for p in session_create.params} >= set(FIELDS) - {"registry_options"} | {"authfile", "cert_dir",
                                                                                           "tls_verify"}
    assert _cli_options([]) == PrepareOptions()  # the command line's defaults are the API's
    given = _cli_options(["--strategy", "copy", "--base-format", "tree", "--platform", "linux/arm64",
                          "--rootless", "--limit", "max_entries=7", "--lock-timeout", "5", "--pull", "never",
                          "--creds", "u:p", "--disk", "ext4", "--disk-format", "qcow2", "--disk-size", "2G",
                          "--no-disk-journal", "--disk-inodes", "99", "--authfile", "/a.json", "--cert-dir", "/c",
                          "--no-tls-verify", "--artifacts", "r.example/a", "--artifacts", "r.example/b"])
    changed = {name for name in FIELDS if getattr(given, name) != getattr(PrepareOptions(), name)}
    assert changed == set(FIELDS), "a field the command line cannot set"
    assert given.platform == Platform("linux", "arm64") and given.limits == Limits(max_entries=7)
    assert given.disk_size == 2 << 30 and given.rootless is True
    assert given.registry_options == RegistryOptions(Path("/a.json"), Path("/c"), False)
    assert given.artifacts == ("r.example/a", "r.example/b")


def test_disk_options_need_a_disk() -> None:
    with pytest.raises(click.UsageError):
        session_create.main(["IMAGE", "--no-disk-journal"], standalone_mode=False)


def test_cli_disk_options_reach_the_base_disk(tmp_path: Path, make_image, capsys: pytest.CaptureFixture[str]) -> None:
    """The ext4 disk options of the command line shape (and key) the cached base disk."""
    ref = make_image(layered())
    cache = tmp_path / "cache"
    assert main(["session", "create", ref, "--cache-dir", str(cache), "--disk", "ext4", "--no-disk-journal",
                 "--disk-inodes", "333", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    [base] = [p for p in (cache / "bases").iterdir() if p.name.endswith("-ext4-nojournalinodes333")]
    assert json.loads((base / "image.json").read_text())["options"] == {"size": None, "journal": False,
                                                                          "inodes": 333}
    assert main(["session", "rm", out["id"], "--cache-dir", str(cache)]) == 0
