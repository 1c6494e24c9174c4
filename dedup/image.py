"""Image fingerprints: DCT hashes of boxes and parts for the loose search, chroma codes for a cheap
pre-check, aligned thumbnails for the precise check.

What a copy on the web goes through (issue 10; the ISC 2021 / DISC21 edit family): re-encoding,
resizing, crops of up to 10% a side, brightness, contrast, gamma and saturation changes, a mirror
image, a letterbox, a caption or logo over a tenth of the picture, a small rotation, and two of
these at once. `benchmarks/dedup.py` measures each on photographs shipped inside packages and on
generated images; the thresholds were chosen on one half of the photographs (`--photos tune`) and
are reported on the other.

Loose search (a 64-bit hash per box and part, looked up within a few bits):

- The hash is the sign pattern, against their median, of the 8x8 lowest DCT frequencies of a box,
  computed from one 64x64 grey resize by projecting onto cosines stretched over the box
  (`_axis_basis`): one resize serves every box, a box need not fall on pixel edges, and all boxes
  come from two small products over their distinct row and column intervals (`_Plan`). The DC term
  carries only mean brightness and does not set the median, so brightness, contrast, gamma and
  saturation edits leave the hash almost unchanged.
- Crops: an eval image is hashed for every box that cuts 0, 4 or 8% (`crop`) from each side (81
  boxes): a copy cropped by up to 10% a side lies within 2% a side of one of them. A shift of 1% of
  the side moves a hash by 2 to 4 bits (fine textures such as bricks most), so the coarser grid of
  0 and 7% (3.5% a side) missed a tenth of the crops of the held-out brick tiles.
- Flips: the DCT of a mirrored box is the box's DCT with the odd horizontal frequencies negated, so
  the eval boxes that cut no side, one side or all four are also indexed mirrored at no cost.
- Rotations: the eval image turned by `ROTATIONS` (+/-2 and +/-4 degrees), whole and cut by what an
  editor crops to hide the corners (`rotated_cut`); a copy turned by up to 5 degrees is within 1 of
  one of them. Fine textures and print move too far in the hash when a turn is 2 degrees off (at
  +/-3 alone, a text page and gravel were missed).
- Letterbox / pad: plain borders are trimmed (`content_box`) on both sides; a training image is
  hashed as it is and as its content box.
- Overlays: a caption strip or logo moves the whole-box hash by 8 to 16 bits, so each box is also
  hashed in four parts (its top, bottom, left and right 70%): a corner logo or a strip along one
  edge leaves at least one part nearly clean. Parts are only compared with the same part, and more
  tightly than whole boxes (a part says less about an image).

Pre-check (vectorised over every pair the search returns, before any image is touched): the 3x3
lowest DCT frequencies of the box's (or part's) chroma, R-G and (R+G)/2-B, which a brightness shift
leaves unchanged and contrast, saturation and grayscale scale by one factor. The training side must
be k times the eval side (k in [0, 2]) to within `image_max_chroma` grey levels. Unrelated images of
one shape and colour on other backgrounds pass the hash but mostly fail here (on localweb-style
images four pairs in five); copies under every edit kind of the tuning photographs stay under 3.

Precise check (`verify`), in stages, stopping at the first that fails (`Limits`, `Verdict`): both
images are cut to the boxes that matched and resampled to a common frame (mirrored and turned as
the eval variant says), then

1. structure: the correlation of 32x32 grey frames without the worst-agreeing quarter of pixels (an
   overlay); below `min_correlation` the pair is first aligned by ECC (`findTransformECC` maximises
   the correlation coefficient, which ignores brightness and contrast), with the warp held to what
   an edit can do: zoom, a turn, a shift, next to no shear (`_warp_ok`);
2. colour: chroma at 24x24, the eval image's scaled by a gain that may follow brightness (contrast,
   gamma, saturation, grayscale), what a pixel of misalignment cannot explain (`_colour_diff`):
   drawings of one shape on other tints fail here;
3. residual: grey at 48x48 after a quadratic brightness fit (gamma), beyond a pixel of misalignment
   (`_residual`): the same layout with other content fails here (generated look-alikes);
4. detail: the correlation of band-passed 48x48 thumbnails per 12x12 block, over blocks with detail
   on both sides and not covered (`_detail`): another tile of one photograph fails here;
5. displacement: the share of blocks that match 2+ pixels away from where the alignment puts them
   (`_displaced`): another view of one scene (a stereo partner, frames moments apart) moves near and
   far things differently, a copy moves everything alike.

Stages 3 to 5 need alignment to a pixel of 48; when they fail the pair is aligned again there (ECC,
then phase correlation for a residual shift) and measured once more. Photometric copies, the common
case, pass at the loose search's alignment without any ECC.

A crop between the indexed boxes of a fine periodic texture (a wall of bricks) defeats ECC from its
nearest box: it settles a column of bricks off. So a pair none of whose alignments passed, where the
closest one failed for want of alignment (not on colour, not on frames that barely correlate), is
checked once more with that alignment's box sides moved to where the band-passed thumbnails agree
best (`refine_box`); only that one alignment per pair, and only for a training image with fine
texture (elsewhere ECC aligns from 2% off).

An eval image also keeps its non-square views (`views`): img2dataset's `center_crop` cuts a 4:3
image to its centre square and `border` pads it to a square, neither of them a small crop.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

HASH_BITS = 64
GRID = 64
"""Side of the grey (and chroma) resize every hash is computed from."""
HASH_K = 8
"""DCT frequencies per axis in a hash (8 x 8 = 64 bits)."""
CHROMA_K = 3
"""DCT frequencies per axis of each chroma channel in the pre-check."""
CHROMA_DIM = 2 * CHROMA_K * CHROMA_K
THUMB = 48
"""Side of the stored grey thumbnail for the precise check."""
COLOUR = 24
"""Side of the stored colour thumbnail for the colour check."""
FRAME = 32
"""Side of the common frame both thumbnails are aligned in."""
PART = 0.7
"""Fraction of a box kept by each of its four parts."""
REGIONS = ("whole", "top", "bottom", "left", "right")
N_REGIONS = len(REGIONS)
_REGION_BOX = ((0.0, 0.0, 1.0, 1.0), (0.0, 0.0, 1.0, PART), (0.0, 1 - PART, 1.0, 1.0), (0.0, 0.0, PART, 1.0),
               (1 - PART, 0.0, 1.0, 1.0))
_MIRRORED_REGION = np.array([0, 1, 2, 4, 3])
"""A mirrored copy's left part is the eval box's right part, mirrored."""
ROTATIONS = (-4.0, -2.0, 2.0, 4.0)
"""Degrees (counter-clockwise) the eval image is also indexed turned by: a copy turned by up to 5
degrees is within 1 of one of them (or of 0)."""


def rotated_cut(angle: float) -> float:
    """What an editor crops from each side to hide the corners of a picture turned by `angle`
    degrees (half the tangent of a side), plus a pixel or two."""
    return 0.5 * float(np.tan(np.radians(abs(angle)))) + 0.005


WHOLE = (0.0, 0.0, 1.0, 1.0)
_FLIP8 = ((-1.0) ** np.arange(HASH_K)).astype(np.float32)
_FLIP3 = ((-1.0) ** np.arange(CHROMA_K)).astype(np.float32)
_CHROMA = np.array([[0.0, -1.0, 1.0], [-1.0, 0.5, 0.5]], np.float32)  # BGR -> (R-G, (R+G)/2-B)


@dataclass(slots=True)
class ImageFeatures:
    """A training image's fingerprint."""

    hashes: np.ndarray
    """uint64 (boxes, N_REGIONS): per box of `boxes`, the hash of the box and of its four parts."""
    thumb: np.ndarray
    """uint8 (THUMB, THUMB): grey thumbnail of the whole image, for the precise check."""
    sha256: str
    colour: np.ndarray | None = None
    """uint8 (COLOUR, COLOUR, 3): BGR thumbnail of the whole image, for the colour check."""
    boxes: np.ndarray | None = None
    """float32 (boxes, 4): x0, y0, x1, y1 as fractions of the image: the whole image, then its content
    box when plain borders were trimmed."""
    chroma: np.ndarray | None = None
    """int8 (boxes, N_REGIONS, CHROMA_DIM): low-frequency chroma of each box and part (the pre-check),
    in steps of CHROMA_STEP grey levels."""
    size: tuple[int, int] = (1, 1)
    """Width and height of the decoded image: the thumbnails are square, an alignment is judged in
    the image's own proportions."""


