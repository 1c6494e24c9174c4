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
  cross-correlation allowing a shift of `margin` pixels in either direction
  and a zoom of up to ~9% (a crop of 4% on every side scales the content, and
  a shift alone left such copies at 0.95). Normalisation removes brightness
  and contrast shifts, but it also subtracts each channel's mean, so two
  images of the same shape on backgrounds of different tint correlated at
  0.96+ (benchmarks/dedup.py found three such pairs in 5,000): `compare` also
  returns a colour difference, measured after matching overall brightness,
  which such pairs fail and brightened copies pass (benchmark images: planted
  copies at most 4.8 grey levels, the look-alikes 15 to 26; the limit is
  `MatchConfig.image_max_colour_diff`, 10).
- Resized copies: img2dataset's default `center_crop` cuts a 4:3 image to its
  centre square (12.5% off each long side), `border` pads it to a square with
  white. Neither is a "crop of a few percent", so each non-square eval image
  is also indexed as those two squares (`views`), each with its own hashes
  and thumbnail.
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


def _features(img: np.ndarray, crop: float, sha256: str) -> ImageFeatures:
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    hashes = np.array([phash(v) for v in crop_variants(gray, crop)], dtype=np.uint64)
    return ImageFeatures(hashes=hashes, thumb=thumbnail(img), sha256=sha256)


def features(data: bytes, crop: float = 0.03) -> ImageFeatures | None:
    """Fingerprint of encoded image bytes (a training sample); None when they do not decode."""
    img = decode(data)
    if img is None:
        return None
    return _features(img, crop, hashlib.sha256(data).hexdigest())


def view_features(data: bytes, crop: float = 0.03) -> tuple[str, list[ImageFeatures]]:
    """(sha256 of the bytes, fingerprints of each of `views`) of an eval image; no views when it does not decode.

    The digest is of the raw bytes either way: a byte-identical copy matches even
    when OpenCV cannot read the file.
    """
    sha = hashlib.sha256(data).hexdigest()
    img = decode(data)
    return sha, [] if img is None else [_features(v, crop, sha) for v in views(img)]


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of uint64 arrays (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def variant_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Distance between two images' variant hashes: whole vs any variant, either way round."""
    return int(min(hamming(a[0], b).min(), hamming(a, b[0]).min()))


ZOOMS = (1.0, 1.045, 1.09)
"""Zooms tried by `compare`: crops of 0, ~2% and ~4% on every side."""


def _zoom(t: np.ndarray, k: float) -> np.ndarray:
    if k == 1.0:
        return t
    c = (t.shape[1] - 1) / 2, (t.shape[0] - 1) / 2
    m = cv2.getRotationMatrix2D(c, 0.0, k)
    return cv2.warpAffine(t, m, (t.shape[1], t.shape[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def compare(a: np.ndarray, b: np.ndarray, margin: int = 2) -> tuple[float, float]:
    """(correlation in [-1, 1], colour difference in grey levels) of two thumbnails.

    Each thumbnail's centre (minus `margin` pixels per side), zoomed by each of
    `ZOOMS`, is slid over the other; the best of both directions counts, so it
    does not matter which of the two images is the cropped one. The colour
    difference is the mean absolute difference of the best-aligned pixels after
    scaling one side to the other's mean brightness (a brightened copy differs
    by a gain; a different background tint does not).
    """
    fa, fb = a.astype(np.float32), b.astype(np.float32)
    if fa.std() < 2.0 or fb.std() < 2.0:
        # Correlation is undefined for a flat image: call two flat images the
        # same when their colours agree, and a flat one never equal to a textured one.
        flat_both = fa.std() < 2.0 and fb.std() < 2.0
        diff = float(np.abs(fa.mean(axis=(0, 1)) - fb.mean(axis=(0, 1))).max())
        return (1.0 if flat_both and diff <= 8.0 else 0.0), diff
    m = margin
    best, pair = -2.0, (fa, fb)
    for k in ZOOMS:
        for x, y in ((fa, fb), (fb, fa)):
            tmpl = _zoom(y, k)[m:-m, m:-m]
            r = cv2.matchTemplate(x, tmpl, cv2.TM_CCOEFF_NORMED)
            _, score, _, (px, py) = cv2.minMaxLoc(r)
            if score > best:
                best, pair = score, (x[py : py + tmpl.shape[0], px : px + tmpl.shape[1]], tmpl)
    p, q = pair
    gain = q.mean() / max(p.mean(), 1.0)
    return float(best), float(np.abs(p * gain - q).mean())


def similarity(a: np.ndarray, b: np.ndarray, margin: int = 2) -> float:
    """The correlation part of `compare`."""
    return compare(a, b, margin)[0]
