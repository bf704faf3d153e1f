"""Finding and loading a base model: the shipped world stack, a diffusers folder, or a single file.

Nothing is ever fetched from a hub. When something is missing, the error says what and how to
supply it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch

from limner.errors import LimnerError
from limner.io import check_safetensors, check_weight_files

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    Pipeline = Union[StableDiffusionPipeline, StableDiffusionXLPipeline]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
WORLD_BASE = ASSETS / "world" / "base"
WORLD_PROBES = ASSETS / "world" / "probes"

FOLDER_HINT = (
    "expected a diffusers folder (model_index.json with unet/, vae/, text_encoder/, tokenizer/, "
    "scheduler/) or a single-file .safetensors checkpoint with --config"
)


@dataclass
class Base:
    """A loaded base model and what identifies it."""

    pipe: Pipeline
    path: Path
    family: str  # "sd" (1.x / 2.x) or "sdxl"
    fingerprint: str
    is_world: bool
    device: torch.device
    dtype: torch.dtype

    @property
    def resolution(self) -> int:
        unet, vae = self.pipe.unet, self.pipe.vae
        return int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LimnerError(
            f"--device {device!r} is not a device torch knows (use auto, cpu, cuda, cuda:N or mps)"
        ) from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LimnerError(f"--device {device}: this torch build sees no CUDA device; use --device cpu or auto")
    return dev


DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: str, device: torch.device, world: bool = False) -> torch.dtype:
    if dtype == "auto":
        # half precision where the hardware does it well (an SD 1.5-sized model draws 2.4x faster on an
        # H200 in fp16, in half the memory) and full precision on CPU. The world base stays fp32: it is so
        # small that a GPU's time goes to launching kernels, so fp16 draws it slower (0.116 vs 0.061 s per
        # image), and its seeds then give other pictures than the CPU's, on which the world's numbers
        # were measured (benchmarks/cuda).
        return torch.float16 if device.type in ("cuda", "mps") and not world else torch.float32
    if dtype not in DTYPES:
        raise LimnerError(f"--dtype {dtype!r} is unknown; use auto, fp32, fp16 or bf16")
    return DTYPES[dtype]


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """The dtype argument of diffusers' from_pretrained: `dtype` where diffusers has renamed it (and warns
    on the old name), `torch_dtype` in the releases before."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype": dtype}


def check_folder(path: Path) -> dict:
    """Validates a diffusers folder and returns its model_index.json. Raises LimnerError naming the
    missing piece."""
    if not path.exists():
        if path == WORLD_BASE:
            raise LimnerError(
                f"the world base is missing from {path}; reinstall limner or rebuild it with `limner world build`"
            )
        raise LimnerError(f"base path {path} does not exist; {FOLDER_HINT}")
    if path.is_dir() and not any(path.iterdir()):
        raise LimnerError(f"base folder {path} is empty; {FOLDER_HINT}")
    index_path = path / "model_index.json"
    if not index_path.exists():
        raise LimnerError(f"base folder {path} has no model_index.json; {FOLDER_HINT}")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise LimnerError(f"{index_path} is not valid JSON ({e}); restore it from the model's original files") from e
    required = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if "XL" in index.get("_class_name", ""):
        required += ["text_encoder_2", "tokenizer_2"]
    for name in required:
        entry = index.get(name)
        if not entry or entry[0] is None:
            raise LimnerError(
                f"base folder {path}: model_index.json lists no '{name}' component; this folder is not a "
                "complete Stable Diffusion pipeline"
            )
        folder = path / name
        if not folder.is_dir() or not any(folder.iterdir()):
            raise LimnerError(
                f"base folder {path} lacks the '{name}' component (expected files in {folder}); copy it "
                "from the original model folder"
            )
        if name not in ("tokenizer", "tokenizer_2", "scheduler"):
            if not (folder / "config.json").exists():
                raise LimnerError(f"base folder {path}: {folder}/config.json is missing")
            if not any(f.suffix in (".safetensors", ".bin") for f in folder.iterdir()):
                raise LimnerError(f"base folder {path}: no weights (.safetensors) in {folder}")
    return index


WHOLE_FILE_LIMIT = 64 << 20  # hash files up to this size completely
SAMPLES, SAMPLE_BYTES = 256, 1 << 16  # larger ones: the safetensors header + 256 strided 64 KiB samples


