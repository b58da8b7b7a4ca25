"""An OCI distribution-spec client over httpx: ping, auth challenges, manifests, blobs.

- Endpoints: registries.conf's mirrors first, then the primary location (its ``location``, else the
  ref's registry; Docker Hub's API host for docker.io); see ``registries_conf``. Each endpoint has its
  own repository name (a location rewrites it); the ref's identity in the cache stays as written.
- Scheme: HTTPS; loopback registries (127.0.0.0/8, localhost, ::1) and ones configured insecure (or all
  with ``--no-tls-verify``) fall back to plain HTTP when the TLS handshake fails, as Docker does; an
  insecure one's certificate is not verified. Never silently elsewhere; ``--tls-verify`` forbids both.
- Trust: the system store (honouring $SSL_CERT_FILE) plus ``certs.d/<host[:port]>/*.crt`` (and client
  ``*.cert``/``*.key`` pairs), or ``--cert-dir``'s instead (containers-certs.d(5)).
- Auth: the first 401 says how (Bearer realm/service/scope, or Basic); tokens are cached per scope and
  refreshed on a later 401. Credentials: see ``auth``; never in messages, and never in the clear: Basic
  credentials and tokens go over TLS, or over plain HTTP only to a host registries.conf marks insecure
  (or a loopback one when the registry itself is plain HTTP); see ``Endpoint.clear_ok``.
- Retries with exponential backoff and jitter on 429 (Retry-After honoured), 5xx, resets and timeouts;
  blob downloads resume with Range, are hashed while streaming to a temp file, and are published into
  the cache only when size and digest match.
- Hostile servers: every body is read with a bound (manifests 4 MiB, token answers 1 MiB, error bodies
  64 KiB); a manifest or token fetch has a total deadline ($DIRGE_REGISTRY_DEADLINE, 300 s), each read a
  timeout ($DIRGE_REGISTRY_TIMEOUT, 60 s), a blob a minimum rate over one read timeout
  ($DIRGE_REGISTRY_MIN_RATE, 1024 bytes/s); redirect loops are a RegistryError; httpx drops credentials on
  cross-origin redirects. Fetched manifests are cached (and the ref recorded) only once the image resolved.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import functools
import hashlib
import io
import ipaddress
import json
import os
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlencode

import httpcore
import httpx

from ..store.cache import Cache
from ..config import Config
from ..errors import AuthError, DirgeError, IntegrityError, NotFound, RateLimited, RegistryError
from ..oci.image import CONFIG_TYPES, DOCKER_LIST, DOCKER_MANIFEST, INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST
from ..oci.image import Descriptor
from ..oci.image import DOCKER_SCHEMA1, MAX_MANIFEST_BYTES, parse_index, parse_manifest
from ..oci.reference import Digest, RegistryReference, parse_digest
from ..waits import waiting
from .auth import Credentials, RegistryOptions, find_credentials
from .registries_conf import Location, RegistriesConf, load_registries_conf, registries_conf_path
from .partial import PartialBlob, sweep_orphans

T = TypeVar("T")
ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])
DOCKER_HUB_API = "registry-1.docker.io"
CERTS_DIRS = ("~/.config/containers/certs.d", "/etc/containers/certs.d", "/etc/docker/certs.d")
_RETRYABLE_STATUS = {429, 500, 502, 503, 504}

# httpcore asks its network stream for 64 KiB a read, and each read is a pass through h11 in Python
# holding the GIL the layer pipeline needs: 1 MiB reads take a fifth off a blob download's CPU
# (docs/BENCHMARKS.md). httpx has no setting for it (its HTTPTransport takes no network backend), so each
# Endpoint's client gets its own transport: an httpcore pool, through httpcore's public network-backend
# API, whose streams read up to READ_BYTES. Nothing outside dirge's own clients changes.
READ_BYTES = 1 << 20


class _LargeReads(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max(max_bytes, READ_BYTES), timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _LargeReads(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _LargeReadBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _LargeReads(self._backend.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _LargeReads(self._backend.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


# httpcore's errors as httpx raises them (the most specific class first, as httpx's own transport maps them)
_HTTPX_ERRORS: dict[type[Exception], type[httpx.TransportError]] = {
    httpcore.ConnectTimeout: httpx.ConnectTimeout, httpcore.ReadTimeout: httpx.ReadTimeout,
    httpcore.WriteTimeout: httpx.WriteTimeout, httpcore.PoolTimeout: httpx.PoolTimeout,
    httpcore.TimeoutException: httpx.TimeoutException, httpcore.ConnectError: httpx.ConnectError,
    httpcore.ReadError: httpx.ReadError, httpcore.WriteError: httpx.WriteError,
    httpcore.NetworkError: httpx.NetworkError, httpcore.ProxyError: httpx.ProxyError,
    httpcore.UnsupportedProtocol: httpx.UnsupportedProtocol,
    httpcore.RemoteProtocolError: httpx.RemoteProtocolError,
    httpcore.LocalProtocolError: httpx.LocalProtocolError, httpcore.ProtocolError: httpx.ProtocolError,
}


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for cls in type(exc).__mro__:
            if cls in _HTTPX_ERRORS:
                raise _HTTPX_ERRORS[cls](str(exc)) from exc
        raise


class _Body(httpx.SyncByteStream):
    def __init__(self, stream: Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _as_httpx_errors():
            yield from self._stream

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


class LargeReadTransport(httpx.BaseTransport):
    """httpx's ``HTTPTransport`` (HTTP/1.1, no proxy: httpx mounts its own for proxies from the
    environment) over ``_LargeReadBackend``."""

    def __init__(self, verify: ssl.SSLContext | None) -> None:
        """``verify``: the TLS context; None for a plain-http registry, which needs one only if it
        redirects to https (httpcore then makes its default when that connection opens): loading a trust
        store costs ~20 ms, which a cold prepare from a local registry would otherwise spend for nothing."""
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)
        self._pool = httpcore.ConnectionPool(
            ssl_context=verify, max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            network_backend=_LargeReadBackend())

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        url = request.url
        core = httpcore.Request(method=request.method, headers=request.headers.raw, content=request.stream,
                                url=httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port,
                                                 target=url.raw_path),
                                extensions=request.extensions)
        with _as_httpx_errors():
            response = self._pool.handle_request(core)
        assert isinstance(response.stream, Iterable)
        return httpx.Response(status_code=response.status, headers=response.headers, stream=_Body(response.stream),
                              extensions=response.extensions)

    def close(self) -> None:
        self._pool.close()


def retry_base() -> float:
    return float(os.environ.get("DIRGE_RETRY_BASE", "0.5"))


def _env_float(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, "") or default)
    except ValueError:
        raise DirgeError(f"${name} must be a number of seconds or bytes, not {os.environ[name]!r}") from None
    return value if value > 0 else default


def read_timeout() -> float:
    """Seconds one socket read may wait ($DIRGE_REGISTRY_TIMEOUT, default 60)."""
    return _env_float("DIRGE_REGISTRY_TIMEOUT", 60.0)


def metadata_deadline() -> float:
    """Seconds a whole manifest or token fetch may take, retries included ($DIRGE_REGISTRY_DEADLINE, 300)."""
    return _env_float("DIRGE_REGISTRY_DEADLINE", 300.0)


def min_rate() -> float:
    """Bytes per second below which a blob download (measured over one read timeout) is a stall
    ($DIRGE_REGISTRY_MIN_RATE, default 1024): a slow-drip server cannot hold a pull forever."""
    return _env_float("DIRGE_REGISTRY_MIN_RATE", 1024.0)


_ERROR_BODY_BYTES = 65536
_TOKEN_BYTES = 1 << 20
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # visible ASCII: a token goes into a header


def _drain(response: httpx.Response, limit: int = _ERROR_BODY_BYTES) -> bytes:
    """At most ``limit`` bytes of a body we do not need whole (an error answer), then close it."""
    data = b""
    try:
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= limit:
                break
    except (httpx.HTTPError, httpx.StreamError):
        pass
    finally:
        response.close()
    return data[:limit]


def read_limited(response: httpx.Response, limit: int, deadline: float, what: str, kind: str) -> bytes:
    """The whole body, or a RegistryError once it passes ``limit`` bytes or the monotonic ``deadline``."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > limit:
        response.close()
        raise RegistryError(f"{what}: {kind} larger than {limit} bytes (Content-Length {length})")
    parts: list[bytes] = []
    total = 0
    try:
        for chunk in response.iter_bytes():
            total += len(chunk)
            if total > limit:
                raise RegistryError(f"{what}: {kind} larger than {limit} bytes")
            parts.append(chunk)
            if time.monotonic() > deadline:
                raise RegistryError(f"{what}: {kind} too slow: not complete after {metadata_deadline():g} s "
                                    f"({total} bytes so far)", retryable=True)
    except (httpx.HTTPError, httpx.StreamError) as exc:
        raise RegistryError(f"{what}: reading the {kind} failed: {type(exc).__name__}: {exc}",
                            retryable=True) from None
    finally:
        response.close()
    return b"".join(parts)


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:host.index("]")]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


