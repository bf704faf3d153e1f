"""BLIP-Diffusion's files: limner's adapter folder, and diffusers' `BlipDiffusionPipeline` folder both ways.

limner's adapter folder (small: the frozen image encoder is the base's own, recorded by fingerprint)

    adapter.json                        method, base and image-encoder fingerprints, data, steps, settings
    qformer_config.json                 the Blip2Config of the Q-Former (diffusers' qformer/config.json)
    qformer.safetensors                 fp16: the Q-Former, query tokens and proj_layer (qformer/'s keys less
                                        visual_encoder.*)
    qformer_tokenizer/                  its BERT tokenizer
    pytorch_lora_weights.safetensors    the UNet's stage-2 delta as a LoRA (diffusers' key layout)

diffusers' folder (what `limner export --method blip_diffusion` writes and `--adapter DIR` reads)

    model_index.json  qformer/ (Blip2QFormerModel: config.json with `tokenizer`, model.safetensors, and its BERT
    tokenizer files)  text_encoder/ (ContextCLIPTextModel)  image_processor/ (BlipImageProcessor)  unet/ (the
    stage-2 UNet, LoRA merged)  vae/  tokenizer/  scheduler/

diffusers' `Blip2QFormerModel.__init__` reads a BERT tokenizer from `config.tokenizer` (the hub's
bert-base-uncased when unset): the export keeps the tokenizer files in qformer/ and names that folder there, and
limner reads the tokenizer from qformer/ when the named folder is gone (a moved export).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from limner.errors import LimnerError
from limner.io import disk_guard, replace_folder, write_json_atomic, written_atomically
from limner.methods.blip_diffusion.qformer import (
    SubjectEncoder,
    blip2_config,
    load_bert_tokenizer,
    save_bert_tokenizer,
    vision_config_from_clip,
    vision_from_clip,
)

QFORMER_CONFIG = "qformer_config.json"
QFORMER_WEIGHTS = "qformer.safetensors"
QFORMER_TOKENIZER = "qformer_tokenizer"
LORA_FILE = "pytorch_lora_weights.safetensors"
PIPELINE_CLASS = "BlipDiffusionPipeline"
COMPONENTS = ("qformer", "text_encoder", "image_processor", "unet", "vae", "tokenizer", "scheduler")


def is_pipeline_folder(folder: Path) -> bool:
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("_class_name") == PIPELINE_CLASS
    except ValueError:
        return False


def check_pipeline_folder(folder: Path) -> None:
    """A diffusers BlipDiffusionPipeline folder with every component limner reads; a clear error otherwise."""
    folder = Path(folder)
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise LimnerError(
            f"{folder} is a BlipDiffusionPipeline folder without {', '.join(c + '/' for c in missing)}: a complete "
            f"one has {', '.join(c + '/' for c in COMPONENTS)} (as `limner export --method blip_diffusion` or "
            "diffusers' save_pretrained writes it)"
        )
    if not (folder / "qformer" / "config.json").is_file():
        raise LimnerError(f"{folder}/qformer has no config.json: not a Blip2QFormerModel folder")


def _safetensors_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise LimnerError(f"{folder} holds no .safetensors weights (pickled .bin files are not read here)")
    state = {}
    for f in files:
        state |= load_file(str(f))
    return state


def _load_strict(module: torch.nn.Module, state: dict, where: Path | str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise LimnerError(
            f"{where} does not fit this Q-Former: missing keys {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
            f"unexpected keys {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}"
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise LimnerError(f"{where}: {k} has shape {tuple(state[k].shape)}, the config says {tuple(own[k].shape)}")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


# ---------------------------------------------------------------------------------------------------------------
# limner's adapter folder
# ---------------------------------------------------------------------------------------------------------------


def new_subject_encoder(image_encoder: Path, tokenizer, **sizes) -> SubjectEncoder:
    """A fresh Q-Former over the base's CLIP vision tower (converted exactly into the visual encoder)."""
    config_path = Path(image_encoder) / "config.json"
    if not config_path.is_file():
        raise LimnerError(f"image encoder {image_encoder} has no config.json: give a CLIP vision model folder")
    clip = json.loads(config_path.read_text())
    config = blip2_config(vision_config_from_clip(clip), len(tokenizer), **sizes)
    encoder = SubjectEncoder(config, tokenizer)
    _load_strict(encoder.visual_encoder, vision_from_clip(_safetensors_of(image_encoder)), image_encoder)
    return encoder


