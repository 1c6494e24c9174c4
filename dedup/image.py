"""Image fingerprints: DCT hashes of many views for the loose search, aligned thumbnails for the check.

What a copy on the web goes through (issue 10; the ISC 2021 / DISC21 edit family): re-encoding,
resizing, crops of up to 10% a side, brightness, contrast, gamma and saturation changes, a mirror
image, a letterbox, a caption or logo over a tenth of the picture, a small rotation, and two of
these at once. `benchmarks/dedup.py` measures each on photographs shipped inside packages and on
generated images; the thresholds here were chosen on one half of the photographs and reported on
the other.

Loose search (a 64-bit hash per view, looked up within `image_max_distance` bits):

- The hash is the sign pattern, against their median, of the 8x8 lowest DCT frequencies of a box of
  the image, computed from a 64x64 grey resize by projecting onto cosines stretched over the box
  (`_dct_basis`): one resize serves every box, and a box need not fall on pixel edges. The DC term
  carries only mean brightness and does not set the median, so brightness, contrast, gamma and
  saturation edits leave the hash almost unchanged (median distance 0 on the tuning photos).
- Crops: an eval image is hashed for every box that cuts 0 or `crop` (7%) from each side (16 boxes):
  a copy cropped by up to 10% a side lies within 3.5% a side of one of them.
- Flips: the DCT of a mirrored box is the same box's DCT with the odd horizontal frequencies
  negated, so mirrored views cost no resize: every eval box is also indexed mirrored.
- Letterbox / pad: plain borders are trimmed (`content_box`) on both sides; a training image is
  hashed as it is and as its content box.
- Overlays: a caption strip or logo moves the whole-image hash by 8 to 16 bits, so each box is also
  hashed in four parts (its top, bottom, left and right 70%); a corner logo or a strip along one
  edge leaves at least one part clean. Parts are only compared with the same part.

Precise check (`verify`): both images are cut to the boxes that matched and resampled to a common
32x32 frame, aligned by ECC (an affine warp, so rotation, shift and a residual zoom are absorbed;
OpenCV's `findTransformECC` maximises the correlation coefficient, which ignores brightness and
contrast), then compared on

- structure: the correlation of the aligned grey thumbnails after dropping the tenth of the pixels
  that disagree most (an overlay covers at most that much), and
- colour: the chroma of the aligned 16x16 colour thumbnails (R-G and (R+G)/2-B, which a brightness
  shift of all channels leaves unchanged) fitted as k times the eval image's chroma, k >= 0
  (contrast and saturation scale chroma; grayscale is k = 0); what the fit cannot explain, in
  grey levels, must stay under `image_max_colour_diff`. Two images of one shape on backgrounds
  of different tints correlate at 0.96+ in grey but fail here.

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
"""Side of the grey resize every hash is computed from."""
THUMB = 48
"""Side of the stored grey thumbnail for the precise check."""
COLOUR = 16
"""Side of the stored colour thumbnail for the colour check."""
FRAME = 32
"""Side of the common frame both thumbnails are aligned in."""
PART = 0.7
"""Fraction of a box kept by each of its four parts."""
REGIONS = ("whole", "top", "bottom", "left", "right")
N_REGIONS = len(REGIONS)
_REGION_BOX = {"whole": (0.0, 0.0, 1.0, 1.0), "top": (0.0, 0.0, 1.0, PART), "bottom": (0.0, 1 - PART, 1.0, 1.0),
               "left": (0.0, 0.0, PART, 1.0), "right": (1 - PART, 0.0, 1.0, 1.0)}
_MIRROR = {"whole": "whole", "top": "top", "bottom": "bottom", "left": "right", "right": "left"}
WHOLE = (0.0, 0.0, 1.0, 1.0)
# Negating the odd horizontal frequencies of a box's DCT gives the DCT of the box mirrored.
_FLIP_SIGN = np.tile((-1.0) ** np.arange(8), 8).astype(np.float32)
N_VARIANTS = N_REGIONS
"""Hashes per box (whole and four parts); kept for callers of the earlier crop-variant hash."""


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


@dataclass(slots=True)
class ViewFeatures:
    """An eval image view's fingerprint: every crop box, plain and mirrored."""

    hashes: np.ndarray
    """uint64 (variants, N_REGIONS): per variant, the hash of its box and of its four parts, as a
    training copy would see them (a mirrored variant's left part is the box's right part, mirrored)."""
    variants: np.ndarray
    """float32 (variants, 5): x0, y0, x1, y1 of the box as fractions of the view, and 1.0 if mirrored."""
    thumb: np.ndarray
    """uint8 (THUMB, THUMB) grey thumbnail of the whole view."""
    colour: np.ndarray
    """uint8 (COLOUR, COLOUR, 3) BGR thumbnail of the whole view."""
    sha256: str


