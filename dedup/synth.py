"""Planted overlaps for the dedup tests and benchmark: the edits a copy picks up on the web.

A copy of an eval image rarely arrives byte-identical: it is re-encoded,
resized, cropped a little, brightened. `TRANSFORMS` applies each of these to
a PIL image and returns encoded bytes; `write_corpus` writes a build_corpus-
shaped corpus (shards + sizes.json, members jpg/txt/json) with ShardSetWriter.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

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


# --- Images nobody in this project made, and edits as copy-detection benchmarks apply them -----------
#
# The matcher's thresholds must not be tuned on localweb's shapes alone (issue 10): `photos` reads
# real photographs that ship inside installed packages (scikit-image's skimage/data folder, read as
# files: some `skimage.data` functions download, these never do; matplotlib's sample data), and
# `generated` draws images from three generators. `EDITS` are the everyday edits of the ISC 2021 /
# DISC21 family with their parameter ranges; `lookalikes` are distinct images that resemble an eval
# image (stereo partner, another tile of the same photo, another face, the same kind of drawing).

# skimage/data files that are photographs (not charts, logos or synthetic phantoms).
SKIMAGE_PHOTOS = ("astronaut.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
                  "coins.png", "moon.png", "motorcycle_left.png", "page.png", "rocket.jpg", "text.png")
# Large photographs of one kind of subject, cut into 2x2 tiles: the tiles are distinct images of the same
# subject (bricks, grass, a retina, a galaxy field), i.e. look-alikes of each other.
SKIMAGE_TILED = ("brick.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png")


def _package_file(package: str, *parts: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed (pip install '.[test]')")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in the installed {package}")
    return path


def _fit(img: Image.Image, max_side: int) -> Image.Image:
    img = img.convert("RGB")
    k = max_side / max(img.size)
    if k < 1:
        img = img.resize((max(8, round(img.width * k)), max(8, round(img.height * k))), Image.Resampling.LANCZOS)
    return img


@dataclass(frozen=True)
class Photo:
    name: str
    source: str
    """The photograph it comes from (tiles of one photo share it; hold-out splits go by source)."""
    image: Image.Image
    lookalike: bool = False
    """Not an eval image: a distinct picture of the same subject as its source's eval images (a query
    that must match nothing)."""


def photos(max_side: int = 320) -> list[Photo]:
    """Real photographs shipped in installed packages (scikit-image, matplotlib), at most `max_side` px.

    Whole photos; 2x2 tiles of the large single-subject ones (three tiles are eval images, the fourth
    a look-alike); 12 of scikit-image's LFW faces (25 px, upscaled 4x; six eval images, six look-alikes);
    the Middlebury motorcycle's left view (eval) and right view (look-alike: a stereo pair).
    """
    out = [Photo(f"skimage/{n}", n, _fit(Image.open(_package_file("skimage.data", n)), max_side))
           for n in SKIMAGE_PHOTOS]
    out.append(Photo("skimage/motorcycle_right.png", "motorcycle_left.png",
                     _fit(Image.open(_package_file("skimage.data", "motorcycle_right.png")), max_side), True))
    out.append(Photo("mpl/grace_hopper.jpg", "grace_hopper.jpg",
                     _fit(Image.open(_package_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg")),
                          max_side)))
    for n in SKIMAGE_TILED:
        img = Image.open(_package_file("skimage.data", n)).convert("RGB")
        w, h = img.size
        for ty in range(2):
            for tx in range(2):
                tile = img.crop((tx * w // 2, ty * h // 2, (tx + 1) * w // 2, (ty + 1) * h // 2))
                out.append(Photo(f"skimage/{n}#{ty}{tx}", n, _fit(tile, max_side), ty == tx == 1))
    faces = np.load(_package_file("skimage.data", "lfw_subset.npy"))[:12]  # the first 100 are faces
    for i, f in enumerate(faces):
        img = Image.fromarray(np.clip(f * 255, 0, 255).astype(np.uint8)).resize((100, 100), Image.Resampling.BICUBIC)
        out.append(Photo(f"skimage/lfw_subset#{i:02d}", f"lfw_subset.npy#{i % 2}", img.convert("RGB"), i >= 6))
    return out


def split_photos(items: list[Photo]) -> tuple[list[Photo], list[Photo]]:
    """(tune, report): every other source photo, so that no photo (or tile of one) is on both sides."""
    sources = sorted({p.source for p in items})
    tune = set(sources[0::2])
    return [p for p in items if p.source in tune], [p for p in items if p.source not in tune]


def textured_image(seed: int, size: tuple[int, int], detail_seed: int | None = None) -> Image.Image:
    """Photo-like noise: smooth colour regions plus detail at two finer scales.

    `detail_seed` (default: `seed`) draws the finer scales: the same coarse layout with other detail
    is a look-alike (the same kind of picture, made again).
    """
    rng = np.random.default_rng(seed)
    detail = rng if detail_seed is None else np.random.default_rng(detail_seed)
    w, h = size
    acc = np.zeros((h, w, 3), np.float32)
    for cells, amp, r in ((4, 70.0, rng), (12, 35.0, detail), (40, 15.0, detail)):
        coarse = r.normal(0, amp, (cells * h // w + 1, cells + 1, 3)).astype(np.float32)
        acc += cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return Image.fromarray(np.clip(acc + 128, 0, 255).astype(np.uint8))


def drawn_scene(rng: random.Random, size: tuple[int, int] = (240, 180), layout: random.Random | None = None
                ) -> Image.Image:
    """A drawn landscape: sky gradient, hills, a house, trees, a sun.

    `layout` (default: `rng`) picks what goes roughly where; `rng` the colours and where exactly (a few
    percent either way). Two scenes with equal layout seeds are the same drawing made twice: a look-alike.
    """
    lay = layout or rng
    w, h = size

    def at(lo: float, hi: float, side: float) -> float:
        return (lay.uniform(lo, hi) + rng.uniform(-0.04, 0.04)) * side

    top = np.array([rng.randint(60, 140), rng.randint(120, 200), rng.randint(200, 255)], np.float32)
    bottom = np.array([rng.randint(180, 255), rng.randint(200, 255), rng.randint(220, 255)], np.float32)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    sky = np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3))
    img = Image.fromarray(sky.astype(np.uint8))
    d = ImageDraw.Draw(img)
    horizon = at(0.5, 0.7, h)
    for _ in range(lay.randint(1, 3)):  # hills
        cx, r = at(0, 1, w), at(0.3, 0.7, w)
        d.ellipse([cx - r, horizon - r * 0.35, cx + r, horizon + r * 0.35],
                  fill=(rng.randint(40, 110), rng.randint(120, 190), rng.randint(40, 100)))
    d.rectangle([0, horizon, w, h], fill=(rng.randint(50, 110), rng.randint(140, 200), rng.randint(50, 100)))
    sx, sy, sr = at(0.1, 0.9, w), at(0.08, 0.3, h), at(0.05, 0.09, w)
    d.ellipse([sx - sr, sy - sr, sx + sr, sy + sr], fill=(255, rng.randint(200, 240), rng.randint(0, 80)))
    hx, hw = at(0.15, 0.6, w), at(0.18, 0.3, w)
    hh = hw * lay.uniform(0.6, 0.9)
    base = horizon + at(0.02, 0.12, h)
    wall = (rng.randint(150, 240), rng.randint(100, 200), rng.randint(60, 160))
    d.rectangle([hx, base - hh, hx + hw, base], fill=wall, outline=(40, 30, 20))
    d.polygon([(hx - hw * 0.1, base - hh), (hx + hw * 1.1, base - hh), (hx + hw / 2, base - hh - hw * 0.5)],
              fill=(rng.randint(120, 200), rng.randint(20, 70), rng.randint(20, 60)))
    d.rectangle([hx + hw * 0.4, base - hh * 0.5, hx + hw * 0.6, base], fill=(90, 50, 20))
    for _ in range(lay.randint(1, 4)):  # trees
        tx, tr = at(0, 1, w), at(0.04, 0.08, w)
        ty = horizon + at(0.0, 0.2, h)
        d.rectangle([tx - tr * 0.2, ty - tr, tx + tr * 0.2, ty + tr], fill=(100, 70, 30))
        d.ellipse([tx - tr, ty - tr * 2.6, tx + tr, ty - tr * 0.6],
                  fill=(rng.randint(10, 60), rng.randint(90, 160), rng.randint(10, 60)))
    return img.filter(ImageFilter.GaussianBlur(0.5))


GENERATORS = ("shapes", "texture", "scene")


def generated(n: int, seed: int) -> list[tuple[str, Image.Image]]:
    """n generated eval images named GENERATOR/NUMBER, cycling through `GENERATORS`, of several sizes."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        size = rng.choice([(160, 120), (120, 160), (144, 144), (240, 180)])
        out.append((f"{GENERATORS[i % 3]}/{i:04d}", _generate(GENERATORS[i % 3], i, seed, size, rng)))
    return out


