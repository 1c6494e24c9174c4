"""CLIP scores and stored embeddings: jobs/score_corpus.py, and build_corpus --clip-filter.

The names these steps write, here so that build_corpus's list of its own names (pipeline.build)
can hold them without importing the steps (which import torch and the build itself)."""

import re

EMBEDDINGS_NAMES = re.compile(r"\d{5,}\.npy|model\.json")
"""embeddings/: one NNNNN.npy per shard, and model.json."""
WORK_FILES = r"(npy|scores\.parquet|kept\.parquet)"
"""Per input STEM in the scratch folder: STEM.npy (embeddings), STEM.scores.parquet, STEM.kept.parquet."""
