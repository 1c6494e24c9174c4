"""Near-duplicates within the corpus as distributed steps (build_corpus --dedup-within text,image).

The exact dedup's shape (pipeline.exact_dedup: keys per slice, a decision per bucket, a gather per
slice) with a verification in the bucket and a clustering step between:

1. **near_keys** (one task per input slice, after the sha256 dedup): for every candidate row that is
   not an exact duplicate, reads its caption and image from the download part and writes
   - its features (`_near/feat-SSSSS.parquet`, by row: caption; the whole-image hash, chroma code and
     thumbnails of dedup.image, what the eval-overlap stage keeps of a training image), and
   - its band keys (`_keys/near-SSSSS.parquet`, one row group per bucket): text, the MinHash LSH
     bands of the eval-overlap stage (dedup.index.lsh_params at --text-threshold); image, the 64-bit
     whole-image hash cut into `image_max_distance + 1` bands, so that (pigeonhole) two hashes within
     that distance agree on at least one band.
2. **near_pairs** (one task per bucket): the rows sharing a band key are candidates, each VERIFIED
   as the eval-overlap stage verifies a match: text, exact Jaccard of the shingle sets at least
   --text-threshold; image, whole hashes within --image-max-distance (a banded search over the
   bucket's rows; a pair is decided in the bucket of the first band it agrees on, so once), the
   chroma pre-check, and dedup.image.verify of the whole images. Writes the verified edges
   (`_near/edges-BBBBB.parquet`). Within a bucket a pair already joined through verified edges is
   not verified again (the clusters do not change; many copies of one caption cost O(copies)).
3. **near_cluster** (one task, DataTrove's MinhashDedupCluster): union-find over the edges alone,
   O(duplicates) in memory, per kind; each cluster of near-duplicate captions and each cluster of
   near-duplicate images keeps its lowest row, every other member is written with that row and the
   kind (`_dups/near-SSSSS.parquet`, per slice); a row in both kinds of cluster goes as text.
4. The build's **settle** step marks those rows dropped `near_duplicate:text|image` with
   `duplicate_of` the key of its cluster's lowest row.

The lowest row of a caption cluster can itself be an image near-duplicate of a lower row (and so
on): `duplicate_of` then names a dropped row, but rows only ever point lower and only rows dropped
as near-duplicates are pointed at, so following `duplicate_of` always ends at a written sample.
Everything is a pure function of the input and the settings: reruns after a kill give the same drops.

Buckets: a row gives ~36 band keys (25 LSH bands, 11 hash bands at the defaults), so these steps
have their own count (run.json `near_buckets`, sized like the exact dedup's per key). Limit: the
image bands are ~6 bits wide, so there are only (d + 1) * 2^6 image keys (704 at d = 10), each shared
by ~1/64 of the images: the image side cannot spread over more tasks than that, and a bucket's banded
search covers n/64 images (fine to ~10^8 images; beyond, wider bands probed within the search radius
would be needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.exact_dedup import _read_groups, parquet_bytes
from pipeline.job import AccountingError, Step, TaskContext
from pipeline.shards import atomic_write_bytes

KINDS = ("text", "image")
TEXT, IMAGE = 0, 1
KEY_SCHEMA = pa.schema([("bucket", pa.uint32()), ("kind", pa.uint8()), ("band", pa.uint16()), ("value", pa.uint64()),
                        ("row", pa.int64()), ("hash", pa.uint64()), ("chroma", pa.binary(18))])
"""One band key of a row; image keys carry the row's whole hash and chroma code (dedup.image.CHROMA_DIM
bytes) for the bucket's search and pre-check."""
FEAT_SCHEMA = pa.schema([("row", pa.int64()), ("caption", pa.string()), ("hash", pa.uint64()),
                         ("chroma", pa.binary()), ("thumb", pa.binary()), ("colour", pa.binary()),
                         ("width", pa.int32()), ("height", pa.int32())])
EDGE_SCHEMA = pa.schema([("kind", pa.uint8()), ("a", pa.int64()), ("b", pa.int64())])
NEAR_SCHEMA = pa.schema([("row", pa.int64()), ("root", pa.int64()), ("kind", pa.string())])
SHOWN_SCHEMA = pa.schema([("row", pa.int64()), ("key", pa.string()), ("caption", pa.string()), ("jpeg", pa.binary())])
"""A row the report shows (`_near/shown-SSSSS.parquet`): its key, caption and a small JPEG (None: no image)."""
FEAT_GROUP = 256
"""Rows per row group of a features file: a bucket reads only the groups holding its candidates."""


