"""Download, sniff and resize stages.

The network side runs in a dispatcher thread and a thread pool (DownloadStage:
requests wait for their answers in a selector, not in threads; retries wait in a
queue, not in sleeps); the header sniff runs in the pool's threads (cheap, no
decode); resizing (pipeline.resize, img2dataset's geometry with the decode's
memory judged first) runs in the task's main thread as img2dataset does, with
OpenCV limited to one thread so that one task uses one core.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import itertools
import logging
import queue
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import cv2

from pipeline.fetch import Attempt, Fetcher, FetchError, OptedOut, escape_text
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


_END = object()


def raise_open_files_limit() -> None:
    """Raise this process's soft limit on open files (to 65,536 or the hard limit): a download task
    keeps hundreds of requests open at once, two descriptors each (the socket and its watchdog's)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass  # not permitted or not POSIX: the stage works with fewer requests open


class DownloadStage:
    """Fetch + sniff pending samples concurrently; yields samples as they complete.

    Yield order is completion order (a slow URL must not stall the others); the
    part writer restores input order. The network never holds the CPU stage back:
    a dispatcher thread runs the network side while the task's main thread decodes.

    - **Waiting holds no thread.** A thread connects and sends a request
      (Fetcher.start), and the request then waits in the dispatcher's selector
      until its answer starts (or its deadline's watchdog shuts it); a thread reads
      the answer (Attempt.resume). So up to `8 * threads` rows are in flight, and
      hanging hosts cost descriptors, not the threads that feed the CPU stage.
    - **Retries are queued, not slept.** A transient failure goes to a queue with
      its backoff and is sent again when due, before any new row (the sooner the
      task's oldest rows end, the shorter its tail).
    - **Rows start early, memory stays bounded.** New rows are started as long as
      less than HELD_BYTES of downloaded bodies wait for the CPU stage (not a count
      of rows: a task whose rows hang holds nothing, so all of them start at once and
      their deadlines run out together, not one window after another behind the
      CPU; img2dataset's semaphore of `2 * threads` rows is the count version).

    `cpu_seconds` is the fetch threads' CPU time (requests, sniff, hash).
    """

    HELD_BYTES = 96 * 2**20
    """Downloaded bodies waiting for the CPU stage, at most (plus what the threads are reading):
    a build task's own ~280 MB peak (measured) and this stay under 400 MB."""

    QUICK_ANSWER = 0.005
    """Seconds a thread waits for an answer itself before it hands the request to the selector."""

    def __init__(self, fetcher: Fetcher, threads: int, max_pixels: int, errors: ErrorLog):
        self.fetcher, self.threads, self.max_pixels, self.errors = fetcher, threads, max_pixels, errors
        self.retries = fetcher.cfg.retries
        self.max_open = 8 * threads
        self.max_held = self.HELD_BYTES
        self._held = 0
        self.cpu_seconds = 0.0
        self.attempts = 0
        self._lock = threading.Lock()

    # -- in the fetch threads: each returns ("wait", Attempt), ("retry", error) or ("done", None)

    def _start(self, s: Sample, attempt: int) -> tuple[str, Any]:
        with self._lock:
            self.attempts += 1
        return self._step(s, attempt, None)

    def _step(self, s: Sample, attempt: int, a: Attempt | None) -> tuple[str, Any]:
        t0 = time.thread_time()
        try:
            if a is None:
                a = self.fetcher.start(s.url)
                # A host that answers at once is read in this thread: handing every request to
                # the selector and back costs a dispatcher round trip per image.
                if not a.wait(self.QUICK_ANSWER):
                    return "wait", a
            a.resume()
            while a.body is None:  # a redirect, sent
                if not a.wait(self.QUICK_ANSWER):
                    return "wait", a
                a.resume()
            body = a.body
            s.meta["sha256"] = hashlib.sha256(body).hexdigest()
            _, w, h = sniff_image(body, self.max_pixels)
            s.image = body
            s.meta["original_width"], s.meta["original_height"] = w, h
        except OptedOut as exc:
            s.drop("opted_out")
            s.error = exc.detail
        except FetchError as exc:
            if exc.transient and attempt < self.retries:
                return "retry", exc
            self.errors(exc.reason, s.url, exc.detail)
            s.fail(exc.reason, exc.detail)
        except Exception as exc:  # noqa: BLE001 - one odd URL must not kill the task
            self.errors("download_error", s.url, repr(exc))
            s.fail("download_error", repr(exc)[:200])
        finally:
            dt = time.thread_time() - t0
            with self._lock:
                self.cpu_seconds += dt
        return "done", None

    # -- the consumer side: the task's main thread

    def __call__(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        raise_open_files_limit()
        out: queue.Queue[Any] = queue.Queue()
        stop = threading.Event()
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        dispatcher = threading.Thread(target=self._dispatch, args=(iter(samples), out, stop, wake_r, wake_w),
                                      name="fetch-dispatch", daemon=True)
        dispatcher.start()
        try:
            while True:
                item = out.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                with self._lock:
                    self._held -= len(item.image or b"")
                _wake(wake_w)  # the dispatcher may be holding new rows back for want of room
                yield item
        finally:
            stop.set()
            _wake(wake_w)
            dispatcher.join()
            wake_r.close()
            wake_w.close()
            self.fetcher.close()

    # -- the dispatcher thread

    def _dispatch(self, source: Iterator[Sample], out: queue.Queue[Any], stop: threading.Event,
                  wake_r: socket.socket, wake_w: socket.socket) -> None:
        try:
            self._loop(source, out, stop, wake_r, wake_w)
            out.put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the task's thread, which raises it
            out.put(exc)

    def _loop(self, source: Iterator[Sample], out: queue.Queue[Any], stop: threading.Event,
              wake_r: socket.socket, wake_w: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(wake_r, selectors.EVENT_READ, None)
        busy: dict[Future[tuple[str, Any]], tuple[Sample, int]] = {}  # in the thread pool
        finished: collections.deque[Future[tuple[str, Any]]] = collections.deque()
        waiting: dict[int, tuple[Sample, Attempt, int]] = {}  # by descriptor: answers not started yet
        backoff: list[tuple[float, int, Sample, int]] = []  # (due, seq, sample, attempt): queued retries
        seq = itertools.count()
        more = True

        def on_done(f: Future[tuple[str, Any]]) -> None:
            finished.append(f)
            _wake(wake_w)

        def submit(s: Sample, attempt: int, fn: Any, *args: Any) -> None:
            f = pool.submit(fn, s, attempt, *args)
            busy[f] = (s, attempt)
            f.add_done_callback(on_done)

        def can_start() -> bool:
            # Threads always have queued work; no more than max_open requests open; and no new
            # row while max_held bytes of bodies wait for the CPU stage (the CPU is the bottleneck
            # then). Requests already open are still served: deadlines and retries keep time.
            return (len(busy) < 2 * self.threads and len(busy) + len(waiting) < self.max_open
                    and self._held < self.max_held)

        def deliver(s: Sample) -> None:
            with self._lock:
                self._held += len(s.image or b"")
            out.put(s)

        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="fetch")
        try:
            while more or busy or waiting or backoff:
                if stop.is_set():
                    return
                now = time.monotonic()
                while backoff and backoff[0][0] <= now and can_start():
                    _, _, s, attempt = heapq.heappop(backoff)
                    submit(s, attempt, self._start)
                while more and can_start():
                    s = next(source, None)
                    if s is None:
                        more = False
                    elif not s.pending:
                        deliver(s)
                    else:
                        submit(s, 0, self._start)
                # Until the next retry is due; one that is due already waits for room like a new row
                # (a completion, a readable socket or the CPU stage taking a row wakes this up).
                now = time.monotonic()
                timeout = backoff[0][0] - now if backoff and backoff[0][0] > now else None
                if not (more or busy or waiting or backoff):
                    break
                for key, _ in sel.select(timeout):
                    if key.data is None:
                        _drain(wake_r)
                        continue
                    sel.unregister(key.fd)
                    s, a, attempt = waiting.pop(key.fd)
                    submit(s, attempt, self._step, a)
                while finished:
                    f = finished.popleft()
                    s, attempt = busy.pop(f)
                    kind, value = f.result()
                    if kind == "wait":
                        fd = value.fileno()
                        waiting[fd] = (s, value, attempt)
                        sel.register(fd, selectors.EVENT_READ, fd)
                    elif kind == "retry":
                        due = time.monotonic() + self.fetcher.backoff(attempt)
                        heapq.heappush(backoff, (due, next(seq), s, attempt + 1))
                    else:
                        deliver(s)
        finally:
            # Stopped early (the task failed): close what is still open, nothing is pooled.
            for _, a, _ in waiting.values():
                a.abandon()
            sel.close()
            pool.shutdown(wait=True, cancel_futures=True)
            for f in busy:
                if not f.cancelled() and f.exception() is None and f.result()[0] == "wait":
                    f.result()[1].abandon()


def _wake(w: socket.socket) -> None:
    try:
        w.send(b"x")
    except OSError:  # full (the dispatcher has wake-ups pending anyway) or closed
        pass


def _drain(r: socket.socket) -> None:
    try:
        while r.recv(4096):
            pass
    except OSError:  # BlockingIOError: nothing more
        pass


class ResizeStage:
    """Decode, resize and encode samples that passed the header-based filters (pipeline.resize)."""

    def __init__(self, image_size: int, resize_mode: str, encode_format: str, encode_quality: int, errors: ErrorLog,
                 max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES):
        cv2.setNumThreads(1)  # one task, one core (img2dataset sets the same)
        self.resizer = Resizer(image_size, resize_mode, encode_format, encode_quality, max_decode_bytes)
        self.ext = encode_format
        self.errors = errors
        self.cpu_seconds = 0.0
        """CPU time of decode, resize and encode (this stage runs in the task's main thread)."""

    def __call__(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        for s in samples:
            if s.pending:
                t0 = time.thread_time()
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
                finally:
                    self.cpu_seconds += time.thread_time() - t0
            yield s
