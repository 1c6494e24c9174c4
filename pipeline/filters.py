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
                    cut = cleaned[: self.max_chars]
                    # Cut at a word boundary when there is one in the last fifth.
                    space = cut.rfind(" ")
                    cleaned = cut[:space] if space > self.max_chars * 0.8 else cut
                    self.stats["caption_truncated"] += 1
                s.caption = cleaned
            yield s


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
