"""Tiny generated training shards (coloured shapes with captions) for tests, benchmarks and demos.

Written with the project's own ShardSetWriter, so they have exactly the corpus layout:
KEY.jpg/KEY.txt/KEY.json members and shards/sizes.json.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pipeline.localweb import COLORS, SHAPES, TEMPLATES, encode, make_image
from pipeline.shards import ShardSetWriter, get_fs


def write_shape_shards(shards_dir: str | Path, n: int, per_shard: int, seed: int = 0, size: int = 48,
                       fmts: tuple[str, ...] = ("jpg",)) -> dict[str, int]:
    """n captioned shape images in shards of per_shard samples; returns sizes.json's content."""
    rng = random.Random(seed)
    fs, root = get_fs(str(shards_dir))
    with ShardSetWriter(fs, root, per_shard) as writer:
        for i in range(n):
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            fmt = fmts[i % len(fmts)]
            img = make_image(shape, color, (size, size), rng)
            caption = rng.choice(TEMPLATES).format(c=f"{color} {shape}")
            writer.add(f"s{seed}-{i:06d}", {fmt: encode(img, fmt), "txt": caption.encode(),
                                            "json": json.dumps({"label": f"{color} {shape}"}).encode()})
    return writer.sizes
