"""Zero-shot classification and retrieval, sharded over ranks.

Every rank embeds its share of the class prompts and of the images
(`items[rank::world]`), the shares are all-gathered, and rank 0 computes the
metrics. No rank idles inside a collective while another does all the work, so
large jobs do not trip NCCL timeouts (OpenCLIP #1121, #1024).

Eval sets are read by dedup/evalsets.py, the loader the overlap audit uses, so item ids
agree between an audit and the metrics split by it. Any of its layouts works:
* classification: ROOT/<class_dir>/<image>, optional ROOT/classnames.txt (one name
  per class, in sorted class_dir order) and ROOT/templates.txt (one prompt per line
  with {c}); item id = "<class_dir>/<image>". Or clip_benchmark's WebDataset shards
  (`cls` per sample, classnames.txt, zeroshot_classification_templates.txt).
* retrieval: ROOT/KEY.<jpg|png|webp> + ROOT/KEY.txt (one caption per line); id = KEY.
  Or clip_benchmark's shards with `txt` per sample.

With an overlap audit (the dedup step's summary.json: {"eval_sets": {NAME:
{"overlapping_items": [id, ...]}}}), metrics are also reported on the clean and the
overlapping items, as in the CLIP paper's overlap analysis. An audit that lacks a set,
counted another number of items or names items the set lacks is reported at start.

Every eval image is decoded once when the evaluator is built: a bad one stops the run
before training, naming the file, rather than at the first evaluation.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dedup.evalsets import CLASSIFICATION, RETRIEVAL, EvalItem, EvalSet, EvalSetError, load_eval_set
from training.dist import gather_objects
from training.errors import TrainError
from training.storage import STORE_ERRORS, Loc

log = logging.getLogger(__name__)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
"""An eval set given as a URL (s3://, gs://, http(s)://): copied to a local folder first."""

@dataclass
class ClassificationSet:
    name: str
    root: Path
    classnames: list[str]
    templates: list[str]
    items: list[tuple[str, int]]
    """(item id, class index)"""
    source: EvalSet
    """Where each item's image is read (parallel to `items`)."""


@dataclass
class RetrievalSet:
    name: str
    root: Path
    items: list[tuple[str, int, list[str]]]
    """(key, index into source.items, captions)"""
    source: EvalSet


def _local_copy(name: str, url: str) -> Path:
    """An eval set on object storage or the web, copied once to a local folder (removed at exit).

    Eval sets are small (thousands of images) and every image is read at each evaluation, so one
    copy per process beats a request per image per evaluation; the loader then works unchanged."""
    import atexit
    import shutil
    import tempfile

    from pipeline.rundir import OutputError, resolve

    try:
        fs, path = resolve(url, "eval set")
    except OutputError as exc:
        raise TrainError(str(exc)) from None
    # The set's name is the user's (--zeroshot imagenet/val=...): only its safe characters in a file name.
    local = Path(tempfile.mkdtemp(prefix=f"clipforge-eval-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-"))
    atexit.register(shutil.rmtree, local, True)
    try:
        fs.get(path.rstrip("/") + "/", str(local) + "/", recursive=True)
    except (*STORE_ERRORS, ValueError) as exc:  # botocore's connection errors are no OSError
        raise TrainError(f"{url}: cannot copy eval set {name!r} ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from None
    log.info("eval set %r: %s copied to %s", name, url, local)
    return local


def _load(name: str, root: str | Path, kind: str, flag: str) -> EvalSet:
    try:
        es = load_eval_set(name, str(root))
    except EvalSetError as exc:
        raise TrainError(str(exc)) from None
    if es.kind != kind:
        raise TrainError(f"{root}: {flag} set {name!r} is a {es.kind} set ({es.layout} layout), not a {kind} set")
    return es


def _naming_the_url(load: Callable[[str, str | Path], Any]) -> Callable[[str, str | Path], Any]:
    """An eval set given as a URL is loaded from its local copy; what is wrong with it names the URL."""
    def wrapper(name: str, root: str | Path) -> Any:
        if not (isinstance(root, str) and _URL.match(root)):
            return load(name, root)
        local = _local_copy(name, root)
        try:
            return load(name, local)
        except TrainError as exc:
            raise TrainError(str(exc).replace(str(local), root.rstrip("/"))) from None
    return wrapper


@_naming_the_url
def load_classification(name: str, root: str | Path) -> ClassificationSet:
    root = Path(root)
    if root.is_dir() and not any(p.is_dir() and not p.name.startswith(".") or p.suffix == ".tar"
                                 for p in root.iterdir()):
        raise TrainError(f"{root}: zero-shot set {name!r} has no class folders (expected ROOT/<class>/<image> "
                         "or clip_benchmark's *.tar shards)")
    es = _load(name, root, CLASSIFICATION, "zero-shot")
    if not es.classnames:
        raise TrainError(f"{root}: zero-shot set {name!r} needs a classnames.txt (one name per class index)")
    items = [(it.id, it.label) for it in es.items]
    if not items:
        raise TrainError(f"{root}: zero-shot set {name!r} has no images")
    empty = sorted(set(range(len(es.classnames))) - {lbl for _, lbl in items})
    if empty and es.layout == "imagefolder" and not (root / "classnames.txt").is_file():
        # Still a class: its prompts compete with the others for every image, and chance level
        # changes. Deliberate with a classnames.txt that lists it; likely a leftover without one.
        dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        names = [dirs[i] for i in empty]
        log.warning("%s: zero-shot set %r: class folder(s) without images (%s) still count as classes "
                    "(%d of %d); remove them, or list every class in %s to keep them", root, name,
                    ", ".join(names[:3]) + (" ..." if len(names) > 3 else ""), len(names), len(dirs),
                    root / "classnames.txt")
    return ClassificationSet(name, root, es.classnames, es.templates, items, es)


@_naming_the_url
def load_retrieval(name: str, root: str | Path) -> RetrievalSet:
    root = Path(root)
    es = _load(name, root, RETRIEVAL, "retrieval")
    items = [(it.id, i, it.captions) for i, it in enumerate(es.items) if it.captions]
    if not items:
        raise TrainError(f"{root}: retrieval set {name!r} has no KEY.jpg + KEY.txt pairs")
    return RetrievalSet(name, root, items, es)


def load_overlap(path: str | None) -> tuple[dict[str, set[str]], dict[str, int | None]]:
    """({eval set name: overlapping item ids}, {name: items the audit counted}) from summary.json."""
    if not path:
        return {}, {}
    try:
        sets = json.loads(Loc.of(path, "--overlap-audit").read_text())["eval_sets"]  # a local path or a URL
        return ({n: set(v.get("overlapping_items", [])) for n, v in sets.items()},
                {n: v.get("items") for n, v in sets.items()})
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise TrainError(f"{path}: not an overlap audit summary ({{'eval_sets': {{NAME: ...}}}}): {exc}") from exc


class Evaluator:
    """Loads the eval sets once; `run(model)` returns {set name: metrics} on rank 0."""

    def __init__(self, zeroshot: dict[str, str], retrieval: dict[str, str], overlap_audit: str | None,
                 transform: Callable, tokenizer: Callable, device: torch.device,
                 autocast: Callable[[], AbstractContextManager], rank: int, world_size: int,
                 batch_size: int = 128, input_dtype: torch.dtype | None = None) -> None:
        self.cls_sets = [load_classification(n, r) for n, r in zeroshot.items()]
        self.ret_sets = [load_retrieval(n, r) for n, r in retrieval.items()]
        self.overlap, audited_items = load_overlap(overlap_audit)
        self.transform, self.tokenizer, self.device = transform, tokenizer, device
        self.autocast, self.rank, self.world = autocast, rank, world_size
        self.batch_size = batch_size
        self.input_dtype = input_dtype  # bf16 for a pure_bf16 model, whose weights autocast does not cover
        self._check_images()
        if overlap_audit and rank == 0:
            self._check_overlap(overlap_audit, audited_items)

    def _check_overlap(self, path: str, audited_items: dict[str, int | None]) -> None:
        """Say when the audit does not describe these eval sets: its split would be missing or wrong."""
        for ds in [*self.cls_sets, *self.ret_sets]:
            ids = {i for i, _ in ds.items} if isinstance(ds, ClassificationSet) else {k for k, _, _ in ds.items}
            if ds.name not in self.overlap:
                log.warning("--overlap-audit %s has no eval set %r (it has %s): no clean/overlap split for it; "
                            "name the set as the audit did", path, ds.name, sorted(self.overlap) or "none")
                continue
            n = audited_items.get(ds.name)
            if n is not None and n != len(ds.items):
                log.warning("--overlap-audit %s counted %d items in %r, the eval set has %d: its clean/overlap "
                            "split may be wrong; rerun the audit on this eval set", path, n, ds.name, len(ds.items))
            unknown = sorted(self.overlap[ds.name] - ids)
            if unknown:
                log.warning("--overlap-audit %s: %d of its %d overlapping items of %r are not in the eval set "
                            "(e.g. %r): its clean/overlap split is wrong; rerun the audit on this eval set", path,
                            len(unknown), len(self.overlap[ds.name]), ds.name, unknown[0])

    def _check_images(self) -> None:
        """Decode every eval image once, now: a bad one would otherwise end the run at its first eval.
        Each rank decodes its share; every rank learns of every bad file (so all stop together)."""
        images = [(ds.source, it) for ds in self.cls_sets for it in ds.source.items]
        images += [(ds.source, ds.source.items[i]) for ds in self.ret_sets for _, i, _ in ds.items]
        bad = []
        for es, it in images[self.rank::self.world]:
            try:
                with _open_image(es, it) as im:
                    im.load()
            except Exception as exc:  # truncated, not an image, decompression bomb: all unusable
                where = it.path if it.member is None else f"{it.path}:{it.member}"
                bad.append((where, f"{type(exc).__name__}: {str(exc)[:100]}"))
        bad = [b for part in gather_objects(bad, self.world) for b in part]
        if bad:
            more = f"; {len(bad) - 1} more bad image(s)" if len(bad) > 1 else ""
            raise TrainError(f"{bad[0][0]}: cannot decode this evaluation image ({bad[0][1]}){more}; "
                             "replace or delete it, or leave its eval set out")

    @property
    def empty(self) -> bool:
        return not self.cls_sets and not self.ret_sets

    # -- embedding helpers ---------------------------------------------------------

    def _embed_images(self, model: torch.nn.Module, es: EvalSet, items: list[EvalItem]) -> torch.Tensor:
        out = []
        for i in range(0, len(items), self.batch_size):
            imgs = []
            for it in items[i:i + self.batch_size]:
                with _open_image(es, it) as im:
                    imgs.append(self.transform(im.convert("RGB")))
            with self.autocast():
                f = model.encode_image(torch.stack(imgs).to(self.device, dtype=self.input_dtype, non_blocking=True),
                                       normalize=True)
            out.append(f.float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def _embed_texts(self, model: torch.nn.Module, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            with self.autocast():
                f = model.encode_text(self.tokenizer(texts[i:i + self.batch_size]).to(self.device), normalize=True)
            out.append(f.float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def _gather_shards(self, local: list[Any]) -> list[Any]:
        """Undo items[rank::world]: interleave every rank's list back into item order."""
        parts = gather_objects(local, self.world)
        n = sum(len(p) for p in parts)
        merged: list[Any] = [None] * n
        for r, part in enumerate(parts):
            merged[r::self.world] = part
        return merged

    # -- metrics -------------------------------------------------------------------

    @torch.no_grad()
    def classification(self, model: torch.nn.Module, ds: ClassificationSet) -> dict[str, Any] | None:
        mine = list(range(self.rank, len(ds.classnames), self.world))
        weights = []
        for c in mine:
            f = self._embed_texts(model, [t.format(c=ds.classnames[c]) for t in ds.templates])
            w = f.mean(0)
            weights.append(w / w.norm())  # CLIP's prompt ensemble: mean of normalised, renormalised
        classifier = torch.stack(self._gather_shards(weights), dim=1)  # [D, C]
        items = ds.source.items[self.rank::self.world]
        feats = self._embed_images(model, ds.source, items)
        k = min(5, len(ds.classnames))
        top = (100.0 * feats @ classifier).topk(k, dim=1).indices.tolist() if len(items) else []
        preds = self._gather_shards(top)
        if self.rank != 0:
            return None
        ids = [i for i, _ in ds.items]
        labels = [lbl for _, lbl in ds.items]
        metrics = _cls_metrics(labels, preds, ds.classnames)
        overlap = self.overlap.get(ds.name)
        if overlap is not None:
            for subset, keep in (("clean", False), ("overlap", True)):
                idx = [j for j, item_id in enumerate(ids) if (item_id in overlap) == keep]
                metrics[f"{subset}_items"] = len(idx)
                if idx:
                    sub = _cls_metrics([labels[j] for j in idx], [preds[j] for j in idx], ds.classnames)
                    metrics[f"{subset}_top1"] = sub["top1"]
        return metrics

    @torch.no_grad()
    def retrieval(self, model: torch.nn.Module, ds: RetrievalSet) -> dict[str, Any] | None:
        items = ds.items[self.rank::self.world]
        img = self._embed_images(model, ds.source, [ds.source.items[i] for _, i, _ in items])
        # One batched pass over all captions, then split back per image (COCO: 5 captions each).
        flat = self._embed_texts(model, [c for _, _, caps in items for c in caps])
        txt = list(flat.split([len(caps) for _, _, caps in items])) if items else []
        img_all = self._gather_shards(list(img))
        txt_all = self._gather_shards(txt)
        if self.rank != 0:
            return None
        keys = [k for k, _, _ in ds.items]
        images = torch.stack(img_all)
        texts = torch.cat(txt_all)
        owner = torch.cat([torch.full((len(t),), i) for i, t in enumerate(txt_all)])
        metrics = _ret_metrics(images @ texts.T, owner, range(len(keys)))
        overlap = self.overlap.get(ds.name)
        if overlap is not None:
            for subset, keep in (("clean", False), ("overlap", True)):
                idx = [j for j, key in enumerate(keys) if (key in overlap) == keep]
                metrics[f"{subset}_items"] = len(idx)
                if idx:
                    sub = _ret_metrics(images @ texts.T, owner, idx)
                    metrics.update({f"{subset}_{m}": v for m, v in sub.items()})
        return metrics

    def run(self, model: torch.nn.Module) -> dict[str, dict[str, Any]]:
        """All sets; every rank must call it. Returns the metrics on rank 0, {} elsewhere."""
        was_training = model.training
        model.eval()
        results: dict[str, dict[str, Any]] = {}
        try:
            for ds in self.cls_sets:
                m = self.classification(model, ds)
                if m is not None:
                    results[ds.name] = {"kind": "zeroshot", **m}
            for ds in self.ret_sets:
                m = self.retrieval(model, ds)
                if m is not None:
                    results[ds.name] = {"kind": "retrieval", **m}
        finally:
            model.train(was_training)
        return results


def _open_image(es: EvalSet, item: EvalItem) -> Image.Image:
    if item.member is None:
        return Image.open(item.path)
    return Image.open(io.BytesIO(es.read_image(item)))


def _cls_metrics(labels: list[int], preds: list[list[int]], classnames: list[str]) -> dict[str, Any]:
    n = len(labels)
    top1 = sum(p[0] == y for y, p in zip(labels, preds, strict=True))
    top5 = sum(y in p for y, p in zip(labels, preds, strict=True))
    per_class: dict[str, float] = {}
    for c, cname in enumerate(classnames):
        idx = [i for i, y in enumerate(labels) if y == c]
        if idx:
            per_class[cname] = sum(preds[i][0] == c for i in idx) / len(idx)
    return {"items": n, "top1": top1 / n, "top5": top5 / n,
            "mean_per_class": sum(per_class.values()) / max(1, len(per_class)), "per_class": per_class}


def _ret_metrics(sim: torch.Tensor, owner: torch.Tensor, image_idx: Any) -> dict[str, float]:
    """R@1/5/10 image->text over the given images, text->image over their captions."""
    image_idx = torch.as_tensor(list(image_idx))
    out: dict[str, float] = {}
    ranked_t = sim[image_idx].argsort(dim=1, descending=True)  # texts per image
    text_idx = torch.nonzero(torch.isin(owner, image_idx)).flatten()
    ranked_i = sim[:, text_idx].T.argsort(dim=1, descending=True)  # images per text
    for k in (1, 5, 10):
        hit_i2t = (owner[ranked_t[:, :k]] == image_idx[:, None]).any(dim=1).float().mean()
        hit_t2i = (ranked_i[:, :k] == owner[text_idx][:, None]).any(dim=1).float().mean()
        out[f"i2t_R@{k}"] = float(hit_i2t)
        out[f"t2i_R@{k}"] = float(hit_t2i)
    return out
