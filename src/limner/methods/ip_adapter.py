"""IP-Adapter (Ye et al., 2023): a text-compatible image prompt adapter for text-to-image diffusion models.

The paper's idea: an image prompt enters the UNet through its own cross-attention, *decoupled* from the text's.
A frozen CLIP image encoder reads the reference; a small trainable projection turns its features into a few
image tokens c_i; every cross-attention layer gets a second key/value projection for them, and the two
attentions add:

    Z = Attention(Q, K_t, V_t) + scale * Attention(Q, K_i, V_i),   K_i = c_i W'_k,  V_i = c_i W'_v

Only the projection and W'_k, W'_v (`to_k_ip`, `to_v_ip`, initialised from the layer's W_k, W_v) train; the
UNet, the VAE, the text and image encoders stay frozen. The loss is the plain noise-prediction MSE; the image
condition, the text, and both are each dropped with probability 0.05 (a zero image embedding, an empty caption),
so classifier-free guidance works for either. Once pretrained on many subjects, the adapter personalizes any new
subject by *encoding* its references: seconds, no training.

Variants (setting `variant`), each diffusers' own projection class, so the state dict is what
`pipe.load_ip_adapter` builds:

    plain  the pooled, projected CLIP image embedding -> Linear -> 4 tokens -> LayerNorm     (ImageProjection)
    plus   the penultimate layer's patch tokens -> Perceiver Resampler, 16 queries   (IPAdapterPlusImageProjection)
    full   the penultimate layer's patch tokens -> MLP -> LayerNorm, one per patch   (IPAdapterFullImageProjection)

Inference follows the official code and diffusers: `scale` 1.0 (the paper's setting for an image prompt
alone; about 0.5 when a text prompt should also steer), per-block scales as InstantStyle sets them, and the
unconditional image input is a zero embedding (plain) or the encoded all-zero image (plus, full). Several
references: their embeddings averaged (`references=mean`), or each one's tokens attended together
(`references=concat`, what diffusers does with a list of images).

Files. An adapter folder holds `ip_adapter.safetensors` in the official flat layout (`image_proj.*`,
`ip_adapter.{i}.to_k_ip.weight`, ...; fp16), `adapter.json`, and `image_encoder/` when the encoder is not the
base's own. A concept folder holds the image-encoder features of its references and of the unconditional
input (`image_embeds.safetensors`: exactly diffusers' `ip_adapter_image_embeds`), the references, and
`limner.json` naming the adapter by path and fingerprint. Official files are read too: `.safetensors` always,
pickled `.bin` only with `allow_pickle=True` (then `torch.load(weights_only=True)`).

Public functions for the command line: `IPAdapter.pretrain`, `IPAdapter.encode`, `IPAdapter.concept_from_files`,
`read_adapter_weights`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from limner.adapters import (
    image_projection,
    install_ip_attention,
    ip_attention_parameters,
    ip_layer_ids,
    ip_state_dict,
    load_ip_state_dict,
    projected_once,
    projection_from_state_dict,
    projection_state_dict,
    projection_variant,
    remove_ip_attention,
    set_ip_scale,
)
from limner.concepts import read_manifest
from limner.data.sample import CUT_OUT_PAIRS
from limner.errors import LimnerError
from limner.images import crop_to_subject, cut_out, to_pil, to_unit_range
from limner.io import (
    PICKLE_SUFFIXES,
    child,
    copy_folder,
    disk_guard,
    pickle_opt_in,
    read_tensors,
    written_atomically,
)
from limner.methods.adapter import (
    ADAPTER_MANIFEST,
    AdapterMethod,
    encoded_concept_manifest,
    encoded_with,
    made_by_limner,
    read_adapter_manifest,
    read_reference_files,
    started_from,
    thin_curve,
    write_adapter_manifest,
    write_concept_manifest,
    write_references,
)
from limner.methods.base import Capabilities, Installation
from limner.methods.registry import register
from limner.methods.settings import setting, with_settings
from limner.subject import Subject
from limner.training import TrainConfig, TrainingTask, is_main_process, noise_scheduler, split_train_settings, train
from limner.training.data import fit_square, sample_latents
from limner.training.losses import denoising_loss

if TYPE_CHECKING:
    from limner.models.loading import Base

VARIANTS = ("plain", "plus", "full")
WEIGHTS = "ip_adapter.safetensors"
EMBEDS = "image_embeds.safetensors"
IMAGE_ENCODER = "image_encoder"
FEATURE_EXTRACTOR = "feature_extractor"
MIN_REFERENCE_SIDE = 8  # pixels: a smaller picture holds nothing for CLIP to read
# diffusers' loader builds a plain projection with 4 tokens (16 only at ViT-H x SDXL size): a plain adapter it can
# load has 4
PLAIN_TOKENS = 4
BLOCKS = ("down", "mid", "up")


def _parse_scale(value: Any) -> float | dict | list:
    """A number, or an InstantStyle dict given as such or as JSON text (`--set scale='{"up": ...}'`)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise LimnerError(
                f"scale {value!r} is neither a number nor a JSON dict of per-block scales such as "
                '\'{"up": {"block_0": [0.0, 1.0, 0.0]}}\''
            ) from e
    if isinstance(value, bool) or not isinstance(value, (int, float, dict, list)):
        raise LimnerError(f"scale must be a number or a dict of per-block scales, got {value!r}")

    def numbers(v: Any, where: str) -> None:
        if isinstance(v, dict):
            for k, sub in v.items():
                numbers(sub, f"{where}.{k}")
        elif isinstance(v, list):
            for i, sub in enumerate(v):
                numbers(sub, f"{where}[{i}]")
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise LimnerError(f"scale{where}: {v!r} is not a number")
        elif v < 0:
            raise LimnerError(f"scale{where} is {v}: an image scale must be 0 or more (0 switches the image off)")

    numbers(value, "")
    if isinstance(value, dict) and set(value) - set(BLOCKS):
        raise LimnerError(
            f"scale: per-block scales name the blocks {', '.join(BLOCKS)}, got {', '.join(map(str, value))} "
            '(e.g. {"up": {"block_0": [0.0, 1.0, 0.0]}}, InstantStyle\'s layout attention)'
        )
    return float(value) if isinstance(value, int) else value


