"""Training data: a deterministic, resumable webdataset stream of (images, tokens) batches.

Per epoch and rank the stream is a pure function of (seed, epoch, rank, world size,
worker count, batch size), so a resumed run can rebuild it and skip to where it
stopped:

* The shard list is shuffled with (seed, epoch), identical on all ranks, then split
  by node (`[rank::world]`) and by worker (`[w::workers]`) as OpenCLIP does.
* Each worker reads its shards (tar_members, then webdataset's grouping of members
  into samples), pushes the raw samples through a seeded shuffle buffer, and only
  then decodes; augmentation randomness is
  seeded per sample. A worker that exhausts its shards reads them again (new order)
  until it has produced its quota, so every rank yields exactly the same number of
  batches per epoch and no collective ever waits for a rank that ran dry. A full
  pass that yields nothing usable is an error, never an endless loop (OpenCLIP #569).
* Batch k of a rank comes from logical worker k % workers (DataLoader's round robin).
  Each batch carries (worker, raw samples consumed so far); the trainer records it,
  and on resume each worker skips exactly that many raw samples without decoding
  them. Bad samples are skipped identically both times, so the batches after a resume
  equal those of an uninterrupted run.
* No sample is lost unseen. Python's tarfile takes a member header that is cut short
  (or garbage) for the end of the archive; tar_members checks that a shard really
  ended, and what each shard delivered is compared with its sizes.json count: every
  sample a damaged shard did not deliver is counted as bad, and the shard named.

Of webdataset only `group_by_keys` is used, which has the same behaviour in 0.2.86 and
0.2.111 (later versions broke OpenCLIP's pipeline, see REFERENCE.md).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import subprocess
import tarfile
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import PurePosixPath
from typing import IO, Any

import braceexpand
import fsspec
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.rundir import OutputError, resolve
from pipeline.shards import SIZES_FILE
from training.errors import TrainError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
WARN_EVERY = 100
"""Bad samples: warn on the first, then every WARN_EVERY-th (per worker), never sleep."""


PIPE = "pipe:"
"""A shard that is a shell command's standard output (`pipe:aws s3 cp s3://b/00000.tar -`), as in
webdataset and OpenCLIP: nothing to check before it runs, no sizes.json beside it."""


def is_pipe(url: str) -> bool:
    return url.startswith(PIPE)


def source_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a shard or sizes.json: a local path, or a URL of any scheme fsspec
    serves here (s3://, gs://, http(s)://, ...); a scheme it does not serve, or a malformed URL
    (s3:/bucket), is a TrainError, never a local path named after it."""
    try:
        return resolve(url, "--train-data")
    except OutputError as exc:
        raise TrainError(str(exc)) from None


def expand_shards(spec: str) -> list[str]:
    """'a/{000..009}.tar::s3://b/x.tar::pipe:CMD' -> shard URLs, checking that those with a path exist
    (a pipe: command is only run by the loader)."""
    urls: list[str] = []
    for source in spec.split("::"):
        source = source.strip()
        if source:
            # Braces in a pipe: command expand too (pipe:aws s3 cp s3://b/{000..009}.tar -), as in webdataset.
            urls.extend(braceexpand.braceexpand(source))
    if not urls:
        raise TrainError(f"--train-data {spec!r}: expands to no shards")
    missing = []
    for url in urls:
        if is_pipe(url):
            if not url[len(PIPE):].strip():
                raise TrainError(f"--train-data {url!r}: a pipe: source needs a command (pipe:CMD)")
            continue
        fs, path = source_fs(url)
        try:
            found = fs.exists(path)
        except Exception as exc:  # no credentials, no route, access denied: name the shard, not a traceback
            raise TrainError(f"{url}: cannot check the shard ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]})") from None
        if not found:
            missing.append(url)
    if missing:
        raise TrainError(f"{missing[0]}: shard not found ({len(missing)} of {len(urls)} listed shards are missing)")
    return urls


