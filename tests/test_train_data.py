"""The training data stream: partitioning, equal steps per rank, exact resume, bad shards."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import open_clip
import pytest
import torch

from pipeline.shards import write_tar
from training.data import EpochPlan, ShardSet, count_samples, expand_shards, make_loader
from training.errors import TrainError
from training.synthetic import write_shape_shards

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def codec():
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    transform = open_clip.image_transform(32, is_train=True)  # random crop: exercises per-sample seeding
    return transform, tokenizer


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shards")
    # 7 shards of 20 + one of 10: uneven on purpose, so ranks/workers get different amounts of data.
    write_shape_shards(d, 150, 20, size=32, fmts=("jpg", "png", "webp"))
    return d


def plan(urls, **kw) -> EpochPlan:
    args = dict(urls=urls, seed=3, epoch=0, rank=0, world_size=1, workers=0, batch_size=8, batches=10,
                shuffle_buffer=50, shuffle_initial=10)
    args.update(kw)
    return EpochPlan(**args)


def batches(p: EpochPlan, codec) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
    return list(make_loader(p, *codec))


def test_expand_and_count(shards):
    urls = expand_shards(f"{shards}/{{00000..00003}}.tar::{shards}/00007.tar")
    assert [Path(u).name for u in urls] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar", "00007.tar"]
    assert count_samples(urls) == 4 * 20 + 10
    with pytest.raises(TrainError, match=r"00008.tar: shard not found \(2 of 10"):
        expand_shards(f"{shards}/{{00000..00009}}.tar")
    with pytest.raises(TrainError, match="expands to no shards"):
        expand_shards("::")


def test_missing_sizes_json(tmp_path):
    write_tar(open(tmp_path / "00000.tar", "wb"), [("a", {"txt": b"x", "jpg": b"y"})])
    with pytest.raises(TrainError, match=r"sizes.json: missing.*--train-num-samples"):
        count_samples([str(tmp_path / "00000.tar")])


def test_ranks_split_shards_and_yield_equal_batches(shards, codec):
    urls = expand_shards(f"{shards}/{{00000..00007}}.tar")
    per_rank = [batches(plan(urls, rank=r, world_size=2, workers=2, batches=9), codec) for r in range(2)]
    assert [len(b) for b in per_rank] == [9, 9]  # same number of steps on every rank, despite uneven shards
    # Within an epoch's first pass the ranks read disjoint shards.
    shards_of = [{k.split("/")[0] for _, _, m in bs for k in m["keys"]} for bs in per_rank]
    assert not shards_of[0] & shards_of[1]
    for images, tokens, meta in per_rank[0]:
        assert images.shape == (8, 3, 32, 32) and tokens.shape == (8, 77) and len(meta["keys"]) == 8
    # Batches alternate between the two workers, as DataLoader's round robin takes them.
    assert [m["worker"] for _, _, m in per_rank[0]] == [0, 1] * 4 + [0]


def test_one_epoch_sees_each_sample_once(shards, codec):
    urls = expand_shards(f"{shards}/{{00000..00006}}.tar")  # 140 samples, all shards full
    bs = batches(plan(urls, batch_size=10, batches=14, workers=0), codec)
    keys = [k for _, _, m in bs for k in m["keys"]]
    assert len(keys) == 140 and len(set(keys)) == 140


def test_shard_order_changes_with_epoch_and_is_shared_by_ranks(shards):
    urls = expand_shards(f"{shards}/{{00000..00007}}.tar")
    order = [plan(urls, epoch=e).worker_shards(0) for e in range(3)]
    assert order[0] != order[1] != order[2]
    split = [plan(urls, epoch=1, rank=r, world_size=2, workers=2).worker_shards(w) for r in range(2) for w in range(2)]
    assert sorted(u for s in split for u in s) == sorted(urls)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_identical_batches(shards, codec, workers):
    urls = expand_shards(f"{shards}/{{00000..00007}}.tar")
    # 25 batches of 8 = 200 > 150 samples: workers wrap around into a second pass.
    full = batches(plan(urls, workers=workers, batches=25), codec)
    for start in (1, 7, 20):
        consumed = [0] * max(1, workers)
        for _, _, meta in full[:start]:
            consumed[meta["worker"]] = meta["consumed"]
        tail = batches(plan(urls, workers=workers, batches=25, start_batch=start, consumed=consumed), codec)
        assert len(tail) == 25 - start
        for (i1, t1, m1), (i2, t2, m2) in zip(full[start:], tail, strict=True):
            assert m1["keys"] == m2["keys"]
            assert torch.equal(i1, i2) and torch.equal(t1, t2)  # same crops too


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_bad_samples_and_shards_are_skipped_and_counted(shards, tmp_path, codec, caplog):
    good = [str(shards / "00000.tar"), str(shards / "00001.tar")]
    corrupt_img = tmp_path / "corrupt.tar"
    corrupt_img.write_bytes(_tar_bytes([("bad1.jpg", b"not a jpeg"), ("bad1.txt", b"a red circle"),
                                        ("notxt.jpg", (shards / "00000.tar").read_bytes()[:10])]))
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes((shards / "00002.tar").read_bytes()[:5000])
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(os.urandom(3000))
    urls = good + [str(p) for p in (corrupt_img, truncated, empty, garbage)]
    bs = batches(plan(urls, batches=6, batch_size=8), codec)
    assert len(bs) == 6
    assert bs[-1][2]["bad"] >= 2  # the undecodable jpg and the txt-less sample, at least
    keys = [k for _, _, m in bs for k in m["keys"]]
    assert not any(k.startswith(("corrupt.tar", "garbage.tar", "empty.tar")) for k in keys)
    assert "skipped bad sample #" in caplog.text
    for damaged in (truncated, empty, garbage):  # each damaged shard is named, whatever else was skipped
        assert f"{damaged}: " in caplog.text and "counted as a bad sample" in caplog.text


def test_all_invalid_shards_raise_instead_of_looping(tmp_path, codec):
    only_txt = tmp_path / "a.tar"
    only_txt.write_bytes(_tar_bytes([(f"k{i}.txt", b"a caption") for i in range(5)]))
    empty = tmp_path / "b.tar"
    empty.write_bytes(b"")
    with pytest.raises(TrainError, match="no sample with an image and a txt"):
        batches(plan([str(only_txt), str(empty)], batches=3), codec)
    # Images that never decode: also an error, not an endless loop (the wrapped worker error keeps the type).
    undecodable = tmp_path / "c.tar"
    undecodable.write_bytes(_tar_bytes([m for i in range(50) for m in ((f"k{i}.jpg", b"xx"), (f"k{i}.txt", b"c"))]))
    with pytest.raises(TrainError, match="failed to decode"):
        batches(plan([str(undecodable)], batches=1, workers=1), codec)


def test_too_few_shards_for_ranks_and_workers(shards):
    with pytest.raises(TrainError, match="2 shards cannot feed 2 ranks x 2 workers"):
        plan([str(shards / "00000.tar"), str(shards / "00001.tar")], world_size=2, workers=2)


def test_quota_splits_remaining_batches_round_robin():
    p = EpochPlan(urls=["a", "b", "c"], seed=0, epoch=0, rank=0, world_size=1, workers=3, batch_size=1,
                  batches=10, start_batch=4, consumed=[1, 1, 1])
    assert [p.quota(w) for w in range(3)] == [2, 2, 2]  # batches 4..9: workers 1,2,0,1,2,0
    assert sum(EpochPlan(urls=["a", "b"], seed=0, epoch=0, rank=0, world_size=1, workers=2, batch_size=1,
                         batches=7, start_batch=s).quota(w) for s in (3,) for w in range(2)) == 4


LOADER_SCRIPT = """
import sys, webdataset, open_clip
from training.data import EpochPlan, make_loader, expand_shards
print("WDS", webdataset.__version__, webdataset.__file__)
urls = expand_shards(sys.argv[1])
p = EpochPlan(urls=urls, seed=1, epoch=0, rank=0, world_size=1, workers=2, batch_size=8, batches=12,
              shuffle_buffer=50, shuffle_initial=10)
