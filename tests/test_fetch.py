"""The guarded fetcher against the local web's failure modes."""

from __future__ import annotations

import os
import random
import socket
import time

import pytest

from pipeline.download import DownloadStage, ErrorLog, sniff_image
from pipeline.fetch import FetchConfig, Fetcher, FetchError, OptedOut, Watchdog, Watchdogs, address_is_public
from pipeline.filters import CaptionCleaner, CaptionFilter, clean_caption
from pipeline.localweb import LocalWeb, Resource, bomb_png, encode, make_image, populate_faults
from pipeline.sample import Sample

pytestmark = pytest.mark.timeout(60)


def fetcher(web, **kw) -> Fetcher:
    base = dict(timeout=1.0, retries=2, retry_backoff=0.01, max_body_bytes=1_000_000, allow_hosts=(web.hostport,))
    return Fetcher(FetchConfig(**{**base, **kw}))


@pytest.fixture
def faults(web, internal):
    return populate_faults(web, internal)


def reason(f: Fetcher, url: str) -> str:
    with pytest.raises(FetchError) as info:
        f.fetch(url)
    return info.value.reason


@pytest.mark.parametrize("ip, public", [
    ("10.0.0.1", False), ("172.16.5.4", False), ("192.168.1.1", False), ("169.254.169.254", False),
    ("127.0.0.1", False), ("::1", False), ("fe80::1", False), ("224.0.0.1", False), ("239.1.1.1", False),
    ("100.64.0.1", False), ("0.0.0.0", False), ("::ffff:10.0.0.1", False), ("240.0.0.1", False),
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
])
def test_address_policy(ip, public):
    assert address_is_public(ip) is public


def test_good_image_and_user_agent(web):
    body = encode(make_image("circle", "red", (64, 64), random.Random(0)), "jpg")
    url = web.add("/ok.jpg", Resource(body, "image/jpeg"))
    assert fetcher(web, user_agent_token="forge-test-bot").fetch(url) == body
    assert web.hits["/ok.jpg"] == 1
    (headers,) = web.request_headers["/ok.jpg"]
    assert "forge-test-bot" in headers.get("User-Agent", ""), headers


def test_loopback_refused_by_default(web):
    url = web.add("/ok.jpg", Resource(b"x", "image/jpeg"))
    assert reason(Fetcher(FetchConfig()), url) == "blocked_address"
    assert web.hits["/ok.jpg"] == 0  # refused before connecting


def test_allow_hosts_is_per_port(web):
    url = web.add("/ok.jpg", Resource(b"x", "image/jpeg"))
    other_port = f"{web.host}:{web.port + 1 if web.port < 65535 else web.port - 1}"
    assert reason(Fetcher(FetchConfig(allow_hosts=(other_port,))), url) == "blocked_address"


def test_redirect_to_internal_host_never_contacts_it(web, internal, faults):
    assert reason(fetcher(web), faults["redirect_internal"]["url"]) == "blocked_address"
    assert sum(internal.hits.values()) == 0


def test_internal_host_refused_directly(web, internal):
    url = internal.add("/x.jpg", Resource(b"x", "image/jpeg"))
    assert reason(fetcher(web), url) == "blocked_address"
    assert sum(internal.hits.values()) == 0


def test_404_is_not_retried(web, faults):
    assert reason(fetcher(web), faults["not_found"]["url"]) == "http_404"
    assert web.hits["/fault/not_found"] == 1


def test_500_is_retried_then_fails(web, faults):
    assert reason(fetcher(web, retries=2), faults["server_error"]["url"]) == "http_500"
    assert web.hits["/fault/server_error"] == 3


def test_transient_503_recovers(web, faults):
    assert len(fetcher(web).fetch(faults["transient_503"]["url"])) > 100
    assert web.hits["/fault/transient_503"] == 2


def test_slow_server_hits_the_deadline(web, faults):
    t = time.monotonic()
    assert reason(fetcher(web, retries=0, timeout=0.5), faults["slow"]["url"]) == "timeout"
    assert time.monotonic() - t < 2.0


def test_endless_body_is_cut_at_the_total_deadline(web, faults):
    # The server sends 16 bytes every 0.1 s forever: a per-socket timeout never fires.
    t = time.monotonic()
    assert reason(fetcher(web, retries=0, timeout=1.0), faults["trickle"]["url"]) == "timeout"
    assert time.monotonic() - t < 2.5