@dataclass
class IPAdapterSettings:
    variant: str = setting("plain", "plain | plus | full: which image features become the image tokens (pretrain)")
    scale: float | dict = setting(
        1.0,
        "image scale (`ip_adapter_scale`): 1.0 as the paper and official code use for an image prompt alone, about "
        "0.5 when the text should also steer; or per-block scales as diffusers' set_ip_adapter_scale takes them "
        '(InstantStyle), e.g. {"up": {"block_0": [0.0, 1.0, 0.0]}}; 0 switches the image off',
    )
    num_tokens: int | None = setting(
        None, "image tokens: 4 for plain (what diffusers' loader reads), 16 Resampler queries for plus (pretrain)"
    )
    resampler_dim: int = setting(
        768, "plus: the Resampler's width (768 as the official SD 1.5 Plus; heads = width / 64) (pretrain)"
    )
    references: str = setting(
        "mean", "several references: mean (their embeddings averaged) or concat (all their tokens attended together)"
    )
    num_references: int | None = setting(
        None, "use only the subject's first N reference images (None: all of them)", added=True
    )
    drop_image: float = setting(0.05, "pretrain: share of samples whose image embedding is zeroed (paper: 0.05)")
    drop_text: float = setting(0.05, "pretrain: share of samples whose caption is emptied (paper: 0.05)")
    drop_both: float = setting(0.05, "pretrain: share of samples with both dropped (paper: 0.05)")
    image_encoder: str | None = setting(
        None,
        "a CLIPVisionModelWithProjection folder; default: the adapter's image_encoder/, the one beside an official "
        "file, else the base's image_encoder/",
    )
    allow_pickle: bool = setting(
        False, "read a pickled official .bin adapter (torch.load with weights_only=True); only files you trust"
    )
    mask_references: bool | None = setting(
        None,
        "encode each reference cut out on grey where the subject has masks (None: as the adapter was pretrained, "
        "cut out for pair=view, crop or cut, and cropped to the subject for crop); the paper encodes the whole "
        "picture, whose background can outweigh the subject",
        added=True,
    )
    pair: str | None = setting(
        None,
        "pretrain: what each sample is conditioned on: self (the target image itself, as the paper), view (another "
        "view of the same subject, cut out on grey; the world stream only), crop (that view cropped to the "
        "subject's box, so a small encoder sees its marks) or cut (the target itself cut out on grey, as FastComposer "
        "pairs its subject crops; the world stream only). None: cut on the world stream, self on your own data",
    )

    init: str | None = setting(
        None,
        "pretrain: start from this adapter's weights (a folder limner pretrained, or an official file, of this "
        "variant and token count) rather than fresh ones, e.g. to cool a shipped adapter's rate down; a resumed run "
        "continues from its checkpoint",
        added=True,
    )

    finetune_steps: int = setting(
        0,
        "few-shot fine-tune after encoding (limner's, not the paper's): steps of the projection and to_k_ip / "
        "to_v_ip on the subject's own references, each drawn with another one as its image prompt; the concept "
        "then carries its own copy of the adapter's weights (0: encode only, as the paper)",
        added=True,
    )
    finetune_learning_rate: float = setting(1e-4, "the fine-tune's AdamW learning rate", added=True)
    captions: str | None = setting(
        None,
        "pretrain on the world stream: full (captions name the subject's colours and emblem, as the base was "
        "trained) or class (class noun and context only, so the image prompt must carry the looks). None: class on "
        "the world stream, your data's own captions otherwise",
        added=True,
    )

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise LimnerError(f"variant {self.variant!r} is unknown; choose one of {', '.join(VARIANTS)}")
        self.scale = _parse_scale(self.scale)
        if self.num_tokens is not None and (isinstance(self.num_tokens, bool) or int(self.num_tokens) < 1):
            raise LimnerError(f"num_tokens must be at least 1, got {self.num_tokens}")
        if self.variant == "plain" and self.num_tokens not in (None, PLAIN_TOKENS):
            raise LimnerError(
                f"num_tokens {self.num_tokens}: a plain adapter has {PLAIN_TOKENS} tokens (diffusers' loader reads "
                "no other count); use variant=plus for more"
            )
        if self.variant == "full" and self.num_tokens is not None:
            raise LimnerError("num_tokens: the full variant keeps one token per patch; leave num_tokens out")
        if self.resampler_dim < 64 or self.resampler_dim % 64:
            raise LimnerError(f"resampler_dim {self.resampler_dim} must be a positive multiple of 64 (heads of 64)")
        if self.num_references is not None and (isinstance(self.num_references, bool) or self.num_references < 1):
            raise LimnerError(f"num_references must be at least 1, got {self.num_references}")
        if (
            isinstance(self.finetune_steps, bool)
            or not isinstance(self.finetune_steps, int)
            or self.finetune_steps < 0
        ):
            raise LimnerError(f"finetune_steps must be a whole number, 0 or more, got {self.finetune_steps!r}")
        if not self.finetune_learning_rate > 0:
            raise LimnerError(f"finetune_learning_rate must be positive, got {self.finetune_learning_rate}")
        if self.references not in ("mean", "concat"):
            raise LimnerError(f"references {self.references!r} is unknown; choose mean or concat")
        drops = {"drop_image": self.drop_image, "drop_text": self.drop_text, "drop_both": self.drop_both}
        for name, p in drops.items():
            if not 0 <= p <= 1:
                raise LimnerError(f"{name} {p} must be between 0 and 1")
        if sum(drops.values()) > 1:
            raise LimnerError(f"drop_image + drop_text + drop_both is {sum(drops.values())}; at most 1")

    @property
    def tokens(self) -> int | None:
        if self.variant == "full":
            return None
        return self.num_tokens or (PLAIN_TOKENS if self.variant == "plain" else 16)


