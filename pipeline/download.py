"""Download, sniff and resize stages.

The fetch runs in a thread pool (network bound); the header sniff runs in the
same threads (cheap, no decode); resizing is img2dataset's `Resizer`, run in
the task's main thread as img2dataset does, with OpenCV limited to one thread
so that one task uses one core.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from img2dataset.resizer import Resizer
from PIL import Image, UnidentifiedImageError

from pipeline.fetch import Fetcher, FetchError, OptedOut, escape_text
from pipeline.sample import Sample

log = logging.getLogger(__name__)

# MPO is how Pillow names the JPEGs many phones write (a JPEG with extra frames appended):
# valid JPEG, decoded by OpenCV like any other.
IMAGE_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"}


class ErrorLog:
    """Per-sample failures: counted, logged first and then every Nth time; never sleeps."""

    def __init__(self, every: int = 100):
        self.every = every
        self.counts: Counter[str] = Counter()

    def __call__(self, reason: str, url: str, detail: str | None) -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if n == 1 or n % self.every == 0:
            log.warning("%s (%d so far): %s %s", reason, n, escape_text(url, 120), escape_text(detail or ""))


def sniff_image(body: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height) from the header only; raise FetchError if not a safe image.

    The decompression-bomb guard: PIL reads dimensions without decoding pixels,
    so a 100,000 x 100,000 PNG of a few hundred bytes is refused before OpenCV
    would try to allocate 30 GB for it.
    """
    if not body:
        raise FetchError("empty_body")
    # Pillow refuses images above 2 * its own MAX_IMAGE_PIXELS in open(), before our
    # check below could apply: raise its limit to ours so --max-image-pixels is the one
    # that counts (Pillow's stays as a backstop at twice ours). Only ever raised, and
    # equal from every thread of a task, so the shared setting needs no lock.
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(body)) as img:
                fmt, (w, h) = img.format, img.size
    except Image.DecompressionBombError as exc:
        raise FetchError("decompression_bomb", str(exc)[:120]) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise FetchError("not_an_image", type(exc).__name__) from None
    if fmt not in IMAGE_FORMATS:
        raise FetchError("not_an_image", f"format {fmt}")
    if w * h > max_pixels:
        raise FetchError("decompression_bomb", f"{w}x{h} > {max_pixels} pixels")
    if w < 1 or h < 1:
        raise FetchError("not_an_image", f"{w}x{h}")
    return fmt, w, h


class DownloadStage:
    """Fetch + sniff pending samples concurrently; yields samples as they complete.

    Yield order is completion order (a slow URL must not stall the others); the
    part writer restores input order. At most `2 * threads` downloads are held in
    memory at once, as img2dataset's semaphore does.
    """

    def __init__(self, fetcher: Fetcher, threads: int, max_pixels: int, errors: ErrorLog):
        self.fetcher, self.threads, self.max_pixels, self.errors = fetcher, threads, max_pixels, errors

    def _work(self, s: Sample) -> Sample:
        try:
            body = self.fetcher.fetch(s.url)
            s.meta["sha256"] = hashlib.sha256(body).hexdigest()
            _, w, h = sniff_image(body, self.max_pixels)
            s.image = body
            s.meta["original_width"], s.meta["original_height"] = w, h
        except OptedOut as exc:
            s.drop("opted_out")
            s.error = exc.detail
        except FetchError as exc:
            self.errors(exc.reason, s.url, exc.detail)
            s.fail(exc.reason, exc.detail)
        except Exception as exc:  # noqa: BLE001 - one odd URL must not kill the task
            self.errors("download_error", s.url, repr(exc))
            s.fail("download_error", repr(exc)[:200])
        return s

    def __call__(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        window = max(1, 2 * self.threads)
        try:
            yield from self._download(samples, window)
        finally:
            self.fetcher.close()

    def _download(self, samples: Iterator[Sample], window: int) -> Iterator[Sample]:
        with ThreadPoolExecutor(self.threads, thread_name_prefix="fetch") as pool:
            inflight: set[Future[Sample]] = set()
            for s in samples:
                if not s.pending:
                    yield s
                    continue
                inflight.add(pool.submit(self._work, s))
                if len(inflight) >= window:
                    done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                    for f in done:
                        yield f.result()
            while inflight:
                done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()


class ResizeStage:
    """img2dataset's Resizer, on samples that passed the header-based filters."""

    def __init__(self, image_size: int, resize_mode: str, encode_format: str, encode_quality: int, errors: ErrorLog):
        self.resizer = Resizer(
            image_size=image_size,
            resize_mode=resize_mode,
            resize_only_if_bigger=False,
            encode_format=encode_format,
            encode_quality=encode_quality,
        )
        self.ext = encode_format
        self.errors = errors

    def __call__(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        for s in samples:
            if s.pending:
                img, width, height, ow, oh, err = self.resizer(io.BytesIO(s.image))
                if err is not None or img is None:
                    self.errors("decode_error", s.url, err)
                    s.fail("decode_error", err)
                else:
                    s.image, s.ext = img, self.ext
                    s.meta.update(width=width, height=height, original_width=ow, original_height=oh)
            yield s
