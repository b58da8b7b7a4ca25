"""Credentials never travel in the clear (issue 18), and dirge changes no other library's behaviour
process-wide (no httpcore patch), against real loopback registries (fixtures in registry.py)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dirge import unpack
from dirge.store.cache import Cache
from dirge.errors import AuthError
from dirge.layerbuild import LayerBuilder
from dirge.sources.auth import Credentials
from dirge.sources.layout import LayoutWriter
from dirge.sources.open import pull_image
from registry import FaultProxy, Registry, TLSFiles, push_layout

pytestmark = pytest.mark.usefixtures("registry_env")  # conftest: no user config, fast retries

USER, PASSWORD = "bob", "pw-in-the-clear?"


class TLSFront:
    """A TLS terminator on 127.0.0.1: each connection's bytes, decrypted, go to a plain-HTTP port. In
    front of a bearer ``FaultProxy`` it is a TLS registry whose token realm is plain HTTP."""

    def __init__(self, tls: TLSFiles, backend_port: int) -> None:
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.load_cert_chain(tls.cert, tls.key)
        self._backend = backend_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name=f"tls-front-{self.port}", daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:  # closed
                return
            self._track(raw)
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            conn = self._ctx.wrap_socket(raw, server_side=True)
            self._track(conn)
            back = socket.create_connection(("127.0.0.1", self._backend))
            self._track(back)
        except OSError:
            raw.close()
            return
        threading.Thread(target=self._pump, args=(back, conn), daemon=True).start()
        self._pump(conn, back)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                try:
                    s.close()
                except OSError:
                    pass


@pytest.fixture
def tls_bearer(registry: Registry, fault_proxy, registry_tls_files: TLSFiles, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, FaultProxy]]:
    """(ref over TLS, the bearer proxy whose realm ``http://127.0.0.1:P/token`` it names), image pushed."""
    layout = tmp_path / "layout"
    LayoutWriter(layout).add_image([LayerBuilder().file("f", b"over tls").build()], tag="t")
    push_layout(layout, "t", f"{registry.host}/sec/app:1")
    proxy = fault_proxy(registry, bearer=True, bearer_creds=(USER, PASSWORD), allow_anonymous=True)
    front = TLSFront(registry_tls_files, proxy.port)
    certs = tmp_path / "certs.d" / front.host
    certs.mkdir(parents=True)
    (certs / "ca.crt").write_bytes(registry_tls_files.ca_cert.read_bytes())
    monkeypatch.setenv("DIRGE_CERTS_DIRS", str(tmp_path / "certs.d"))
    try:
        yield f"{front.host}/sec/app:1", proxy
    finally:
        front.close()


def test_basic_credentials_never_go_to_a_plain_http_realm_of_a_tls_registry(
        tls_bearer: tuple[str, FaultProxy], tmp_path: Path) -> None:
    ref, proxy = tls_bearer
    with pytest.raises(AuthError) as info:
        pull_image(ref, cache=Cache(tmp_path / "c"), creds=Credentials(USER, PASSWORD))
    message = str(info.value)
    assert f"http://{proxy.host}/token" in message  # names the realm
    assert "TLS" in message and "insecure" in message and f'location = "{proxy.host}" insecure = true' in message  # what to do
    assert PASSWORD not in message
    assert proxy.token_requests == []  # nothing reached it, so nothing crossed in the clear


def test_a_realm_host_marked_insecure_gets_the_credentials(tls_bearer: tuple[str, FaultProxy], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ref, proxy = tls_bearer
    config = tmp_path / "registries.toml"
    config.write_text(f'[registries."{proxy.host}"]\ninsecure = true\n')
    monkeypatch.setenv("DIRGE_REGISTRIES_CONFIG", str(config))
    unpack(ref, tmp_path / "r", cache=Cache(tmp_path / "c"), creds=Credentials(USER, PASSWORD))
    assert (tmp_path / "r/f").read_bytes() == b"over tls"
    assert [t.username for t in proxy.token_requests if t.status == 200] and \
        all(t.username == USER for t in proxy.token_requests)


def test_an_anonymous_token_from_a_plain_http_realm_carries_no_credentials(
        tls_bearer: tuple[str, FaultProxy], tmp_path: Path) -> None:
    ref, proxy = tls_bearer
    unpack(ref, tmp_path / "r", cache=Cache(tmp_path / "c"), creds=None)
    assert (tmp_path / "r/f").read_bytes() == b"over tls"
    assert proxy.token_requests and all(t.username is None for t in proxy.token_requests)


def test_importing_dirge_and_pulling_leaves_httpcore_untouched(registry: Registry, tmp_path: Path) -> None:
    """In a fresh interpreter (this one may have imported dirge already): every attribute of every httpx and
    httpcore class and module is the same object after ``import dirge`` and a pull as before."""
    layout = tmp_path / "layout"
    LayoutWriter(layout).add_image([LayerBuilder().file("f", b"x" * 300_000).build()], tag="t")
    push_layout(layout, "t", f"{registry.host}/plain/app:1")
    script = textwrap.dedent(f"""
        import sys, types
        import httpcore, httpx

        def snapshot():
            out = {{}}
            for name, mod in list(sys.modules.items()):
                if name.split(".")[0] not in ("httpcore", "httpx", "h11"):
                    continue
                for attr, value in list(vars(mod).items()):
                    out[(name, attr)] = id(value)
                    if isinstance(value, type):
                        for k, v in list(vars(value).items()):
                            out[(name, attr, k)] = id(v) if not isinstance(v, (int, str)) else v
            return out

        before = snapshot()
        read_bytes = httpcore._sync.http11.HTTP11Connection.READ_NUM_BYTES
        import dirge, dirge.sources.registry
        from dirge.store.cache import Cache
        dirge.unpack({f"{registry.host}/plain/app:1"!r}, {str(tmp_path / "r")!r}, cache=Cache({str(tmp_path / "c")!r}),
                     rootless=True)
        after = snapshot()
        lazy = {("httpx._transports.default", "HTTPCORE_EXC_MAP")}  # httpx fills it itself on first use
        changed = sorted(str(k) for k in before if k in after and before[k] != after[k] and k not in lazy)
        print({{"read_bytes": [read_bytes, httpcore._sync.http11.HTTP11Connection.READ_NUM_BYTES],
               "changed": changed}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = eval(proc.stdout.strip().splitlines()[-1])
    assert result["read_bytes"][0] == result["read_bytes"][1], result
    assert result["changed"] == [], result
    assert (tmp_path / "r/f").read_bytes() == b"x" * 300_000
