"""Image fingerprints: DCT perceptual hashes for the loose search, thumbnails for the precise check.

Why two stages (REFERENCE.md, "Near-duplicate detection"): a 64-bit median
pHash is unstable on simple images like ours (flat backgrounds, one shape):
re-encoded copies drift far apart and unrelated images of the same shape come
close. Measured on `pipeline.localweb` images (benchmarks/dedup.py and the
tests repeat this): a one-sided 4% crop moves the hash by up to 22 bits of 64,
while unrelated same-shape, same-colour images come within 12.

- Loose search: besides the hash of the whole image we hash five crops of it
  (four corners and the centre, `crop` of each side). A copy cropped by a few
  percent is then within ~10 bits of one of these variants, so
  `image_max_distance` can stay small enough for the banded index to prune.
  The distance between two images is the minimum over variant pairs in
  which at least one side is the whole image.
- Precise check: 32x32 colour thumbnails, blurred, compared by normalised
  cross-correlation allowing a shift of `margin` pixels in either direction.
  Colour matters here: unrelated images "of the same colour" still differ in
  their backgrounds. Normalisation removes brightness and contrast shifts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np

HASH_BITS = 64
N_VARIANTS = 6  # whole image + four corner crops + centre crop
THUMB = 32


@dataclass(slots=True)
class ImageFeatures:
    hashes: np.ndarray
    """uint64 (N_VARIANTS,): pHash of the whole image first, then of its crops."""
    thumb: np.ndarray
    """uint8 (THUMB, THUMB, 3): blurred BGR thumbnail for the precise check."""
    sha256: str


def decode(data: bytes) -> np.ndarray | None:
    """BGR uint8 image, or None if OpenCV cannot read the bytes."""
    if not data:
        return None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.size == 0 or min(img.shape[:2]) < 4:
        return None
    return img


def phash(gray: np.ndarray) -> np.uint64:
    """64-bit DCT hash: 8x8 lowest frequencies of a 32x32 resize, each bit 'above the median'."""
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    coeffs = cv2.dct(small)[:8, :8].ravel()
    # The DC term is excluded from the median: it only carries mean brightness.
    bits = coeffs > np.median(coeffs[1:])
    return np.packbits(bits).view(">u8").astype(np.uint64)[0]


def crop_variants(img: np.ndarray, crop: float) -> list[np.ndarray]:
    h, w = img.shape[:2]
    dy, dx = max(1, round(h * crop)), max(1, round(w * crop))
    return [
        img,
        img[dy:, dx:], img[dy:, : w - dx], img[: h - dy, dx:], img[: h - dy, : w - dx],
        img[dy // 2 : h - dy // 2, dx // 2 : w - dx // 2],
    ]


def thumbnail(img: np.ndarray) -> np.ndarray:
    small = cv2.resize(img, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    # A little blur makes the comparison tolerant of JPEG blocking and resampling.
    return cv2.GaussianBlur(small, (0, 0), 1.0)


def features(data: bytes, crop: float = 0.03) -> ImageFeatures | None:
    """Fingerprint of encoded image bytes; None when they do not decode."""
    img = decode(data)
    if img is None:
        return None
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    hashes = np.array([phash(v) for v in crop_variants(gray, crop)], dtype=np.uint64)
    return ImageFeatures(hashes=hashes, thumb=thumbnail(img), sha256=hashlib.sha256(data).hexdigest())


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of uint64 arrays (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def variant_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Distance between two images' variant hashes: whole vs any variant, either way round."""
    return int(min(hamming(a[0], b).min(), hamming(a, b[0]).min()))


def similarity(a: np.ndarray, b: np.ndarray, margin: int = 2) -> float:
    """Shift-tolerant normalised cross-correlation of two thumbnails, in [-1, 1].

    Each thumbnail's centre (minus `margin` pixels per side) is slid over the
    other; the best of both directions counts, so it does not matter which of
    the two images is the cropped one.
    """
    fa, fb = a.astype(np.float32), b.astype(np.float32)
    if fa.std() < 2.0 or fb.std() < 2.0:
        # Correlation is undefined for a flat image: call two flat images the
        # same when their colours agree, and a flat one never equal to a textured one.
        flat_both = fa.std() < 2.0 and fb.std() < 2.0
        close = np.abs(fa.mean(axis=(0, 1)) - fb.mean(axis=(0, 1))).max() <= 8.0
        return 1.0 if flat_both and close else 0.0
    m = margin
    r1 = cv2.matchTemplate(fa, fb[m:-m, m:-m], cv2.TM_CCOEFF_NORMED).max()
    r2 = cv2.matchTemplate(fb, fa[m:-m, m:-m], cv2.TM_CCOEFF_NORMED).max()
    return float(max(r1, r2))
