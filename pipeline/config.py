"""Typed configuration: dataclasses validated on construction, filled from YAML then flags.

One way in: every field of a config dataclass is a `--flag-name`; `--config
FILE.yaml` supplies values first and flags override them. The resolved config
is written next to the outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.cli import OneLineParser
from pipeline.fetch import DEFAULT_DISALLOWED, FetchConfig


class ConfigError(ValueError):
    """A bad setting or input; main() prints it as one line and exits 2."""


T = TypeVar("T")


def _field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field (read from the source)."""
    import inspect

    docs: dict[str, str] = {}
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return docs
    for i, line in enumerate(lines[:-1]):
        name = line.strip().split(":", 1)[0]
        nxt = lines[i + 1].strip()
        if nxt.startswith('"""') and ":" in line and name.isidentifier():
            docs[name] = nxt.strip('"')
    return docs


def _base_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp


def _coerce(name: str, tp: Any, value: Any) -> Any:
    tp = _base_type(tp)
    if value is None:
        return None
    if typing.get_origin(tp) is tuple:
        # "a,b", a repeated flag (["a", "b,c"]) and a YAML list all give one flat tuple.
        items = [value] if isinstance(value, str) else value
        return tuple(v.strip() for item in items for v in str(item).split(",") if v.strip())
    if tp is bool:
        if isinstance(value, str):
            return value.lower() in ("1", "true", "yes", "on")
        return bool(value)
    if tp is int and isinstance(value, float) and not value.is_integer():
        # A YAML 2.5 (or .inf, .nan) for a count: int() would truncate it, or raise OverflowError.
        raise ConfigError(f"--{name.replace('_', '-')}: {value!r} is not a valid int")
    try:
        return tp(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"--{name.replace('_', '-')}: {value!r} is not a valid {tp.__name__}") from None


def parse_config(cls: type[T], argv: list[str] | None, description: str = "", prog: str | None = None) -> T:
    """Build `cls` from `--config FILE.yaml` and flags (flags win)."""
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    p = OneLineParser(prog=prog, description=description)
    p.add_argument("--config", help="YAML file with settings; flags override it")
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        base = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = docs.get(f.name, "") + (f" (default: {default})" if default not in (None, ()) else "")
        if base is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        elif typing.get_origin(base) is tuple:
            # Repeatable (--eval a=X --eval b=Y): a plain flag would keep only the last one.
            p.add_argument(flag, action="append", default=argparse.SUPPRESS, help=help_ + "; repeatable",
                           metavar=f.name.upper())
        else:
            p.add_argument(flag, default=argparse.SUPPRESS, help=help_, metavar=f.name.upper())
    ns = vars(p.parse_args(argv))
    values: dict[str, Any] = {}
    if ns.get("config"):
        path = Path(ns.pop("config"))
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read config ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings")
        known = {f.name for f in fields(cls)}
        for k, v in loaded.items():
            key = str(k).replace("-", "_")
            if key not in known:
                raise ConfigError(f"{path}: unknown setting {k!r}")
            values[key] = v
    ns.pop("config", None)
    values.update(ns)
    missing = [f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.name not in values]
    if missing:
        raise ConfigError("missing required setting(s): " + ", ".join("--" + m.replace("_", "-") for m in missing))
    coerced = {k: _coerce(k, hints[k], v) for k, v in values.items()}
    try:
        return cls(**coerced)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None


def to_yaml(cfg: Any) -> str:
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    return yaml.safe_dump(d, sort_keys=False)


# Names the builder writes into each sample's json or uses in its task table.
RESERVED_FIELDS = ("url", "caption", "key", "row", "duplicate_url", "sha256", "width", "height",
                   "original_width", "original_height", "status", "error_message", "exif")


