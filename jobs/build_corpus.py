"""Build a corpus of WebDataset shards from a list of image URLs with captions.

    python jobs/build_corpus.py --urls data/urls.parquet --out corpus/          # starts a local Ray
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/build_corpus.py --urls data/urls.parquet --out corpus/      # on a cluster

Rerunning the same command after a crash finishes the remaining work.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a Ray working dir

from pipeline.build import build_corpus, print_summary  # noqa: E402
from pipeline.config import BuildConfig, ConfigError, parse_config  # noqa: E402
from pipeline.executor import make_executor  # noqa: E402
from pipeline.job import job_main  # noqa: E402


def refuse_relative_paths_in_ray_job(cfg: BuildConfig) -> None:
    """Under `ray job submit` the driver runs in Ray's unpacked copy of --working-dir.

    A relative path there names a file in that copy (which leaves out gitignored
    folders such as data/), and output written there is lost with it.
    """
    # The job supervisor strips RAY_JOB_ID from the driver's environment (Ray 2.60,
    # job_supervisor.py) but always sets RAY_JOB_CONFIG_JSON_ENV_VAR for it.
    if not (os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or os.environ.get("RAY_JOB_ID")):
        return
    paths = {"--urls": cfg.urls, "--out": cfg.out, **{f"--eval {e}": e.split("=", 1)[1] for e in cfg.eval}}
    if cfg.clip_filter and cfg.clip_filter.endswith(".json"):
        paths["--clip-filter"] = cfg.clip_filter
    if cfg.clip_pretrained:
        from scoring.model import is_file_spec

        if is_file_spec(cfg.clip_pretrained):  # not an open_clip tag
            paths["--clip-pretrained"] = cfg.clip_pretrained
    for flag, path in paths.items():
        if "://" not in path and not Path(path).is_absolute():
            raise ConfigError(f"{flag}: {path!r} is relative, and under `ray job submit` it would resolve inside "
                              "Ray's copy of the working dir; pass an absolute path or a URL (s3://..., gs://...)")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    def body() -> int:
        cfg = parse_config(BuildConfig, argv, description=__doc__, prog="build_corpus")
        refuse_relative_paths_in_ray_job(cfg)
        matcher = None
        if cfg.eval:
            from dedup.removal import EvalOverlap

            matcher = EvalOverlap.from_args(cfg.eval, **cfg.match_kwargs())
        with make_executor(cfg.executor, cfg.ray_address, cfg.num_cpus) as executor:
            result = build_corpus(cfg, executor, matcher)
        # Printed after the executor closed, so no late worker log lands after the accounting line.
        print_summary(result)
        return 0 if result.adds_up else 1

    return job_main("build_corpus", body)


if __name__ == "__main__":
    raise SystemExit(main())