def decode(data: bytes) -> np.ndarray | None:
    """BGR uint8 image, or None if OpenCV cannot read the bytes."""
    if not data:
        return None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.size == 0 or min(img.shape[:2]) < 4:
        return None
    return img


@lru_cache(maxsize=4096)
def _axis_basis(a: float, b: float) -> np.ndarray:
    """(8, GRID) weights: the 8 lowest DCT-II cosines stretched over [a, b] (fractions of the side),
    each grid cell weighted by how much of it the interval covers, normalised to sum 1."""
    edges = np.arange(GRID + 1, dtype=np.float64) / GRID
    cover = np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], a), 0, None) * GRID
    s = np.clip(((np.arange(GRID) + 0.5) / GRID - a) / max(b - a, 1e-6), 0.0, 1.0)
    basis = cover[None, :] * np.cos(np.pi * np.arange(8)[:, None] * s[None, :])
    return (basis / max(cover.sum(), 1e-6)).astype(np.float32)


def _dct_basis(boxes: tuple[tuple[float, float, float, float], ...]) -> tuple[np.ndarray, np.ndarray]:
    return (np.stack([_axis_basis(round(b[1], 6), round(b[3], 6)) for b in boxes]),
            np.stack([_axis_basis(round(b[0], 6), round(b[2], 6)) for b in boxes]))


def box_dct(grey: np.ndarray, boxes: tuple[tuple[float, float, float, float], ...]) -> np.ndarray:
    """float32 (len(boxes), 64): 8x8 low-frequency DCT of each box of a GRIDxGRID grey image."""
    ay, ax = _dct_basis(boxes)
    return np.matmul(np.matmul(ay, grey), ax.transpose(0, 2, 1)).reshape(len(boxes), 64)


def dct_bits(coeffs: np.ndarray) -> np.ndarray:
    """uint64 (n,): each coefficient 'above the median of the AC terms' (the DC term only carries brightness)."""
    bits = coeffs > np.median(coeffs[:, 1:], axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64)[:, 0]


