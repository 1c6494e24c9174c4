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
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
    """Loose search: Hamming distance (bits of 64) between the hash of a training image's box and an eval
    view's variant (dedup.image: crop boxes, mirrored, turned a little)."""
    image_max_part_distance: int = 8
    """Loose search: the same for a part of a box (its top, bottom, left or right 70%, what an overlay
    leaves clean); tighter, as a part says less about an image."""
    image_max_chroma: float = 4.0
    """Pre-check: low-frequency chroma (grey levels, RMS) the eval box's chroma, scaled by one factor,
    leaves unexplained. Copies under every edit kind of the tuning photographs stay under 3; unrelated
    images of one shape and colour on other backgrounds mostly lie above 5."""
    image_min_similarity: float = 0.96
    """Precise check: minimum correlation of the aligned 32x32 grey frames (the worst-agreeing 25% of
    pixels, an overlay, left out). Copies under every edit kind of the tuning photographs: 1st
    percentile 0.97 or more; drawings of one shape on other backgrounds reach 0.99."""
    image_max_colour_diff: float = 6.0
    """Precise check: chroma (grey levels) the eval image's leaves unexplained once scaled to the training
    image's (by a factor that may follow brightness: contrast, gamma, saturation, grayscale), beyond a
    pixel of misalignment, at the 65th percentile. Tells drawings of one shape on other tints apart."""
    image_max_residual: float = 0.12
    """Precise check: grey difference beyond a pixel of misalignment after a monotone quadratic tone fit,
    80th percentile, in units of the training image's contrast (same layout, other content)."""
    image_min_detail: float = 0.5
    """Precise check: 30th percentile over 12x12 blocks of the correlation of band-passed 48x48
    thumbnails (another tile of one photograph, a mirrored tile of a retina)."""
    image_max_displaced: float = 0.15
    """Precise check: fraction of the blocks with detail found 2+ pixels (of 48) from where the
    alignment puts them (a stereo partner, frames moments apart)."""
    crop: float = 0.08
    """Eval side: each side of an eval view is cut by 0, half this fraction and this fraction (81 crop
    boxes)."""
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
        if not 0 <= self.image_max_part_distance <= self.image_max_distance:
            raise ValueError(f"image_max_part_distance must be in [0, image_max_distance], got "
                             f"{self.image_max_part_distance}")
        if not self.image_max_chroma >= 0:
            raise ValueError(f"image_max_chroma must be >= 0, got {self.image_max_chroma}")
        if not -1.0 <= self.image_min_detail <= 1.0:
            raise ValueError(f"image_min_detail must be in [-1, 1], got {self.image_min_detail}")
        if not self.image_max_residual >= 0:
            raise ValueError(f"image_max_residual must be >= 0, got {self.image_max_residual}")
        if not 0 <= self.image_max_displaced <= 1:
            raise ValueError(f"image_max_displaced must be in [0, 1], got {self.image_max_displaced}")
        if not self.image_max_colour_diff >= 0:
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

    def limits(self) -> im.Limits:
        """The precise check's settings (dedup.image.verify)."""
        return im.Limits(min_correlation=self.image_min_similarity, max_colour=self.image_max_colour_diff,
                         max_residual=self.image_max_residual, min_detail=self.image_min_detail,
                         max_displaced=self.image_max_displaced)


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
    """Image: which eval view and variant matched, e.g. 'center_square crop=0,0.08,0,0 mirrored part=left
    query=content_box' (see dedup.image); None for text and sha256 matches."""
    colour_diff: float | None = None
    """Image: chroma the eval image does not explain (grey levels)."""
    detail: float | None = None
    """Image: per-block fine-detail correlation of the aligned thumbnails."""
    residual: float | None = None
    """Image: grey difference beyond a pixel of misalignment (units of the image's contrast)."""
    displaced: float | None = None
    """Image: fraction of detailed blocks found away from where the alignment puts them."""


