"""The eval-set index and the matcher: built once, then asked about training samples.

    matcher = OverlapMatcher.build([load_eval_set("coco", "evalsets/coco-5k")], MatchConfig())
    matcher.match(key, caption, image_bytes)          # -> [Match(eval_set, eval_item, kind, score, ...)]

`match_batch` does the same for many samples at once (what the audit job and
the benchmark use: hash lookups and caption signatures are vectorised over the
batch). The matcher holds only fingerprints (hashes, 3 KB thumbnails, shingle
sets, LSH buckets), never eval images, and pickles for `ray.put`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from dedup import image as im
from dedup.evalsets import EvalSet
from dedup.index import BandedIndex, TextIndex
from dedup.text import TextSigner, normalize_words

log = logging.getLogger(__name__)
KINDS = ("image", "text")


@dataclass(kw_only=True)
class MatchConfig:
    """What counts as overlap."""

    text_threshold: float = 0.8
    """Minimum exact Jaccard of caption shingle sets for a text match."""
    ngram: int = 3
    """Words per caption shingle (captions shorter than this are one shingle)."""
    num_perm: int = 128
    """MinHash permutations (datasketch's default)."""
    seed: int = 1
    """MinHash seed (datasketch's default; signatures equal datasketch's MinHash with hashfunc=dedup.text.shingle_hash)."""
    min_caption_words: int = 0
    """Captions with fewer words are never text-matched (generic captions like 'a photo' prove nothing)."""
    image_max_distance: int = 10
    """Loose search: Hamming distance (bits of 64) between perceptual-hash variants."""
    image_min_similarity: float = 0.96
    """Precise check: minimum thumbnail correlation for a candidate to count as the same image."""
    image_max_colour_diff: float = 10.0
    """Precise check: maximum mean colour difference (grey levels, after matching brightness) of the thumbnails."""
    crop: float = 0.03
    """Fraction cut from each side for the crop variants of the perceptual hash."""
    kinds: tuple[str, ...] = KINDS
    """Which matches to look for: image, text or both."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.min_caption_words < 0:
            raise ValueError(f"min_caption_words must be >= 0, got {self.min_caption_words}")
        if not 0.0 < self.text_threshold <= 1.0:
            raise ValueError(f"text_threshold must be in (0, 1], got {self.text_threshold}")
        if not 0 <= self.image_max_distance < im.HASH_BITS:
            raise ValueError(f"image_max_distance must be in [0, {im.HASH_BITS}), got {self.image_max_distance}")
        if self.image_max_colour_diff < 0:
            raise ValueError(f"image_max_colour_diff must be >= 0, got {self.image_max_colour_diff}")
        if not -1.0 <= self.image_min_similarity <= 1.0:
            raise ValueError(f"image_min_similarity must be in [-1, 1], got {self.image_min_similarity}")
        if not 0.0 <= self.crop < 0.25:
            raise ValueError(f"crop must be in [0, 0.25), got {self.crop}")
        self.kinds = tuple(self.kinds)
        bad = set(self.kinds) - set(KINDS)
        if bad or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds}")
        if self.ngram < 1 or self.num_perm < 2:
            raise ValueError(f"ngram must be >= 1 and num_perm >= 2, got {self.ngram}, {self.num_perm}")

    def thresholds(self) -> dict:
        return asdict(self) | {"kinds": list(self.kinds)}


@dataclass(slots=True)
class Match:
    eval_set: str
    eval_item: str
    kind: str
    """'image' or 'text'."""
    score: float
    """Hamming distance (image; 0 for a byte-identical file) or Jaccard (text)."""
    similarity: float
    """Thumbnail correlation (image) or Jaccard (text)."""


@dataclass
class EvalSetIndex:
    name: str
    kind: str
    layout: str
    item_ids: list[str]
    image: BandedIndex | None
    """All hash variants of every view (the whole-image hash of a training sample is looked up here);
    owners are view numbers."""
    image_whole: BandedIndex | None
    """Whole-view hashes only (the crop variants of a training sample are looked up here)."""
    thumbs: np.ndarray
    """uint8 (views, THUMB, THUMB, 3): one thumbnail per view, for the precise check."""
    has_image: np.ndarray
    sha256: dict[str, int]
    text: TextIndex | None
    view_item: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Item of each view (an item has one view, or three when it is not square: see `dedup.image.views`)."""
    unreadable: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _set_features(es: EvalSet, crop: float, threads: int) -> list[tuple[str, list[im.ImageFeatures]] | None]:
    feats: list[tuple[str, list[im.ImageFeatures]] | None] = [None] * len(es.items)
    # cv2 decode/resize release the GIL, so threads use all cores here without pickling images.
    with ThreadPoolExecutor(threads) as pool:
        pending = {}
        for i, data in es.iter_images():
            pending[pool.submit(im.view_features, data, crop)] = i
            if len(pending) >= 4 * threads:
                for fut in list(pending)[: 2 * threads]:
                    feats[pending.pop(fut)] = fut.result()
        for fut, i in pending.items():
            feats[i] = fut.result()
    return feats


def image_index(feats: Sequence[tuple[str, list[im.ImageFeatures]] | None], max_distance: int
                ) -> tuple[BandedIndex | None, BandedIndex | None, np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """(all-variants index, whole-view index, thumbs, view_item, has_image, sha256 table) of per-item
    `view_features` results (None: not read)."""
    hashes, thumbs, view_item, sha = [], [], [], {}
    for i, f in enumerate(feats):
        if f is None:
            continue
        sha.setdefault(f[0], i)
        for v in f[1]:
            hashes.append(v.hashes)
            thumbs.append(v.thumb)
            view_item.append(i)
    has_image = np.array([bool(f and f[1]) for f in feats], dtype=bool)
    view_item_a = np.array(view_item, dtype=np.int64)
    thumbs_a = np.stack(thumbs) if thumbs else np.zeros((0, im.THUMB, im.THUMB, 3), np.uint8)
    if not hashes:
        return None, None, thumbs_a, view_item_a, has_image, sha
    views = np.arange(len(hashes))
    image = BandedIndex(np.concatenate(hashes), np.repeat(views, im.N_VARIANTS), max_distance)
    whole = BandedIndex(np.array([h[0] for h in hashes]), views, max_distance)
    return image, whole, thumbs_a, view_item_a, has_image, sha


def build_set_index(es: EvalSet, cfg: MatchConfig, signer: TextSigner, threads: int | None = None) -> EvalSetIndex:
    t0 = time.perf_counter()
    n = len(es.items)
    feats = _set_features(es, cfg.crop, threads or os.cpu_count() or 1) if "image" in cfg.kinds else [None] * n
    t1 = time.perf_counter()
    image, whole, thumbs, view_item, has_image, sha = image_index(feats, cfg.image_max_distance)
    text = None
    if "text" in cfg.kinds:
        caps, cap_owner = [], []
        for i, item in enumerate(es.items):
            for c in item.captions:
                if len(normalize_words(c)) >= cfg.min_caption_words:
                    caps.append(c)
                    cap_owner.append(i)
        if caps:
            text = TextIndex(signer, caps, cap_owner, cfg.text_threshold)
    t2 = time.perf_counter()
    unreadable = [es.items[i].id for i in np.flatnonzero(~has_image)] if "image" in cfg.kinds else []
    if unreadable:
        log.warning("eval set %s: %d images do not decode and can only match by text/sha256 (first: %s)",
                    es.name, len(unreadable), unreadable[0])
    idx = EvalSetIndex(es.name, es.kind, es.layout, [it.id for it in es.items], image, whole, thumbs, has_image, sha, text,
                       view_item, unreadable, {"image_features_s": round(t1 - t0, 3), "index_build_s": round(t2 - t1, 3)})
    log.info("eval set %s: %s, %d items, %d captions indexed, built in %.1fs", es.name, es.kind, n,
             0 if text is None else len(text), t2 - t0)
    return idx


def image_candidates(s: EvalSetIndex, hashes: Sequence[np.ndarray]) -> dict[tuple[int, int], int]:
    """{(query, view): distance} for queries within image_max_distance of an eval image view.

    The distance between two images is the minimum over variant pairs in which
    at least one side is the whole image: the training image against the eval
    image and its crops (the training copy is cropped), and the training
    image's crops against the whole eval image (the eval image is a crop of
    it). Crop-against-crop pairs add nothing but look-alike candidates.
    """
    hashes = np.stack(hashes)
    best: dict[tuple[int, int], int] = dict(s.image.search(hashes[:, 0]))
    n_var = hashes.shape[1] - 1
    for (qi, view), dist in s.image_whole.search(hashes[:, 1:].ravel()).items():
        key = (qi // n_var, view)
        if dist < best.get(key, im.HASH_BITS + 1):
            best[key] = dist
    return best


def brute_force_image_candidates(s: EvalSetIndex, hashes: Sequence[np.ndarray], max_distance: int
                                 ) -> dict[tuple[int, int], int]:
    """All pairs, same distance definition as `image_candidates` (tests and benchmark)."""
    q = np.stack(hashes)
    ev = s.image.hashes.reshape(-1, im.N_VARIANTS)
    views = s.image.owners.reshape(-1, im.N_VARIANTS)[:, 0]
    d1 = im.hamming(q[:, None, 0:1], ev[None, :, :]).min(axis=2)  # whole training image vs all eval variants
    d2 = im.hamming(q[:, None, 1:], ev[None, :, 0:1]).min(axis=2)  # training crops vs whole eval image
    d = np.minimum(d1, d2)
    return {(int(i), int(views[j])): int(d[i, j]) for i, j in zip(*np.nonzero(d <= max_distance), strict=True)}


class OverlapMatcher:
    """All eval sets' indexes; answers 'which eval items does this training sample overlap?'."""

    def __init__(self, sets: list[EvalSetIndex], cfg: MatchConfig):
        self.sets, self.cfg = sets, cfg
        self.signer = TextSigner(cfg.num_perm, cfg.seed, cfg.ngram)

    @classmethod
    def build(cls, eval_sets: Sequence[EvalSet], cfg: MatchConfig, threads: int | None = None) -> OverlapMatcher:
        signer = TextSigner(cfg.num_perm, cfg.seed, cfg.ngram)
        return cls([build_set_index(es, cfg, signer, threads) for es in eval_sets], cfg)

    def match(self, key: str, caption: str | None, image_bytes: bytes | None,
              sha256: str | None = None) -> list[Match]:
        """Matches of one training sample (`key` is only for log messages).

        `sha256` is an extra digest to look up (e.g. of the originally
        downloaded bytes, before resizing); the digest of `image_bytes` is
        always looked up.
        """
        feats = im.features(image_bytes, self.cfg.crop) if image_bytes and "image" in self.cfg.kinds else None
        if image_bytes and feats is None and "image" in self.cfg.kinds:
            log.debug("sample %s: image does not decode; only text and sha256 can match", key)
        return self.match_features([caption], [feats], [[sha256] if sha256 else []])[0]

    def match_features(self, captions: Sequence[str | None], feats: Sequence[im.ImageFeatures | None],
                       extra_sha: Sequence[Sequence[str]] | None = None) -> list[list[Match]]:
        """Matches for a batch of samples given their captions and image fingerprints."""
        out: list[list[Match]] = [[] for _ in captions]
        if "image" in self.cfg.kinds:
            self._match_images(feats, extra_sha or [[] for _ in feats], out)
        if "text" in self.cfg.kinds:
            self._match_text(captions, out)
        return out

    def _match_images(self, feats: Sequence[im.ImageFeatures | None], extra_sha: Sequence[Sequence[str]],
                      out: list[list[Match]]) -> None:
        rows = [i for i, f in enumerate(feats) if f is not None]
        for s in self.sets:
            found: dict[tuple[int, int], tuple[float, float]] = {}
            for i in range(len(feats)):
                digests = list(extra_sha[i]) + ([feats[i].sha256] if feats[i] is not None else [])
                for d in digests:
                    item = s.sha256.get(d)
                    if item is not None:
                        found[(i, item)] = (0.0, 1.0)  # the very same file
            if rows and s.image is not None:
                best = image_candidates(s, [feats[i].hashes for i in rows])
                for (r, view), dist in sorted(best.items(), key=lambda kv: kv[1]):
                    i, item = rows[r], int(s.view_item[view])
                    if (i, item) in found:
                        continue  # sha256 match, or a closer view of the same item already passed
                    sim, colour = im.compare(feats[i].thumb, s.thumbs[view])
                    if sim >= self.cfg.image_min_similarity and colour <= self.cfg.image_max_colour_diff:
                        found[(i, item)] = (float(dist), sim)
            for (i, item), (dist, sim) in sorted(found.items()):
                out[i].append(Match(s.name, s.item_ids[item], "image", dist, round(sim, 4)))

    def _match_text(self, captions: Sequence[str | None], out: list[list[Match]]) -> None:
        text_sets = [s for s in self.sets if s.text is not None]
        if not text_sets:
            return
        sh = self.signer.shingle_sets([c or "" for c in captions])
        min_words = self.cfg.min_caption_words
        if min_words:
            sh = [x if len(normalize_words(c or "")) >= min_words else frozenset() for x, c in zip(sh, captions,
                                                                                                    strict=True)]
        sigs = self.signer.signatures_from_shingles(sh)
        for s in text_sets:
            for (i, item), j in sorted(s.text.search(sh, sigs).items()):
                out[i].append(Match(s.name, s.item_ids[item], "text", round(j, 6), round(j, 6)))
