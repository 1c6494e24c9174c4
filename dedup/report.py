"""report.html: one self-contained file (thumbnails as data: URIs) that opens offline.

Per eval set (--eval): a summary table, then the first matched pairs side by side
(training image | eval image, captions, kind, score). With build_corpus --dedup-within,
a section "Near-duplicates within the corpus" (counts per kind, the largest clusters:
the kept sample beside removed members), in the same page, or alone without --eval.
A small script at the end counts thumbnails that decoded (naturalWidth > 0) and writes
the result into the page, so a reader sees at a glance that nothing is broken and the
test can check it from the DOM.
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pyarrow.parquet as pq

from dedup.image import decode
from pipeline.job import AccountingError
from pipeline.shards import atomic_write_bytes, get_fs

if TYPE_CHECKING:
    from dedup.evalsets import EvalSet

THUMB_SIDE = 160

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f3f3f3}img{max-width:160px;max-height:160px;display:block}
.pair td.cap{max-width:320px;font-size:90%}.muted{color:#777}
.near td{max-width:180px;font-size:85%}.near td.kept{background:#eef7ee}.near td.removed{background:#fbeeee}
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


def jpeg_uri(jpeg: bytes | None) -> str | None:
    """JPEG bytes as a data: URI (None stays None)."""
    return None if jpeg is None else "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def thumb_uri(data: bytes | None) -> str | None:
    """A small JPEG as a data: URI, or None when the bytes are not an image."""
    return jpeg_uri(small_jpeg(data, THUMB_SIDE))


def _img(uri: str | None) -> str:
    return f'<img src="{uri}" alt="">' if uri else '<span class="muted">(no image)</span>'


def _head(title: str, corpus: dict[str, Any]) -> list[str]:
    e = html.escape
    c = corpus
    return [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}</style>"
            f"</head><body><h1>{e(title)}</h1>",
            f"<p>Corpus <code>{e(str(c['input']))}</code>: {c['rows']} samples in, {c['written']} written, "
            f"{c['dropped']} dropped, {c['failed']} failed.</p>",
            "<p id='thumb-check' class='muted'>thumbnail check did not run (JavaScript off)</p>"]


def _finish(out: list[str], sections: Sequence[str], path: str) -> None:
    out.extend(sections)
    out.append(f"<script>{CHECK_JS}</script></body></html>")
    fs, _ = get_fs(path)
    atomic_write_bytes(fs, path, "\n".join(out).encode("utf-8"))


def write_page(corpus: dict[str, Any], sections: Sequence[str], path: str) -> None:
    """report.html holding only `sections` (build_corpus --dedup-within without --eval)."""
    _finish(_head("Corpus audit", corpus), sections, path)


@dataclass(frozen=True)
class NearSection:
    """What the near-duplicate section is drawn from (small: it travels to the task that writes the page)."""

    summary: dict[str, Any]
    """pipeline.near_dedup.NearClusterStep's summary: counts per kind and the clusters to show ("report")."""
    shown_files: list[str]
    """The near_thumbs step's files (pipeline.near_dedup.SHOWN_SCHEMA): key, caption, JPEG of each shown row."""
    rules: dict[str, Any]
    """The comparison's settings, as the page states them (text_threshold, ngram, image_max_distance,
    image_min_similarity)."""

    def html(self, fs: Any) -> str:
        shown: dict[int, dict[str, Any]] = {}
        for path in self.shown_files:
            with fs.open(path, "rb") as f:
                shown.update({r["row"]: r for r in pq.read_table(f).to_pylist()})
        return near_section(self.summary, shown, self.rules)


def near_section(summary: dict[str, Any], shown: dict[int, dict[str, Any]], rules: dict[str, Any]) -> str:
    """The section: counts per kind, then each shown cluster as a row (kept sample | removed members)."""
    e = html.escape
    r = rules
    rule = {"text": f"caption Jaccard &ge; {r['text_threshold']} ({r['ngram']}-grams)",
            "image": f"whole-image hash Hamming &le; {r['image_max_distance']}/64 and thumbnail correlation "
                     f"&ge; {r['image_min_similarity']}"}
    kinds = list(summary["removed"])
    out = ["<h2 id='near-duplicates'>Near-duplicates within the corpus</h2>",
           "<table><tr><th>kind</th><th>clusters</th><th>samples removed</th><th>rule (clusters joined "
           "transitively; the lowest row of each stays, unless it is itself removed as the other kind's "
           "duplicate)</th></tr>"]
    for k in kinds:
        out.append(f"<tr><td>{e(k)}</td><td>{summary['clusters_by_kind'][k]}</td><td>{summary['removed'][k]}</td>"
                   f"<td>{rule.get(k, '')}</td></tr>")
    out.append("</table><p class='muted'>The largest clusters of each kind (ties: the lowest kept row), with their "
               "lowest removed members; the manifest lists every removed sample (reason "
               "<code>near_duplicate:KIND</code>, <code>duplicate_of</code> the kept sample's key).</p>")

    def cell(row: int, cls: str, label: str | None = None) -> str:
        s = shown.get(row)
        if s is None:
            raise AccountingError(f"near-duplicate report: the near_thumbs step's files hold no row {row}; delete "
                                  "the output folder's _steps/near_thumbs* and rerun")
        return (f"<td class='{cls}' data-key='{e(s['key'])}'>{_img(jpeg_uri(s['jpeg']))}{e(label or cls)} "
                f"<code>{e(s['key'])}</code><br>{e(s['caption'] or '')}</td>")

    for k in kinds:
        clusters = [c for c in summary["report"] if c["kind"] == k]
        out.append(f"<h3>{e(k)} clusters</h3>")
        if not clusters:
            out.append("<p class='muted'>None found.</p>")
            continue
        out.append(f"<table class='near' data-kind='{e(k)}'>")
        for c in clusters:
            more = c["size"] - 1 - len(c["shown"])
            fate = c.get("root_fate")  # the root removed as the other kind's duplicate: not "kept"
            kept = cell(c["root"], "kept") if not fate else cell(c["root"], "removed",
                                                                 f"removed too ({fate[1]} duplicate)")
            out.append(f"<tr class='cluster' data-root='{e(shown[c['root']]['key'])}' data-size='{c['size']}'>"
                       f"<th>{c['size']} samples</th>{kept}"
                       + "".join(cell(m, "removed") for m in c["shown"])
                       + (f"<td class='muted'>and {more} more removed</td>" if more > 0 else "") + "</tr>")
        out.append("</table>")
    return "\n".join(out)


def write_report(eval_sets: Sequence[EvalSet], summary: dict[str, Any], matches: list[dict],
                 train_images: dict[str, bytes], report_keys: dict[str, set[str]], path: str,
                 sections: Sequence[str] = ()) -> None:
    """report.html for `matches`; pairs are drawn for the keys in report_keys[eval set] (images from train_images);
    `sections` (HTML, the near-duplicate section) follow the eval sets'."""
    e = html.escape
    by_set: dict[str, list[dict]] = defaultdict(list)
    for m in matches:
        if m["key"] in report_keys.get(m["eval_set"], ()):
            by_set[m["eval_set"]].append(m)
    out = _head("Data-overlap audit", summary["corpus"])
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
    _finish(out, sections, path)
