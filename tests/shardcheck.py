"""Open shards the way users' readers do: webdataset, and OpenCLIP's own loader."""

from __future__ import annotations

import glob
import json
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


def read_with_openclip(shards_dir: Path, batch_size: int = 16) -> tuple[int, int]:
    """OpenCLIP's training loader over our shards: it must find sizes.json and decode every
    sample. Returns (samples it plans per epoch from sizes.json, samples it yields)."""
    import open_clip
    import torchvision.transforms as tvt
    from open_clip_train.data import get_wds_dataset

    sizes = json.loads((shards_dir / "sizes.json").read_text())
    last = len(sizes) - 1
    pattern = str(shards_dir / f"{{00000..{last:05d}}}.tar")
    args = SimpleNamespace(
        train_data=pattern, val_data=None, train_num_samples=None, dataset_resampled=False,
        train_data_upsampling_factors=None, seed=0, batch_size=batch_size, workers=0, world_size=1,
    )
    preprocess = tvt.Compose([tvt.Resize((32, 32)), tvt.ToTensor()])
    info = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    seen = 0
    for images, texts in info.dataloader:
        assert images.shape[1:] == (3, 32, 32) and texts.shape[0] == images.shape[0]
        seen += images.shape[0]
    return info.dataloader.num_samples, seen
