"""OUT/curves.png: training loss and zero-shot accuracy against the step."""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training nodes
import matplotlib.pyplot as plt  # noqa: E402

from training.storage import Loc  # noqa: E402


def _read_jsonl(path: Loc) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(out: str | Path | Loc) -> Loc:
    """OUT/curves.png of OUT's logs; OUT a local folder or a URL."""
    out = Loc.of(out)
    # A resumed run appends; keep the last record per step so a replayed step is drawn once.
    train = {r["step"]: r for r in _read_jsonl(out / "train_log.jsonl")}
    evals: dict[str, dict[int, float]] = {}
    for r in _read_jsonl(out / "results.jsonl"):
        value = r.get("top1") if r.get("kind") == "zeroshot" else r.get("i2t_R@1")
        label = f"{r['set']} top-1" if r.get("kind") == "zeroshot" else f"{r['set']} i2t R@1"
        if value is not None:
            evals.setdefault(label, {})[r["step"]] = value
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    steps = sorted(train)
    ax_loss.plot(steps, [train[s]["loss"] for s in steps])
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    for label, points in evals.items():
        xs = sorted(points)
        ax_acc.plot(xs, [points[x] for x in xs], marker="o", label=label)
    ax_acc.set(xlabel="step", ylabel="accuracy", title="zero-shot evaluation", ylim=(0, 1))
    if evals:
        ax_acc.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    path = out / "curves.png"
    path.write_bytes(buf.getvalue())  # atomically: curves.png.tmp-PID-HEX8, then renamed
    return path
