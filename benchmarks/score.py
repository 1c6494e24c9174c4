"""CLIP-scoring benchmark: images/s per core of jobs/score_corpus.py against clip-retrieval's clip_inference.

    python benchmarks/score.py [--images 6000] [--size 256] [--rounds 3] [--out bench-out/score.json]

Not a timed test: it prints figures. The same shards (build_corpus's layout: 256 px JPEGs with
captions) and the same model (the tiny ViT of training/configs/tiny-vit.json, one checkpoint
file) go through

* `ours-local`: jobs/score_corpus.py --executor local (one process, torch and decode threads = cores),
* `ours-ray`: jobs/score_corpus.py on a local Ray, one CPU actor per core (--num-cpus = cores),
* `clip_inference`: clip-retrieval 2.45's clip_inference (the tool LAION embedded LAION-5B with) on
  the same tars as webdataset input, `open_clip:tiny-vit/CHECKPOINT`, one partition, sequential
  distribution, `num_prepro_workers` = cores (its DataLoader decodes in worker processes, the model
  runs in the main process with torch's default threads).

Each contender runs in a fresh process per round, rounds alternate the order, and the time is that
of the call alone (imports done before the clock starts; model loading, Ray start-up for ours-ray,
decoding, inference and writing included). Medians over rounds; the ratio printed is
clip_inference's time over ours (above 1: ours is faster). Ours does more work in that time: it
also writes the kept samples' shards, manifests and per-sample scores.

clip-retrieval pins numpy<2, pyarrow<16, open-clip-torch<3 and pulls in flask, faiss,
sentence-transformers and transformers; it is installed beside our pins with `pip install --no-deps
--target .bench-clip-retrieval clip-retrieval==2.45.0 all-clip==1.3.0 clip-anytorch==2.6.0
setuptools==80.9.0` (clip-anytorch imports pkg_resources; the Makefile's `bench` target does it,
`--install` too), and put at the end of sys.path. Two of its imports are not
installed and are stood in for, neither on the path measured: its package __init__ (which imports
the web back end: flask, faiss) is skipped by importing clip_retrieval.clip_inference directly,
and `sentence_transformers` (used only with --use_mclip) is an empty module. Its embeddings are
checked against ours (the same model must give the same vectors) before any figure is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SIDE = ROOT / ".bench-clip-retrieval"
TINY = ROOT / "training" / "configs" / "tiny-vit.json"
SIDE_INSTALL = ["clip-retrieval==2.45.0", "all-clip==1.3.0", "clip-anytorch==2.6.0", "setuptools==80.9.0"]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def make_corpus(root: Path, n: int, size: int, per_shard: int) -> None:
    """n captioned shape photos of `size` px (JPEG, quality 90) in build_corpus's layout."""
    from dedup.synth import write_corpus
    from pipeline.localweb import COLORS, SHAPES, TEMPLATES, encode, make_image

    rng = random.Random(0)

    def samples():
        for _ in range(n):
            shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
            img = make_image(shape, color, (size, size), rng)
            yield encode(img, "jpg"), rng.choice(TEMPLATES).format(c=f"{color} {shape}"), {}

    write_corpus(str(root), samples(), per_shard)


def make_checkpoint(path: Path) -> None:
    """The tiny ViT with seeded random weights, saved as an OpenCLIP checkpoint: speed does not depend on
    what the weights learned, and both tools load this one file."""
    import open_clip
    import torch

    torch.manual_seed(0)
    open_clip.add_model_config(TINY)
    model = open_clip.create_model("tiny-vit")
    torch.save({"epoch": 1, "name": "tiny-vit", "state_dict": model.state_dict()}, path)


# -- children: one contender, one round; prints {"seconds": ...} last --------------------------------


def child_ours(args: dict) -> dict:
    import open_clip  # noqa: F401 - imported before the clock, as for clip_inference

    import scoring.job  # noqa: F401
    from jobs.score_corpus import main

    argv = ["--corpus", args["corpus"], "--out", args["out"], "--model", str(TINY), "--clip-pretrained",
            args["ckpt"], "--batch-size", str(args["batch_size"]), "--keep-work"]
    if args["executor"] == "ray":
        argv += ["--executor", "ray", "--num-cpus", str(args["cores"])]
    else:
        argv += ["--executor", "local"]
    t0 = time.perf_counter()
    rc = main(argv)
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"score_corpus exited {rc}")
    return {"seconds": seconds}


def child_clip_inference(args: dict) -> dict:
    sys.path.append(str(SIDE))  # after our own packages: our pins win where both have a package
    import importlib.util

    spec = importlib.util.find_spec("clip_retrieval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"clip-retrieval is not installed in {SIDE}; run: {install_command()}")
    package = types.ModuleType("clip_retrieval")  # its __init__ imports the web back end (flask, faiss)
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["clip_retrieval"] = package
    stand_in = types.ModuleType("sentence_transformers")  # used only with --use_mclip
    stand_in.SentenceTransformer = None  # type: ignore[attr-defined]
    sys.modules.setdefault("sentence_transformers", stand_in)
    import open_clip
    from clip_retrieval.clip_inference.main import main as clip_inference

    open_clip.add_model_config(TINY)
    shards = sorted(Path(args["corpus"], "shards").glob("*.tar"))
    urls = f"{args['corpus']}/shards/{{{shards[0].stem}..{shards[-1].stem}}}.tar"
    t0 = time.perf_counter()
    clip_inference(input_dataset=urls, output_folder=args["out"], input_format="webdataset",
                   batch_size=args["batch_size"], num_prepro_workers=args["cores"], enable_text=True,
                   enable_image=True, clip_model=f"open_clip:tiny-vit/{args['ckpt']}", use_jit=False,
                   wds_number_file_per_input_file=args["per_shard"], output_partition_count=1)
    return {"seconds": time.perf_counter() - t0}


def install_command() -> str:
    return f"{sys.executable} -m pip install --no-deps --target {SIDE} " + " ".join(SIDE_INSTALL)


def run_child(kind: str, args: dict) -> float:
    r = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(args)], capture_output=True,
                       text=True, timeout=1800, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{kind} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["seconds"]


