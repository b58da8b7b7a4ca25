"""The public API as users meet it (issue 20.1): everything at ``import dirge``, no function hiding a
submodule, every exception exported, ``platform=`` strings, one ``cache=``, Literal option values (checked
by mypy on tests/api_sample.py, and a typo rejected), a ResourceWarning for a dropped session, and every
example of docs/API.md run."""

from __future__ import annotations

import asyncio
import dataclasses
import gc as pygc
import importlib
import importlib.metadata
import inspect
import os
import re
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest

import dirge
import dirge.errors
from dirge import aio
from dirge.cli import cli
from dirge.layerbuild import LayerBuilder
from dirge.options import BaseFormat, BootDisk, DiskFormat, DiskKind, ExportFormat, PullPolicy, Strategy, choices
from dirge.sources.layout import LayoutWriter
from images import layered

from conftest import needs_root

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE = SRC / "dirge"


def test_every_name_in_all_is_importable() -> None:
    assert len(set(dirge.__all__)) == len(dirge.__all__)
    for name in dirge.__all__:
        assert getattr(dirge, name) is not None, name
    namespace: dict[str, Any] = {}
    exec("from dirge import *", namespace)
    assert set(dirge.__all__) <= set(namespace)


def test_the_calls_are_at_the_top() -> None:
    for name in ("prepare", "unpack", "export", "pull", "gc", "restore", "cleanup"):
        assert inspect.isfunction(getattr(dirge, name)), name
    assert inspect.ismodule(dirge.aio)
    for name in ("prepare", "export", "pull", "gc", "close"):
        assert callable(getattr(dirge.aio, name)), name


def test_every_public_exception_is_exported_and_a_dirge_error() -> None:
    """Every exception class errors.py defines is in ``dirge.__all__``; every exception there is a DirgeError."""
    defined = {name for name, value in vars(dirge.errors).items()
               if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == "dirge.errors"}
    assert len(defined) >= 20 and "DirgeError" in defined
    assert defined <= set(dirge.__all__), f"not exported: {sorted(defined - set(dirge.__all__))}"
    exported = [getattr(dirge, n) for n in dirge.__all__]
    for value in exported:
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, dirge.DirgeError), value


def _submodule_names() -> set[str]:
    """Every module or package directly under src/dirge (file or directory name)."""
    names = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    names |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    return names


def test_no_function_has_the_name_of_a_submodule() -> None:
    submodules = _submodule_names()
    assert {"flatten", "exporting", "lifecycle", "aio", "rootfs"} <= submodules  # the walk sees the files
    for name in submodules:
        importlib.import_module(f"dirge.{name}")  # importing a submodule sets dirge.<name> to it
    clashes = sorted(name for name, value in vars(dirge).items()
                     if callable(value) and not inspect.ismodule(value) and name in submodules)
    assert not clashes, f"functions hiding submodules: {clashes}"
    for name in ("unpack", "export", "gc", "pull", "prepare"):
        assert inspect.isfunction(getattr(dirge, name)), f"dirge.{name} became a module after importing them all"