keys = [k for _, _, m in make_loader(p, open_clip.image_transform(32, is_train=False),
                                      open_clip.get_tokenizer("ViT-B-32")) for k in m["keys"]]
print("KEYS", ",".join(keys))
"""


@pytest.mark.timeout(180)
def test_loader_works_with_webdataset_0_2_111(shards):
    new = REPO / ".wds-new"
    if not (new / "webdataset").is_dir():
        pytest.fail(f"{new} missing: pip install --no-deps --target .wds-new webdataset==0.2.111")
    outs = {}
    for label, extra in (("new", [str(new)]), ("installed", [])):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([*extra, str(REPO)])}
        r = subprocess.run([sys.executable, "-c", LOADER_SCRIPT, f"{shards}/{{00000..00007}}.tar"],
                           env=env, capture_output=True, text=True, timeout=150, cwd=REPO)
        assert r.returncode == 0, r.stderr[-2000:]
        lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line[:4] in ("WDS ", "KEYS"))
        outs[label] = lines
    assert outs["new"]["WDS"].startswith("0.2.111 ") and ".wds-new" in outs["new"]["WDS"]
    assert not outs["installed"]["WDS"].startswith("0.2.111 ")
    assert len(outs["new"]["KEYS"].split(",")) == 96
    assert outs["new"]["KEYS"] == outs["installed"]["KEYS"]  # same stream, whichever version reads the tars


def _member_offsets(path: Path) -> list[int]:
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


@pytest.mark.parametrize("cut", ["inside_header", "between_members", "inside_data", "garbage_header"])
def test_every_sample_a_damaged_shard_loses_is_counted(shards, tmp_path, codec, caplog, cut):
    """tarfile takes a header cut short (or garbage) for the end of the archive: without a check the
    samples after it vanish without a word. Each cut is counted against sizes.json, and named."""
    raw = (shards / "00000.tar").read_bytes()
    at = _member_offsets(shards / "00000.tar")[3 * 7]  # the header of sample 7 (jpg, txt, json each)
    damaged = {"inside_header": raw[:at + 100], "between_members": raw[:at], "inside_data": raw[:at + 700],
               "garbage_header": raw[:at] + b"\x7f" * 512 + raw[at + 512:]}[cut]
    (tmp_path / "00000.tar").write_bytes(damaged)
    shutil.copy(shards / "00001.tar", tmp_path / "00001.tar")
    urls = [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    sizes = {urls[0]: 20, urls[1]: 20}
    # One pass over both shards: 7 good samples from the damaged one, 20 from the other.
    bs = batches(plan(urls, batches=1, batch_size=27, shuffle_buffer=100, shuffle_initial=100, sizes=sizes), codec)
    keys = [k for _, _, m in bs for k in m["keys"]]
    assert sum(k.startswith("00000.tar/") for k in keys) == 7
    assert bs[-1][2]["bad"] == 13  # 20 - 7: every sample the cut lost, counted
    assert f"{urls[0]}: delivered 7 good" in caplog.text and "where sizes.json says 20" in caplog.text
    assert f"{urls[0]}: the tar ends early" in caplog.text

    # Without a sizes.json the loss cannot be sized, but the shard is still named and counted.
    caplog.clear()
    bs = batches(plan(urls, batches=1, batch_size=27, shuffle_buffer=100, shuffle_initial=100), codec)
    assert bs[-1][2]["bad"] == 1
    assert f"{urls[0]}: the tar ends early" in caplog.text


def test_intact_shards_count_nothing_and_match_sizes_json(shards, codec, caplog):
    urls = expand_shards(f"{shards}/{{00000..00007}}.tar")
    sizes = {u: n for u, n in zip(urls, [20] * 7 + [10], strict=True)}
    bs = batches(plan(urls, batches=18, sizes=sizes), codec)  # 144 of the 150 samples
    assert bs[-1][2]["bad"] == 0 and "ends early" not in caplog.text and "sizes.json says" not in caplog.text


def test_sizes_json_that_overstates_counts_is_flagged(shards, tmp_path):
    for name in ("00000.tar", "00001.tar"):
        shutil.copy(shards / name, tmp_path / name)
    (tmp_path / "sizes.json").write_text('{"00000.tar": 200, "00001.tar": 20}')  # ten times the truth, then right
    shard_set = ShardSet.describe([str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")])
    flagged = shard_set.implausible_counts()
    assert len(flagged) == 1 and flagged[0].startswith(f"{tmp_path / '00000.tar'}: sizes.json says 200 samples")


def test_data_fingerprint_is_content_not_path_spelling(shards, tmp_path):
    urls = expand_shards(f"{shards}/{{00000..00003}}.tar")
    same = expand_shards(f"{shards}/./{{00000..00003}}.tar")
    assert ShardSet.describe(urls).fingerprint() == ShardSet.describe(same).fingerprint()
    copy = tmp_path / "copy"
    copy.mkdir()
    for u in urls:
        shutil.copy(u, copy)
    shutil.copy(shards / "sizes.json", copy)
    assert ShardSet.describe(expand_shards(f"{copy}/{{00000..00003}}.tar")).fingerprint() == \
        ShardSet.describe(urls).fingerprint()
    # Other content at the same path, with the same sizes.json counts and (tar records round sizes up to
    # 10 KiB) the very same file sizes: still other data.
    write_shape_shards(tmp_path / "other", 150, 20, size=32, seed=9, fmts=("jpg", "png", "webp"))
    assert (tmp_path / "other/00002.tar").stat().st_size == (copy / "00002.tar").stat().st_size
    shutil.copy(tmp_path / "other/00002.tar", copy / "00002.tar")
    assert ShardSet.describe(expand_shards(f"{copy}/{{00000..00003}}.tar")).fingerprint() != \
        ShardSet.describe(urls).fingerprint()


def _niceness(pid: int) -> int:
    # /proc/PID/stat: the 19th field is the nice value (after the parenthesised command name).
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads niceness from /proc")
@pytest.mark.parametrize("nice", [0, 19])
def test_loader_workers_run_at_lower_priority_when_asked(shards, codec, nice):
    # CPU training lowers its loader workers' priority (trainer: worker_nice=WORKER_NICE on CPU), so
    # they take cores the thread pool leaves free instead of stalling it; batches are unchanged.
    urls = expand_shards(f"{shards}/{{00000..00007}}.tar")
    loader = make_loader(plan(urls, workers=2), *codec, worker_nice=nice)
    it = iter(loader)
    first = next(it)
    workers = [w.pid for w in it._workers]  # torch's worker processes of this iterator
    assert len(workers) == 2
    assert all(_niceness(pid) == min(19, _niceness(os.getpid()) + nice) for pid in workers)
    got = [first, *it]
    want = batches(plan(urls, workers=2), codec)
    assert len(got) == len(want) == 10
    assert all(torch.equal(a[0], b[0]) and a[2]["keys"] == b[2]["keys"] for a, b in zip(got, want, strict=True))