def _sub(box: tuple[float, ...], part: tuple[float, ...]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box[:4]
    w, h = x1 - x0, y1 - y0
    return (x0 + part[0] * w, y0 + part[1] * h, x0 + part[2] * w, y0 + part[3] * h)


def grey_grid(img: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.ndim == 3 else img
    return cv2.resize(grey, (GRID, GRID), interpolation=cv2.INTER_AREA).astype(np.float32)


def content_box(grey: np.ndarray, tol: float = 6.0, max_cut: float = 0.3) -> tuple[float, float, float, float]:
    """The box inside plain borders (a letterbox, pillarbox or frame of one colour), as fractions.

    A border row (column) is one whose cells all lie within `tol` grey levels of the outermost row's
    median; at most `max_cut` of a side is cut, and a cut of one cell is ignored (JPEG edges).
    """
    n = grey.shape[0]
    limit = int(n * max_cut)

    def run(lines: np.ndarray) -> int:
        ref = float(np.median(lines[0]))
        flat = np.abs(lines[:limit] - ref).max(axis=1) <= tol
        k = int(np.argmin(flat)) if not flat.all() else limit
        return k if k >= 2 else 0

    top, bottom, left, right = run(grey), run(grey[::-1]), run(grey.T), run(grey.T[::-1])
    return (left / n, top / n, 1 - right / n, 1 - bottom / n)


def _region_hashes(grey: np.ndarray, boxes: list[tuple[float, ...]]) -> np.ndarray:
    """uint64 (len(boxes), N_REGIONS), boxes given as (x0, y0, x1, y1[, mirrored])."""
    subs = {}
    for b in boxes:
        for r in REGIONS:
            key = _sub(b, _REGION_BOX[_MIRROR[r]] if len(b) > 4 and b[4] else _REGION_BOX[r])
            subs.setdefault(tuple(round(v, 6) for v in key), len(subs))
    coeffs = box_dct(grey, tuple(subs))
    out = np.empty((len(boxes), N_REGIONS), np.uint64)
    rows, signs = [], []
    for b in boxes:
        mirrored = len(b) > 4 and bool(b[4])
        for r in REGIONS:
            key = _sub(b, _REGION_BOX[_MIRROR[r]] if mirrored else _REGION_BOX[r])
            rows.append(subs[tuple(round(v, 6) for v in key)])
            signs.append(mirrored)
    c = coeffs[rows]
    c[np.array(signs)] *= _FLIP_SIGN
    out[:] = dct_bits(c).reshape(len(boxes), N_REGIONS)
    return out


def crop_boxes(crop: float) -> list[tuple[float, float, float, float]]:
    """Every box cutting 0 or `crop` from each side (16 boxes; the whole image alone when crop is 0)."""
    cuts = (0.0, crop) if crop > 0 else (0.0,)
    return [(left, top, 1 - right, 1 - bottom) for left in cuts for top in cuts for right in cuts for bottom in cuts]


def _thumbs(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.ndim == 3 else img
    colour = img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return (cv2.resize(grey, (THUMB, THUMB), interpolation=cv2.INTER_AREA),
            cv2.resize(colour, (COLOUR, COLOUR), interpolation=cv2.INTER_AREA))


def image_features(img: np.ndarray, sha256: str) -> ImageFeatures:
    grey = grey_grid(img)
    boxes = [WHOLE]
    trimmed = content_box(grey)
    if trimmed != WHOLE:
        boxes.append(trimmed)
    thumb, colour = _thumbs(img)
    return ImageFeatures(hashes=_region_hashes(grey, boxes), thumb=thumb, sha256=sha256, colour=colour,
                         boxes=np.array(boxes, np.float32))


def features(data: bytes, crop: float | None = None) -> ImageFeatures | None:
    """Fingerprint of encoded image bytes (a training sample); None when they do not decode.

    `crop` is not used on this side (crop boxes are enumerated on the eval side, `view_features`);
    it is accepted so that callers written for the earlier crop-variant hash keep working.
    """
    img = decode(data)
    if img is None:
        return None
    return image_features(img, hashlib.sha256(data).hexdigest())


def eval_view_features(img: np.ndarray, crop: float, sha256: str) -> ViewFeatures:
    grey = grey_grid(img)
    boxes = crop_boxes(crop)
    trimmed = content_box(grey)
    if trimmed != WHOLE:
        boxes.append(trimmed)
    variants = [(*b, 0.0) for b in boxes] + [(*b, 1.0) for b in boxes]
    thumb, colour = _thumbs(img)
    return ViewFeatures(_region_hashes(grey, variants), np.array(variants, np.float32), thumb, colour, sha256)


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


def view_features(data: bytes, crop: float = 0.07) -> tuple[str, list[ViewFeatures]]:
    """(sha256 of the bytes, fingerprints of each of `views`) of an eval image; no views when it does not decode.

    The digest is of the raw bytes either way: a byte-identical copy matches even
    when OpenCV cannot read the file.
    """
    sha = hashlib.sha256(data).hexdigest()
    img = decode(data)
    return sha, [] if img is None else [eval_view_features(v, crop, sha) for v in views(img)]


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of uint64 arrays (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


# --- precise check -----------------------------------------------------------------------------------


def _box_map(box: np.ndarray, side: int, out: int, mirrored: bool = False) -> np.ndarray:
    """2x3 matrix taking pixel (i, j) of an out x out frame to the point of a side x side thumbnail
    where the box (fractions; mirrored: right to left) puts it."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    sx, sy = (x1 - x0) * side / out, (y1 - y0) * side / out
    if mirrored:
        return np.array([[-sx, 0.0, x1 * side - 0.5 - 0.5 * sx], [0.0, sy, y0 * side - 0.5 + 0.5 * sy]],
                        np.float32)
    return np.array([[sx, 0.0, x0 * side - 0.5 + 0.5 * sx], [0.0, sy, y0 * side - 0.5 + 0.5 * sy]], np.float32)


def _resample(img: np.ndarray, m: np.ndarray, out: int) -> np.ndarray:
    return cv2.warpAffine(img, m, (out, out), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """2x3 affine a after b (x -> a(b(x)))."""
    out = a[:, :2] @ b
    out[:, 2] += a[:, 2]
    return out.astype(np.float32)


@dataclass(slots=True)
class Verdict:
    correlation: float
    """Correlation of the aligned grey thumbnails, the worst-agreeing pixels (an overlay) left out."""
    colour_diff: float
    """Chroma the best k * eval chroma (k >= 0) leaves unexplained, RMS in grey levels."""
    overlap: float
    """Fraction of the training image's frame the aligned eval box covers."""
    aligned: bool
    """Whether the pair was aligned further than the loose search had it (rotation, crop, pad)."""
    gain: float = 0.0
    """How much the alignment raised the correlation over the loose search's alignment."""
    detail: float = 1.0
    """Correlation of the aligned thumbnails' fine detail (THUMB px, band-passed), worst pixels left out:
    what tells a copy from a near twin whose coarse layout agrees (a stereo partner, a mirrored tile)."""


_ECC_CRITERIA = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 25, 1e-3)
_CHROMA = np.array([[0.0, -1.0, 1.0], [-1.0, 0.5, 0.5]], np.float32)  # BGR -> (R-G, (R+G)/2-B)
_TO_FRAME = np.array([[FRAME / COLOUR, 0, 0.5 * (FRAME / COLOUR - 1)], [0, FRAME / COLOUR, 0.5 * (FRAME / COLOUR - 1)]],
                     np.float32)
_TO_FRAME_T = np.array([[FRAME / THUMB, 0, 0.5 * (FRAME / THUMB - 1)], [0, FRAME / THUMB, 0.5 * (FRAME / THUMB - 1)]],
                       np.float32)
_ONES = np.ones((FRAME, FRAME), np.float32)


def _trimmed_corr(p: np.ndarray, q: np.ndarray, drop: float) -> float:
    """Correlation of p and q (1-d) without the `drop` fraction of pixels that disagree most.

    The disagreement is the residual of a linear fit made on the pixels kept by a first fit: a
    black caption box over a dull photo would otherwise bend the one fit to itself.
    """
    keep: slice | np.ndarray = slice(None)
    n_keep = len(p) - int(len(p) * drop)
    for _ in range(2):
        pk, qk = p[keep], q[keep]
        pm, qm = pk.mean(), qk.mean()
        pp = float((pk - pm) @ (pk - pm))
        if pp <= 1e-6:
            return 0.0
        a = float((pk - pm) @ (qk - qm)) / pp
        r = np.abs(q - qm - a * (p - pm))
        keep = np.argpartition(r, n_keep - 1)[:n_keep] if n_keep < len(r) else slice(None)
    pk, qk = p[keep], q[keep]
    pk, qk = pk - pk.mean(), qk - qk.mean()
    den = float(np.sqrt(float(pk @ pk) * float(qk @ qk)))
    return float(pk @ qk) / den if den > 1e-6 else 0.0


def _block_detail(qd: np.ndarray, ed: np.ndarray, blocks: int = 4, low: float = 0.3) -> float:
    """The `low` quantile of per-block detail correlations: each block counts alike, however faint its
    detail (the vessels of a retina next to the bright rim of the photo), and a third of the blocks
    may disagree (an overlay)."""
    n = qd.shape[0] // blocks
    qb = qd[: n * blocks, : n * blocks].reshape(blocks, n, blocks, n).transpose(0, 2, 1, 3).reshape(blocks * blocks, -1)
    eb = ed[: n * blocks, : n * blocks].reshape(blocks, n, blocks, n).transpose(0, 2, 1, 3).reshape(blocks * blocks, -1)
    qb = qb - qb.mean(axis=1, keepdims=True)
    eb = eb - eb.mean(axis=1, keepdims=True)
    qn, en = np.sqrt((qb * qb).sum(axis=1)), np.sqrt((eb * eb).sum(axis=1))
    textured = qn / np.sqrt(n * n) >= 0.7
    if textured.sum() < 4:
        return 1.0  # too little detail to judge (flat drawings): structure and colour decide
    c = (qb * eb).sum(axis=1)[textured] / np.maximum(qn[textured] * en[textured], 1e-6)
    return float(np.quantile(c, low))


def _warp_ok(m: np.ndarray) -> bool:
    """An alignment an edit can explain: zoom within 15%, little shear, no mirror, shift within a tenth."""
    a = m[:, :2].astype(np.float64)
    sv = np.linalg.svd(a, compute_uv=False)
    centre = np.full(2, FRAME / 2 - 0.5)
    return bool(0.85 <= sv[1] <= sv[0] <= 1.15 and np.linalg.det(a) > 0 and sv[0] / sv[1] <= 1.12
                and np.abs(a @ centre + m[:, 2] - centre).max() <= FRAME * 0.1)


def verify(q: ImageFeatures, q_box: np.ndarray, e_thumb: np.ndarray, e_colour: np.ndarray,
           e_variant: np.ndarray, drop: float = 0.15, settled: float = 0.985) -> Verdict:
    """Compare a training image (its `q_box`) with an eval view's variant (box, mirrored) that the
    loose search paired it with: align, then measure structure and colour (module docstring).

    A pair that already correlates at `settled` as the loose search aligned it is not aligned
    further (most copies: the photometric edits, re-encoding, resizing).
    """
    mirrored = bool(e_variant[4] > 0.5)
    qf = cv2.GaussianBlur(_resample(q.thumb, _box_map(q_box, THUMB, FRAME), FRAME).astype(np.float32), (0, 0), 0.7)
    ef = cv2.GaussianBlur(_resample(e_thumb, _box_map(e_variant, THUMB, FRAME, mirrored), FRAME).astype(np.float32),
                          (0, 0), 0.7)
    if qf.std() < 2.0 or ef.std() < 2.0:
        # Nothing to align on a flat image: call two flat images the same when their colours agree.
        qc = q.colour.reshape(-1, 3).astype(np.float32).mean(0)
        ec = e_colour.reshape(-1, 3).astype(np.float32).mean(0)
        same = qf.std() < 2.0 and ef.std() < 2.0
        return Verdict(float(same), float(np.abs(qc - ec).max()), 1.0, False, 0.0, 1.0)
    warp = np.eye(2, 3, dtype=np.float32)
    c0 = corr = _trimmed_corr(ef.ravel(), qf.ravel(), drop)
    overlap, moved = 1.0, False
    if corr < settled:
        try:
            _, w = cv2.findTransformECC(qf, ef, warp.copy(), cv2.MOTION_AFFINE, _ECC_CRITERIA, None, 1)
        except cv2.error:
            w = None  # did not converge: keep the loose search's alignment
        if w is not None and _warp_ok(w):
            aligned = cv2.warpAffine(ef, w, (FRAME, FRAME), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                     borderMode=cv2.BORDER_REPLICATE)
            valid = cv2.warpAffine(_ONES, w, (FRAME, FRAME), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                   borderMode=cv2.BORDER_CONSTANT) > 0.99
            c1 = _trimmed_corr(aligned[valid], qf[valid], drop)
            if c1 > corr:
                corr, warp, overlap, moved = c1, w, float(valid.mean()), True
    # Detail: the same alignment at THUMB px (frame point x = (d + 0.5) * FRAME / THUMB - 0.5).
    qd = _resample(q.thumb, _box_map(q_box, THUMB, THUMB), THUMB).astype(np.float32)
    ed = _resample(e_thumb, _compose(_compose(_box_map(e_variant, THUMB, FRAME, mirrored), warp), _TO_FRAME_T), THUMB)
    qd = cv2.GaussianBlur(qd, (0, 0), 0.8) - cv2.GaussianBlur(qd, (0, 0), 3.0)
    ed = ed.astype(np.float32)
    ed = cv2.GaussianBlur(ed, (0, 0), 0.8) - cv2.GaussianBlur(ed, (0, 0), 3.0)
    detail = _block_detail(qd, ed)
    # Colour: both colour thumbnails into the frame at COLOUR px (pixel c of it is frame point _TO_FRAME(c)).
    qc = _resample(q.colour, _compose(_box_map(q_box, COLOUR, FRAME), _TO_FRAME), COLOUR)
    ec = _resample(e_colour, _compose(_compose(_box_map(e_variant, COLOUR, FRAME, mirrored), warp), _TO_FRAME), COLOUR)
    # Blurred: colour is judged on regions, not edges, which a pixel of misalignment would dominate.
    qch = cv2.GaussianBlur(qc.astype(np.float32), (0, 0), 1.2).reshape(-1, 3) @ _CHROMA.T
    ech = cv2.GaussianBlur(ec.astype(np.float32), (0, 0), 1.2).reshape(-1, 3) @ _CHROMA.T
    gain = max(0.0, float((qch * ech).sum()) / max(float((ech * ech).sum()), 1e-6))
    res2 = ((qch - gain * ech) ** 2).sum(axis=1)
    n_keep = len(res2) - int(len(res2) * drop)
    res2 = np.partition(res2, n_keep - 1)[:n_keep]
    return Verdict(corr, float(np.sqrt(res2.mean())), overlap, moved, corr - c0, detail)
