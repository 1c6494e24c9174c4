"""Decode, resize and encode one image, with the memory of the decode judged from its header first.

Why not img2dataset's `Resizer`, which this replaces (see REFERENCE.md): it blends
transparency in float64 over the full-size image (a 337 KB 9000x9000 RGBA PNG
costs 6.9 GB), builds and validates albumentations transform objects for every
image (a third of its time on 224 px targets), and importing it imports torch,
albumentations and wandb (3 s and about 920 MB per worker). It also writes
16-bit images as white (OpenCV saturates them to 8 bits when encoding a JPEG).

What is kept from it, so that shards stay the same: OpenCV decodes
(`IMREAD_UNCHANGED`: EXIF orientation is not applied; grayscale stays one
channel; palette, CMYK and gray+alpha become BGR or BGRA), alpha is blended
onto white, the short side (center_crop, keep_ratio) or the long side (border)
is scaled to `image_size` with albumentations' rounding, with INTER_AREA when
the original is larger and INTER_LANCZOS4 when it is not, center_crop keeps the
centre (albumentations' offsets), border pads with white around the centre,
and OpenCV encodes. tests/test_resize.py compares the two on many images.

What is different: the bytes a decode allocates are computed from the header
and refused above `max_decode_bytes`, before decoding; JPEGs much larger than
the target are decoded at 1/2, 1/4 or 1/8 scale in libjpeg's DCT; alpha is
premultiplied in place in integers and the blend onto white happens after
the downscale (the blend is linear in the premultiplied colour and alpha, so
the result is the same up to rounding); 16-bit images are scaled to 8 bits.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

# MPO is how Pillow names the JPEGs many phones write (a JPEG with extra frames appended):
# valid JPEG, decoded by OpenCV like any other.
IMAGE_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"}
JPEG_FORMATS = {"JPEG", "MPO"}
RESIZE_MODES = ("center_crop", "keep_ratio", "border")
# BuildConfig.max_decode_bytes's default (a test keeps the two equal): a build task's
# own ~210 MB (interpreter, pyarrow, OpenCV, buffers; measured with --executor local)
# plus this stays under about 512 MB whatever the image.
DEFAULT_MAX_DECODE_BYTES = 288 * 2**20
# Rows premultiplied at a time in 16-bit images: the uint32 working copy stays small.
_BAND_PIXELS = 1 << 19
# Decoder state besides the arrays (libjpeg, libpng, zlib tables and row buffers): measured
# at 3 to 7 MiB on small decodes.
_DECODER_SLACK = 8 * 2**20

_REDUCED = {
    (2, False): cv2.IMREAD_REDUCED_COLOR_2, (4, False): cv2.IMREAD_REDUCED_COLOR_4,
    (8, False): cv2.IMREAD_REDUCED_COLOR_8, (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4, (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


class ImageError(Exception):
    """An image that cannot be used. `reason` is the manifest reason, `detail` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True, slots=True)
class Header:
    """What the header of an image says, read without decoding a pixel."""

    format: str
    width: int
    height: int
    channels: int
    """Channels of the array OpenCV decodes it to (IMREAD_UNCHANGED): 1, 3 or 4."""
    sample_bytes: int
    """Bytes per channel of that array: 2 for 16-bit PNG and TIFF, else 1."""
    copies: int = 2
    """Arrays of the decoded size that OpenCV holds at once (measured on 4.14: it decodes into
    its own buffer and then copies; TIFF strips and the GIF canvas add more)."""
    coefficient_bytes: int = 0
    """Progressive JPEG: libjpeg keeps every DCT coefficient of the image, whatever the output scale."""


def read_header(body: bytes, max_pixels: int | None = None) -> Header:
    """The header of `body`; ImageError if it is not an image we decode or claims over `max_pixels` pixels."""
    if not body:
        raise ImageError("empty_body")
    # Pillow refuses images above 2 * its own MAX_IMAGE_PIXELS in open(), before our
    # check below could apply: raise its limit to ours so --max-image-pixels is the one
    # that counts (Pillow's stays as a backstop at twice ours). Only ever raised, and
    # equal from every thread of a task, so the shared setting needs no lock.
    if max_pixels is not None and Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(body)) as img:
                fmt, (w, h) = img.format, img.size
                if fmt not in IMAGE_FORMATS:
                    raise ImageError("not_an_image", f"format {fmt}")
                header = _layout(img, body)
    except Image.DecompressionBombError as exc:
        raise ImageError("decompression_bomb", str(exc)[:120]) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, IndexError, KeyError, TypeError,
            AttributeError) as exc:
        raise ImageError("not_an_image", type(exc).__name__) from None
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError("decompression_bomb", f"{w}x{h} > {max_pixels} pixels")
    if w < 1 or h < 1:
        raise ImageError("not_an_image", f"{w}x{h}")
    return header