def test_trickled_headers_are_cut_at_the_total_deadline(web, faults):
    # One header byte every 0.3 s: each read succeeds, so only a total deadline ends it.
    t = time.monotonic()
    assert reason(fetcher(web, retries=0, timeout=1.0), faults["trickle_headers"]["url"]) == "timeout"
    assert time.monotonic() - t < 1.8


def test_one_watchdog_thread_serves_concurrent_requests(web, faults):
    from concurrent.futures import ThreadPoolExecutor

    f = fetcher(web, retries=0, timeout=0.8)
    urls = [faults["trickle_headers"]["url"], faults["trickle"]["url"], faults["server_error"]["url"]] * 2
    t = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(lambda u: reason(f, u), urls))
    assert outcomes == ["timeout", "timeout", "http_500"] * 2
    assert time.monotonic() - t < 1.6
    # Watchdogs of finished requests never touch later connections.
    time.sleep(0.9)
    assert len(f.fetch(faults["dup_first"]["url"])) > 100
    f.close()


def test_connects_to_the_checked_address_not_a_second_lookup(web, monkeypatch):
    # The name does not resolve: only the IP that resolve() checked can be what connect() used.
    url = web.add("/pinned.png", Resource(encode(make_image("circle", "red", (80, 80), random.Random(0)), "png")))
    f = fetcher(web, allow_hosts=(f"pinned.invalid:{web.port}",))
    monkeypatch.setattr(f, "resolve", lambda host, port, deadline=None: ["127.0.0.1"])
    assert len(f.fetch(url.replace("127.0.0.1", "pinned.invalid"))) > 100


def test_falls_back_to_the_next_checked_address(web, monkeypatch):
    # 127.0.0.3 has no server: the connection is refused, and the next address is tried.
    url = web.add("/two.png", Resource(encode(make_image("circle", "red", (80, 80), random.Random(0)), "png")))
    f = fetcher(web, allow_hosts=(f"two.invalid:{web.port}",))
    monkeypatch.setattr(f, "resolve", lambda host, port, deadline=None: ["127.0.0.3", "127.0.0.1"])
    assert len(f.fetch(url.replace("127.0.0.1", "two.invalid"))) > 100


def test_keep_alive_one_connection_for_many_requests_to_a_host(web, faults):
    f = fetcher(web)
    urls = [web.add(f"/k{i}.jpg", Resource(bytes([i]) * 100, "image/jpeg")) for i in range(4)]
    # Error answers with small bodies are read to their end: their connection is reused too.
    assert reason(f, faults["not_found"]["url"]) == "http_404"
    assert [f.fetch(u) for u in urls] == [bytes([i]) * 100 for i in range(4)]
    assert web.connections == 1
    f.close()
    assert f.pool.idle() == 0


def test_a_pooled_connection_the_server_closed_is_replaced(web):
    f = fetcher(web, retries=0)
    url = web.add("/k.jpg", Resource(b"k" * 100, "image/jpeg"))
    assert f.fetch(url) == b"k" * 100
    ((_, conn),) = [c for conns in f.pool._idle.values() for c in conns]
    conn.sock.shutdown(socket.SHUT_RDWR)  # as a server's idle timeout leaves it: the next send fails
    assert f.fetch(url) == b"k" * 100  # on a new connection, not an error (retries=0)
    assert web.connections == 2


