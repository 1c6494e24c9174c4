"""Overlap-detection benchmark: speed of signatures, hashes and lookups; precision/recall vs brute force;
the edit table of issue 10.

    python benchmarks/dedup.py --captions 50000 --images 5000 [--photos report|tune] [--clock wall|cpu]
        [--out bench-out/dedup.json]
    python benchmarks/dedup.py --skip text,edits --against 2519966 --rounds 3

`--against REV`: the image part of this code and of revision REV of this clone (issue 10's reference
is 2519966, the last dedup change before its work), each in a fresh process instead of this one,
rounds alternating which goes first, both timed by CPU time; prints each round's figures and the
ratios, ours over theirs.

Not a timed test: it prints figures. Captions: random sentences, with planted
copies of eval captions (case/punctuation/spacing changed) and near copies
(one word changed). Caption signatures are timed from raw captions; datasketch's
`MinHash.bulk` gets the same captions' shingle sets ready-made (untimed), same
num_perm and seed, in the same run; both timed alike (see `best_time`). Images: localweb-style images, eval images copied into
the training side with each edit of `dedup.synth.TRANSFORMS`, plus unrelated
images of the same shape and colour. Edit table: one half of the packaged photographs
(`--photos`; the thresholds were chosen on `tune`) and generated images, copies under
each edit kind of `dedup.synth.EDITS`, and distinct look-alikes; recall per edit kind and
family, precision, hashes/s and matches/s."""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from datasketch import MinHash  # noqa: E402
from PIL import Image  # noqa: E402

from dedup import image as im  # noqa: E402
from dedup.evalsets import load_eval_set  # noqa: E402
from dedup.index import TextIndex  # noqa: E402
from dedup.matcher import (  # noqa: E402
    EVAL_GROUP,
    EvalSetIndex,
    MatchConfig,
    OverlapMatcher,
    brute_force_image_candidates,
    image_candidates,
    image_index,
)
from dedup.synth import (  # noqa: E402
    EDIT_RECALL_BAR,
    TRANSFORMS,
    edit_table,
    generated,
    generated_lookalike,
    photos,
    plant_edits,
    plant_lookalikes,
    random_image,
    split_photos,
)
from dedup.text import TextSigner, jaccard, shingle_hash  # noqa: E402
from pipeline.localweb import encode  # noqa: E402

clock = time.perf_counter
"""What the image parts time: wall clock, or with --clock cpu this process's CPU time (on a machine
other jobs share, CPU seconds say more about cost per core than wall seconds do)."""


def best_time(fn: Callable[[], Any], repeats: int, window: float = 0.5) -> tuple[float, Any]:
    """(seconds per call, the last result): best of `repeats` measurements, each the
    mean over enough back-to-back calls to last `window` seconds, so that a short
    call is timed over as long a stretch as a long one on a shared machine."""
    t = time.perf_counter()
    result = fn()
    calls = max(1, math.ceil(window / (time.perf_counter() - t)))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            result = fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best, result