def _layout(img: Image.Image, body: bytes) -> Header:
    """Channels, sample size and decoder overheads of OpenCV's IMREAD_UNCHANGED decode of `img`."""
    fmt, (w, h), mode = img.format or "", img.size, img.mode
    transparent = "transparency" in img.info or mode in ("RGBA", "LA", "PA", "RGBa", "La")
    animated = bool(getattr(img, "is_animated", False))
    if fmt in JPEG_FORMATS:
        coefficients = 0
        if img.info.get("progressive"):
            # One int16 per coefficient, per component at its own sampling, in whole 8x8 blocks.
            layers = getattr(img, "layer", None) or [("", 1, 1, 0)] * len(img.getbands())
            hmax = max(layer[1] for layer in layers) or 1
            vmax = max(layer[2] for layer in layers) or 1
            for _, hs, vs, _ in layers:
                blocks = math.ceil(w * hs / hmax / 8 + 1) * math.ceil(h * vs / vmax / 8 + 1)
                coefficients += blocks * 64 * 2
        return Header(fmt, w, h, 1 if mode == "L" else 3, 1, 2, coefficients)
    if fmt == "PNG":
        # IHDR, the first chunk: Pillow says "RGBA" for 8- and 16-bit alike.
        depth, color = (body[24], body[25]) if len(body) > 25 else (8, 6)
        channels = {0: 1, 2: 3, 3: 3, 4: 4, 6: 4}.get(color, 4)
        if transparent:
            channels = 4
        return Header(fmt, w, h, channels, 2 if depth == 16 else 1, 3 if animated else 2)
    if fmt == "TIFF":
        bits = img.tag_v2.get(258, (8,)) if hasattr(img, "tag_v2") else (8,)
        bits = max(bits) if isinstance(bits, tuple) and bits else int(bits or 8)
        spp = int(img.tag_v2.get(277, 1)) if hasattr(img, "tag_v2") else 1
        # Strips or tiles in the file's own layout besides the decoder's two arrays (3.4x measured).
        return Header(fmt, w, h, 1 if spp == 1 else 4, max(1, math.ceil(bits / 8)), 4)
    if fmt == "GIF":
        return Header(fmt, w, h, 4, 1, 3)  # the frame canvas besides the two arrays (2.7x measured)
    return Header(fmt, w, h, 4 if transparent else 3, 1, 3 if animated else 2)


@dataclass(frozen=True, slots=True)
class Plan:
    """How one image is decoded and resized, and the bytes that costs."""

    reduce: int
    """1, 2, 4 or 8: libjpeg DCT scaling of the decode."""
    decoded: tuple[int, int]
    """(width, height) of the decoded array."""
    resized: tuple[int, int]
    """(width, height) after scaling, before the crop or the border."""
    interpolation: int
    decode_bytes: int
    """Bytes allocated at once: decoded array, decoder buffers and the working copies."""


def scaled_size(width: int, height: int, image_size: int, resize_mode: str) -> tuple[int, int]:
    """(width, height) after albumentations' SmallestMaxSize (center_crop, keep_ratio) or LongestMaxSize (border)."""
    side = max(width, height) if resize_mode == "border" else min(width, height)
    scale = image_size / side
    return max(1, round(width * scale)), max(1, round(height * scale))


