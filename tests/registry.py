"""Real registries on loopback for tests: ``docker-registry`` processes, skopeo pushes, and a fault-injecting proxy.

Everything here listens on and talks to 127.0.0.1 only. The pytest fixtures that wrap these helpers live at the
end of ``tests/conftest.py``:

* ``Registry``: Debian's ``docker-registry`` (distribution 2.8) run as ``docker-registry serve CONFIG`` on a free
  port with its storage in a temporary directory; plain HTTP, HTTPS + htpasswd basic auth, or pull-through proxy.
* ``push_layout``: ``skopeo copy --preserve-digests oci:LAYOUT:TAG docker://HOST/REPO:TAG`` with skopeo's
  auth file, registries.conf, blob-info cache and temporary files all kept inside a temporary directory.
* ``FaultProxy``: a threaded HTTP/1.1 reverse proxy with queued faults (status answers, a connection reset in the
  middle of a body, corrupted bodies, ignored Range) and an optional bearer-token auth front.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import termios
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

LOOPBACK = "127.0.0.1"
READY_TIMEOUT = 10.0

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
#: An ``Accept`` header value asking for any single-image or index manifest, OCI first.
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])

# Environment variables that would reach into the host's configuration or the network.
_PROXY_ENV = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy"}


def _require_tool(tool: str, why: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"needs {tool} for {why} (apt-get install via scripts/setup.sh --test)")
    return path


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (callers retry on the rare bind race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_ENV}
    env.update(extra or {})
    return env


def ssl_context(ca_cert: str | os.PathLike[str] | None) -> ssl.SSLContext:
    """A client context trusting only ``ca_cert`` (the test CA)."""
    ctx = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
    return ctx


# -- TLS material and htpasswd ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    """A throwaway CA and a server certificate for IP 127.0.0.1 and DNS localhost, signed by it."""

    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path
    cert_dir: Path  # holds only ``ca.crt``: for ``skopeo --*-cert-dir`` and ``/etc/docker/certs.d``-style use


def make_tls_files(directory: str | os.PathLike[str]) -> TLSFiles:
    """Generate the CA and server certificate with the ``openssl`` CLI (EC P-256, valid for two days)."""
    openssl = _require_tool("openssl", "test TLS certificates")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = d / "ca.key", d / "ca.pem"
    key, csr, cert, ext = d / "server.key", d / "server.csr", d / "server.pem", d / "server.ext"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        proc = subprocess.run([openssl, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()}")

    run("req", "-x509", "-new", *ec, "-keyout", str(ca_key), "-out", str(ca_cert), "-days", "2",
        "-subj", "/CN=dirge test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-new", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-set_serial", "0x" + secrets.token_hex(8), "-days", "2", "-extfile", str(ext), "-out", str(cert))
    cert_dir = d / "certs.d"
    cert_dir.mkdir(exist_ok=True)
    shutil.copyfile(ca_cert, cert_dir / "ca.crt")
    return TLSFiles(ca_cert=ca_cert, ca_key=ca_key, cert=cert, key=key, cert_dir=cert_dir)


def htpasswd_line(username: str, password: str) -> str:
    """``user:$2y$...``: docker-registry's htpasswd auth accepts only bcrypt (apache2-utils ``htpasswd -B``)."""
    tool = shutil.which("htpasswd")
    if tool is not None:
        proc = subprocess.run([tool, "-niB", "-C", "4", username], input=password, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"htpasswd failed: {proc.stderr.strip()}")
        return proc.stdout.strip()
    try:
        import bcrypt  # type: ignore[import-not-found]
    except ImportError:
        pytest.skip("needs htpasswd (apt-get install apache2-utils) for bcrypt htpasswd entries")
    return f"{username}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()}"


# -- docker-registry ---------------------------------------------------------------------------------------------