def _stats_count(fs: fsspec.AbstractFileSystem, parent: str, name: str) -> int | None:
    """Samples in NAME.tar by img2dataset's NAME_stats.json beside it ("successes": its tar holds
    only the successful rows), None if there is none."""
    stats = f"{parent}/{name.rsplit('.', 1)[0]}_stats.json"
    try:
        with fs.open(stats, "rb") as f:
            n = json.load(f)["successes"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainError(f"{stats}: not an img2dataset shard stats file ({type(exc).__name__}: {exc})") from None
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise TrainError(f"{stats}: successes {n!r} is not a sample count")
    return n


def read_sizes(urls: list[str], required: bool = False) -> dict[str, int | None]:
    """Each shard's sample count from the sizes.json next to it (shard basename -> count), or where a
    folder has none, from img2dataset's per-shard NAME_stats.json; None where neither is there (an
    error if `required`). A pipe: shard has neither."""
    by_dir: dict[str, list[str]] = {}
    counts: dict[str, int | None] = {}
    for url in urls:
        if is_pipe(url):
            if required:
                raise TrainError(f"--train-data {url!r}: a pipe: source has no sizes.json to count its samples; "
                                 "pass --train-num-samples (samples per epoch)")
            counts[url] = None
            continue
        parent, _, name = url.rpartition("/")
        by_dir.setdefault(parent or ".", []).append(url)
    for parent, members in by_dir.items():
        sizes_url = f"{parent}/{SIZES_FILE}"
        fs, path = source_fs(sizes_url)
        if not fs.exists(path):
            folder = path.rsplit("/", 1)[0]
            for url in members:
                counts[url] = _stats_count(fs, folder, url.rpartition("/")[2])
                if counts[url] is None and required:
                    raise TrainError(f"{sizes_url}: missing (nor is there an img2dataset "
                                     f"{url.rpartition('/')[2].rsplit('.', 1)[0]}_stats.json); write it "
                                     "(shard name -> sample count) or pass --train-num-samples")
            continue
        try:
            with fs.open(path, "rb") as f:
                sizes = json.load(f)
        except (OSError, ValueError) as exc:
            raise TrainError(f"{sizes_url}: unreadable ({exc})") from exc
        if not isinstance(sizes, dict):
            raise TrainError(f"{sizes_url}: expected a mapping of shard name -> sample count")
        for url in members:
            name = url.rpartition("/")[2]
            if name not in sizes:
                if required:
                    raise TrainError(f"{sizes_url}: has no entry for {name}; rewrite it or pass --train-num-samples")
                counts[url] = None
                continue
            n = sizes[name]
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise TrainError(f"{sizes_url}: {name}: {n!r} is not a sample count")
            counts[url] = n
    return counts


def count_samples(urls: list[str]) -> int:
    """Sum of sizes.json entries (shard basename -> count) over the listed shards."""
    return sum(n or 0 for n in read_sizes(urls, required=True).values())


HEAD_BYTES = 4096
"""Bytes of each shard that its data fingerprint covers: the first member header and sample data."""
MIN_SAMPLE_BYTES = 1536
"""The fewest tar bytes a sample can take: an image member (512-byte header + a data block) and a
txt member (a header; an empty caption has no data block)."""


@dataclass
class ShardSet:
    """The training shards as they are on disk: what a run's data identity is made of."""

    urls: list[str]
    nbytes: list[int]
    counts: dict[str, int | None]
    """Sample count per shard from sizes.json, None where unknown."""
    _fingerprint: dict[str, Any] | None = field(default=None, init=False, repr=False)

    @classmethod
    def describe(cls, urls: list[str]) -> ShardSet:
        nbytes = []
        for url in urls:
            if is_pipe(url):
                nbytes.append(0)  # unknown until the command runs
                continue
            fs, path = source_fs(url)
            nbytes.append(int(fs.size(path) or 0))  # a web server may not say (then no head is read either)
        return cls(urls, nbytes, read_sizes(urls))

    def fingerprint(self) -> dict[str, Any]:
        """Identity by content, not by path spelling: each shard's name, size in bytes, sizes.json count
        and first HEAD_BYTES (its first sample), in order (the order decides the shuffle). The head is
        needed because tar sizes are rounded up to 10 KiB records: other shards of the same sample
        count often have the very same sizes. On object storage the head is one ranged read. A pipe:
        shard cannot be looked at without running it: its command stands for it. Computed once, on
        first use."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for url, n in zip(self.urls, self.nbytes, strict=True):
                if is_pipe(url):
                    h.update(f"{url}\0".encode())
                    continue
                fs, path = source_fs(url)
                # Sliced again: a web server that ignores Range sends the whole file.
                head = fs.cat_file(path, start=0, end=min(n, HEAD_BYTES))[:HEAD_BYTES] if n else b""
                h.update(f"{url.rpartition('/')[2]}\0{n}\0{self.counts.get(url)}\0".encode())
                h.update(hashlib.blake2b(head, digest_size=16).digest())
            self._fingerprint = {"shards": len(self.urls), "bytes": sum(self.nbytes), "digest": h.hexdigest()[:32]}
        return self._fingerprint

    def implausible_counts(self) -> list[str]:
        """Shards for which sizes.json claims more samples than the file could hold."""
        out = []
        for url, n in zip(self.urls, self.nbytes, strict=True):
            count = self.counts.get(url)
            if count is not None and count > n // MIN_SAMPLE_BYTES:
                out.append(f"{url}: sizes.json says {count} samples, but {n} bytes hold at most "
                           f"{n // MIN_SAMPLE_BYTES}")
        return out


def _seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def epoch_shard_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """Shard order of an epoch: the same on every rank, different each epoch."""
    order = list(urls)
    random.Random(_seed("shards", seed, epoch)).shuffle(order)
    return order


@dataclass(kw_only=True)
class EpochPlan:
    """What one rank reads in one epoch, and from where it resumes."""

    urls: list[str]
    seed: int
    epoch: int
    rank: int
    world_size: int
    workers: int
    """DataLoader workers (0: in-process); the stream has max(1, workers) logical workers."""
    batch_size: int
    batches: int
    """Batches this rank yields in the whole epoch."""
    start_batch: int = 0
    """Batches already consumed (resume); the loader yields batches start_batch..batches-1."""
    consumed: list[int] = field(default_factory=list)
    """Raw samples each logical worker had consumed when start_batch was reached."""
    bad: list[int] = field(default_factory=list)
    """Bad samples each logical worker had counted in this epoch when start_batch was reached."""
    shuffle_buffer: int = 1000
    shuffle_initial: int = 100
    sizes: dict[str, int | None] = field(default_factory=dict)
    """Samples per shard from sizes.json, where known: what each shard must deliver."""

    def __post_init__(self) -> None:
        if not self.consumed:
            self.consumed = [0] * self.n_workers
        if len(self.consumed) != self.n_workers:
            raise TrainError(f"data position has {len(self.consumed)} workers, this run has {self.n_workers}")
        if len(self.bad) != self.n_workers:
            self.bad = [0] * self.n_workers  # older checkpoints did not record it
        if len(self.urls) < self.world_size * self.n_workers:
            raise TrainError(
                f"{len(self.urls)} shards cannot feed {self.world_size} ranks x {self.n_workers} workers "
                f"(each needs at least one shard); lower --workers or write more, smaller shards")

    @property
    def n_workers(self) -> int:
        return max(1, self.workers)

    def worker_shards(self, w: int) -> list[str]:
        """Split by node, then by worker (OpenCLIP's split_by_node + split_by_worker)."""
        return epoch_shard_order(self.urls, self.seed, self.epoch)[self.rank :: self.world_size][w :: self.n_workers]

    def quota(self, w: int) -> int:
        """Batches k in [start_batch, batches) with k % n_workers == w."""
        n = self.n_workers
        first = self.start_batch + ((w - self.start_batch) % n)
        return 0 if first >= self.batches else (self.batches - 1 - first) // n + 1


class SampleErrors:
    """Counts per-sample and per-shard failures and warns at a limited rate."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.count = 0
        self._warned: set[tuple[str, str]] = set()
        self._samples = 0  # per-sample failures, for the rate limit of their warnings

    def __call__(self, exc: BaseException, what: str = "") -> bool:
        self.count += 1
        if isinstance(exc, ShardDamaged):  # a shard-level fault: always named, once per shard
            self.note(exc.url, f"{exc.why}; counted as a bad sample", kind="damaged")
            return True
        self._samples += 1
        if self._samples == 1 or self._samples % WARN_EVERY == 0:
            log.warning("%s: skipped bad sample #%d %s(%s: %s)", self.where, self.count,
                        f"{what} " if what else "", type(exc).__name__, str(exc)[:200])
        return True  # webdataset handler protocol: True = continue

    def lost(self, n: int, url: str, why: str) -> None:
        """n samples a damaged shard did not deliver: counted, and warned about once per shard."""
        self.count += n
        self.note(url, f"{why}; {n} sample(s) counted as bad", kind="lost")

    def note(self, url: str, why: str, kind: str = "") -> None:
        """Warn about a shard once per kind of trouble (a shard is read again in every pass)."""
        if (url, kind) not in self._warned:
            self._warned.add((url, kind))
            log.warning("%s: %s: %s", self.where, url, why)


class ShardDamaged(Exception):
    """A shard that is not a whole tar: the samples after the damage are lost."""

    def __init__(self, url: str, why: str) -> None:
        super().__init__(f"{url}: {why}")
        self.url, self.why = url, why


_META_RE = re.compile(r"__[^/]*__($|/)")
_TAIL_LIMIT = 1 << 16
"""Bytes after the last member that can still be end-of-archive padding (tar records are 10 KiB)."""


def tar_members(url: str, handler: Callable[[BaseException], bool]) -> Iterator[dict[str, Any]]:
    """{"fname", "data", "__url__"} of each regular file of a shard, as webdataset's tar reader gives
    them; then a check that the tar really ended.

    tarfile takes a member header cut short (or one that is garbage) for the end of the
    archive and stops without a word: the samples after the cut would vanish uncounted. A
    complete tar has only zero blocks (at least one) after its last member; anything else is
    reported to `handler` as ShardDamaged, naming the shard and the byte.

    Shards on object storage or the web are streamed through fsspec; a pipe: shard is its
    command's output, and a command that fails is a damaged shard.
    """
    if is_pipe(url):
        yield from _pipe_members(url, handler)
        return
    fs, path = source_fs(url)
    with fs.open(path, "rb") as f:
        tar = yield from _members(url, f, handler)
        if tar is None:
            return
        if getattr(tar.fileobj, "comptype", "tar") != "tar":
            return  # offsets count uncompressed bytes: only the sizes.json comparison checks these
        end = tar.offset
        try:
            f.seek(end)
            tail = f.read(_TAIL_LIMIT + 1)
        except (OSError, ValueError):
            return  # not seekable: only the sizes.json comparison checks this one
    if len(tail) >= 512 and not tail.strip(b"\0"):
        return
    if not tail:
        why = "no end-of-archive marker after the last member (cut between two members?)"
    elif len(tail) < 512 and tail.strip(b"\0"):
        why = f"{len(tail)} bytes of a member header and then the end (cut inside a header?)"
    elif len(tail) < 512:
        why = "the end-of-archive marker is cut short"
    else:
        why = "data that is not a tar member header (the rest of the shard cannot be read)"
    handler(ShardDamaged(url, f"the tar ends early: after the last readable member, at byte {end}, {why}"))


def _members(url: str, f: IO[bytes], handler: Callable[[BaseException], bool]
             ) -> Generator[dict[str, Any], None, tarfile.TarFile | None]:
    """The members of the tar stream `f`; returns the TarFile at its end, None if it broke off
    (reported to `handler`)."""
    try:
        tar = tarfile.open(fileobj=f, mode="r|*")
    except Exception as exc:  # empty, garbage, unknown compression: the whole shard is bad
        handler(ShardDamaged(url, f"not a readable tar ({type(exc).__name__}: {exc})"))
        return None
    while True:
        try:
            info = tar.next()
        except Exception as exc:  # a header tarfile calls damaged: the rest of the stream is lost
            handler(ShardDamaged(url, f"unreadable after byte {tar.offset} ({type(exc).__name__}: {exc})"))
            return None
        if info is None:
            return tar
        name = info.name
        if not info.isreg() or _META_RE.match(name) or ("/" not in name and name.startswith("__")
                                                        and name.endswith("__")):
            continue
        try:
            data = tar.extractfile(info).read()
        except Exception as exc:  # cut inside the member's data: nothing after it can be read
            handler(ShardDamaged(url, f"the tar ends early, inside the data of {name} "
                                      f"({type(exc).__name__}: {exc})"))
            return None
        tar.members = []  # a stream reader must not keep every header of a long shard
        yield {"fname": name, "data": data, "__url__": url}


def _pipe_members(url: str, handler: Callable[[BaseException], bool]) -> Iterator[dict[str, Any]]:
    """The members of a pipe: shard: its command runs in a shell (as webdataset's gopen runs it),
    its standard error goes to ours. A command that exits non-zero may have stopped early
    (`aws s3 cp` losing its connection): a damaged shard. Killed if the reader stops first."""
    cmd = url[len(PIPE):]
    proc = subprocess.Popen(cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        tar = yield from _members(url, proc.stdout, handler)
        if tar is None:
            return
        while proc.stdout.read(1 << 16):
            pass  # the end-of-archive padding: the command must see its output read to the end
        status = proc.wait()
        if status != 0:
            handler(ShardDamaged(url, f"the command exited with status {status} after the last readable member "
                                      "(its output may be cut short)"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


class ShardStream(IterableDataset):
    """Batches (images, tokens, meta) of one rank for one epoch; see the module docstring."""

    def __init__(self, plan: EpochPlan, transform: Callable[[Image.Image], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        super().__init__()
        self.plan = plan
        self.transform = transform
        self.tokenizer = tokenizer

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        info = get_worker_info()
        j = info.id if info is not None else 0
        # DataLoader asks worker 0 first; rotate so that it serves the worker of batch start_batch.
        w = (j + self.plan.start_batch) % self.plan.n_workers
        yield from self.worker_batches(w)

    # -- one logical worker -------------------------------------------------------

    def passes(self, w: int, errors: SampleErrors) -> Iterator[Iterator[dict[str, Any]]]:
        """Passes over worker w's shards (the first in epoch order, then reshuffled), forever."""
        p = self.plan
        shards = p.worker_shards(w)
        rng = random.Random(_seed("passes", p.seed, p.epoch, p.rank, w))
        for pass_index in range(1 << 62):
            order = list(shards)
            if pass_index:
                rng.shuffle(order)
            yield self.raw_samples(order, w, errors)

    def raw_samples(self, order: list[str], w: int, errors: SampleErrors) -> Iterator[dict[str, Any]]:
        """Undecoded samples that have a txt and an image, from the shards in `order`.

        What a shard delivered is compared with its sizes.json count where known: samples a
        damaged shard did not deliver are counted as bad, whatever the damage."""
        usable = 0
        for url in order:
            bad_here = 0

            def handler(exc: BaseException, url: str = url) -> bool:
                nonlocal bad_here
                bad_here += 1
                return errors(exc, f"in {url}")

            good_here = 0
            for sample in wds.tariterators.group_by_keys(tar_members(url, handler), handler=handler):
                if "txt" in sample and any(e in sample for e in IMAGE_EXTS):
                    usable += 1
                    good_here += 1
                    yield sample
                else:
                    bad_here += 1
                    errors(ValueError(f"members {sorted(k for k in sample if not k.startswith('__'))}"),
                           f"{sample.get('__key__')} in {url} lacks txt or an image")
            expected = self.plan.sizes.get(url)
            if expected is not None and good_here + bad_here < expected:
                errors.lost(expected - good_here - bad_here, url,
                            f"delivered {good_here} good and {bad_here} bad sample(s) where sizes.json says "
                            f"{expected} (a damaged shard, or a wrong sizes.json)")
            elif expected is not None and good_here + bad_here > expected:
                errors.note(url, f"holds {good_here + bad_here} samples where sizes.json says {expected}; "
                            "rewrite sizes.json")
        if usable == 0:
            raise TrainError(f"{', '.join(order[:3])}{' ...' if len(order) > 3 else ''}: no sample with an "
                             f"image and a txt in {len(order)} shard(s) of rank {self.plan.rank} worker {w}; "
                             "check the shards (pipeline.shards.verify_shards)")

    def shuffled(self, w: int, errors: SampleErrors) -> Iterator[dict[str, Any]]:
        """A seeded shuffle buffer per pass: fills to `shuffle_initial`, grows to `shuffle_buffer`,
        and drains at the end of each pass, so when the data divides evenly an epoch sees each
        sample exactly once instead of mixing the next pass's samples in early."""
        p = self.plan
        rng = random.Random(_seed("samples", p.seed, p.epoch, p.rank, w))
        for samples in self.passes(w, errors):
            buf: list[dict[str, Any]] = []
            for sample in samples:
                buf.append(sample)
                if len(buf) < p.shuffle_buffer:
                    nxt = next(samples, None)  # read two per yield until the buffer is full
                    if nxt is not None:
                        buf.append(nxt)
                if len(buf) >= max(1, p.shuffle_initial):
                    k = rng.randrange(len(buf))
                    buf[k], buf[-1] = buf[-1], buf[k]
                    yield buf.pop()
            while buf:
                yield buf.pop(rng.randrange(len(buf)))

    def decode(self, sample: dict[str, Any], sample_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        ext = next(e for e in IMAGE_EXTS if e in sample)
        with Image.open(io.BytesIO(sample[ext])) as img:
            img = img.convert("RGB")
        caption = sample["txt"].decode("utf-8").strip()
        if not caption:
            raise ValueError("empty caption")
        # Augmentation draws from torch's global CPU RNG; seed it per sample so a skipped sample on
        # resume cannot shift the crops of the ones that follow. Only the CPU generator: torch.manual_seed
        # also queues lazy CUDA seeding with a stack trace, which cost a third of the loader's time.
        gen = torch.default_generator
        saved = gen.get_state() if get_worker_info() is None else None  # in-process: leave the trainer's RNG be
        gen.manual_seed(sample_seed)
        try:
            image = self.transform(img)
        finally:
            if saved is not None:
                gen.set_state(saved)
        return image, self.tokenizer([caption])[0]

    def worker_batches(self, w: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        p = self.plan
        quota = p.quota(w)
        if quota == 0:
            return
        errors = SampleErrors(f"rank {p.rank} worker {w}")
        skip = p.consumed[w]
        images: list[torch.Tensor] = []
        tokens: list[torch.Tensor] = []
        keys: list[str] = []
        bad_in_a_row = 0
        # On resume the skipped stretch is not decoded, but the tar reading before the shuffle
        # buffer runs again and recounts its errors: at the last skipped sample the stream is where
        # it was when that batch was yielded, so the count is set to what was yielded then.
        offset = 0
        for i, sample in enumerate(self.shuffled(w, errors)):
            if i < skip:
                if i == skip - 1:
                    offset = p.bad[w] - errors.count
                continue
            try:
                image, tok = self.decode(sample, _seed("aug", p.seed, p.epoch, p.rank, w, i))
            except Exception as exc:  # any decoder failure is a bad sample, by policy
                errors(exc, f"{sample.get('__key__')} in {sample.get('__url__')}")
                bad_in_a_row += 1
                if bad_in_a_row >= 10_000:
                    raise TrainError(f"rank {p.rank} worker {w}: 10000 samples in a row failed to decode "
                                     f"(last: {sample.get('__url__')}: {exc}); check the shards") from exc
                continue
            bad_in_a_row = 0
            images.append(image)
            tokens.append(tok)
            keys.append(f"{PurePosixPath(sample['__url__']).name}/{sample['__key__']}")
            if len(images) == p.batch_size:
                yield torch.stack(images), torch.stack(tokens), {"worker": w, "consumed": i + 1,
                                                                  "bad": errors.count + offset, "keys": keys}
                images, tokens, keys = [], [], []
                quota -= 1
                if quota == 0:
                    return


WORKER_NICE = 19
"""How much lower the loader workers' CPU priority is than the training process's where they share
its cores (CPU training): see make_loader."""


def _lower_priority(niceness: int, worker_id: int) -> None:
    try:
        os.nice(niceness)
    except OSError:  # not allowed here: the workers run at the training process's priority
        pass


def make_loader(plan: EpochPlan, transform: Callable, tokenizer: Callable, pin_memory: bool = False,
                worker_nice: int = 0) -> DataLoader:
    """A DataLoader over ShardStream: batching happens in the workers (batch_size=None).

    `worker_nice` > 0 lowers the workers' CPU priority (os.nice in each worker). In CPU training
    the workers share the cores of torch's thread pool, whose threads wait for one another at the
    end of every operator: a worker that takes one pool thread's core for a time slice stalls the
    other threads too, so a step lost about three times the workers' own CPU time to them (a 64 px
    ViT on 2 cores: 0.63 s a step without workers, 0.90 s beside them, which use 0.1 CPU-s a step).
    At nice 19 the workers run when the pool leaves a core free, and fill the prefetch queue
    while the main thread waits for a batch: 6 to 12% faster steps in two alternating pairs of
    one-epoch runs (0.937 and 0.881 s against 1.006 and 0.994), though the step now waits for
    data at times (4 s an epoch against 0.6 s). Where the workers alone are the bottleneck this
    serialises loading and compute; on a GPU they are often the bottleneck and the training
    process mostly waits for the device, so GPU runs leave them at the process's priority."""
    init = partial(_lower_priority, worker_nice) if worker_nice > 0 and plan.workers else None
    return DataLoader(
        ShardStream(plan, transform, tokenizer),
        batch_size=None,
        num_workers=plan.workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if plan.workers else None,
        worker_init_fn=init,
    )
