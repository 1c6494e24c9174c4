"""The one record that flows through every pipeline stage.

A stage is a generator `stage(samples: Iterator[Sample]) -> Iterator[Sample]`.
Stages never swallow a sample: one that is dropped or failed keeps flowing with
its fate set, so the last stage (the shard writer) can account for every input
row in the manifest. Stages only work on samples whose status is still PENDING.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

PENDING = "pending"
WRITTEN = "written"
DROPPED = "dropped"
FAILED = "failed"
FATES = (WRITTEN, DROPPED, FAILED)


@dataclass(slots=True)
class Sample:
    """One input row on its way to a shard (or to the manifest with a reason)."""

    key: str
    """Zero-padded input row index: unique, stable across reruns, no dots."""
    row: int
    """Index of the row in the (sorted, concatenated) input."""
    url: str
    caption: str | None
    extra: dict[str, Any] = field(default_factory=dict)
    """Extra input columns (`--extra-cols`), carried into the sample's json."""
    image: bytes | None = None
    """Encoded image: the downloaded bytes, then the resized ones."""
    ext: str | None = None
    """Extension of `image` once resized (jpg or webp)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """width, height, original_width, original_height, sha256."""
    status: str = PENDING
    reason: str | None = None
    error: str | None = None

    @property
    def pending(self) -> bool:
        return self.status == PENDING

    def drop(self, reason: str) -> None:
        self.status, self.reason, self.image = DROPPED, reason, None

    def fail(self, reason: str, error: str | None = None) -> None:
        self.status, self.reason, self.error, self.image = FAILED, reason, error, None


Stage = Callable[[Iterator[Sample]], Iterator[Sample]]


def run_stages(samples: Iterator[Sample], stages: list[Stage]) -> Iterator[Sample]:
    """Chain generator stages, DataTrove style: the output of one feeds the next."""
    for stage in stages:
        samples = stage(samples)
    return samples
