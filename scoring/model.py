"""The CLIP model a corpus is scored with: resolved and checked once on the driver, loaded once per worker.

`resolve_model(model, pretrained)` runs on the driver before anything is written: MODEL is what
the trainer's `--model` takes (an open_clip name or a NAME.json config, through training/model.py),
PRETRAINED a checkpoint file or URL (one clipforge's trainer wrote, an OpenCLIP checkpoint, or a
bare state dict; `.safetensors` too) or an open_clip pretrained tag, which works only if its
weights are already in the local cache: this tool never downloads weights at run time. The
result, a `ModelSpec`, is small and picklable (the config travels as a dict, so workers on other
machines need no copy of NAME.json) and records the checkpoint's sha256.

`resolve_weights` also returns the weights it checked: the jobs send them to the workers through
Ray's object store, so no worker needs a copy of the checkpoint file (a worker given none reads
the file itself and checks its sha256).

`Embedder(spec, device, threads, state_dict)` is what a worker holds: the model in eval mode on its device,
open_clip's own validation transform and tokenizer. `decode` turns image bytes into the model's
input (PIL, then the transform), `embed` runs a batch and returns L2-normalised float32
embeddings. Checkpoints are read with `torch.load(weights_only=True)`, as training/checkpoint.py
reads them: a file whose pickle would build other objects is refused, never run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ConfigError


class ScoreError(ConfigError):
    """Bad input or settings of the scoring job (one line, exit 2)."""


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class ModelSpec:
    """Which weights, in which architecture: what a worker needs to load the model, and what is recorded."""

    model: str
    """--model as given: an open_clip name or path/to/NAME.json."""
    name: str
    """The open_clip name the model is built under (NAME of NAME.json)."""
    config: dict[str, Any]
    """open_clip's model config (registered in each worker under `name`)."""
    pretrained: str
    """--clip-pretrained as given: a tag, a path or a URL."""
    checkpoint: str
    """The file the weights are read from (for a tag: its file in the local cache)."""
    sha256: str
    """Of the checkpoint file."""
    init: dict[str, float] = field(default_factory=dict)
    """Keyword overrides for open_clip.create_model (a logit bias when the checkpoint has one)."""

    def record(self) -> dict[str, Any]:
        """What run.json and embeddings/model.json say about the model (the path is not part of the
        identity: the same file moved elsewhere is the same model)."""
        return {"name": self.name, "config": self.config, "pretrained_sha256": self.sha256,
                "pretrained_tag": None if is_file_spec(self.pretrained) else self.pretrained}


def is_file_spec(pretrained: str) -> bool:
    """--clip-pretrained names a file or URL (else an open_clip tag)."""
    return ("://" in pretrained or "/" in pretrained or os.sep in pretrained
            or pretrained.endswith(WEIGHT_SUFFIXES) or Path(pretrained).exists())


