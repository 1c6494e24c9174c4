"""One guarded HTTP(S) GET: the network half of img2dataset's `download_image`, made safe.

Why not call `img2dataset.downloader.download_image` directly: it uses
`urllib.request.urlopen`, which follows redirects to any host (an SSRF hole:
a public URL can bounce the crawler into 10.x or 169.254.169.254), has only a
per-socket-operation timeout (a URL that streams forever never finishes,
img2dataset #437), reads the whole body with no size cap, and retries every
error immediately, 404s included. We keep what it does well (its X-Robots-Tag
semantics, `is_disallowed` below, and its user-agent convention), and add:

- every hop (the first request and each redirect) is resolved, checked against
  the address policy, and then connected to *the checked IP* (no second DNS
  lookup an attacker could answer differently);
- a total deadline per request: a watchdog shuts the socket down when it
  passes (a server trickling header bytes defeats a per-read timeout, and
  http.client reads the status line and headers itself), and the body is read
  with `read1` so the deadline is also checked between reads;
- a body-size cap, checked against Content-Length and while reading;
- retries with exponential backoff, only for transient failures (`fetch`
  sleeps through them; the download stage queues them instead, `attempt`);
- keep-alive: idle connections are kept per host (a bounded pool per Fetcher,
  that is per task) and reused only for a request whose host, resolved and
  checked again for that request, still answers with the very IP the
  connection is open to; a redirect to another host looks up, checks and
  connects anew like any first request;
- a URL that cannot be sent as written (spaces, control characters) is refused
  as `bad_url` before any connection, and text the server controls (status
  lines, headers, redirect targets) is escaped before it reaches a log line or
  the manifest.
"""

from __future__ import annotations

import heapq
import http.client
import ipaddress
import itertools
import logging
import math
import os
import random
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from email.message import Message
from typing import Any
from urllib.parse import urljoin, urlsplit

DEFAULT_DISALLOWED = ("noai", "noimageai", "noindex", "noimageindex")
REDIRECTS = (301, 302, 303, 307, 308)

log = logging.getLogger(__name__)


# C0 and C1 control characters and DEL: ESC and CSI start terminal escape sequences.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def escape_text(text: str, limit: int = 200) -> str:
    """`text` with control characters written as \\xNN escapes, cut to `limit` characters.

    For text a remote server controls (status lines, headers, redirect targets):
    written raw into a log or the manifest, an escape sequence could rewrite what
    an operator's terminal shows.
    """
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text[:limit])


class FetchError(Exception):
    """A URL could not be fetched. `reason` is a short code used as the manifest reason.

    `detail` is escaped here, once, whatever produced it: it goes to the log and the manifest.
    """

    def __init__(self, reason: str, detail: str = "", transient: bool = False):
        detail = escape_text(detail)
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
    idle_per_host: int = 32
    """Idle keep-alive connections kept per host (scheme, name and port) for reuse; 0: one connection per request."""
    user_agent_token: str | None = "clipforge"
    """Token added to the user agent and matched against `X-Robots-Tag: token: ...`."""
    disallowed_header_directives: tuple[str, ...] = DEFAULT_DISALLOWED
    """X-Robots-Tag directives that opt an image out (img2dataset's defaults)."""
    allow_hosts: tuple[str, ...] = ()
    """`HOST:PORT`, `[IPV6]:PORT`, `HOST` or `[IPV6]` entries reachable even if their address is not public."""

    def __post_init__(self) -> None:
        # The messages name the flags: BuildConfig turns them into one-line errors.
        # Upper bounds keep the arithmetic finite (a deadline past threading's limit
        # would kill the watchdog thread; 2**retries overflows a float).
        def number(name: str, value: float, low: float, high: float, low_ok: bool, what: str) -> None:
            if not (isinstance(value, (int, float)) and math.isfinite(value)
                    and (value >= low if low_ok else value > low) and value <= high):
                bound = f">= {low:g}" if low_ok else f"> {low:g}"
                raise ValueError(f"--{name.replace('_', '-')} must be {what} {bound} and <= {high:g}, got {value!r}")

        number("timeout", self.timeout, 0, 86400, False, "a number of seconds")
        number("retries", self.retries, 0, 100, True, "a count")
        number("retry_backoff", self.retry_backoff, 0, 3600, True, "a number of seconds")
        number("max_body_bytes", self.max_body_bytes, 1, 2**40, True, "a byte count")
        number("max_redirects", self.max_redirects, 0, 100, True, "a count")
        number("idle_per_host", self.idle_per_host, 0, 4096, True, "a count")
        for entry in self.allow_hosts:
            parse_allow_host(entry)

    @property
    def user_agent(self) -> str:
        ua = "Mozilla/5.0 (compatible; clipforge/0.1; +https://github.com/clipforge)"
        return f"{ua} ({self.user_agent_token})" if self.user_agent_token else ua