@dataclass(frozen=True)
class NearSettings:
    """What --dedup-within compares, and the eval-overlap stage's settings it compares with."""

    kinds: tuple[str, ...]
    """text, image or both."""
    match: Any
    """dedup.matcher.MatchConfig: threshold, shingles, MinHash, hash distance and image checks."""


def _fmix64(h: np.ndarray) -> np.ndarray:
    from datasketch.minhash import _fmix

    return _fmix(np.asarray(h, dtype=np.uint64), 64)


def bucket_of(kind: int, band: np.ndarray, value: np.ndarray, buckets: int) -> np.ndarray:
    """The bucket of each (kind, band, value) key."""
    salt = _fmix64((np.asarray(band, np.uint64) << np.uint64(8)) | np.uint64(kind + 1))
    return (_fmix64(np.asarray(value, np.uint64) ^ salt) % np.uint64(buckets)).astype(np.uint32)


def keys_per_row(settings: NearSettings) -> int:
    """Band keys a row gives: the LSH bands (text) and the hash bands (image)."""
    from dedup.index import lsh_params

    m = settings.match
    return ((lsh_params(m.text_threshold, m.num_perm)[0] if "text" in settings.kinds else 0)
            + (m.image_max_distance + 1 if "image" in settings.kinds else 0))