class Registry:
    """One ``docker-registry serve CONFIG`` process on 127.0.0.1, started by :meth:`start`, ended by :meth:`stop`.

    ``tls`` serves HTTPS with that certificate; ``auth=(user, password)`` adds htpasswd basic auth;
    ``proxy_remote`` makes it a pull-through cache of that URL (``proxy_auth`` for the upstream's basic auth,
    ``proxy_ca`` to trust the upstream's CA: it becomes the process's ``SSL_CERT_FILE``); ``token_auth`` is
    distribution's token auth (JWTs from a :class:`TokenIssuer`).
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        tls: TLSFiles | None = None,
        auth: tuple[str, str] | None = None,
        proxy_remote: str | None = None,
        proxy_auth: tuple[str, str] | None = None,
        proxy_ca: str | os.PathLike[str] | None = None,
        token_auth: dict[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.token_auth = token_auth  # distribution's ``auth: token:`` (realm, service, issuer, rootcertbundle)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage = self.workdir / "storage"
        self.config_path = self.workdir / "config.json"
        self.log_path = self.workdir / "registry.log"
        self.tls = tls
        self.username, self.password = auth if auth else (None, None)
        self.upstream_url = proxy_remote.rstrip("/") if proxy_remote else None
        self._proxy_auth = proxy_auth
        self._proxy_ca = proxy_ca
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    # addresses and client settings

    @property
    def host(self) -> str:
        if self.port is None:
            raise RuntimeError("registry not started")
        return f"{LOOPBACK}:{self.port}"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def ca_cert(self) -> Path | None:
        return self.tls.ca_cert if self.tls else None

    @property
    def cert_dir(self) -> Path | None:
        return self.tls.cert_dir if self.tls else None

    @property
    def auth(self) -> tuple[str, str] | None:
        return (self.username, self.password) if self.username is not None else None

    def httpx_kwargs(self) -> dict[str, Any]:
        """``httpx.Client(**reg.httpx_kwargs())``: base_url, verify (the test CA), basic auth, no env proxies."""
        kw: dict[str, Any] = {"base_url": self.url, "trust_env": False}
        kw["verify"] = ssl_context(self.ca_cert) if self.tls else False
        if self.auth:
            kw["auth"] = self.auth
        return kw

    def push_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`push_layout` to this registry."""
        return {"tls_verify": self.tls is not None, "creds": self.auth, "cert_dir": self.cert_dir}

    def push(self, layout_dir: str | os.PathLike[str], tag_in_layout: str, repo_ref: str, **kwargs: Any) -> str:
        """``push_layout`` to ``HOST/repo_ref`` with this registry's TLS and credentials; returns the digest."""
        return push_layout(layout_dir, tag_in_layout, f"{self.host}/{repo_ref}", **{**self.push_kwargs(), **kwargs})

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # lifecycle

    def _config(self) -> dict[str, Any]:
        http_cfg: dict[str, Any] = {"addr": self.host, "secret": secrets.token_hex(16),
                                    "headers": {"X-Content-Type-Options": ["nosniff"]}}
        if self.tls:
            http_cfg["tls"] = {"certificate": str(self.tls.cert), "key": str(self.tls.key)}
        cfg: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http_cfg,
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.username is not None:
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text(htpasswd_line(self.username, self.password or "") + "\n")
            cfg["auth"] = {"htpasswd": {"realm": "dirge-test", "path": str(htpasswd)}}
        if self.token_auth is not None:
            cfg["auth"] = {"token": self.token_auth}
        if self.upstream_url:
            proxy: dict[str, Any] = {"remoteurl": self.upstream_url}
            if self._proxy_auth:
                proxy["username"], proxy["password"] = self._proxy_auth
            cfg["proxy"] = proxy
        return cfg

    def start(self, timeout: float = READY_TIMEOUT) -> "Registry":
        binary = _require_tool("docker-registry", "a real registry on loopback")
        # No REGISTRY_* variables: docker-registry reads them as configuration overrides.
        env = _clean_env()
        env = {k: v for k, v in env.items() if not k.startswith("REGISTRY_")}
        if self._proxy_ca:
            env["SSL_CERT_FILE"] = str(self._proxy_ca)
            env.pop("SSL_CERT_DIR", None)
        last_error = ""
        for _attempt in range(5):
            self.port = free_port()
            self.config_path.write_text(json.dumps(self._config(), indent=1))
            log = open(self.log_path, "ab")
            try:
                self.process = subprocess.Popen([binary, "serve", str(self.config_path)], stdin=subprocess.DEVNULL,
                                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
            finally:
                log.close()
            try:
                self._wait_ready(timeout)
                return self
            except _PortTaken as e:
                last_error = str(e)
                self.stop()
            except BaseException:
                self.stop()
                raise
        raise RuntimeError(f"docker-registry could not bind a port: {last_error}")

    def _probe(self) -> bool:
        conn: http.client.HTTPConnection
        if self.tls:
            conn = http.client.HTTPSConnection(LOOPBACK, self.port, timeout=2, context=ssl_context(self.ca_cert))
        else:
            conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=2)
        try:
            conn.request("GET", "/v2/")
            resp = conn.getresponse()
            resp.read()
            # The header proves it is our registry answering, not whoever won a race for the port.
            return resp.status in (200, 401) and resp.getheader("Docker-Distribution-Api-Version") is not None
        finally:
            conn.close()

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                tail = self.logs()[-2000:]
                if "address already in use" in tail:
                    raise _PortTaken(tail)
                raise RuntimeError(f"docker-registry exited with {self.process.returncode}:\n{tail}")
            try:
                if self._probe():
                    return
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry not ready on {self.url} after {timeout}s:\n{self.logs()[-2000:]}")
            time.sleep(0.01)  # poll interval, not a timing assumption

    def stop(self) -> None:
        """Terminate the process (kill after 5 s) and reap it. Idempotent."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        else:
            proc.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> "Registry":
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        kind = "mirror" if self.upstream_url else ("tls" if self.tls else "plain")
        return f"<Registry {kind} {self.url if self.port else '(stopped)'}>"


class _PortTaken(RuntimeError):
    pass


# -- skopeo --------------------------------------------------------------------------------------------------------


def _skopeo_env(tmp: Path) -> dict[str, str]:
    """Keep skopeo off the host's auth files, registries.conf, /var/lib/containers cache and /var/tmp."""
    (tmp / "auth.json").write_text('{"auths":{}}')
    (tmp / "registries.conf").write_text("")
    (tmp / "data").mkdir(exist_ok=True)
    return _clean_env({
        "HOME": str(tmp),
        "XDG_CONFIG_HOME": str(tmp),
        "XDG_RUNTIME_DIR": str(tmp),
        "XDG_DATA_HOME": str(tmp / "data"),
        "DOCKER_CONFIG": str(tmp),
        "REGISTRY_AUTH_FILE": str(tmp / "auth.json"),
        "CONTAINERS_REGISTRIES_CONF": str(tmp / "registries.conf"),
        "TMPDIR": str(tmp),
        # containers/image puts root's blob-info cache in /var/lib/containers/cache; as "rootless" it uses
        # $XDG_DATA_HOME/containers/cache, i.e. this temporary directory.
        "_CONTAINERS_ROOTLESS_UID": str(os.getuid() or 65534),
    })