@dataclass(slots=True)
class ViewFeatures:
    """An eval image view's fingerprint: every crop box, plain and mirrored, and turned a little."""

    hashes: np.ndarray
    """uint64 (variants, N_REGIONS): per variant, the hash of its box and of its four parts, as a
    training copy would see them (a mirrored variant's left part is the box's right part, mirrored)."""
    variants: np.ndarray
    """float32 (variants, 6): x0, y0, x1, y1 of the box as fractions of the view, 1.0 if mirrored,
    and the angle in degrees the view was turned by before the box was cut."""
    thumb: np.ndarray
    """uint8 (THUMB, THUMB) grey thumbnail of the whole view."""
    colour: np.ndarray
    """uint8 (COLOUR, COLOUR, 3) BGR thumbnail of the whole view."""
    sha256: str
    chroma: np.ndarray | None = None
    """int8 (variants, N_REGIONS, CHROMA_DIM), as `ImageFeatures.chroma`."""
    parts: np.ndarray | None = None
    """bool (variants,): whether the variant's parts are indexed too (None: all are). Crop boxes that
    cut `crop` / 2 off two sides or more are indexed whole only: indexing their parts too found no
    more copies (crops, overlays, turns and two edits on both halves of the photographs, three draws
    each: 1,313 of 1,332 against 1,314 without) and made the lookup 1.3x slower."""


def decode(data: bytes) -> np.ndarray | None:
    """BGR uint8 image, or None if OpenCV cannot read the bytes."""
    if not data:
        return None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.size == 0 or min(img.shape[:2]) < 4:
        return None
    return img


# --- hashes and chroma of boxes ------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _axis_basis(a: float, b: float) -> np.ndarray:
    """(HASH_K, GRID) weights: the lowest DCT-II cosines stretched over [a, b] (fractions of the side),
    each grid cell weighted by how much of it the interval covers, normalised to sum 1."""
    edges = np.arange(GRID + 1, dtype=np.float64) / GRID
    cover = np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], a), 0, None) * GRID
    s = np.clip(((np.arange(GRID) + 0.5) / GRID - a) / max(b - a, 1e-6), 0.0, 1.0)
    basis = cover[None, :] * np.cos(np.pi * np.arange(HASH_K)[:, None] * s[None, :])
    return (basis / max(cover.sum(), 1e-6)).astype(np.float32)