def _generate(gen: str, i: int, seed: int, size: tuple[int, int], rng: random.Random,
              other: random.Random | None = None) -> Image.Image:
    # `other` set: a look-alike of image i (same generator, size and layout; other detail and colours).
    if gen == "shapes":  # shape and colour follow from i; background, position and tint from the rng
        shape, colour = SHAPES[(i // 3) % len(SHAPES)], list(COLORS)[(i // 12) % len(COLORS)]
        return random_image(other or rng, size, shape, colour)[0]
    if gen == "texture":
        return textured_image(seed * 100_003 + i, size, None if other is None else other.randrange(1 << 30))
    layout = random.Random(seed * 100_003 + i)
    return drawn_scene(layout if other is None else random.Random(other.randrange(1 << 30)), size,
                       layout=random.Random(seed * 100_003 + i))


def generated_lookalike(name: str, size: tuple[int, int], seed: int, rng: random.Random) -> Image.Image:
    """A distinct image like `generated`'s `name`: the same generator and size, for shapes the same shape
    and colour, for textures and scenes the same coarse layout; other detail and colours."""
    gen, idx = name.split("/")
    return _generate(gen, int(idx), seed, size, rng, other=rng)


# --- edits ------------------------------------------------------------------------------------------


def _u8(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), np.float32)


def edit_jpeg(img: Image.Image, rng: random.Random) -> Image.Image:
    return Image.open(io.BytesIO(encode(img, "jpg", rng.randint(30, 95)))).convert("RGB")


def edit_resize(img: Image.Image, rng: random.Random) -> Image.Image:
    k = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    return img.resize((max(8, round(img.width * k)), max(8, round(img.height * k))),
                      rng.choice([Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS]))


def edit_crop(img: Image.Image, rng: random.Random) -> Image.Image:
    """Up to 10% off each side, independently (one side at the full 10% half of the time)."""
    cuts = [rng.uniform(0, 0.10) for _ in range(4)]
    if rng.random() < 0.5:
        cuts[rng.randrange(4)] = 0.10
    w, h = img.size
    return img.crop((round(w * cuts[0]), round(h * cuts[1]), w - round(w * cuts[2]), h - round(h * cuts[3])))


def edit_brightness(img: Image.Image, rng: random.Random) -> Image.Image:
    return _u8(_arr(img) + rng.choice([-1, 1]) * rng.uniform(10, 30))


def edit_contrast(img: Image.Image, rng: random.Random) -> Image.Image:
    k = rng.choice([rng.uniform(0.7, 0.9), rng.uniform(1.1, 1.3)])
    a = _arr(img)
    return _u8((a - a.mean()) * k + a.mean())


def edit_gamma(img: Image.Image, rng: random.Random) -> Image.Image:
    g = rng.choice([rng.uniform(0.7, 0.9), rng.uniform(1.1, 1.4)])
    return _u8(255.0 * (_arr(img) / 255.0) ** g)


def edit_saturation(img: Image.Image, rng: random.Random) -> Image.Image:
    k = rng.choice([0.0, rng.uniform(0.0, 0.7), rng.uniform(1.2, 1.5)])
    return ImageEnhance.Color(img).enhance(k)


def edit_flip(img: Image.Image, rng: random.Random) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def edit_pad(img: Image.Image, rng: random.Random) -> Image.Image:
    """Letterbox / pillarbox / frame: up to 15% of the side added per side, in one plain colour."""
    w, h = img.size
    mode = rng.choice(["letterbox", "pillarbox", "frame"])
    f = [rng.uniform(0.05, 0.15) for _ in range(4)]
    left = round(w * f[0]) if mode != "letterbox" else 0
    right = round(w * f[2]) if mode != "letterbox" else 0
    top = round(h * f[1]) if mode != "pillarbox" else 0
    bottom = round(h * f[3]) if mode != "pillarbox" else 0
    if mode != "frame":  # centred, as a player or a resizer pads
        left, right = (left + right) // 2, (left + right) // 2
        top, bottom = (top + bottom) // 2, (top + bottom) // 2
    colour = rng.choice([(0, 0, 0), (255, 255, 255), (128, 128, 128), tuple(rng.randint(0, 255) for _ in range(3))])
    out = Image.new("RGB", (w + left + right, h + top + bottom), colour)
    out.paste(img, (left, top))
    return out


def edit_overlay(img: Image.Image, rng: random.Random) -> Image.Image:
    """A caption box or a logo covering up to 10% of the image."""
    out = img.copy()
    d = ImageDraw.Draw(out)
    w, h = out.size
    area = rng.uniform(0.04, 0.10) * w * h
    if rng.random() < 0.5:  # caption strip along the top or bottom
        bw = rng.uniform(0.6, 1.0) * w
        bh = min(h * 0.3, area / bw)
        x0 = rng.uniform(0, w - bw)
        y0 = rng.choice([rng.uniform(0, 0.05), rng.uniform(0.95, 1.0)]) * (h - bh)
        box = rng.choice([(0, 0, 0), (255, 255, 255), (200, 30, 30)])
        d.rectangle([x0, y0, x0 + bw, y0 + bh], fill=box)
        ink = (255, 255, 255) if sum(box) < 300 else (0, 0, 0)
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz  ") for _ in range(40))
        d.text((x0 + 3, y0 + bh * 0.2), text, fill=ink, font_size=max(6, int(bh * 0.6)))
    else:  # a logo in a corner
        s = math.sqrt(area)
        x0 = rng.choice([rng.uniform(0, 0.05) * w, w - s - rng.uniform(0, 0.05) * w])
        y0 = rng.choice([rng.uniform(0, 0.05) * h, h - s - rng.uniform(0, 0.05) * h])
        c1 = tuple(rng.randint(0, 255) for _ in range(3))
        c2 = tuple(255 - c for c in c1)
        d.ellipse([x0, y0, x0 + s, y0 + s], fill=c1)
        d.rectangle([x0 + s * 0.3, y0 + s * 0.3, x0 + s * 0.7, y0 + s * 0.7], fill=c2)
        d.text((x0 + s * 0.32, y0 + s * 0.35), "LOGO"[: rng.randint(2, 4)], fill=c1, font_size=max(6, int(s * 0.2)))
    return out


def edit_rotate(img: Image.Image, rng: random.Random) -> Image.Image:
    """Up to 5 degrees either way; half the time the uncovered corners are cropped away (as an editor
    does), else they stay black (PIL's and OpenCV's fill) or white (an editor's background)."""
    a = rng.choice([-1, 1]) * rng.uniform(1.0, 5.0)
    fill = (255, 255, 255) if rng.random() < 0.5 else None
    out = img.convert("RGB").rotate(a, Image.Resampling.BICUBIC, expand=False, fillcolor=fill)
    if rng.random() < 0.5:
        w, h = img.size
        t = math.tan(math.radians(abs(a)))
        dx, dy = math.ceil(h * t / 2) + 1, math.ceil(w * t / 2) + 1
        out = out.crop((dx, dy, w - dx, h - dy))
    return out


SINGLE_EDITS: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "jpeg": edit_jpeg, "resize": edit_resize, "crop": edit_crop, "brightness": edit_brightness,
    "contrast": edit_contrast, "gamma": edit_gamma, "saturation": edit_saturation, "flip": edit_flip,
    "pad": edit_pad, "overlay": edit_overlay,
}