_MAX_CHALLENGE = 8192


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    if len(header) > _MAX_CHALLENGE:  # no real challenge is this long: unusable, not parsed
        return "", {}
    scheme, _, rest = header.strip().partition(" ")
    # \b: a name starts only at a word start, so a long run of word characters is scanned once, not n² times
    params = dict(re.findall(r'\b(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return min(float(value), 60.0)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, min(parsed.timestamp() - time.time(), 60.0)) if parsed else None


def _error_codes(response: httpx.Response) -> tuple[tuple[str, ...], str]:
    try:
        try:
            data = response.content[:_ERROR_BODY_BYTES]
        except httpx.ResponseNotRead:
            data = _drain(response)
        body = json.loads(data)
        errors = body.get("errors") or []
        codes = tuple(str(e.get("code", "")) for e in errors if isinstance(e, dict))
        message = "; ".join(str(e.get("message", "")) for e in errors if isinstance(e, dict) and e.get("message"))
        return codes, message
    except (ValueError, AttributeError, httpx.HTTPError):
        return (), ""


def _load_cert_dir(ctx: ssl.SSLContext, folder: Path) -> None:
    """containers-certs.d(5): ``*.crt`` are CAs, ``NAME.cert`` + ``NAME.key`` a client certificate."""
    try:
        for cert in sorted(folder.glob("*.crt")):
            ctx.load_verify_locations(cafile=str(cert))
        for client in sorted(folder.glob("*.cert")):
            key = client.with_suffix(".key")
            if not key.is_file():
                raise DirgeError(f"client certificate {client} has no key {key.name} beside it; add it or remove "
                                 "the certificate")
            ctx.load_cert_chain(str(client), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise DirgeError(f"read certificates in {folder}: {exc}; fix or remove the file") from None


def ssl_context(host: str, cert_dir: Path | None = None, verify: bool = True) -> ssl.SSLContext:
    """The TLS context for ``host[:port]``: ``cert_dir`` if given, else its certs.d directories
    ($DIRGE_CERTS_DIRS, else ~/.config/containers/certs.d, /etc/containers/certs.d, /etc/docker/certs.d);
    ``verify=False`` (an insecure registry) accepts any certificate."""
    dirs = os.environ.get("DIRGE_CERTS_DIRS")
    folders = [] if cert_dir is not None else [
        folder for base in (dirs.split(":") if dirs else CERTS_DIRS)
        if (folder := Path(base).expanduser() / host).is_dir()]
    if verify and cert_dir is None and not folders:
        return system_tls()
    ctx = ssl.create_default_context()  # system trust; OpenSSL reads $SSL_CERT_FILE / $SSL_CERT_DIR
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_dir is not None:
        if not cert_dir.is_dir():
            raise DirgeError(f"--cert-dir {cert_dir}: not a directory; give one holding CA *.crt files")
        _load_cert_dir(ctx, cert_dir)
        return ctx
    for folder in folders:
        _load_cert_dir(ctx, folder)
    return ctx


def system_tls() -> ssl.SSLContext:
    """The system-trust context, made once a process (per $SSL_CERT_FILE / $SSL_CERT_DIR, which OpenSSL
    reads when it is made): loading the trust store costs ~20 ms, and every client (origin, mirrors, each
    prepare) would pay it again; it is only read after it is made."""
    return _system_tls(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.lru_cache(maxsize=4)
def _system_tls(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    return ssl.create_default_context()


# https:// base URLs of fallback-allowed hosts (loopback, registries.conf ``insecure``) that answered a TLS
# handshake with plain http in this process
_PLAIN_HTTP: set[str] = set()


class Endpoint:
    """One base URL (origin or mirror) with its HTTP client and auth state."""

    def __init__(self, url: str, host: str, creds: Credentials | None | Callable[[], Credentials | None],
                 timeout: float, fallback_http: bool, insecure: Callable[[str], bool] = lambda host: False, *,
                 cert_dir: Path | None = None, verify_tls: bool = True) -> None:
        self.url = url.rstrip("/")
        self.host = host
        # credentials, or how to find them once a 401 asks (a mirror's auth files are read only then)
        self._creds = creds
        self._creds_found = not callable(creds)
        self.fallback_http = fallback_http
        self.insecure = insecure  # registries.conf's ``insecure = true``, by host[:port]
        verify = ssl_context(host, cert_dir, verify_tls) if self.url.startswith("https://") else None
        # a host that may fall back and already answered plain http in this process starts there (its
        # failed TLS handshake cost a round trip per client); if it no longer does, _call goes back to https
        self.remembered_http = fallback_http and self.url.startswith("https://") and self.url in _PLAIN_HTTP
        if self.remembered_http:
            self.url = "http://" + self.url[len("https://"):]
        # httpx drops Authorization on cross-origin redirects (https → http is one)
        self.client = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
                                   verify=True if verify is None else verify,
                                   transport=LargeReadTransport(verify), follow_redirects=True)
        self._tokens: dict[str, str] = {}
        self._basic = False
        self._lock = threading.Lock()

    def back_to_tls(self) -> None:
        """A remembered plain-http host that no longer serves plain http: https again, and forgotten."""
        self.remembered_http = False
        self.url = "https://" + self.url[len("http://"):]
        _PLAIN_HTTP.discard(self.url)

    @property
    def creds(self) -> Credentials | None:
        if not self._creds_found:
            assert callable(self._creds)
            self._creds = self._creds()
            self._creds_found = True
        assert not callable(self._creds)
        return self._creds

    def close(self) -> None:
        self.client.close()

    def _auth_headers(self, scope: str) -> dict[str, str]:
        if scope in self._tokens:
            return {"Authorization": f"Bearer {self._tokens[scope]}"}
        if self._basic and self.creds and not self.creds.identity_token:
            pair = f"{self.creds.username}:{self.creds.password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
        return {}

    def clear_ok(self, url: str) -> bool:
        """Whether credentials (Basic, or a bearer token) may go to ``url``: over TLS always; over plain HTTP
        only to a host registries.conf marks insecure, or to a loopback host when this endpoint itself
        speaks plain HTTP (the bytes never leave the machine, and nothing was downgraded from TLS)."""
        parsed = httpx.URL(url)
        if parsed.scheme == "https":
            return True
        netloc, host = parsed.netloc.decode("ascii", "replace"), parsed.host
        if self.insecure(netloc) or self.insecure(host):
            return True
        return is_loopback(netloc) and not self.url.startswith("https://")

    def _refuse_clear(self, what: str, url: str, kind: str) -> AuthError:
        netloc = httpx.URL(url).netloc.decode("ascii", "replace")
        return AuthError(f"{what}: {self.host} wants {kind} sent to {url[:200]} over plain HTTP, and dirge sends "
                         f"credentials only over TLS; serve it over https://, or, on a trusted network, mark "
                         f"{netloc!r} insecure in {registries_conf_path()} ([[registry]] location = \"{netloc}\" "
                         "insecure = true)", status=401)

    def _authenticate(self, response: httpx.Response, scope: str, what: str) -> None:
        scheme, params = _parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            if not self.creds or self.creds.identity_token:
                raise AuthError(f"{what}: {self.host} needs credentials (docker login, --creds, or an auth file)",
                                status=401)
            if not self.clear_ok(self.url):
                raise self._refuse_clear(what, self.url, "Basic credentials")
            self._basic = True
            return
        realm = params.get("realm", "")
        if scheme != "bearer" or not realm.startswith(("https://", "http://")):
            raise AuthError(f"{what}: {self.host} answered 401 without a usable challenge", status=401)
        try:
            clear_ok = self.clear_ok(realm)
        except (httpx.InvalidURL, ValueError) as exc:
            raise RegistryError(f"{what}: token request to {realm[:200]} failed: {type(exc).__name__}: {exc}",
                                retryable=True) from None
        if self.creds and not clear_ok:  # the token request would carry them (Basic)
            raise self._refuse_clear(what, realm, "Basic credentials for a token")
        # The challenge's scope, plus ours where it asks for more (a push's pull,push; a mount's source repo):
        # token servers grant the union of repeated ``scope`` parameters.
        scopes = [params["scope"]] if params.get("scope") else []
        scopes += [s for s in scope.split(" ") if s and s not in scopes]
        query: dict[str, str | list[str]] = {"service": params.get("service", ""), "scope": scopes}
        creds = self.creds
        auth = httpx.BasicAuth(creds.username, creds.password) if creds and not creds.identity_token else None
        deadline = time.monotonic() + metadata_deadline()
        try:
            if creds and creds.identity_token:
                # docker's identitytoken: an OAuth2 refresh token (distribution's token spec, "OAuth2")
                form = {**query, "grant_type": "refresh_token", "client_id": "dirge",
                        "refresh_token": creds.identity_token}
                token_request = self.client.build_request("POST", realm, data=form)
            else:
                token_request = self.client.build_request("GET", realm, params=query)
            token_response = self.client.send(token_request, auth=auth, stream=True)
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
            raise RegistryError(f"{what}: token request to {realm[:200]} failed: {type(exc).__name__}: {exc}",
                                retryable=True) from None
        if token_response.status_code != 200:
            _drain(token_response)
        if token_response.status_code in (401, 403):
            raise AuthError(f"{what}: {self.host} refused the credentials"
                            + ((" (an identitytoken; log in again)" if creds.identity_token else
                                f" for user {creds.username!r}") if creds else " (anonymous)"),
                            status=token_response.status_code)
        if token_response.status_code != 200:
            raise RegistryError(f"{what}: token endpoint answered {token_response.status_code}",
                                status=token_response.status_code, retryable=token_response.status_code >= 500)
        raw = read_limited(token_response, _TOKEN_BYTES, deadline, what, "token answer")
        try:
            body = json.loads(raw)
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
            raise AuthError(f"{what}: the token endpoint of {self.host} returned no token", status=200)
        self._tokens[scope] = token

    def request(self, method: str, path: str, scope: str, what: str, headers: dict[str, str] | None = None,
                stream: bool = False, content: bytes | None = None) -> httpx.Response:
        """One request with auth; retried by the caller. 401 → authenticate once → retry.

        ``path`` is under this endpoint's URL, or an absolute URL (an upload's ``Location``): credentials go
        only to this endpoint's own origin. ``content``: the body (whole, so a 401 can send it again)."""
        url = self.url + path if path.startswith("/") else path
        target, base = httpx.URL(url), httpx.URL(self.url)
        same_origin = (target.scheme, target.netloc) == (base.scheme, base.netloc)
        used = self._auth_headers(scope) if same_origin else {}
        for attempt in range(2):
            if used and not self.clear_ok(self.url):  # a token (even an anonymous one) is a credential too
                raise self._refuse_clear(what, self.url, "a bearer token" if scope in self._tokens else "credentials")
            req = self.client.build_request(method, url, headers={**(headers or {}), **used}, content=content)
            response = self.client.send(req, stream=stream)
            if response.status_code != 401 or attempt == 1 or not same_origin:
                return response
            _drain(response)
            # Download threads share these tokens: only the first to see the one it used refused fetches
            # a new one; the others retry with that (never dropping a token another just fetched).
            with self._lock:
                if self._auth_headers(scope) == used:
                    self._tokens.pop(scope, None)
                    self._authenticate(response, scope, what)
                used = self._auth_headers(scope)
        raise AssertionError("unreachable")


class RegistryClient:
    """A client for one registry (and its mirrors), for one repository at a time.

    Where a ref is fetched from is registries.conf's ``route``: the mirrors, then the primary location,
    each an Endpoint (kept per host, with its auth state) and the repository's name there."""

    def __init__(self, registry: str, *, creds: Credentials | None = None, config: Config | None = None,
                 timeout: float | None = None, attempts: int = 5, options: RegistryOptions | None = None,
                 registries: RegistriesConf | None = None) -> None:
        self.registry = registry
        self.options = options or RegistryOptions()
        self.registries = registries if registries is not None else load_registries_conf(config=config)
        self.creds = creds  # explicit: for the primary location only, never a mirror
        self.attempts = attempts
        timeout = timeout if timeout is not None else read_timeout()
        self.timeout = timeout
        self.on_bytes: Callable[[Descriptor, int], None] | None = None  # download progress (bytes so far)
        self._endpoints: dict[tuple[str, bool], Endpoint] = {}
        self._lock = threading.Lock()

    @property
    def endpoints(self) -> list[Endpoint]:
        """Every endpoint made so far."""
        return list(self._endpoints.values())

    def _insecure(self, host: str) -> bool:
        if self.options.tls_verify is not None:
            return not self.options.tls_verify
        return self.registries.insecure_host(host)

    def _endpoint(self, location: Location, primary: bool) -> Endpoint:
        host = location.host
        insecure = location.insecure if self.options.tls_verify is None else not self.options.tls_verify
        with self._lock:
            endpoint = self._endpoints.get((host, primary))
            if endpoint is None:
                explicit = self.creds if primary else None
                authfile = self.options.authfile

                def lookup() -> Credentials | None:
                    return explicit if explicit is not None else find_credentials(host, location.repository, authfile)

                # the primary's credentials are found before its first request (a helper that fails says
                # so at once); a mirror's only when it asks for them
                creds: Credentials | None | Callable[[], Credentials | None] = lookup() if primary else lookup
                fallback = insecure or (is_loopback(host) and self.options.tls_verify is None)
                api_host = DOCKER_HUB_API if host == "docker.io" else host
                endpoint = Endpoint(f"https://{api_host}", host, creds, self.timeout, fallback, self._insecure,
                                    cert_dir=self.options.cert_dir, verify_tls=not insecure)
                self._endpoints[(host, primary)] = endpoint
            return endpoint

    def routes(self, ref: RegistryReference) -> list[tuple[Endpoint, str]]:
        """The endpoints ``ref`` is fetched from, in order, each with the repository's name there (the
        primary location last)."""
        route = self.registries.route(ref.registry, ref.repository, ref.tag, str(ref.digest) if ref.digest else None)
        out = [(self._endpoint(m, False), m.repository) for m in route.mirrors]
        out.append((self._endpoint(route.primary, True), route.primary.repository))
        return out

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close()

    # -- the retry loop -----------------------------------------------------------------------

    def _call(self, endpoint: Endpoint, method: str, path: str, scope: str, what: str,
              headers: dict[str, str] | None = None, stream: bool = False,
              stop: threading.Event | None = None, content: bytes | None = None) -> httpx.Response:
        delay = retry_base()
        last: Exception | None = None
        for attempt in range(self.attempts):
            try:
                response = endpoint.request(method, path, scope, what, headers, stream, content)
            except httpx.TooManyRedirects:
                raise RegistryError(f"{what}: {endpoint.host} redirected too many times (a redirect loop)") from None
            except httpx.InvalidURL as exc:
                raise RegistryError(f"{what}: {endpoint.host} redirected to an invalid URL ({exc})") from None
            except (httpx.ConnectError, httpx.ProtocolError) as exc:
                if endpoint.fallback_http and endpoint.url.startswith("https://") and _looks_like_plain_http(exc):
                    _PLAIN_HTTP.add(endpoint.url)
                    endpoint.url = "http://" + endpoint.url[len("https://"):]
                    continue
                if endpoint.remembered_http:  # it served plain http earlier in this process, not now: TLS again
                    endpoint.back_to_tls()
                    continue
                last = exc
            except httpx.TransportError as exc:
                last = exc
            else:
                if endpoint.remembered_http:
                    endpoint.remembered_http = False  # the first answer settles it
                    if response.status_code == 400:  # how a TLS server answers plain http: TLS again
                        _drain(response)
                        endpoint.back_to_tls()
                        continue
                if response.status_code not in _RETRYABLE_STATUS:
                    return response
                wait = _retry_after(response)
                _drain(response)
                last = RegistryError(f"{what}: {endpoint.host} answered {response.status_code}",
                                     status=response.status_code, retryable=True)
                if response.status_code == 429 and attempt == self.attempts - 1:
                    raise RateLimited(f"{what}: rate limited by {endpoint.host} (429) after {self.attempts} tries; "
                                      "wait and retry, or log in for a higher limit", status=429)
                if wait is not None:
                    _pause(wait, stop, what)
                    continue
            if attempt < self.attempts - 1:
                _pause(delay * (0.5 + random.random()), stop, what)
                delay *= 2
        if isinstance(last, RegistryError):
            raise last
        raise RegistryError(f"{what}: cannot reach {endpoint.url}: {last}", retryable=True) from last

    def _raise_for(self, response: httpx.Response, what: str, endpoint: Endpoint) -> None:
        status = response.status_code
        codes, message = _error_codes(response)
        detail = f" ({message})" if message else ""
        if status == 401:
            raise AuthError(f"{what}: unauthorized at {endpoint.host}{detail}; check credentials", status=status,
                            codes=codes)
        if status == 403:
            raise AuthError(f"{what}: access denied by {endpoint.host}{detail}", status=status, codes=codes)
        if status == 404:
            kind = (codes[0].lower().replace("_", " ") if codes else "not found")
            raise NotFound(f"{kind}: {what}", status=status, codes=codes)
        raise RegistryError(f"{what}: {endpoint.host} answered {status}{detail}", status=status, codes=codes)

    # -- for writers (push): the origin only, never a mirror ----------------------------------

    @property
    def origin(self) -> Endpoint:
        """The registry itself, as a push reaches it: registries.conf's mirrors and location rewrites
        are for pulls (as in containers/image); its insecure flag and the auth files still apply."""
        return self._endpoint(Location(self.registry, "", self.registries.insecure_host(self.registry)), True)

    def origin_call(self, method: str, path: str, scope: str, what: str, *, headers: dict[str, str] | None = None,
                    content: bytes | None = None, stream: bool = False, retry: bool = True) -> httpx.Response:
        """One request to the origin with its auth, TLS and the retry rules of pulls (429, 5xx, resets).
        The caller reads (or closes) the response. ``retry=False``: sent once, for a request the caller
        must not repeat blindly (a chunk of an upload); a transport failure is a retryable RegistryError."""
        endpoint = self.origin
        if retry:
            return self._call(endpoint, method, path, scope, what, headers, stream, None, content)
        try:
            return endpoint.request(method, path, scope, what, headers, stream, content)
        except httpx.TransportError as exc:
            raise RegistryError(f"{what}: {type(exc).__name__}: {exc}", retryable=True) from None

    def error_for(self, response: httpx.Response, what: str) -> DirgeError:
        """The error an unexpected answer from the origin means (its body read and closed)."""
        try:
            self._raise_for(response, what, self.origin)
        except DirgeError as exc:
            return exc
        finally:
            response.close()
        raise AssertionError("unreachable")

    def _first_that_works(self, ref: RegistryReference, attempt: Callable[[Endpoint, str], T]) -> T:
        """Mirrors in order, then the origin; a failing mirror falls through, the origin's error is raised."""
        routes = self.routes(ref)
        for endpoint, repository in routes[:-1]:
            try:
                return attempt(endpoint, repository)
            except (RegistryError, IntegrityError):
                continue
        return attempt(*routes[-1])

    # -- manifests ----------------------------------------------------------------------------

    def fetch_manifest(self, ref: RegistryReference, reference: str) -> tuple[bytes, str, Digest]:
        """GET a manifest or index by tag or digest; returns (raw bytes, media type, digest)."""
        what = f"{ref}" if reference == (ref.tag or "") else f"{ref.registry}/{ref.repository}@{reference}"
        return self._first_that_works(ref, lambda endpoint, repository: self._manifest_from(
            endpoint, repository, reference, what))

    def _manifest_from(self, endpoint: Endpoint, repository: str, reference: str,
                       what: str) -> tuple[bytes, str, Digest]:
        """One endpoint's manifest. A body cut short or bytes that hash wrong are fetched again, as a
        blob is resumed: one transient fault never fails the pull, and the deadline bounds them all."""
        deadline = time.monotonic() + metadata_deadline()
        for attempt in range(1, self.attempts + 1):
            scope = f"repository:{repository}:pull"
            response = self._call(endpoint, "GET", f"/v2/{repository}/manifests/{reference}", scope, what,
                                  headers={"Accept": ACCEPT}, stream=True)
            if response.status_code != 200:
                self._raise_for(response, what, endpoint)
            try:
                raw = read_limited(response, MAX_MANIFEST_BYTES, deadline, what, "manifest")
                digest = _manifest_digest(raw, reference, response.headers.get("Docker-Content-Digest"), what)
            except (RegistryError, IntegrityError) as exc:
                transient = isinstance(exc, IntegrityError) or exc.retryable
                if not transient or attempt == self.attempts or time.monotonic() >= deadline:
                    raise
                _pause(retry_base() * attempt, None, what)
                continue
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            if media_type not in INDEX_TYPES + MANIFEST_TYPES:
                media_type = _media_type_of(raw) or media_type
            return raw, media_type, digest
        raise AssertionError("unreachable")

    def fetch_referrers(self, ref: RegistryReference, subject: Digest, artifact_type: str) -> bytes | None:
        """The referrers API's index for ``subject`` filtered to ``artifact_type`` (distribution-spec 1.1), or
        None where no endpoint has it (a 404, another error, or an answer that is not an OCI index: registries
        without the API answer all sorts): the caller then reads the referrers tag schema. The body is
        bounded as a manifest is."""
        what = f"referrers of {ref.registry}/{ref.repository}@{subject}"
        query = urlencode({'artifactType': artifact_type})

        def attempt(endpoint: Endpoint, repository: str) -> bytes | None:
            scope = f"repository:{repository}:pull"
            path = f"/v2/{repository}/referrers/{subject}?{query}"
            response = self._call(endpoint, "GET", path, scope, what, headers={"Accept": OCI_INDEX}, stream=True)
            if response.status_code == 404:
                _drain(response)
                raise NotFound(f"no referrers API: {what}", status=404)
            if response.status_code != 200:
                self._raise_for(response, what, endpoint)
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            raw = read_limited(response, MAX_MANIFEST_BYTES, time.monotonic() + metadata_deadline(), what,
                                "referrers index")
            return raw if media_type == OCI_INDEX else None

        try:
            return self._first_that_works(ref, attempt)
        except RegistryError:
            return None

    # -- blobs --------------------------------------------------------------------------------

    def download_blob(self, ref: RegistryReference, desc: Descriptor, cache: Cache,
                      partial: PartialBlob | None = None) -> Path:
        """Stream a blob into the cache (temp file → size and digest check → rename); resumes with Range.

        Pass ``partial`` to read the blob while it downloads (see ``PartialBlob``).
        """
        final = cache.blob_path(desc.digest)
        if final.exists() and partial is None:
            return final
        what = f"blob {desc.digest.short} of {ref.registry}/{ref.repository}"
        partial = partial or PartialBlob(final, desc, what)
        try:
            try:
                self._first_that_works(ref, lambda endpoint, repository: self._download_from(endpoint, repository,
                                                                                               partial))
            except IntegrityError:
                # Wrong bytes: a failing mirror's part the origin resumed, or bytes damaged on the way. The
                # origin once more, from byte 0 (_download_from restarted the blob: its readers start over);
                # a registry that serves wrong bytes twice fails the pull.
                self._download_from(*self.routes(ref)[-1], partial)
            return partial.publish()
        except BaseException as exc:
            partial.fail(exc)
            raise

    def _download_from(self, endpoint: Endpoint, repository: str, partial: PartialBlob) -> None:
        desc, what, stop = partial.desc, partial.what, partial.abandoned
        scope = f"repository:{repository}:pull"
        resets = 0
        try:
            while True:
                headers = {"Range": f"bytes={partial.written}-"} if partial.written else {}
                response = self._call(endpoint, "GET", f"/v2/{repository}/blobs/{desc.digest}", scope,
                                      what, headers=headers, stream=True, stop=stop)
                partial.on_abandon(lambda: _shutdown(response))
                try:
                    if response.status_code not in (200, 206):
                        self._raise_for(response, what, endpoint)
                    if partial.written and response.status_code == 200:  # no Range support: start again
                        partial.restart(wrong_bytes=False)
                    window_start, window_bytes = time.monotonic(), 0
                    for chunk in response.iter_raw():  # as received: a reset keeps what arrived
                        partial.append(chunk)
                        window_bytes += len(chunk)
                        now = time.monotonic()
                        if now - window_start >= self.timeout:  # a slow drip holds no pull forever
                            if window_bytes < min_rate() * (now - window_start):
                                raise httpx.ReadTimeout(f"too slow: {window_bytes} bytes in {now - window_start:.1f} s, "
                                                        f"under {min_rate():g} bytes/s")
                            window_start, window_bytes = now, 0
                        if self.on_bytes:
                            self.on_bytes(desc, partial.written)
                    if partial.written == desc.size:
                        partial.verify()
                        return
                except (httpx.TransportError, httpx.StreamError) as exc:
                    partial.check_abandoned()
                    resets += 1
                    if resets >= self.attempts:
                        raise RegistryError(f"{what}: download kept failing ({exc})", retryable=True) from None
                    _pause(retry_base() * resets, stop, what)
                    continue
                finally:
                    partial.on_abandon(None)
                    response.close()
                resets += 1  # the server ended the body early: resume
                if resets >= self.attempts:
                    raise IntegrityError(f"size of {what}", f"{desc.size} bytes", f"{partial.written} bytes")
        except IntegrityError:
            partial.restart(wrong_bytes=True)  # this endpoint sent wrong bytes: the next one starts from zero
            raise


def _manifest_digest(raw: bytes, reference: str, header: str | None, what: str) -> Digest:
    """The digest of a manifest's bytes, checked against the digest it was asked by (or the registry's
    ``Docker-Content-Digest`` for a tag)."""
    digest = Digest("sha256", hashlib.sha256(raw).hexdigest())
    by_digest = ":" in reference  # a tag never has one (the referrers tag ``sha256-<hex>`` is a tag)
    if by_digest and reference != str(digest):
        expected = parse_digest(reference)
        actual = Digest(expected.algorithm, hashlib.new(expected.algorithm, raw).hexdigest())
        if actual != expected:
            raise IntegrityError(f"manifest of {what}", reference, str(actual))
        digest = expected
    if header and not by_digest and header != str(digest):
        raise IntegrityError(f"manifest of {what} (Docker-Content-Digest)", header, str(digest))
    return digest


def _pause(seconds: float, stop: threading.Event | None, what: str) -> None:
    """Back off before a retry; an abandoned download stops waiting at once."""
    if stop is None:
        time.sleep(seconds)
    elif stop.wait(seconds):
        raise DirgeError(f"{what}: download abandoned")


def _shutdown(response: httpx.Response) -> None:
    """Unblock a read in progress on the response's socket from another thread (close alone does not)."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if sock is not None:
        sock.shutdown(socket.SHUT_RDWR)


def _looks_like_plain_http(exc: Exception) -> bool:
    text = str(exc)
    return any(s in text for s in ("WRONG_VERSION_NUMBER", "wrong version number", "record layer failure",
                                   "UNEXPECTED_EOF", "EOF occurred", "http request", "Connection reset"))


def _media_type_of(raw: bytes) -> str | None:
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if isinstance(obj, dict):
        if isinstance(obj.get("mediaType"), str):
            return str(obj["mediaType"])
        if "manifests" in obj:
            return OCI_INDEX
        if "config" in obj:
            return OCI_MANIFEST
    return None


def _check_document(raw: bytes, media_type: str, what: str) -> None:
    """Parse a fetched index or manifest before it is cached (an ImageError if it is neither)."""
    if media_type in DOCKER_SCHEMA1:
        return  # refused with its own message when resolved
    if media_type in INDEX_TYPES:
        parse_index(raw, f"index of {what}")
    else:
        parse_manifest(raw, f"manifest of {what}", media_type if media_type in MANIFEST_TYPES else None)


ClientFactory = Callable[[], RegistryClient]


def offline_error(ref: RegistryReference, what: str, digest: Digest) -> DirgeError:
    """The one error of ``--pull never`` meeting a blob the cache lacks."""
    return DirgeError(f"{what} {digest} of {ref} is not in the cache and --pull never forbids the network; "
                      "pull it with --pull missing (or dirge pull)")


class RegistrySource:
    """A ``BlobSource`` over a registry, storing every blob in the cache (verified).

    ``prefetch`` starts bounded parallel downloads of the layers; ``open_blob`` on a layer still
    downloading reads it as it arrives, so applying layer N overlaps with downloading it and the later ones.

    The client is built on first need from ``client``, a factory: a fully cached image runs no
    credential helper and opens no connection. ``client=None`` (``--pull never``) means no network at all:
    a blob the cache lacks is an ``offline_error``.
    """

    def __init__(self, client: ClientFactory | None, ref: RegistryReference, cache: Cache, parallel: int = 3) -> None:
        self.ref = ref
        self.cache = cache
        self._factory = client
        self._client: RegistryClient | None = None
        self._client_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="dirge-pull")
        self._downloads: dict[Digest, tuple[Future[Path], PartialBlob]] = {}
        self._swept = False
        # Fetched (verified) indexes and manifests, and the ref record, are cached only by ``commit`` once
        # the image resolved: a hostile registry's index chain that ends in an error leaves nothing behind.
        self._pending: dict[Digest, bytes] = {}
        self._pending_ref: tuple[str, Digest] | None = None

    def hold(self, digest: Digest, raw: bytes, ref: str | None = None) -> None:
        """Keep a verified manifest (and the ref naming it) until ``commit``."""
        self._pending[digest] = raw
        if ref is not None:
            self._pending_ref = (ref, digest)

    def commit(self) -> None:
        """Cache what ``hold`` kept (resolve_manifest calls this when the image resolved)."""
        for digest, raw in list(self._pending.items()):
            self.cache.put_blob(digest, raw)
        self._pending.clear()
        if self._pending_ref is not None:
            self.cache.record_ref(*self._pending_ref)
            self._pending_ref = None

    @property
    def offline(self) -> bool:
        return self._factory is None

    def client(self) -> RegistryClient:
        """The registry client, built once on first call."""
        if self._factory is None:
            raise DirgeError(f"{self.ref}: --pull never forbids the network")
        with self._client_lock:
            if self._client is None:
                self._client = self._factory()
            return self._client

    def _client_for(self, what: str, digest: Digest) -> RegistryClient:
        if self._factory is None:
            raise offline_error(self.ref, what, digest)
        return self.client()

    def close(self) -> None:
        """Stop downloads still running (their temp files go) and wait for the threads. Idempotent."""
        for future, partial in self._downloads.values():
            partial.abandon()
            if future.cancel():
                partial.fail(DirgeError(f"{partial.what}: download cancelled"))
        self._pool.shutdown(wait=True)
        with self._client_lock:
            if self._client is not None:
                self._client.close()

    def prefetch(self, descs: list[Descriptor]) -> None:
        missing = [d for d in descs if d.digest not in self._downloads and not self.cache.blob_path(d.digest).exists()]
        if missing and self.offline:  # fail before anything is applied, naming the first absent layer
            raise offline_error(self.ref, "layer", missing[0].digest)
        if not self._swept:
            sweep_orphans(self.cache.blobs_dir)
            self._swept = True
        for desc in missing:
            if desc.digest in self._downloads:  # listed twice
                continue
            client = self._client_for("layer", desc.digest)
            what = f"blob {desc.digest.short} of {self.ref.registry}/{self.ref.repository}"
            partial = PartialBlob(self.cache.blob_path(desc.digest), desc, what)
            try:
                future = self._pool.submit(client.download_blob, self.ref, desc, self.cache, partial)
            except BaseException as exc:
                partial.fail(exc)
                raise
            self._downloads[desc.digest] = (future, partial)

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        path = self.cache.blob_path(desc.digest)
        if desc.media_type in INDEX_TYPES + MANIFEST_TYPES:
            if desc.digest in self._pending:
                return io.BytesIO(self._pending[desc.digest])
            if not path.exists():
                raw, _, _ = self._client_for("manifest", desc.digest).fetch_manifest(self.ref, str(desc.digest))
                self.hold(desc.digest, raw)
                return io.BytesIO(raw)
            return open(path, "rb")
        if desc.digest in self._downloads:
            return self._downloads[desc.digest][1].reader()  # type: ignore[return-value]
        try:
            return open(path, "rb")
        except FileNotFoundError:
            pass
        what = "config" if desc.media_type in CONFIG_TYPES else "layer"
        return open(self._client_for(what, desc.digest).download_blob(self.ref, desc, self.cache), "rb")

    def wait(self) -> None:
        """Block until every prefetched download is published (or raise the first failure)."""
        with waiting():
            for future, _ in self._downloads.values():
                future.result()


def start_descriptor(ref: RegistryReference, cache: Cache, client: ClientFactory | None, pull: str) -> Descriptor:
    """The top manifest or index of ``ref``, honouring the pull policy (always | missing | never).

    ``client`` builds the registry client only if the network is needed (None: it never is)."""
    digest = ref.digest
    if digest is None and pull != "always":
        digest = cache.lookup_ref(str(ref))
    if digest is not None and pull != "always":
        raw = cache.get_blob(digest, None, MAX_MANIFEST_BYTES)
        if raw is not None:
            return Descriptor(_media_type_of(raw) or OCI_MANIFEST, digest, len(raw))
    if pull == "never" or client is None:
        raise NotFound(f"{ref} is not in the cache and --pull never forbids the network; "
                       "pull it with --pull missing (or dirge pull)")
    raw, media_type, fetched = client().fetch_manifest(ref, str(ref.digest) if ref.digest else ref.tag or "latest")
    _check_document(raw, media_type, str(ref))  # junk (a login page, a truncated body) is never cached
    source = getattr(client, "__self__", None)  # RegistrySource.client: cache once the image resolved
    if isinstance(source, RegistrySource) and source.cache is cache:
        source.hold(fetched, raw, str(ref) if ref.digest is None else None)
    else:
        cache.put_blob(fetched, raw)
        if ref.digest is None:
            cache.record_ref(str(ref), fetched)
    return Descriptor(media_type, fetched, len(raw))