def _loc(path: str) -> Any:
    from training.storage import Loc

    return Loc.of(path, "--clip-pretrained")


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def cached_pretrained(name: str, tag: str) -> str | None:
    """The local file of open_clip pretrained tag `tag` of model `name`, if it is in the cache (the
    Hugging Face cache or open_clip's URL cache); None if it would have to be downloaded."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if cfg.get("file"):
        return cfg["file"]
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        # open_clip's own naming: 'org/repo/FILE', or 'org/repo/' for its default file; a .safetensors
        # twin is preferred when the hub has one.
        model_id, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        names = [filename]
        if filename == "open_clip_pytorch_model.bin":
            names.insert(0, "open_clip_model.safetensors")
        elif filename.endswith(".bin"):
            names.insert(0, filename[: -len(".bin")] + ".safetensors")
        for candidate in names:
            found = try_to_load_from_cache(model_id, candidate)
            if isinstance(found, str):
                return found
    url = cfg.get("url", "")
    if url:
        path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url.split("?")[0])
        if path.is_file():
            return str(path)
    return None


def resolve_model(model: str, pretrained: str) -> ModelSpec:
    """Driver side: the model definition and the checkpoint file, checked (ScoreError: one line)."""
    return resolve_weights(model, pretrained)[0]


def resolve_weights(model: str, pretrained: str) -> tuple[ModelSpec, dict[str, Any]]:
    """resolve_model, and the weights it checked (for the workers, through Ray's object store)."""
    import open_clip

    from training.config import ModelConfig
    from training.errors import TrainError
    from training.model import model_definition

    try:
        definition = model_definition(ModelConfig(model=model))
    except TrainError as exc:
        raise ScoreError(str(exc)) from None
    name = definition.base
    if not pretrained:
        raise ScoreError("--clip-pretrained: give the weights to score with (a checkpoint file, e.g. "
                         "RUN/checkpoints/step_00001000.pt, or an open_clip pretrained tag)")
    if is_file_spec(pretrained):
        loc = _loc(pretrained)
        try:
            found = loc.is_file()
        except Exception as exc:  # noqa: BLE001 - an unreachable store: said in one line
            raise ScoreError(f"{pretrained}: --clip-pretrained: cannot reach it ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:160]})") from None
        if not found:
            # A folder is the likeliest slip (RUN/checkpoints rather than a file in it): say so, not "not found".
            what = "is a folder, not a checkpoint file (give a file in it, e.g. step_00001000.pt)" if loc.is_dir() \
                else "checkpoint not found"
            raise ScoreError(f"{pretrained}: --clip-pretrained {what}")
        checkpoint = pretrained
    else:
        if not open_clip.get_pretrained_cfg(name, pretrained):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise ScoreError(f"--clip-pretrained {pretrained!r}: neither a checkpoint file nor an open_clip "
                             f"pretrained tag of {name} (its tags: {tags})")
        cached = cached_pretrained(name, pretrained)
        if cached is None:
            raise ScoreError(f"--clip-pretrained {pretrained!r}: the open_clip weights of {name} tag {pretrained} "
                             "are not in the local cache, and this job never downloads at run time (it must run "
                             "offline); download them once where there is network (open_clip.create_model("
                             f"{name!r}, pretrained={pretrained!r})) into ~/.cache/huggingface, or pass the "
                             "checkpoint file")
        checkpoint = cached
    sha256, state_dict = read_checkpoint(pretrained, checkpoint)
    spec = ModelSpec(model=model, name=name, config=definition.config, pretrained=pretrained,
                     checkpoint=checkpoint, sha256=sha256)
    # A checkpoint of a SigLIP run holds a logit bias: build the model with one so the weights load strictly.
    init = {"init_logit_bias": 0.0} if "logit_bias" in state_dict and "init_logit_bias" not in spec.config else {}
    spec = dataclasses.replace(spec, init=init)
    build_model(spec, state_dict)  # the weights fit the model: checked here, before anything is written
    return spec, state_dict


def read_checkpoint(pretrained: str, checkpoint: str) -> tuple[str, dict[str, Any]]:
    """(sha256, weights) of the checkpoint file, from one read of it: the hash recorded is of the bytes the
    weights came from (a file replaced in between, as a running trainer replaces latest.pt, is refused).
    The weights: a clipforge or OpenCLIP checkpoint's state_dict, or a bare state dict, loaded with
    weights_only=True; ScoreError naming the file otherwise."""
    import torch

    from training.checkpoint import _load_problem

    loc = _loc(checkpoint)
    try:
        with loc.local_copy() as local:  # a download is our own copy; a local file is checked not to change
            before = os.stat(local)
            sha256 = _sha256_file(local)
            if str(local).endswith(".safetensors"):
                from safetensors.torch import load_file

                ckpt: Any = load_file(local, device="cpu")
            else:
                ckpt = torch.load(local, map_location="cpu", weights_only=True)
            after = os.stat(local)
    except Exception as exc:  # truncated, not a torch file, or unsafe content
        raise ScoreError(f"{pretrained}: {_load_problem(Path(checkpoint), exc)}") from None
    if (before.st_ino, before.st_size, before.st_mtime_ns) != (after.st_ino, after.st_size, after.st_mtime_ns):
        raise ScoreError(f"{pretrained}: the file changed while it was read (a training run writing it?); copy "
                         "the checkpoint elsewhere and score with the copy")
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ScoreError(f"{pretrained}: not a model checkpoint (expected a state_dict of tensors, as "
                         "clipforge's trainer and OpenCLIP write)")
    # A diverged run's checkpoint loads and runs, but every score is NaN: refused here, before anything is
    # written, rather than found by the histogram (a NaN has no bin) after the whole corpus was embedded.
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ScoreError(f"{pretrained}: weight {bad} holds NaN or infinite values (a diverged training run?); "
                         "score with an earlier checkpoint of that run")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return sha256, state


def _register(spec: ModelSpec) -> None:
    """Make open_clip know `spec.name` with `spec.config` (a worker on another machine has no NAME.json)."""
    import open_clip

    if open_clip.get_model_config(spec.name) == spec.config:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{spec.name}.json"
        path.write_text(json.dumps(spec.config))
        open_clip.add_model_config(path)


def build_model(spec: ModelSpec, state_dict: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(model in eval mode on the CPU, validation transform, tokenizer), the weights loaded strictly."""
    import inspect

    import open_clip

    _register(spec)
    kwargs: dict[str, Any] = dict(spec.init)
    if "pretrained_text" in inspect.signature(open_clip.create_model).parameters:
        kwargs["pretrained_text"] = False  # a text tower's base weights would be downloaded, then overwritten
    model, _, preprocess = open_clip.create_model_and_transforms(spec.name, pretrained=None, precision="fp32",
                                                                 device="cpu", **kwargs)
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise ScoreError(f"{spec.pretrained}: its weights do not fit model {spec.name} "
                         f"({' '.join(str(exc).split())[:200]}); give the --model it was trained with") from None
    try:
        tokenizer = open_clip.get_tokenizer(spec.name)
    except Exception as exc:  # noqa: BLE001 - a Hugging Face tokenizer that is not cached
        raise ScoreError(f"--model {spec.model}: its tokenizer cannot be loaded ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:160]})") from None
    return model.eval(), preprocess, tokenizer


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class Embedder:
    """A loaded model on one device (a worker's state): images and captions in, normalised embeddings out."""

    def __init__(self, spec: ModelSpec, device: str = "auto", threads: int = 1,
                 state_dict: dict[str, Any] | None = None):
        """`state_dict`: the weights the driver read (through Ray's object store: workers on other machines
        need no copy of the checkpoint); None: read spec.checkpoint here, checking its sha256."""
        import torch

        self.spec = spec
        if device == "cuda" and not torch.cuda.is_available():
            raise ScoreError("--device cuda: no GPU is visible here (torch.cuda.is_available() is False); use "
                             "--device auto or cpu")
        self.device = torch.device(pick_device(device))
        if self.device.type == "cuda":
            if self.device.index is None:
                # Ray hands a GPU actor one device through CUDA_VISIBLE_DEVICES: it is cuda:0 here.
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            # bf16 where the GPU has it (the range of fp32: no overflow in the attention logits), else fp16.
            self.autocast_dtype: Any = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            # CPUs compute fp32 as fast as anything else here, and the scores then equal open_clip's own.
            self.autocast_dtype = None
        if state_dict is None:
            sha256, state_dict = read_checkpoint(spec.pretrained, spec.checkpoint)
            if sha256 != spec.sha256:
                raise ScoreError(f"{spec.pretrained}: the checkpoint changed since this run began (its sha256 "
                                 "differs from the one recorded); score with the new one into a new --out")
        model, self.preprocess, self.tokenizer = build_model(spec, state_dict)
        self.model = model.to(self.device)
        threads = max(1, threads)
        # The next batch is decoded while this one runs through the model. On a GPU every core decodes.
        # On a CPU the cores are split between the two, so neither waits for the other and no core is
        # asked for two things at once: torch's threads spin at their barriers, and a core they share
        # with decoding (measured on 2 cores: 2 torch threads beside decoding) runs the model several
        # times slower. One core: one after the other.
        self.prefetch = self.device.type == "cuda" or threads > 1
        self.decode_threads = threads if self.device.type == "cuda" else max(1, threads // 2)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, threads - self.decode_threads) if self.prefetch else 1)
        self._pool: Any = None
        self._prefetch: Any = None
        self.dim = int(spec.config["embed_dim"])

    def decode(self, data: bytes) -> Any:
        """The model's input tensor for one encoded image, or None if it cannot be decoded."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                return self.preprocess(img.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None

    def decode_many(self, images: list[bytes]) -> list[Any]:
        """decode() over a batch, in threads when the worker has several cores (PIL releases the GIL)."""
        if self.decode_threads == 1 or len(images) < 2:
            return [self.decode(b) for b in images]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        return list(self._pool.map(self.decode, images))

    def decode_later(self, images: list[bytes]) -> Any:
        """decode_many() in the background: a future of its result (the GPU path's prefetch)."""
        if self._prefetch is None:
            from concurrent.futures import ThreadPoolExecutor

            self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        return self._prefetch.submit(self.decode_many, images)

    def embed(self, pixels: list[Any], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(image, text) embeddings of a batch, L2-normalised, float32, shape (n, dim) each."""
        import contextlib

        import torch
        import torch.nn.functional as F  # noqa: N812 - torch's own idiom

        cuda = self.device.type == "cuda"
        x = torch.stack(pixels)
        tokens = self.tokenizer(captions)
        if cuda:
            # Pinned host memory: the copy to the GPU overlaps the rest of the batch's work.
            x = x.pin_memory().to(self.device, non_blocking=True)
            tokens = tokens.pin_memory().to(self.device, non_blocking=True)
        amp = torch.autocast("cuda", dtype=self.autocast_dtype) if cuda else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            img = self.model.encode_image(x)
            txt = self.model.encode_text(tokens)
        img = F.normalize(img.float(), dim=-1)
        txt = F.normalize(txt.float(), dim=-1)
        return img.cpu().numpy(), txt.cpu().numpy()