def edit_two(img: Image.Image, rng: random.Random) -> Image.Image:
    """Two different edits of `SINGLE_EDITS`, one after the other."""
    a, b = rng.sample(sorted(SINGLE_EDITS), 2)
    return SINGLE_EDITS[b](SINGLE_EDITS[a](img, rng), rng)


EDITS: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    **SINGLE_EDITS, "rotate": edit_rotate, "two_edits": edit_two}
"""Edit kind -> edit; each draws its parameters from the issue's ranges (JPEG q30-95, resize 0.5-2x, crop
<= 10% a side, brightness +/-30 levels, contrast +/-30%, gamma 0.7-1.4, saturation 0-1.5, flip, pad <= 15%
a side, overlay <= 10% of the image, rotation <= 5 degrees, two of the single edits)."""
EDIT_RECALL_BAR = {k: 0.98 for k in SINGLE_EDITS} | {"rotate": 0.9, "two_edits": 0.9}
"""The recall each edit kind must reach (issue 10)."""


def edited_copy(img: Image.Image, kind: str, rng: random.Random) -> bytes:
    """`kind` applied to `img`, encoded as the web would serve it (JPEG q90 unless the edit chose a quality)."""
    out = EDITS[kind](img, rng)
    return encode(out, "jpg", 90 if kind != "jpeg" else 95)