def parse_allow_host(entry: str) -> tuple[str, int | None]:
    """(host, port or None for any port) of an --allow-hosts entry; ValueError says how to write it.

    IPv6 addresses go in brackets, as in URLs: `[::1]:8080`. A bare IPv6 address is
    refused: in `::1:8080` nothing tells the port from the last group of the address.
    """
    usage = "write HOST, HOST:PORT, [IPV6] or [IPV6]:PORT"
    if entry.startswith("["):
        addr, sep, rest = entry[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"--allow-hosts entry {entry!r}: {usage}")
        try:
            host = ipaddress.IPv6Address(addr).compressed
        except ValueError:
            raise ValueError(f"--allow-hosts entry {entry!r}: {addr!r} is not an IPv6 address") from None
        port_text = rest[1:] if rest else None
    elif entry.count(":") > 1:
        raise ValueError(f"--allow-hosts entry {entry!r}: an IPv6 address needs brackets, "
                         f"e.g. [{entry}] for any port or [{entry}]:8080 for one; {usage}")
    else:
        host, sep, port_text = entry.partition(":")
        if not sep:
            port_text = None
        try:
            host = ipaddress.ip_address(host).compressed
        except ValueError:
            host = host.lower()
        if not host:
            raise ValueError(f"--allow-hosts entry {entry!r}: no host; {usage}")
    if port_text is None:
        return host, None
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ValueError(f"--allow-hosts entry {entry!r}: port must be 1..65535; {usage}")
    return host, int(port_text)


# Ranges that embed an IPv4 address: judged by that address (a public IPv4 behind
# NAT64 or 6to4 is public; 10.0.0.1 behind it is not).
_EMBEDS_IPV4 = (
    (ipaddress.IPv6Network("64:ff9b::/96"), lambda a: ipaddress.IPv4Address(int(a) & 0xFFFFFFFF)),  # NAT64
    (ipaddress.IPv6Network("2002::/16"), lambda a: ipaddress.IPv4Address((int(a) >> 80) & 0xFFFFFFFF)),  # 6to4
)
# Special ranges that Python's ipaddress tables call global on some versions (3.11 among them).
_NEVER_PUBLIC = tuple(ipaddress.ip_network(n) for n in (
    "192.0.0.0/24",  # IETF protocol assignments (3.11 calls 192.0.0.9 and .10 global)
    "fec0::/10",  # deprecated site-local
    "2001::/32",  # Teredo: a tunnel to an IPv4 address obfuscated in the last 32 bits
    "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
))


