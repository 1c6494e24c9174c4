"""Filters decide; the base class counts and routes (DataTrove's BaseFilter habit).

A filter implements `keep(sample) -> bool | str`: True keeps, False drops under
the filter's `name`, a string drops under that reason. Only pending samples are
judged; decided ones flow through untouched so the writer can account for them.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterator

from pipeline.sample import Sample


class Filter:
    name = "filter"

    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()

    def keep(self, sample: Sample) -> bool | str:
        raise NotImplementedError

    def __call__(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        for s in samples:
            if s.pending:
                self.stats["seen"] += 1
                verdict = self.keep(s)
                if verdict is True:
                    self.stats["kept"] += 1
                else:
                    reason = verdict if isinstance(verdict, str) else self.name
                    self.stats[f"dropped:{reason}"] += 1
                    s.drop(reason)
            yield s


_WS = re.compile(r"\s+")


def clean_caption(text: str | None) -> str:
    """Control and format characters out (tabs/newlines become spaces), whitespace folded."""
    if not text:
        return ""
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "\t\n\r\v\f":
            out.append(" ")
        elif cat in ("Cc", "Cf", "Cs", "Co"):
            continue
        else:
            out.append(ch)
    return _WS.sub(" ", "".join(out)).strip()


class CaptionCleaner:
    """Mapper, not a filter: cleans captions and truncates over-long ones (when told to)."""

    def __init__(self, max_chars: int, truncate: bool):
        self.max_chars, self.truncate = max_chars, truncate
        self.stats: Counter[str] = Counter()

    def __call__(self, samples: Iterator[Sample]) -> Iterator[Sample]:
        for s in samples:
            if s.pending:
                cleaned = clean_caption(s.caption)
                if cleaned != (s.caption or "").strip():
                    self.stats["caption_cleaned"] += 1
                if self.truncate and len(cleaned) > self.max_chars:
                    cleaned = self.truncated(cleaned)
                s.caption = cleaned
            yield s

    def truncated(self, cleaned: str) -> str:
        """A cleaned caption cut to max_chars, at a word boundary when there is one in the last fifth."""
        self.stats["caption_truncated"] += 1
        cut = cleaned[: self.max_chars]
        space = cut.rfind(" ")
        return cut[:space] if space > self.max_chars * 0.8 else cut


class DuplicateUrlFilter(Filter):
    """Drops rows whose URL appeared earlier in the input (flag computed by the driver,
    which is the only place that sees every row)."""

    name = "duplicate_url"

    def keep(self, sample: Sample) -> bool | str:
        return not sample.meta.pop("duplicate_url", False)


class CaptionFilter(Filter):
    name = "caption"

    def __init__(self, min_words: int, min_chars: int, max_chars: int, drop_long: bool):
        super().__init__()
        self.min_words, self.min_chars, self.max_chars, self.drop_long = min_words, min_chars, max_chars, drop_long

    def keep(self, sample: Sample) -> bool | str:
        text = sample.caption or ""
        if not text.strip():
            return "empty_caption"
        if len(text.split()) < self.min_words or len(text) < self.min_chars:
            return "caption_too_short"
        if self.drop_long and len(text) > self.max_chars:
            return "caption_too_long"
        return True


class ImageSizeFilter(Filter):
    """Judges the original size read from the image header, before any decoding."""

    name = "image_size"

    def __init__(self, min_side: int, max_aspect_ratio: float):
        super().__init__()
        self.min_side, self.max_aspect_ratio = min_side, max_aspect_ratio

    def keep(self, sample: Sample) -> bool | str:
        w, h = sample.meta["original_width"], sample.meta["original_height"]
        if min(w, h) < self.min_side:
            return "image_too_small"
        if max(w, h) / max(1, min(w, h)) > self.max_aspect_ratio:
            return "aspect_ratio_too_large"
        return True


# -- the same decisions over a whole column at once (build_corpus's rows that need no download) -----

# ASCII control characters other than the tab family: removed, as clean_caption removes category Cc.
_ASCII_CONTROL = r"[\x00-\x08\x0e-\x1f\x7f]"


def clean_captions(captions: list[str | None], cleaner: CaptionCleaner) -> list[str]:
    """clean_caption (and the cleaner's truncation) over a column, with the cleaner's counters.

    ASCII captions are cleaned by Arrow kernels in one pass (the same rules: tab family to a
    space, other control characters out, whitespace folded, ends stripped); any other caption
    goes through clean_caption itself, so the result equals the per-sample stage exactly
    (a test compares them on random text).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = pa.array([c or "" for c in captions], pa.string())
    ascii_mask = pc.string_is_ascii(arr).to_numpy(zero_copy_only=False)
    fast = pc.replace_substring_regex(arr, r"[\t\n\r\x0b\x0c]", " ")
    fast = pc.replace_substring_regex(fast, _ASCII_CONTROL, "")
    fast = pc.replace_substring_regex(fast, " {2,}", " ")
    fast = pc.utf8_trim(fast, " ").to_pylist()
    # What "changed" compares with: the caption with its ends stripped (Python's str.strip()).
    stripped = pc.utf8_trim(arr, " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f").to_pylist()
    out = []
    for i, cap in enumerate(captions):
        if ascii_mask[i]:
            cleaned, before = fast[i], stripped[i]
        else:
            cleaned, before = clean_caption(cap), (cap or "").strip()
        if cleaned != before:
            cleaner.stats["caption_cleaned"] += 1
        if cleaner.truncate and len(cleaned) > cleaner.max_chars:
            cleaned = cleaner.truncated(cleaned)
        out.append(cleaned)
    return out


def decide_captions(captions: list[str | None], duplicate: list[bool], cleaner: CaptionCleaner,
                    dup_filter: DuplicateUrlFilter, cap_filter: CaptionFilter) -> tuple[list[str], list[str | None]]:
    """CaptionCleaner, DuplicateUrlFilter and CaptionFilter over whole columns: (cleaned captions,
    drop reason or None per row), with the three stages' counters exactly as the per-sample chain
    would count them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    cleaned = clean_captions(captions, cleaner)
    dup = np.asarray(duplicate, dtype=bool)
    n = len(cleaned)
    dup_filter.stats["seen"] += n
    dup_filter.stats["kept"] += int(n - dup.sum())
    if dup.any():
        dup_filter.stats[f"dropped:{dup_filter.name}"] += int(dup.sum())
    arr = pa.array(cleaned, pa.string())
    length = pc.utf8_length(arr).to_numpy()
    # Cleaned captions hold single spaces between words and none at the ends.
    words = np.where(length > 0, pc.count_substring(arr, " ").to_numpy() + 1, 0)
    reasons: list[str | None] = [None] * n
    f = cap_filter
    for i in np.flatnonzero(~dup):
        if length[i] == 0:
            r: str | None = "empty_caption"
        elif words[i] < f.min_words or length[i] < f.min_chars:
            r = "caption_too_short"
        elif f.drop_long and length[i] > f.max_chars:
            r = "caption_too_long"
        else:
            r = None
        reasons[i] = r
    for i in np.flatnonzero(dup):
        reasons[i] = dup_filter.name
    seen = int((~dup).sum())
    dropped = [r for r, d in zip(reasons, dup, strict=True) if r is not None and not d]
    f.stats["seen"] += seen
    f.stats["kept"] += seen - len(dropped)
    for r in dropped:
        f.stats[f"dropped:{r}"] += 1
    return cleaned, reasons
