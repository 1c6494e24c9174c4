"""The image part of another revision's `benchmarks/dedup.py`, for `benchmarks/dedup.py --against`.

    python benchmarks/reference_images.py TREE IMAGES SEED bench|split

TREE is that revision's files (`git archive`). `bench`: its own `bench_images(IMAGES, SEED, MatchConfig())`
on its own code, timed by this process's CPU time whatever clock that revision's benchmark reads
(issue 10's reference, 2519966, has no --clock), with OpenCV on one thread as ours. `split`, for
revisions whose benchmark does not split eval-side from training-side hashing: their `view_features`
(in groups of 16, as the audit hashes them, where the revision has `view_features_many`), then their
`features`, timed on the benchmark's own images, in a fresh process as ours are (not after `bench`,
whose warm caches would flatter them). Prints one JSON object. Every module of the revision's
packages must come from TREE: the environment's editable install of this project would otherwise
stand in for a module the revision lacks, and "theirs" would time ours.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import time
import types
from pathlib import Path

PACKAGES = ("dedup", "pipeline")


def _not_from(tree: Path) -> list[str]:
    """The revision's package modules loaded from anywhere but `tree`."""
    return sorted(name for name, mod in list(sys.modules.items())
                  if name.split(".")[0] in PACKAGES and getattr(mod, "__file__", None)
                  and not Path(mod.__file__).resolve().is_relative_to(tree))


def main(argv: list[str]) -> int:
    tree, n_images, seed, part = Path(argv[0]).resolve(), int(argv[1]), int(argv[2]), argv[3]
    here = Path(__file__).resolve().parent
    # Its dedup/ and pipeline/, not ours; and not this folder, whose dedup.py would shadow the package.
    sys.path[:] = [str(tree)] + [p for p in sys.path if Path(p or ".").resolve() != here]
    import cv2

    cv2.setNumThreads(1)
    try:
        from dedup import image as im
        from dedup.matcher import MatchConfig
        from dedup.synth import TRANSFORMS, random_image
        from pipeline.localweb import encode
    except ImportError as exc:
        print(f"reference_images.py: {tree}: {exc}", file=sys.stderr)
        return 2
    if foreign := _not_from(tree):
        print(f"reference_images.py: {', '.join(foreign)} not in {tree}: the revision lacks them", file=sys.stderr)
        return 2
    cfg = MatchConfig()
    if part == "bench":
        spec = importlib.util.spec_from_file_location("reference_bench", tree / "benchmarks" / "dedup.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        bench.time = types.SimpleNamespace(perf_counter=time.process_time, process_time=time.process_time)
        if hasattr(bench, "clock"):
            bench.clock = time.process_time
        result = bench.bench_images(n_images, seed, cfg)
    else:
        # The same images as its bench_images makes (same generator, same seed, same draws).
        rng = random.Random(seed)
        n_eval = n_images // 2
        eval_imgs = [random_image(rng, (128, 128))[0] for _ in range(n_eval)]
        eval_bytes = [encode(x, "jpg") for x in eval_imgs]
        names, train = sorted(TRANSFORMS), []
        for i in range(n_images - n_eval):
            if i < n_eval // 5:
                train.append(TRANSFORMS[names[i % len(names)]](eval_imgs[rng.randrange(n_eval)]))
            else:
                train.append(encode(random_image(rng, rng.choice([(128, 128), (200, 150), (96, 96)]))[0], "jpg"))
        many = getattr(im, "view_features_many", None)
        t = time.process_time()
        if many is None:
            for b in eval_bytes:
                im.view_features(b, cfg.crop)
        else:
            for g in range(0, n_eval, 16):
                many(eval_bytes[g : g + 16], cfg.crop)
        t_eval = time.process_time()
        for b in train:
            im.features(b, cfg.crop)
        t_train = time.process_time()
        result = {"eval_hashes_per_s": round(n_eval / (t_eval - t)),
                  "train_hashes_per_s": round(len(train) / (t_train - t_eval))}
    if foreign := _not_from(tree):
        print(f"reference_images.py: {', '.join(foreign)} not in {tree}: the revision lacks them", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