def _skopeo(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    skopeo = _require_tool("skopeo", "pushing OCI layouts to a test registry")
    cmd = [skopeo, "--insecure-policy", "--tmpdir", str(tmp), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_skopeo_env(tmp), stdin=subprocess.DEVNULL,
                          timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.strip()}")
    return proc


def _creds_arg(creds: tuple[str, str] | str | None) -> str | None:
    if creds is None:
        return None
    return creds if isinstance(creds, str) else f"{creds[0]}:{creds[1]}"


def push_layout(
    layout_dir: str | os.PathLike[str],
    tag_in_layout: str,
    dest_ref: str,
    *,
    tls_verify: bool = False,
    creds: tuple[str, str] | str | None = None,
    cert_dir: str | os.PathLike[str] | None = None,
    all_platforms: bool = False,
    format: str | None = None,
) -> str:
    """``skopeo copy oci:LAYOUT:TAG docker://HOST/REPO:TAG``; returns the pushed manifest (or index) digest.

    Digests are preserved (``--preserve-digests``) unless ``format`` ("oci", "v2s2") asks for a conversion,
    which necessarily changes the manifest digest. ``all_platforms`` pushes every image of an index (``--all``).
    """
    dest = dest_ref if dest_ref.startswith("docker://") else f"docker://{dest_ref}"
    with tempfile.TemporaryDirectory(prefix="dirge-skopeo-") as tmpdir:
        tmp = Path(tmpdir)
        args = ["copy", "--quiet", "--retry-times=0", f"--dest-tls-verify={'true' if tls_verify else 'false'}",
                "--dest-authfile", str(tmp / "auth.json"), "--digestfile", str(tmp / "digest")]
        if format is None:
            args.append("--preserve-digests")
        else:
            args += ["--format", format]
        if all_platforms:
            args.append("--all")
        if (c := _creds_arg(creds)) is not None:
            args += ["--dest-creds", c]
        if cert_dir is not None:
            args += ["--dest-cert-dir", str(cert_dir)]
        args += [f"oci:{layout_dir}:{tag_in_layout}", dest]
        _skopeo(args, tmp)
        return (tmp / "digest").read_text().strip()


def skopeo_inspect_raw(
    ref: str,
    *,
    tls_verify: bool = False,
    creds: tuple[str, str] | str | None = None,
    cert_dir: str | os.PathLike[str] | None = None,
) -> bytes:
    """The raw manifest bytes of ``HOST/REPO:TAG`` (or ``@sha256:...``) as skopeo fetches them."""
    src = ref if "://" in ref else f"docker://{ref}"
    with tempfile.TemporaryDirectory(prefix="dirge-skopeo-") as tmpdir:
        tmp = Path(tmpdir)
        args = ["inspect", "--raw", "--retry-times=0", f"--tls-verify={'true' if tls_verify else 'false'}",
                "--authfile", str(tmp / "auth.json")]
        if (c := _creds_arg(creds)) is not None:
            args += ["--creds", c]
        if cert_dir is not None:
            args += ["--cert-dir", str(cert_dir)]
        # --raw output is the exact bytes; text mode would be lossy only for non-UTF-8, which manifests are not.
        return _skopeo([*args, src], tmp).stdout.encode()


def layout_manifest_digest(layout_dir: str | os.PathLike[str], tag: str) -> str:
    """The digest index.json records for ``tag`` in an OCI layout."""
    index = json.loads((Path(layout_dir) / "index.json").read_text())
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return desc["digest"]
    raise KeyError(tag)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- fault-injecting reverse proxy -----------------------------------------------------------------------------------

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
               "transfer-encoding", "upgrade", "expect", "proxy-connection"}
