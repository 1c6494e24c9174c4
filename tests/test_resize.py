"""pipeline.resize: img2dataset's geometry without its memory, its imports or its per-image setup."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from pipeline.download import ErrorLog, ResizeStage
from pipeline.resize import DEFAULT_MAX_DECODE_BYTES, ImageError, Resizer, read_header
from pipeline.sample import Sample

pytestmark = pytest.mark.timeout(180)
MiB = 2**20


def photo(w: int, h: int, seed: int) -> np.ndarray:
    """An RGB array with detail at every scale (gradients, noise octaves, pixel noise): resampling shows."""
    rng = np.random.default_rng(seed)
    x, y = np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)
    img = np.stack([128 + 60 * np.outer(np.cos(y / (h / 3)), np.sin(x / (w / (2 + c)) + c)) for c in range(3)], axis=-1)
    for octave in (4, 16, 64):
        n = rng.standard_normal((h // octave + 2, w // octave + 2, 3), dtype=np.float32) * (30 / octave**0.3)
        img += cv2.resize(n, (w, h), interpolation=cv2.INTER_CUBIC)
    img += rng.standard_normal(img.shape, dtype=np.float32) * 6
    return np.clip(img, 0, 255).astype(np.uint8)


def pattern(w: int, h: int) -> np.ndarray:
    """A cheap RGB array (gradients and a tiled texture): for tests of memory, not of looks."""
    tile = np.random.default_rng(0).integers(0, 64, (64, 64, 3), dtype=np.uint8)
    img = np.tile(tile, (h // 64 + 1, w // 64 + 1, 1))[:h, :w]
    img += np.linspace(0, 150, w, dtype=np.float32).astype(np.uint8)[None, :, None]
    return img


def pil_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def cv2_png(arr: np.ndarray, level: int = 3) -> bytes:
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, level])
    assert ok
    return buf.tobytes()


def with_alpha(rgb: np.ndarray) -> np.ndarray:
    """RGBA: a horizontal alpha ramp, fully transparent to opaque, and a transparent hole."""
    h, w = rgb.shape[:2]
    alpha = np.broadcast_to(np.linspace(0, 255, w, dtype=np.float32), (h, w)).astype(np.uint8).copy()
    alpha[h // 3: h // 2, w // 3: w // 2] = 0
    return np.dstack([rgb, alpha])


def image_set() -> dict[str, tuple[bytes, bytes | None]]:
    """name -> (image bytes, the bytes img2dataset is compared on when not the same: 8-bit twins of 16-bit images)."""
    out: dict[str, tuple[bytes, bytes | None]] = {}
    for w, h in [(3000, 2000), (1199, 1901), (1024, 768), (640, 480), (300, 200), (100, 90), (256, 256),
                 (257, 1000), (2400, 500)]:
        out[f"jpeg {w}x{h}"] = (pil_bytes(Image.fromarray(photo(w, h, w)), "JPEG", quality=92), None)
    p = Image.fromarray(photo(1600, 1100, 1))
    out["progressive jpeg 1600x1100"] = (pil_bytes(p, "JPEG", quality=90, progressive=True), None)
    out["gray jpeg 1300x1000"] = (pil_bytes(Image.fromarray(photo(1300, 1000, 2)).convert("L"), "JPEG"), None)
    out["cmyk jpeg 1100x800"] = (pil_bytes(Image.fromarray(photo(1100, 800, 3)).convert("CMYK"), "JPEG"), None)
    out["cmyk jpeg 300x200"] = (pil_bytes(Image.fromarray(photo(300, 200, 4)).convert("CMYK"), "JPEG"), None)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": neither applies it (IMREAD_UNCHANGED ignores EXIF)
    out["exif-rotated jpeg 2100x1060"] = (pil_bytes(Image.fromarray(photo(2100, 1060, 5)), "JPEG", exif=exif), None)
    out["exif-rotated jpeg 500x300"] = (pil_bytes(Image.fromarray(photo(500, 300, 6)), "JPEG", exif=exif), None)
    mpo = Image.fromarray(photo(800, 600, 7))
    out["mpo 800x600"] = (pil_bytes(mpo, "MPO", save_all=True, append_images=[Image.new("RGB", (800, 600))]), None)
    out["png 700x500"] = (pil_bytes(Image.fromarray(photo(700, 500, 8)), "PNG"), None)
    out["gray png 500x400"] = (pil_bytes(Image.fromarray(photo(500, 400, 9)).convert("L"), "PNG"), None)
    out["1-bit png 300x200"] = (pil_bytes(Image.fromarray(photo(300, 200, 10)).convert("1"), "PNG"), None)
    rgba = with_alpha(photo(900, 700, 11))
    out["rgba png 900x700"] = (pil_bytes(Image.fromarray(rgba), "PNG"), None)
    out["rgba png 120x100 (upscaled)"] = (pil_bytes(Image.fromarray(rgba[:100, :120].copy()), "PNG"), None)
    out["la png 400x300"] = (pil_bytes(Image.fromarray(rgba[:300, :400]).convert("LA"), "PNG"), None)
    pal = Image.fromarray(photo(400, 300, 12)).convert("P")
    out["palette png 400x300"] = (pil_bytes(pal, "PNG"), None)
    out["palette png with tRNS 400x300"] = (pil_bytes(pal, "PNG", transparency=7), None)
    # 16-bit: img2dataset writes them as white (OpenCV saturates 16-bit to 8 when encoding a
    # JPEG; the test shows it), so we are compared with img2dataset on the same image in 8 bits.
    base = photo(600, 400, 13)
    bgr16, bgra16 = base[..., ::-1].astype(np.uint16) * 257, with_alpha(base)[..., [2, 1, 0, 3]].astype(np.uint16) * 257
    out["16-bit gray png 600x400"] = (cv2_png(base[..., 0].astype(np.uint16) * 257), cv2_png(base[..., 0]))
    out["16-bit rgb png 600x400"] = (cv2_png(bgr16), cv2_png(base[..., ::-1].copy()))
    out["16-bit rgba png 600x400"] = (cv2_png(bgra16), cv2_png(with_alpha(base)[..., [2, 1, 0, 3]].copy()))
    out["webp 800x600"] = (pil_bytes(Image.fromarray(photo(800, 600, 14)), "WEBP", quality=90), None)
    out["rgba webp 500x400"] = (pil_bytes(Image.fromarray(with_alpha(photo(500, 400, 15))), "WEBP", lossless=True), None)
    out["bmp 400x300"] = (pil_bytes(Image.fromarray(photo(400, 300, 16)), "BMP"), None)
    out["tiff 500x400"] = (pil_bytes(Image.fromarray(photo(500, 400, 17)), "TIFF"), None)
    out["rgba tiff 500x400"] = (pil_bytes(Image.fromarray(with_alpha(photo(500, 400, 18))), "TIFF"), None)
    gif = Image.fromarray(photo(400, 300, 19)).convert("P")
    out["gif 400x300"] = (pil_bytes(gif, "GIF"), None)
    return out


@pytest.fixture(scope="module")
def images() -> dict[str, tuple[bytes, bytes | None]]:
    return image_set()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def decoded(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("mode, size", [("center_crop", 256), ("keep_ratio", 64), ("border", 224)])
def test_same_output_as_img2dataset_resizer(images, mode, size):
    from img2dataset.resizer import Resizer as Img2datasetResizer  # imports torch: seconds, once

    ours = Resizer(size, mode, "jpg", 95)
    ref = Img2datasetResizer(image_size=size, resize_mode=mode, resize_only_if_bigger=False, encode_format="jpg",
                             encode_quality=95)
    reduced = 0
    for name, (body, ref_body) in images.items():
        header = read_header(body)
        reduced += ours.plan(header).reduce > 1
        data, width, height = ours(body, header)
        expect, ew, eh, ow, oh, err = ref(io.BytesIO(ref_body or body))
        assert err is None, (name, err)
        a, b = decoded(data), decoded(expect)
        assert (width, height) == (ew, eh) and a.shape == b.shape, (name, a.shape, b.shape)
        assert (header.width, header.height) == (ow, oh), name
        assert psnr(a, b) >= 35, (name, psnr(a, b))
        if ref_body is not None:  # the justification for comparing on the 8-bit twin
            broken = decoded(ref(io.BytesIO(body))[0])
            assert psnr(broken, b) < 20, (name, "img2dataset no longer breaks 16-bit images: compare directly")
    # The reduced-scale JPEG decode was exercised, not only the full one.
    assert reduced >= 4, reduced


def test_large_jpeg_is_decoded_at_reduced_scale():
    body = pil_bytes(Image.fromarray(pattern(4000, 3000)), "JPEG", quality=90)
    r = Resizer(256, "center_crop", "jpg", 95)
    plan = r.plan(read_header(body))
    assert plan.reduce == 4 and plan.decoded == (1000, 750) and plan.resized == (341, 256)
    assert r(body, read_header(body))[1:] == (256, 256)
    # At full scale the decode alone would need 2 x 36 MB; reduced, under 8 MiB beyond the decoder's own state.
    assert plan.decode_bytes < 8 * MiB + 8 * MiB


def test_over_budget_is_refused_before_decoding(monkeypatch):
    body = pil_bytes(Image.fromarray(with_alpha(photo(800, 600, 2))), "PNG")
    header = read_header(body)
    r = Resizer(256, "center_crop", "jpg", 95, max_decode_bytes=10 * MiB)
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded an image over budget"))
    with pytest.raises(ImageError) as info:
        r(body, header)
    assert info.value.reason == "decompression_bomb"
    assert "800x600 PNG" in info.value.detail and "--max-decode-bytes 10 MiB" in info.value.detail
    # The stage: failed with the reason and the detail, counted, the task goes on.
    errors = ErrorLog()
    stage = ResizeStage(256, "center_crop", "jpg", 95, errors, max_decode_bytes=10 * MiB)
    (s,) = stage(iter([Sample(key="0", row=0, url="http://x/a.png", caption="c", image=body)]))
    assert (s.status, s.reason, s.image) == ("failed", "decompression_bomb", None)
    assert "needs" in s.error and errors.counts == {"decompression_bomb": 1}


def test_undecodable_image_is_a_decode_error():
    body = pil_bytes(Image.fromarray(photo(300, 200, 3)), "PNG")
    broken = body[:200] + bytes(len(body) - 200)  # a valid header, garbage pixels
    errors = ErrorLog()
    (s,) = ResizeStage(64, "center_crop", "jpg", 95, errors)(
        iter([Sample(key="0", row=0, url="u", caption="c", image=broken)]))
    assert (s.status, s.reason) == ("failed", "decode_error") and s.error


def test_default_budget_is_the_configs():
    from pipeline.config import BuildConfig

    assert BuildConfig(urls="x", out="y").max_decode_bytes == DEFAULT_MAX_DECODE_BYTES


# Measures what each decode allocates: peak RSS (VmHWM, reset through clear_refs) above the
# RSS before it. MALLOC_MMAP_THRESHOLD_ makes glibc map every large block fresh and unmap it
# on free, so memory freed by an earlier image is not silently reused by the next one.
MEASURE = textwrap.dedent("""
    import json, sys
    from pipeline.resize import Resizer, read_header
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    r = Resizer(256, "center_crop", "jpg", 95, max_decode_bytes=2**40)
    out = {}
    for path in sys.argv[1:]:
        body = open(path, "rb").read()
        header = read_header(body)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS:")
        r(body, header)
        out[path] = [status("VmHWM:") - before, r.plan(header).decode_bytes]
    print(json.dumps(out))
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs /proc/self/clear_refs")
def test_decode_estimate_covers_what_opencv_allocates(tmp_path):
    big = pattern(3000, 2000)
    files = {
        "jpeg.jpg": pil_bytes(Image.fromarray(big), "JPEG", quality=90),
        "progressive.jpg": pil_bytes(Image.fromarray(big), "JPEG", quality=90, progressive=True),
        "gray.jpg": pil_bytes(Image.fromarray(big).convert("L"), "JPEG", quality=90),
        "rgb.png": pil_bytes(Image.fromarray(big), "PNG", compress_level=1),
        "rgba.png": pil_bytes(Image.fromarray(with_alpha(big)), "PNG", compress_level=1),
        "gray.png": pil_bytes(Image.fromarray(big).convert("L"), "PNG", compress_level=1),
        "rgba16.png": cv2_png(with_alpha(big).astype(np.uint16) * 257, level=1),
        "palette.png": pil_bytes(Image.fromarray(big).convert("P"), "PNG", compress_level=1, transparency=3),
        "rgb.webp": pil_bytes(Image.fromarray(big), "WEBP", quality=80, method=0),
        "rgb.bmp": pil_bytes(Image.fromarray(big), "BMP"),
        "rgb.tiff": pil_bytes(Image.fromarray(big), "TIFF"),
        "rgb.gif": pil_bytes(Image.fromarray(big[:1000]).convert("P"), "GIF"),
    }
    for name, body in files.items():
        (tmp_path / name).write_bytes(body)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    r = subprocess.run([sys.executable, "-c", MEASURE, *(str(tmp_path / n) for n in files)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for path, (used, estimate) in json.loads(r.stdout).items():
        name = Path(path).name
        assert used <= estimate, f"{name}: used {used / MiB:.1f} MiB, estimated {estimate / MiB:.1f}"
        # ... and not so far above it that good images are refused.
        assert estimate <= 2 * used + 16 * MiB, f"{name}: used {used / MiB:.1f} MiB, estimated {estimate / MiB:.1f}"
