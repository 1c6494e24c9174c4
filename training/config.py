"""Typed training configuration: nested dataclasses, one flag per field, optional YAML.

Flags are named like OpenCLIP's (`--batch-size` per process, `--epochs`, `--lr`,
`--wd`, `--warmup`, `--workers`, `--precision` (its `amp` too), `--seed`, `--report-to`,
`--logs DIR --name NAME` for `--output DIR/NAME`) so its users need no translation
table; a flag OpenCLIP has with another meaning (`--trace`) is refused naming ours.
Precedence: dataclass defaults < `--config file.yaml` < flags.
The resolved config is written to OUT/config.yaml and stored in every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.cli import OneLineParser
from training.errors import TrainError

PRECISIONS = ("fp32", "amp", "amp_bf16", "amp_fp16", "pure_bf16")
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
"""A URL (s3://..., or a malformed s3:/...), not a local path (a one-letter scheme would be a drive)."""
REPORTERS = ("tensorboard", "wandb", "all")
OPENCLIP_LOGS = "./logs"
"""OpenCLIP's default --logs: where `--name NAME` alone puts the run."""


def run_precision(precision: str, device_type: str) -> str:
    """The precision a run computes in. `amp` is OpenCLIP's name (and default) for fp16 autocast
    with a GradScaler, our amp_fp16, on CUDA. CPUs have no fast fp16 arithmetic and torch's CPU
    autocast casts few ops to it (the reason amp_fp16 is refused on CPU), so there `amp` runs as
    amp_bf16: mixed precision the CPU does well, with fp32's range, so no GradScaler."""
    if precision == "amp":
        return "amp_fp16" if device_type == "cuda" else "amp_bf16"
    return precision


def _f(default: Any, help: str, **meta: Any) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field whose help text doubles as the flag's help."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass(kw_only=True)
class DataConfig:
    """Where the training samples come from and how they are batched."""

    train_data: str = _f("", "webdataset shards, local or s3://, gs://, http(s):// URLs or pipe:CMD: brace ranges, "
                         "several sources joined with '::'")
    train_num_samples: int | None = _f(None, "samples per epoch; default: the sum of sizes.json over the shards")
    batch_size: int = _f(64, "batch size per process (per micro-batch when --accum-freq > 1)")
    workers: int = _f(1, "data loader worker processes per rank (0: load in the training process)")
    shuffle_buffer: int = _f(1000, "sample shuffle buffer per worker")
    shuffle_initial: int = _f(100, "samples buffered before the first one leaves the shuffle buffer")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise TrainError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise TrainError(f"--workers must be >= 0, got {self.workers}")
        if self.shuffle_buffer < 1 or not 0 <= self.shuffle_initial <= self.shuffle_buffer:
            raise TrainError("--shuffle-buffer must be >= 1 and 0 <= --shuffle-initial <= --shuffle-buffer")


@dataclass(kw_only=True)
class ModelConfig:
    """Which open_clip model to build."""

    model: str = _f("ViT-B-32", "an open_clip model name, or path/to/NAME.json in OpenCLIP's config format")
    pretrained: str | None = _f(None, "open_clip pretrained tag or local checkpoint file (default: random init)")
    siglip: bool = _f(False, "sigmoid loss (SigLipLoss) instead of the softmax contrastive loss")
    compile: bool = _f(False, "wrap the model in torch.compile")

    def __post_init__(self) -> None:
        if self.model.endswith(".json") and not Path(self.model).is_file():
            raise TrainError(f"{self.model}: model config file not found")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with a cosine schedule."""

    lr: float = _f(5e-4, "peak learning rate")
    wd: float = _f(0.2, "weight decay (not applied to gains, biases, logit scale/bias)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.98, "AdamW beta2")
    eps: float = _f(1e-6, "AdamW epsilon")
    warmup: int = _f(100, "linear warmup steps")
    grad_clip_norm: float | None = _f(1.0, "clip the global gradient norm to this (none: off)")
    accum_freq: int = _f(1, "micro-batches per optimizer step (features cached so the loss sees all of them)")
    skip_nonfinite: int = _f(0, "skip up to N steps whose loss or gradient norm is not finite (their update is "
                             "not applied) before stopping the run; fp16's GradScaler skips its own overflow steps "
                             "regardless")

    def __post_init__(self) -> None:
        if self.skip_nonfinite < 0:
            raise TrainError(f"--skip-nonfinite must be >= 0, got {self.skip_nonfinite}")
        if self.accum_freq < 1:
            raise TrainError(f"--accum-freq must be >= 1, got {self.accum_freq}")
        if self.lr <= 0 or self.warmup < 0:
            raise TrainError("--lr must be > 0 and --warmup >= 0")


@dataclass(kw_only=True)
class EvalConfig:
    """Zero-shot classification and retrieval."""

    zeroshot: dict[str, str] = _f({}, "NAME=DIR classification eval set: class folders or clip_benchmark shards, "
                                     "a local folder or a URL (repeatable)", pairs=True)
    retrieval: dict[str, str] = _f({}, "NAME=DIR retrieval eval set: KEY.jpg+KEY.txt pairs or clip_benchmark shards, "
                                     "a local folder or a URL (repeatable)", pairs=True)
    eval_every: int | None = _f(None, "also evaluate every N steps (always at each epoch end)")
    overlap_audit: str | None = _f(None, "dedup audit summary.json: also report clean/overlapping subsets")
    eval_batch_size: int = _f(128, "images per forward pass during evaluation")

    def __post_init__(self) -> None:
        for kind, sets in (("zeroshot", self.zeroshot), ("retrieval", self.retrieval)):
            for name, root in sets.items():
                if _URL_RE.match(root):
                    from pipeline.rundir import OutputError, resolve
                    from training.storage import STORE_ERRORS

                    try:  # copied to a local folder when the evaluator is built (training/evaluate.py)
                        fs, path = resolve(root, f"--{kind} {name}")
                        found = fs.isdir(path)
                    except OutputError as exc:
                        raise TrainError(str(exc)) from None
                    except STORE_ERRORS as exc:  # no route, no credentials: botocore's are no OSError
                        raise TrainError(f"{root}: --{kind} {name}={root}: cannot reach it ({type(exc).__name__}: "
                                         f"{' '.join(str(exc).split())[:200]})") from None
                    if not found:
                        raise TrainError(f"{root}: --{kind} {name}={root}: no such folder")
                elif not Path(root).is_dir():
                    raise TrainError(f"{root}: --{kind} {name}={root} is not a directory")
        if self.overlap_audit and _URL_RE.match(self.overlap_audit):
            from pipeline.rundir import OutputError, resolve
            from training.storage import STORE_ERRORS

            try:  # a summary.json on object storage or the web is read through fsspec (one small file)
                fs, path = resolve(self.overlap_audit, "--overlap-audit")
                # info, not isfile: s3fs's isfile answers False for a store it cannot reach.
                found = fs.info(path).get("type") == "file"
            except OutputError as exc:
                raise TrainError(str(exc)) from None
            except FileNotFoundError:
                found = False
            except STORE_ERRORS as exc:
                raise TrainError(f"{self.overlap_audit}: --overlap-audit: cannot reach it ({type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:200]})") from None
            if not found:
                raise TrainError(f"{self.overlap_audit}: --overlap-audit file not found")
        elif self.overlap_audit and not Path(self.overlap_audit).is_file():
            raise TrainError(f"{self.overlap_audit}: --overlap-audit file not found")


@dataclass(kw_only=True)
class CheckpointConfig:
    """When to write checkpoints and where to resume from."""

    save_every: int | None = _f(None, "also save every N steps (always at each epoch end)")
    keep_last: int = _f(3, "checkpoints kept besides the best one")
    resume: str | None = _f(None, "'latest' (newest in OUT/checkpoints, fresh start if none) or a checkpoint path")

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise TrainError(f"--keep-last must be >= 1, got {self.keep_last}")


@dataclass(kw_only=True)
class RunConfig:
    """Length of the run, numerics, outputs."""

    output: str = _f("runs/default", "output folder: checkpoints/, results.jsonl, config.yaml, curves.png, tb/")
    epochs: int = _f(1, "epochs to train")
    seed: int = _f(0, "seed for model init, shard order, shuffling and augmentation")
    precision: str = _f("amp_bf16", "one of " + ", ".join(PRECISIONS) + "; amp is OpenCLIP's name for amp_fp16 "
                        "(fp16 autocast + GradScaler) on CUDA, and runs as amp_bf16 on CPU (said in the log)")
    device: str = _f("auto", "auto (cuda if available, else cpu), cpu or cuda")
    threads: int | None = _f(None, "torch intra-op threads per process; default on CPU: usable cores / local "
                             "ranks (at least 1), unless OMP_NUM_THREADS is set")
    log_every: int = _f(10, "log a line (and TensorBoard scalars) every N steps")
    stop_after: int | None = _f(None, "stop after this global step, as if preempted (a checkpoint is written)")
    trace_samples: bool = _f(False, "record each step's sample keys and loss per rank in OUT/trace-rankR.jsonl "
                             "(not OpenCLIP's --trace, a TorchScript trace of the model, which is refused)")
    report_to: str = _f("tensorboard", "where rank 0 logs its scalars, comma-separated (OpenCLIP's flag): "
                        "tensorboard (OUT/tb, always written), wandb (into OUT/wandb; WANDB_MODE=offline needs no "
                        "network), all")
    wandb_project_name: str = _f("clipforge", "wandb project, with --report-to wandb")

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise TrainError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.epochs < 1:
            raise TrainError(f"--epochs must be >= 1, got {self.epochs}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrainError(f"--device {self.device!r}: choose auto, cpu or cuda")
        if self.threads is not None and self.threads < 1:
            raise TrainError(f"--threads must be >= 1 (or none for the default), got {self.threads}")
        unknown = sorted(set(self.reporters_named()) - set(REPORTERS))
        if unknown:
            raise TrainError(f"--report-to {self.report_to!r}: unknown {', '.join(unknown)}; choose from "
                             f"{', '.join(REPORTERS)}, comma-separated")

    def reporters_named(self) -> list[str]:
        return [r.strip() for r in self.report_to.split(",") if r.strip()]

    @property
    def wandb(self) -> bool:
        named = self.reporters_named()
        return "wandb" in named or "all" in named


@dataclass(kw_only=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        sections = {}
        for f in dataclasses.fields(cls):
            section = d.get(f.name) or {}
            if not isinstance(section, dict):
                raise TrainError(f"config section {f.name!r} must be a mapping, got {section!r}")
            known = {g.name for g in dataclasses.fields(_SECTIONS[f.name])}
            unknown = set(section) - known
            if unknown:
                renamed = [f"{k} is now {RENAMED[f.name, k]}" for k in sorted(unknown) if (f.name, k) in RENAMED]
                hint = f" ({'; '.join(renamed)})" if renamed else ""
                raise TrainError(f"config section {f.name!r}: unknown keys {sorted(unknown)}{hint}")
            sections[f.name] = _SECTIONS[f.name](**section)
        return cls(**sections)


RENAMED = {("run", "trace"): "trace_samples"}
"""Config keys of earlier versions whose name changed: (section, old) -> new."""

_SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
    "eval": EvalConfig, "ckpt": CheckpointConfig, "run": RunConfig,
}


def _base_type(tp: Any) -> Any:
    """`int | None` -> int, for argparse's `type=`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _optional(value: str) -> str | None:
    return None if value.lower() in ("none", "off", "") else value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="training/train.py",
        description="Contrastive (CLIP/SigLIP) pretraining on webdataset shards with open_clip models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="YAML file with sections data/model/optim/eval/ckpt/run; flags override it")
    for section, cls in _SECTIONS.items():
        group = p.add_argument_group(section, cls.__doc__)
        hints = typing.get_type_hints(cls)  # resolves the string annotations of `from __future__ import annotations`
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            dest = f"{section}.{f.name}"
            help_ = f.metadata.get("help", "")
            tp = _base_type(hints[f.name])
            if f.metadata.get("pairs"):
                group.add_argument(flag, dest=dest, action="append", metavar="NAME=DIR", help=help_,
                                   default=argparse.SUPPRESS)
            elif tp is bool:
                group.add_argument(flag, dest=dest, action="store_true", help=help_, default=argparse.SUPPRESS)
            else:
                nullable = type(None) in typing.get_args(hints[f.name])

                def conv(v: str, tp: Any = tp, nullable: bool = nullable, flag: str = flag) -> Any:
                    if nullable and _optional(v) is None:
                        return None
                    try:
                        return tp(v)
                    except ValueError:
                        raise argparse.ArgumentTypeError(f"{flag}: {v!r} is not a valid {tp.__name__}") from None

                group.add_argument(flag, dest=dest, type=conv, help=help_, default=argparse.SUPPRESS,
                                   metavar=f.name.upper())
    # OpenCLIP's spellings of what a field above already is; resolved (or refused) in parse_config.
    names = p.add_argument_group("OpenCLIP's names", "accepted where they mean what ours do")
    names.add_argument("--logs", dest="alias.logs", metavar="DIR", default=argparse.SUPPRESS,
                       help="with --name NAME: --output DIR/NAME (OpenCLIP's run folder)")
    names.add_argument("--name", dest="alias.name", metavar="NAME", default=argparse.SUPPRESS,
                       help=f"with --logs DIR: --output DIR/NAME; alone: --output {OPENCLIP_LOGS}/NAME "
                            "(OpenCLIP's default --logs)")
    # Declared so that it is refused, not taken as an abbreviation of --trace-samples.
    names.add_argument("--trace", dest="alias.trace", action="store_true", default=argparse.SUPPRESS,
                       help="refused: OpenCLIP's --trace is a TorchScript trace of the model; to record "
                            "each step's sample keys use --trace-samples")
    return p


def _openclip_aliases(aliases: dict[str, Any], output_flag: bool) -> str | None:
    """--trace refused; --logs DIR --name NAME -> the --output DIR/NAME (None when neither was given)."""
    if "trace" in aliases:
        raise TrainError("--trace is OpenCLIP's TorchScript trace of the model, which this trainer does not "
                         "do; to record each step's sample keys and loss use --trace-samples")
    logs, name = aliases.get("logs"), aliases.get("name")
    if logs is None and name is None:
        return None
    if output_flag:
        raise TrainError("--output and --logs/--name both name the run folder: give --output DIR/NAME, or "
                         "--logs DIR --name NAME, not both")
    if name is None:
        # OpenCLIP makes up a name from the date: a later --resume latest could not find the run again.
        raise TrainError(f"--logs {logs} needs --name NAME (the run folder is then {logs}/NAME), or use --output")
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise TrainError(f"--name {name!r}: a folder name, without slashes")
    return f"{(logs or OPENCLIP_LOGS).rstrip('/')}/{name}"


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise TrainError(f"--{flag} {v!r}: expected NAME=DIR")
        out[name] = path
    return out


def parse_config(argv: list[str] | None) -> TrainConfig:
    """Defaults, then the YAML file, then the flags that were actually given."""
    args = vars(build_parser().parse_args(argv))
    raw: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    cfg_file = args.pop("config", None)
    if cfg_file:
        try:
            loaded = yaml.safe_load(Path(cfg_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise TrainError(f"{cfg_file}: cannot read config ({exc})") from exc
        if not isinstance(loaded, dict):
            raise TrainError(f"{cfg_file}: expected a mapping of sections")
        for s, vals in loaded.items():
            if s not in raw:
                raise TrainError(f"{cfg_file}: unknown section {s!r} (known: {', '.join(_SECTIONS)})")
            raw[s].update(vals or {})
    aliases = {dest.split(".", 1)[1]: args.pop(dest) for dest in list(args) if dest.startswith("alias.")}
    output = _openclip_aliases(aliases, "run.output" in args)
    if output is not None:
        args["run.output"] = output
    for dest, value in args.items():
        section, name = dest.split(".", 1)
        if name in ("zeroshot", "retrieval"):
            value = {**raw[section].get(name, {}), **_pairs(value, name)}
        raw[section][name] = value
    cfg = TrainConfig.from_dict(raw)
    if not cfg.data.train_data:
        raise TrainError("--train-data is required (e.g. 'corpus/shards/{00000..00127}.tar')")
    return cfg
