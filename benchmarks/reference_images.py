"""The image part of another revision's `benchmarks/dedup.py`, for `benchmarks/dedup.py --against`.

    python benchmarks/reference_images.py TREE IMAGES SEED

TREE is that revision's files (`git archive`). Its own `bench_images(IMAGES, SEED, MatchConfig())` runs
on its own code, timed by this process's CPU time whatever clock that revision's benchmark reads
(issue 10's reference, 2519966, has no --clock), with OpenCV on one thread as ours. Revisions that do
not split eval-side from training-side hashing get the split here: their `view_features` (in groups of
16, as the audit hashes them, where the revision has `view_features_many`) and `features` timed on
the benchmark's own images. Prints one JSON object.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import time
import types
from pathlib import Path


def main(argv: list[str]) -> int:
    tree, n_images, seed = Path(argv[0]).resolve(), int(argv[1]), int(argv[2])
    here = Path(__file__).resolve().parent
    # Its dedup/ and pipeline/, not ours; and not this folder, whose dedup.py would shadow the package.
    sys.path[:] = [str(tree)] + [p for p in sys.path if Path(p or ".").resolve() != here]
    import cv2

    cv2.setNumThreads(1)
    from dedup import image as im
    from dedup.matcher import MatchConfig
    from dedup.synth import TRANSFORMS, random_image
    from pipeline.localweb import encode

    spec = importlib.util.spec_from_file_location("reference_bench", tree / "benchmarks" / "dedup.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.time = types.SimpleNamespace(perf_counter=time.process_time, process_time=time.process_time)
    if hasattr(bench, "clock"):
        bench.clock = time.process_time
    cfg = MatchConfig()
    result = bench.bench_images(n_images, seed, cfg)
    if "eval_hashes_per_s" not in result:
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
        result["eval_hashes_per_s"] = round(n_eval / (t_eval - t))
        result["train_hashes_per_s"] = round(len(train) / (t_train - t_eval))
        result["split_timed_here"] = True
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