# adapter.json keeps about this many points of the loss curve (a shipped adapter's manifest stays small);
# train_log.csv beside it has every step


def pretrain_defaults() -> TrainConfig:
    """The paper's optimiser (AdamW, lr 1e-4, weight decay 0.01), batch 8 as its official scripts per GPU."""
    return TrainConfig(max_steps=1000, batch_size=8, learning_rate=1e-4, weight_decay=0.01, checkpoint_every=500)


# ---------------------------------------------------------------------------------------------------------------
# Official files
# ---------------------------------------------------------------------------------------------------------------


def weights_file(adapter: Path) -> Path:
    """The weight file of an adapter: the file itself, a limner folder's ip_adapter.safetensors, or an official
    folder's one weight file."""
    adapter = Path(adapter)
    if adapter.is_file():
        return adapter
    if not adapter.is_dir():
        raise LimnerError(
            f"adapter {adapter} does not exist; give a folder that `limner pretrain --method ip_adapter` wrote, "
            "or an official IP-Adapter .safetensors file"
        )
    if (adapter / WEIGHTS).is_file():
        return adapter / WEIGHTS
    candidates = sorted(p for p in adapter.iterdir() if p.suffix in (".safetensors", *PICKLE_SUFFIXES))
    if len(candidates) != 1:
        raise LimnerError(
            f"adapter folder {adapter} holds {len(candidates)} weight files and no {WEIGHTS}; name the file itself"
        )
    return candidates[0]