def test_version_is_the_distributions_with_a_fallback() -> None:
    assert dirge.__version__ == importlib.metadata.version("dirge")
    script = textwrap.dedent("""
        import importlib.metadata as m
        def missing(name):
            raise m.PackageNotFoundError(name)
        m.version = missing
        import dirge
        print(dirge.__version__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0+unknown"


# -- the option values: one Literal each, the modules and the CLI agree ------------------------------------


def test_literals_are_the_values_the_modules_act_on() -> None:
    from dirge.bases import FORMAT_CHOICES
    from dirge.exporting import FORMATS
    from dirge.session.backends import STRATEGIES
    from dirge.sources.open import PULL_POLICIES
    from dirge.vm.boot import BOOT_DISKS

    assert choices(Strategy) == list(STRATEGIES)
    assert choices(BaseFormat) == list(FORMAT_CHOICES)
    assert choices(PullPolicy) == list(PULL_POLICIES)
    assert choices(ExportFormat) == list(FORMATS)
    assert choices(BootDisk) == list(BOOT_DISKS)


def _commands(group: click.Group, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    for name, command in group.commands.items():
        yield prefix + name, command
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")


def test_cli_choices_are_the_literals() -> None:
    expected = {"pull": PullPolicy, "policy": PullPolicy, "base_format": BaseFormat, "strategy": Strategy,
                "disk_format": DiskFormat, "fmt": ExportFormat}
    seen: set[str] = set()
    for where, command in _commands(cli):
        for param in command.params:
            if not isinstance(param.type, click.Choice) or param.name is None:
                continue
            if param.name == "disk":  # session create: a disk kind; boot and demo: what the VM boots from
                literal: Any = DiskKind if where == "session create" else BootDisk
            elif param.name == "fmt" and where == "push":  # an artifact is a disk: erofs or ext4
                literal = DiskKind
            elif param.name in expected:
                literal = expected[param.name]
            else:
                continue
            assert list(param.type.choices) == choices(literal), f"{where} --{param.name}"
            seen.add(param.name)
    assert seen >= {"pull", "policy", "base_format", "strategy", "disk", "disk_format", "fmt"}


def test_aio_gc_has_real_keywords() -> None:
    """No ``**kwargs: Any``: a misspelt keyword fails at the call, not in the worker."""
    params = inspect.signature(aio.gc).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert {"cache", "max_size", "keep", "dry_run", "grace"} <= set(params)
    assert set(inspect.signature(dirge.gc).parameters) == set(params) - {"cache_dir"}
    with pytest.raises(TypeError):
        aio.gc(max_sise=1)  # type: ignore[call-arg]  # (the coroutine is never made)


# -- platform strings and the one cache= --------------------------------------------------------------------


@pytest.fixture
def multi(tmp_path: Path) -> str:
    """An index of two images, linux/amd64 and linux/arm64, each with a file naming its architecture."""
    layout = LayoutWriter(tmp_path / "multi")
    manifests = [layout.add_image([LayerBuilder().file("arch", arch.encode()).build()],
                                  platform=dirge.Platform("linux", arch)) for arch in ("amd64", "arm64")]
    index = layout.add_json({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                             "manifests": manifests}, "application/vnd.oci.image.index.v1+json")
    layout.tag(index, "m")
    return f"oci:{tmp_path}/multi:m"


def test_platform_strings_everywhere(tmp_path: Path, multi: str) -> None:
    cache = tmp_path / "cache"
    result = dirge.unpack(multi, tmp_path / "u", platform="linux/arm64")
    assert (tmp_path / "u/arch").read_bytes() == b"arm64" and str(result.image.platform) == "linux/arm64"
    assert str(dirge.pull(multi, "linux/arm64", cache=cache).platform) == "linux/arm64"
    assert str(asyncio.run(aio.pull(multi, "linux/amd64", cache=cache)).platform) == "linux/amd64"
    out = dirge.export(multi, tmp_path / "d", format="dir", platform="linux/arm64", cache=cache)
    assert (out.path / "arch").read_bytes() == b"arm64"
    with dirge.prepare(multi, cache, platform="linux/arm64", base_format="tree", strategy="copy") as rootfs:
        assert (rootfs.path / "arch").read_bytes() == b"arm64"
    with dirge.prepare(multi, cache, platform=dirge.Platform("linux", "amd64"), base_format="tree",
                       strategy="copy") as rootfs:
        assert (rootfs.path / "arch").read_bytes() == b"amd64"


@pytest.mark.parametrize("bad", ["arm64", "linux/", "linux/arm64/v8/extra"])
def test_a_bad_platform_string_is_invalid_reference_naming_it(tmp_path: Path, multi: str, bad: str) -> None:
    cache = tmp_path / "cache"
    calls = {
        "prepare": lambda: dirge.prepare(multi, cache, platform=bad),
        "aio.prepare": lambda: aio.prepare(multi, cache, platform=bad),  # raised at the call, before any await
        "unpack": lambda: dirge.unpack(multi, tmp_path / "u", platform=bad),
        "export": lambda: dirge.export(multi, tmp_path / "e.erofs", platform=bad, cache=cache),
        "pull": lambda: dirge.pull(multi, bad, cache=cache),
    }
    for name, call in calls.items():
        with pytest.raises(dirge.InvalidReference, match=re.escape(repr(bad))) as caught:
            call()
        assert caught.value.ref == bad, name
    assert not (tmp_path / "u").exists() and not (tmp_path / "e.erofs").exists()


def test_cache_is_a_path_or_a_cache_and_cache_dir_is_deprecated(tmp_path: Path, make_image: Any) -> None:
    ref = make_image(layered())
    options: dict[str, Any] = {"base_format": "tree", "strategy": "copy"}
    for given, root in ((str(tmp_path / "a"), tmp_path / "a"), (tmp_path / "b", tmp_path / "b"),
                        (dirge.Cache(tmp_path / "c"), tmp_path / "c")):
        with dirge.prepare(ref, cache=given, **options) as rootfs:
            assert rootfs.session_dir.parent.parent == root
    with pytest.warns(DeprecationWarning, match=r"prepare\(cache_dir=...\) is deprecated"):
        rootfs = dirge.prepare(ref, cache_dir=tmp_path / "d", **options)
    with rootfs:
        assert rootfs.session_dir.parent.parent == tmp_path / "d"
    with pytest.raises(TypeError, match="not both"), pytest.warns(DeprecationWarning):
        dirge.prepare(ref, tmp_path / "a", cache_dir=tmp_path / "d", **options)
    with pytest.warns(DeprecationWarning, match=r"aio.gc\(cache_dir=...\)"):
        report = asyncio.run(aio.gc(cache_dir=tmp_path / "d", dry_run=True))
    assert report.dry_run and report.size_before > 0
    assert dirge.gc(tmp_path / "d", dry_run=True).size_before == report.size_before


# -- a dropped session warns -------------------------------------------------------------------------------


def _session(ref: str, cache: Path) -> dirge.PreparedRootfs:
    return dirge.prepare(ref, cache, base_format="tree", strategy="copy")


def test_a_prepared_rootfs_dropped_unclosed_warns_then_cleans_up(tmp_path: Path, make_image: Any) -> None:
    ref = make_image(layered())
    rootfs = _session(ref, tmp_path / "cache")
    session_dir, session_id = rootfs.session_dir, rootfs.id
    assert session_dir.is_dir()
    with pytest.warns(ResourceWarning, match=f"session {session_id} was never closed"):
        del rootfs
        pygc.collect()
    assert not session_dir.exists()


def test_closing_a_prepared_rootfs_does_not_warn(tmp_path: Path, make_image: Any) -> None:
    ref = make_image(layered())
    cache = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)  # any ResourceWarning fails the test
        closed = _session(ref, cache)
        closed.close()
        closed.close()  # twice: nothing the second time
        with _session(ref, cache) as entered:
            entered_dir = entered.session_dir
        kept = _session(ref, cache)
        kept.detach()
        kept_dir = kept.session_dir
        async_dir = asyncio.run(_aio_session(ref, cache))
        del closed, entered, kept
        pygc.collect()
    assert not entered_dir.exists() and not async_dir.exists()
    assert kept_dir.is_dir()  # detached: kept for dirge session rm
    dirge.cleanup(kept_dir)


async def _aio_session(ref: str, cache: Path) -> Path:
    async with aio.prepare(ref, cache, base_format="tree", strategy="copy") as rootfs:
        return rootfs.session_dir


# -- types: the sample passes mypy --strict, a typo in a Literal does not -----------------------------------


def _mypy(path: Path) -> subprocess.CompletedProcess[str]:
    # MYPYPATH first: the dirge under test, not an installed copy
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--ignore-missing-imports",
                           "--cache-dir", os.devnull, str(path)], capture_output=True, text=True,
                          env={**os.environ, "MYPYPATH": str(SRC)}, cwd=path.parent)


def test_mypy_accepts_the_sample_using_the_whole_api() -> None:
    sample = ROOT / "tests" / "api_sample.py"
    proc = _mypy(sample)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    used = set(re.findall(r"\bdirge\.(\w+)", sample.read_text()))
    assert used >= set(dirge.__all__) - {"BaseFormat", "BootDisk", "CacheLike", "DiskFormat", "DiskKind",
                                         "PlatformLike", "Strategy", "aio"}, \
        f"the sample leaves out {sorted(set(dirge.__all__) - used)}"


@pytest.mark.parametrize("call, wrong", [
    ('dirge.prepare("oci:/a", pull="misssing")', "misssing"),
    ('dirge.export("oci:/a", "/out", format="ext3")', "ext3"),
    ('aio.prepare("oci:/a", strategy="overlayfs")', "overlayfs"),
])
def test_mypy_rejects_a_typo_in_a_literal_option(tmp_path: Path, call: str, wrong: str) -> None:
    program = tmp_path / "typo.py"
    program.write_text(f"import dirge\nfrom dirge import aio\n\n{call}\n")
    proc = _mypy(program)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"Literal['{wrong}']" in proc.stdout and "[arg-type]" in proc.stdout, proc.stdout


# -- docs/API.md: every example runs ----------------------------------------------------------------------


def _api_examples() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "docs" / "API.md").read_text(), re.S | re.M)


@needs_root
def test_every_example_of_the_api_doc_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from dirge.fsutil import mounts_under, remove_tree, unmount

    blocks = _api_examples()
    assert len(blocks) >= 10
    namespace: dict[str, Any] = {"__name__": "api_doc"}
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"docs/API.md, example {i + 1}", "exec"), namespace)
        assert not namespace["WORK"].exists(), "the last example removes what the page made"
    finally:
        work = namespace.get("WORK")
        if isinstance(work, Path) and work.exists():  # an example failed: what the page made goes anyway
            for mount in mounts_under(work):
                unmount(mount)
            remove_tree(work)
    out = capsys.readouterr().out
    assert "linux/arm64" in out and "too small" in out


def test_import_dirge_loads_the_api_on_first_use() -> None:
    """``import dirge`` (and so every CLI start) loads the exceptions only; a name's module (httpx, rich,
    asyncio behind them) loads when the name is first used, and is then the same object."""
    code = ("import sys, dirge\n"
            "heavy = [m for m in ('httpx', 'rich', 'asyncio', 'dirge.rootfs') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "from dirge.rootfs import prepare\n"
            "assert dirge.prepare is prepare and 'dirge.rootfs' in sys.modules\n"
            "assert dirge.aio is sys.modules['dirge.aio'] and isinstance(dirge.__version__, str)\n"
            "assert 'prepare' in dir(dirge)\n"
            "try:\n    dirge.no_such_name\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit(1)\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(SRC)})