def text_bands(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64 (n, bands): each LSH band of `rows` MinHash values hashed to 64 bits (datasketch's
    MinHashLSH compares the same slices; two captions share a band when all its values agree)."""
    n = len(signatures)
    s = np.ascontiguousarray(signatures[:, : bands * rows]).astype(np.uint64).reshape(n, bands, rows)
    h = np.full((n, bands), 0x243F6A8885A308D3, dtype=np.uint64)
    for k in range(rows):
        h = _fmix64(h ^ s[:, :, k])
    return h


def image_band_bounds(max_distance: int, bits: int = 64) -> list[tuple[int, int]]:
    """(shift, width) of `max_distance + 1` bands covering the hash: hashes within `max_distance`
    bits differ in at most that many bands, so they agree on one (pigeonhole)."""
    from dedup.index import split_bits

    return split_bits(max_distance + 1, bits)


def image_bands(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """uint64 (n, max_distance + 1): the value of each band of each hash."""
    h = np.asarray(hashes, dtype=np.uint64)
    return np.stack([(h >> np.uint64(s)) & np.uint64((1 << w) - 1) for s, w in image_band_bounds(max_distance)],
                    axis=1) if len(h) else np.zeros((0, max_distance + 1), np.uint64)


# -- features (what a row is compared by) ---------------------------------------------------------


@dataclass
class Features:
    """The near-dup features of a batch of rows (columns of FEAT_SCHEMA)."""

    rows: np.ndarray
    captions: list[str | None]
    hashes: np.ndarray
    chroma: list[bytes | None]
    thumbs: list[bytes | None]
    colours: list[bytes | None]
    sizes: list[tuple[int, int]]

    def table(self) -> pa.Table:
        return pa.table({"row": self.rows, "caption": self.captions, "hash": self.hashes, "chroma": self.chroma,
                         "thumb": self.thumbs, "colour": self.colours,
                         "width": [w for w, _ in self.sizes], "height": [h for _, h in self.sizes]},
                        schema=FEAT_SCHEMA)


def compute_features(rows: list[int], captions: list[str], images: list[bytes | None], with_image: bool) -> Features:
    """Captions as they are; the whole-image hash, chroma code and thumbnails of dedup.image's training
    side (an image that does not decode has none and is never an image member)."""
    from dedup import image as im

    hashes = np.zeros(len(rows), np.uint64)
    chroma: list[bytes | None] = [None] * len(rows)
    thumbs: list[bytes | None] = [None] * len(rows)
    colours: list[bytes | None] = [None] * len(rows)
    sizes = [(0, 0)] * len(rows)
    if with_image:
        for i, data in enumerate(images):
            img = im.decode(data or b"")
            if img is None:
                continue
            f = im.image_features(img, "")
            hashes[i] = f.hashes[0, 0]  # the whole image (box 0), the whole box (region 0)
            chroma[i] = f.chroma[0, 0].tobytes()
            thumbs[i], colours[i] = f.thumb.tobytes(), f.colour.tobytes()
            sizes[i] = f.size
    return Features(np.asarray(rows, np.int64), list(captions), hashes, chroma, thumbs, colours, sizes)


def band_keys(feats: Features, settings: NearSettings, buckets: int) -> dict[str, np.ndarray]:
    """The band keys of a batch of features, as KEY_SCHEMA's columns (numpy; chroma uint8 (n, CHROMA_DIM),
    zeros for text keys): a task keeps only these, not the images, until its slice is done."""
    from dedup.image import CHROMA_DIM
    from dedup.index import lsh_params
    from dedup.text import TextSigner, normalize_words

    m = settings.match
    cols: dict[str, list[np.ndarray]] = {k: [] for k in KEY_SCHEMA.names}

    def add(kind: int, rows: np.ndarray, values: np.ndarray, hashes: np.ndarray, chroma: np.ndarray) -> None:
        n, nb = values.shape
        band = np.tile(np.arange(nb, dtype=np.uint16), n)
        cols["bucket"].append(bucket_of(kind, band, values.ravel(), buckets))
        cols["kind"].append(np.full(n * nb, kind, np.uint8))
        cols["band"].append(band)
        cols["value"].append(values.ravel())
        cols["row"].append(np.repeat(rows, nb))
        cols["hash"].append(np.repeat(hashes, nb))
        cols["chroma"].append(np.repeat(chroma, nb, axis=0))

    if "text" in settings.kinds:
        signer = TextSigner(m.num_perm, m.seed, m.ngram)
        sets = signer.shingle_sets([c or "" for c in feats.captions])
        ok = np.array([bool(s) and len(normalize_words(c or "")) >= m.min_caption_words
                       for s, c in zip(sets, feats.captions, strict=True)], bool)
        if ok.any():
            sigs = signer.signatures_from_shingles([s for s, k in zip(sets, ok, strict=True) if k])
            n = int(ok.sum())
            add(TEXT, feats.rows[ok], text_bands(sigs, *lsh_params(m.text_threshold, m.num_perm)),
                np.zeros(n, np.uint64), np.zeros((n, CHROMA_DIM), np.uint8))
    if "image" in settings.kinds:
        ok = np.array([t is not None for t in feats.thumbs], bool)
        if ok.any():
            chroma = np.frombuffer(b"".join(c for c, k in zip(feats.chroma, ok, strict=True) if k), np.uint8)
            add(IMAGE, feats.rows[ok], image_bands(feats.hashes[ok], m.image_max_distance), feats.hashes[ok],
                chroma.reshape(-1, CHROMA_DIM))
    empty = {"chroma": np.zeros((0, CHROMA_DIM), np.uint8)}
    return {k: np.concatenate(v) if v else empty.get(k, np.zeros(0, KEY_SCHEMA.field(k).type.to_pandas_dtype()))
            for k, v in cols.items()}


def keys_table(parts: list[dict[str, np.ndarray]]) -> pa.Table:
    """`band_keys` of several batches as one KEY_SCHEMA table sorted by (bucket, kind, band, value, row)."""
    from dedup.image import CHROMA_DIM

    if KEY_SCHEMA.field("chroma").type.byte_width != CHROMA_DIM:  # the schema spells it out: no cv2 import
        raise AssertionError(f"KEY_SCHEMA's chroma must be {CHROMA_DIM} bytes (dedup.image.CHROMA_DIM)")
    a = {k: np.concatenate([p[k] for p in parts]) for k in KEY_SCHEMA.names} if parts else None
    if a is None or not len(a["row"]):
        return KEY_SCHEMA.empty_table()
    order = np.lexsort((a["row"], a["value"], a["band"], a["kind"], a["bucket"]))
    chroma = np.ascontiguousarray(a["chroma"][order])
    return pa.table({**{k: a[k][order] for k in KEY_SCHEMA.names if k != "chroma"},
                     "chroma": pa.FixedSizeBinaryArray.from_buffers(
                         pa.binary(CHROMA_DIM), len(order), [None, pa.py_buffer(chroma.tobytes())])},
                    schema=KEY_SCHEMA)


def read_rows(fs: Any, path: str, rows: np.ndarray) -> pa.Table:
    """The rows (sorted, present) of a features file, reading only the row groups that hold them."""
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        wanted = []
        for g in range(pf.metadata.num_row_groups):
            st = pf.metadata.row_group(g).column(0).statistics
            lo, hi = (st.min, st.max) if st is not None and st.has_min_max else (-(2**63), 2**63 - 1)
            if np.any((rows >= lo) & (rows <= hi)):
                wanted.append(g)
        t = pf.read_row_groups(wanted) if wanted else FEAT_SCHEMA.empty_table()
    return t.filter(pc.is_in(t.column("row"), pa.array(rows, pa.int64())))


# -- pairs in a bucket ----------------------------------------------------------------------------


class _UnionFind:
    """Union-find over row numbers with the lowest row as each set's root (dicts: only rows seen)."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        self.parent.setdefault(lo, lo)
        return True


