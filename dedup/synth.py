"""Planted overlaps for the dedup tests and benchmark: the edits a copy picks up on the web.

A copy of an eval image rarely arrives byte-identical: it is re-encoded,
resized, cropped a little, brightened. `TRANSFORMS` applies each of these to
a PIL image and returns encoded bytes; `write_corpus` writes a build_corpus-
shaped corpus (shards + sizes.json, members jpg/txt/json) with ShardSetWriter.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable

from PIL import Image, ImageEnhance

from pipeline.localweb import COLORS, SHAPES, TEMPLATES, encode, make_image
from pipeline.shards import ShardSetWriter, get_fs, join


def _crop(img: Image.Image, frac: float) -> Image.Image:
    # One-sided (left and bottom): the harder case, content shifts as well as scales.
    w, h = img.size
    c = max(1, round(w * frac))
    return img.crop((c, 0, w, h - c))


TRANSFORMS: dict[str, Callable[[Image.Image], bytes]] = {
    "exact_copy": lambda img: encode(img, "jpg", 90),
    "jpeg_q50": lambda img: encode(img, "jpg", 50),
    "resize_1.5x": lambda img: encode(img.resize((round(img.width * 1.5), round(img.height * 1.5)),
                                                 Image.Resampling.BICUBIC), "jpg", 90),
    "crop_4pct": lambda img: encode(_crop(img, 0.04), "jpg", 90),
    "brightness_+10pct": lambda img: encode(ImageEnhance.Brightness(img).enhance(1.1), "jpg", 90),
}


def random_image(rng: random.Random, size: tuple[int, int] = (128, 128), shape: str | None = None,
                 color: str | None = None) -> tuple[Image.Image, str]:
    """A localweb-style image and a caption describing it."""
    shape = shape or rng.choice(SHAPES)
    color = color or rng.choice(list(COLORS))
    return make_image(shape, color, size, rng), rng.choice(TEMPLATES).format(c=f"{color} {shape}")


def write_corpus(root: str, samples: Iterable[tuple[bytes, str, dict]], samples_per_shard: int) -> int:
    """Write (image jpg bytes, caption, extra json) samples as ROOT/shards/; returns the count."""
    fs, base = get_fs(root)
    n = 0
    with ShardSetWriter(fs, join(base, "shards"), samples_per_shard) as w:
        for i, (img, caption, extra) in enumerate(samples):
            key = f"{i:09d}"
            meta = {"key": key, "caption": caption, "sha256": hashlib.sha256(img).hexdigest(), **extra}
            w.add(key, {"jpg": img, "txt": caption.encode(), "json": json.dumps(meta).encode()})
            n += 1
    return n