def _hash_file(h, f: Path) -> None:
    size = f.stat().st_size
    h.update(str(size).encode())
    with open(f, "rb") as fh:
        if size <= WHOLE_FILE_LIMIT:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
            return
        h.update(fh.read(1 << 20))  # the header: every tensor's name, shape and offset
        for i in range(SAMPLES):
            fh.seek(size * i // SAMPLES)
            h.update(fh.read(SAMPLE_BYTES))


def fingerprint(path: Path, skip: tuple[str, ...] = ("build.json",)) -> str:
    """A short, stable id of a model folder or file: a hash of its configs and weights (whole files
    up to 64 MiB; for larger ones the header and 256 samples spread over the file, so a fine-tune
    that changes any large part of the weights changes the id). Costs well under a second."""
    from limner.models.saving import PORTABLE_RECORD, portable_record

    h = hashlib.sha256()
    # files made portable (limner.models.saving.make_portable) hash as they were saved; the files it derived,
    # which say nothing the others do not, are left out: a folder keeps its id when it is made portable
    portable = portable_record(path) if path.is_dir() else {"original": {}, "derived": []}
    files = (
        [path]
        if path.is_file()
        else sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.name not in (*skip, PORTABLE_RECORD)
            and p.relative_to(path).as_posix() not in portable["derived"]
            and "checkpoints" not in p.relative_to(path).parts
            and not p.name.endswith(".tmp")
        )
    )
    for f in files:
        rel = f.name if path.is_file() else f.relative_to(path).as_posix()
        h.update((f.name if path.is_file() else str(f.relative_to(path))).encode())
        if rel in portable["original"]:
            data = portable["original"][rel].encode()
            h.update(str(len(data)).encode())  # as _hash_file hashes a small file
            h.update(data)
        else:
            _hash_file(h, f)
    return h.hexdigest()[:16]


def _pipeline_class(index: dict):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if "XL" in index.get("_class_name", "") else StableDiffusionPipeline


def _blip_diffusion_as_sd(path: Path, index: dict, torch_dtype: torch.dtype):
    """A diffusers BlipDiffusionPipeline folder as the SD pipeline it draws with: its UNet, VAE, tokenizer and
    scheduler, and its ContextCLIPTextModel's weights as a CLIPTextModel (the same modules). diffusers' own
    from_pretrained cannot load this folder (its Blip2QFormerModel is not a diffusers class); the Q-Former is
    BLIP-Diffusion's adapter, which the method reads (`--method blip_diffusion`)."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dtype = dtype_kwarg(torch_dtype)
    scheduler_cls = getattr(diffusers, index["scheduler"][1], diffusers.PNDMScheduler)
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(path / "vae", **dtype),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", dtype=torch_dtype),
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(path / "unet", **dtype),
        scheduler=scheduler_cls.from_pretrained(path / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_base(
    base: str | os.PathLike | None = None, device: str = "auto", dtype: str = "auto", config: str | None = None
) -> Base:
    """Loads the world base (base=None) or a local SD 1.x/2.x/SDXL model.

    `base` may be a diffusers folder or a single-file .safetensors checkpoint; the latter needs
    `config`, a local diffusers folder of the same architecture whose configs describe it.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dev = resolve_device(device)
    is_world = base is None
    torch_dtype = resolve_dtype(dtype, dev, world=is_world)
    path = WORLD_BASE if base is None else Path(base).expanduser()
    if str(base).strip() == "" and base is not None:
        raise LimnerError(f"--base is empty; {FOLDER_HINT}")
    if path.is_file():
        pipe, family = _load_single_file(path, config, torch_dtype)
    else:
        index = check_folder(path)
        cls = _pipeline_class(index)
        family = "sdxl" if "XL" in cls.__name__ else "sd"
        kwargs = (
            {"safety_checker": None, "requires_safety_checker": False}
            if family == "sd" and "safety_checker" in index
            else {}
        )
        # a CLIP vision tower in the folder (the world ships one for its CLIP) is not needed to generate
        # or train: left on disk, it costs no memory (image-prompt methods load their own encoder)
        kwargs |= {name: None for name in ("image_encoder", "feature_extractor") if name in index}
        check_weight_files(path)  # a truncated component named, before diffusers' loader fails on it
        if index.get("_class_name") == "BlipDiffusionPipeline":
            pipe = _blip_diffusion_as_sd(path, index, torch_dtype)
        else:
            pipe = cls.from_pretrained(path, local_files_only=True, **dtype_kwarg(torch_dtype), **kwargs)
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    return Base(
        pipe=pipe,
        path=path,
        family=family,
        fingerprint=fingerprint(path),
        is_world=is_world,
        device=dev,
        dtype=torch_dtype,
    )


def _load_single_file(path: Path, config: str | None, torch_dtype: torch.dtype):
    if path.suffix not in (".safetensors", ".sft"):
        raise LimnerError(
            f"base file {path} is not a .safetensors checkpoint; limner loads weights only from safetensors "
            "(convert .ckpt files first) or from a diffusers folder"
        )
    if config is None:
        raise LimnerError(
            f"base file {path} is a single-file checkpoint: pass --config DIR, a local diffusers folder of "
            "the same architecture (its model_index.json and component configs), since nothing can be "
            "fetched from a hub"
        )
    cfg_path = Path(config).expanduser()
    if not (cfg_path / "model_index.json").exists():
        raise LimnerError(
            f"--config {cfg_path} has no model_index.json; point it at a diffusers folder of the same "
            "architecture as the checkpoint"
        )
    index = json.loads((cfg_path / "model_index.json").read_text())
    cls = _pipeline_class(index)
    check_safetensors(path)
    pipe = cls.from_single_file(str(path), config=str(cfg_path), local_files_only=True, **dtype_kwarg(torch_dtype))
    return pipe, ("sdxl" if "XL" in cls.__name__ else "sd")