def bench_text(n_train: int, n_eval: int, seed: int, cfg: MatchConfig, repeats: int = 3) -> dict:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(2000)]

    def sentence() -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(8, 16)))

    evals = [sentence() for _ in range(n_eval)]
    train = [sentence() for _ in range(n_train)]
    n_plant = max(1, n_train // 100)
    for i in range(n_plant):
        e = rng.randrange(n_eval)
        words = evals[e].split()
        if i % 2:
            train[rng.randrange(n_train)] = "  " + evals[e].upper().replace(" ", " ,  ") + "!"
        else:
            words[rng.randrange(len(words))] = "changed"
            train[rng.randrange(n_train)] = " ".join(words)
    signer = TextSigner(cfg.num_perm, cfg.seed, cfg.ngram)
    # Ours: raw captions in, signatures out (normalising and shingling included).
    # datasketch: the same captions' shingle sets, made beforehand and not timed,
    # through `MinHash.bulk` with the same num_perm and seed. Both timed the same way.
    ours_s, sigs = best_time(lambda: signer.signatures(train), repeats)
    sh = signer.shingle_sets(train)
    tokens = [[s.encode() for s in x] for x in sh]
    ds_s, ref = best_time(lambda: MinHash.bulk(tokens, num_perm=cfg.num_perm, seed=cfg.seed), repeats)
    # Same values as datasketch's own MinHash given our shingle hash (on a sample:
    # scalar Python hashing is slow), and as signing the shingle sets directly.
    sample = range(0, n_train, max(1, n_train // 500))
    ds_same_hash = MinHash.bulk([tokens[i] for i in sample], num_perm=cfg.num_perm, seed=cfg.seed,
                                hashfunc=shingle_hash)
    equal_ds = all(np.array_equal(sigs[i], m.hashvalues) for i, m in zip(sample, ds_same_hash, strict=True))
    equal_sets = bool(np.array_equal(sigs, signer.signatures_from_shingles(sh)))

    t = time.perf_counter()
    index = TextIndex(signer, evals, list(range(n_eval)), cfg.text_threshold)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    got = index.search(sh, sigs)
    query_s = time.perf_counter() - t
    # Brute force, exactly: a pair with no shingle in common has Jaccard 0, so an
    # inverted index over shingles enumerates every pair that could reach the threshold.
    inv = defaultdict(list)
    for j, s in enumerate(index.shingles):
        for x in s:
            inv[x].append(j)
    want, overlapping = {}, []
    for i, s in enumerate(sh):
        for j in {j for x in s for j in inv.get(x, ())}:
            jac = jaccard(s, index.shingles[j])
            overlapping.append((i, j, jac))
            if jac >= cfg.text_threshold:
                want[(i, j)] = max(jac, want.get((i, j), 0.0))
    tp = len(set(got) & set(want))
    # Estimate quality on every (training, eval) pair with a shingle in common:
    # |MinHash estimate - exact Jaccard|, ours and datasketch's (sha1) sketches.
    eval_sigs = signer.signatures(evals)
    eval_ref = MinHash.bulk([[s.encode() for s in x] for x in index.shingles], num_perm=cfg.num_perm, seed=cfg.seed)
    err_ours = [abs(float(np.mean(sigs[i] == eval_sigs[j])) - jac) for i, j, jac in overlapping]
    err_ds = [abs(ref[i].jaccard(eval_ref[j]) - jac) for i, j, jac in overlapping]
    return {"captions": n_train, "eval_captions": n_eval, "ngram": cfg.ngram, "num_perm": cfg.num_perm,
            "timing": f"best of {repeats} runs of >= 0.5 s each, after one warm-up call",
            "signatures_per_s": round(n_train / ours_s), "datasketch_bulk_per_s": round(n_train / ds_s),
            "speedup_vs_datasketch": round(ds_s / ours_s, 1),
            "equal_to_datasketch_with_shingle_hash": equal_ds, "equal_to_signing_shingle_sets": equal_sets,
            "overlapping_pairs": len(overlapping),
            "jaccard_estimate_mean_abs_error": round(float(np.mean(err_ours)), 4) if err_ours else None,
            "datasketch_sha1_estimate_mean_abs_error": round(float(np.mean(err_ds)), 4) if err_ds else None,
            "lsh_build_s": round(build_s, 2), "lsh_queries_per_s": round(n_train / query_s),
            "pairs_found": len(got), "pairs_brute_force": len(want),
            "precision": round(tp / len(got), 4) if got else 1.0, "recall": round(tp / len(want), 4) if want else 1.0}


def bench_images(n_images: int, seed: int, cfg: MatchConfig) -> dict:
    rng = random.Random(seed)
    n_eval = n_images // 2
    eval_imgs = [random_image(rng, (128, 128))[0] for _ in range(n_eval)]
    eval_bytes = [encode(x, "jpg") for x in eval_imgs]
    train_bytes, truth = [], {}
    names = sorted(TRANSFORMS)
    n_plant = n_eval // 5
    for i in range(n_images - n_eval):
        if i < n_plant:
            e = rng.randrange(n_eval)
            truth[i] = e
            train_bytes.append(TRANSFORMS[names[i % len(names)]](eval_imgs[e]))
        else:  # unrelated, often the same shape and colour as some eval image
            train_bytes.append(encode(random_image(rng, rng.choice([(128, 128), (200, 150), (96, 96)]))[0], "jpg"))
    t = clock()
    # In groups, as the audit hashes them (`dedup.matcher._set_features`).
    ef = [f for g in range(0, n_eval, EVAL_GROUP) for f in im.view_features_many(eval_bytes[g : g + EVAL_GROUP], cfg.crop)]
    t_eval = clock()
    tf = [im.features(b, cfg.crop) for b in train_bytes]
    feats = ef + tf
    hash_s = clock() - t
    eval_s, train_s = t_eval - t, hash_s - (t_eval - t)
    t = clock()
    ii = image_index(ef, cfg.image_max_distance, cfg.image_max_part_distance)
    build_s = clock() - t
    set_index = EvalSetIndex("bench", "retrieval", "pairs", [str(i) for i in range(n_eval)], ii, None)
    matcher = OverlapMatcher([set_index], MatchConfig(**{**cfg.__dict__, "kinds": ("image",)}))
    t = clock()
    found = []
    for b in range(0, len(tf), 256):
        found += matcher.match_features([None] * len(tf[b:b + 256]), tf[b:b + 256])
    match_s = clock() - t
    got = {(i, int(m.eval_item)) for i, ms in enumerate(found) for m in ms}
    want = set(truth.items())
    tp = len(got & want)
    per_edit = {n: sum((i, e) in got for i, e in truth.items() if i % len(names) == k) /
                max(1, sum(1 for i in truth if i % len(names) == k)) for k, n in enumerate(names)}
    # Candidate stage vs brute force Hamming over all pairs (same distance threshold).
    t = clock()
    band = image_candidates(set_index, tf, cfg)
    band_s = clock() - t
    brute = brute_force_image_candidates(set_index, tf, cfg)
    index_bytes = sum(a.nbytes for a in (ii.variants, ii.chroma, ii.variant_view, ii.thumbs, ii.colours))
    index_bytes += sum(b.hashes.nbytes + sum(t.nbytes for tab in b._tables for t in tab) for b in ii.bands)
    # The eval side is hashed once per audit and costs more (every crop box, mirror and turn); the
    # training side, once per corpus image, is what grows with the corpus.
    return {"images_hashed": len(feats), "hashes_per_s": round(len(feats) / hash_s),
            "eval_hashes_per_s": round(n_eval / eval_s), "train_hashes_per_s": round(len(tf) / train_s),
            "eval_images": n_eval, "train_images": len(tf), "planted": len(truth),
            "index_rows_per_view": round(len(ii.variants) / len(ii.thumbs), 1),
            "index_kib_per_view": round(index_bytes / len(ii.thumbs) / 1024, 1),
            "banded_build_s": round(build_s, 3), "banded_queries_per_s": round(len(tf) / band_s),
            "banded_equals_brute_force": band == brute, "candidate_pairs": len(band),
            "match_per_s_incl_verification": round(len(tf) / match_s),
            "precision": round(tp / len(got), 4) if got else 1.0, "recall": round(tp / len(want), 4),
            "recall_per_edit": {k: round(v, 4) for k, v in per_edit.items()}, "false_matches": len(got - want)}


def bench_edits(copies: int, n_generated: int, seed: int, cfg: MatchConfig, half: str = "report") -> dict:
    """The edit table (issue 10): eval images = one half of the packaged photographs (`split_photos`;
    thresholds were tuned on the other) plus generated images of three generators; training side =
    `copies` edited copies of every eval photo (one of every generated image) per edit kind, and the
    look-alikes (stereo partner, other tiles and faces, generated images of the same kind and layout)."""
    tune, report = split_photos(photos())
    chosen = report if half == "report" else tune
    rng = random.Random(seed)
    gens = generated(n_generated, seed + 1)
    with tempfile.TemporaryDirectory() as tmp:
        evals: dict[str, list[tuple[str, Image.Image]]] = {"photo": [], "generated": []}
        for fam, items in (("photo", [(p.name, p.image) for p in chosen if not p.lookalike]), ("generated", gens)):
            for name, img in items:
                item = f"{fam}/{name.replace('/', '_').replace('#', '_')}.jpg"
                (Path(tmp) / item).parent.mkdir(exist_ok=True)
                (Path(tmp) / item).write_bytes(encode(img, "jpg", 95))
                evals[fam].append((item, img))
        es = load_eval_set("edits", tmp)
        t = clock()
        matcher = OverlapMatcher.build([es], MatchConfig(**{**cfg.__dict__, "kinds": ("image",)}), threads=1)
        index_s = clock() - t
    queries = plant_edits(evals["photo"], "photo", copies, rng) + plant_edits(evals["generated"], "generated", 1, rng)
    queries += plant_lookalikes([p.image for p in chosen if p.lookalike], "photo", rng)
    queries += plant_lookalikes([generated_lookalike(n, img.size, seed + 1, rng) for n, img in gens], "generated", rng)
    t = clock()
    feats = [im.features(q.data, cfg.crop) for q in queries]
    hash_s = clock() - t
    t = clock()
    found = []
    for b in range(0, len(feats), 256):
        found += [{m.eval_item for m in ms} for ms in matcher.match_features([None] * len(feats[b:b + 256]),
                                                                           feats[b:b + 256])]
    match_s = clock() - t
    table = edit_table(queries, found)
    return {"photos": half, "eval_photos": len(evals["photo"]), "eval_generated": len(evals["generated"]),
            "queries": len(queries), "eval_index_s": round(index_s, 2),
            "query_hashes_per_s": round(len(queries) / hash_s), "matches_per_s": round(len(queries) / match_s),
            "families": table}


def format_edit_table(r: dict) -> str:
    fam = r["families"]
    lines = [f"{'edit kind':<12} {'bar':>5} {'photos (' + r['photos'] + ' half)':>22} {'generated':>16}"]
    for kind, bar in EDIT_RECALL_BAR.items():
        cells = []
        for f in ("photo", "generated"):
            x = fam[f]["recall"].get(kind)
            cells.append(f"{x['recall']:.3f} ({x['found']}/{x['planted']})" if x else "-")
        lines.append(f"{kind:<12} {bar:>5} {cells[0]:>22} {cells[1]:>16}")
    for key, label in (("precision", "precision"), ("lookalikes_matched", "look-alikes matched")):
        cells = [f"{fam[f][key]}" + (f" of {fam[f]['lookalikes']}" if key == "lookalikes_matched" else
                                     f" ({fam[f]['false_matches']} false of {fam[f]['matches']})")
                 for f in ("photo", "generated")]
        lines.append(f"{label:<18} {cells[0]:>22} {cells[1]:>16}")
    lines.append(f"edit-table queries: {r['queries']}, hashed {r['query_hashes_per_s']}/s, "
                 f"matched {r['matches_per_s']}/s (incl. verification)")
    return "\n".join(lines)


REPO = Path(__file__).resolve().parents[1]
SPEED_KEYS = ("hashes_per_s", "eval_hashes_per_s", "train_hashes_per_s", "match_per_s_incl_verification")


def against(rev: str, rounds: int, n_images: int, seed: int) -> dict:
    """The image part of this code and of `rev`, `rounds` times, alternating which runs first."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"benchmarks/dedup.py: --against {rev}: git archive failed: {archive.stderr.decode()[-300:]}")
    tree = Path(tempfile.mkdtemp(prefix="dedup-against-"))  # removed at the end: made here
    try:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tree, filter="data")
        return _against(rev, tree, rounds, n_images, seed)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def _against(rev: str, tree: Path, rounds: int, n_images: int, seed: int) -> dict:
    ours_cmd = [sys.executable, str(Path(__file__).resolve()), "--skip", "text,edits", "--images", str(n_images),
                "--seed", str(seed), "--clock", "cpu"]
    theirs_cmd = [sys.executable, str(Path(__file__).resolve().parent / "reference_images.py"), str(tree),
                  str(n_images), str(seed)]

    def run(cmd: list[str], who: str, r: int) -> dict:
        print(f"round {r}: {who} ...", file=sys.stderr, flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO if who == "ours" else tree)
        if out.returncode == 2:  # the revision cannot be measured (its line says why): bad input
            print(f"benchmarks/dedup.py: --against {rev}: {out.stderr.strip().splitlines()[-1]}", file=sys.stderr)
            raise SystemExit(2)
        if out.returncode:
            raise SystemExit(f"benchmarks/dedup.py: --against {rev}: {who} failed: {out.stderr.strip()[-400:]}")
        figures = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
        return figures.get("image", figures)

    def theirs(r: int) -> dict:
        figures = run(theirs_cmd + ["bench"], "theirs", r)
        if "eval_hashes_per_s" not in figures:  # its benchmark does not split them: timed apart, also fresh
            figures.update(run(theirs_cmd + ["split"], "theirs (eval/training split)", r))
        return figures

    per_round = []
    for r in range(1, rounds + 1):
        pair = {}
        for who in (("ours", "theirs") if r % 2 else ("theirs", "ours")):
            pair[who] = run(ours_cmd, who, r) if who == "ours" else theirs(r)
        per_round.append({who: {k: pair[who][k] for k in SPEED_KEYS + ("precision", "recall")} for who in pair})
    ratios = {k: [round(x["ours"][k] / x["theirs"][k], 2) for x in per_round] for k in SPEED_KEYS}
    return {"rev": rev, "rounds": per_round, "ratios": ratios,
            "median_ratios": {k: round(statistics.median(v), 2) for k, v in ratios.items()}}


def format_against(a: dict) -> str:
    lines = [f"ours against {a['rev']}, {len(a['rounds'])} rounds alternating, per CPU-second:",
             f"{'':<30} {'ours':>20} {'theirs':>20} {'ratio':>16} {'median':>7}"]
    for k in SPEED_KEYS:
        ours = " / ".join(str(x["ours"][k]) for x in a["rounds"])
        theirs = " / ".join(str(x["theirs"][k]) for x in a["rounds"])
        ratio = " / ".join(f"{v:.2f}" for v in a["ratios"][k])
        lines.append(f"{k:<30} {ours:>20} {theirs:>20} {ratio:>16} {a['median_ratios'][k]:>7.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", type=int, default=50_000)
    p.add_argument("--eval-captions", type=int, default=5_000)
    p.add_argument("--images", type=int, default=5_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--copies", type=int, default=3, help="edit table: copies of each eval photo per edit kind")
    p.add_argument("--generated", type=int, default=120, help="edit table: generated eval images")
    p.add_argument("--photos", choices=("report", "tune"), default="report",
                   help="edit table: which half of the packaged photographs (thresholds were tuned on 'tune')")
    p.add_argument("--skip", default="", help="comma list of parts to leave out: text, image, edits")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="image parts: time by the wall clock or by this process's CPU time")
    p.add_argument("--repeats", type=int, default=3, help="caption signature timings (ours, datasketch): best of N")
    p.add_argument("--out", default=None, help="also write the figures here as JSON")
    p.add_argument("--against", default=None, metavar="REV",
                   help="also run the image part of this clone's revision REV, alternating (ratios ours/theirs)")
    p.add_argument("--rounds", type=int, default=3, help="--against: rounds of each")
    args = p.parse_args(argv)
    if args.images < 10:
        print(f"benchmarks/dedup.py: --images must be at least 10, got {args.images}", file=sys.stderr)
        return 2
    if args.against is not None:
        why = None
        found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", args.against + "^{commit}"],
                               capture_output=True, text=True)
        if found.returncode:
            why = (f"{args.against} is not a commit of {REPO}" + (" (a shallow clone: git fetch --unshallow)"
                   if (REPO / ".git" / "shallow").exists() else ""))
        elif subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{args.against}:benchmarks/dedup.py"],
                            capture_output=True).returncode:
            why = f"{args.against} has no benchmarks/dedup.py to run"
        elif args.rounds < 1:
            why = "--rounds must be at least 1"
        if why:
            print(f"benchmarks/dedup.py: --against: {why}", file=sys.stderr)
            return 2
    import cv2

    cv2.setNumThreads(1)  # figures per core
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    cfg = MatchConfig()
    skip = set(args.skip.split(","))
    result: dict[str, Any] = {"clock": args.clock}
    if "text" not in skip:
        result["text"] = bench_text(args.captions, args.eval_captions, args.seed, cfg, args.repeats)
    if "image" not in skip and args.against is None:  # --against runs it in a process of its own
        result["image"] = bench_images(args.images, args.seed, cfg)
    if "edits" not in skip:
        result["edits"] = bench_edits(args.copies, args.generated, args.seed, cfg, args.photos)
    if args.against is not None:
        result["against"] = against(args.against, args.rounds, args.images, args.seed)
    text = json.dumps(result, indent=2)
    print(text)
    if "edits" in result:
        print(format_edit_table(result["edits"]))
    if "against" in result:
        print(format_against(result["against"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