def text_edges(keys: pa.Table, captions: dict[int, str], settings: NearSettings) -> list[tuple[int, int]]:
    """Verified (lower, higher) caption pairs among rows sharing a band key (`keys`: one bucket's text
    rows sorted by band, value, row).

    A row is checked against the members of each cluster it is not yet joined to, until one verifies:
    the clusters come out as if every pair were checked, and k copies of one caption cost O(k) checks.
    """
    from dedup.text import jaccard, shingles

    m = settings.match
    band, value, row = (keys.column(c).to_numpy() for c in ("band", "value", "row"))
    starts = np.flatnonzero(np.r_[True, (band[1:] != band[:-1]) | (value[1:] != value[:-1])])
    ends = np.r_[starts[1:], len(row)]
    sets: dict[int, frozenset[str]] = {}
    uf = _UnionFind()
    edges = []
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        if e - s < 2:
            continue
        comps: dict[int, list[int]] = {}  # this group's members so far, by cluster
        for b in sorted(set(row[s:e].tolist())):
            if b not in sets:
                sets[b] = shingles(captions[b], m.ngram)
            joined = []
            for key, members in comps.items():
                if uf.find(key) == uf.find(b):  # joined through another band already
                    joined.append(key)
                    continue
                for a in members:
                    if jaccard(sets[a], sets[b]) >= m.text_threshold:
                        uf.union(a, b)
                        edges.append((a, b))
                        joined.append(key)
                        break
            # The joined clusters merge into the largest one's list, in place (small into large): a new
            # list per row would copy the whole cluster each time, O(k^2) for k copies of one caption.
            if joined:
                big = max(joined, key=lambda key: len(comps[key]))
                for key in joined:
                    if key != big:
                        comps[big].extend(comps.pop(key))
                comps[big].append(b)
            else:
                comps[b] = [b]
    return edges