def save_adapter_encoder(encoder: SubjectEncoder, out: Path) -> None:
    """The Q-Former (less its frozen visual encoder), fp16, its config and tokenizer, into an adapter folder."""
    from safetensors.torch import save_file

    state = {
        k: v.detach().to(torch.float16).contiguous()
        for k, v in encoder.state_dict().items()
        if not k.startswith("visual_encoder.")
    }
    with written_atomically(out / QFORMER_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json_atomic(out / QFORMER_CONFIG, encoder.config.to_dict() | {"tokenizer": None})
    replace_folder(out / QFORMER_TOKENIZER, lambda tmp: save_bert_tokenizer(encoder.tokenizer, tmp))


def load_adapter_encoder(adapter: Path, image_encoder: Path) -> SubjectEncoder:
    from safetensors.torch import load_file

    adapter = Path(adapter)
    for name in (QFORMER_CONFIG, QFORMER_WEIGHTS):
        if not (adapter / name).is_file():
            raise LimnerError(f"adapter {adapter} has no {name}; give a folder that `limner pretrain` wrote")
    tokenizer = load_bert_tokenizer(adapter / QFORMER_TOKENIZER)
    config = _config_from(json.loads((adapter / QFORMER_CONFIG).read_text()))
    encoder = SubjectEncoder(config, tokenizer)
    state = load_file(str(adapter / QFORMER_WEIGHTS)) | {
        f"visual_encoder.{k}": v for k, v in vision_from_clip(_safetensors_of(image_encoder)).items()
    }
    _load_strict(encoder, state, adapter / QFORMER_WEIGHTS)
    return encoder.eval()


def _config_from(data: dict):
    from transformers import Blip2Config

    data = {k: v for k, v in data.items() if k not in ("transformers_version", "architectures")}
    tokenizer = data.pop("tokenizer", None)
    config = Blip2Config(**data)
    config.tokenizer = tokenizer
    return config


# ---------------------------------------------------------------------------------------------------------------
# diffusers' BlipDiffusionPipeline folder
# ---------------------------------------------------------------------------------------------------------------


def read_pipeline_encoder(folder: Path) -> SubjectEncoder:
    """The subject encoder of a BlipDiffusionPipeline folder's qformer/ (every key read, none left over)."""
    folder = Path(folder)
    check_pipeline_folder(folder)
    qformer = folder / "qformer"
    config = _config_from(json.loads((qformer / "config.json").read_text()))
    named = Path(config.tokenizer) if config.tokenizer else None
    place = named if named is not None and named.is_dir() else qformer
    tokenizer = load_bert_tokenizer(place)
    encoder = SubjectEncoder(config, tokenizer)
    _load_strict(encoder, _safetensors_of(qformer), qformer)
    return encoder.eval()


def context_text_state(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's weights as ContextCLIPTextModel's: everything under `text_model.`, the positions too."""
    state = {}
    for k, v in text_encoder.state_dict().items():
        k = k if k.startswith("text_model.") else f"text_model.{k}"
        state[k] = v
    positions = text_encoder.config.max_position_embeddings
    state["text_model.embeddings.position_ids"] = torch.arange(positions).expand((1, -1)).clone()
    return state


def clip_text_state(context_state: dict[str, torch.Tensor], text_encoder: torch.nn.Module) -> dict:
    """ContextCLIPTextModel weights as the loaded CLIPTextModel names them (with or without `text_model.`)."""
    own = set(text_encoder.state_dict())
    out = {}
    for k, v in context_state.items():
        if k.endswith("embeddings.position_ids"):
            continue
        name = k if k in own else k.removeprefix("text_model.")
        out[name] = v
    return out


def export_pipeline(
    out: Path,
    pipe,
    encoder: SubjectEncoder,
    image_processor_config: dict,
    ctx_begin_pos: int = 2,
) -> Path:
    """Writes `pipe` (a StableDiffusionPipeline whose UNet carries the stage-2 weights) with the subject
    encoder as diffusers' BlipDiffusionPipeline folder, through diffusers' own component classes: whatever they
    cannot load fails here, not in the user's hands."""
    from diffusers.pipelines.deprecated.blip_diffusion import (
        BlipDiffusionPipeline,
        BlipImageProcessor,
        ContextCLIPTextModel,
    )
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2 import Blip2QFormerModel

    # written beside `out`, then renamed: a kill mid-way leaves no folder that passes for a pipeline
    final = Path(out)
    out = final.parent / f".{final.name}.partial"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    qformer_dir = out / "qformer"
    with disk_guard(f"the BLIP-Diffusion folder {final}"):
        save_bert_tokenizer(encoder.tokenizer, qformer_dir)  # diffusers' Blip2QFormerModel reads it back from here
        config = _config_from(encoder.config.to_dict())
        config.tokenizer = str(qformer_dir.resolve())
        qformer = Blip2QFormerModel(config)
        _load_strict(qformer, {k: v.float() for k, v in encoder.state_dict().items()}, "the subject encoder")
        text_encoder = ContextCLIPTextModel(pipe.text_encoder.config)
        missing = text_encoder.load_state_dict(context_text_state(pipe.text_encoder), strict=True)
        del missing
        processor = BlipImageProcessor(**image_processor_config)
        mean, std = image_processor_config["image_mean"], image_processor_config["image_std"]
        blip = BlipDiffusionPipeline(
            tokenizer=pipe.tokenizer,
            text_encoder=text_encoder,
            vae=pipe.vae,
            unet=pipe.unet,
            scheduler=pipe.scheduler,
            qformer=qformer,
            image_processor=processor,
            ctx_begin_pos=ctx_begin_pos,
            mean=mean,
            std=std,
        )
        blip.save_pretrained(str(out), safe_serialization=True)
        save_bert_tokenizer(
            encoder.tokenizer, qformer_dir
        )  # after the model's save_pretrained, which may tidy the folder
        # diffusers' Q-Former loads its tokenizer from the folder its config names: the final one
        config_file = qformer_dir / "config.json"
        write_json_atomic(
            config_file, json.loads(config_file.read_text()) | {"tokenizer": str((final / "qformer").resolve())}
        )
    if final.exists():
        final.rmdir()  # empty: `limner export` refuses a folder with anything in it
    out.rename(final)
    return final