def test_a_reused_connection_reaches_only_the_address_checked_for_this_request(web, internal, monkeypatch):
    # A name whose DNS answer changes between two requests: the second must go where its own,
    # fresh lookup and check point, never down the idle connection to the first answer's IP.
    other = LocalWeb("127.0.0.3", port=web.port).start()
    try:
        web.add("/a.jpg", Resource(b"from .1", "image/jpeg"))
        other.add("/a.jpg", Resource(b"from .3", "image/jpeg"))
        internal.add("/a.jpg", Resource(b"internal", "image/jpeg"))
        answer = ["127.0.0.1"]
        real = socket.getaddrinfo

        def getaddrinfo(host, port, *a, **kw):
            if host == "img.test":
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer[0], port))]
            return real(host, port, *a, **kw)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        f = fetcher(web, retries=0, allow_hosts=(web.hostport, other.hostport))
        assert f.fetch(f"http://img.test:{web.port}/a.jpg") == b"from .1"
        answer[0] = "127.0.0.3"  # another allowed address: a new connection to it
        assert f.fetch(f"http://img.test:{web.port}/a.jpg") == b"from .3"
        answer[0] = "127.0.0.2"  # the internal host: refused, and the pooled connections stay unused
        assert reason(f, f"http://img.test:{internal.port}/a.jpg") == "blocked_address"
        assert reason(f, f"http://img.test:{web.port}/a.jpg") == "blocked_address"
        assert (web.hits["/a.jpg"], other.hits["/a.jpg"], internal.hits["/a.jpg"]) == (1, 1, 0)
        assert f.pool.idle() == 2  # one to .1 and one to .3, each filed under its own IP
    finally:
        other.stop()


def test_a_retry_waits_in_a_queue_not_in_a_thread(web):
    # One thread; the first URL fails once (503) and backs off for at least a second: the
    # others are fetched meanwhile (a retry slept in the only thread held them all back).
    img = encode(make_image("circle", "red", (64, 64), random.Random(0)), "jpg")
    flaky = web.add("/flaky.jpg", Resource(img, "image/jpeg", fail_first=1))
    good = [web.add(f"/g{i}.jpg", Resource(img, "image/jpeg")) for i in range(3)]
    stage = DownloadStage(fetcher(web, retries=1, retry_backoff=2.0), 1, 10**8, ErrorLog())
    rows = [Sample(key=str(i), row=i, url=u, caption="c") for i, u in enumerate([flaky, *good])]
    done = list(stage(iter(rows)))
    assert sorted(s.url for s in done[:3]) == good and done[3].url == flaky
    assert web.hits["/flaky.jpg"] == 2 and all(s.pending and s.image == img for s in done)
    assert stage.attempts == 5


def test_user_agent_token_matches_whatever_its_case(web):
    url = web.add("/ua.jpg", Resource(b"x", "image/jpeg", headers={"X-Robots-Tag": "clipforge: noai"}))
    with pytest.raises(OptedOut):
        fetcher(web, user_agent_token="ClipForge").fetch(url)


def test_slow_dns_is_cut_at_the_total_deadline(web, monkeypatch):
    import socket

    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo",
                        lambda host, *a, **kw: time.sleep(3) or real(host, *a, **kw))
    t = time.monotonic()
    assert reason(fetcher(web, retries=0, timeout=0.5), "http://slow-dns.invalid/x.jpg") == "timeout"
    assert time.monotonic() - t < 1.5


def test_truncated_body(web, faults):
    assert reason(fetcher(web, retries=0), faults["truncated"]["url"]) == "truncated_body"


def test_body_cap_by_header_and_by_bytes(web, faults):
    assert reason(fetcher(web, max_body_bytes=100_000), faults["huge_body"]["url"]) == "body_too_large"
    # No Content-Length: the cap is enforced while reading.
    assert reason(fetcher(web, retries=0, timeout=5.0, max_body_bytes=50), faults["trickle"]["url"]) == "body_too_large"


def test_redirect_loop(web, faults):
    assert reason(fetcher(web), faults["loop"]["url"]) == "too_many_redirects"


def test_redirect_within_allowed_host_is_followed(web):
    body = b"\x89PNG-not-really"
    web.add("/target.png", Resource(body, "image/png"))
    url = web.add("/hop", Resource(b"", status=301, headers={"Location": "/target.png"}))
    assert fetcher(web).fetch(url) == body


def test_x_robots_tag_opt_out(web, faults):
    with pytest.raises(OptedOut):
        fetcher(web).fetch(faults["noai"]["url"])
    url = web.add("/ua.jpg", Resource(b"x", "image/jpeg", headers={"X-Robots-Tag": "clipforge: noimageai"}))
    with pytest.raises(OptedOut):
        fetcher(web).fetch(url)
    other = web.add("/other.jpg", Resource(b"x", "image/jpeg", headers={"X-Robots-Tag": "otherbot: noai"}))
    assert fetcher(web).fetch(other) == b"x"