@dataclass(kw_only=True, frozen=True)
class BuildConfig:
    """Settings of jobs/build_corpus.py."""

    urls: str
    """Input: a parquet/csv/tsv/jsonl file, a folder of them, or a glob."""
    out: str
    """Output folder (local path or fsspec URL)."""
    url_col: str = "url"
    """Column holding the image URL."""
    caption_col: str = "caption"
    """Column holding the caption."""
    extra_cols: tuple[str, ...] = ()
    """Comma-separated extra columns carried into each sample's json with their types (e.g. uid,similarity)."""
    header: bool = True
    """csv/tsv files start with a header line; --no-header: columns are named by position (--url-col 1 --caption-col 0)."""
    samples_per_shard: int = 1000
    """Samples in every shard but the last."""
    rows_per_task: int = 1000
    """Input rows per download task (one Ray task each)."""
    dedup_buckets: int | None = None
    """Hash buckets of the exact-dedup steps, one task each (default: one per 4M input rows; a resume keeps
    the first run's); which row wins does not depend on it."""
    threads: int = 32
    """Download threads per task."""
    tasks_per_cpu: int = 4
    """Download tasks run at once per CPU, so that one task's network waits (its stragglers' deadlines, its
    retries' backoffs) overlap another's decoding instead of idling the core; each is a Ray worker process."""
    num_cpus: int | None = None
    """CPUs of the local Ray started when no cluster address is given (default: all)."""
    ray_address: str | None = None
    """Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)."""
    executor: str = "ray"
    """ray, or local (in this process, no Ray: for debugging)."""
    timeout: float = 10.0
    """Total deadline in seconds per request, redirects and body included."""
    retries: int = 2
    """Retries for transient failures (timeouts, 429, 5xx), with backoff."""
    retry_backoff: float = 0.5
    """First retry backoff in seconds (doubles each retry)."""
    max_body_bytes: int = 20 * 2**20
    """Largest response body accepted."""
    max_redirects: int = 5
    """Redirect hops followed, each checked against the address policy."""
    user_agent_token: str = "clipforge"
    """Token in the user agent, matched by X-Robots-Tag opt-outs."""
    disallowed_header_directives: tuple[str, ...] = DEFAULT_DISALLOWED
    """X-Robots-Tag directives that opt an image out."""
    allow_hosts: tuple[str, ...] = ()
    """HOST:PORT or [IPV6]:PORT entries reachable although not public (e.g. 127.0.0.1:8000); no port: any port."""
    max_image_pixels: int = 89_478_485
    """Images whose header claims more pixels are refused before decoding (PIL's bomb limit)."""
    max_decode_bytes: int = 288 * 2**20
    """Images whose decode and resize would allocate more bytes at once are refused before decoding."""
    image_size: int = 256
    """Output image side in pixels."""
    resize_mode: str = "center_crop"
    """center_crop, keep_ratio or border."""
    encode_format: str = "jpg"
    """jpg or webp."""
    encode_quality: int = 95
    """Encoder quality (1-100)."""
    min_caption_words: int = 2
    """Captions with fewer words are dropped."""
    min_caption_chars: int = 5
    """Captions with fewer characters are dropped."""
    max_caption_chars: int = 1000
    """Longer captions are truncated or dropped (see long_captions)."""
    long_captions: str = "truncate"
    """truncate or drop."""
    min_image_side: int = 64
    """Images whose original short side is smaller are dropped."""
    max_aspect_ratio: float = 3.0
    """Images with a larger long/short side ratio are dropped (DataComp's basic filter)."""
    eval: tuple[str, ...] = ()
    """NAME=PATH evaluation sets whose overlapping samples are removed before sharding."""
    # What counts as overlap with --eval: the same settings as jobs/audit_overlap.py's
    # (dedup.matcher.MatchConfig; a test keeps the defaults equal), named for this job,
    # where --min-caption-words already means the caption filter.
    text_threshold: float = 0.8
    """--eval and --dedup-within: minimum exact Jaccard of caption shingles for a text match."""
    ngram: int = 3
    """--eval and --dedup-within: words per caption shingle."""
    image_max_distance: int = 10
    """--eval and --dedup-within: perceptual-hash candidate distance in bits of 64."""
    image_min_similarity: float = 0.96
    """--eval and --dedup-within: thumbnail correlation a candidate image needs to count as the same image."""
    overlap_kinds: tuple[str, ...] = ("image", "text")
    """--eval: which matches remove a sample: image, text or both (templated captions: image only)."""
    overlap_min_caption_words: int = 0
    """--eval and --dedup-within: captions with fewer words are never text-matched."""
    dedup_within: tuple[str, ...] = ()
    """Remove near-duplicates within the corpus: text (captions), image or both, by the --eval settings above; the lowest row of each cluster stays."""
    # CLIP-score filter: scoring.job.ScoreSettings's fields, named for this job (a test keeps the defaults equal).
    clip_filter: str | None = None
    """Filter by CLIP score with this model (an open_clip name or NAME.json, as the trainer's --model)."""
    clip_pretrained: str | None = None
    """--clip-filter: the weights (a checkpoint file or URL, clipforge's trainer's included, or a cached open_clip tag)."""
    clip_score_min: float | None = None
    """--clip-filter: keep samples whose image-caption cosine is at least this (LAION: 0.28 to 0.3 with ViT-B/32)."""
    clip_score_top_frac: float | None = None
    """--clip-filter: keep this top fraction of the corpus by score (a global quantile; DataComp: 0.3)."""
    score_bins: int = 2000
    """--clip-filter: histogram bins over [-1, 1] for --clip-score-top-frac."""
    clip_batch_size: int = 256
    """--clip-filter: images and captions embedded together."""
    clip_device: str = "auto"
    """--clip-filter: auto (one GPU per actor when the cluster has GPUs, else CPU), cpu or cuda."""
    clip_cpus_per_actor: int = 1
    """--clip-filter: cores of each CPU actor."""
    progress_every: float = 5.0
    """Seconds between progress lines."""
    keep_parts: bool = False
    """Keep the scratch folders (parts/, _input/, ...) after success; by default they are removed."""

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for f in fields(self):
            v = getattr(self, f.name)
            # nan passes no comparison and inf passes most: neither is ever a meaningful setting here.
            check(not (isinstance(v, float) and not math.isfinite(v)),
                  f"--{f.name.replace('_', '-')} must be a finite number, got {v}")
        for name in ("out", "urls"):
            # a/x/../b is a/b: never create a/x on the way (fsspec would), nor name a file twice.
            value = getattr(self, name)
            if value and "://" not in value:
                object.__setattr__(self, name, os.path.normpath(value))
        check(self.samples_per_shard >= 1, f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        check(self.rows_per_task >= 1, f"--rows-per-task must be >= 1, got {self.rows_per_task}")
        check(self.dedup_buckets is None or 1 <= self.dedup_buckets <= 4096,
              f"--dedup-buckets must be 1..4096, got {self.dedup_buckets}")
        check(self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        check(1 <= self.tasks_per_cpu <= 16, f"--tasks-per-cpu must be 1..16, got {self.tasks_per_cpu}")
        check(self.executor in ("ray", "local"), f"--executor must be ray or local, got {self.executor!r}")
        check(self.image_size >= 8, f"--image-size must be >= 8, got {self.image_size}")
        check(self.max_image_pixels >= 1, f"--max-image-pixels must be >= 1, got {self.max_image_pixels}")
        check(self.max_decode_bytes >= 16 * 2**20,
              f"--max-decode-bytes is in bytes and must be >= {16 * 2**20} (16 MiB: the decoders' own state "
              f"takes about 8), got {self.max_decode_bytes}")
        check(self.resize_mode in ("center_crop", "keep_ratio", "border"),
              f"--resize-mode must be center_crop, keep_ratio or border, got {self.resize_mode!r}")
        check(self.encode_format in ("jpg", "webp"), f"--encode-format must be jpg or webp, got {self.encode_format!r}")
        check(1 <= self.encode_quality <= 100, f"--encode-quality must be 1..100, got {self.encode_quality}")
        check(self.long_captions in ("truncate", "drop"), f"--long-captions must be truncate or drop, got {self.long_captions!r}")
        check(self.max_aspect_ratio >= 1, f"--max-aspect-ratio must be >= 1, got {self.max_aspect_ratio}")
        check(self.max_caption_chars >= 1, f"--max-caption-chars must be >= 1, got {self.max_caption_chars}")
        for name in ("min_caption_words", "min_caption_chars", "min_image_side", "overlap_min_caption_words"):
            check(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        check(self.num_cpus is None or self.num_cpus >= 1, f"--num-cpus must be >= 1, got {self.num_cpus}")
        check(self.progress_every > 0, f"--progress-every must be > 0 seconds, got {self.progress_every}")
        # Extra columns share the sample json (and the task table) with the fields we write:
        # a colliding name would silently overwrite one or the other.
        taken = {self.url_col: "--url-col", self.caption_col: "--caption-col",
                 **{name: "a field clipforge writes" for name in RESERVED_FIELDS}}
        for c in self.extra_cols:
            check(c not in taken, f"--extra-cols: {c!r} clashes with {taken.get(c)} "
                                  f"(reserved: {', '.join(RESERVED_FIELDS)}); rename the column in the input")
        dupes = sorted({c for c in self.extra_cols if self.extra_cols.count(c) > 1})
        check(not dupes, f"--extra-cols: {', '.join(dupes)} listed twice")
        for e in self.eval:
            check("=" in e and all(e.split("=", 1)), f"--eval entries are NAME=PATH, got {e!r}")
        bad = [k for k in self.dedup_within if k not in ("text", "image")]
        check(not bad, f"--dedup-within: {', '.join(bad)} is not text or image"
                       + (" (embedding near-duplicates are not implemented yet)"
                          if any(b.startswith("embedding") for b in bad) else ""))
        # One spelling per choice ("image,text" = "text,image"), so that a resume compares them equal.
        object.__setattr__(self, "dedup_within", tuple(k for k in ("text", "image") if k in self.dedup_within))
        if self.eval or self.dedup_within:
            # Imported here: dedup pulls in OpenCV and datasketch, which a run without --eval never needs.
            from dedup.matcher import MatchConfig

            try:
                MatchConfig(**self.match_kwargs())
            except ValueError as exc:
                raise ConfigError(f"--eval/--dedup-within overlap settings: {exc}") from None
        try:
            self.fetch_config()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        clip_flags = [f"--{n.replace('_', '-')}" for n in ("clip_pretrained", "clip_score_min", "clip_score_top_frac")
                      if getattr(self, n) is not None]
        if self.clip_filter is None:
            check(not clip_flags, f"{', '.join(clip_flags)}: only with --clip-filter MODEL")
        else:
            check(bool(self.clip_pretrained), "--clip-filter: give the weights with --clip-pretrained TAG|PATH")
            self.clip_settings()  # validates (ScoreError is a ConfigError)

    def clip_settings(self) -> Any:
        """The --clip-* settings as scoring.job.ScoreSettings (None without --clip-filter)."""
        if self.clip_filter is None:
            return None
        from scoring.job import ScoreSettings

        return ScoreSettings(model=self.clip_filter, clip_pretrained=self.clip_pretrained or "",
                             clip_score_min=self.clip_score_min, clip_score_top_frac=self.clip_score_top_frac,
                             score_bins=self.score_bins, batch_size=self.clip_batch_size, device=self.clip_device,
                             cpus_per_actor=self.clip_cpus_per_actor)

    def match_kwargs(self) -> dict[str, Any]:
        """The --eval overlap settings as dedup.matcher.MatchConfig's keyword arguments."""
        return {"text_threshold": self.text_threshold, "ngram": self.ngram,
                "image_max_distance": self.image_max_distance, "image_min_similarity": self.image_min_similarity,
                "kinds": tuple(self.overlap_kinds), "min_caption_words": self.overlap_min_caption_words}

    def near_settings(self) -> Any:
        """--dedup-within as pipeline.near_dedup.NearSettings (None without it): the --eval settings'
        MinHash/LSH, hash distance and image checks."""
        if not self.dedup_within:
            return None
        from dedup.matcher import MatchConfig
        from pipeline.near_dedup import NearSettings

        return NearSettings(kinds=self.dedup_within, match=MatchConfig(**self.match_kwargs()))

    def fetch_config(self) -> FetchConfig:
        return FetchConfig(
            timeout=self.timeout,
            retries=self.retries,
            retry_backoff=self.retry_backoff,
            max_body_bytes=self.max_body_bytes,
            max_redirects=self.max_redirects,
            user_agent_token=self.user_agent_token or None,
            disallowed_header_directives=tuple(d.strip().lower() for d in self.disallowed_header_directives),
            allow_hosts=self.allow_hosts,
        )

    # Settings that change what is written; a resume with any of them changed is refused.
    RUNTIME_ONLY: typing.ClassVar[frozenset[str]] = frozenset(
        {"threads", "tasks_per_cpu", "num_cpus", "ray_address", "executor", "progress_every", "out", "keep_parts",
         "dedup_buckets", "clip_batch_size", "clip_device", "clip_cpus_per_actor"}
    )

    CLIP_FIELDS: typing.ClassVar[frozenset[str]] = frozenset(
        {"clip_filter", "clip_pretrained", "clip_score_min", "clip_score_top_frac", "score_bins"})

    def output_settings(self) -> dict[str, Any]:
        # Without --clip-filter its settings mean nothing (and a run recorded before they existed resumes).
        skip = self.RUNTIME_ONLY | (self.CLIP_FIELDS if self.clip_filter is None else frozenset())
        if not self.dedup_within:
            skip |= {"dedup_within"}  # a run recorded before --dedup-within existed resumes
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items() if k not in skip}