def read_adapter_weights(path: Path, allow_pickle: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """An IP-Adapter file as {"image_proj": {...}, "ip_adapter": {...}}: `.safetensors` with the official flat
    prefixes, or (with allow_pickle) the official nested `.bin`, read by torch.load(weights_only=True)."""
    path = weights_file(Path(path))
    if path.suffix not in PICKLE_SUFFIXES and path.suffix != ".safetensors":
        raise LimnerError(f"{path}: IP-Adapter weights are read from .safetensors (or a .bin with --allow-pickle)")
    state = read_tensors(path, allow_pickle)
    if path.suffix in PICKLE_SUFFIXES:  # the official nested layout
        if not isinstance(state, dict) or not {"image_proj", "ip_adapter"} <= set(state):
            raise LimnerError(f"{path} is not an IP-Adapter file: it needs 'image_proj' and 'ip_adapter' entries")
        unknown = sorted(set(state) - {"image_proj", "ip_adapter"})
        if unknown:
            raise LimnerError(f"{path} has unknown entries {unknown[:4]}: not an IP-Adapter file")
        return {"image_proj": dict(state["image_proj"]), "ip_adapter": dict(state["ip_adapter"])}
    flat = state
    unknown = sorted(k for k in flat if not k.startswith(("image_proj.", "ip_adapter.")))
    if unknown:
        raise LimnerError(
            f"{path} has keys that are not IP-Adapter weights: {unknown[:4]} (the official layout has only "
            "image_proj.* and ip_adapter.{i}.to_k_ip/to_v_ip.weight)"
        )
    return {
        "image_proj": {k.removeprefix("image_proj."): v for k, v in flat.items() if k.startswith("image_proj.")},
        "ip_adapter": {k.removeprefix("ip_adapter."): v for k, v in flat.items() if k.startswith("ip_adapter.")},
    }


def detect_variant(image_proj: dict[str, torch.Tensor], where: Path | str = "the adapter") -> str:
    """The variant, from the keys, as diffusers' loader tells them apart."""
    if "proj.weight" in image_proj:
        return "plain"
    if "proj.3.weight" in image_proj:
        return "full"
    if "latents" in image_proj:
        return "plus"
    if "norm.weight" in image_proj or any(k.startswith("perceiver_resampler.") for k in image_proj):
        raise LimnerError(f"{where} is an IP-Adapter FaceID file: it reads face embeddings, not images")
    raise LimnerError(f"{where}: no IP-Adapter projection in image_proj (keys {sorted(image_proj)[:4]})")


def image_feature_width(variant: str, image_proj: dict[str, torch.Tensor]) -> int:
    key = {"plain": "proj.weight", "plus": "proj_in.weight", "full": "proj.0.weight"}[variant]
    return int(image_proj[key].shape[1])


def check_fits(unet: nn.Module, weights: dict, where: Path | str, encoder_width: int | None = None) -> str:
    """The variant, after checking the adapter was made for this UNet (and image encoder): a LimnerError naming the
    dimensions expected and found otherwise."""
    variant = detect_variant(weights["image_proj"], where)
    proj, ip = weights["image_proj"], weights["ip_adapter"]
    cross = int(unet.config.cross_attention_dim)
    out = {"plain": ("norm.weight", 0), "plus": ("norm_out.weight", 0), "full": ("proj.3.weight", 0)}[variant]
    found_cross = int(proj[out[0]].shape[out[1]])
    ids = ip_layer_ids(unet)
    hidden = {}
    for name, i in ids.items():
        attn = unet.get_submodule(name.removesuffix(".processor"))
        hidden[i] = int(getattr(attn.to_k, "base_layer", attn.to_k).out_features)
    found_layers = sorted({int(k.split(".")[0]) for k in ip})
    problems = []
    if found_cross != cross:
        problems.append(f"cross-attention width {cross} expected, {found_cross} found")
    if found_layers != sorted(ids.values()):
        problems.append(f"{len(ids)} cross-attention layers expected, {len(found_layers)} found")
    else:
        for i, width in hidden.items():
            k = ip.get(f"{i}.to_k_ip.weight")
            if k is None or tuple(k.shape) != (width, cross):
                shape = None if k is None else tuple(k.shape)
                problems.append(f"ip_adapter.{i}.to_k_ip.weight of shape {(width, cross)} expected, {shape} found")
                break
    if encoder_width is not None and image_feature_width(variant, proj) != encoder_width:
        problems.append(
            f"image features of width {encoder_width} from the image encoder, the projection reads "
            f"{image_feature_width(variant, proj)}"
        )
    if problems:
        raise LimnerError(f"IP-Adapter {where} was made for another base or image encoder: {'; '.join(problems)}")
    unknown = sorted(set(ip) - {f"{i}.{p}.weight" for i in ids.values() for p in ("to_k_ip", "to_v_ip")})
    if unknown:
        raise LimnerError(f"IP-Adapter {where} has unknown keys ip_adapter.{unknown[0]} ...")
    return variant


def load_projection(weights: dict, where: Path | str) -> nn.Module:
    """The image projection an official file describes, built by diffusers' own converter; every image_proj key
    must be one it reads."""
    try:
        projection = projection_from_state_dict(weights["image_proj"])
    except (KeyError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise LimnerError(f"IP-Adapter {where}: unknown or missing image_proj keys ({first})") from e
    expected = set(projection_state_dict(projection))
    given = set(weights["image_proj"])
    if given != expected:
        raise LimnerError(
            f"IP-Adapter {where}: unknown image_proj keys {sorted(given - expected)[:4]}, missing "
            f"{sorted(expected - given)[:4]}"
        )
    return projection.eval()


def official_state(projection: nn.Module, unet: nn.Module, adapter: int = 0) -> dict[str, torch.Tensor]:
    """The flat official layout: image_proj.* and ip_adapter.{i}.to_k_ip/to_v_ip.weight."""
    return {f"image_proj.{k}": v for k, v in projection_state_dict(projection).items()} | ip_state_dict(unet, adapter)


# ---------------------------------------------------------------------------------------------------------------
# The image encoder
# ---------------------------------------------------------------------------------------------------------------


def save_adapter_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """An official flat state (`image_proj.*`, `ip_adapter.*`) as fp16 safetensors, written atomically."""
    from safetensors.torch import save_file

    half = {k: v.to(torch.float16).contiguous() for k, v in state.items()}
    with written_atomically(path) as tmp:
        save_file(half, str(tmp), metadata={"format": "pt"})


class ImageEncoder:
    """The frozen CLIP vision tower and its preprocessing, giving each variant's features as diffusers'
    `encode_image` does: image_embeds (plain) or the penultimate hidden states (plus, full)."""

    def __init__(self, folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise LimnerError(
                f"image encoder {self.folder} has no config.json: give a CLIPVisionModelWithProjection folder "
                "(--set image_encoder=DIR)"
            )
        self.model = CLIPVisionModelWithProjection.from_pretrained(self.folder, local_files_only=True)
        self.model = self.model.to(device, dtype).eval().requires_grad_(False)
        size = int(self.model.config.image_size)
        extractor = self.folder.parent / FEATURE_EXTRACTOR
        # the base's own preprocessing where it ships one; otherwise the processor diffusers' loader makes
        self.processor = (
            CLIPImageProcessor.from_pretrained(extractor)
            if (extractor / "preprocessor_config.json").is_file()
            else CLIPImageProcessor(size=size, crop_size=size)
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def pixels(self, images: list) -> torch.Tensor:
        return self.processor(images=to_pil(images), return_tensors="pt").pixel_values.to(self.device, self.dtype)

    @torch.no_grad()
    def features(self, pixels: torch.Tensor, variant: str) -> torch.Tensor:
        if variant == "plain":
            return self.model(pixels).image_embeds
        return self.model(pixels, output_hidden_states=True).hidden_states[-2]

    @torch.no_grad()
    def unconditional(self, pixels: torch.Tensor, variant: str) -> torch.Tensor:
        """The official unconditional input: a zero embedding (plain), the encoded all-zero image (plus, full)."""
        if variant == "plain":
            return torch.zeros_like(self.features(pixels[:1], variant)).expand(len(pixels), -1)
        return self.features(torch.zeros_like(pixels), variant)

    def width(self, variant: str) -> int:
        config = self.model.config
        return int(config.projection_dim if variant == "plain" else config.hidden_size)


def find_image_encoder(base: Base, adapter: Path | None, given: str | None) -> Path:
    """The setting, else the adapter folder's (or an official file's sibling) image_encoder/, else the base's."""
    if given is not None:
        return Path(given).expanduser()
    places = []
    if adapter is not None:
        folder = Path(adapter) if Path(adapter).is_dir() else Path(adapter).parent
        places.append(folder / IMAGE_ENCODER)
    places.append(Path(base.path) / IMAGE_ENCODER)
    for place in places:
        if (place / "config.json").is_file():
            return place
    raise LimnerError(
        f"IP-Adapter needs a CLIP image encoder and found none in {', '.join(map(str, places))}; pass "
        "--set image_encoder=DIR (a CLIPVisionModelWithProjection folder)"
    )


def encoder_fingerprint(folder: Path) -> str:
    from limner.models.loading import fingerprint

    return fingerprint(Path(folder))


# ---------------------------------------------------------------------------------------------------------------
# Installing into a UNet, as diffusers' load_ip_adapter does
# ---------------------------------------------------------------------------------------------------------------


def attach(
    unet: nn.Module, projections: list[nn.Module], weights: list[dict] | None = None, for_generation: bool = False
) -> None:
    """Decoupled attention on every attn2 (one adapter slot per projection, loaded from `weights` where given,
    else initialised from to_k/to_v) and the projections as the UNet's `encoder_hid_proj`, so the UNet (and
    the pipeline's `ip_adapter_image_embeds`) runs exactly what `pipe.load_ip_adapter` sets up. `detach` undoes it.
    for_generation: the projection computed once per generation (`projected_once`), not at every step."""
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    if getattr(unet, "encoder_hid_proj", None) is not None:
        raise LimnerError(
            "this UNet already has an encoder_hid_proj (an IP-Adapter loaded by diffusers, or a Kolors-type "
            "text projection); unload it first (pipe.unload_ip_adapter())"
        )
    tokens = []
    for projection in projections:
        variant = projection_variant(projection)
        tokens.append(
            projection.num_image_text_embeds
            if variant == "plain"
            else projection.latents.shape[1]
            if variant == "plus"
            else 257  # diffusers' count for the full variant (used only by its deprecated tensor-input path)
        )
    install_ip_attention(unet, num_tokens=tokens)
    try:
        for i, state in enumerate(weights or []):
            load_ip_state_dict(unet, state, adapter=i)
    except BaseException:
        remove_ip_attention(unet)
        raise
    param = next(unet.parameters())
    unet._limner_ip_config = unet.config.encoder_hid_dim_type
    multi = projected_once(projections) if for_generation else MultiIPAdapterImageProjection(projections)
    unet.encoder_hid_proj = multi.to(param.device, param.dtype)
    unet.config.encoder_hid_dim_type = "ip_image_proj"


def detach(unet: nn.Module) -> None:
    remove_ip_attention(unet)
    unet.encoder_hid_proj = None
    unet.config.encoder_hid_dim_type = unet.__dict__.pop("_limner_ip_config", None)


# ---------------------------------------------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------------------------------------------


def official_drops(b: int, cfg: IPAdapterSettings, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(image dropped, text dropped) per sample, one draw each as the official training script does:
    [0, p_image) image, [p_image, p_image + p_text) text, then p_both both."""
    u = torch.rand(b, generator=generator)
    a, t = cfg.drop_image, cfg.drop_image + cfg.drop_text
    both = (u >= t) & (u < t + cfg.drop_both)
    return (u < a) | both, ((u >= a) & (u < t)) | both


class _Pretraining(TrainingTask):
    """The paper's training: frozen UNet, VAE, text and image encoders; the projection and to_k_ip / to_v_ip
    learn the noise-prediction MSE, with the image, the text or both dropped."""

    def __init__(
        self,
        base: Base,
        encoder: ImageEncoder,
        cfg: IPAdapterSettings,
        train_cfg: TrainConfig,
        weights: dict | None = None,
    ):
        """`weights`: an adapter's official state to start from (a fine-tune); None starts a new adapter."""
        from limner.training.conditioning import PromptEncoder

        self.base, self.encoder, self.cfg, self.train_cfg = base, encoder, cfg, train_cfg
        pipe = base.pipe
        self.unet = pipe.unet
        for m in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None), encoder.model):
            if m is not None:
                m.requires_grad_(False)
        device = base.device
        if weights is None:
            with torch.random.fork_rng(devices=[]):  # the projection's initial weights follow the run's seed
                torch.manual_seed(train_cfg.seed)
                self.projection = self._new_projection(encoder, cfg)
        else:
            self.projection = load_projection(weights, "the adapter")
        self.projection = self.projection.to(device, torch.float32)
        attach(self.unet, [self.projection], None if weights is None else [weights])
        self.params = [*self.unet.encoder_hid_proj.parameters(), *ip_attention_parameters(self.unet)]
        for p in self.params:
            p.data = p.data.float()  # trained in fp32 whatever the base's dtype
            p.requires_grad_(True)
        self.prompts = PromptEncoder(pipe, base.resolution)
        self.scheduler = noise_scheduler(pipe)

    def _new_projection(self, encoder: ImageEncoder, cfg: IPAdapterSettings) -> nn.Module:
        return image_projection(
            cfg.variant,
            encoder.width(cfg.variant),
            int(self.unet.config.cross_attention_dim),
            num_tokens=cfg.tokens,
            **({"dim": cfg.resampler_dim} if cfg.variant == "plus" else {}),
        )

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {
            "vae": self.base.pipe.vae,
            "image_encoder": self.encoder.model,
            **self.prompts.text_encoders(),
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.params

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.unet.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        named = dict(self.unet.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                named[name].copy_(value)

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        vae = self.base.pipe.vae
        drop_image, drop_text = official_drops(len(batch["prompts"]), self.cfg, generator)
        with torch.no_grad():
            latents = sample_latents(vae, batch["images"], generator)
            pixels = batch["pixels"].to(self.encoder.device, self.encoder.dtype)
            keep = (~drop_image).to(pixels.device)
            if self.cfg.variant == "plain":  # a zero embedding, as tutorial_train_ip-adapter.py
                features = self.encoder.features(pixels, "plain")
                features = features * keep.view(-1, 1).to(features)
            else:  # the encoded zero image, as tutorial_train_plus.py
                features = self.encoder.features(pixels * keep.view(-1, 1, 1, 1).to(pixels), self.cfg.variant)
            prompts = ["" if d else p for p, d in zip(batch["prompts"], drop_text.tolist())]
            cond, kwargs = self.prompts.encode_frozen(prompts)
        added = kwargs.get("added_cond_kwargs", {}) | {"image_embeds": [features.unsqueeze(1)]}
        return denoising_loss(
            self.wrapped["unet"],
            self.scheduler,
            latents,
            cond,
            generator,
            noise_offset=self.train_cfg.noise_offset,
            min_snr_gamma=self.train_cfg.min_snr_gamma,
            added_cond_kwargs=added,
        )


def _as_pretrained(images: list, subject: Subject, masked: bool | None, manifest: dict) -> tuple[list, bool]:
    """The references as the adapter's pairing showed its conditions (`masked` None), or as `masked` asks: cut out
    on grey (pair=view or cut), also cropped to the subject (pair=crop), or whole. Masks are needed to cut anything
    out; the second value (was anything cut out) goes on the concept's card."""
    pair = manifest.get("settings", {}).get("pair")
    masked = pair in CUT_OUT_PAIRS if masked is None else masked
    if not (masked and subject.masks):
        return images, False
    cut = crop_to_subject if pair == "crop" else cut_out
    return [cut(im, m) for im, m in zip(images, subject.masks)], True


def _open_data(data: Any, base: Base, cfg: IPAdapterSettings, train_cfg: TrainConfig) -> Any:
    """A data stream: given (anything iterable over samples), or opened from a spec by limner.data."""
    if not isinstance(data, (str, Path)):
        return data
    from accelerate import PartialState

    from limner.data import open_stream

    # cpu=True on a CPU base: under `accelerate launch` on a machine without a GPU, a plain PartialState() sees one
    # process (the Accelerator the loop makes starts gloo), and every process would read the same samples
    state = PartialState(cpu=torch.device(base.device).type == "cpu")
    return open_stream(
        str(data),
        seed=train_cfg.seed,
        rank=state.process_index,
        world_size=state.num_processes,
        resolution=base.resolution,
        pair=cfg.pair,
        captions=cfg.captions,
    )


def _batches(stream: Any, base: Base, encoder: ImageEncoder, batch_size: int):
    """next_batch for the trainer: `batch_size` samples from the stream (restarted where a finite one ends),
    each the target image fitted to the base's resolution, its caption, and its condition image (the first
    reference, or the target itself where it has none: the paper's pairing) for the image encoder."""
    iterator = None  # made at the first batch: after the loop has put a resumed stream back where it was

    def next_sample():
        nonlocal iterator
        if iterator is None:
            iterator = iter(stream)
        for attempt in range(2):
            try:
                return next(iterator)
            except StopIteration:
                if attempt:
                    break
                iterator = iter(stream)
        raise LimnerError(f"the pretraining data has no usable sample ({_describe(stream)})")

    def next_batch(generator: torch.Generator) -> dict:
        samples = [next_sample() for _ in range(batch_size)]
        images = [fit_square(np.asarray(s.image), base.resolution) for s in samples]
        conditions = [s.references[0] if getattr(s, "references", None) else s.image for s in samples]
        return {
            "images": to_unit_range(np.stack(images)),
            "pixels": encoder.pixels([np.asarray(c) for c in conditions]).cpu(),
            "prompts": [s.text for s in samples],
        }

    return next_batch


def _describe(stream: Any) -> Any:
    describe = getattr(stream, "describe", None)
    return describe() if callable(describe) else type(stream).__name__


# ---------------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------------


def _check_references(images: list, where: str) -> list[np.ndarray]:
    if not images:
        raise LimnerError(f"{where}: no reference image; IP-Adapter encodes at least one picture of the subject")
    checked = []
    for i, im in enumerate(images):
        a = np.asarray(im)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise LimnerError(f"{where}: reference {i} is not an RGB picture (shape {a.shape}, {a.dtype})")
        if min(a.shape[:2]) < MIN_REFERENCE_SIDE:
            raise LimnerError(
                f"{where}: reference {i} is {a.shape[1]}x{a.shape[0]} px; IP-Adapter needs pictures of at least "
                f"{MIN_REFERENCE_SIDE} px a side"
            )
        checked.append(a)
    return checked


@register
class IPAdapter(AdapterMethod):
    """Decoupled image cross-attention: an image prompt through its own keys and values (Ye et al., 2023)."""

    name = "ip_adapter"
    family = "encoder"
    capabilities = Capabilities(needs_adapter=True)
    config_cls = IPAdapterSettings

    # ---- pretraining -------------------------------------------------------------------------------------------

    def pretrain(self, base: Base, data: Any, out: Path, **settings: Any) -> Path:
        """Pretrains an adapter on `data` (a spec for limner.data.open_stream, or a stream of samples with
        `image`, `text`, `references`); writes the adapter folder `out` and returns it.

        settings: this method's (variant, num_tokens, resampler_dim, drop_*, image_encoder, pair, captions) and
        the trainer's (max_steps, batch_size, learning_rate, mixed_precision, gradient_checkpointing, resume, ...), or
        `train=TrainConfig(...)`."""
        out = Path(out)
        train_cfg = settings.pop("train", None) or pretrain_defaults()
        train_cfg, rest = split_train_settings(train_cfg, settings)
        cfg = with_settings(IPAdapterSettings(), rest, self.name)
        # the world's pairing and captions, measured on its bench (docs/README.md); real data has one view and
        # its own captions. The adapter's manifest records what was used, and encoding follows it.
        world = isinstance(data, str) and data == "world"
        cfg.pair = cfg.pair or ("cut" if world else "self")
        cfg.captions = cfg.captions or ("class" if world else "full")
        origin = started_from(cfg.init, out)
        encoder_folder = find_image_encoder(base, None, cfg.image_encoder)
        encoder = ImageEncoder(encoder_folder, base.device)
        start = None if cfg.init is None else self._starting_weights(base, encoder, cfg)
        stream = _open_data(data, base, cfg, train_cfg)
        task = _Pretraining(base, encoder, cfg, train_cfg, weights=start)
        t0 = time.perf_counter()
        try:
            # the loop keeps the stream's position in every checkpoint, and restores it on resume
            data_position = stream if callable(getattr(stream, "state_dict", None)) else None
            batches = _batches(stream, base, encoder, train_cfg.batch_size)
            log = train(task, batches, train_cfg, out, "ip_adapter", data=data_position)
            state = official_state(task.projection, base.pipe.unet)
        finally:
            detach(base.pipe.unet)
            base.pipe.unet.requires_grad_(False)
        if is_main_process():
            self._write_adapter(base, out, cfg, train_cfg, state, encoder_folder, stream, log, t0, origin)
        return out

    def _starting_weights(self, base: Base, encoder: ImageEncoder, cfg: IPAdapterSettings) -> dict:
        """`init`'s weights, checked to fit this base, encoder, variant and token count."""
        where = Path(cfg.init).expanduser()
        weights = read_adapter_weights(where, cfg.allow_pickle)
        variant = check_fits(
            base.pipe.unet, weights, where, encoder.width(detect_variant(weights["image_proj"], where))
        )
        projection = load_projection(weights, where)
        latents = getattr(projection, "latents", None)  # plus: the Resampler's queries
        tokens = latents.shape[1] if latents is not None else getattr(projection, "num_image_text_embeds", None)
        if variant != cfg.variant or tokens != cfg.tokens:
            raise LimnerError(
                f"init={where} is a {variant} adapter with {tokens} image tokens; these settings train {cfg.variant} "
                f"with {cfg.tokens} (set variant and num_tokens as it was pretrained)"
            )
        if latents is not None and latents.shape[-1] != cfg.resampler_dim:
            raise LimnerError(
                f"init={where}: its Resampler is {latents.shape[-1]} wide, these settings train {cfg.resampler_dim} "
                f"(set resampler_dim={latents.shape[-1]})"
            )
        return {part: {k: v.float() for k, v in state.items()} for part, state in weights.items()}

    def _write_adapter(self, base, out, cfg, train_cfg, state, encoder_folder, stream, log, t0, origin) -> None:

        own = Path(encoder_folder).resolve() == (Path(base.path) / IMAGE_ENCODER).resolve()
        with disk_guard(f"the adapter in {out}"):
            if not own:  # an encoder the base lacks travels with the adapter (diffusers' loader finds it there)
                for name, source in ((IMAGE_ENCODER, encoder_folder), (FEATURE_EXTRACTOR, None)):
                    source = Path(source or Path(encoder_folder).parent / FEATURE_EXTRACTOR)
                    if source.is_dir() and not (out / name).exists():
                        copy_folder(source, out / name)
            save_adapter_weights(state, out / WEIGHTS)
            write_adapter_manifest(
                out,
                self.name,
                base,
                variant=cfg.variant,
                num_tokens=cfg.tokens,
                image_encoder=str(encoder_folder) if own else IMAGE_ENCODER,
                image_encoder_fingerprint=encoder_fingerprint(encoder_folder),
                data=_describe(stream),
                skipped=getattr(stream, "skipped", None),
                steps=log.steps,
                seconds=round(log.seconds, 2),
                wall_seconds=round(time.perf_counter() - t0, 2),
                curve=thin_curve(log.curve),
                settings=asdict(cfg),
                train=asdict(train_cfg),
                num_processes=log.num_processes,
                started_from=origin,
            )

    # ---- encoding ----------------------------------------------------------------------------------------------

    def personalize(self, base: Base, subject: Any, out: Path, *, score: Any = None, **overrides: Any) -> Path:
        with_settings(IPAdapterSettings(), {k: v for k, v in overrides.items() if k != "adapter"}, self.name)
        if overrides.get("adapter") is None:  # the shipped adapter of the variant asked for
            overrides["adapter"] = self.default_adapter(base, overrides.get("variant"))
        return super().personalize(base, subject, out, score=score, **overrides)  # settings fail before any work

    def default_adapter(self, base: Base, variant: str | None = None) -> Path | None:
        """The adapter limner ships for the world base (assets/world/adapters/ip_adapter-<variant>/), where this
        install has it; None otherwise (a real base, or an install without it)."""
        from limner.models.loading import WORLD_BASE

        world = base.is_world or Path(base.path).resolve() == WORLD_BASE.resolve()
        return self.shipped_adapter({"variant": variant}) if world else None

    def shipped_folder(self, settings: dict) -> str:
        return f"{self.name}-{settings.get('variant') or IPAdapterSettings().variant}"  # one per variant

    def adapter_for(self, base: Base, adapter: str | Path | None) -> Path:
        """A limner adapter folder (checked as this method's and this base's), or an official file (or a folder
        holding one): its dimensions are checked when it is read."""
        path = Path(adapter).expanduser() if adapter is not None else self.default_adapter(base)
        if path is None:
            shipped = "this install of limner has no world adapter yet" if base.is_world else "limner ships none"
            data = "world" if base.is_world else "world|FOLDER|DATASET|SHARDS"
            raise LimnerError(
                f"{self.name} needs a pretrained adapter for this base ({base.path}) and {shipped}: pretrain one with "
                f"`limner pretrain --method {self.name} --data {data} --out DIR`, or take an official IP-Adapter "
                ".safetensors file for the base (e.g. h94/IP-Adapter's models/ip-adapter_sd15.safetensors with its "
                "image_encoder/ beside it), and pass it with --adapter DIR|FILE (limner generate, train and demo; "
                f"--method {self.name}:adapter=DIR in limner eval and bench)"
            )
        if made_by_limner(path):
            return super().adapter_for(base, path)
        weights_file(path)  # exists, and is (or holds) one weight file
        return path

    call_settings = ("scale",)

    def set_call_settings(self, base: Base, concepts: list[Path], settings: dict[str, Any]) -> None:
        """`scale` for every installed concept (the concepts' slots in the order `install` took them)."""
        super().set_call_settings(base, concepts, settings)
        if "scale" in settings:
            scale = _parse_scale(settings["scale"])
            try:
                set_ip_scale(base.pipe.unet, [scale] * len(concepts))
            except (ValueError, KeyError) as e:
                raise LimnerError(f"scale: {e}") from e

    def encode(self, base: Base, adapter: Path, subject: Subject, out: Path, **settings: Any) -> Path:
        """Encodes the subject's references with the adapter's image encoder into a concept folder: the features
        of the references and of the unconditional input, as diffusers' `ip_adapter_image_embeds` takes them."""
        t0 = time.perf_counter()
        cfg = with_settings(IPAdapterSettings(), settings, self.name)
        adapter, out = Path(adapter), Path(out)
        images = _check_references(subject.images[: cfg.num_references], f"subject {subject.name}")
        manifest = read_adapter_manifest(adapter) if (adapter / ADAPTER_MANIFEST).is_file() else {}
        images, cfg.mask_references = _as_pretrained(images, subject, cfg.mask_references, manifest)
        weights = read_adapter_weights(adapter, cfg.allow_pickle)
        encoder_folder = find_image_encoder(base, adapter, cfg.image_encoder)
        wanted = manifest.get("image_encoder_fingerprint")
        found = encoder_fingerprint(encoder_folder)
        if wanted and wanted != found:
            raise LimnerError(
                f"adapter {adapter} was pretrained with image encoder {wanted}, but {encoder_folder} is {found}; "
                "give the one it was trained with (--set image_encoder=DIR)"
            )
        encoder = ImageEncoder(encoder_folder, base.device)
        variant = check_fits(base.pipe.unet, weights, adapter, encoder.width(detect_variant(weights["image_proj"])))
        if "variant" in settings and settings["variant"] != variant:
            raise LimnerError(f"variant={settings['variant']}: adapter {adapter} is a {variant} adapter")
        load_projection(weights, adapter)  # every image_proj key is one diffusers reads
        pixels = encoder.pixels(images)
        positive, negative = encoder.features(pixels, variant).float(), encoder.unconditional(pixels, variant).float()
        if cfg.references == "mean":
            positive, negative = positive.mean(0, keepdim=True), negative[:1]
        tuned = None
        if cfg.finetune_steps:
            tuned = self._finetune(base, encoder, weights, replace(cfg, variant=variant), subject, images, out)
        return self._write_concept(
            base, adapter, subject, out, cfg, variant, images, positive, negative, t0, found, tuned
        )

    def _finetune(self, base, encoder, weights, cfg, subject, conditions, out) -> dict[str, torch.Tensor]:
        """The adapter trained on (reference, another reference as image prompt) pairs of this subject alone."""
        from limner.data import Sample

        texts = subject.captions or [""] * len(subject.images)
        n = len(conditions)
        samples = [
            Sample(
                image=np.asarray(subject.images[i]),
                text=f"a {subject.class_noun} {texts[i]}".strip(),
                references=[conditions[(i + 1) % n]],
            )
            for i in range(n)
        ]
        train_cfg = replace(
            pretrain_defaults(),
            max_steps=cfg.finetune_steps,
            batch_size=min(4, n),
            learning_rate=cfg.finetune_learning_rate,
            checkpoint_every=0,
        )
        task = _Pretraining(base, encoder, cfg, train_cfg, weights=weights)
        try:
            train(task, _batches(samples, base, encoder, train_cfg.batch_size), train_cfg, out, "ip_adapter finetune")
            return official_state(task.projection, base.pipe.unet)
        finally:
            detach(base.pipe.unet)
            base.pipe.unet.requires_grad_(False)

    def _write_concept(
        self, base, adapter, subject, out, cfg, variant, images, positive, negative, t0, encoder_fp, tuned=None
    ):
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        with disk_guard(f"the concept in {out}"):
            write_references(out, images)
            embeds = {
                "image_embeds": positive.cpu().contiguous(),
                "negative_image_embeds": negative.cpu().contiguous(),
            }
            with written_atomically(out / EMBEDS) as tmp:
                save_file(embeds, str(tmp), metadata={"variant": variant})
            if tuned is not None:  # the concept's own adapter, in the official layout (diffusers loads it too)
                save_adapter_weights(tuned, out / WEIGHTS)
            manifest = encoded_concept_manifest(
                self.name,
                base,
                adapter,
                subject,
                cfg,
                t0,
                variant=variant,
                image_encoder_fingerprint=encoder_fp,
                num_references=len(images),
                adapter_weights=WEIGHTS if tuned is not None else None,
            )
            write_concept_manifest(out, manifest)
        return out

    # ---- generation --------------------------------------------------------------------------------------------

    def install(self, base: Base, concepts: list[Path], regions: list[str] | None = None) -> Installation:
        """One adapter slot per concept (diffusers' several IP-Adapters side by side), each concept's scale."""
        unet = base.pipe.unet
        projections, states, scales = [], [], []
        for concept in concepts:
            manifest = read_manifest(concept)
            adapter = encoded_with(concept, manifest)
            config = manifest.get("config", {})
            own = manifest.get("adapter_weights")  # fine-tuned: the concept's own copy of the adapter
            source = child(Path(concept), own, f"concept {concept}'s adapter_weights") if own else adapter
            weights = read_adapter_weights(source, pickle_opt_in() and not own)
            check_fits(unet, weights, source)
            projections.append(load_projection(weights, source))
            states.append(weights)
            scales.append(_parse_scale(config.get("scale", 1.0)))
        attach(unet, projections, states, for_generation=True)
        installation = Installation(undo=[lambda: detach(unet)])
        try:
            set_ip_scale(unet, scales)
        except (ValueError, KeyError) as e:
            installation.uninstall()
            raise LimnerError(f"scale: {e}") from e
        return installation

    def condition(self, base: Base, concepts: list[Path], prompt: str) -> dict[str, Any]:
        """`ip_adapter_image_embeds` as diffusers' pipeline takes them under classifier-free guidance: per
        concept [negative; positive] ([2, n_images, d] or [2, n_images, tokens, d]); limner.generation
        repeats each half for a batch."""
        from safetensors.torch import load_file

        unet = base.pipe.unet
        param = next(unet.parameters())
        embeds = []
        for concept in concepts:
            e = load_file(str(Path(concept) / EMBEDS))
            both = torch.stack([e["negative_image_embeds"], e["image_embeds"]])
            embeds.append(both.to(param.device, param.dtype))
        return {"ip_adapter_image_embeds": embeds}

    def prompt(self, template: str, concept: Path) -> str:
        return template.format(read_manifest(concept)["class_noun"])


__all__ = [
    "VARIANTS",
    "IPAdapter",
    "IPAdapterSettings",
    "ImageEncoder",
    "check_fits",
    "detect_variant",
    "official_state",
    "read_adapter_weights",
    "read_reference_files",
]