def test_bad_scheme(web):
    assert reason(fetcher(web), "ftp://example.com/x.jpg") == "bad_url"
    assert reason(fetcher(web), "file:///etc/passwd") == "bad_url"


def test_phone_jpeg_reported_as_mpo_is_accepted_and_resized():
    import io

    from PIL import Image

    from pipeline.download import ErrorLog, ResizeStage

    buf = io.BytesIO()
    Image.new("RGB", (120, 90), "red").save(buf, "MPO", save_all=True, append_images=[Image.new("RGB", (120, 90))])
    assert sniff_image(buf.getvalue(), 10**8) == ("MPO", 120, 90)
    s = Sample(key="0", row=0, url="u", caption="c", image=buf.getvalue())
    (out,) = ResizeStage(64, "center_crop", "jpg", 90, ErrorLog())(iter([s]))
    assert out.pending and out.meta["width"] == 64


def test_max_image_pixels_above_pillows_limit_applies(monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    # 200M pixels: over twice Pillow's default limit, under ours.
    assert sniff_image(bomb_png(20_000, 10_000), max_pixels=250_000_000)[1:] == (20_000, 10_000)
    with pytest.raises(FetchError) as info:
        sniff_image(bomb_png(20_000, 10_000), max_pixels=150_000_000)
    assert info.value.reason == "decompression_bomb"


def test_sniff_rejects_bombs_and_non_images():
    with pytest.raises(FetchError) as info:
        sniff_image(bomb_png(), max_pixels=89_478_485)
    assert info.value.reason == "decompression_bomb"
    with pytest.raises(FetchError) as info:
        sniff_image(bomb_png(20_000, 20_000), max_pixels=10_000_000)  # below PIL's own limit, above ours
    assert info.value.reason == "decompression_bomb"
    for junk in (b"<html></html>", bytes(range(256)) * 4):
        with pytest.raises(FetchError) as info:
            sniff_image(junk, 10**8)
        assert info.value.reason == "not_an_image"
    with pytest.raises(FetchError) as info:
        sniff_image(b"", 10**8)
    assert info.value.reason == "empty_body"
    good = encode(make_image("cross", "blue", (70, 50), random.Random(1)), "png")
    assert sniff_image(good, 10**8) == ("PNG", 70, 50)


def test_caption_cleaning_and_filter_counts():
    assert clean_caption("a\x00 red\tcircle\u200b\n on\x1b grey ") == "a red circle on grey"
    samples = [Sample(key=str(i), row=i, url="u", caption=c) for i, c in
               enumerate(["a red circle", "   ", "red", "many words " * 5, "a\x07 green square"])]
    cleaner = CaptionCleaner(max_chars=20, truncate=False)
    filt = CaptionFilter(min_words=2, min_chars=5, max_chars=20, drop_long=True)
    out = list(filt(cleaner(iter(samples))))
    assert [s.reason for s in out] == [None, "empty_caption", "caption_too_short", "caption_too_long", None]
    assert out[4].caption == "a green square"
    assert filt.stats == {"seen": 5, "kept": 2, "dropped:empty_caption": 1, "dropped:caption_too_short": 1,
                          "dropped:caption_too_long": 1}
    trunc = list(CaptionCleaner(max_chars=20, truncate=True)(iter([Sample(key="k", row=0, url="u",
                                                                             caption="word " * 10)])))
    assert len(trunc[0].caption) <= 20 and trunc[0].caption.endswith("word")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_targets() -> dict[str, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the listing's own descriptor, closed by now
    return out


def test_watchdog_thread_survives_a_closed_socket_and_keeps_enforcing_deadlines():
    # http.client closes the socket itself (no Content-Length, chunked, errors in the
    # headers or handshake): a deadline passing after that must not end the thread.
    dogs = Watchdogs()
    a, peer = socket.socketpair()
    first = dogs.arm(time.monotonic() + 0.05)
    first.watch(a)
    a.close()
    time.sleep(0.3)
    assert first.expired
    assert peer.recv(1) == b""  # the watched connection itself was shut down
    first.stop()
    peer.close()
    # A server that accepts (in the kernel) and never answers.
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as client:
        client.settimeout(5.0)
        second = dogs.arm(time.monotonic() + 0.3)
        second.watch(client)
        t = time.monotonic()
        try:
            assert client.recv(1) == b""
        except OSError:
            pass
        elapsed = time.monotonic() - t
        second.stop()
    dogs.close()
    assert second.expired and elapsed < 2.0, f"the later deadline was not enforced ({elapsed:.1f}s)"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_fired_watchdog_leaves_a_socket_that_reused_the_descriptor_number_alone():
    a, a_peer = socket.socketpair()
    dog = Watchdog(time.monotonic())
    dog.watch(a)
    number = a.fileno()
    a.close()
    b, b_peer = socket.socketpair()
    try:
        if number not in (b.fileno(), b_peer.fileno()):
            pytest.skip(f"descriptor {number} was not reused")
        mine = b if b.fileno() == number else b_peer
        other = b_peer if mine is b else b
        dog.fire()
        assert dog.expired
        for x, y in ((mine, other), (other, mine)):
            x.sendall(b"x")
            y.settimeout(2.0)
            assert y.recv(1) == b"x"
        a_peer.settimeout(2.0)
        assert a_peer.recv(1) == b""  # the connection it watched was the one shut down
        before = open_fds()
        dog.stop()
        dog.stop()
        dog.fire()  # after stop(): a no-op
        assert open_fds() == before - 1  # its duplicate, closed once
    finally:
        for s in (b, b_peer, a_peer):
            s.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_no_descriptor_leaks_across_fetches_timeouts_and_close(web, faults):
    from concurrent.futures import ThreadPoolExecutor

    f = fetcher(web, retries=0, timeout=0.4)
    f.fetch(faults["dup_first"]["url"])  # warm up: imports, the watchdog thread
    before, targets = open_fds(), fd_targets()
    for _ in range(3):
        assert len(f.fetch(faults["dup_first"]["url"])) > 100
        for name, why in (("trickle_headers", "timeout"), ("trickle", "timeout"), ("slow", "timeout"),
                          ("not_found", "http_404"), ("loop", "too_many_redirects")):
            assert reason(f, faults[name]["url"]) == why
    # Closed while requests are in flight: their watchdogs leave the heap unfired, and each
    # request's own stop() still closes the duplicate (the socket timeout and the deadline
    # checks between body reads end these two; trickled headers would outlast close()).
    with ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(reason, f, faults[name]["url"]) for name in ("trickle", "slow")]
        time.sleep(0.1)
        f.close()
        assert [p.result() for p in pending] == ["timeout", "timeout"]
    # The local web's handler threads notice closed connections at their next write.
    end = time.monotonic() + 5.0
    while open_fds() > before and time.monotonic() < end:
        time.sleep(0.05)
    assert open_fds() <= before, {k: v for k, v in fd_targets().items() if targets.get(k) != v}


# --- X-Robots-Tag: our parser gives img2dataset's answers -------------------------------------

ROBOTS_HEADERS = [
    [], ["noai"], ["NOAI"], ["  noimageai  "], ["noindex, nofollow"], ["nofollow"], ["none"], ["all"], [""],
    ["clipforge: noai"], ["ClipForge: noimageindex"], ["otherbot: noai"], ["clipforge : noai"], ["clipforge:"],
    ["clipforge:noai,nofollow"], ["otherbot: noai", "noimageindex"], ["otherbot: noai", "clipforge: nofollow"],
    ["unavailable_after: 25 Jun 2010 15:00:00 PST"], ["noindex, unavailable_after: 25 Jun 2010 15:00:00 PST"],
    ["nosnippet, noai"], ["noai;"], ["no ai"], ["clipforge: otherbot: noai"], ["caf\xe9: noai"], ["NoIndex"],
]


def test_x_robots_tag_parser_answers_as_img2dataset():
    import http.client
    import io

    from img2dataset.downloader import is_disallowed as img2dataset_is_disallowed  # imports torch: seconds

    from pipeline.fetch import DEFAULT_DISALLOWED, is_disallowed

    checked = 0
    for values in ROBOTS_HEADERS:
        raw = "".join(f"X-Robots-Tag: {v}\r\n" for v in values) + "Content-Type: image/jpeg\r\n\r\n"
        headers = http.client.parse_headers(io.BytesIO(raw.encode("latin-1")))
        for token in ("clipforge", "otherbot", None):
            for directives in (set(DEFAULT_DISALLOWED), {"nosnippet"}, set()):
                ours = is_disallowed(headers, token, directives)
                assert ours == img2dataset_is_disallowed(headers, token, directives), (values, token, directives)
                checked += ours
    assert checked > 10  # the table has opt-outs, not only passes


def test_fetch_imports_no_img2dataset():
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys; from pipeline.fetch import Fetcher, FetchConfig; Fetcher(FetchConfig()).close(); "
            "print(sorted({'img2dataset', 'torch', 'albumentations'} & set(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-1000:])


# --- URLs that cannot be sent -------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/a b.jpg", "/ok.jpg\r\nX-Injected: 1", "/ok\n.jpg", "/ok\t.jpg", "/ok\x00.jpg",
                                  "/ok\x1b[2J.jpg", "/ok\x7f.jpg", "/ok\x85.jpg"])