def image_candidates(keys: pa.Table, bucket: int, buckets: int, settings: NearSettings, chroma_check: bool = True
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(lower, higher) row pairs of one bucket's image rows whose whole hashes are within the distance
    and pass the chroma pre-check, each decided in the bucket of the first band it agrees on."""
    from dedup import image as im
    from dedup.index import BandedIndex

    m = settings.match
    rows_all = keys.column("row").to_numpy()
    rows, first = np.unique(rows_all, return_index=True)
    empty = np.zeros(0, np.int64)
    if len(rows) < 2:
        return empty, empty
    hashes = keys.column("hash").to_numpy()[first]
    chroma = np.frombuffer(b"".join(keys.column("chroma").take(pa.array(first)).to_pylist()),
                           np.int8).reshape(len(rows), im.CHROMA_DIM)
    q, r, _ = BandedIndex(hashes, None, m.image_max_distance).search_pairs(hashes)
    keep = q < r  # each unordered pair once, not the row with itself
    lo, hi = q[keep], r[keep]
    va, vb = image_bands(hashes[lo], m.image_max_distance), image_bands(hashes[hi], m.image_max_distance)
    agree = va == vb
    band = np.argmax(agree, axis=1)
    if len(band) and not agree[np.arange(len(band)), band].all():
        raise AccountingError("near_pairs: a pair within the hash distance agrees on no band (the bands do not "
                              "cover the distance)")
    mine = bucket_of(IMAGE, band, va[np.arange(len(band)), band], buckets) == bucket
    lo, hi = lo[mine], hi[mine]
    ok = im.chroma_residual(chroma[hi], chroma[lo]) <= m.image_max_chroma if chroma_check else slice(None)
    lo, hi = rows[lo[ok]], rows[hi[ok]]
    order = np.lexsort((lo, hi))
    return lo[order], hi[order]


def verify_images(pairs: tuple[np.ndarray, np.ndarray], feats: dict[int, dict[str, Any]], settings: NearSettings,
                  skip_joined: bool = True) -> list[tuple[int, int]]:
    """The pairs dedup.image.verify calls copies of one another, as the eval-overlap stage checks a
    whole-image match (the higher row as the training image, the lower as the eval image).

    `skip_joined`: a pair already joined through verified pairs is not checked (the clusters do not
    change; k copies of one image cost O(k) checks, not O(k^2))."""
    from dedup import image as im

    limits = settings.match.limits()
    whole = np.array([0.0, 0.0, 1.0, 1.0, 0.0, 0.0], np.float32)
    uf = _UnionFind()
    out = []
    for a, b in zip(pairs[0].tolist(), pairs[1].tolist(), strict=True):
        if skip_joined and uf.find(a) == uf.find(b):
            continue
        fa, fb = feats[a], feats[b]
        q = im.ImageFeatures(hashes=np.array([[fb["hash"]] * im.N_REGIONS], np.uint64),
                             thumb=_thumb(fb["thumb"]), sha256="", colour=_colour(fb["colour"]),
                             boxes=np.array([im.WHOLE], np.float32), size=(fb["width"], fb["height"]))
        if im.verify(q, whole[:4], _thumb(fa["thumb"]), _colour(fa["colour"]), whole, limits).ok:
            uf.union(a, b)
            out.append((a, b))
    return out


def image_edges(keys: pa.Table, bucket: int, buckets: int, settings: NearSettings,
                load: Any) -> tuple[list[tuple[int, int]], int]:
    """(edges, candidate class pairs) of one bucket's image rows: the clusters verify_images gives over
    every candidate pair, at a cost in distinct images, not rows (k re-encoded copies of one image with
    one hash give k^2 / 2 candidate pairs: millions for a few thousand copies).

    Rows with the same whole hash and chroma code are candidates of one another (distance 0) and of the
    same other rows, so the candidates are found among one row of each; rows whose thumbnails, colours
    and sizes are equal too verify alike, so each such group is verified once per partner group and
    direction (the chroma pre-check and the verification are not symmetric: the lower row is the eval
    side). `load(rows)`: {row: features} as NearPairsStep._load. Edges: a spanning forest, O(rows)."""
    from dedup import image as im

    m = settings.match
    rows_all = keys.column("row").to_numpy()
    rows, first = np.unique(rows_all, return_index=True)
    if len(rows) < 2:
        return [], 0
    hashes = keys.column("hash").to_numpy()[first]
    codes = keys.column("chroma").take(pa.array(first)).to_pylist()
    classes: dict[tuple[int, bytes], list[int]] = {}
    for r, h, c in zip(rows.tolist(), hashes.tolist(), codes, strict=True):
        classes.setdefault((h, c), []).append(r)  # rows ascending: [0] is the lowest
    by_rep = {v[0]: k for k, v in classes.items()}
    reps = pa.array(sorted(by_rep), pa.int64())
    lo, hi = image_candidates(keys.filter(pc.is_in(keys.column("row"), reps)), bucket, buckets, settings,
                              chroma_check=False)
    groups = [(by_rep[a], by_rep[b]) for a, b in zip(lo.tolist(), hi.tolist(), strict=True)]
    # A class's own pairs agree on band 0 first, so they are decided in band 0's bucket.
    own = [k for k, v in classes.items() if len(v) > 1]
    if own:
        b0 = image_bands(np.array([k[0] for k in own], np.uint64), m.image_max_distance)[:, 0]
        mine = bucket_of(IMAGE, np.zeros(len(own), np.uint16), b0, buckets) == bucket
        groups += [(k, k) for k, yes in zip(own, mine.tolist(), strict=True) if yes]
    if not groups:
        return [], 0
    feats = load(np.array(sorted({r for g in groups for k in g for r in classes[k]}), np.int64))
    sub: dict[tuple[int, bytes], list[list[int]]] = {}  # class -> rows with equal features, by lowest row
    for k in {k for g in groups for k in g}:
        same: dict[tuple[Any, ...], list[int]] = {}
        for r in classes[k]:
            f = feats[r]
            same.setdefault((f["thumb"], f["colour"], f["width"], f["height"]), []).append(r)
        sub[k] = sorted(same.values())
    verified: dict[tuple[int, int], bool] = {}

    def ok(a: int, b: int) -> bool:  # a: the eval side's representative row, b: the training side's
        if (a, b) not in verified:
            verified[(a, b)] = bool(verify_images((np.array([a]), np.array([b])), feats, settings, skip_joined=False))
        return verified[(a, b)]

    def chroma_ok(ka: tuple[int, bytes], kb: tuple[int, bytes]) -> bool:  # ka's rows lower, kb's higher
        ca, cb = (np.frombuffer(k[1], np.int8)[None] for k in (ka, kb))
        return bool(im.chroma_residual(cb, ca)[0] <= m.image_max_chroma)

    # Components so far, and the edges that made them (a spanning forest: the clusters need no more).
    # A pair of groups whose rows would all join one component already changes no cluster, and is not
    # verified: copies re-encoded at other qualities or sizes keep one hash but differ in thumbnails
    # (one group each), and k of them cost k^2 / 2 checks (780 at k = 40), not k.
    joined = _UnionFind()
    forest: list[tuple[int, int]] = []

    def add(new: list[tuple[int, int]]) -> None:
        forest.extend(e for e in new if joined.union(*e))

    def one_component(rows: list[int]) -> bool:
        root = joined.find(rows[0])
        return all(joined.find(r) == root for r in rows[1:])

    for ka, kb in groups:
        c_ab, c_ba = chroma_ok(ka, kb), chroma_ok(kb, ka)
        for i, f in enumerate(sub[ka]):
            for j, g in enumerate(sub[kb]):
                if ka == kb and j < i:
                    continue
                if f is g:  # pairs within one group of equal rows: all verify alike
                    if len(f) > 1 and c_ab and not one_component(f) and ok(f[0], f[0]):
                        add([(f[0], x) for x in f[1:]])
                    continue
                for lower, upper, chroma in ((f, g, c_ab), (g, f, c_ba)):
                    # Every pair x < y with x in `lower`, y in `upper` verifies alike: joined through
                    # lower's lowest row and upper's highest.
                    if not (chroma and lower[0] < upper[-1]):
                        continue
                    new = ([(lower[0], y) for y in upper if y > lower[0]]
                           + [(x, upper[-1]) for x in lower if x < upper[-1]])
                    if not one_component([r for e in new for r in e]) and ok(lower[0], upper[0]):
                        add(new)
    return sorted(forest), len(groups)


def _thumb(b: bytes) -> np.ndarray:
    from dedup.image import THUMB

    return np.frombuffer(b, np.uint8).reshape(THUMB, THUMB)


def _colour(b: bytes) -> np.ndarray:
    from dedup.image import COLOUR

    return np.frombuffer(b, np.uint8).reshape(COLOUR, COLOUR, 3)


# -- clusters -------------------------------------------------------------------------------------


def clusters(edges: dict[str, list[tuple[int, int]]]) -> dict[int, tuple[int, str]]:
    """{row: (lowest row of its cluster, kind)} for every row that is not the lowest of its cluster of
    near-duplicate captions or of near-duplicate images (a row in both: its text cluster's)."""
    out: dict[int, tuple[int, str]] = {}
    for kind in reversed(KINDS):
        uf = _UnionFind()
        for a, b in edges.get(kind, ()):
            uf.union(a, b)
        for r in sorted(uf.parent):
            root = uf.find(r)
            if root != r:
                out[r] = (root, kind)
    return out


REPORT_CLUSTERS = 8
"""Clusters per kind the report shows (the largest; the manifest lists every removed sample)."""
REPORT_MEMBERS = 5
"""Removed members shown per cluster (its lowest rows)."""


def report_clusters(dropped: dict[int, tuple[int, str]], per_kind: int = REPORT_CLUSTERS,
                    members: int = REPORT_MEMBERS) -> list[dict[str, Any]]:
    """The clusters the report shows: per kind, the `per_kind` largest (ties: the lowest kept row), each
    {kind, root, size, shown, root_fate}: `shown` its `members` lowest removed rows. Clusters as the
    manifest has them: a root and the rows dropped `near_duplicate:KIND` with it as `duplicate_of`.
    `root_fate`: None when the root stays, else [its own root, kind]: a caption cluster's lowest row can
    itself be a near-duplicate image of a lower row (kinds are clustered apart), and is removed as one."""
    by_cluster: dict[tuple[str, int], list[int]] = {}
    for row, (root, kind) in dropped.items():
        by_cluster.setdefault((kind, root), []).append(row)
    out = []
    for kind in KINDS:
        mine = sorted(((-len(rows), root, rows) for (k, root), rows in by_cluster.items() if k == kind))[:per_kind]
        out += [{"kind": kind, "root": root, "size": 1 - neg, "shown": sorted(rows)[:members],
                 "root_fate": list(dropped[root]) if root in dropped else None} for neg, root, rows in mine]
    return out


def brute_force_clusters(captions: list[str | None], images: list[bytes | None], settings: NearSettings,
                         rows: list[int] | None = None) -> dict[int, tuple[int, str]]:
    """Every pair compared, the same definitions: what the steps must give (tests)."""
    from dedup import image as im
    from dedup.text import jaccard, normalize_words, shingles

    m = settings.match
    rows = list(range(len(captions))) if rows is None else rows
    feats = compute_features(rows, [c or "" for c in captions], images, "image" in settings.kinds)
    edges: dict[str, list[tuple[int, int]]] = {k: [] for k in KINDS}
    n = len(rows)
    if "text" in settings.kinds:
        sets = [shingles(c or "", m.ngram) if len(normalize_words(c or "")) >= m.min_caption_words else frozenset()
                for c in captions]
        edges["text"] = [(rows[i], rows[j]) for j in range(n) for i in range(j)
                         if jaccard(sets[i], sets[j]) >= m.text_threshold]
    if "image" in settings.kinds:
        have = [i for i in range(n) if feats.thumbs[i] is not None]
        cand_a, cand_b = [], []
        for jj, j in enumerate(have):
            for i in have[:jj]:
                if int(im.hamming(feats.hashes[i], feats.hashes[j])) > m.image_max_distance:
                    continue
                ci = np.frombuffer(feats.chroma[i], np.int8)[None]
                cj = np.frombuffer(feats.chroma[j], np.int8)[None]
                if im.chroma_residual(cj, ci)[0] <= m.image_max_chroma:
                    cand_a.append(rows[i])
                    cand_b.append(rows[j])
        by_row = {rows[i]: {"thumb": feats.thumbs[i], "colour": feats.colours[i], "hash": int(feats.hashes[i]),
                            "width": feats.sizes[i][0], "height": feats.sizes[i][1]} for i in have}
        edges["image"] = verify_images((np.array(cand_a, np.int64), np.array(cand_b, np.int64)), by_row, settings,
                                       skip_joined=False)
    return clusters(edges)


# -- the steps ------------------------------------------------------------------------------------


class NearPairsStep(Step):
    """Per bucket: candidate pairs from every slice's band keys, verified; the edges."""

    name = "near_pairs"
    what = "buckets"

    def __init__(self, keys: list[str], feats: list[str], slice_offsets: list[int], out_dir: str, buckets: int,
                 settings: NearSettings):
        self.keys, self.feats, self.offsets = keys, feats, slice_offsets
        self.out_dir, self.buckets, self.settings = out_dir, buckets, settings

    def tasks(self) -> list[int]:
        return list(range(self.buckets))

    def _load(self, fs: Any, rows: np.ndarray, columns: list[str]) -> dict[int, dict[str, Any]]:
        """Features of `rows`, from the slices' files that hold them."""
        rows = np.unique(rows)
        slice_of = np.searchsorted(np.asarray(self.offsets), rows, side="right") - 1
        out: dict[int, dict[str, Any]] = {}
        for s in np.unique(slice_of).tolist():
            t = read_rows(fs, self.feats[s], rows[slice_of == s]).select(["row", *columns])
            for rec in t.to_pylist():
                out[int(rec["row"])] = rec
        if len(out) != len(rows):
            raise AccountingError(f"{self.out_dir}: {len(rows) - len(out)} rows with band keys have no features; "
                                  "delete the folder's _steps/near_keys* and rerun")
        return out

    def run(self, ctx: TaskContext, bucket: int, shared: Any = None) -> dict[str, Any]:
        fs = ctx.rd.fs
        parts = [_read_groups(fs, p, "bucket", bucket, KEY_SCHEMA) for p in self.keys]
        keys = pa.concat_tables(parts) if parts else KEY_SCHEMA.empty_table()
        kind = keys.column("kind").to_numpy()
        edges: dict[str, list[tuple[int, int]]] = {"text": [], "image": []}
        text = keys.filter(pa.array(kind == TEXT))
        if text.num_rows:
            text = text.sort_by([("band", "ascending"), ("value", "ascending"), ("row", "ascending")])
            b, v = text.column("band").to_numpy(), text.column("value").to_numpy()
            shared_key = np.r_[(b[1:] == b[:-1]) & (v[1:] == v[:-1]), False] | np.r_[
                False, (b[1:] == b[:-1]) & (v[1:] == v[:-1])]
            rows = text.column("row").to_numpy()[shared_key]
            caps = {r: rec["caption"] or "" for r, rec in self._load(fs, rows, ["caption"]).items()} if len(rows) else {}
            edges["text"] = text_edges(text.filter(pa.array(shared_key)), caps, self.settings)
        image = keys.filter(pa.array(kind == IMAGE))
        candidates = 0
        if image.num_rows:
            edges["image"], candidates = image_edges(
                image, bucket, self.buckets, self.settings,
                lambda rows: self._load(fs, rows, ["thumb", "colour", "hash", "width", "height"]))
        rows_k = [(KINDS.index(k), a, b) for k in KINDS for a, b in edges[k]]
        t = pa.table({"kind": [k for k, _, _ in rows_k], "a": [a for _, a, _ in rows_k],
                      "b": [b for _, _, b in rows_k]}, schema=EDGE_SCHEMA)
        atomic_write_bytes(fs, f"{self.out_dir}/edges-{bucket:05d}.parquet", parquet_bytes(t))
        return {"keys": keys.num_rows, "image_candidates": candidates, "text_edges": len(edges["text"]),
                "image_edges": len(edges["image"])}


class NearClusterStep(Step):
    """One task: union-find over every bucket's edges; per slice, each dropped row with its kept row."""

    name = "near_cluster"
    what = "tasks"

    def __init__(self, edges_dir: str, buckets: int, slice_offsets: list[int], dups_dir: str,
                 kinds: tuple[str, ...] = KINDS):
        self.edges_dir, self.buckets, self.offsets, self.dups_dir = edges_dir, buckets, slice_offsets, dups_dir
        self.kinds = tuple(k for k in KINDS if k in kinds)
        """The kinds --dedup-within compares: counts are reported for these only (0 text duplicates
        said of a run that never compared captions would read as a finding)."""

    def tasks(self) -> list[int]:
        return [0]

    def run(self, ctx: TaskContext, spec: int, shared: Any = None) -> dict[str, Any]:
        fs = ctx.rd.fs
        edges: dict[str, list[tuple[int, int]]] = {k: [] for k in KINDS}
        for b in range(self.buckets):
            with fs.open(f"{self.edges_dir}/edges-{b:05d}.parquet", "rb") as f:
                t = pq.read_table(f)
            for k, a, c in zip(*(t.column(n).to_pylist() for n in ("kind", "a", "b")), strict=True):
                edges[KINDS[k]].append((a, c))
        dropped = clusters(edges)
        rows = np.array(sorted(dropped), np.int64)
        n_slices = len(self.offsets) - 1
        bounds = np.searchsorted(rows, np.asarray(self.offsets))
        for s in range(n_slices):
            part = rows[bounds[s] : bounds[s + 1]].tolist()
            t = pa.table({"row": part, "root": [dropped[r][0] for r in part], "kind": [dropped[r][1] for r in part]},
                         schema=NEAR_SCHEMA)
            atomic_write_bytes(fs, f"{self.dups_dir}/near-{s:05d}.parquet", parquet_bytes(t))
        removed = {k: sum(1 for _, kind in dropped.values() if kind == k) for k in self.kinds}
        # A cluster: a kept row with the rows dropped for it, per kind.
        found = {k: len({root for root, kind in dropped.values() if kind == k}) for k in self.kinds}
        # The report's few clusters travel in the summary (a few hundred numbers): the steps that draw
        # their thumbnails and the page need nothing else from this one.
        return {"clusters": sum(found.values()), "clusters_by_kind": found, "removed": removed,
                "edges": {k: len(v) for k, v in edges.items()}, "report": report_clusters(dropped)}


def read_near(fs: Any, path: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f)