def _sub(box: tuple[float, ...], part: tuple[float, ...]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box[:4]
    w, h = x1 - x0, y1 - y0
    return (x0 + part[0] * w, y0 + part[1] * h, x0 + part[2] * w, y0 + part[3] * h)


@dataclass(frozen=True)
class _Group:
    """Row intervals that meet the same column intervals, and the regions they serve."""

    ys: np.ndarray
    """int64: the row intervals."""
    cols_t: np.ndarray
    """float32 (GRID, nx * HASH_K): basis of each column interval they meet, transposed."""
    cols3_t: np.ndarray
    """The same for CHROMA_K frequencies."""
    ly: np.ndarray
    lx: np.ndarray
    """int64: each region's row and column interval, counted within the group."""


@dataclass(frozen=True)
class _Plan:
    """How to get the DCT of many boxes at once: every box's rows and columns are among a few distinct
    intervals, so grey -> (rows basis) @ grey @ (columns basis)^T gives every (row interval, column
    interval) block in two small products, and each box picks its block. The second product is only
    taken for the blocks some region uses: a part's row interval (top, bottom) meets only its box's
    column interval, so of the crop boxes' 27 x 27 blocks 405 are needed, not 729."""

    rows: np.ndarray
    """float32 (ny, HASH_K, GRID): basis of each distinct row interval."""
    rows3: np.ndarray
    """The same for CHROMA_K frequencies."""
    groups: tuple[_Group, ...]
    order: np.ndarray | None
    """int64 (boxes * N_REGIONS,): where each region's block is among the groups' blocks, in turn
    (None: one group, in order)."""


def _blocks_of(blocks: list[np.ndarray]) -> np.ndarray:
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def _in_order(order: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    return x if order is None else x[order]


_GROUP_FROM = 2
"""Plans for more boxes than this take the second product per group of row intervals."""


def _plan(boxes: tuple[tuple[float, ...], ...]) -> _Plan:
    # Plain Python for the bookkeeping: a plan for one or two boxes is made per image (the training
    # side, a trimmed box), and numpy's per-call overhead would cost more than the products.
    subs = [_sub(b, r) for b in boxes for r in _REGION_BOX]
    ykeys = [(round(s[1], 6), round(s[3], 6)) for s in subs]
    xkeys = [(round(s[0], 6), round(s[2], 6)) for s in subs]
    ys, xs = sorted(set(ykeys)), sorted(set(xkeys))
    ypos, xpos = {y: i for i, y in enumerate(ys)}, {x: i for i, x in enumerate(xs)}
    yi, xi = [ypos[k] for k in ykeys], [xpos[k] for k in xkeys]
    rows = np.stack([_axis_basis(*y) for y in ys])
    cols = np.stack([_axis_basis(*x) for x in xs])

    def t(c: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(c.transpose(2, 0, 1).reshape(GRID, -1))

    if len(boxes) <= _GROUP_FROM:  # grouping saves products only for many boxes; for a few it costs calls
        whole = _Group(np.arange(len(ys)), t(cols), t(cols[:, :CHROMA_K]), np.array(yi), np.array(xi))
        return _Plan(np.ascontiguousarray(rows), np.ascontiguousarray(rows[:, :CHROMA_K]), (whole,), None)
    meets: dict[int, set[int]] = {}
    for y, x in zip(yi, xi, strict=True):
        meets.setdefault(y, set()).add(x)
    by_columns: dict[tuple[int, ...], list[int]] = {}
    for y in range(len(ys)):
        by_columns.setdefault(tuple(sorted(meets[y])), []).append(y)
    groups, served = [], []
    for gx, gy in by_columns.items():
        ly, lx = {y: i for i, y in enumerate(gy)}, {x: i for i, x in enumerate(gx)}
        regions = [r for r, y in enumerate(yi) if y in ly]
        served += regions
        groups.append(_Group(np.array(gy), t(cols[list(gx)]), t(cols[list(gx), :CHROMA_K]),
                             np.array([ly[yi[r]] for r in regions]), np.array([lx[xi[r]] for r in regions])))
    return _Plan(np.ascontiguousarray(rows), np.ascontiguousarray(rows[:, :CHROMA_K]), tuple(groups),
                 np.argsort(np.array(served), kind="stable"))


_cached_plan = lru_cache(maxsize=64)(_plan)


def dct_bits(coeffs: np.ndarray) -> np.ndarray:
    """uint64 (n,): each coefficient 'above the median of the AC terms' (the DC term only carries brightness)."""
    k = (coeffs.shape[1] - 1) // 2  # 63 AC terms: the median is the 32nd smallest
    # A whole sort, not np.partition: numpy sorts short float32 rows with SIMD networks and selects
    # row by row, so sorting was 2x faster (6,480 rows: 0.69 against 1.31 ms); the same value either way.
    bits = coeffs > np.sort(coeffs[:, 1:], axis=1)[:, k : k + 1]
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64)[:, 0]


def _box_codes(grey: np.ndarray, chroma: np.ndarray | None, boxes: list[tuple[float, ...]], cache: bool = False,
               mirror: np.ndarray | None = None, mirrored: bool = True) -> tuple[np.ndarray, ...]:
    """Hashes and chroma codes of every region of every box, plain and mirrored:
    (hashes (n, R), chroma (n, R, CHROMA_DIM), mirrored hashes, mirrored chroma); `mirror`: the
    boxes to mirror (default all), which the mirrored results then hold in that order. Codes
    nobody reads are not computed: the chroma ones (None) without `chroma`, the mirrored ones (None)
    unless `mirrored`.

    `grey` (GRID, GRID) and `chroma` (GRID, GRID, 2), or stacks of m of them ((m, GRID, GRID) and
    (m, GRID, GRID, 2)): then every result gains a leading axis of m. A stack costs one call's
    overhead, which for small grids is most of the cost.

    The products are batches of small matrices on purpose: one large product would let OpenBLAS
    start its threads, which on a busy machine (or in a Ray worker with one CPU) costs 100x more
    than it saves.
    """
    plan = (_cached_plan if cache else _plan)(tuple(tuple(b[:4]) for b in boxes))
    single = grey.ndim == 2
    g = grey[None] if single else grey
    m = len(g)
    a = plan.rows[None] @ g[:, None]  # (m, ny, HASH_K, GRID)
    # Blocks stay in the groups' order; the (8x smaller) bits and codes are put in the boxes' order.
    coeffs = _blocks_of([(a[:, q.ys] @ q.cols_t).reshape(m, len(q.ys), HASH_K, -1, HASH_K)[:, q.ly, :, q.lx, :]
                               for q in plan.groups])  # (n, m, 8, 8): advanced indices first
    order = plan.order
    n, nb = len(coeffs), len(boxes)
    h = _in_order(order, dct_bits(coeffs.reshape(n * m, -1)).reshape(n, m)).T.reshape(m, nb, N_REGIONS)
    c = cc = None
    if chroma is not None:
        chm = chroma[None] if single else chroma
        ch = np.ascontiguousarray(chm.transpose(0, 3, 1, 2))[:, :, None]  # (m, 2, 1, GRID, GRID)
        a3 = plan.rows3[None, None] @ ch  # (m, 2, ny, CHROMA_K, GRID)
        cc = _blocks_of([(a3[:, :, q.ys] @ q.cols3_t).reshape(m, 2, len(q.ys), CHROMA_K, -1, CHROMA_K)
                               [:, :, q.ly, :, q.lx, :] for q in plan.groups])  # (n, m, 2, 3, 3)
        c = _in_order(order, _quantise(cc)).transpose(1, 0, 2, 3, 4).reshape(m, nb, N_REGIONS, CHROMA_DIM)
    hm = c_m = None
    if mirrored:
        rows = (np.arange(n) if mirror is None else
                (np.asarray(mirror)[:, None] * N_REGIONS + np.arange(N_REGIONS)).ravel())
        if mirror is not None:
            nb = len(mirror)
        at = rows if order is None else order[rows]  # where the rows' blocks are
        hm = dct_bits((coeffs[at] * _FLIP8).reshape(len(at) * m, -1)).reshape(len(at), m).T.reshape(m, nb, N_REGIONS)
        hm = hm[:, :, _MIRRORED_REGION]
        if cc is not None:
            c_m = _quantise(cc[at] * _FLIP3).transpose(1, 0, 2, 3, 4).reshape(m, nb, N_REGIONS, CHROMA_DIM)
            c_m = c_m[:, :, _MIRRORED_REGION]
    out = (h, c, hm, c_m)
    return tuple(None if x is None else x[0] for x in out) if single else out


CHROMA_STEP = 2.0
"""Grey levels per unit of a stored chroma code (int8: +/-254 levels; a code is a mean or a cosine
weighted mean of chroma, so the extremes of R-G are near the ends of the range)."""


def _quantise(codes: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(codes / CHROMA_STEP), -127, 127).astype(np.int8)


def grids(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(grey (GRID, GRID), chroma (GRID, GRID, 2)) float32 resizes of a BGR image."""
    small = cv2.resize(img, (GRID, GRID), interpolation=cv2.INTER_AREA)
    if small.ndim == 2:
        small = cv2.cvtColor(small, cv2.COLOR_GRAY2BGR)
    grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY).astype(np.float32)
    return grey, (small.reshape(-1, 3).astype(np.float32) @ _CHROMA.T).reshape(GRID, GRID, 2)


def content_box(grey: np.ndarray, tol: float = 6.0, max_cut: float = 0.3) -> tuple[float, float, float, float]:
    """The box inside plain borders (a letterbox, pillarbox or frame of one colour), as fractions.

    A border row (column) is one whose cells all lie within `tol` grey levels of the outermost row's
    median; at most `max_cut` of a side is cut, and a cut of one cell is ignored (JPEG edges). Past a
    border one more cell goes: the border rarely ends on a cell edge, and a sliver of a high-contrast
    border costs the precise check more than a sliver of picture does.

    One grid at a time for the training side: `content_boxes` gives the same for a stack, but costs
    15 us more for one grid (63 against 48 us: 2% of a training image's hashing).
    """
    n = grey.shape[0]
    limit = int(n * max_cut)

    def run(lines: np.ndarray) -> int:
        ref = float(np.partition(lines[0], n // 2)[n // 2])  # the outermost line's median
        flat = np.abs(lines[:limit] - ref).max(axis=1) <= tol
        k = int(np.argmin(flat)) if not flat.all() else limit
        return k + 1 if k >= 2 else 0

    top, bottom, left, right = run(grey), run(grey[::-1]), run(grey.T), run(grey.T[::-1])
    return (left / n, top / n, 1 - right / n, 1 - bottom / n)


def content_boxes(greys: np.ndarray, tol: float = 6.0, max_cut: float = 0.3) -> list[tuple[float, float, float, float]]:
    """`content_box` of each of a stack of grids (m, GRID, GRID), in a few array operations for all (the
    eval side's groups; one call per grid cost as much as hashing its turned copies)."""
    n = greys.shape[1]
    limit = int(n * max_cut)

    def run(lines: np.ndarray) -> np.ndarray:  # (m, n, n), the outermost line first
        ref = np.partition(lines[:, 0], n // 2, axis=1)[:, n // 2]  # each outermost line's median
        flat = np.abs(lines[:, :limit] - ref[:, None, None]).max(axis=2) <= tol
        k = np.where(flat.all(axis=1), limit, np.argmin(flat, axis=1))
        return np.where(k >= 2, k + 1, 0)

    t = greys.transpose(0, 2, 1)
    top, bottom, left, right = (run(x).tolist() for x in (greys, greys[:, ::-1], t, t[:, ::-1]))
    return [(lf / n, tp / n, 1 - r / n, 1 - b / n) for tp, b, lf, r in zip(top, bottom, left, right, strict=True)]


def crop_boxes(crop: float) -> list[tuple[float, float, float, float]]:
    """Every box cutting 0, `crop` / 2 or `crop` from each side (81 boxes; the whole image alone when
    crop is 0)."""
    cuts = (0.0, crop / 2, crop) if crop > 0 else (0.0,)
    return [(left, top, 1 - right, 1 - bottom) for left in cuts for top in cuts for right in cuts for bottom in cuts]


def _thumbs(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    colour = img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    grey = cv2.cvtColor(colour, cv2.COLOR_BGR2GRAY)
    return (cv2.resize(grey, (THUMB, THUMB), interpolation=cv2.INTER_AREA),
            cv2.resize(colour, (COLOUR, COLOUR), interpolation=cv2.INTER_AREA))


def image_features(img: np.ndarray, sha256: str) -> ImageFeatures:
    grey, chroma = grids(img)
    boxes = [WHOLE]
    trimmed = content_box(grey)
    if trimmed != WHOLE:
        boxes.append(trimmed)
    h, c, _, _ = _box_codes(grey, chroma, boxes, mirrored=False)
    thumb, colour = _thumbs(img)
    return ImageFeatures(hashes=h, thumb=thumb, sha256=sha256, colour=colour, boxes=np.array(boxes, np.float32),
                         chroma=c, size=(img.shape[1], img.shape[0]))


def features(data: bytes, crop: float | None = None) -> ImageFeatures | None:
    """Fingerprint of encoded image bytes (a training sample); None when they do not decode.

    `crop` is not used on this side (crop boxes are enumerated on the eval side, `view_features`);
    it is accepted so that callers written for the earlier crop-variant hash keep working.
    """
    img = decode(data)
    if img is None:
        return None
    return image_features(img, hashlib.sha256(data).hexdigest())


def _rotation(angle: float, side: float) -> np.ndarray:
    """2x3 matrix turning a side x side image by `angle` degrees about its centre (cv2 convention)."""
    c = side / 2 - 0.5
    return cv2.getRotationMatrix2D((c, c), angle, 1.0)


@dataclass(frozen=True)
class _EvalLayout:
    """What every eval view shares for one `crop`: its boxes and variant rows, which rows are also
    mirrored, the turns and the corners they uncover. Built once (`_eval_layout`), not per image."""

    boxes: list[tuple[float, float, float, float]]
    flip: np.ndarray
    """Boxes also indexed mirrored: those that cut no side, one side or all four (a flipped copy
    cropped on two or three sides is rarer, and lies within reach of one of these)."""
    crop_variants: np.ndarray
    crop_parts: np.ndarray
    """bool: which crop variants have their parts indexed (`ViewFeatures.parts`)."""
    turns: list[np.ndarray]
    corners: np.ndarray
    """float32 (turns, GRID, GRID): 1 where a turn uncovers the grid (a fill shows there)."""
    white_corners: np.ndarray
    """255 * corners."""
    turned_boxes: list[tuple[float, float, float, float]]
    turned_cut: np.ndarray
    """Per turn, which of `turned_boxes` is its cut box."""
    turned_variants: np.ndarray
    variants: np.ndarray
    """float32: every row of a view without a trimmed box (crop variants, then turned ones)."""
    parts: np.ndarray


PARTS_FINE_SIDES = 1
"""Crop boxes cutting `crop` / 2 off more sides than this are indexed whole only (`ViewFeatures.parts`)."""


@lru_cache(maxsize=8)
def _eval_layout(crop: float) -> _EvalLayout:
    boxes = crop_boxes(crop)
    flip = np.array([i for i, b in enumerate(boxes) if sum(v > 0 for v in (b[0], b[1], 1 - b[2], 1 - b[3]))
                     in (0, 1, 4)])
    crop_variants = np.array([(*b, 0.0, 0.0) for b in boxes] + [(*boxes[i], 1.0, 0.0) for i in flip], np.float32)
    coarse = np.array([sum(abs(v - crop / 2) < 1e-9 for v in (b[0], b[1], 1 - b[2], 1 - b[3])) <= PARTS_FINE_SIDES
                       for b in boxes])
    crop_parts = np.concatenate([coarse, coarse[flip]])
    turns = [_rotation(a, GRID) for a in ROTATIONS]
    ones = np.ones((GRID, GRID), np.float32)
    corners = np.stack([1 - cv2.warpAffine(ones, m, (GRID, GRID), flags=cv2.INTER_LINEAR,
                                           borderMode=cv2.BORDER_CONSTANT) for m in turns])
    cuts = sorted({rotated_cut(a) for a in ROTATIONS})
    turned_boxes = [WHOLE] + [(c, c, 1 - c, 1 - c) for c in cuts]
    cut_of = np.array([1 + cuts.index(rotated_cut(a)) for a in ROTATIONS])
    variants = [v for a, j in zip(ROTATIONS, cut_of, strict=True)
                for v in ((*WHOLE, 0.0, a), (*turned_boxes[j], 0.0, a), (*WHOLE, 0.0, a))]
    turned_variants = np.array(variants, np.float32)
    every = np.concatenate([crop_variants, turned_variants])
    every_part = np.concatenate([crop_parts, np.ones(len(turned_variants), bool)])
    for a in (every, every_part):  # shared by every view's ViewFeatures
        a.flags.writeable = False
    return _EvalLayout(boxes, flip, crop_variants, crop_parts, turns, corners, 255.0 * corners, turned_boxes, cut_of,
                       turned_variants, every, every_part)


def _reduced(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All of an eval view that its features are made from: (grey grid, chroma grid, thumb, colour)."""
    return (*grids(img), *_thumbs(img))


def _reduced_features(reduced: list[tuple[np.ndarray, ...]], crop: float, sha256: list[str]) -> list[ViewFeatures]:
    """`ViewFeatures` of several eval views (`_reduced`) at once: the hashing calls take the stack of
    their grids (`_box_codes`), whose per-call overhead is most of an eval view's cost; the codes are
    those of one view at a time, except in flat regions, whose AC coefficients are float32 noise tied
    at the median: summed in another order, some of those bits flip (noise either way)."""
    lay = _eval_layout(crop)
    nv, k = len(reduced), len(ROTATIONS)
    if nv == 0:
        return []
    grey, chroma = np.stack([r[0] for r in reduced]), np.stack([r[1] for r in reduced])
    h, c, hm, cm = _box_codes(grey, chroma, lay.boxes, cache=True, mirror=lay.flip)
    trimmed = content_boxes(grey)
    own = [i for i, t in enumerate(trimmed) if t != WHOLE]
    if own:  # each its own box: one call for all (`_own_box_codes`), not one plan per view
        h1, c1, hm1, cm1 = _own_box_codes(grey[own], chroma[own], [trimmed[i] for i in own])
    # The corners a turn uncovers are filled black (PIL, OpenCV) or white (editors' background),
    # both grey and without chroma; the whole box keeps them, the cut box lies inside them.
    # Replicated edges there instead moved the hashes of turned copies of fine textures and print
    # past the search distance. Grey and chroma turn together; white corners are added, not warped
    # again; every view, turn and box in one call per fill.
    both = [np.dstack([grey[i], chroma[i]]) for i in range(nv)]
    turned = np.stack([cv2.warpAffine(both[i], m, (GRID, GRID), flags=cv2.INTER_LINEAR,
                                      borderMode=cv2.BORDER_CONSTANT) for i in range(nv) for m in lay.turns])
    # Per turn three rows: the whole and the cut box with black corners, the whole box with white
    # ones; white corners change no chroma, and nothing turned is mirrored.
    grey_t = np.ascontiguousarray(turned[..., 0])  # a strided stack would miss BLAS (other rounding)
    # A turn's whole box and its own cut box: one call per cut, for the turns that share it (the other
    # turns' cut boxes were a third of the work, never kept).
    h_b = np.empty((nv * k, 2, N_REGIONS), np.uint64)
    c_b = np.empty((nv * k, 2, N_REGIONS, CHROMA_DIM), np.int8)
    for j in np.unique(lay.turned_cut):
        sel = (np.arange(nv)[:, None] * k + np.flatnonzero(lay.turned_cut == j)[None]).ravel()
        h_b[sel], c_b[sel], _, _ = _box_codes(grey_t[sel], turned[sel, ..., 1:], [WHOLE, lay.turned_boxes[j]],
                                              cache=True, mirrored=False)
    white = (grey_t.reshape(nv, k, GRID, GRID) + lay.white_corners).reshape(nv * k, GRID, GRID)
    h_w, _, _, _ = _box_codes(white, None, [WHOLE], cache=True, mirrored=False)
    h_b, c_b = h_b.reshape(nv, k, 2, N_REGIONS), c_b.reshape(nv, k, 2, N_REGIONS, CHROMA_DIM)
    h_t = np.concatenate([h_b, h_w.reshape(nv, k, 1, N_REGIONS)], axis=2)
    c_t = np.concatenate([c_b, c_b[:, :, :1]], axis=2)
    # Every view's rows in one array (crop boxes, mirrored ones, turns); a view with its own trimmed
    # box gets that box's two rows before the turns.
    hashes = np.concatenate([h, hm, h_t.reshape(nv, -1, N_REGIONS)], axis=1)
    codes = np.concatenate([c, cm, c_t.reshape(nv, -1, N_REGIONS, CHROMA_DIM)], axis=1)
    n_crop = hashes.shape[1] - 3 * k
    out = [ViewFeatures(hashes[i], lay.variants, r[2], r[3], sha, codes[i], lay.parts)
           for i, (r, sha) in enumerate(zip(reduced, sha256, strict=True))]
    for j, i in enumerate(own):
        x0, y0, x1, y1 = trimmed[i]
        v = out[i]
        v.hashes = np.concatenate([v.hashes[:n_crop], [h1[j], hm1[j]], v.hashes[n_crop:]])
        v.chroma = np.concatenate([v.chroma[:n_crop], [c1[j], cm1[j]], v.chroma[n_crop:]])
        v.variants = np.concatenate([lay.variants[:n_crop], [(x0, y0, x1, y1, 0.0, 0.0), (x0, y0, x1, y1, 1.0, 0.0)],
                                     lay.variants[n_crop:]]).astype(np.float32)
        v.parts = np.concatenate([lay.parts[:n_crop], [True, True], lay.parts[n_crop:]])
    return out


def _own_box_codes(grey: np.ndarray, chroma: np.ndarray, boxes: list[tuple[float, ...]]) -> tuple[np.ndarray, ...]:
    """`_box_codes` of m views, each with a box of its own ((m, GRID, GRID), (m, GRID, GRID, 2), m
    boxes): (hashes (m, R), chroma (m, R, CHROMA_DIM), mirrored hashes, mirrored chroma). The same
    sums as one view at a time (its rows basis, then its columns basis), in one batched product (in
    flat regions the float32 noise differs, as in `_reduced_features`)."""
    subs = [[_sub(b, r) for r in _REGION_BOX] for b in boxes]
    rows = np.stack([[_axis_basis(round(s[1], 6), round(s[3], 6)) for s in ss] for ss in subs])  # (m, R, 8, GRID)
    cols_t = np.stack([[_axis_basis(round(s[0], 6), round(s[2], 6)).T for s in ss] for ss in subs])
    m = len(boxes)
    coeffs = (rows @ grey[:, None]) @ cols_t  # (m, R, 8, 8)
    ch = np.ascontiguousarray(chroma.transpose(0, 3, 1, 2))[:, :, None]  # (m, 2, 1, GRID, GRID)
    cc = (rows[:, None, :, :CHROMA_K] @ ch) @ cols_t[:, None, :, :, :CHROMA_K]  # (m, 2, R, 3, 3)
    cc = cc.transpose(0, 2, 1, 3, 4)
    h = dct_bits(coeffs.reshape(m * N_REGIONS, -1)).reshape(m, N_REGIONS)
    hm = dct_bits((coeffs * _FLIP8).reshape(m * N_REGIONS, -1)).reshape(m, N_REGIONS)[:, _MIRRORED_REGION]
    c = _quantise(cc).reshape(m, N_REGIONS, CHROMA_DIM)
    cm = _quantise(cc * _FLIP3).reshape(m, N_REGIONS, CHROMA_DIM)[:, _MIRRORED_REGION]
    return h, c, hm, cm


def views(img: np.ndarray) -> list[np.ndarray]:
    """The image as a training copy may show it: itself, and for a non-square image its
    centre square and its square padded with white (img2dataset's center_crop and border modes)."""
    h, w = img.shape[:2]
    if abs(h - w) <= 0.02 * max(h, w):  # square enough that the resizer leaves it be
        return [img]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    big = max(h, w)
    top, left = (big - h) // 2, (big - w) // 2
    padded = cv2.copyMakeBorder(img, top, big - h - top, left, big - w - left, cv2.BORDER_CONSTANT,
                                value=(255,) * img.shape[2] if img.ndim == 3 else 255)
    return [img, img[y0 : y0 + side, x0 : x0 + side], padded]


def view_features(data: bytes, crop: float = 0.08) -> tuple[str, list[ViewFeatures]]:
    """(sha256 of the bytes, fingerprints of each of `views`) of an eval image; no views when it does not decode.

    The digest is of the raw bytes either way: a byte-identical copy matches even
    when OpenCV cannot read the file.
    """
    return view_features_many([data], crop)[0]


def view_features_many(datas: list[bytes], crop: float = 0.08) -> list[tuple[str, list[ViewFeatures]]]:
    """`view_features` of several eval images, their views hashed together (`_reduced_features`):
    2 to 3x fewer hashing calls per image than one at a time, the same codes (up to float32
    rounding, should a BLAS sum the other matrix shapes in another order; bit for bit where measured, except in
    flat regions, whose AC terms are float32 noise tied at the median: there some bits flip either way)."""
    shas = [hashlib.sha256(d).hexdigest() for d in datas]
    # Each image is reduced to its views' grids and thumbnails as soon as it is decoded, so a group
    # holds one decoded image at a time, as one image per call did (16 decoded 12 MP photographs and
    # their padded squares were 1.3 GB).
    per = [[_reduced(v) for v in views(img)] if (img := decode(d)) is not None else [] for d in datas]
    flat = _reduced_features([r for rs in per for r in rs], crop, [s for s, rs in zip(shas, per, strict=True) for _ in rs])
    out, at = [], 0
    for sha, vs in zip(shas, per, strict=True):
        out.append((sha, flat[at : at + len(vs)]))
        at += len(vs)
    return out


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of uint64 arrays (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def chroma_residual(q: np.ndarray, e: np.ndarray, max_gain: float = 2.0) -> np.ndarray:
    """Per row: RMS of q - k e with the best k in [0, max_gain] (q, e: (n, CHROMA_DIM) chroma codes).

    Contrast, saturation and grayscale scale chroma by one factor; a brightness shift leaves it be;
    another background tint does neither.
    """
    q, e = q.astype(np.float32) * CHROMA_STEP, e.astype(np.float32) * CHROMA_STEP
    k = np.clip((q * e).sum(axis=-1) / np.maximum((e * e).sum(axis=-1), 1e-6), 0.0, max_gain)
    return np.sqrt(((q - k[..., None] * e) ** 2).mean(axis=-1))


# --- precise check -----------------------------------------------------------------------------------


def _frame_map(variant: np.ndarray, side: int, out: int) -> np.ndarray:
    """2x3 matrix taking pixel (i, j) of an out x out frame to the point of a side x side thumbnail
    that the variant (box, mirrored, turned by angle before the box was cut) puts there."""
    x0, y0, x1, y1 = (float(v) for v in variant[:4])
    mirrored = len(variant) > 4 and variant[4] > 0.5
    angle = float(variant[5]) if len(variant) > 5 else 0.0
    # frame pixel -> fraction of the (turned) view: u = x0 + (j + 0.5) / out * (x1 - x0), mirrored from x1.
    sx, sy = (x1 - x0) / out, (y1 - y0) / out
    if mirrored:
        a = np.array([[-sx, 0.0, x1 - 0.5 * sx], [0.0, sy, y0 + 0.5 * sy], [0, 0, 1]], np.float64)
    else:
        a = np.array([[sx, 0.0, x0 + 0.5 * sx], [0.0, sy, y0 + 0.5 * sy], [0, 0, 1]], np.float64)
    if angle:
        # The turned view at fraction p shows the view at R^-1 p (cv2 rotation about the centre).
        r = np.vstack([cv2.getRotationMatrix2D((0.5, 0.5), angle, 1.0), [0, 0, 1]])
        a = np.linalg.inv(r) @ a
    # fraction -> thumbnail pixel.
    to_px = np.array([[side, 0, -0.5], [0, side, -0.5], [0, 0, 1]], np.float64)
    return (to_px @ a)[:2].astype(np.float32)


def _resample(img: np.ndarray, m: np.ndarray, out: int) -> np.ndarray:
    return cv2.warpAffine(img, m, (out, out), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """2x3 affine a after b (x -> a(b(x)))."""
    out = a[:, :2] @ b
    out[:, 2] += a[:, 2]
    return out.astype(np.float32)


def _scale(src: int, dst: int) -> np.ndarray:
    """2x3 matrix taking pixel coordinates of a dst-side image to the same point of a src-side one."""
    k = src / dst
    return np.array([[k, 0, 0.5 * (k - 1)], [0, k, 0.5 * (k - 1)]], np.float32)


@dataclass(frozen=True)
class Limits:
    """What the precise check requires of a copy (dedup.matcher.MatchConfig holds the settings)."""

    min_correlation: float = 0.96
    max_colour: float = 6.0
    max_residual: float = 0.12
    min_detail: float = 0.5
    max_displaced: float = 0.15
    floor: float = 0.7
    """Below this correlation as the loose search aligned the pair, aligning is not tried."""


@dataclass(slots=True)
class Verdict:
    """The precise check's measurements; a value it did not reach is nan."""

    correlation: float
    """Correlation of the aligned 32x32 grey frames, the worst-agreeing quarter of pixels left out
    (an overlay covers up to a tenth of the picture, and blurring at 32 px spreads it)."""
    colour_diff: float = float("nan")
    """Chroma the eval image (scaled by a factor that may vary with brightness: contrast, gamma,
    saturation) leaves unexplained, beyond what a pixel of misalignment explains: 65th percentile,
    grey levels."""
    residual: float = float("nan")
    """Grey difference beyond a pixel of misalignment after a quadratic brightness fit (gamma): 80th
    percentile over the 48x48 thumbnail, in units of the training image's contrast."""
    detail: float = float("nan")
    """Correlation of the band-passed 48x48 thumbnails per 12x12 block, 30th percentile over the blocks
    with detail: what tells a copy from another tile of one photograph."""
    displaced: float = float("nan")
    """Fraction of the blocks with detail whose content sits 2+ pixels away from where the alignment
    puts it: another view of the same scene (a stereo partner, a frame moments apart) moves near and
    far things differently, a copy moves everything alike."""
    aligned: bool = False
    """Whether the pair had to be aligned beyond what the loose search said (rotation, crop, pad)."""
    failed: str | None = None
    """The first measurement outside `Limits`, or None for a copy."""

    @property
    def ok(self) -> bool:
        return self.failed is None


def _prefilter(thumb: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(thumb.astype(np.float32), (0, 0), 0.6)


_ONES = np.ones((FRAME, FRAME), np.float32)
_HANN = cv2.createHanningWindow((THUMB, THUMB), cv2.CV_32F)
_K3 = np.ones((3, 3), np.uint8)
_BLOCKS = 4
_SEARCH = 3
"""Pixels (of THUMB) a block is searched around its aligned place for `Verdict.displaced`."""


def _region_mask(region: int, n: int) -> np.ndarray | None:
    """bool (n * n,): the pixels of an n x n frame inside `REGIONS[region]`; None for the whole frame."""
    if region == 0:
        return None
    x0, y0, x1, y1 = _REGION_BOX[region]
    c = (np.arange(n) + 0.5) / n
    return ((c[None, :] >= x0) & (c[None, :] <= x1) & (c[:, None] >= y0) & (c[:, None] <= y1)).ravel()


def _trimmed_corr(p: np.ndarray, q: np.ndarray, drop: float, init: np.ndarray | None = None) -> float:
    """Correlation of p and q (1-d) without the `drop` fraction of pixels that disagree most.

    The disagreement is the residual of a linear fit made on the pixels kept so far, starting from
    `init` (the part of the frame the loose search matched on): a black caption box over a dull photo
    would otherwise bend the first fit to itself.
    """
    n_keep = len(p) - int(len(p) * drop)
    pk, qk = (p, q) if init is None else (p[init], q[init])
    for _ in range(2):
        pm, qm = pk.mean(), qk.mean()
        dp = pk - pm
        pp = float(dp @ dp)
        if pp <= 1e-6:
            return 0.0
        r = np.abs(q - qm - (float(dp @ (qk - qm)) / pp) * (p - pm))
        keep = r <= np.partition(r, n_keep - 1)[n_keep - 1]
        pk, qk = p[keep], q[keep]
    pk, qk = pk - pk.mean(), qk - qk.mean()
    den = float(np.sqrt(float(pk @ pk) * float(qk @ qk)))
    return float(pk @ qk) / den if den > 1e-6 else 0.0


def _kth(x: np.ndarray, q: float) -> float:
    """The q-quantile of x (lower value; np.quantile interpolates, and costs ten times more)."""
    k = min(len(x) - 1, int(q * len(x)))
    return float(np.partition(x, k)[k])


def _chroma_planes(img: np.ndarray) -> np.ndarray:
    """complex64 (n, n): R-G + i((R+G)/2-B) of a BGR float32 image; a brightness shift leaves it be,
    contrast, saturation and grayscale scale it by a real factor."""
    b, g, r = cv2.split(img)
    out = np.empty(b.shape, np.complex64)
    out.real = r - g
    out.imag = 0.5 * (r + g) - b
    return out


def _colour_diff(qc: np.ndarray, ec: np.ndarray, drop: float = 0.2, quantile: float = 0.65) -> float:
    """`Verdict.colour_diff` of two aligned COLOUR x COLOUR BGR thumbnails (uint8)."""
    qz = _chroma_planes(cv2.GaussianBlur(qc.astype(np.float32), (0, 0), 0.8)).ravel()
    ef = cv2.GaussianBlur(ec.astype(np.float32), (0, 0), 0.8)
    ez = _chroma_planes(ef).ravel()
    y = cv2.cvtColor(ef, cv2.COLOR_BGR2GRAY).ravel() / 255.0
    # A clipped pixel (a brightness edit pushes channels to 0 or 255) has lost chroma: not evidence.
    hi, lo = qc.max(axis=2).ravel(), qc.min(axis=2).ravel()
    ok = (hi < 250) & (lo > 5)
    if ok.mean() < 0.5:
        ok[:] = True
    # training chroma = (a + b * eval brightness) * eval chroma: least squares over the pixels kept,
    # twice, the second time without the worst `drop` (an overlay).
    w = (ez.real * ez.real + ez.imag * ez.imag).astype(np.float64)
    z = (ez.real * qz.real + ez.imag * qz.imag).astype(np.float64)
    yw, yz, yyw = y * w, y * z, y * y * w
    weight = ok.astype(np.float64)
    n_ok = int(ok.sum())
    y_lo, y_hi = _kth(y, 0.05), _kth(y, 0.95)
    for _ in range(2):
        m00, m01, m11 = w @ weight + 1e-6, yw @ weight, yyw @ weight + 1e-6
        r0, r1 = z @ weight, yz @ weight
        det = m00 * m11 - m01 * m01
        a, b = (m11 * r0 - m01 * r1) / det, (m00 * r1 - m01 * r0) / det
        ends = sorted((a + b * y_lo, a + b * y_hi))
        if ends[0] <= 0 or ends[1] > 2.5 * ends[0]:
            # No edit makes the gain change sign or vary more than 2.5x from dark to light (gamma
            # 0.7 to 1.4 stays within that); such a fit paints one tint onto another: one gain.
            a, b = r0 / m00, 0.0
        gain = np.clip(a + b * y, 0.0, 2.5).astype(np.float32)
        fitted = gain * ez
        res = np.abs(qz - fitted)
        res_ok = np.where(ok, res, np.inf)
        k = max(0, int(n_ok * (1 - drop)) - 1)
        weight = (res_ok <= np.partition(res_ok, k)[k]).astype(np.float64)
    # What a pixel of misalignment cannot explain: distance to the range of the fitted eval chroma in
    # each pixel's 3x3 neighbourhood.
    n = qc.shape[0]
    planes = np.stack([fitted.real.reshape(n, n), fitted.imag.reshape(n, n)], axis=2)
    top, bottom = cv2.dilate(planes, _K3).reshape(-1, 2), cv2.erode(planes, _K3).reshape(-1, 2)
    qq = np.stack([qz.real, qz.imag], axis=1)
    beyond = np.maximum(0.0, np.maximum(qq - top, bottom - qq))
    dist = np.sqrt((beyond * beyond).sum(axis=1))
    return _kth(dist[ok], quantile)


def _residual(qd: np.ndarray, ed: np.ndarray, init: np.ndarray | None, quantile: float = 0.8
              ) -> tuple[float, np.ndarray]:
    """(`Verdict.residual`, the per-pixel difference beyond a pixel of misalignment in units of the
    training image's contrast) of two aligned THUMB x THUMB grey thumbnails (float32)."""
    qd = cv2.GaussianBlur(qd, (0, 0), 0.5)
    ed = cv2.GaussianBlur(ed, (0, 0), 0.5)
    x, y = ed.ravel().astype(np.float64) / 255.0, qd.ravel().astype(np.float64)
    x2 = x * x
    powers = np.stack([np.ones_like(x), x, x2, x2 * x, x2 * x2])  # x^0 .. x^4
    targets = np.stack([y, x * y, x2 * y])
    weight = np.ones_like(x) if init is None else init.astype(np.float64)
    k = int(len(x) * 0.85) - 1
    x_lo, x_hi = _kth(x, 0.05), _kth(x, 0.95)
    for _ in range(2):
        m, t = powers @ weight, targets @ weight
        c = np.linalg.solve(np.array([m[0:3], m[1:4], m[2:5]]) + 1e-6 * np.eye(3), t)
        slopes = sorted((c[1] + 2 * c[2] * x_lo, c[1] + 2 * c[2] * x_hi))
        if slopes[0] <= 0.25 * slopes[1]:
            # A tone edit (brightness, contrast, gamma 0.7 to 1.4) is increasing, and its slope varies
            # less than 4x over the picture's range; a curve that folds maps one picture's levels
            # onto another's (a blob of the eval image painted over): fit a straight line instead.
            m2 = np.array([[m[0], m[1]], [m[1], m[2]]]) + 1e-6 * np.eye(2)
            c = np.append(np.linalg.solve(m2, t[:2]), 0.0)
        fit = c[0] + c[1] * x + c[2] * x2
        r = np.abs(y - fit)
        weight = (r <= np.partition(r, k)[k]).astype(np.float64)
    fe = fit.reshape(ed.shape).astype(np.float32)
    beyond = np.maximum(0.0, np.maximum(qd - cv2.dilate(fe, _K3), cv2.erode(fe, _K3) - qd))
    beyond /= max(float(qd.std()), 4.0)
    return _kth(beyond.ravel(), quantile), beyond


def _bandpass(x: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(x, (0, 0), 0.8) - cv2.GaussianBlur(x, (0, 0), 3.0)


def _blocks(x: np.ndarray) -> np.ndarray:
    """(_BLOCKS**2, n, n): the _BLOCKS x _BLOCKS square blocks of a square image, row by row."""
    n = x.shape[0] // _BLOCKS
    grid = x[: n * _BLOCKS, : n * _BLOCKS].reshape(_BLOCKS, n, _BLOCKS, n)
    return grid.transpose(0, 2, 1, 3).reshape(_BLOCKS**2, n, n)


def _detail(qb: np.ndarray, eb: np.ndarray, hidden: np.ndarray, low: float = 0.3) -> tuple[float, np.ndarray]:
    """(`Verdict.detail`, each block's correlation, nan where a side lacks detail or the block is
    `hidden`) of two band-passed aligned thumbnails."""
    q, e = _blocks(qb).reshape(_BLOCKS**2, -1), _blocks(eb).reshape(_BLOCKS**2, -1)
    q = q - q.mean(axis=1, keepdims=True)
    e = e - e.mean(axis=1, keepdims=True)
    qn, en = np.sqrt((q * q).sum(axis=1)), np.sqrt((e * e).sum(axis=1))
    # Blocks with detail on both sides: a block one side lacks (under a caption box, a black corner
    # of a turned copy) says nothing about whether the rest is the same picture; nor does a block
    # the residual shows covered (the text of a caption over the sun of a drawing).
    textured = (np.minimum(qn, en) / np.sqrt(q.shape[1]) >= 0.7) & ~hidden
    c = np.where(textured, (q * e).sum(axis=1) / np.maximum(qn * en, 1e-6), np.nan)
    if textured.sum() < 4:
        return 1.0, c  # too little detail to judge (flat drawings): the other checks decide
    return _kth(c[textured], low), c


_MOVED_MIN, _MOVED_GAIN = 0.7, 0.2


def _displaced(qb: np.ndarray, eb: np.ndarray, block_corr: np.ndarray) -> float:
    """`Verdict.displaced` of two band-passed aligned thumbnails, given `_detail`'s block correlations.

    A block is displaced when it matches (>= 0.7) 2+ pixels away and clearly better (by 0.2) than where
    it is; so a block that already matches at 0.8 cannot be, and is not searched.
    """
    n, r = qb.shape[0] // _BLOCKS, _SEARCH
    textured = ~np.isnan(block_corr)
    padded = None
    moved = 0
    for k in np.flatnonzero(textured & (block_corr <= 1.0 - _MOVED_GAIN)):
        if padded is None:
            padded = cv2.copyMakeBorder(eb, r, r, r, r, cv2.BORDER_REPLICATE)
        by, bx = divmod(int(k), _BLOCKS)
        tmpl = qb[by * n : (by + 1) * n, bx * n : (bx + 1) * n]
        scores = cv2.matchTemplate(padded[by * n : (by + 1) * n + 2 * r, bx * n : (bx + 1) * n + 2 * r], tmpl,
                                   cv2.TM_CCOEFF_NORMED)
        _, best, _, (dx, dy) = cv2.minMaxLoc(scores)
        if best >= _MOVED_MIN and max(abs(dx - r), abs(dy - r)) >= 2 and best - float(scores[r, r]) >= _MOVED_GAIN:
            moved += 1
    return moved / max(int(textured.sum()), 1)


def _ecc(template: np.ndarray, image: np.ndarray, aspect: float, iterations: int = 20) -> np.ndarray | None:
    """The affine warp that aligns `image` to `template` (image(w(x)) ~ template(x)), if ECC converges
    on one an edit can explain (`aspect`: width / height of what the square frames show)."""
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, 1e-3)
    try:
        _, w = cv2.findTransformECC(template, image, np.eye(2, 3, dtype=np.float32), cv2.MOTION_AFFINE, criteria,
                                    None, 1)
    except cv2.error:
        return None  # did not converge
    return w if _warp_ok(w, template.shape[0], aspect) else None


def _warp_ok(m: np.ndarray, side: int = FRAME, aspect: float = 1.0) -> bool:
    """An alignment an edit can explain: A = rotation(theta) @ [[sx, k], [0, sy]] with a zoom within 20%
    per axis, the two axes zoomed alike to within 20% (a crop between indexed boxes: each side off by
    up to 3.5%, the two axes in opposite directions), a turn within 6
    degrees, next to no shear k (no edit shears; another view of a scene does, near things moving
    more than far ones), and a shift within a tenth of the side. Judged in the picture's proportions:
    in a square frame of a 4:3 picture a turn looks sheared."""
    d = np.diag([aspect, 1.0])
    a = d @ m[:, :2].astype(np.float64) @ np.linalg.inv(d)
    theta = np.arctan2(a[1, 0], a[0, 0])
    c, s = np.cos(theta), np.sin(theta)
    u = np.array([[c, s], [-s, c]]) @ a  # rotation removed: upper triangular
    sx, k, sy = u[0, 0], u[0, 1], u[1, 1]
    centre = np.full(2, side / 2 - 0.5)
    return bool(0.8 <= sx <= 1.2 and 0.8 <= sy <= 1.2 and abs(sx / sy - 1) <= 0.2 and abs(k) <= 0.03
                and abs(theta) <= np.radians(6)
                and np.abs(m[:, :2] @ centre + m[:, 2] - centre).max() <= side * 0.1)


def _fine(qd: np.ndarray, qb: np.ndarray, ed: np.ndarray, mask: np.ndarray | None, limits: Limits,
          v: Verdict) -> Verdict:
    """Residual, detail and displacement of aligned THUMB x THUMB thumbnails, into `v`, stopping at the
    first outside `limits`."""
    v.residual, beyond = _residual(qd, ed, mask)
    if v.residual > limits.max_residual:
        v.failed = "residual"
        return v
    eb = _bandpass(ed)
    # A block a quarter of which differs by half the picture's contrast is covered (an overlay).
    hidden = (_blocks(beyond) > 0.5).mean(axis=(1, 2)) >= 0.25
    v.detail, block_corr = _detail(qb, eb, hidden)
    if v.detail < limits.min_detail:
        v.failed = "detail"
        return v
    v.displaced = _displaced(qb, eb, block_corr)
    if v.displaced > limits.max_displaced:
        v.failed = "displaced"
    return v


def verify(q: ImageFeatures, q_box: np.ndarray, e_thumb: np.ndarray, e_colour: np.ndarray,
           e_variant: np.ndarray, limits: Limits = Limits(), region: int = 0, drop: float = 0.25) -> Verdict:
    """Is the training image (its `q_box`) a copy of the eval view's variant (box, mirrored, angle) the
    loose search paired it with? Align, then measure structure, colour, residual, detail and local
    displacement in turn, stopping at the first outside `limits` (module docstring). `region`: the part
    (index into REGIONS) the hashes matched on, where the brightness fits start.

    Aligning (ECC) is only tried where the loose search's alignment falls short: a pair below
    `min_correlation` is aligned at 32 px; a pair whose detail disagrees is aligned again at 48 px.
    """
    q_box, e_variant = np.asarray(q_box), np.asarray(e_variant)
    q_map, e_map = _frame_map(q_box, THUMB, FRAME), _frame_map(e_variant, THUMB, FRAME)
    # Smoothed before resampling to 32 px as well as after: a fine texture (bricks, gravel) would
    # otherwise alias into a pattern that shifts with every sub-pixel of alignment.
    qf = cv2.GaussianBlur(_resample(_prefilter(q.thumb), q_map, FRAME), (0, 0), 0.7)
    ef = cv2.GaussianBlur(_resample(_prefilter(e_thumb), e_map, FRAME), (0, 0), 0.7)
    if qf.std() < 2.0 or ef.std() < 2.0:
        # Nothing to align on a flat image: call two flat images the same when their colours agree.
        qc = q.colour.reshape(-1, 3).astype(np.float32).mean(0)
        ec = e_colour.reshape(-1, 3).astype(np.float32).mean(0)
        same = qf.std() < 2.0 and ef.std() < 2.0
        diff = float(np.abs(qc - ec).max())
        failed = None if same and diff <= limits.max_colour else ("correlation" if not same else "colour")
        return Verdict(float(same), diff, failed=failed)
    mask = _region_mask(region, FRAME)
    aspect = float((q_box[2] - q_box[0]) * q.size[0]) / max(float((q_box[3] - q_box[1]) * q.size[1]), 1e-6)
    warp = np.eye(2, 3, dtype=np.float32)
    corr = _trimmed_corr(ef.ravel(), qf.ravel(), drop, mask)
    aligned = False
    if limits.floor <= corr < limits.min_correlation:
        w = _ecc(qf, ef, aspect)
        if w is not None:
            moved = cv2.warpAffine(ef, w, (FRAME, FRAME), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                   borderMode=cv2.BORDER_REPLICATE)
            valid = cv2.warpAffine(_ONES, w, (FRAME, FRAME), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                   borderMode=cv2.BORDER_CONSTANT).ravel() > 0.99
            c1 = _trimmed_corr(moved.ravel()[valid], qf.ravel()[valid], drop, None if mask is None else mask[valid])
            if c1 > corr and valid.mean() >= 0.8:
                corr, warp, aligned = c1, w, True
    if corr < limits.min_correlation:
        return Verdict(corr, aligned=aligned, failed="correlation")
    # Colour, at COLOUR px in the same alignment.
    n = q.colour.shape[0]
    qc = _resample(q.colour, _compose(_frame_map(q_box, n, FRAME), _scale(FRAME, n)), n)
    ec = _resample(e_colour, _compose(_compose(_frame_map(e_variant, n, FRAME), warp), _scale(FRAME, n)), n)
    colour = _colour_diff(qc, ec)
    if colour > limits.max_colour:
        return Verdict(corr, colour, aligned=aligned, failed="colour")
    # Residual, detail and displacement at THUMB px, which need alignment to a pixel of 48: when the
    # alignment so far falls short there, refine it once and measure again.
    qd = _resample(q.thumb, _frame_map(q_box, THUMB, THUMB), THUMB).astype(np.float32)
    qb = _bandpass(qd)
    e_to_thumb = _compose(_compose(e_map, warp), _scale(FRAME, THUMB))
    ed = _resample(e_thumb, e_to_thumb, THUMB).astype(np.float32)
    thumb_mask = _region_mask(region, THUMB)
    v = _fine(qd, qb, ed, thumb_mask, limits, Verdict(corr, colour, aligned=aligned))
    if v.ok:
        return v
    w = _ecc(cv2.GaussianBlur(qd, (0, 0), 0.7), cv2.GaussianBlur(ed, (0, 0), 0.7), aspect, iterations=15)
    if w is not None:
        e_to_thumb = _compose(e_to_thumb, w)
        ed = _resample(e_thumb, e_to_thumb, THUMB).astype(np.float32)
        v = _fine(qd, qb, ed, thumb_mask, limits, Verdict(corr, colour, aligned=True))
        if v.ok:
            return v
    # ECC on a drawing's few sharp edges can settle half a pixel off, which band-passed detail does
    # not forgive: the shift phase correlation of the band-passed thumbnails finds, once. Not for a
    # pair whose blocks match, but in different places: re-shifting only trades which ones.
    if v.failed != "detail":
        return v
    (dx, dy), _ = cv2.phaseCorrelate(qb, _bandpass(ed), _HANN)
    if max(abs(dx), abs(dy)) > 2.0:
        return v
    ed = _resample(e_thumb, _compose(e_to_thumb, np.array([[1, 0, dx], [0, 1, dy]], np.float32)), THUMB)
    return _fine(qd, qb, ed.astype(np.float32), thumb_mask, limits, Verdict(corr, colour, aligned=True))


def _box_score(qb: np.ndarray, e_thumb: np.ndarray, variant: np.ndarray) -> float:
    """Correlation of the band-passed THUMB px frames: the training image's (`qb`, already band-passed)
    and the eval thumbnail's as `variant` cuts it."""
    eb = _bandpass(_resample(e_thumb, _frame_map(variant, THUMB, THUMB), THUMB).astype(np.float32)).ravel()
    q = qb.ravel()
    den = float(np.sqrt(float(q @ q) * float(eb @ eb)))
    return float(q @ eb) / den if den > 1e-6 else 0.0


def refine_box(q: ImageFeatures, q_box: np.ndarray, e_thumb: np.ndarray, e_variant: np.ndarray,
               steps: tuple[float, ...] = (0.01, 0.005), reach: float = 0.05, max_cut: float = 0.105,
               min_fine: float = 0.42) -> np.ndarray | None:
    """The eval variant with each side of its box moved (by `steps`, each side at most `reach` from where
    it was) to where the band-passed thumbnails agree best: coordinate ascent, one side at a time.

    Crop boxes are indexed every 4% of a side (`crop_boxes`), so a copy cut between them is up to 2% a
    side off its nearest box. Fine periodic textures (a wall of bricks) then defeat the precise check's
    alignment: from 2% off, ECC settles a column of bricks away. A box is 4 numbers, each to be found
    within a few percent, so a search over them needs no more than one ECC's worth of resampling. No side
    moves to cut more than `max_cut` (the crops the index is for: up to 10% a side): on unrelated images
    the search otherwise slides inwards to wherever the two agree.

    None for a training image without fine texture: band-passed detail under `min_fine` of its grey
    spread (bricks, gravel, grass: 0.46 to 0.56; drawn shapes and most photographs less). ECC aligns
    those from 2% off, and on smooth drawings of one layout the extra freedom let a look-alike through.
    """
    base = np.asarray(e_variant, np.float32)
    qd = _resample(q.thumb, _frame_map(np.asarray(q_box), THUMB, THUMB), THUMB).astype(np.float32)
    qb = _bandpass(qd)
    if float(qb.std()) < min_fine * max(float(qd.std()), 1.0):
        return None
    cut = np.array([base[0], base[1], 1 - base[2], 1 - base[3]])
    limit = np.maximum(cut, max_cut)
    best = base.copy()
    score = _box_score(qb, e_thumb, best)
    for step in steps:
        moved = True
        while moved:
            moved = False
            for side in range(4):
                for sign in (-1.0, 1.0):
                    trial = best.copy()
                    trial[side] += sign * step
                    trial_cut = trial[side] if side < 2 else 1 - trial[side]
                    if (abs(trial[side] - base[side]) > reach + 1e-6 or not 0.0 <= trial_cut <= limit[side] + 1e-6
                            or trial[2] - trial[0] < 0.5 or trial[3] - trial[1] < 0.5):
                        continue
                    s = _box_score(qb, e_thumb, trial)
                    if s > score + 1e-4:
                        best, score, moved = trial, s, True
    return best