def same_embeddings(ours: Path, theirs: Path) -> float:
    """Largest difference between the two tools' image and text embeddings of the same samples."""
    import numpy as np
    import pyarrow.parquet as pq

    mine = {}
    for f in sorted((ours / "_work").glob("*.npy")):
        a = np.load(f)
        mine.update({k: (i, t) for k, i, t in zip(a["key"].tolist(), a["image"], a["text"], strict=True)})
    img = np.load(theirs / "img_emb" / "img_emb_0.npy")
    txt = np.load(theirs / "text_emb" / "text_emb_0.npy")
    keys = pq.read_table(theirs / "metadata" / "metadata_0.parquet").column("image_path").to_pylist()
    if sorted(keys) != sorted(mine):
        raise SystemExit(f"the tools embedded other samples: {len(keys)} vs {len(mine)}")
    worst = 0.0
    for k, i, t in zip(keys, img, txt, strict=True):
        a, b = mine[k]
        worst = max(worst, float(np.abs(a.astype(np.float32) - i.astype(np.float32)).max()),
                    float(np.abs(b.astype(np.float32) - t.astype(np.float32)).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=6000)
    p.add_argument("--size", type=int, default=256, help="image side in the shards (build_corpus's default)")
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--contenders", default="ours-local,ours-ray,clip_inference")
    p.add_argument("--install", action="store_true", help="pip install clip-retrieval into the side folder first")
    p.add_argument("--out", default="bench-out/score.json")
    p.add_argument("--child", nargs=2, metavar=("KIND", "ARGS"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        kind, args = a.child[0], json.loads(a.child[1])
        result = child_ours(args) if kind.startswith("ours") else child_clip_inference(args)
        print(json.dumps(result), flush=True)
        return 0
    contenders = [c.strip() for c in a.contenders.split(",") if c.strip()]
    if "clip_inference" in contenders and not (SIDE / "clip_retrieval").is_dir():
        if not a.install:
            raise SystemExit(f"clip-retrieval is not installed in {SIDE}; rerun with --install, or: "
                             f"{install_command()}")
        subprocess.run(install_command().split(), check=True)
    n_cores = cores()
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        make_corpus(tmp_path / "corpus", a.images, a.size, a.per_shard)
        make_checkpoint(tmp_path / "tiny.pt")
        print(f"corpus: {a.images} images of {a.size} px in {-(-a.images // a.per_shard)} shards "
              f"(made in {time.perf_counter() - t0:.1f}s); {n_cores} cores; batch {a.batch_size}", flush=True)
        times: dict[str, list[float]] = {c: [] for c in contenders}
        for r in range(a.rounds):
            order = contenders if r % 2 == 0 else contenders[::-1]
            for kind in order:
                out = tmp_path / f"{kind}-{r}"
                args = {"corpus": str(tmp_path / "corpus"), "out": str(out), "ckpt": str(tmp_path / "tiny.pt"),
                        "batch_size": a.batch_size, "cores": n_cores, "per_shard": a.per_shard,
                        "executor": "ray" if kind == "ours-ray" else "local"}
                s = run_child(kind, args)
                times[kind].append(s)
                print(f"round {r + 1}: {kind:<15} {s:7.2f}s  {a.images / s:8.1f} images/s  "
                      f"{a.images / s / n_cores:8.1f} images/s/core", flush=True)
            if r == 0 and "clip_inference" in contenders:
                ours = next((tmp_path / f"{k}-0" for k in ("ours-local", "ours-ray") if k in contenders), None)
                if ours is not None:
                    worst = same_embeddings(ours, tmp_path / "clip_inference-0")
                    print(f"same model, same vectors: largest difference between the tools' embeddings {worst:.2e}")
                    if worst > 2e-2:
                        raise SystemExit("the tools' embeddings differ: not the same model or input")
        medians = {k: statistics.median(v) for k, v in times.items()}
        print("\nmedians:")
        for k, s in medians.items():
            print(f"  {k:<15} {s:7.2f}s  {a.images / s / n_cores:8.1f} images/s/core")
        ratios = {}
        if "clip_inference" in medians:
            for k in ("ours-local", "ours-ray"):
                if k in medians:
                    ratios[k] = medians["clip_inference"] / medians[k]
                    print(f"{k} vs clip_inference: {ratios[k]:.2f}x the speed (clip_inference's time / ours)")
    result = {"images": a.images, "size": a.size, "cores": n_cores, "batch_size": a.batch_size, "rounds": a.rounds,
              "seconds": times, "median_seconds": medians,
              "images_per_second_per_core": {k: a.images / s / n_cores for k, s in medians.items()},
              "speed_vs_clip_inference": ratios}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
