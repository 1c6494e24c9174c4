"""benchmarks/dedup.py --against: this code and another revision's, each in its own process, as ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "dedup.py"
pytestmark = pytest.mark.timeout(300)


def test_against_a_revision_reports_both_sides_and_their_ratios(tmp_path):
    out, tmp = tmp_path / "bench.json", tmp_path / "tmp"
    tmp.mkdir()
    r = subprocess.run([sys.executable, str(BENCH), "--skip", "text,edits", "--images", "80", "--against", "HEAD",
                        "--rounds", "2", "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=280,
                       env={**os.environ, "TMPDIR": str(tmp)})
    assert r.returncode == 0, r.stderr[-2000:]
    a = json.loads(out.read_text())["against"]
    assert a["rev"] == "HEAD" and len(a["rounds"]) == 2
    for rnd in a["rounds"]:
        for who in ("ours", "theirs"):
            assert all(rnd[who][k] > 0 for k in ("hashes_per_s", "eval_hashes_per_s", "train_hashes_per_s",
                                                 "match_per_s_incl_verification"))
            assert rnd[who]["recall"] > 0.5  # each side really matched its planted copies
    for k, ratios in a["ratios"].items():
        assert ratios == [round(x["ours"][k] / x["theirs"][k], 2) for x in a["rounds"]]
    assert "ours against HEAD, 2 rounds alternating" in r.stdout
    assert "round 2: theirs" in r.stderr.splitlines()[2]  # the second round ran theirs first
    assert not list(tmp.iterdir())  # its copy of the revision is gone


@pytest.mark.parametrize("args, why", [(["--against", "no-such-rev"], "is not a commit"),
                                       (["--against", "HEAD", "--rounds", "0"], "--rounds must be at least 1"),
                                       (["--against", "HEAD:README.md"], "is not a commit"),
                                       (["--images", "4"], "--images must be at least 10")])
def test_against_bad_input_is_one_line_and_exit_2(tmp_path, args, why):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(BENCH), "--skip", "text,image,edits", "--out", str(out), *args],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stdout == "" and not out.exists()


def _tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "HEAD", "dedup", "pipeline",
                              "benchmarks"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def test_reference_split_times_its_own_code_and_refuses_to_stand_in_ours(tmp_path):
    # `split` (for revisions whose benchmark does not split eval from training hashing) in a process
    # of its own; a module the revision lacks must not be taken from this checkout's install.
    tree = _tree(tmp_path)
    script = str(REPO / "benchmarks" / "reference_images.py")
    r = subprocess.run([sys.executable, script, str(tree), "40", "0", "split"], capture_output=True, text=True,
                       cwd=tree, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    figures = json.loads(r.stdout)
    assert set(figures) == {"eval_hashes_per_s", "train_hashes_per_s"} and min(figures.values()) > 0
    (tree / "dedup" / "synth.py").unlink()
    r = subprocess.run([sys.executable, script, str(tree), "40", "0", "split"], capture_output=True, text=True,
                       cwd=tree, timeout=120)
    assert r.returncode == 2 and "synth" in r.stderr and r.stdout == "", r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1
