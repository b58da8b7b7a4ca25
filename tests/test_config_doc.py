"""docs/CONFIG.md names every environment variable dirge's source reads."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# os.environ["X"], os.environ.get("X"), os.getenv("X"), click's envvar="X", and any "DIRGE_*" string
# literal (names handed to a helper, such as _env_float("DIRGE_REGISTRY_TIMEOUT", ...) or FORMAT_ENV)
READS = re.compile(r"""(?:os\.environ(?:\.get)?\s*[\[(]\s*|getenv\(\s*|envvar\s*=\s*)["']([A-Z][A-Z0-9_]*)["']""")
DIRGE_LITERAL = re.compile(r"""["'](DIRGE_[A-Z0-9_]+)["']""")


def env_vars_read() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "src/dirge").rglob("*.py"):
        text = path.read_text()
        found |= set(READS.findall(text)) | set(DIRGE_LITERAL.findall(text))
    return found


def test_the_scan_finds_what_it_should() -> None:
    found = env_vars_read()
    assert {"DIRGE_CACHE_DIR", "DIRGE_REGISTRY_TIMEOUT", "DIRGE_BASE_FORMAT", "REGISTRY_AUTH_FILE",
            "CONTAINERS_REGISTRIES_CONF", "DOCKER_CONFIG", "XDG_RUNTIME_DIR", "DIRGE_KERNEL"} <= found


def test_every_environment_variable_read_is_documented() -> None:
    doc = (ROOT / "docs/CONFIG.md").read_text()
    missing = sorted(name for name in env_vars_read() if not re.search(rf"`{name}`|\${name}\b", doc))
    assert not missing, f"docs/CONFIG.md does not document {missing}"
