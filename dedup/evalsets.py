"""Evaluation sets on disk: layout detection and item listing.

Three layouts, told apart by what is in the folder:

- `wds`: WebDataset shards (any `*.tar` in PATH or one level below, as
  clip_benchmark writes them: `test/0.tar`, with `classnames.txt` and
  `zeroshot_classification_templates.txt` at the root). A sample with a `cls`
  member makes it a classification set, one with `txt` a retrieval set.
  Item id: the sample key.
- `imagefolder`: PATH/<class>/<image> (optional classnames.txt, templates.txt).
  Classification; item id: the image path relative to PATH ("red_circle/0003.jpg").
- `pairs`: PATH/KEY.jpg|png|webp next to PATH/KEY.txt (one caption a line).
  Retrieval; item id: KEY.

Only ids and where to read the bytes are kept; images are read when the index
is built and again, for a few items, when the report is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.shards import IMAGE_EXTS, ShardError, iter_tar

CLASSIFICATION = "classification"
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


@dataclass
class EvalSet:
    name: str
    root: str
    kind: str
    layout: str
    items: list[EvalItem] = field(default_factory=list)
    classnames: list[str] = field(default_factory=list)

    def read_image(self, item: EvalItem) -> bytes:
        if item.member is None:
            return Path(item.path).read_bytes()
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
    for d in subdirs:
        for p in sorted(d.iterdir()):
            if _is_image(p):
                es.items.append(EvalItem(p.relative_to(root).as_posix(), [], str(p)))
    return es


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
                    es.items.append(EvalItem(item_id, captions, str(tar), f"{key}.{img}"))
        except ShardError as exc:
            raise EvalSetError(str(exc)) from exc
    if kind is None:
        raise EvalSetError(f"{tars[0]}: eval set {name!r} shards hold no samples")
    es.kind = kind
    return es


def _split(data: bytes) -> list[str]:
    return [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
