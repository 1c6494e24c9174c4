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
    """Loose search: Hamming distance (bits of 64) between a training image's hashes and an eval view's
    (dedup.image: crop boxes, mirrored, and the four parts of each)."""
    image_min_similarity: float = 0.9
    """Precise check: minimum correlation of the aligned grey thumbnails (the worst-agreeing 15% of
    pixels, an overlay, left out). Chosen on the tuning half of the packaged photographs
    (benchmarks/dedup.py --photos tune): true copies' 1st percentile is 0.92 to 1.0 per edit kind."""
    image_max_colour_diff: float = 12.0
    """Precise check: maximum chroma (grey levels, RMS) left once the eval image's chroma is scaled to the
    training image's (grayscale, saturation and contrast scale chroma; another tint does not)."""
    image_min_detail: float = 0.5
    """Precise check: minimum per-block correlation of fine detail for a pair the loose search already
    aligned (a mirrored tile of one retina photograph passes every other test at 0.98)."""
    crop: float = 0.07
    """Eval side: each side of an eval view is cut by 0 and by this fraction (16 crop boxes)."""
    kinds: tuple[str, ...] = KINDS
    """Which matches to look for: image, text or both."""

    def __post_init__(self) -> None:
        if not 0.0 < self.text_threshold <= 1.0:
            raise ValueError(f"text_threshold must be in (0, 1], got {self.text_threshold}")
        if not 0 <= self.image_max_distance < im.HASH_BITS:
            raise ValueError(f"image_max_distance must be in [0, {im.HASH_BITS}), got {self.image_max_distance}")
        if not -1.0 <= self.image_min_detail <= 1.0:
            raise ValueError(f"image_min_detail must be in [-1, 1], got {self.image_min_detail}")
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
    view: str | None = None
    """Image: which eval view and variant matched, e.g. 'center_square crop=0,0.07,0,0 mirrored part=left
    query=content_box' (see dedup.image); None for text and sha256 matches."""
    colour_diff: float | None = None
    """Image: chroma the eval image does not explain (grey levels)."""
    detail: float | None = None
    """Image: per-block fine-detail correlation of the aligned thumbnails."""


@dataclass
class EvalSetIndex:
    name: str
    kind: str
    layout: str
    item_ids: list[str]
    image: list[BandedIndex] | None
    """One index per `dedup.image.REGIONS` entry over every variant's hash of that part; owners are
    rows of `variants`."""
    variants: np.ndarray
    """float32 (rows, 5): crop box and mirrored flag of each indexed variant (dedup.image.ViewFeatures)."""
    variant_view: np.ndarray
    """int64 (rows,): the view each variant belongs to."""
    thumbs: np.ndarray
    """uint8 (views, THUMB, THUMB): one grey thumbnail per view, for the precise check."""
    colours: np.ndarray
    """uint8 (views, COLOUR, COLOUR, 3): one colour thumbnail per view."""
    has_image: np.ndarray
    sha256: dict[str, int]
    text: TextIndex | None
    view_item: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Item of each view (an item has one view, or three when it is not square: see `dedup.image.views`)."""
    view_kind: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    """0: the image as it is, 1: its centre square, 2: its padded square (`dedup.image.views`)."""
    unreadable: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


VIEW_NAMES = ("as_is", "center_square", "padded_square")


def _set_features(es: EvalSet, crop: float, threads: int) -> list[tuple[str, list[im.ViewFeatures]] | None]:
    feats: list[tuple[str, list[im.ViewFeatures]] | None] = [None] * len(es.items)
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


@dataclass
class ImageIndex:
    """What `image_index` builds from the views of an eval set."""

    image: list[BandedIndex] | None
    variants: np.ndarray
    variant_view: np.ndarray
    thumbs: np.ndarray
    colours: np.ndarray
    view_item: np.ndarray
    view_kind: np.ndarray
    has_image: np.ndarray
    sha256: dict[str, int]


def image_index(feats: Sequence[tuple[str, list[im.ViewFeatures]] | None], max_distance: int) -> ImageIndex:
    """The image side of an eval set's index from per-item `view_features` results (None: not read)."""
    hashes, variants, variant_view, thumbs, colours, view_item, view_kind, sha = [], [], [], [], [], [], [], {}
    for i, f in enumerate(feats):
        if f is None:
            continue
        sha.setdefault(f[0], i)
        for k, v in enumerate(f[1]):
            hashes.append(v.hashes)
            variants.append(v.variants)
            variant_view.append(np.full(len(v.variants), len(thumbs), np.int64))
            thumbs.append(v.thumb)
            colours.append(v.colour)
            view_item.append(i)
            view_kind.append(k)
    has_image = np.array([bool(f and f[1]) for f in feats], dtype=bool)
    empty = not hashes
    all_hashes = np.zeros((0, im.N_REGIONS), np.uint64) if empty else np.concatenate(hashes)
    rows = np.arange(len(all_hashes))
    return ImageIndex(
        image=None if empty else [BandedIndex(all_hashes[:, r], rows, max_distance) for r in range(im.N_REGIONS)],
        variants=np.zeros((0, 5), np.float32) if empty else np.concatenate(variants),
        variant_view=np.zeros(0, np.int64) if empty else np.concatenate(variant_view),
        thumbs=np.stack(thumbs) if thumbs else np.zeros((0, im.THUMB, im.THUMB), np.uint8),
        colours=np.stack(colours) if colours else np.zeros((0, im.COLOUR, im.COLOUR, 3), np.uint8),
        view_item=np.array(view_item, np.int64), view_kind=np.array(view_kind, np.int8), has_image=has_image,
        sha256=sha)