@dataclass
class ImageIndex:
    """The image side of an eval set's index (`image_index`)."""

    bands: list[BandedIndex] | None
    """One index per `dedup.image.REGIONS` entry over the variants' hashes of that region (every
    variant for the whole box, those with `ViewFeatures.parts` for the parts); hash row i of region r
    is variant row `band_rows[r][i]`, or i where that is None. None when no image of the set decodes."""
    band_rows: list[np.ndarray | None]
    variants: np.ndarray
    """float32 (rows, 6): box, mirrored flag and angle of each indexed variant (dedup.image.ViewFeatures)."""
    chroma: np.ndarray
    """int8 (rows, N_REGIONS, CHROMA_DIM): each variant's chroma codes, for the pre-check."""
    variant_view: np.ndarray
    """int32 (rows,): the view each variant belongs to."""
    thumbs: np.ndarray
    """uint8 (views, THUMB, THUMB): one grey thumbnail per view, for the precise check."""
    colours: np.ndarray
    """uint8 (views, COLOUR, COLOUR, 3): one colour thumbnail per view."""
    view_item: np.ndarray
    """Item of each view (an item has one view, or three when it is not square: see `dedup.image.views`)."""
    view_kind: np.ndarray
    """0: the image as it is, 1: its centre square, 2: its padded square (`dedup.image.views`)."""
    has_image: np.ndarray
    """bool (items,): whether the item's image decoded."""
    sha256: dict[str, int]
    """sha256 of an item's bytes -> the item (the very same file matches even when it does not decode)."""


@dataclass
class EvalSetIndex:
    name: str
    kind: str
    layout: str
    item_ids: list[str]
    images: ImageIndex | None
    text: TextIndex | None
    unreadable: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


VIEW_NAMES = ("as_is", "center_square", "padded_square")
EVAL_GROUP = 16
"""Eval images hashed together in one call (`im.view_features_many`)."""


