"""Open shards the way users' readers do: webdataset, and OpenCLIP's own loader."""

from __future__ import annotations

import glob
import json
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace


def read_with_webdataset(shards_dir: Path) -> list[tuple[str, str, dict]]:
    import webdataset as wds

    urls = sorted(glob.glob(str(shards_dir / "*.tar")))
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil")
    out = []
    for s in ds:
        image = s.get("jpg") or s.get("webp")
        assert image is not None and image.size[0] > 0, f"{s['__key__']}: no decodable image"
        out.append((s["__key__"], s["txt"], s["json"]))
    return out


def _captions_on_disk(shards_dir: Path) -> dict[str, str | None]:
    """{key: caption} of every sample in the tars, read with tarfile alone (no webdataset):
    what was written, to hold the readers' output against. None: the sample has no .txt."""
    captions: dict[str, str | None] = {}
    for path in sorted(shards_dir.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                captions.setdefault(key, None)
                if ext == "txt":
                    captions[key] = tar.extractfile(member).read().decode()
    return captions


def read_with_openclip(shards_dir: Path) -> tuple[int, int]:
    """OpenCLIP's training loader over our shards: it must plan one epoch from sizes.json and,
    over one pass of its own pipeline, yield every sample in the tars exactly once.

    OpenCLIP's `with_epoch` repeats the data to fill the epoch, so counting batches cannot
    see a sample it skipped (no .txt, an image it cannot decode, a truncated tar): this
    compares the captions it yields, as token rows, with the captions in the tars.
    Returns (samples it plans per epoch, samples one pass yields)."""
    import open_clip
    import torchvision.transforms as tvt
    from open_clip_train.data import get_wds_dataset

    sizes = json.loads((shards_dir / "sizes.json").read_text())
    on_disk = _captions_on_disk(shards_dir)
    assert sum(sizes.values()) == len(on_disk), f"sizes.json says {sum(sizes.values())}, tars hold {len(on_disk)}"
    last = len(sizes) - 1
    pattern = str(shards_dir / f"{{00000..{last:05d}}}.tar")
    # batch_size 1: OpenCLIP drops a partial last batch in training, which would hide samples too.
    args = SimpleNamespace(
        train_data=pattern, val_data=None, train_num_samples=None, dataset_resampled=False,
        train_data_upsampling_factors=None, seed=0, batch_size=1, workers=0, world_size=1,
    )
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    preprocess = tvt.Compose([tvt.Resize((32, 32)), tvt.ToTensor()])
    info = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    planned = info.dataloader.num_samples
    assert planned == len(on_disk), f"OpenCLIP plans {planned} samples per epoch, tars hold {len(on_disk)}"
    pipeline = info.dataloader.pipeline[0].dataset  # WebLoader -> DataLoader -> OpenCLIP's DataPipeline
    seen: Counter[tuple[int, ...]] = Counter()
    for images, texts in pipeline.iterator1():  # one pass, without with_epoch's padding
        assert images.shape == (1, 3, 32, 32) and texts.shape[0] == 1
        seen[tuple(texts[0].tolist())] += 1
    by_tokens: dict[tuple[int, ...], list[str]] = {}
    for key, caption in on_disk.items():
        tokens = tuple(tokenizer(caption)[0].tolist()) if caption is not None else (-1, hash(key))
        by_tokens.setdefault(tokens, []).append(key)
    expected = Counter({t: len(keys) for t, keys in by_tokens.items()})
    missing = sorted(k for t, n in (expected - seen).items() for k in by_tokens[t][:n])
    extra = sum((seen - expected).values())
    assert not missing and not extra, (
        f"OpenCLIP's loader, one pass: {len(missing)} sample(s) in the tars not yielded "
        f"(first {missing[:5]}; one of these keys or a key with the same caption), {extra} yielded that are not in the tars")
    return planned, sum(seen.values())