def build_set_index(es: EvalSet, cfg: MatchConfig, signer: TextSigner, threads: int | None = None) -> EvalSetIndex:
    t0 = time.perf_counter()
    n = len(es.items)
    feats = _set_features(es, cfg.crop, threads or os.cpu_count() or 1) if "image" in cfg.kinds else [None] * n
    t1 = time.perf_counter()
    ii = image_index(feats, cfg.image_max_distance)
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
    unreadable = [es.items[i].id for i in np.flatnonzero(~ii.has_image)] if "image" in cfg.kinds else []
    if unreadable:
        log.warning("eval set %s: %d images do not decode and can only match by text/sha256 (first: %s)",
                    es.name, len(unreadable), unreadable[0])
    idx = EvalSetIndex(es.name, es.kind, es.layout, [it.id for it in es.items], ii.image, ii.variants,
                       ii.variant_view, ii.thumbs, ii.colours, ii.has_image, ii.sha256, text, ii.view_item,
                       ii.view_kind, unreadable,
                       {"image_features_s": round(t1 - t0, 3), "index_build_s": round(t2 - t1, 3)})
    log.info("eval set %s: %s, %d items, %d captions indexed, built in %.1fs", es.name, es.kind, n,
             0 if text is None else len(text), t2 - t0)
    return idx


