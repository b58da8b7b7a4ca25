"""Shared fixtures: image layouts built from layer tars, and skip rules that say what a test needs."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dirge.sources.layout import LayoutWriter  # noqa: E402

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, device nodes, setpriv)")


def needs_tool(*tools: str) -> pytest.MarkDecorator:
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (installed by scripts/setup.sh --test)")


@pytest.fixture
def make_image(tmp_path: Path):
    """``make_image([layer_tar, ...], **add_image_kwargs) -> "oci:PATH:TAG"`` in a fresh layout."""
    counter = iter(range(1_000_000))

    def make(layers: list[bytes], *, tag: str = "t", **kwargs) -> str:
        layout = tmp_path / f"layout{next(counter)}"
        LayoutWriter(layout).add_image(layers, tag=tag, **kwargs)
        return f"oci:{layout}:{tag}"

    return make