@dataclass(frozen=True)
class Query:
    """A training-side image planted for the edit table: an edited copy of `target`, or a look-alike."""

    data: bytes
    kind: str
    """An `EDITS` key, or "lookalike" (a distinct image that must match nothing)."""
    family: str
    """"photo" or "generated"."""
    target: str | None
    """The eval item it copies (None for a look-alike)."""


def plant_edits(evals: list[tuple[str, Image.Image]], family: str, copies: int, rng: random.Random,
                kinds: Iterable[str] = tuple(EDITS)) -> list[Query]:
    """`copies` edited copies of every eval image for every edit kind (parameters drawn anew each time)."""
    return [Query(edited_copy(img, kind, rng), kind, family, name)
            for kind in kinds for name, img in evals for _ in range(copies)]


def plant_lookalikes(images: Iterable[Image.Image], family: str, rng: random.Random) -> list[Query]:
    """Each look-alike as it is (JPEG q90) and once more under a random single edit."""
    out = []
    for img in images:
        out.append(Query(encode(img, "jpg", 90), "lookalike", family, None))
        out.append(Query(edited_copy(img, rng.choice(sorted(SINGLE_EDITS)), rng), "lookalike", family, None))
    return out


def edit_table(queries: list[Query], found: list[set[str]]) -> dict[str, dict]:
    """Per family: recall per edit kind, precision over every match reported, look-alikes matched.

    `found[i]`: the eval item ids matched for `queries[i]`.
    """
    out: dict[str, dict] = {}
    for family in sorted({q.family for q in queries}):
        rows = [(q, f) for q, f in zip(queries, found, strict=True) if q.family == family]
        recall, tp, fp = {}, 0, 0
        for kind in EDITS:
            hits = [q.target in f for q, f in rows if q.kind == kind]
            if hits:
                recall[kind] = {"found": sum(hits), "planted": len(hits), "recall": round(sum(hits) / len(hits), 4)}
        for q, f in rows:
            tp += q.target in f
            fp += len(f - {q.target})
        look = [f for q, f in rows if q.kind == "lookalike"]
        out[family] = {"recall": recall, "matches": tp + fp, "false_matches": fp,
                       "precision": round(tp / (tp + fp), 4) if tp + fp else 1.0,
                       "lookalikes": len(look), "lookalikes_matched": sum(bool(f) for f in look)}
    return out
