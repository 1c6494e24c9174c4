"""One guarded HTTP(S) GET: the network half of img2dataset's `download_image`, made safe.

Why not call `img2dataset.downloader.download_image` directly: it uses
`urllib.request.urlopen`, which follows redirects to any host (an SSRF hole:
a public URL can bounce the crawler into 10.x or 169.254.169.254), has only a
per-socket-operation timeout (a URL that streams forever never finishes,
img2dataset #437), reads the whole body with no size cap, and retries every
error immediately, 404s included. We keep what it does well and reuse its
X-Robots-Tag parser (`is_disallowed`) and user-agent convention, and add:

- every hop (the first request and each redirect) is resolved, checked against
  the address policy, and then connected to *the checked IP* (no second DNS
  lookup an attacker could answer differently);
- a total deadline per request: a watchdog shuts the socket down when it
  passes (a server trickling header bytes defeats a per-read timeout, and
  http.client reads the status line and headers itself), and the body is read
  with `read1` so the deadline is also checked between reads;
- a body-size cap, checked against Content-Length and while reading;
- retries with exponential backoff, only for transient failures.
"""

from __future__ import annotations

import heapq
import http.client
import ipaddress
import itertools
import logging
import os
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

DEFAULT_DISALLOWED = ("noai", "noimageai", "noindex", "noimageindex")
REDIRECTS = (301, 302, 303, 307, 308)

log = logging.getLogger(__name__)


class FetchError(Exception):
    """A URL could not be fetched. `reason` is a short code used as the manifest reason."""

    def __init__(self, reason: str, detail: str = "", transient: bool = False):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.transient = transient


class OptedOut(FetchError):
    """The server said, through X-Robots-Tag, that this image must not be used for AI."""


@dataclass(kw_only=True, frozen=True)
class FetchConfig:
    """How one URL is fetched."""

    timeout: float = 10.0
    """Total deadline in seconds for one request, redirects and body included."""
    retries: int = 2
    """Extra attempts after a transient failure (timeout, connection reset, 429, 5xx)."""
    retry_backoff: float = 0.5
    """First backoff in seconds; doubles each retry, with jitter."""
    max_body_bytes: int = 20 * 2**20
    """Bodies larger than this are refused (Content-Length or bytes read)."""
    max_redirects: int = 5
    user_agent_token: str | None = "clipforge"
    """Token added to the user agent and matched against `X-Robots-Tag: token: ...`."""
    disallowed_header_directives: tuple[str, ...] = DEFAULT_DISALLOWED
    """X-Robots-Tag directives that opt an image out (img2dataset's defaults)."""
    allow_hosts: tuple[str, ...] = ()
    """`host:port` or `host` entries reachable even if their address is not public (tests, demo)."""

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        for entry in self.allow_hosts:
            host, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
            if port and not port.isdigit():
                raise ValueError(f"allow_hosts entry {entry!r} must be HOST or HOST:PORT")

    @property
    def user_agent(self) -> str:
        ua = "Mozilla/5.0 (compatible; clipforge/0.1; +https://github.com/clipforge)"
        return f"{ua} ({self.user_agent_token})" if self.user_agent_token else ua