class Resizer:
    """One image's bytes -> (encoded bytes, width, height), or ImageError. One per task; no per-image setup."""

    def __init__(self, image_size: int, resize_mode: str, encode_format: str, encode_quality: int,
                 max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES, reduce_margin: float = 2.0):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {resize_mode!r}")
        if encode_format not in ("jpg", "webp"):
            raise ValueError(f"encode_format must be jpg or webp, got {encode_format!r}")
        self.image_size, self.resize_mode, self.max_decode_bytes = image_size, resize_mode, max_decode_bytes
        self.ext = "." + encode_format
        quality = cv2.IMWRITE_JPEG_QUALITY if encode_format == "jpg" else cv2.IMWRITE_WEBP_QUALITY
        self.encode_params = [int(quality), int(encode_quality)]
        # The reduced decode must stay this many times the target size: libjpeg's DCT
        # scaling is then only the first, coarse step, and INTER_AREA does the rest.
        self.reduce_margin = reduce_margin

    def plan(self, header: Header) -> Plan:
        w, h, size = header.width, header.height, self.image_size
        nw, nh = scaled_size(w, h, size, self.resize_mode)
        side = max(w, h) if self.resize_mode == "border" else min(w, h)
        interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LANCZOS4
        reduce = 1
        if header.format in JPEG_FORMATS and interpolation == cv2.INTER_AREA:
            for r in (8, 4, 2):
                if min(math.ceil(w / r) / nw, math.ceil(h / r) / nh) >= self.reduce_margin:
                    reduce = r
                    break
        dw, dh = math.ceil(w / reduce), math.ceil(h / reduce)
        out_pixels = max(nw * nh, size * size)
        # Working copies: the resized array, the blended or 8-bit one, the cropped or
        # padded one; 16-bit alpha also premultiplies through a uint32 band.
        band = 12 * min(dw * dh, _BAND_PIXELS) if header.channels == 4 and header.sample_bytes == 2 else 0
        decode_bytes = (dw * dh * header.channels * header.sample_bytes * header.copies + header.coefficient_bytes
                        + _DECODER_SLACK + 3 * out_pixels * header.channels * header.sample_bytes + band)
        return Plan(reduce, (dw, dh), (nw, nh), interpolation, decode_bytes)

    def check(self, header: Header) -> Plan:
        """The plan for `header`, or ImageError('decompression_bomb') if it needs more than max_decode_bytes."""
        plan = self.plan(header)
        if plan.decode_bytes > self.max_decode_bytes:
            raise ImageError(
                "decompression_bomb",
                f"{header.width}x{header.height} {header.format} x{header.channels} channels x{header.sample_bytes} "
                f"bytes needs {plan.decode_bytes / 2**20:.0f} MiB to decode > --max-decode-bytes "
                f"{self.max_decode_bytes / 2**20:.0f} MiB",
            )
        return plan

    def __call__(self, body: bytes, header: Header) -> tuple[bytes, int, int]:
        plan = self.check(header)
        if plan.reduce == 1:
            flags = cv2.IMREAD_UNCHANGED
        else:
            flags = _REDUCED[plan.reduce, header.channels == 1] | cv2.IMREAD_IGNORE_ORIENTATION
        img = cv2.imdecode(np.frombuffer(body, np.uint8), flags)
        if img is None:
            raise ImageError("decode_error", f"OpenCV could not decode this {header.format}")
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        if (img.shape[1], img.shape[0]) != plan.decoded:
            raise ImageError("decode_error", f"decoded {img.shape[1]}x{img.shape[0]}, the header said "
                                             f"{plan.decoded[0]}x{plan.decoded[1]}")
        if img.dtype not in (np.uint8, np.uint16) or (img.ndim == 3 and img.shape[2] not in (3, 4)):
            raise ImageError("decode_error", f"unsupported pixel layout {img.dtype} {img.shape[2:]}")
        alpha = img.ndim == 3 and img.shape[2] == 4
        if alpha:
            _premultiply_in_place(img)
        if plan.resized != plan.decoded:
            img = cv2.resize(img, plan.resized, interpolation=plan.interpolation)
        if alpha:
            img = _onto_white(img)
        if img.dtype == np.uint16:
            img = ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
        img = self._fit(img)
        ok, encoded = cv2.imencode(self.ext, img, self.encode_params)
        if not ok:
            raise ImageError("decode_error", f"OpenCV could not encode {self.ext}")
        return encoded.tobytes(), img.shape[1], img.shape[0]

    def _fit(self, img: np.ndarray) -> np.ndarray:
        """Center crop or white border to image_size x image_size (albumentations' offsets); keep_ratio: as is."""
        size = self.image_size
        h, w = img.shape[:2]
        if self.resize_mode == "center_crop":
            y, x = (h - size) // 2, (w - size) // 2
            return img[y:y + size, x:x + size]
        if self.resize_mode == "border" and (h < size or w < size):
            top, left = max(0, size - h) // 2, max(0, size - w) // 2
            return cv2.copyMakeBorder(img, top, max(0, size - h) - top, left, max(0, size - w) - left,
                                      cv2.BORDER_CONSTANT, value=(255, 255, 255, 255))
        return img


def _premultiply_in_place(img: np.ndarray) -> None:
    """Colour *= alpha / max, rounded, in place: no full-size copy, float or otherwise."""
    if img.dtype == np.uint8:
        cv2.cvtColor(img, cv2.COLOR_RGBA2mRGBA, dst=img)  # channel order does not matter: 4th is alpha
        return
    rows = max(1, _BAND_PIXELS // img.shape[1])
    for y in range(0, img.shape[0], rows):
        band = img[y:y + rows]
        work = band[..., :3].astype(np.uint32)
        work *= band[..., 3:4]
        work += 32767
        work //= 65535
        band[..., :3] = work


def _onto_white(img: np.ndarray) -> np.ndarray:
    """Premultiplied BGRA -> BGR blended onto white: colour + max * (1 - alpha)."""
    top = 255 if img.dtype == np.uint8 else 65535
    out = img[..., :3].astype(np.int32)
    out += top
    out -= img[..., 3:4]
    np.clip(out, 0, top, out=out)
    return out.astype(img.dtype)