def test_unsendable_url_is_bad_url_at_once(web, path):
    web.add("/ok.jpg", Resource(b"x", "image/jpeg"))
    f = fetcher(web, retries=3, retry_backoff=5.0)  # a retry would sleep seconds
    t = time.monotonic()
    with pytest.raises(FetchError) as info:
        f.fetch(web.url(path))
    assert info.value.reason == "bad_url" and not info.value.transient
    assert time.monotonic() - t < 1.0
    assert sum(web.hits.values()) == 0  # CR/LF/tab are not silently dropped to fetch another URL
    assert not any(c in info.value.detail for c in "\r\n\t\x00\x1b\x7f\x85")


def test_redirect_to_unsendable_url_is_bad_url(web):
    url = web.add("/hop", Resource(b"", status=302, headers={"Location": "/a b.jpg"}))
    assert reason(fetcher(web), url) == "bad_url"
    assert web.hits["/hop"] == 1


@pytest.mark.parametrize("url", ["http://[::1/x.jpg", "http://h:99999/x.jpg", "http://h:port/x.jpg", "http:///x.jpg"])
def test_malformed_url_is_bad_url(web, url):
    assert reason(fetcher(web), url) == "bad_url"


def test_non_ascii_path_is_percent_encoded(web):
    body = encode(make_image("circle", "red", (64, 64), random.Random(0)), "jpg")
    web.add("/caf%C3%A9.jpg", Resource(body, "image/jpeg"))
    web.add("/hop%C3%A9", Resource(b"", status=302, headers={"Location": "/caf\xc3\xa9.jpg"}))  # raw UTF-8 bytes
    assert fetcher(web).fetch(web.url("/café.jpg")) == body
    assert fetcher(web).fetch(web.url("/hopé")) == body