def address_is_public(ip: str) -> bool:
    """False for loopback, private, link-local, multicast, reserved, shared and unspecified addresses."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        else:
            for net, embedded in _EMBEDS_IPV4:
                if addr in net:
                    addr = embedded(addr)
                    break
    if any(addr in net for net in _NEVER_PUBLIC if net.version == addr.version):
        return False
    return addr.is_global and not (addr.is_multicast or addr.is_reserved or addr.is_loopback)


def is_disallowed(headers: Message, user_agent_token: str | None, disallowed: Collection[str]) -> bool:
    """True if an X-Robots-Tag header opts the response out: img2dataset's `is_disallowed`.

    Reimplemented with the same answers (a test compares the two on a table of
    headers) because importing `img2dataset.downloader` imports the whole package:
    torch, albumentations and wandb, seconds and about 900 MB per worker. Each header
    is `directives` or `token: directives`; the token is compared lowercased and
    unstripped, as img2dataset does, with the caller's (already lowercased) token.
    """
    for value in headers.get_all("X-Robots-Tag", []):
        parts = value.split(":", 1)
        token = parts[0].lower() if len(parts) == 2 else None
        if (token is None or token == user_agent_token) and any(
            d.strip().lower() in disallowed for d in parts[-1].split(",")
        ):
            return True
    return False


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
        peer_ip: str | None = None
        """The checked IP this connection is open to, once connected (the pool's key)."""

        def __init__(self, host: str, port: int, ips: list[str], deadline: float, watchdog: Watchdog | None = None,
                     **kw):
            super().__init__(host, port, **kw)
            self._ips, self._deadline, self._watchdog = ips, deadline, watchdog
            # HTTPConnection.__init__ sets this as an instance attribute, which would hide
            # a method override: connect() would resolve the name again (DNS rebinding).
            self._create_connection = self._connect_pinned

        def arm(self, deadline: float, watchdog: Watchdog) -> None:
            """Put this request's deadline and watchdog on the connection (a reused one included)."""
            self._deadline, self._watchdog = deadline, watchdog
            if self.sock is not None:
                watchdog.watch(self.sock)
                self.sock.settimeout(max(0.001, deadline - time.monotonic()))

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
            # Never connect again by itself: http.client reopens a closed connection on the
            # next request (auto_open), and a pooled connection must only ever be the one to
            # the IP it was checked for; a request on a closed one raises NotConnected instead.
            self.peer_ip, self._ips, self.auto_open = ip, [ip], 0
            if self._watchdog is not None:
                # The raw socket, before any TLS handshake, so the handshake is covered too.
                self._watchdog.watch(sock)
            return sock

    return Pinned


PinnedHTTP = _pinned(http.client.HTTPConnection)
PinnedHTTPS = _pinned(http.client.HTTPSConnection)

PoolKey = tuple[str, str, int, str]
"""(scheme, host name, port, IP the connection is open to)."""


class ConnectionPool:
    """Idle keep-alive connections of one Fetcher: at most `per_host` per (scheme, host, port), `total` in all.

    A connection is filed under the IP it is open to and handed out only for a request
    whose freshly resolved and checked addresses include that IP: the pool never lets a
    request reach an address its own check did not pass, however the name's DNS answer
    changed since the connection was opened. Connections idle longer than `idle_seconds`
    are closed when met (servers drop idle keep-alive connections after a few seconds).
    """

    def __init__(self, per_host: int, total: int = 128, idle_seconds: float = 15.0):
        self.per_host, self.total, self.idle_seconds = per_host, total, idle_seconds
        self._idle: dict[PoolKey, list[tuple[float, Any]]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def take(self, scheme: str, host: str, port: int, ips: list[str]) -> Any:
        """An idle connection to one of `ips` (the addresses just checked for host), or None."""
        if self.per_host == 0:
            return None
        stale = []
        found = None
        now = time.monotonic()
        with self._lock:
            for ip in ips:
                conns = self._idle.get((scheme, host.lower(), port, ip))
                while conns:
                    since, conn = conns.pop()
                    if now - since > self.idle_seconds:
                        stale.append(conn)
                        continue
                    found = conn
                    break
                if found is not None:
                    break
        for conn in stale:
            conn.close()
        return found

    def put(self, scheme: str, host: str, conn: Any) -> None:
        """File a connection whose response was read to the end; closed instead if the pool is full."""
        key = (scheme, host.lower(), conn.port, conn.peer_ip)
        evicted = []
        with self._lock:
            if self._closed or conn.peer_ip is None or self.per_host == 0:
                evicted.append(conn)
            else:
                same_host = sum(len(v) for k, v in self._idle.items() if k[:3] == key[:3])
                if same_host >= self.per_host:
                    evicted.append(conn)
                else:
                    self._idle.setdefault(key, []).append((time.monotonic(), conn))
                    count = sum(len(v) for v in self._idle.values())
                    while count > self.total:  # the longest idle goes
                        k = min((k for k in self._idle if self._idle[k]), key=lambda k: self._idle[k][0][0])
                        evicted.append(self._idle[k].pop(0)[1])
                        count -= 1
                self._idle = {k: v for k, v in self._idle.items() if v}
        for c in evicted:
            c.close()

    def idle(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._idle.values())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [c for v in self._idle.values() for _, c in v]
            self._idle.clear()
        for c in conns:
            c.close()


# What a request on a connection the server already closed raises before any response byte.
_STALE_ERRORS = (http.client.RemoteDisconnected, http.client.NotConnected, BrokenPipeError, ConnectionResetError,
                 ConnectionAbortedError)
# A redirect's or an error's body is read to the end (so the connection can be reused) up to this size.
_DRAIN_LIMIT = 64 * 1024


@dataclass
class Fetcher:
    """Fetch image bytes under the policy in `cfg`. Thread-safe; one per task."""

    cfg: FetchConfig
    _ssl: ssl.SSLContext = field(default_factory=ssl.create_default_context, repr=False)

    def __post_init__(self) -> None:
        self._watchdogs = Watchdogs()
        self.pool = ConnectionPool(self.cfg.idle_per_host)
        # is_disallowed lowercases the header's token and compares it as is with ours.
        self._ua_token = self.cfg.user_agent_token.lower() if self.cfg.user_agent_token else None
        self._disallowed = frozenset(self.cfg.disallowed_header_directives)
        self._allowed = {parse_allow_host(entry) for entry in self.cfg.allow_hosts}

    def _is_allowed(self, host: str, ip: str, port: int) -> bool:
        try:
            ip = ipaddress.ip_address(ip.split("%", 1)[0]).compressed
        except ValueError:
            pass
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
        """Stop the watchdog thread and close idle connections (a Ray worker runs many tasks, each with its Fetcher)."""
        self._watchdogs.close()
        self.pool.close()

    def fetch(self, url: str) -> bytes:
        """The body of `url`, retrying transient failures with backoff (sleeping in this thread)."""
        for attempt in range(self.cfg.retries + 1):
            try:
                return self.attempt(url)
            except FetchError as exc:
                if not exc.transient or attempt == self.cfg.retries:
                    raise
            time.sleep(self.backoff(attempt))
        raise AssertionError("unreachable")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt + 1`: exponential, with jitter."""
        return self.cfg.retry_backoff * (2**attempt) * random.uniform(0.5, 1.5)

    def attempt(self, url: str) -> bytes:
        """One attempt at `url` under the total deadline, in this thread; FetchError.transient says
        whether a retry may help."""
        a = self.start(url)
        while a.body is None:
            a.wait()
            a.resume()
        return a.body

    def start(self, url: str) -> Attempt:
        """Begin one attempt at `url`: connect and send the request, then return without waiting for
        the answer (see Attempt). Raises FetchError if it fails before that."""
        a = Attempt(self, url, time.monotonic() + self.cfg.timeout)
        a.send()
        return a

    def _timeout(self) -> FetchError:
        return FetchError("timeout", f"deadline of {self.cfg.timeout}s", transient=True)

    def _drain(self, sock: socket.socket | None, resp: http.client.HTTPResponse, deadline: float) -> bool:
        """Read a small body to its end so the connection can carry the next request; False if not worth it."""
        length = resp.getheader("Content-Length")
        if resp.will_close or not (length and length.isdigit() and int(length) <= _DRAIN_LIMIT):
            return False
        try:
            self._read_body(sock, resp, deadline, cap=_DRAIN_LIMIT)
        except (FetchError, OSError, http.client.HTTPException):
            return False
        return True

    def _read_body(self, sock: socket.socket | None, resp: http.client.HTTPResponse, deadline: float,
                   cap: int | None = None) -> bytes:
        cap = self.cfg.max_body_bytes if cap is None else cap
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
        # Read to its end (all of Content-Length, the last chunk, or the close that ends a body
        # without either): the connection can carry another request unless the response said close.
        return b"".join(chunks)


class Attempt:
    """One attempt at a URL, paused while it waits for a server to answer.

    `Fetcher.start(url)` resolves, checks, connects and sends the request, and returns.
    The caller waits until `fileno()` is readable (the answer's first bytes, or the
    watchdog's shutdown of the socket at the deadline) and calls `resume()`, which reads
    the answer: the body (then `body` is set), an error (raised), or a redirect, whose
    request it sends before returning to wait again. A thread is busy only while bytes
    move, never while a server thinks, so a download stage keeps many slow requests
    open with few threads (pipeline.download); `Fetcher.attempt` waits in its own thread.
    """

    def __init__(self, fetcher: Fetcher, url: str, deadline: float):
        self._f, self.url, self.deadline = fetcher, url, deadline
        self._current = url
        self._hops = 0
        self.body: bytes | None = None
        self._conn: Any = None
        self._sock: Any = None
        self._watchdog: Watchdog | None = None
        self._reused = False
        self._parts: Any = None

    def fileno(self) -> int:
        """The descriptor to wait on until it is readable, then call resume()."""
        return self._sock.fileno()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the answer starts or the deadline passes, or for at most `timeout` seconds;
        True if there is something to read (poll: no FD_SETSIZE limit)."""
        p = select.poll()
        p.register(self.fileno(), select.POLLIN)
        # The watchdog shuts the socket down at the deadline, which makes it readable; the
        # extra second only guards against a watchdog that failed to.
        if timeout is None:
            timeout = max(0.0, self.deadline - time.monotonic()) + 1.0
        return bool(p.poll(1000 * timeout))

    def send(self, fresh: bool = False) -> None:
        """Resolve, check and connect for the current URL (or reuse a pooled connection), send the request."""
        f = self._f
        if self._hops > f.cfg.max_redirects:
            raise FetchError("too_many_redirects", f"more than {f.cfg.max_redirects}")
        parts, port = _split_url(self._current)
        ips = f.resolve(parts.hostname, port, self.deadline)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise f._timeout()
        conn = None if fresh else f.pool.take(parts.scheme, parts.hostname, port, ips)
        self._reused = conn is not None
        if conn is None:
            if parts.scheme == "https":
                conn = PinnedHTTPS(parts.hostname, port, ips, self.deadline, timeout=remaining, context=f._ssl)
            else:
                conn = PinnedHTTP(parts.hostname, port, ips, self.deadline, timeout=remaining)
        self._parts, self._conn = parts, conn
        self._watchdog = f._watchdogs.arm(self.deadline)
        conn.arm(self.deadline, self._watchdog)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"User-Agent": f.cfg.user_agent, "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity"}
        if f.cfg.idle_per_host == 0:
            headers["Connection"] = "close"
        try:
            conn.request("GET", path, headers=headers)
        except _STALE_ERRORS as exc:
            if self._reused and not self._watchdog.expired:
                self._close()
                self.send(fresh=True)  # the server had closed the idle connection: a new one
                return
            raise self._error(exc) from None
        except Exception as exc:
            raise self._error(exc) from None
        # Kept before getresponse: with "Connection: close" http.client hands the socket
        # to the response and sets conn.sock to None.
        self._sock = conn.sock

    def resume(self) -> None:
        """Read the answer (call when fileno() is readable): sets `body`, raises FetchError, or
        follows a redirect (sends its request and returns with `body` still None)."""
        f, conn, sock = self._f, self._conn, self._sock
        resp: http.client.HTTPResponse | None = None
        location = None
        try:
            try:
                resp = conn.getresponse()
            except _STALE_ERRORS:
                if self._reused and not self._watchdog.expired:
                    self._close()
                    self.send(fresh=True)
                    return
                raise
            if resp.status in REDIRECTS:
                location = resp.getheader("Location")
                if not location:
                    raise FetchError(f"http_{resp.status}", "redirect without Location")
                self._close(f._drain(sock, resp, self.deadline), resp)
            else:
                if resp.status == 429 or 500 <= resp.status < 600:
                    self._close(f._drain(sock, resp, self.deadline), resp)
                    raise FetchError(f"http_{resp.status}", transient=True)
                if resp.status != 200:
                    self._close(f._drain(sock, resp, self.deadline), resp)
                    raise FetchError(f"http_{resp.status}")
                if f._disallowed and is_disallowed(resp.headers, f._ua_token, f._disallowed):
                    raise OptedOut("opted_out", ", ".join(resp.headers.get_all("X-Robots-Tag", [])))
                body = f._read_body(sock, resp, self.deadline)
                if self._watchdog.expired:  # a body without Content-Length looks complete when shut down
                    raise f._timeout()
                self._close(True, resp)
                self.body = body
                return
        except Exception as exc:
            raise self._error(exc, resp) from None
        # http.client decodes header bytes as latin-1: back to the bytes the server
        # sent, so a UTF-8 path is percent-encoded as UTF-8.
        try:
            self._current = urljoin(self._current, _percent_encode_bytes(location.encode("latin-1", "replace")))
        except ValueError as exc:  # e.g. brackets that are not an IPv6 address
            raise FetchError("bad_url", f"redirect to {location}: {exc}") from None
        self._hops += 1
        self.send()

    def abandon(self) -> None:
        """Give the attempt up (its stage is closing): its connection is closed, not pooled."""
        self._close()

    def _error(self, exc: Exception, resp: http.client.HTTPResponse | None = None) -> Exception:
        """The FetchError for `exc`, with this hop's connection closed."""
        expired = self._watchdog is not None and self._watchdog.expired
        self._close(False, resp)
        # Whatever a shut-down socket made http.client raise, the deadline was the cause.
        if (expired or (self._watchdog is not None and self._watchdog.expired)) and not isinstance(exc, OptedOut):
            return self._f._timeout()
        return _classify(exc)

    def _close(self, keep: bool = False, resp: http.client.HTTPResponse | None = None) -> None:
        """End this hop: the connection goes back to the pool if its answer was read to the end
        (`keep`), else it is closed. Safe to call twice."""
        conn, self._conn = self._conn, None
        if self._watchdog is not None:
            self._watchdog.stop()  # after this, `expired` is final: a shut-down connection is never pooled
        # The response owns the socket after getresponse: closed here, not when an exception's
        # traceback that holds it is collected. Closing a response read to its end leaves the
        # connection open and ready for the next request.
        if resp is not None:
            resp.close()
        if conn is None:
            return
        if keep and not self._watchdog.expired and resp is not None and not resp.will_close and conn.sock is not None:
            self._f.pool.put(self._parts.scheme, self._parts.hostname, conn)
        else:
            conn.close()


# What http.client refuses to put in a request line (it raises InvalidURL), and what
# urlsplit silently deletes (tab, CR, LF: the request would go to another URL).
_UNSENDABLE = re.compile("[\x00-\x20\x7f-\x9f]")
_NON_ASCII = re.compile("[^\x00-\x7f]+")


def _percent_encode_bytes(raw: bytes) -> str:
    """ASCII text of `raw` with every non-ASCII byte percent-encoded (what browsers send)."""
    return "".join(chr(b) if b < 0x80 else f"%{b:02X}" for b in raw)


def _split_url(url: str) -> tuple[Any, int]:
    """(urlsplit result, port) of a URL that can be sent as written, else FetchError('bad_url').

    Non-ASCII characters in the path and query are percent-encoded as UTF-8, as a
    browser does; a non-ASCII host name is left to IDNA (getaddrinfo, Host, SNI).
    Spaces and control characters are refused: they are not part of any URL.
    """
    bad = _UNSENDABLE.search(url)
    if bad:
        raise FetchError("bad_url", f"character {bad.group()!r} at {bad.start()} in {url}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise FetchError("bad_url", f"{exc}: {url}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError("bad_url", url)
    if not (parts.path + parts.query).isascii():
        parts = parts._replace(path=_NON_ASCII.sub(lambda m: _percent_encode_bytes(m.group().encode()), parts.path),
                               query=_NON_ASCII.sub(lambda m: _percent_encode_bytes(m.group().encode()), parts.query))
    return parts, port or (443 if parts.scheme == "https" else 80)


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
