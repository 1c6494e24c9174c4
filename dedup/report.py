"""report.html: one self-contained file (thumbnails as data: URIs) that opens offline.

Per eval set: a summary table, then the first matched pairs side by side
(training image | eval image, captions, kind, score). A small script at the
end counts thumbnails that decoded (naturalWidth > 0) and writes the result
into the page, so a reader sees at a glance that nothing is broken and the
test can check it from the DOM.
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from dedup.image import decode
from pipeline.shards import atomic_write_bytes, get_fs

if TYPE_CHECKING:
    from dedup.evalsets import EvalSet

THUMB_SIDE = 160

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f3f3f3}img{max-width:160px;max-height:160px;display:block}
.pair td.cap{max-width:320px;font-size:90%}.muted{color:#777}
"""

CHECK_JS = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var p = document.getElementById('thumb-check');
  p.setAttribute('data-total', imgs.length);
  p.setAttribute('data-ok', ok);
  p.textContent = ok + ' of ' + imgs.length + ' thumbnails loaded';
});
"""


def small_jpeg(data: bytes | None, side: int = 160) -> bytes | None:
    """A JPEG at most `side` pixels a side, or None when the bytes are not an image. Match tasks keep
    one per reported training sample (the image itself is not kept); the report draws from them."""
    img = decode(data) if data else None
    if img is None:
        return None
    h, w = img.shape[:2]
    scale = min(1.0, side / max(h, w))
    if scale < 1.0:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return np.asarray(buf).tobytes() if ok else None


def thumb_uri(data: bytes | None) -> str | None:
    """A small JPEG as a data: URI, or None when the bytes are not an image."""
    jpeg = small_jpeg(data, THUMB_SIDE)
    return None if jpeg is None else "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def _img(uri: str | None) -> str:
    return f'<img src="{uri}" alt="">' if uri else '<span class="muted">(no image)</span>'


def write_report(eval_sets: Sequence[EvalSet], summary: dict[str, Any], matches: list[dict],
                 train_images: dict[str, bytes], report_keys: dict[str, set[str]], path: str) -> None:
    """report.html for `matches`; pairs are drawn for the keys in report_keys[eval set] (images from train_images)."""
    e = html.escape
    by_set: dict[str, list[dict]] = defaultdict(list)
    for m in matches:
        if m["key"] in report_keys.get(m["eval_set"], ()):
            by_set[m["eval_set"]].append(m)
    c = summary["corpus"]
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>Data-overlap audit</title><style>{CSS}</style>"
           "</head><body><h1>Data-overlap audit</h1>",
           f"<p>Corpus <code>{e(str(c['input']))}</code>: {c['rows']} samples in, {c['written']} written, "
           f"{c['dropped']} dropped for eval overlap, {c['failed']} failed.</p>",
           "<p id='thumb-check' class='muted'>thumbnail check did not run (JavaScript off)</p>"]
    train_uri: dict[str, str | None] = {}
    for es in eval_sets:
        s = summary["eval_sets"][es.name]
        th = s["thresholds"]
        out.append(f"<h2>{e(es.name)}</h2><table><tr><th>kind</th><th>items</th><th>items with overlap</th>"
                   "<th>overlap</th><th>training samples removed</th><th>image matches</th><th>text matches</th>"
                   "<th>thresholds</th></tr>"
                   f"<tr><td>{e(s['kind'])} ({e(s['layout'])})</td><td>{s['items']}</td><td>{s['items_with_overlap']}"
                   f"</td><td>{s['overlap_pct']:.2f}%</td><td>{s['train_samples_removed']}</td>"
                   f"<td>{s['matches']['image']}</td><td>{s['matches']['text']}</td>"
                   f"<td>Jaccard &ge; {th['text_jaccard']} ({th['ngram']}-grams); Hamming &le; "
                   f"{th['image_max_distance']}/64 and thumbnail correlation &ge; {th['image_min_similarity']}</td>"
                   "</tr></table>")
        pairs = by_set.get(es.name, [])
        if not pairs:
            out.append("<p class='muted'>No overlap found.</p>")
            continue
        shown_keys = len({m["key"] for m in pairs})
        if shown_keys < s["train_samples_removed"]:
            out.append(f"<p class='muted'>Showing {shown_keys} of {s['train_samples_removed']} training samples; "
                       "audit/overlap.parquet lists every match.</p>")
        items = {it.id: it for it in es.items}
        eval_uri: dict[str, str | None] = {}
        out.append("<table class='pair'><tr><th>training image</th><th>eval image</th><th>training sample</th>"
                   "<th>eval item</th><th>kind</th><th>score</th></tr>")
        for m in pairs:
            if m["key"] not in train_uri:
                train_uri[m["key"]] = thumb_uri(train_images.get(m["key"]))
            item = items[m["eval_item"]]
            if item.id not in eval_uri:
                eval_uri[item.id] = thumb_uri(es.read_image(item))
            score = f"{m['score']:.0f} bits (corr {m['similarity']:.3f})" if m["kind"] == "image" else \
                f"Jaccard {m['score']:.3f}"
            eval_caps = "<br>".join(e(cap) for cap in item.captions[:5])
            out.append(f"<tr><td>{_img(train_uri[m['key']])}</td><td>{_img(eval_uri[item.id])}</td>"
                       f"<td class='cap'><code>{e(m['key'])}</code> {e(m['uid'] or '')}<br>{e(m['caption'] or '')}</td>"
                       f"<td class='cap'><code>{e(item.id)}</code><br>{eval_caps}</td><td>{e(m['kind'])}</td>"
                       f"<td>{e(score)}</td></tr>")
        out.append("</table>")
    out.append(f"<script>{CHECK_JS}</script></body></html>")
    fs, _ = get_fs(path)
    atomic_write_bytes(fs, path, "\n".join(out).encode("utf-8"))