def _query_hashes(feats: Sequence[im.ImageFeatures]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hashes (rows, N_REGIONS), query of each row, box of each row) over every box of every query."""
    hashes = np.concatenate([f.hashes for f in feats])
    owner = np.concatenate([np.full(len(f.hashes), i, np.int64) for i, f in enumerate(feats)])
    box = np.concatenate([np.arange(len(f.hashes)) for f in feats])
    return hashes, owner, box


def image_hints(s: EvalSetIndex, feats: Sequence[im.ImageFeatures]) -> dict[tuple[int, int], list[tuple[int, int, int]]]:
    """{(query, view): [(distance, query box, variant row), ...] best first} for every query box and
    variant whose hashes of the same part are within image_max_distance (whole with whole, left part
    with left part, ...): the loose search, and how the precise check should align each pair."""
    hashes, owner, box = _query_hashes(feats)
    best: dict[tuple[int, int, int], int] = {}  # (query row, variant row) -> min distance over parts
    for r, index in enumerate(s.image):
        for (row, vrow), dist in index.search(hashes[:, r]).items():
            if dist < best.get((row, vrow), im.HASH_BITS + 1):
                best[(row, vrow)] = dist
    out: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for (row, vrow), dist in best.items():
        out.setdefault((int(owner[row]), int(s.variant_view[vrow])), []).append((dist, int(box[row]), vrow))
    for hints in out.values():
        hints.sort()
    return out


def image_candidates(s: EvalSetIndex, feats: Sequence[im.ImageFeatures]) -> dict[tuple[int, int], int]:
    """{(query, view): distance} for queries within image_max_distance of an eval image view."""
    return {k: v[0][0] for k, v in image_hints(s, feats).items()}


def brute_force_image_candidates(s: EvalSetIndex, feats: Sequence[im.ImageFeatures], max_distance: int
                                 ) -> dict[tuple[int, int], int]:
    """All pairs, same distance definition as `image_candidates` (tests and benchmark)."""
    hashes, owner, _ = _query_hashes(feats)
    ev = np.stack([ix.hashes for ix in s.image], axis=1)  # (variant rows, N_REGIONS)
    d = im.hamming(hashes[:, None, :], ev[None, :, :]).min(axis=2)
    out: dict[tuple[int, int], int] = {}
    for row, vrow in zip(*np.nonzero(d <= max_distance), strict=True):
        key = (int(owner[row]), int(s.variant_view[vrow]))
        out[key] = min(int(d[row, vrow]), out.get(key, im.HASH_BITS + 1))
    return out


def describe_variant(s: EvalSetIndex, view: int, variant: np.ndarray, query_box: int) -> str:
    x0, y0, x1, y1, mirrored = (float(v) for v in variant)
    cut = f"crop={x0:.2f},{y0:.2f},{1 - x1:.2f},{1 - y1:.2f}"
    return (f"{VIEW_NAMES[int(s.view_kind[view])] if len(s.view_kind) else 'as_is'} {cut}"
            f"{' mirrored' if mirrored else ''} query={'whole' if query_box == 0 else 'content_box'}")


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

    def accepts(self, v: im.Verdict) -> bool:
        """The precise check's decision on a `dedup.image.verify` verdict."""
        c = self.cfg
        if v.correlation < c.image_min_similarity or v.colour_diff > c.image_max_colour_diff or v.overlap < 0.8:
            return False
        # Fine detail is judged where the alignment is exact: a pair the loose search already had
        # aligned. A pair that aligning improved (rotation, a crop between two boxes) is aligned to
        # about a pixel, too coarse for detail; there the structure has to improve to count.
        return v.detail >= c.image_min_detail or (v.aligned and v.gain >= 0.01)

    def _match_images(self, feats: Sequence[im.ImageFeatures | None], extra_sha: Sequence[Sequence[str]],
                      out: list[list[Match]], max_hints: int = 3) -> None:
        rows = [i for i, f in enumerate(feats) if f is not None]
        for s in self.sets:
            found: dict[tuple[int, int], Match] = {}
            for i in range(len(feats)):
                digests = list(extra_sha[i]) + ([feats[i].sha256] if feats[i] is not None else [])
                for d in digests:
                    item = s.sha256.get(d)
                    if item is not None:  # the very same file
                        found[(i, item)] = Match(s.name, s.item_ids[item], "image", 0.0, 1.0)
            if rows and s.image is not None:
                hints = image_hints(s, [feats[i] for i in rows])
                for (r, view), hs in sorted(hints.items(), key=lambda kv: kv[1][0][0]):
                    i, item = rows[r], int(s.view_item[view])
                    if (i, item) in found:
                        continue  # sha256 match, or a closer view of the same item already passed
                    f = feats[i]
                    for dist, qbox, vrow in hs[:max_hints]:
                        v = im.verify(f, f.boxes[qbox], s.thumbs[view], s.colours[view], s.variants[vrow])
                        if self.accepts(v):
                            found[(i, item)] = Match(s.name, s.item_ids[item], "image", float(dist),
                                                     round(v.correlation, 4),
                                                     describe_variant(s, view, s.variants[vrow], qbox),
                                                     round(v.colour_diff, 2), round(v.detail, 4))
                            break
            for (i, _), m in sorted(found.items()):
                out[i].append(m)

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
