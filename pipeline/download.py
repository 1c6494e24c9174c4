"""Download, sniff and resize stages.

The fetch runs in a thread pool (network bound); the header sniff runs in the
same threads (cheap, no decode); resizing (pipeline.resize, img2dataset's
geometry with the decode's memory judged first) runs in the task's main thread
as img2dataset does, with OpenCV limited to one thread so that one task uses
one core.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import cv2

from pipeline.fetch import Fetcher, FetchError, OptedOut, escape_text
from pipeline.resize import DEFAULT_MAX_DECODE_BYTES, ImageError, Resizer, read_header
from pipeline.sample import Sample

log = logging.getLogger(__name__)


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
    would try to allocate 30 GB for it. The bytes a decode needs are judged
    later, by the resize stage, which knows the target size.
    """
    try:
        header = read_header(body, max_pixels)
    except ImageError as exc:
        raise FetchError(exc.reason, exc.detail) from None
    return header.format, header.width, header.height


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
    """Decode, resize and encode samples that passed the header-based filters (pipeline.resize)."""

    def __init__(self, image_size: int, resize_mode: str, encode_format: str, encode_quality: int, errors: ErrorLog,
                 max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES):
        cv2.setNumThreads(1)  # one task, one core (img2dataset sets the same)
        self.resizer = Resizer(image_size, resize_mode, encode_format, encode_quality, max_decode_bytes)
        self.ext = encode_format
        self.errors = errors

    def __call__(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        for s in samples:
            if s.pending:
                try:
                    # The header again (microseconds): the download stage keeps only the bytes.
                    image, width, height = self.resizer(s.image or b"", read_header(s.image or b""))
                except ImageError as exc:
                    self.errors(exc.reason, s.url, exc.detail)
                    s.fail(exc.reason, escape_text(exc.detail))
                except Exception as exc:  # noqa: BLE001 - one odd image must not kill the task
                    detail = f"{type(exc).__name__}: {exc}"
                    self.errors("decode_error", s.url, detail)
                    s.fail("decode_error", escape_text(detail))
                else:
                    s.image, s.ext = image, self.ext
                    s.meta.update(width=width, height=height)
            yield s
