"""Training data: a deterministic, resumable webdataset stream of (images, tokens) batches.

Per epoch and rank the stream is a pure function of (seed, epoch, rank, world size,
worker count, batch size), so a resumed run can rebuild it and skip to where it
stopped:

* The shard list is shuffled with (seed, epoch), identical on all ranks, then split
  by node (`[rank::world]`) and by worker (`[w::workers]`) as OpenCLIP does.
* Each worker reads its shards with webdataset's tar reader, pushes the raw samples
  through a seeded shuffle buffer, and only then decodes; augmentation randomness is
  seeded per sample. A worker that exhausts its shards reads them again (new order)
  until it has produced its quota, so every rank yields exactly the same number of
  batches per epoch and no collective ever waits for a rank that ran dry. A full
  pass that yields nothing usable is an error, never an endless loop (OpenCLIP #569).
* Batch k of a rank comes from logical worker k % workers (DataLoader's round robin).
  Each batch carries (worker, raw samples consumed so far); the trainer records it,
  and on resume each worker skips exactly that many raw samples without decoding
  them. Bad samples are skipped identically both times, so the batches after a resume
  equal those of an uninterrupted run.

Only `webdataset.tarfile_samples` is used, which has the same behaviour in 0.2.86 and
0.2.111 (later versions broke OpenCLIP's pipeline, see REFERENCE.md).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.shards import SIZES_FILE, get_fs
from training.errors import TrainError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
WARN_EVERY = 100
"""Bad samples: warn on the first, then every WARN_EVERY-th (per worker), never sleep."""


def expand_shards(spec: str) -> list[str]:
    """'a/{000..009}.tar::b/x.tar' -> shard URLs, checking that local ones exist."""
    urls: list[str] = []
    for source in spec.split("::"):
        source = source.strip()
        if source:
            urls.extend(braceexpand.braceexpand(source))
    if not urls:
        raise TrainError(f"--train-data {spec!r}: expands to no shards")
    missing = []
    for url in urls:
        fs, path = get_fs(url)
        if not fs.exists(path):
            missing.append(url)
    if missing:
        raise TrainError(f"{missing[0]}: shard not found ({len(missing)} of {len(urls)} listed shards are missing)")
    return urls


def count_samples(urls: list[str]) -> int:
    """Sum of sizes.json entries (shard basename -> count) over the listed shards."""
    by_dir: dict[str, list[str]] = {}
    for url in urls:
        parent, _, name = url.rpartition("/")
        by_dir.setdefault(parent or ".", []).append(name)
    total = 0
    for parent, names in by_dir.items():
        sizes_url = f"{parent}/{SIZES_FILE}"
        fs, path = get_fs(sizes_url)
        if not fs.exists(path):
            raise TrainError(f"{sizes_url}: missing; write it (shard name -> sample count) or pass --train-num-samples")
        try:
            with fs.open(path, "rb") as f:
                sizes = json.load(f)
        except (OSError, ValueError) as exc:
            raise TrainError(f"{sizes_url}: unreadable ({exc})") from exc
        for name in names:
            if name not in sizes:
                raise TrainError(f"{sizes_url}: has no entry for {name}; rewrite it or pass --train-num-samples")
            total += int(sizes[name])
    return total


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

    def __call__(self, exc: BaseException, what: str = "") -> bool:
        self.count += 1
        if self.count == 1 or self.count % WARN_EVERY == 0:
            log.warning("%s: skipped bad sample #%d %s(%s: %s)", self.where, self.count,
                        f"{what} " if what else "", type(exc).__name__, str(exc)[:200])
        return True  # webdataset handler protocol: True = continue


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
        """Undecoded samples that have a txt and an image, from the shards in `order`."""
        usable = 0
        for url in order:
            samples = wds.tarfile_samples(iter([{"url": url}]), handler=lambda exc, url=url: errors(exc, f"in {url}"))
            for sample in samples:
                if "txt" in sample and any(e in sample for e in IMAGE_EXTS):
                    usable += 1
                    yield sample
                else:
                    errors(ValueError(f"members {sorted(k for k in sample if not k.startswith('__'))}"),
                           f"{sample.get('__key__')} in {url} lacks txt or an image")
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


def make_loader(plan: EpochPlan, transform: Callable, tokenizer: Callable, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ShardStream: batching happens in the workers (batch_size=None)."""
    return DataLoader(
        ShardStream(plan, transform, tokenizer),
        batch_size=None,
        num_workers=plan.workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if plan.workers else None,
    )