def address_is_public(ip: str) -> bool:
    """False for loopback, private, link-local, multicast, reserved, shared and unspecified addresses."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not (addr.is_multicast or addr.is_reserved or addr.is_loopback)


class Watchdog:
    """Shuts one request's socket down at its deadline, so that a blocked read returns.

    Needed because http.client reads the status line and headers itself, one
    readline at a time: a server sending a header byte every 0.3 s never trips a
    per-read timeout. It holds its own duplicate of the connection's descriptor:
    TLS wrapping detaches the socket object it connected with, and http.client
    closes the socket itself (a body without Content-Length, a chunked body, an
    error in the headers or the handshake), after which the original descriptor
    number may already belong to another request's socket. Shutting down the
    duplicate shuts down the one connection it was made from; stop() closes it.
    """

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.expired = False
        self._fd = -1
        self._stopped = False
        self._lock = threading.Lock()

    def watch(self, sock: socket.socket) -> None:
        """Watch the connection of `sock` (a plain, connected socket) until stop()."""
        fd = os.dup(sock.fileno())
        with self._lock:
            if self._stopped:
                os.close(fd)
                return
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = fd
            if self.expired:  # the deadline passed while connecting
                self._shutdown()

    def fire(self) -> None:
        """Mark the request expired and shut its connection down; a no-op after stop()."""
        with self._lock:
            if self._stopped:
                return
            self.expired = True
            self._shutdown()

    def _shutdown(self) -> None:
        # Called under the lock: stop() cannot close the duplicate meanwhile.
        if self._fd < 0:
            return
        try:
            s = socket.socket(fileno=self._fd)
        except OSError:
            return
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already shut down or reset by the peer
        finally:
            s.detach()  # the descriptor stays ours, closed by stop()

    def stop(self) -> None:
        """Disarm, and close the duplicate descriptor (once; later calls do nothing)."""
        with self._lock:
            self._stopped = True
            fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)


class Watchdogs:
    """One thread that fires the watchdogs of all of a Fetcher's requests at their deadlines.

    One thread per request (threading.Timer) cost 0.2 ms a fetch; this costs a heap push.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Watchdog]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def arm(self, deadline: float) -> Watchdog:
        dog = Watchdog(deadline)
        with self._cond:
            if self._closed:
                raise RuntimeError("the fetcher is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (deadline, next(self._seq), dog))
            if self._heap[0][2] is dog:
                self._cond.notify()
        return dog

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if not self._heap:
                    self._cond.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                # Stopped watchdogs are popped here at their deadline; fire() ignores them.
                dog = heapq.heappop(self._heap)[2]
                try:
                    dog.fire()
                except Exception:  # this thread serves every later deadline of the Fetcher
                    log.exception("fetch watchdog: fire() failed; later deadlines are still enforced")

    def close(self) -> None:
        # Watchdogs still in the heap are not fired; each request's stop() (in its
        # finally) closes their descriptors.
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()


def _pinned(cls: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
    """A connection class that connects to a pre-checked IP, keeping Host/SNI as the name."""

    class Pinned(cls):  # type: ignore[valid-type,misc]
        def __init__(self, host: str, port: int, ips: list[str], deadline: float, watchdog: Watchdog | None = None,
                     **kw):
            super().__init__(host, port, **kw)
            self._ips, self._deadline, self._watchdog = ips, deadline, watchdog
            # HTTPConnection.__init__ sets this as an instance attribute, which would hide
            # a method override: connect() would resolve the name again (DNS rebinding).
            self._create_connection = self._connect_pinned

        def _connect_pinned(self, address, timeout, source_address=None):  # noqa: ANN001
            # Each checked address in turn, as socket.create_connection does with a name's
            # addresses: a host whose first address is down is still reachable.
            error: OSError | None = None
            for ip in self._ips:
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("connect: deadline passed")
                try:
                    sock = socket.create_connection((ip, address[1]), min(timeout, remaining), source_address)
                    break
                except OSError as exc:
                    error = exc
            else:
                raise error or OSError("no address to connect to")
            if self._watchdog is not None:
                # The raw socket, before any TLS handshake, so the handshake is covered too.
                self._watchdog.watch(sock)
            return sock

    return Pinned


PinnedHTTP = _pinned(http.client.HTTPConnection)
PinnedHTTPS = _pinned(http.client.HTTPSConnection)


@dataclass
class Fetcher:
    """Fetch image bytes under the policy in `cfg`. Thread-safe; one per task."""

    cfg: FetchConfig
    _ssl: ssl.SSLContext = field(default_factory=ssl.create_default_context, repr=False)

    def __post_init__(self) -> None:
        # Imported here, in the worker: importing img2dataset pulls in torch, webdataset and
        # wandb (2 s), which the driver (it only builds the config) need not pay.
        from img2dataset.downloader import is_disallowed

        self._is_disallowed = is_disallowed
        self._watchdogs = Watchdogs()
        # is_disallowed lowercases the header's token and compares it as is with ours.
        self._ua_token = self.cfg.user_agent_token.lower() if self.cfg.user_agent_token else None
        self._allowed: set[tuple[str, int | None]] = set()
        for entry in self.cfg.allow_hosts:
            if entry.count(":") == 1:
                host, port = entry.rsplit(":", 1)
                self._allowed.add((host.lower(), int(port)))
            else:
                self._allowed.add((entry.lower().strip("[]"), None))

    def _is_allowed(self, host: str, ip: str, port: int) -> bool:
        for name in (host.lower(), ip):
            if (name, port) in self._allowed or (name, None) in self._allowed:
                return True
        return False

    def resolve(self, host: str, port: int, deadline: float | None = None) -> list[str]:
        """Resolve `host` and return its IPs, all of which the policy lets us connect to, or raise."""
        try:
            infos = _getaddrinfo(host, port, deadline)
        except socket.gaierror as exc:
            raise FetchError("dns_error", f"{host}: {exc}") from None
        except TimeoutError:
            raise FetchError("timeout", f"{host}: DNS lookup not done within the deadline", transient=True) from None
        ips = [info[4][0] for info in infos]
        # Every address must pass: a name that resolves to one public and one private
        # address is refused, or the connection could land on the private one.
        for ip in ips:
            if not address_is_public(ip) and not self._is_allowed(host, ip, port):
                raise FetchError("blocked_address", f"{host}:{port} resolves to non-public {ip}")
        return list(dict.fromkeys(ips))  # getaddrinfo repeats an address per protocol

    def close(self) -> None:
        """Stop the watchdog thread (a Ray worker process runs many tasks, each with its Fetcher)."""
        self._watchdogs.close()

    def fetch(self, url: str) -> bytes:
        """The body of `url`, retrying transient failures with backoff."""
        for attempt in range(self.cfg.retries + 1):
            try:
                return self._fetch_once(url, time.monotonic() + self.cfg.timeout)
            except FetchError as exc:
                if not exc.transient or attempt == self.cfg.retries:
                    raise
            delay = self.cfg.retry_backoff * (2**attempt) * random.uniform(0.5, 1.5)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _fetch_once(self, url: str, deadline: float) -> bytes:
        current = url
        for _hop in range(self.cfg.max_redirects + 1):
            parts = urlsplit(current)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise FetchError("bad_url", current[:200])
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError:
                raise FetchError("bad_url", current[:200]) from None
            ips = self.resolve(parts.hostname, port, deadline)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchError("timeout", f"deadline of {self.cfg.timeout}s", transient=True)
            watchdog = self._watchdogs.arm(deadline)
            if parts.scheme == "https":
                conn = PinnedHTTPS(parts.hostname, port, ips, deadline, watchdog, timeout=remaining, context=self._ssl)
            else:
                conn = PinnedHTTP(parts.hostname, port, ips, deadline, watchdog, timeout=remaining)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            resp: http.client.HTTPResponse | None = None
            try:
                conn.request("GET", path, headers={
                    "User-Agent": self.cfg.user_agent,
                    "Accept": "image/*,*/*;q=0.5",
                    "Accept-Encoding": "identity",
                    "Connection": "close",
                })
                # Kept before getresponse: with "Connection: close" http.client hands the
                # socket to the response and sets conn.sock to None.
                sock = conn.sock
                resp = conn.getresponse()
                if resp.status in REDIRECTS:
                    location = resp.getheader("Location")
                    if not location:
                        raise FetchError(f"http_{resp.status}", "redirect without Location")
                    current = urljoin(current, location)
                    continue
                if resp.status == 429 or 500 <= resp.status < 600:
                    raise FetchError(f"http_{resp.status}", transient=True)
                if resp.status != 200:
                    raise FetchError(f"http_{resp.status}")
                if self.cfg.disallowed_header_directives and self._is_disallowed(
                    resp.headers, self._ua_token, set(self.cfg.disallowed_header_directives)
                ):
                    raise OptedOut("opted_out", ", ".join(resp.headers.get_all("X-Robots-Tag", [])))
                body = self._read_body(sock, resp, deadline)
                if watchdog.expired:  # a body without Content-Length looks complete when shut down
                    raise self._timeout()
                return body
            except Exception as exc:
                # Whatever a shut-down socket made http.client raise, the deadline was the cause.
                if watchdog.expired and not isinstance(exc, OptedOut):
                    raise self._timeout() from None
                raise _classify(exc) from None
            finally:
                watchdog.stop()
                # The response owns the socket after getresponse: closed here, not when an
                # exception's traceback that holds it is collected.
                if resp is not None:
                    resp.close()
                conn.close()
        raise FetchError("too_many_redirects", f"more than {self.cfg.max_redirects}")

    def _timeout(self) -> FetchError:
        return FetchError("timeout", f"deadline of {self.cfg.timeout}s", transient=True)

    def _read_body(self, sock: socket.socket | None, resp: http.client.HTTPResponse, deadline: float) -> bytes:
        cap = self.cfg.max_body_bytes
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > cap:
            raise FetchError("body_too_large", f"Content-Length {length} > {cap}")
        chunks: list[bytes] = []
        size = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchError("timeout", f"body not done within {self.cfg.timeout}s", transient=True)
            if sock is not None:
                sock.settimeout(remaining)
            # read1 returns after one socket read, so a server that trickles bytes
            # forever is cut at the deadline instead of being waited on per byte.
            chunk = resp.read1(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > cap:
                raise FetchError("body_too_large", f"more than {cap} bytes")
            chunks.append(chunk)
        if length and length.isdigit() and size < int(length):
            raise FetchError("truncated_body", f"got {size} of {length} bytes", transient=True)
        return b"".join(chunks)


def _getaddrinfo(host: str, port: int, deadline: float | None) -> list:
    """socket.getaddrinfo, given up on at `deadline`.

    getaddrinfo cannot be interrupted and takes no timeout (a dead resolver holds it
    for the system's retries, 10 s and more), so a name is looked up in a daemon thread
    that is left behind if the deadline passes. An IP literal needs no lookup.
    """
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        deadline = None
    except ValueError:
        pass
    if deadline is None:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    box: dict[str, Any] = {}
    done = threading.Event()

    def lookup() -> None:
        try:
            box["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc
        done.set()

    threading.Thread(target=lookup, name="dns", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        raise TimeoutError(f"{host}: DNS lookup")
    if "error" in box:
        raise box["error"]
    return box["infos"]


def _classify(exc: Exception) -> Exception:
    """The FetchError (manifest reason) for an exception raised while talking to a server."""
    if isinstance(exc, FetchError):
        return exc
    if isinstance(exc, TimeoutError):
        return FetchError("timeout", "socket timeout", transient=True)
    if isinstance(exc, http.client.IncompleteRead):
        return FetchError("truncated_body", f"got {len(exc.partial)} bytes", transient=True)
    if isinstance(exc, ssl.SSLError):
        return FetchError("tls_error", str(exc)[:200])
    if isinstance(exc, (ConnectionError, OSError, http.client.HTTPException)):
        return FetchError("connection_error", f"{type(exc).__name__}: {exc}"[:200], transient=True)
    return exc
