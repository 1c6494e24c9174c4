"""Evaluation sets on disk: layout detection and item listing.

Three layouts, told apart by what is in the folder:

- `wds`: WebDataset shards (any `*.tar` in PATH or one level below, as
  clip_benchmark writes them: `test/0.tar`, with `classnames.txt` and
  `zeroshot_classification_templates.txt` at the root). A sample with a `cls`
  member makes it a classification set, one with `txt` a retrieval set.
  Item id: the sample key.
- `imagefolder`: PATH/<class>/<image> (optional classnames.txt, one name per class
  folder in sorted order, and templates.txt). Classification; item id: the image path
  relative to PATH ("red_circle/0003.jpg"); label: the class folder's index.
- `pairs`: PATH/KEY.jpg|png|webp next to PATH/KEY.txt (one caption a line).
  Retrieval; item id: KEY.

Classification sets also carry their prompt templates (`templates.txt`, or
clip_benchmark's `zeroshot_classification_templates.txt`; one prompt a line with
`{c}`), and every item its class index.

This is the one loader of evaluation sets: the overlap audit (dedup/) and the
trainer's zero-shot and retrieval evaluation (training/evaluate.py) both read sets
through it, so an item id in an audit's `overlapping_items` is the id the trainer
splits its metrics by, whatever the layout.

Only ids and where to read the bytes are kept (for tars: each image's offset and
size, so one item is one seek, not a scan of its tar); images are read when the
index is built, when the trainer evaluates, and, for a few items, when the report
is drawn.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.shards import IMAGE_EXTS, ShardError, iter_tar

CLASSIFICATION = "classification"
DEFAULT_TEMPLATES = ("a photo of a {c}.",)
TEMPLATE_FILES = ("templates.txt", "zeroshot_classification_templates.txt")
RETRIEVAL = "retrieval"


class EvalSetError(ValueError):
    """An evaluation set that cannot be read; the message names the path and the problem."""


@dataclass(slots=True)
class EvalItem:
    id: str
    captions: list[str]
    path: str
    """The image file, or the tar holding it."""
    member: str | None = None
    """For wds sets: the tar member name of the image."""
    label: int = -1
    """Classification sets: the class index (folder index, or the sample's `cls`)."""
    offset: int = -1
    size: int = -1
    """For wds sets: where the image's bytes lie in its tar."""


@dataclass
class EvalSet:
    name: str
    root: str
    kind: str
    layout: str
    items: list[EvalItem] = field(default_factory=list)
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)

    def read_image(self, item: EvalItem) -> bytes:
        if item.member is None:
            return Path(item.path).read_bytes()
        if item.offset >= 0:
            with open(item.path, "rb") as f:
                f.seek(item.offset)
                data = f.read(item.size)
            if len(data) == item.size:
                return data
        with open(item.path, "rb") as f:
            for key, members in iter_tar(f, item.path):
                for ext, data in members.items():
                    if f"{key}.{ext}" == item.member:
                        return data
        raise EvalSetError(f"{item.path}: member {item.member} vanished since the index was built")

    def iter_images(self) -> Iterator[tuple[int, bytes]]:
        """(item index, image bytes) for every item, each tar read once, in item order."""
        if self.layout != "wds":
            for i, item in enumerate(self.items):
                yield i, Path(item.path).read_bytes()
            return
        by_member = {(it.path, it.member): i for i, it in enumerate(self.items)}
        for tar in sorted({it.path for it in self.items}):
            with open(tar, "rb") as f:
                for key, members in iter_tar(f, tar):
                    for ext, data in members.items():
                        i = by_member.get((tar, f"{key}.{ext}"))
                        if i is not None:
                            yield i, data


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EvalSetError(f"{_shown(path)}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                           "re-save it as UTF-8") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _shown(path: Path) -> str:
    """A path as a message can print it (undecodable bytes of a file name as \\xNN escapes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_image(p: Path) -> bool:
    if not (p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS):
        return False
    try:
        p.name.encode("utf-8")  # a name that is not UTF-8 holds lone surrogates here
    except UnicodeEncodeError:
        raise EvalSetError(f"{_shown(p)}: file name is not UTF-8; item ids are file names, so rename it") from None
    return True


def parse_eval_arg(arg: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH)."""
    name, sep, path = arg.partition("=")
    if not sep or not name or not path:
        raise EvalSetError(f"--eval {arg!r}: expected NAME=PATH, e.g. coco=evalsets/coco-5k")
    if not all(c.isalnum() or c in "_-" for c in name):
        raise EvalSetError(f"--eval {arg!r}: NAME may only hold letters, digits, '_' and '-'")
    return name, path


def load_eval_set(name: str, path: str) -> EvalSet:
    root = Path(path)
    if not root.exists():
        raise EvalSetError(f"{path}: eval set {name!r} does not exist")
    if not root.is_dir():
        raise EvalSetError(f"{path}: eval set {name!r} is not a folder")
    tars = sorted(root.glob("*.tar")) + sorted(root.glob("*/*.tar"))
    if tars:
        return _load_wds(name, root, tars)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if subdirs and any(_is_image(p) for d in subdirs for p in d.iterdir()):
        return _load_imagefolder(name, root, subdirs)
    images = sorted(p for p in root.iterdir() if _is_image(p))
    if images:
        return _load_pairs(name, root, images)
    raise EvalSetError(
        f"{path}: unknown eval set layout for {name!r}: expected *.tar shards, <class>/<image> folders, "
        "or KEY.jpg + KEY.txt pairs"
    )


def _load_imagefolder(name: str, root: Path, subdirs: list[Path]) -> EvalSet:
    es = EvalSet(name, str(root), CLASSIFICATION, "imagefolder")
    es.classnames = _lines(root / "classnames.txt") or [d.name.replace("_", " ") for d in subdirs]
    if len(es.classnames) != len(subdirs):
        raise EvalSetError(f"{_shown(root / 'classnames.txt')}: {len(es.classnames)} names for "
                           f"{len(subdirs)} class folders (one name a line, in sorted folder order)")
    es.templates = _templates(root)
    for label, d in enumerate(subdirs):
        for p in sorted(d.iterdir()):
            if _is_image(p):
                es.items.append(EvalItem(p.relative_to(root).as_posix(), [], str(p), label=label))
    return es


def _templates(root: Path) -> list[str]:
    for fname in TEMPLATE_FILES:
        if (root / fname).is_file():
            templates = _lines(root / fname)
            bad = [t for t in templates if "{c}" not in t]
            if bad or not templates:
                raise EvalSetError(f"{_shown(root / fname)}: every line needs {{c}} (bad: {bad[:2]})")
            return templates
    return list(DEFAULT_TEMPLATES)


def _load_pairs(name: str, root: Path, images: list[Path]) -> EvalSet:
    es = EvalSet(name, str(root), RETRIEVAL, "pairs")
    seen: set[str] = set()
    for p in images:
        if p.stem in seen:
            raise EvalSetError(f"{p}: two images share the key {p.stem!r} in eval set {name!r}")
        seen.add(p.stem)
        es.items.append(EvalItem(p.stem, _lines(p.with_suffix(".txt")), str(p)))
    if not any(it.captions for it in es.items):
        raise EvalSetError(f"{root}: eval set {name!r} has images but no KEY.txt captions next to them "
                           "(a classification set needs <class>/<image> folders)")
    return es


def _load_wds(name: str, root: Path, tars: list[Path]) -> EvalSet:
    kind: str | None = None
    es = EvalSet(name, str(root), "", "wds")
    es.classnames = _lines(root / "classnames.txt")
    seen: set[str] = set()
    for tar in tars:
        try:
            where = _member_offsets(tar)
            with open(tar, "rb") as f:
                for key, members in iter_tar(f, str(tar)):
                    img = next((e for e in members if e.lower() in IMAGE_EXTS), None)
                    if img is None:
                        raise EvalSetError(f"{tar}: sample {key!r} has no image member ({sorted(members)})")
                    k = CLASSIFICATION if "cls" in members else RETRIEVAL if "txt" in members else None
                    if k is None:
                        raise EvalSetError(f"{tar}: sample {key!r} has neither cls nor txt: not clip_benchmark layout")
                    if kind is not None and k != kind:
                        raise EvalSetError(f"{tar}: sample {key!r} is {k} but earlier samples were {kind}")
                    kind = k
                    item_id = key if key not in seen else f"{tar.relative_to(root).as_posix()}/{key}"
                    seen.add(item_id)
                    captions = _split(members["txt"]) if k == RETRIEVAL else []
                    label = _label(members["cls"], tar, key) if k == CLASSIFICATION else -1
                    offset, size = where.get(f"{key}.{img}", (-1, -1))
                    es.items.append(EvalItem(item_id, captions, str(tar), f"{key}.{img}", label, offset, size))
        except ShardError as exc:
            raise EvalSetError(str(exc)) from exc
    if kind is None:
        raise EvalSetError(f"{tars[0]}: eval set {name!r} shards hold no samples")
    es.kind = kind
    if kind == CLASSIFICATION:
        es.templates = _templates(root)
        top = max(it.label for it in es.items)
        if es.classnames and top >= len(es.classnames):
            raise EvalSetError(f"{_shown(root / 'classnames.txt')}: {len(es.classnames)} names, but a sample "
                               f"has class {top}")
    return es


def _label(data: bytes, tar: Path, key: str) -> int:
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        label = -1
    if label < 0:
        raise EvalSetError(f"{tar}: sample {key!r}: cls is not a class index ({data[:20]!r})")
    return label


def _member_offsets(tar: Path) -> dict[str, tuple[int, int]]:
    """{member base name: (offset of its data, size)}: headers only, the data is seeked over."""
    out: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(tar, "r:") as t:
            for info in t:
                if info.isfile():
                    out[info.name.rsplit("/", 1)[-1]] = (info.offset_data, info.size)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise EvalSetError(f"{tar}: not a readable tar ({exc})") from exc
    return out


def _split(data: bytes) -> list[str]:
    return [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