_FAULT_KINDS = {"status", "reset_mid_body", "stall_mid_body", "corrupt_body", "no_range", "close", "lost_answer"}
_REPO_PATH = re.compile(r"^/v2/(?P<name>.+?)/(?:manifests|blobs|tags|referrers)/")


@dataclass
class Fault:
    pattern: re.Pattern[str]
    kind: str
    times: int
    method: str | None
    kw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenRequest:
    method: str
    service: str | None
    scopes: tuple[str, ...]
    username: str | None  # from HTTP Basic (GET) or the password grant (POST)
    status: int
    grant: str | None = None  # the POST's grant_type (password, refresh_token)
    client_id: str | None = None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, proxy: "FaultProxy") -> None:
        self.proxy = proxy
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__((LOOPBACK, 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up mid-response are part of the tests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "dirge-fault-proxy"
    timeout = 60
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self) -> None:
        self.server.proxy._handle(self)

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_OPTIONS = _dispatch


class _Reset(Exception):
    """The connection was reset on purpose; nothing more may be written."""


class FaultProxy:
    """A loopback HTTP/1.1 reverse proxy in front of ``upstream_url`` that misbehaves on request.

    ``fail(path_regex, kind, times=1, method=None, **kw)`` queues a fault for the next ``times`` requests whose
    path (with query) matches ``re.search(path_regex)``; faults are tried in the order queued. Kinds:

    * ``"status"``: answer ``kw["status"]`` (default 503) without asking upstream; ``retry_after="1"`` adds a
      ``Retry-After`` header, ``headers={...}`` more headers, ``body=b"..."`` a body (default: a registry error JSON).
    * ``"reset_mid_body"``: upstream's status and headers (full Content-Length), then the first
      ``after_bytes`` (default half) of the body, then an RST (SO_LINGER 0).
    * ``"stall_mid_body"``: the first ``after_bytes`` (default half) of the body, then a wait until the
      ``threading.Event`` ``kw["release"]`` is set (at most 60 s), then the rest.
    * ``"corrupt_body"``: upstream's answer with the byte at ``offset`` (default the middle) XOR 0xFF; same length.
      With ``release=Event``, it also stalls after ``after_bytes`` like ``stall_mid_body``; with
      ``reset_after=N`` it resets the connection after N bytes like ``reset_mid_body``.
    * ``"no_range"``: drop ``Range``/``If-Range`` before forwarding, so upstream answers 200 with the whole body.
    * ``"close"``: reset the connection without answering at all.
    * ``"lost_answer"``: forward the request (upstream acts on it), then reset without answering: a
      request that took effect whose answer the client never sees.

    ``expire_every=N``: all issued tokens expire after every N authorized requests (short-lived tokens,
    without clocks). With ``bearer=True``, ``/v2/...`` needs ``Authorization: Bearer TOKEN`` with a token from ``GET /token``
    (or the OAuth2 ``POST /token`` password grant) whose scope covers the repository; otherwise 401 with a
    ``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` challenge. With ``bearer_creds=(user, pw)`` the
    token endpoint rejects wrong Basic credentials with 401, and missing ones too unless ``allow_anonymous``.
    With ``refresh_token=T``, ``POST /token`` with ``grant_type=refresh_token`` and ``refresh_token=T`` gets a token
    (another refresh token gets 401): docker's ``identitytoken``.
    Faults apply only to requests that pass the auth check (and to ``/token`` itself).

    ``requests`` lists ``(method, path, status)`` of everything answered (status 0 for ``"close"``);
    ``token_requests`` lists :class:`TokenRequest`; ``faults_fired`` lists ``(method, path, kind)``.
    """

    def __init__(
        self,
        upstream_url: str,
        *,
        upstream_ca: str | os.PathLike[str] | None = None,
        bearer: bool = False,
        bearer_creds: tuple[str, str] | None = None,
        allow_anonymous: bool | None = None,
        service: str = "test-registry",
        expire_every: int | None = None,
        refresh_token: str | None = None,
    ) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme not in ("http", "https") or parts.hostname not in (LOOPBACK, "localhost"):
            raise ValueError(f"upstream must be http(s)://127.0.0.1:PORT, not {upstream_url!r}")
        self.upstream_url = f"{parts.scheme}://{parts.netloc}"
        self._upstream_netloc = parts.netloc
        self._upstream_port = parts.port or (443 if parts.scheme == "https" else 80)
        self._upstream_ctx = ssl_context(upstream_ca) if parts.scheme == "https" else None
        self.bearer = bearer
        self.bearer_creds = bearer_creds
        self.refresh_token = refresh_token  # the OAuth2 refresh_token grant accepts this one (docker's identitytoken)
        self.allow_anonymous = (bearer_creds is None) if allow_anonymous is None else allow_anonymous
        self.service = service
        # short-lived tokens, deterministically: every issued token expires after this many authorized requests
        self.expire_every = expire_every
        self._authorized_count = 0
        self.requests: list[tuple[str, str, int]] = []
        self.token_requests: list[TokenRequest] = []
        self.faults_fired: list[tuple[str, str, str]] = []
        self._faults: list[Fault] = []
        self._tokens: dict[str, set[tuple[str, str]]] = {}  # token -> {(repository, action)}
        self._lock = threading.Lock()
        self._server = _Server(self)
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # control

    def fail(self, path_regex: str, kind: str, times: int = 1, *, method: str | None = None, **kw: Any) -> "FaultProxy":
        if kind not in _FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(_FAULT_KINDS)}")
        if kind == "stall_mid_body" and not isinstance(kw.get("release"), threading.Event):
            raise ValueError("stall_mid_body needs release=threading.Event()")
        with self._lock:
            self._faults.append(Fault(re.compile(path_regex), kind, times, method.upper() if method else None, kw))
        return self

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def pending_faults(self) -> int:
        with self._lock:
            return sum(f.times for f in self._faults)

    def expire_tokens(self) -> None:
        """Forget every issued token, as if they expired: the next request with one gets a 401 challenge."""
        with self._lock:
            self._tokens.clear()

    def start(self) -> "FaultProxy":
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=f"fault-proxy-{self.port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, reset connections still open (idle keep-alives too), close the listener. Idempotent."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        with self._server.sockets_lock:
            for sock in list(self._server.open_sockets):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<FaultProxy {self.url} -> {self.upstream_url}{' bearer' if self.bearer else ''}>"

    # request handling (handler threads)

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.times > 0 and (fault.method is None or fault.method == method) and fault.pattern.search(path):
                    fault.times -= 1
                    if fault.times == 0:
                        self._faults.remove(fault)
                    self.faults_fired.append((method, path, fault.kind))
                    return fault
        return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))

    @staticmethod
    def _read_body(h: _Handler) -> bytes | None:
        if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(h.rfile.read(size))
                h.rfile.readline()
        length = h.headers.get("Content-Length")
        if length is None:
            return None
        return h.rfile.read(int(length))

    def _handle(self, h: _Handler) -> None:
        method, path = h.command, h.path
        body = self._read_body(h)
        try:
            route = urlsplit(path).path
            if self.bearer and route == "/token":
                fault = self._take_fault(method, path)
                if fault is not None and fault.kind in ("status", "close"):
                    self._apply_local_fault(h, fault)
                else:
                    self._serve_token(h, method, path, body)
                return
            if self.bearer and route.startswith("/v2") and not self._authorized(h, method, route):
                self._challenge(h, method, route)
                return
            fault = self._take_fault(method, path)
            if fault is not None and fault.kind in ("status", "close"):
                self._apply_local_fault(h, fault)
                return
            self._forward(h, method, path, body, fault)
        except _Reset:
            return
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True

    # -- local answers

    def _send(self, h: _Handler, method: str, path: str, status: int, headers: list[tuple[str, str]],
              body: bytes) -> None:
        self._record(method, path, status)  # before answering, so a client that has the answer sees the record
        h.send_response_only(status)
        h.send_header("Date", h.date_time_string())
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(body)

    def _apply_local_fault(self, h: _Handler, fault: Fault) -> None:
        if fault.kind == "close":
            self._record(h.command, h.path, 0)
            self._reset(h)
        status = int(fault.kw.get("status", 503))
        headers = [("Docker-Distribution-Api-Version", "registry/2.0")]
        if "retry_after" in fault.kw:
            headers.append(("Retry-After", str(fault.kw["retry_after"])))
        headers += list(fault.kw.get("headers", {}).items())
        body = fault.kw.get("body")
        if body is None:
            code = {429: "TOOMANYREQUESTS", 401: "UNAUTHORIZED", 403: "DENIED", 404: "NOT_FOUND"}.get(status, "UNKNOWN")
            body = json.dumps({"errors": [{"code": code, "message": f"injected {status}", "detail": None}]}).encode()
            headers.append(("Content-Type", "application/json"))
        self._send(h, h.command, h.path, status, headers, body if isinstance(body, bytes) else str(body).encode())

    @staticmethod
    def _reset(h: _Handler) -> None:
        """Abort the client connection with an RST once what was written has reached the peer (bounded wait)."""
        sock = h.connection
        deadline = time.monotonic() + 2.0
        try:
            while time.monotonic() < deadline:
                unsent = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
                if unsent == 0:
                    break
                time.sleep(0.001)  # poll for the send queue to drain
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        h.close_connection = True
        sock.close()
        h.rfile.close()  # drops the last reference: the real close(2), which sends the RST
        raise _Reset

    # -- bearer auth

    @staticmethod
    def _needed_scope(method: str, route: str) -> tuple[str, str] | None:
        m = _REPO_PATH.match(route)
        if m is None:
            return None
        return m.group("name"), ("pull" if method in ("GET", "HEAD") else "push")

    def _authorized(self, h: _Handler, method: str, route: str) -> bool:
        auth = h.headers.get("Authorization", "")
        if not auth.lower().startswith("bearer "):
            return False
        with self._lock:
            granted = self._tokens.get(auth[7:].strip())
        if granted is None:
            return False
        need = self._needed_scope(method, route)
        if not (need is None or need in granted):
            return False
        with self._lock:
            self._authorized_count += 1
            if self.expire_every and self._authorized_count % self.expire_every == 0:
                self._tokens.clear()  # this request passes; the next ones with these tokens get 401
        return True

    def _challenge(self, h: _Handler, method: str, route: str) -> None:
        challenge = f'Bearer realm="{self.url}/token",service="{self.service}"'
        need = self._needed_scope(method, route)
        if need is not None:
            actions = "pull" if need[1] == "pull" else "pull,push"
            challenge += f',scope="repository:{need[0]}:{actions}"'
        body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required",
                                       "detail": None}]}).encode()
        self._send(h, method, h.path, 401, [("Content-Type", "application/json"), ("WWW-Authenticate", challenge),
                                            ("Docker-Distribution-Api-Version", "registry/2.0")], body)

    def _serve_token(self, h: _Handler, method: str, path: str, body: bytes | None) -> None:
        query = parse_qs(urlsplit(path).query)
        username = password = None
        grant = client_id = None
        refreshed: bool | None = None
        if method == "POST":
            form = parse_qs((body or b"").decode())
            query = {**query, **form}
            scopes = tuple(s for v in form.get("scope", []) for s in v.split(" ") if s)
            grant = form.get("grant_type", [""])[0]
            client_id = form.get("client_id", [None])[0]
            if grant == "password":
                username, password = form.get("username", [""])[0], form.get("password", [""])[0]
            if grant == "refresh_token":
                refreshed = self.refresh_token is not None and form.get("refresh_token", [""])[0] == self.refresh_token
        else:
            scopes = tuple(query.get("scope", []))
        auth = h.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                username, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                username, password = "", ""
        service = query.get("service", [None])[0]
        status = 200
        if method not in ("GET", "POST") or (service is not None and service != self.service):
            status = 400
        elif refreshed is not None:
            status = 200 if refreshed else 401
        elif self.bearer_creds is not None:
            if username is None:
                status = 200 if self.allow_anonymous else 401
            elif (username, password) != tuple(self.bearer_creds):
                status = 401
        with self._lock:
            self.token_requests.append(TokenRequest(method, service, scopes, username, status, grant, client_id))
        if status != 200:
            err = {"errors": [{"code": "UNAUTHORIZED" if status == 401 else "UNSUPPORTED", "message": "token denied"}]}
            self._send(h, method, path, status, [("Content-Type", "application/json")], json.dumps(err).encode())
            return
        granted: set[tuple[str, str]] = set()
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and name:
                granted |= {(name, a) for a in actions.split(",") if a in ("pull", "push")}
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = granted
        reply = {"token": token, "access_token": token, "expires_in": 300,
                 "issued_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        self._send(h, method, path, 200, [("Content-Type", "application/json")], json.dumps(reply).encode())

    # -- forwarding

    def _forward(self, h: _Handler, method: str, path: str, body: bytes | None, fault: Fault | None) -> None:
        drop = set(_HOP_BY_HOP) | {"host", "content-length"}
        for token in h.headers.get("Connection", "").split(","):
            drop.add(token.strip().lower())
        if self.bearer:
            drop.add("authorization")
        if fault is not None and fault.kind == "no_range":
            drop |= {"range", "if-range"}
        if self._upstream_ctx is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                LOOPBACK, self._upstream_port, timeout=60, context=self._upstream_ctx)
        else:
            conn = http.client.HTTPConnection(LOOPBACK, self._upstream_port, timeout=60)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", self._upstream_netloc)
            for k, v in h.headers.items():
                if k.lower() not in drop:
                    conn.putheader(k, v)
            if body is not None or method in ("PUT", "POST", "PATCH"):
                conn.putheader("Content-Length", str(len(body or b"")))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            self._relay(h, method, path, resp, fault)
        finally:
            conn.close()

    def _rewrite_location(self, value: str) -> str:
        for base in (self.upstream_url, self.upstream_url.replace(LOOPBACK, "localhost")):
            if value.startswith(base + "/") or value == base:
                return self.url + value[len(base):]
        return value

    def _relay(self, h: _Handler, method: str, path: str, resp: http.client.HTTPResponse,
               fault: Fault | None) -> None:
        if fault is not None and fault.kind == "lost_answer":
            resp.read()
            self._record(method, path, 0)
            self._reset(h)
        headers = []
        for k, v in resp.getheaders():
            kl = k.lower()
            if kl in _HOP_BY_HOP or kl == "content-length":
                continue
            headers.append((k, self._rewrite_location(v) if kl == "location" else v))
        no_body = method == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        length_header = resp.getheader("Content-Length")
        chunks: Iterator[bytes]
        if no_body:
            length, chunks = (int(length_header) if length_header else None), iter(())
        elif length_header is not None:
            length = int(length_header)
            chunks = iter(lambda: resp.read(65536), b"")
        else:
            data = resp.read()  # upstream chose chunked or close-delimited: buffer, then send with a length
            length, chunks = len(data), iter([data])

        self._record(method, path, resp.status)  # before answering, so a client that has the answer sees it
        h.send_response_only(resp.status, resp.reason)
        for k, v in headers:
            h.send_header(k, v)
        if length is not None:
            h.send_header("Content-Length", str(length))
        h.end_headers()
        if no_body:
            return
        assert length is not None
        kind = fault.kind if fault is not None else None
        cut = (int(fault.kw.get("after_bytes", length // 2)) if kind == "reset_mid_body"
               else int(fault.kw["reset_after"]) if kind == "corrupt_body" and "reset_after" in fault.kw else None)
        flip = int(fault.kw.get("offset", length // 2)) if kind == "corrupt_body" else None
        stall = (int(fault.kw.get("after_bytes", length // 2))
                 if kind == "stall_mid_body" or (kind == "corrupt_body" and "release" in fault.kw) else None)
        sent = 0
        for chunk in chunks:
            if stall is not None and sent + len(chunk) >= stall:
                h.wfile.write(chunk[: stall - sent])
                h.wfile.flush()
                fault.kw["release"].wait(60)
                chunk, sent, stall = chunk[stall - sent:], stall, None
            if flip is not None and sent <= flip < sent + len(chunk):
                i = flip - sent
                chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1:]
            if cut is not None and sent + len(chunk) >= cut:
                h.wfile.write(chunk[: cut - sent])
                self._reset(h)
            h.wfile.write(chunk)
            sent += len(chunk)
        if cut is not None:  # body shorter than the cut point: still reset
            self._reset(h)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """A loopback token server for distribution's token auth: RS256 JWTs signed (with openssl) by a self-signed
    certificate the registry trusts (``registry_auth()`` is the registry's ``auth: token:`` config).

    ``GET /token`` with HTTP Basic ``pusher`` grants what is asked (for pushing the test image);
    ``POST /token`` with ``grant_type=refresh_token`` and ``refresh_token`` equal to ``refresh_token`` grants pull
    (docker's identitytoken, the OAuth2 flow); everything else is 401. ``requests`` lists ``(method, grant,
    client_id, scope, status)``. Started by :meth:`start`, ended by :meth:`stop`.
    """

    SERVICE, ISSUER = "dirge-token-test", "dirge-token-issuer"

    def __init__(self, workdir: Path, refresh_token: str, pusher: tuple[str, str]) -> None:
        self.workdir = workdir
        self.refresh_token = refresh_token
        self.pusher = pusher
        self.key, self.cert = workdir / "issuer.key", workdir / "issuer.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
                        "-out", str(self.cert), "-days", "2", "-subj", "/CN=dirge token issuer"],
                       check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True,
                             capture_output=True).stdout
        self._x5c = base64.b64encode(der).decode()
        self.requests: list[tuple[str, str | None, str | None, str, int]] = []
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                issuer._answer(self, "GET", parse_qs(urlsplit(self.path).query))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                issuer._answer(self, "POST", parse_qs(self.rfile.read(length).decode()))

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def realm(self) -> str:
        return f"http://{LOOPBACK}:{self._server.server_address[1]}/token"

    def registry_auth(self) -> dict[str, str]:
        return {"realm": self.realm, "service": self.SERVICE, "issuer": self.ISSUER,
                "rootcertbundle": str(self.cert)}

    def start(self) -> "TokenIssuer":
        self._thread = threading.Thread(target=self._server.serve_forever, name="token-issuer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def _sign(self, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {"iss": self.ISSUER, "sub": "dirge", "aud": self.SERVICE, "exp": now + 600, "nbf": now - 60,
                  "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing_input.encode(),
                                   check=True, capture_output=True).stdout
        return f"{signing_input}.{_b64url(signature)}"

    def _answer(self, h: BaseHTTPRequestHandler, method: str, form: dict[str, list[str]]) -> None:
        scope = " ".join(form.get("scope", []))
        grant = form.get("grant_type", [None])[0]
        client_id = form.get("client_id", [None])[0]
        auth = h.headers.get("Authorization", "")
        basic = base64.b64decode(auth[6:]).decode() if auth.lower().startswith("basic ") else None
        if method == "GET" and basic == ":".join(self.pusher):
            actions = None  # whatever is asked
        elif method == "POST" and grant == "refresh_token" and form.get("refresh_token", [""])[0] == self.refresh_token:
            actions = {"pull"}
        else:
            actions = set()
        access = []
        for item in scope.split(" "):
            kind, _, rest = item.partition(":")
            name, _, asked = rest.rpartition(":")
            if kind == "repository" and name:
                allowed = [a for a in asked.split(",") if actions is None or a in actions]
                if allowed:
                    access.append({"type": "repository", "name": name, "actions": allowed})
        status = 200 if access or actions is None else 401
        self.requests.append((method, grant, client_id, scope, status))
        body = json.dumps({"token": self._sign(access), "access_token": self._sign(access), "expires_in": 600}
                          if status == 200 else {"errors": [{"code": "UNAUTHORIZED", "message": "denied"}]}).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