# --- Special address ranges ---------------------------------------------------------------------

@pytest.mark.parametrize("ip, public", [
    ("2002:a00:1::1", False), ("2002:7f00:1::", False), ("2002:c0a8:101::", False),  # 6to4 of 10/8, 127/8, 192.168/16
    ("2002:808:808::1", True),  # 6to4 of 8.8.8.8
    ("fec0::1", False), ("feff::1", False),  # site-local (fec0::/10)
    ("192.0.0.1", False), ("192.0.0.9", False), ("192.0.0.10", False), ("192.0.0.170", False),  # 192.0.0.0/24
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False), ("2001::1", False),  # Teredo
    ("64:ff9b::a00:1", False), ("64:ff9b::7f00:1", False), ("64:ff9b::a9fe:a9fe", False),  # NAT64 of private
    ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
    ("64:ff9b:1::808:808", False),  # local-use NAT64
])
def test_special_ranges(ip, public):
    assert address_is_public(ip) is public


def test_name_resolving_to_a_special_range_is_blocked(web, monkeypatch):
    import socket as socket_mod

    url = web.add("/x.jpg", Resource(b"x", "image/jpeg"))
    f = fetcher(web)
    monkeypatch.setattr(socket_mod, "getaddrinfo", lambda *a, **kw: [
        (socket_mod.AF_INET6, socket_mod.SOCK_STREAM, 6, "", ("2002:a00:1::1", 80, 0, 0))])
    assert reason(f, url.replace("127.0.0.1", "sixtofour.invalid")) == "blocked_address"


# --- --allow-hosts and IPv6 ---------------------------------------------------------------------

