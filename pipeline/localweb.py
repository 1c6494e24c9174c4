"""A local "web" of generated captioned images, served on 127.0.0.1.

The machine this project is built on has no internet, so the demo, the tests
and the benchmarks make their own web: coloured shapes on textured backgrounds
in jpg/png/webp at several sizes, captioned with what they show (so a tiny CLIP
can learn the task and be evaluated zero-shot), plus a set of faulty URLs that
exercise every failure path of the downloader.

    python -m pipeline.localweb --out data/ --n 3000        # writes data/urls.parquet, serves until Ctrl-C
"""

from __future__ import annotations

import argparse
import io
import random
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
CLASSES = [f"{c} {s}" for c in COLORS for s in SHAPES]
TEMPLATES = (
    "a photo of a {c}.",
    "a {c} on a plain background",
    "picture of one {c}",
    "an illustration showing a {c}",
    "a small {c}, drawn by hand",
)


def make_image(shape: str, color: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A coloured shape on a noisy two-tone background; every call looks different."""
    w, h = size
    bg1 = tuple(rng.randint(150, 250) for _ in range(3))
    bg2 = tuple(max(0, c - rng.randint(20, 80)) for c in bg1)
    img = Image.new("RGB", (w, h), bg1)
    draw = ImageDraw.Draw(img)
    # Background texture: random stripes and blobs so perceptual hashes differ between images.
    for _ in range(rng.randint(3, 8)):
        x0, y0 = rng.randint(0, w), rng.randint(0, h)
        r = rng.randint(max(2, min(w, h) // 12), max(3, min(w, h) // 3))
        draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=bg2)
    s = min(w, h)
    cx, cy = w // 2 + rng.randint(-s // 8, s // 8), h // 2 + rng.randint(-s // 8, s // 8)
    r = int(s * rng.uniform(0.22, 0.34))
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLORS[color])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        t = max(2, r // 3)
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img.filter(ImageFilter.GaussianBlur(0.6))


def encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    pil_fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    kwargs = {"quality": quality} if pil_fmt in ("JPEG", "WEBP") else {}
    img.save(buf, pil_fmt, **kwargs)
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming huge dimensions, with a tiny (truncated) body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@dataclass
class Resource:
    body: bytes
    content_type: str = "application/octet-stream"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    """Seconds to wait before answering (a slow server)."""
    trickle: bool = False
    """Send the body a few bytes at a time, forever (a URL that never finishes)."""
    trickle_headers: bool = False
    """Send the status line, then one header byte every 0.3 s (headers that never end)."""
    truncate: bool = False
    """Promise the full Content-Length, send half, close."""
    fail_first: int = 0
    """Answer 503 this many times, then the resource (a transient failure)."""
    reset: bool = False
    """Read the request, then reset the connection (TCP RST) without answering."""

    def wire(self) -> bytes:
        """The whole response of a plain resource, status line to body, rendered once and cached:
        the benchmark's web answers thousands of requests a second from a process that shares
        the machine's cores with the tools it measures."""
        cached = self.__dict__.get("_wire")
        if cached is None:
            reason = {200: "OK", 404: "Not Found", 500: "Internal Server Error", 503: "Service Unavailable"}
            head = [f"HTTP/1.1 {self.status} {reason.get(self.status, 'Status')}",
                    f"Content-Type: {self.content_type}", f"Content-Length: {len(self.body)}",
                    *(f"{k}: {v}" for k, v in self.headers.items())]
            cached = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + self.body
            self.__dict__["_wire"] = cached
        return cached


class LocalWeb:
    """Resources by path, served by a ThreadingHTTPServer on a loopback address."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.resources: dict[str, Resource] = {}
        self.hits: Counter[str] = Counter()
        self.request_headers: dict[str, list[dict[str, str]]] = {}
        """Headers of each request received, by path, in arrival order."""
        self.connections = 0
        """TCP connections accepted so far (keep-alive carries several requests on one)."""
        self._lock = threading.Lock()
        web = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with web._lock:
                    web.connections += 1

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                with web._lock:
                    web.hits[path] += 1
                    hit = web.hits[path]
                    web.request_headers.setdefault(path, []).append(dict(self.headers.items()))
                res = web.resources.get(path)
                if res is None:
                    self._send(404, b"not found", "text/plain")
                    return
                if res.delay:
                    time.sleep(res.delay)
                if res.reset:
                    # SO_LINGER 0: close() sends RST, not FIN (a peer that crashed or a middlebox).
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                if hit <= res.fail_first:
                    self._send(503, b"busy", "text/plain")
                    return
                if res.trickle:
                    self.send_response(200)
                    self.send_header("Content-Type", res.content_type)
                    self.send_header("Connection", "close")  # body ends at close: no length to refuse early
                    self.end_headers()
                    self.close_connection = True
                    try:
                        for _ in range(600):  # bounded: stops by itself after ~60 s
                            self.wfile.write(b"\x00" * 16)
                            self.wfile.flush()
                            time.sleep(0.1)
                    except OSError:
                        pass
                    return
                if res.trickle_headers:
                    self.close_connection = True
                    try:
                        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                        for _ in range(200):  # bounded: stops by itself after ~60 s
                            self.wfile.write(b"X")
                            self.wfile.flush()
                            time.sleep(0.3)
                    except OSError:
                        pass
                    return
                if res.truncate:
                    self.send_response(res.status)
                    self.send_header("Content-Type", res.content_type)
                    self.send_header("Content-Length", str(len(res.body)))
                    self.end_headers()
                    self.wfile.write(res.body[: len(res.body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                try:
                    self.wfile.write(res.wire())
                except OSError:
                    pass

            def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass

        self.server = _Server((host, port), Handler)
        self.server.daemon_threads = True
        self.host, self.port = self.server.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, res: Resource) -> str:
        self.resources[path] = res
        return self.url(path)

    def start(self) -> LocalWeb:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 drops connections when dozens of download
    # threads connect at once (the client then waits a second for its SYN to be resent).
    request_queue_size = 1024


@contextmanager
def serving(host: str = "127.0.0.1") -> Iterator[LocalWeb]:
    web = LocalWeb(host).start()
    try:
        yield web
    finally:
        web.stop()


MIME = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def populate_images(web: LocalWeb, n: int, seed: int = 0, prefix: str = "/img") -> list[dict]:
    """Add n good captioned images; return rows {url, caption, uid, label}."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        size = rng.choice([(96, 96), (160, 120), (200, 260), (320, 240), (400, 400), (640, 480)])
        fmt = rng.choice(["jpg", "jpg", "png", "webp"])
        img = make_image(shape, color, size, rng)
        url = web.add(f"{prefix}/{i:06d}.{fmt}", Resource(encode(img, fmt), MIME[fmt]))
        caption = rng.choice(TEMPLATES).format(c=f"{color} {shape}")
        rows.append({"url": url, "caption": caption, "uid": f"u{seed}-{i:06d}", "label": f"{color} {shape}"})
    return rows


def populate_faults(web: LocalWeb, internal: LocalWeb | None = None, seed: int = 1) -> dict[str, dict]:
    """Add one URL per failure mode; return {name: row}. `internal` stands for a private host."""
    rng = random.Random(seed)
    good = encode(make_image("circle", "red", (128, 128), rng), "jpg")
    rows: dict[str, dict] = {}

    def add(name: str, res: Resource | None, caption: str = "a photo of a red circle.", path: str | None = None):
        path = path or f"/fault/{name}"
        url = web.add(path, res) if res is not None else web.url(path)
        rows[name] = {"url": url, "caption": caption, "uid": f"fault-{name}"}

    add("not_found", None)
    add("server_error", Resource(b"oops", "text/plain", status=500))
    add("transient_503", Resource(good, "image/jpeg", fail_first=1))
    add("slow", Resource(good, "image/jpeg", delay=3.0))
    add("trickle", Resource(b"", "image/jpeg", trickle=True))
    add("trickle_headers", Resource(b"", "image/jpeg", trickle_headers=True))
    add("truncated", Resource(good, "image/jpeg", truncate=True))
    add("html", Resource(b"<html><body>hello</body></html>", "text/html"))
    add("empty", Resource(b"", "image/jpeg"))
    add("random_bytes", Resource(random.Random(seed).randbytes(5000), "image/jpeg"))
    add("bomb", Resource(bomb_png(), "image/png"))
    add("huge_body", Resource(good + b"\x00" * (3 * 2**20), "image/jpeg"))
    add("noai", Resource(good, "image/jpeg", headers={"X-Robots-Tag": "noai"}))
    add("tiny", Resource(encode(make_image("square", "blue", (12, 12), rng), "png"), "image/png"))
    add("wide", Resource(encode(make_image("square", "green", (640, 160), rng), "jpg"), "image/jpeg"))
    add("long_caption", Resource(encode(make_image("cross", "purple", (128, 128), rng), "jpg"), "image/jpeg"),
        caption="a purple cross " * 200)
    add("empty_caption", Resource(good, "image/jpeg"), caption="   ")
    add("loop", Resource(b"", "text/plain", status=302, headers={"Location": "/fault/loop2"}))
    web.add("/fault/loop2", Resource(b"", "text/plain", status=302, headers={"Location": "/fault/loop"}))
    if internal is not None:
        internal.add("/secret.jpg", Resource(good, "image/jpeg"))
        add("redirect_internal", Resource(b"", "text/plain", status=302,
                                          headers={"Location": internal.url("/secret.jpg")}))
    # A duplicate URL: same as a good one.
    web.add("/fault/dup.jpg", Resource(encode(make_image("triangle", "orange", (128, 128), rng), "jpg"), "image/jpeg"))
    rows["dup_first"] = {"url": web.url("/fault/dup.jpg"), "caption": "an orange triangle", "uid": "fault-dup1"}
    rows["dup_second"] = {"url": web.url("/fault/dup.jpg"), "caption": "an orange triangle", "uid": "fault-dup2"}
    return rows


def write_imagefolder(root: str | Path, per_class: int = 10, seed: int = 100, size: int = 128) -> list[Path]:
    """A classification eval set: root/<class_folder>/<n>.jpg, classnames.txt, templates.txt.

    Folder names are "red_circle" etc. (sorted order = classnames.txt order).
    Returns the image paths.
    """
    rng = random.Random(seed)
    root = Path(root)
    folders = sorted(c.replace(" ", "_") for c in CLASSES)
    paths = []
    for folder in folders:
        color, shape = folder.split("_")
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / folder / f"{i:04d}.jpg"
            path.write_bytes(encode(make_image(shape, color, (size, size), rng), "jpg"))
            paths.append(path)
    (root / "classnames.txt").write_text("\n".join(f.replace("_", " ") for f in folders) + "\n")
    (root / "templates.txt").write_text("a photo of a {c}.\na picture of a {c}.\na drawing of a {c}.\n")
    return paths


def write_retrieval(root: str | Path, n: int = 50, seed: int = 200, size: int = 128) -> list[Path]:
    """A retrieval eval set: root/KEY.jpg + root/KEY.txt pairs. Returns the image paths."""
    rng = random.Random(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        path = root / f"{i:05d}.jpg"
        path.write_bytes(encode(make_image(shape, color, (size, size), rng), "jpg"))
        (root / f"{i:05d}.txt").write_text(rng.choice(TEMPLATES).format(c=f"{color} {shape}") + "\n")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for urls.parquet")
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    web = LocalWeb().start()
    rows = populate_images(web, args.n, args.seed) + list(populate_faults(web).values())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), Path(args.out) / "urls.parquet")
    print(f"serving {len(rows)} URLs on {web.base}; use --allow-hosts {web.hostport}; Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        web.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