def _set_features(es: EvalSet, crop: float, threads: int) -> list[tuple[str, list[im.ViewFeatures]] | None]:
    feats: list[tuple[str, list[im.ViewFeatures]] | None] = [None] * len(es.items)
    # cv2 decode/resize release the GIL, so threads use all cores here without pickling images.
    # Images go in groups (`view_features_many`): their views are hashed together, the same codes.
    # Small sets get smaller groups, so that every thread has some; at most 2 groups per thread are
    # in flight (their encoded bytes held), as 4 single images per thread were before.
    size = max(1, min(EVAL_GROUP, -(-len(es.items) // max(1, threads))))
    with ThreadPoolExecutor(threads) as pool:
        pending: dict = {}
        group: list[tuple[int, bytes]] = []

        def submit() -> None:
            pending[pool.submit(im.view_features_many, [d for _, d in group], crop)] = [i for i, _ in group]
            group.clear()

        def collect(fut: Future) -> None:
            for j, f in zip(pending.pop(fut), fut.result(), strict=True):
                feats[j] = f

        for i, data in es.iter_images():
            group.append((i, data))
            if len(group) >= size:
                submit()
            if len(pending) >= 2 * threads:
                for fut in list(pending)[:threads]:
                    collect(fut)
        if group:
            submit()
        for fut in list(pending):
            collect(fut)
    return feats


def image_index(feats: Sequence[tuple[str, list[im.ViewFeatures]] | None], max_distance: int,
                max_part_distance: int | None = None) -> ImageIndex:
    """The image side of an eval set's index from per-item `view_features` results (None: not read)."""
    hashes, variants, chroma, variant_view, thumbs, colours, view_item, view_kind, parts = ([] for _ in range(9))
    sha = {}
    for i, f in enumerate(feats):
        if f is None:
            continue
        sha.setdefault(f[0], i)
        for k, v in enumerate(f[1]):
            hashes.append(v.hashes)
            variants.append(v.variants)
            chroma.append(v.chroma)
            parts.append(np.ones(len(v.variants), bool) if v.parts is None else v.parts)
            variant_view.append(np.full(len(v.variants), len(thumbs), np.int64))
            thumbs.append(v.thumb)
            colours.append(v.colour)
            view_item.append(i)
            view_kind.append(k)
    has_image = np.array([bool(f and f[1]) for f in feats], dtype=bool)
    empty = not hashes
    all_hashes = np.zeros((0, im.N_REGIONS), np.uint64) if empty else np.concatenate(hashes)
    part = max_distance if max_part_distance is None else max_part_distance
    part_rows = None if empty else np.flatnonzero(np.concatenate(parts))
    band_rows = [None] + [part_rows] * (im.N_REGIONS - 1)
    return ImageIndex(
        bands=None if empty else [BandedIndex(all_hashes[:, 0], None, max_distance)] + [
            BandedIndex(all_hashes[part_rows, r], None, part) for r in range(1, im.N_REGIONS)],
        band_rows=band_rows,
        variants=np.zeros((0, 6), np.float32) if empty else np.concatenate(variants),
        chroma=np.zeros((0, im.N_REGIONS, im.CHROMA_DIM), np.int8) if empty else np.concatenate(chroma),
        variant_view=np.zeros(0, np.int32) if empty else np.concatenate(variant_view).astype(np.int32),
        thumbs=np.stack(thumbs) if thumbs else np.zeros((0, im.THUMB, im.THUMB), np.uint8),
        colours=np.stack(colours) if colours else np.zeros((0, im.COLOUR, im.COLOUR, 3), np.uint8),
        view_item=np.array(view_item, np.int64), view_kind=np.array(view_kind, np.int8), has_image=has_image,
        sha256=sha)


def build_set_index(es: EvalSet, cfg: MatchConfig, signer: TextSigner, threads: int | None = None) -> EvalSetIndex:
    t0 = time.perf_counter()
    n = len(es.items)
    images = None
    if "image" in cfg.kinds:
        feats = _set_features(es, cfg.crop, threads or os.cpu_count() or 1)
    t1 = time.perf_counter()
    if "image" in cfg.kinds:
        images = image_index(feats, cfg.image_max_distance, cfg.image_max_part_distance)
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
    unreadable = [es.items[i].id for i in np.flatnonzero(~images.has_image)] if images is not None else []
    if unreadable:
        log.warning("eval set %s: %d images do not decode and can only match by text/sha256 (first: %s)",
                    es.name, len(unreadable), unreadable[0])
    idx = EvalSetIndex(es.name, es.kind, es.layout, [it.id for it in es.items], images, text, unreadable,
                       {"image_features_s": round(t1 - t0, 3), "index_build_s": round(t2 - t1, 3)})
    log.info("eval set %s: %s, %d items, %d captions indexed, built in %.1fs", es.name, es.kind, n,
             0 if text is None else len(text), t2 - t0)
    return idx


@dataclass
class Candidates:
    """Pairs of (training box, eval variant) the loose search and the pre-check let through."""

    query: np.ndarray
    """int64: index of the training image in the batch."""
    box: np.ndarray
    """int64: which of its boxes (0: whole, 1: content box)."""
    variant: np.ndarray
    """int64: eval variant row."""
    distance: np.ndarray
    """int64: Hamming distance of the closest region."""
    region: np.ndarray
    """int64: that region (index into dedup.image.REGIONS)."""


PairSearch = Callable[[int, np.ndarray, int], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _candidates(ii: ImageIndex, feats: Sequence[im.ImageFeatures], cfg: MatchConfig,
                pairs: PairSearch) -> Candidates:
    """The loose search and the pre-check over every box and region of every training image;
    `pairs(region, hashes, max_distance)` -> (hash row, variant row, distance) within max_distance."""
    hashes = np.concatenate([f.hashes for f in feats])
    chroma = np.concatenate([f.chroma for f in feats])
    owner = np.concatenate([np.full(len(f.hashes), i, np.int64) for i, f in enumerate(feats)])
    box = np.concatenate([np.arange(len(f.hashes)) for f in feats])
    parts = []
    for r in range(im.N_REGIONS):
        limit = cfg.image_max_distance if r == 0 else cfg.image_max_part_distance
        row, vrow, dist = pairs(r, hashes[:, r], limit)
        if ii.band_rows[r] is not None:
            vrow = ii.band_rows[r][vrow]
        ok = im.chroma_residual(chroma[row, r], ii.chroma[vrow, r]) <= cfg.image_max_chroma
        parts.append((row[ok], vrow[ok], dist[ok], np.full(int(ok.sum()), r, np.int64)))
    row, vrow, dist, region = (np.concatenate(x) for x in zip(*parts, strict=True))
    # One entry per (box, variant): its closest region, whole boxes first on a tie.
    order = np.lexsort((region, dist, vrow, row))
    row, vrow, dist, region = row[order], vrow[order], dist[order], region[order]
    first = np.ones(len(row), bool)
    first[1:] = (row[1:] != row[:-1]) | (vrow[1:] != vrow[:-1])
    row, vrow, dist, region = row[first], vrow[first], dist[first], region[first]
    return Candidates(owner[row], box[row], vrow, dist, region)


def image_candidates_of(s: EvalSetIndex, feats: Sequence[im.ImageFeatures], cfg: MatchConfig) -> Candidates:
    """`_candidates` through the banded index."""
    ii = s.images
    return _candidates(ii, feats, cfg, lambda r, h, limit: ii.bands[r].search_pairs(h, limit))


def _by_view(ii: ImageIndex, c: Candidates) -> dict[tuple[int, int], int]:
    out: dict[tuple[int, int], int] = {}
    for q, view, d in zip(c.query.tolist(), ii.variant_view[c.variant].tolist(), c.distance.tolist(), strict=True):
        if d < out.get((q, view), im.HASH_BITS + 1):
            out[(q, view)] = d
    return out


def image_candidates(s: EvalSetIndex, feats: Sequence[im.ImageFeatures], cfg: MatchConfig | None = None
                     ) -> dict[tuple[int, int], int]:
    """{(query, view): distance} for queries with a pair that passes the loose search and the pre-check."""
    return _by_view(s.images, image_candidates_of(s, feats, cfg or MatchConfig()))


def brute_force_image_candidates(s: EvalSetIndex, feats: Sequence[im.ImageFeatures], cfg: MatchConfig | None = None
                                 ) -> dict[tuple[int, int], int]:
    """All pairs, same definition as `image_candidates` (tests and benchmark)."""
    ii = s.images

    def pairs(r: int, h: np.ndarray, limit: int, block: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = []
        for b0 in range(0, len(h), block):
            d = im.hamming(h[b0 : b0 + block, None], ii.bands[r].hashes[None, :])
            row, vrow = np.nonzero(d <= limit)
            out.append((row + b0, vrow, d[row, vrow]))
        return tuple(np.concatenate(x) for x in zip(*out, strict=True)) if out else (np.zeros(0, np.int64),) * 3

    return _by_view(ii, _candidates(ii, feats, cfg or MatchConfig(), pairs))


def describe_variant(ii: ImageIndex, view: int, variant: np.ndarray, query_box: int, region: int) -> str:
    x0, y0, x1, y1, mirrored, angle = (float(v) for v in variant)
    cut = f"crop={x0:.2f},{y0:.2f},{1 - x1:.2f},{1 - y1:.2f}"
    return (f"{VIEW_NAMES[int(ii.view_kind[view])]} {cut}{' mirrored' if mirrored else ''}"
            f"{f' turned={angle:+.0f}' if angle else ''} part={im.REGIONS[region]} "
            f"query={'whole' if query_box == 0 else 'content_box'}")


_STAGES = ("correlation", "colour", "residual", "detail", "displaced")
"""The precise check's stages in order (dedup.image.verify)."""
REFINE_MARGIN = 0.15
"""A pair whose grey frames correlate within this much of `image_min_similarity`, or which fails at a
later stage than colour, is close enough to try again with refined box sides (`_near_miss`). Brick
crops 2 to 4% off their nearest box correlate 0.82 to 0.96 there; `refine_box` only goes on for fine
textures, so the width costs little."""


def _near_miss(v: im.Verdict, limits: im.Limits) -> tuple[int, float] | None:
    """How close a failed precise check came (the stage it reached, then the correlation), or None when a
    box a few percent off cannot be why: another tint (colour), or frames that barely correlate."""
    if v.failed == "colour" or (v.failed == "correlation" and v.correlation < limits.min_correlation - REFINE_MARGIN):
        return None
    return _STAGES.index(v.failed), v.correlation


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

    def limits(self) -> im.Limits:
        """The precise check's settings (dedup.image.verify)."""
        return self.cfg.limits()

    def _match_images(self, feats: Sequence[im.ImageFeatures | None], extra_sha: Sequence[Sequence[str]],
                      out: list[list[Match]], max_hints: int = 5) -> None:
        rows = [i for i, f in enumerate(feats) if f is not None]
        for s in self.sets:
            ii = s.images
            if ii is None:
                continue
            found: dict[tuple[int, int], Match] = {}
            for i in range(len(feats)):
                digests = list(extra_sha[i]) + ([feats[i].sha256] if feats[i] is not None else [])
                for d in digests:
                    item = ii.sha256.get(d)
                    if item is not None:  # the very same file
                        found[(i, item)] = Match(s.name, s.item_ids[item], "image", 0.0, 1.0)
            if not rows or ii.bands is None:
                for (i, _), m in sorted(found.items()):
                    out[i].append(m)
                continue
            c = image_candidates_of(s, [feats[i] for i in rows], self.cfg)
            limits = self.limits()
            items = ii.view_item[ii.variant_view[c.variant]]
            # Closest first; per (training image, eval item) the precise check tries `max_hints` alignments
            # (five: with crop boxes every 4%, the three closest can be neighbouring boxes of one wrong
            # alignment, and an overlaid drawing was missed that way).
            order = np.lexsort((c.region, c.distance, items, c.query))
            tried: dict[tuple[int, int], int] = {}
            closest: dict[tuple[int, int], tuple[tuple[int, float], int]] = {}
            for k in order.tolist():
                i, item = rows[int(c.query[k])], int(items[k])
                if (i, item) in found or tried.get((i, item), 0) >= max_hints:
                    continue  # sha256 match, an alignment of the item already passed, or enough tries
                tried[(i, item)] = tried.get((i, item), 0) + 1
                vrow = int(c.variant[k])
                v = self._verify(ii, feats[i], int(c.box[k]), vrow, ii.variants[vrow], int(c.region[k]), limits)
                if v.ok:
                    found[(i, item)] = self._image_match(s, item, float(c.distance[k]), v, int(c.variant[k]),
                                                         ii.variants[vrow], int(c.box[k]), int(c.region[k]))
                elif (near := _near_miss(v, limits)) is not None and near > closest.get((i, item), ((-1, 0.0), 0))[0]:
                    closest[(i, item)] = (near, k)
            # The one alignment per pair that came closest, its box sides moved to where the thumbnails
            # agree best (dedup.image.refine_box: a crop between the indexed boxes of a fine texture).
            for (i, item), (_, k) in closest.items():
                if (i, item) in found:
                    continue
                vrow, qbox, region = int(c.variant[k]), int(c.box[k]), int(c.region[k])
                f, view = feats[i], int(ii.variant_view[vrow])
                variant = im.refine_box(f, f.boxes[qbox], ii.thumbs[view], ii.variants[vrow])
                if variant is None:
                    continue  # no fine texture: ECC's alignment stands
                v = self._verify(ii, f, qbox, vrow, variant, region, limits)
                if v.ok:
                    found[(i, item)] = self._image_match(s, item, float(c.distance[k]), v, vrow, variant, qbox, region)
            for (i, _), m in sorted(found.items()):
                out[i].append(m)

    @staticmethod
    def _verify(ii: ImageIndex, f: im.ImageFeatures, qbox: int, vrow: int, variant: np.ndarray, region: int,
                limits: im.Limits) -> im.Verdict:
        view = int(ii.variant_view[vrow])
        return im.verify(f, f.boxes[qbox], ii.thumbs[view], ii.colours[view], variant, limits, region=region)

    @staticmethod
    def _image_match(s: EvalSetIndex, item: int, distance: float, v: im.Verdict, vrow: int, variant: np.ndarray,
                     qbox: int, region: int) -> Match:
        ii = s.images
        return Match(s.name, s.item_ids[item], "image", distance, round(v.correlation, 4),
                     describe_variant(ii, int(ii.variant_view[vrow]), variant, qbox, region), round(v.colour_diff, 2),
                     round(v.detail, 4), round(v.residual, 4), round(v.displaced, 4))

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