@pytest.mark.parametrize("entry, parsed", [
    ("127.0.0.1:8080", ("127.0.0.1", 8080)), ("Example.COM", ("example.com", None)),
    ("[::1]:8080", ("::1", 8080)), ("[::1]", ("::1", None)), ("[0:0::1]:80", ("::1", 80)),
])
def test_allow_hosts_entries(entry, parsed):
    from pipeline.fetch import parse_allow_host

    assert parse_allow_host(entry) == parsed
    FetchConfig(allow_hosts=(entry,))


@pytest.mark.parametrize("entry, message", [
    ("::1", "needs brackets"), ("::1:8080", "needs brackets"), ("fe80::1", "needs brackets"),
    ("[::1]:99999", "port must be 1..65535"), ("[::1]:", "port must be 1..65535"), ("h:0", "port must be 1..65535"),
    ("h:x", "port must be 1..65535"), ("[::1]x", "write HOST"), ("[::1", "write HOST"),
    ("[example.com]:80", "not an IPv6 address"), (":80", "no host"),
])
def test_bad_allow_hosts_entries_are_refused(entry, message):
    with pytest.raises(ValueError, match=message):
        FetchConfig(allow_hosts=(entry,))


def ipv6_loopback_server(body: bytes):
    import http.server
    import threading

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    try:
        server = Server(("::1", 0), Handler)
    except OSError:
        pytest.skip("no IPv6 loopback")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_bracketed_ipv6_allow_host_with_port():
    body = encode(make_image("circle", "red", (64, 64), random.Random(0)), "jpg")
    server = ipv6_loopback_server(body)
    try:
        port = server.server_address[1]
        url = f"http://[::1]:{port}/x.jpg"
        cfg = dict(timeout=2.0, retries=0)
        assert Fetcher(FetchConfig(allow_hosts=(f"[::1]:{port}",), **cfg)).fetch(url) == body
        assert Fetcher(FetchConfig(allow_hosts=("[::1]",), **cfg)).fetch(url) == body  # explicit: any port
        other = port + 1 if port < 65535 else port - 1
        with pytest.raises(FetchError) as info:
            Fetcher(FetchConfig(allow_hosts=(f"[::1]:{other}",), **cfg)).fetch(url)
        assert info.value.reason == "blocked_address"
    finally:
        server.shutdown()
        server.server_close()


# --- Text the server controls is escaped --------------------------------------------------------

EVIL = "\x1b[2J\x1b]0;pwned\x07\x9b31m"


def test_server_text_reaches_log_and_manifest_escaped(web, caplog):
    from pipeline.download import DownloadStage, ErrorLog

    urls = {
        "robots": web.add("/robots.jpg", Resource(b"x", "image/jpeg", headers={"X-Robots-Tag": f"noai, {EVIL}"})),
        "robots_token": web.add("/t.jpg", Resource(b"x", "image/jpeg", headers={"X-Robots-Tag": f"clipforge: noai,{EVIL}"})),
        "location": web.add("/hop", Resource(b"", status=302, headers={"Location": f"/next{EVIL}.jpg"})),
        "location_host": web.add("/hop2", Resource(b"", status=302,
                                                   headers={"Location": f"http://evil{EVIL}.invalid/x.jpg"})),
    }
    samples = [Sample(key=str(i), row=i, url=u, caption="c") for i, u in enumerate(urls.values())]
    samples.append(Sample(key="9", row=9, url=web.url(f"/input{EVIL}.jpg"), caption="c"))  # the input's own URL
    stage = DownloadStage(fetcher(web, retries=0), threads=4, max_pixels=10**8, errors=ErrorLog())
    with caplog.at_level("WARNING"):
        out = {s.row: s for s in stage(iter(samples))}
    assert out[0].reason == "opted_out" and out[1].reason == "opted_out"
    assert all(s.error for s in out.values()), {s.row: (s.reason, s.error) for s in out.values()}
    for s in out.values():
        assert not any(c in s.error for c in "\x1b\x07\x9b"), (s.reason, s.error)
        assert "\\x1b" in s.error, (s.reason, s.error)  # escaped, not dropped: the operator sees what came
    assert caplog.records and not any(c in caplog.text for c in "\x1b\x07\x9b"), caplog.text
