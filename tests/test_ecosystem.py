"""Issue 9: img2dataset corpora in and out, inputs people have (no header, nested json)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.audit_overlap import main as audit_main
from jobs.build_corpus import main as build_main
from pipeline.localweb import populate_images, write_imagefolder

pytestmark = pytest.mark.timeout(240)
BIN = Path(sys.executable).parent


def _samples(shards: Path) -> list[dict]:
    out = []
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    out.append(json.loads(t.extractfile(m).read()))
    return out


@pytest.fixture(scope="module")
def img2dataset_corpus(tmp_path_factory):
    """A webdataset corpus written by img2dataset itself from the local web (8 images, 2 failures)."""
    from pipeline.localweb import LocalWeb

    root = tmp_path_factory.mktemp("i2d")
    web = LocalWeb("127.0.0.1").start()
    try:
        rows = populate_images(web, 8, seed=31)
        rows += [{"url": f"http://{web.hostport}/missing{i}.jpg", "caption": "gone", "uid": f"m{i}", "label": ""}
                 for i in range(2)]
        for r in rows:
            r["similarity"] = 0.25 + len(r["uid"]) / 100
        urls = root / "urls.parquet"
        pq.write_table(pa.Table.from_pylist(rows), urls)
        out = root / "i2d"
        r = subprocess.run(
            [str(BIN / "img2dataset"), f"--url_list={urls}", "--input_format=parquet", "--url_col=url",
             "--caption_col=caption", "--save_additional_columns=['uid','similarity']", "--output_format=webdataset",
             f"--output_folder={out}", "--processes_count=1", "--thread_count=4", "--image_size=64",
             "--resize_mode=center_crop", "--number_sample_per_shard=4", "--distributor=multiprocessing",
             "--timeout=5", "--retries=0", "--enable_wandb=False", "--compute_hash=sha256"],
            capture_output=True, text=True, timeout=200,
            env={"PATH": f"{BIN}:/usr/bin:/bin", "NO_ALBUMENTATIONS_UPDATE": "1", "HOME": str(root)})
        assert r.returncode == 0, r.stderr[-3000:]
        ours = root / "ours"
        assert build_main(["--urls", str(urls), "--out", str(ours), "--allow-hosts", web.hostport, "--executor",
                           "local", "--extra-cols", "uid,similarity", "--image-size", "64", "--samples-per-shard",
                           "4", "--timeout", "5", "--retries", "0", "--min-image-side", "1"]) == 0
    finally:
        web.stop()
    return root, out, ours


def test_our_samples_carry_img2dataset_fields_with_their_types(img2dataset_corpus):
    _, theirs, ours = img2dataset_corpus
    a, b = _samples(theirs), _samples(ours / "shards")
    assert len(a) == len(b) == 8
    for field in a[0]:  # every field img2dataset writes, with the same JSON type
        assert field in b[0], field
        assert type(b[0][field]) is type(a[0][field]) or a[0][field] is None or b[0][field] is None, field
    assert isinstance(b[0]["similarity"], float) and b[0]["status"] == "success" and b[0]["error_message"] is None
    by_key = {s["uid"]: s for s in b}
    for s in a:
        ours_s = by_key[s["uid"]]
        assert (ours_s["url"], ours_s["caption"], ours_s["sha256"]) == (s["url"], s["caption"], s["sha256"])
        assert (ours_s["original_width"], ours_s["width"]) == (s["original_width"], s["width"])


def test_a_parquet_beside_each_shard_as_img2dataset_writes(img2dataset_corpus):
    _, theirs, ours = img2dataset_corpus
    sizes = json.loads((ours / "shards" / "sizes.json").read_text())
    for name, n in sizes.items():
        t = pq.read_table(ours / "shards" / name.replace(".tar", ".parquet"))
        assert t.num_rows == n
        ref = pq.read_schema(theirs / "00000.parquet")
        for field in ("key", "url", "caption", "status", "error_message", "width", "height", "original_width",
                      "original_height", "sha256", "similarity"):
            assert t.schema.field(field).type == ref.field(field).type, field


def test_audit_reads_an_img2dataset_corpus_as_it_is(img2dataset_corpus, tmp_path, capsys):
    root, theirs, _ = img2dataset_corpus
    assert not (theirs / "sizes.json").exists()
    ev = tmp_path / "ev"
    write_imagefolder(ev, per_class=1)
    out = tmp_path / "audited"
    assert audit_main(["--corpus", str(theirs), "--eval", f"e={ev}", "--out", str(out), "--executor", "local"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "rows in 8 = written 8 + dropped 0 + failed 0"
    assert sum(json.loads((out / "shards" / "sizes.json").read_text()).values()) == 8
    assert not (theirs / "sizes.json").exists()  # the input is only read


def test_tsv_without_a_header_by_column_position(tmp_path, web):
    rows = populate_images(web, 5, seed=12)
    path = tmp_path / "cc3m.tsv"  # CC3M's layout: caption<TAB>url, no header
    path.write_text("".join(f"{r['caption']}\t{r['url']}\n" for r in rows))
    out = tmp_path / "o"
    assert build_main(["--urls", str(path), "--out", str(out), "--allow-hosts", web.hostport, "--executor", "local",
                       "--no-header", "--url-col", "1", "--caption-col", "0"]) == 0
    got = sorted((s["url"], s["caption"]) for s in _samples(out / "shards"))
    assert got == sorted((r["url"], r["caption"]) for r in rows)


def test_nested_jsonl_by_dotted_path(tmp_path, web, capsys):
    rows = populate_images(web, 4, seed=13)
    path = tmp_path / "nested.jsonl"
    path.write_text("".join(json.dumps({"image": {"url": r["url"], "width": 10 + i}, "text": r["caption"]}) + "\n"
                            for i, r in enumerate(rows)))
    out = tmp_path / "o"
    assert build_main(["--urls", str(path), "--out", str(out), "--allow-hosts", web.hostport, "--executor", "local",
                       "--url-col", "image.url", "--caption-col", "text", "--extra-cols", "image.width"]) == 0
    got = {s["url"]: s["image.width"] for s in _samples(out / "shards")}
    assert got == {r["url"]: 10 + i for i, r in enumerate(rows)}
    capsys.readouterr()
    assert build_main(["--urls", str(path), "--out", str(tmp_path / "o2"), "--executor", "local",
                       "--url-col", "image.href", "--caption-col", "text"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing column(s) image.href" in err[0], err


def test_extra_columns_keep_their_types_and_nulls(tmp_path, web):
    rows = populate_images(web, 3, seed=14)
    for i, r in enumerate(rows):
        r.update(similarity=0.3 + i / 10, punsafe=None if i == 1 else 0.01, nsfw=bool(i % 2), width_hint=i)
    path = tmp_path / "laion.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = tmp_path / "o"
    assert build_main(["--urls", str(path), "--out", str(out), "--allow-hosts", web.hostport, "--executor", "local",
                       "--extra-cols", "similarity,punsafe,nsfw,width_hint"]) == 0
    got = {s["url"]: s for s in _samples(out / "shards")}
    for i, r in enumerate(rows):
        s = got[r["url"]]
        assert s["similarity"] == pytest.approx(0.3 + i / 10) and isinstance(s["similarity"], float)
        assert s["punsafe"] == (None if i == 1 else 0.01)
        assert s["nsfw"] is bool(i % 2) and s["width_hint"] == i
    buf = io.BytesIO((out / "shards" / "00000.parquet").read_bytes())
    assert pq.read_table(buf).schema.field("similarity").type == pa.float64()


def test_trainer_takes_an_img2dataset_corpus_as_it_is(img2dataset_corpus, tmp_path):
    # img2dataset writes no sizes.json: the trainer counts samples from its NNNNN_stats.json files
    # (its failed rows are in no tar) and trains on the folder as img2dataset left it.
    from train_helpers import TINY, train

    _, i2d, _ = img2dataset_corpus
    assert not (i2d / "sizes.json").exists()
    tars = sorted(i2d.glob("*.tar"))
    spec = f"{i2d}/{{{tars[0].stem}..{tars[-1].stem}}}.tar"
    r = train("--train-data", spec, "--model", TINY, "--batch-size", "4", "--workers", "1", "--precision", "fp32",
              "--epochs", "1", "--log-every", "1", "--warmup", "1", "--output", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    successes = sum(json.loads(p.read_text())["successes"] for p in i2d.glob("*_stats.json"))
    assert successes == 8
    log = [json.loads(x) for x in (tmp_path / "run/train_log.jsonl").read_text().splitlines()]
    assert log and log[-1]["step"] == successes // 4 and log[-1]["bad_samples"] == 0


_READ_WITH_WEBDATASET_1 = """
import json, sys
import webdataset as wds
urls = json.loads(sys.argv[1])
rows = [(key, img.size, txt, meta) for key, img, txt, meta in
        wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json")]
print(json.dumps({"version": wds.__version__, "file": wds.__file__, "keys": [r[0] for r in rows],
                  "sizes": [list(r[1]) for r in rows], "captions": [r[2] for r in rows],
                  "meta_keys": sorted(set().union(*(r[3] for r in rows)))}))
"""


def test_webdataset_1_reads_our_shards(img2dataset_corpus):
    # The current webdataset (1.x, a side install outside the venv, as `make test` puts it in .wds-1)
    # reads our corpus: every sample, decoded, with img2dataset's json fields.
    _, _, ours = img2dataset_corpus
    side = Path(__file__).resolve().parents[1] / ".wds-1"
    if not (side / "webdataset").is_dir():
        pytest.fail(f"{side} missing: pip install --no-deps --target .wds-1 webdataset==1.0.2")
    shards = ours / "shards"
    urls = [str(p) for p in sorted(shards.glob("*.tar"))]
    r = subprocess.run([sys.executable, "-c", _READ_WITH_WEBDATASET_1, json.dumps(urls)], capture_output=True,
                       text=True, timeout=120, env={"PYTHONPATH": str(side), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    assert got["version"].startswith("1.") and ".wds-1" in got["file"]
    sizes = json.loads((shards / "sizes.json").read_text())
    assert len(got["keys"]) == sum(sizes.values()) == 8
    assert got["sizes"] == [[64, 64]] * 8 and all(got["captions"])
    assert {"key", "url", "caption", "status", "error_message", "width", "height", "sha256", "exif"} <= set(
        got["meta_keys"])
