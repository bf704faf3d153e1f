"""BLIP-Diffusion (Li, Li and Hoi, 2023): pre-trained subject representation for controllable text-to-image
generation and editing.

The paper's idea: a multimodal encoder, pretrained to give a *subject representation* aligned with text, lets a
diffusion model draw a new subject zero-shot from one or a few pictures, or after a few dozen fine-tuning steps.

- **Subject encoder** (qformer.py): BLIP-2's Q-Former. 16 learned queries read the frozen image encoder's
  features through cross-attention in every layer, together with the subject's class text ("dog"); the paper's
  ProjLayer turns the query outputs into 16 *subject embeddings* in the text encoder's embedding space.
- **Context-aware text encoder** (context_text.py): the subject embeddings are inserted into the prompt's token
  embeddings before the CLIP text transformer, right after "a" (ctx_begin_pos = 2), and the prompt is the
  official "a {subject} {prompt}" repeated 20 times within the text budget the embeddings leave.
- **Stage 1, multimodal representation learning**: the Q-Former learns BLIP-2's image-text contrastive (ITC)
  and image-grounded text generation (ITG) objectives on image-caption pairs, the image encoder frozen.
- **Stage 2, subject representation learning by prompted context generation**: the input is the subject cut out
  with its mask and pasted on a random background, the target is the original scene; the Q-Former, ProjLayer
  and UNet learn the denoising loss of the target conditioned on the caption with the subject embeddings in it,
  the subject embeddings dropped 15% of the time. The image encoder stays frozen, and so does the text encoder,
  as in the official code (`sd_train_text_encoder=False`). The UNet's delta is a LoRA here (the shipped adapter
  stays small).
- **Use**: zero-shot, the subject embeddings of 1-5 references averaged; or the paper's few-shot fine-tune, in
  which the averaged embeddings become a trainable cache (`ctx_embeddings_cache`) and train with the UNet on the
  subject's own pictures, captioned "a {subject}" (about 40 steps, batch 3; the paper's lr 5e-6 trains SD's whole
  UNet, limner's default 1e-3 the world's LoRA and embeddings).

Files (formats.py): limner's small adapter folder, and diffusers' `BlipDiffusionPipeline` folder, written by
`export` and read as an adapter. A concept holds the subject embeddings (`ctx_embeddings.safetensors`), the
references, and, when fine-tuned, its own copy of the UNet's LoRA.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from limner.adapters.lora import load_diffusers_lora, remove_named_lora
from limner.concepts import read_manifest
from limner.errors import LimnerError
from limner.images import to_unit_range
from limner.io import child, disk_guard, written_atomically
from limner.methods.adapter import (
    ADAPTER_MANIFEST,
    AdapterMethod,
    encoded_concept_manifest,
    encoded_with,
    read_adapter_manifest,
    started_from,
    thin_curve,
    write_adapter_manifest,
    write_concept_manifest,
    write_references,
)
from limner.methods.base import Capabilities, Installation
from limner.methods.blip_diffusion import formats
from limner.methods.blip_diffusion.context_text import (
    CTX_BEGIN_POS,
    PROMPT_REPS,
    build_prompt,
    encode_with_context,
    tokenize_with_context,
)
from limner.methods.blip_diffusion.qformer import (
    Stage1Heads,
    SubjectEncoder,
    build_bert_tokenizer,
    itc_loss,
    itg_loss,
    world_words,
)
from limner.methods.registry import register
from limner.methods.settings import recipe_setting, setting, with_settings
from limner.subject import Subject
from limner.training import TrainConfig, TrainingTask, is_main_process, noise_scheduler, split_train_settings, train
from limner.training.data import fit_square, sample_latents
from limner.training.losses import denoising_loss

if TYPE_CHECKING:
    from limner.models.loading import Base

EMBEDS = "ctx_embeddings.safetensors"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_NAME = "blip_diffusion"
MIN_SUBJECT_PIXELS = 16  # a mask with fewer pixels than this shows no subject


@dataclass
class BlipDiffusionSettings:
    prompt_reps: int = setting(PROMPT_REPS, "how many times the official prompt repeats 'a {subject} {prompt}'")
    prompt_strength: float = setting(1.0, "scales prompt_reps, as the official pipeline's prompt_strength")
    num_references: int | None = setting(None, "use only the subject's first N reference images (None: all)")
    finetune_steps: int = setting(
        0,
        "the paper's few-shot fine-tune: steps of the cached subject embeddings and the UNet's LoRA on the "
        "subject's own pictures (0: zero-shot; the paper: about 40)",
    )
    finetune_learning_rate: float = setting(
        1e-3,
        "the fine-tune's learning rate: limner's 1e-3 for the world's LoRA and embeddings; the paper's 5e-6 (for SD's "
        "whole UNet) moves them too little to see on the world (docs/world-bench-blip)",
    )
    finetune_batch_size: int = setting(3, "the fine-tune's batch (the paper's 3)")
    layout_fraction: float = setting(
        0.2,
        "share of the denoising steps drawn from the prompt's words alone before the subject embeddings take over "
        "(limner's, as its Textual Inversion's; the paper: 0): the accessories and colours a prompt asks for settle "
        "first (docs/world-bench-blip)",
        added=True,
        at_least=0,
        below=1,
    )
    recipe: str = recipe_setting()
    # pretraining
    stage1_steps: int = setting(300, "pretrain: steps of stage 1 (ITC + ITG) before stage 2's --steps")
    stage1_learning_rate: float = setting(1e-4, "pretrain: stage 1's AdamW learning rate")
    drop_subject: float = setting(0.15, "pretrain, stage 2: share of samples without subject embeddings (paper: 0.15)")
    lora_rank: int = setting(16, "pretrain: rank of the UNet's LoRA that carries stage 2's UNet delta")
    qformer_layers: int = setting(2, "pretrain: Q-Former layers (BLIP-2: 12)")
    qformer_intermediate: int = setting(512, "pretrain: the Q-Former's feed-forward width (BLIP-2: 3072)")
    image_encoder: str | None = setting(
        None, "pretrain: the frozen image encoder, a CLIP vision model folder (default: the base's image_encoder/)"
    )
    captions: str | None = setting(
        None,
        "pretrain, stage 2 on the world: class (no colours or emblem: the subject embeddings must carry the "
        "looks) or full; None: class on the world, your data's captions otherwise",
    )
    init: str | None = setting(
        None,
        "pretrain: continue stage 2 from this adapter's Q-Former and UNet LoRA (a folder limner pretrained, with the "
        "same lora_rank and Q-Former size); stage 1 is then skipped. A resumed run continues from its checkpoint",
        added=True,
    )

    def __post_init__(self) -> None:
        for name in ("prompt_reps", "finetune_batch_size", "lora_rank", "qformer_layers", "qformer_intermediate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LimnerError(f"{name} must be a whole number, 1 or more, got {value!r}")
        for name in ("finetune_steps", "stage1_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LimnerError(f"{name} must be a whole number, 0 or more, got {value!r}")
        if self.num_references is not None and (isinstance(self.num_references, bool) or self.num_references < 1):
            raise LimnerError(f"num_references must be at least 1, got {self.num_references}")
        if not self.prompt_strength > 0 or int(self.prompt_strength * self.prompt_reps) < 1:
            raise LimnerError(f"prompt_strength {self.prompt_strength} x prompt_reps must leave at least one prompt")
        for name in ("finetune_learning_rate", "stage1_learning_rate"):
            if not getattr(self, name) > 0:
                raise LimnerError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.drop_subject <= 1:
            raise LimnerError(f"drop_subject {self.drop_subject} must be between 0 and 1")
        if self.captions not in (None, "full", "class"):
            raise LimnerError(f"captions {self.captions!r}: choose full or class")


def pretrain_defaults() -> TrainConfig:
    """Stage 2's trainer: AdamW, lr 1e-4 for the Q-Former and the LoRA at the world's size, batch 8."""
    return TrainConfig(max_steps=1000, batch_size=8, learning_rate=1e-4, weight_decay=0.01, checkpoint_every=200)


# ---------------------------------------------------------------------------------------------------------------
# Pictures in
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePrep:
    """The image encoder's preprocessing (BlipImageProcessor's): bicubic resize to its side, then normalise."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def for_encoder(cls, encoder: SubjectEncoder, folder: Path | None) -> ImagePrep:
        """The side from the encoder's config; mean and std from `folder`'s preprocessor_config.json where given."""
        mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's
        config = Path(folder) / "preprocessor_config.json" if folder is not None else None
        if config is not None and config.is_file():
            data = json.loads(config.read_text())
            mean, std = tuple(data.get("image_mean", mean)), tuple(data.get("image_std", std))
        return cls(int(encoder.config.vision_config.image_size), mean, std)

    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        from PIL import Image

        arrays = [
            np.asarray(Image.fromarray(np.asarray(im)).resize((self.size, self.size), Image.BICUBIC), np.float32)
            for im in images
        ]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
        mean, std = torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def as_config(self) -> dict:
        return {
            "size": {"height": self.size, "width": self.size},
            "image_mean": list(self.mean),
            "image_std": list(self.std),
        }


def on_random_background(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stage 2's input: the subject cut out with its mask and pasted on a random world background."""
    from PIL import Image

    from limner.world import vocab
    from limner.world.render import draw_background

    context = str(rng.choice(list(vocab.CONTEXTS)))
    h, w = image.shape[:2]
    background = np.asarray(draw_background(context, rng).convert("RGB").resize((w, h), Image.BILINEAR))
    mask = np.asarray(mask, bool)
    if mask.shape != (h, w):
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    return np.where(mask[..., None], image, background).astype(np.uint8)


def subject_text(sample: Any) -> str:
    """The class noun a sample shows: the world's subject key names it ("instance:ball:..."); a caption's word
    after its article otherwise."""
    key = getattr(sample, "subject", None)
    if isinstance(key, str) and key.count(":") >= 2:
        return key.split(":")[1]
    words = str(sample.text).split()
    for i, w in enumerate(words[:-1]):
        if w.lower() in ("a", "an", "the"):
            return words[i + 1].strip(",.")
    return words[0] if words else ""


def check_references(subject: Subject, count: int | None) -> list[np.ndarray]:
    """The references to encode; a clear error for one that shows no subject (an empty mask, a blank picture)."""
    images = list(subject.images[:count])
    if not images:
        raise LimnerError(f"subject {subject.name}: no reference image; BLIP-Diffusion encodes 1 to 5 pictures")
    masks = list(subject.masks or [])[: len(images)]
    masks += [None] * (len(images) - len(masks))
    checked = []
    for i, (im, mask) in enumerate(zip(images, masks)):
        a = np.asarray(im)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise LimnerError(f"subject {subject.name}: reference {i} is not an RGB picture ({a.shape}, {a.dtype})")
        if mask is not None and int(np.asarray(mask, bool).sum()) < MIN_SUBJECT_PIXELS:
            raise LimnerError(
                f"subject {subject.name}: reference {i} shows no subject (its mask covers "
                f"{int(np.asarray(mask, bool).sum())} pixels): it is all background; give pictures of the subject"
            )
        if float(a.reshape(-1, 3).std(0).max()) < 1.0:
            raise LimnerError(
                f"subject {subject.name}: reference {i} is one flat colour: it shows no subject; give pictures of it"
            )
        checked.append(a)
    return checked


# ---------------------------------------------------------------------------------------------------------------
# Pretraining: the two stages
# ---------------------------------------------------------------------------------------------------------------


FROZEN_IMAGE_ENCODER = "visual_encoder."  # the base's image encoder inside the subject encoder: never trained


def encoder_state(encoder: SubjectEncoder) -> dict[str, torch.Tensor]:
    """The subject encoder's weights for a checkpoint: all but its frozen image encoder's (the base's, 12 MiB of
    the world's 23 that every checkpoint and its in-memory copy would otherwise repeat)."""
    state = encoder.state_dict()
    return {f"qformer.{k}": v.detach().clone() for k, v in state.items() if not k.startswith(FROZEN_IMAGE_ENCODER)}


def load_encoder_state(encoder: SubjectEncoder, state: dict[str, torch.Tensor]) -> None:
    """A checkpoint's subject encoder weights back in place (checkpoints that still hold the frozen image encoder's
    load too); anything else missing or unknown is an error naming the first keys."""
    weights = {k.removeprefix("qformer."): v for k, v in state.items() if k.startswith("qformer.")}
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith(FROZEN_IMAGE_ENCODER)]
    if missing or unexpected:
        raise LimnerError(
            f"the checkpoint's subject encoder does not fit this one: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}; resume with the settings the run was started with"
        )


class Stage1(TrainingTask):
    """BLIP-2's multimodal representation learning: ITC + ITG; the image encoder frozen."""

    def __init__(self, encoder: SubjectEncoder, heads: Stage1Heads):
        self.encoder, self.heads = encoder, heads
        encoder.visual_encoder.requires_grad_(False)
        self.params = [p for n, p in encoder.named_parameters() if not n.startswith(("visual_encoder", "proj_layer"))]
        self.params += list(heads.parameters())
        for p in self.params:
            p.requires_grad_(True)
        self.terms: dict[str, list[float]] = {"itc": [], "itg": []}

    def modules(self) -> dict[str, nn.Module]:
        return {"qformer": self.encoder, "heads": self.heads}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.params

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return encoder_state(self.encoder) | {
            f"heads.{k}": v.detach().clone() for k, v in self.heads.state_dict().items()
        }

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        load_encoder_state(self.encoder, state)
        self.heads.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("heads.")})

    def loss_terms(self, batch: dict) -> dict[str, torch.Tensor]:
        features = self.encoder.image_features(batch["pixels"])
        return {
            "itc": itc_loss(self.encoder, self.heads, features, batch["texts"]),
            "itg": itg_loss(self.encoder, self.heads, features, batch["texts"]),
        }

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        terms = self.loss_terms(batch)
        for k, v in terms.items():
            self.terms[k].append(round(float(v.detach()), 5))
        return sum(terms.values())


class Stage2(TrainingTask):
    """Prompted context generation: denoise the original scene from the caption with the subject embeddings of
    the subject cut out on a random background; the Q-Former, ProjLayer and the UNet's LoRA learn."""

    def __init__(
        self, base: Base, encoder: SubjectEncoder, cfg: BlipDiffusionSettings, ctx_cache: nn.Parameter | None = None
    ):
        """`ctx_cache`: the few-shot fine-tune's trainable subject embeddings, used in place of the encoder's."""
        self.base, self.encoder, self.cfg, self.ctx_cache = base, encoder, cfg, ctx_cache
        pipe = base.pipe
        for m in (pipe.vae, pipe.text_encoder, encoder):
            m.requires_grad_(False)
        self.lora = [p for n, p in pipe.unet.named_parameters() if "lora_" in n]
        if ctx_cache is None:
            self.params = [p for n, p in encoder.named_parameters() if not n.startswith("visual_encoder")]
        else:
            self.params = [ctx_cache]
        self.params += self.lora
        for p in self.params:
            p.data = p.data.float()
            p.requires_grad_(True)
        self.scheduler = noise_scheduler(pipe)
        self.terms: dict[str, list[float]] = {"denoise": []}

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.base.pipe.unet, **({"qformer": self.encoder} if self.ctx_cache is None else {})}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"vae": self.base.pipe.vae, "text_encoder": self.base.pipe.text_encoder}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.params

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {n: p.detach().clone() for n, p in self.base.pipe.unet.named_parameters() if "lora_" in n}
        state = {f"unet.{k}": v for k, v in state.items()}
        if self.ctx_cache is not None:
            return state | {"ctx_cache": self.ctx_cache.detach().clone()}
        return state | encoder_state(self.encoder)

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        named = dict(self.base.pipe.unet.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                if k.startswith("unet."):
                    named[k[5:]].copy_(v)
                elif k == "ctx_cache":
                    self.ctx_cache.copy_(v)
        if self.ctx_cache is None:
            load_encoder_state(self.encoder, state)

    def conditioning(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The context-aware text embeddings of the batch's captions, the subject embeddings dropped for
        cfg.drop_subject of them (their plain caption at the full length instead)."""
        pipe = self.base.pipe
        n = self.encoder.num_query_tokens
        if self.ctx_cache is not None:
            ctx = self.ctx_cache.expand(len(batch["texts"]), -1, -1)
        else:
            ctx = self.wrapped["qformer"](batch["pixels"], batch["subjects"])
        texts = batch["texts"]
        drop = torch.rand(len(texts), generator=generator) < self.cfg.drop_subject
        if self.ctx_cache is not None:
            drop[:] = False  # the fine-tune always conditions on its cache
        keep = (~drop).nonzero().flatten().tolist()
        cond = [None] * len(texts)
        if keep:  # the captions with the subject embeddings inserted, in one pass of the text encoder
            ids = tokenize_with_context(pipe.tokenizer, [texts[i] for i in keep], n)
            for i, row in zip(keep, encode_with_context(pipe.text_encoder, ids, ctx[keep])):
                cond[i] = row
        dropped = drop.nonzero().flatten().tolist()
        if dropped:  # the plain captions at the full length
            ids = pipe.tokenizer(
                [texts[i] for i in dropped], padding="max_length", truncation=True, return_tensors="pt"
            ).input_ids
            for i, row in zip(dropped, encode_with_context(pipe.text_encoder, ids, None)):
                cond[i] = row
        return torch.stack(cond)

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        vae = self.base.pipe.vae
        with torch.no_grad():
            latents = sample_latents(vae, batch["images"], generator)
        cond = self.conditioning(batch, generator)
        loss = denoising_loss(self.wrapped["unet"], self.scheduler, latents, cond.to(latents.dtype), generator)
        self.terms["denoise"].append(round(float(loss.detach()), 5))
        return loss


def _reader(stream: Any):
    """The next sample of `stream`, started again where a finite one ends (made at the first call: after the loop
    has put a resumed stream back where it was)."""
    iterator = None

    def next_sample():
        nonlocal iterator
        for attempt in range(2):
            if iterator is None:
                iterator = iter(stream)
            try:
                return next(iterator)
            except StopIteration:
                iterator = None
                if attempt:
                    break
        raise LimnerError(f"the pretraining data has no usable sample ({_describe(stream)})")

    return next_sample


def stage1_batches(stream: Any, prep: ImagePrep, batch_size: int):
    """Stage 1's batches: each sample's picture and its caption."""
    next_sample = _reader(stream)

    def next_batch(generator: torch.Generator) -> dict:
        samples = [next_sample() for _ in range(batch_size)]
        return {"pixels": prep([np.asarray(s.image) for s in samples]), "texts": [s.text for s in samples]}

    return next_batch


def stage2_batches(stream: Any, prep: ImagePrep, resolution: int, batch_size: int):
    """Stage 2's batches: the subject cut out on a random background (the input; the picture itself where a
    sample has no mask), the original scene (the target), the caption and the subject's class text."""
    next_sample = _reader(stream)

    def next_batch(generator: torch.Generator) -> dict:
        samples = [next_sample() for _ in range(batch_size)]
        rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator)))
        inputs = [
            on_random_background(np.asarray(s.image), s.mask, rng) if s.mask is not None else np.asarray(s.image)
            for s in samples
        ]
        return {
            "images": to_unit_range(np.stack([fit_square(np.asarray(s.image), resolution) for s in samples])),
            "pixels": prep(inputs),
            "texts": [s.text for s in samples],
            "subjects": [subject_text(s) for s in samples],
        }

    return next_batch


def _describe(stream: Any) -> Any:
    describe = getattr(stream, "describe", None)
    return describe() if callable(describe) else type(stream).__name__


def _open_data(data: Any, base: Base, seed: int, captions: str) -> Any:
    """A data stream: given (anything iterable over samples), or opened from a spec by limner.data, this process's
    share of it under `accelerate launch`."""
    if not isinstance(data, (str, Path)):
        return data
    from accelerate import PartialState

    from limner.data import open_stream

    state = PartialState(cpu=torch.device(base.device).type == "cpu")  # as IP-Adapter's: see ip_adapter._open_data
    return open_stream(
        str(data),
        seed=seed,
        rank=state.process_index,
        world_size=state.num_processes,
        resolution=base.resolution,
        pair="self",
        captions=captions,
    )


# ---------------------------------------------------------------------------------------------------------------
# The UNet's LoRA
# ---------------------------------------------------------------------------------------------------------------


def unet_lora_state(unet: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter_name))


def save_unet_lora(state: dict[str, torch.Tensor], folder: Path) -> None:
    """The UNet's LoRA as diffusers' `save_lora_weights` lays it out (`unet.` + its converted keys), fp16."""
    from safetensors.torch import save_file

    half = {f"unet.{k}": v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    with written_atomically(Path(folder) / formats.LORA_FILE) as tmp:
        save_file(half, str(tmp), metadata={"format": "pt"})


def copy_unet_lora(unet: nn.Module, folder: Path, adapter_name: str = "default") -> None:
    """The LoRA file's weights into the UNet's adapter `adapter_name`, which must have its keys and shapes (a
    continued pretraining trains on from them): the file's keys are the ones unet_lora_state() writes."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    given = {k.removeprefix("unet."): v for k, v in load_file(str(Path(folder) / formats.LORA_FILE)).items()}
    wanted = unet_lora_state(unet, adapter_name)
    unfit = sorted(
        k
        for k in wanted.keys() | given.keys()
        if k not in given or k not in wanted or given[k].shape != wanted[k].shape
    )
    if unfit:
        raise LimnerError(
            f"the LoRA in {folder} does not fit this run ({len(unfit)} weights missing or of another shape, e.g. "
            f"{unfit[0]}): set lora_rank as it was pretrained (its adapter.json records it)"
        )
    set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(given), adapter_name=adapter_name)


def load_unet_lora(pipe, folder: Path, name: str) -> None:
    """The LoRA file into the UNet alone, as adapter `name` beside any LoRA already active there (diffusers' loader,
    without the text encoder's pass, which has nothing to load and says so)."""
    from safetensors.torch import load_file

    load_diffusers_lora(pipe.unet, name, load_file(str(Path(folder) / formats.LORA_FILE)))


# ---------------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------------


@register
class BlipDiffusion(AdapterMethod):
    """Subject embeddings from a BLIP-2 Q-Former, inserted into the prompt before the text encoder."""

    name = "blip_diffusion"
    family = "encoder"
    capabilities = Capabilities(needs_adapter=True, reads_masks=True)
    config_cls = BlipDiffusionSettings
    # the subject embeddings outweigh the words around them: the first fifth of the steps from the words alone
    # keeps the accessories and colours a prompt asks for (0.650 -> 0.788 prompt fidelity, docs/world-bench-blip)
    layout_fraction = BlipDiffusionSettings.layout_fraction  # the setting's default, one number
    acts_on_every_prompt = True

    # ---- the subject encoder of an adapter ---------------------------------------------------------------------

    def load_encoder(self, base: Base, adapter: Path) -> tuple[SubjectEncoder, ImagePrep]:
        adapter = Path(adapter)
        if formats.is_pipeline_folder(adapter):
            encoder = formats.read_pipeline_encoder(adapter)
            prep = ImagePrep.for_encoder(encoder, adapter / "image_processor")
        else:
            manifest = read_adapter_manifest(adapter)
            given = manifest.get("settings", {}).get("image_encoder")
            image_encoder = Path(given) if given else Path(base.path) / "image_encoder"
            encoder = _adapter_encoder(adapter, image_encoder)
            prep = ImagePrep.for_encoder(encoder, image_encoder.parent / "feature_extractor")
        return encoder.to(base.device).eval(), prep

    # ---- pretraining -------------------------------------------------------------------------------------------

    def pretrain(self, base: Base, data: Any, out: Path, **settings: Any) -> Path:
        """Stage 1 (ITC + ITG, `stage1_steps`) then stage 2 (prompted context generation, the trainer's
        max_steps) on `data` (a spec for limner.data.open_stream, or a stream of samples with image, text, mask,
        subject); writes the adapter folder `out`. `resume=latest` resumes whichever stage was running."""
        out = Path(out)
        train_cfg = settings.pop("train", None) or pretrain_defaults()
        train_cfg, rest = split_train_settings(train_cfg, settings)
        cfg = with_settings(BlipDiffusionSettings(), rest, self.name)
        world = isinstance(data, str) and data == "world"
        cfg.captions = cfg.captions or ("class" if world else "full")
        image_encoder = (
            Path(cfg.image_encoder).expanduser() if cfg.image_encoder else Path(base.path) / "image_encoder"
        )
        origin = started_from(cfg.init, out)
        if cfg.init is not None:
            encoder, heads = self._starting_encoder(cfg, image_encoder), None
            cfg.stage1_steps = 0  # the Q-Former has learned its representation: only stage 2 goes on
        else:
            encoder, heads = self._new_encoder(cfg, base, image_encoder, train_cfg.seed)
        encoder = encoder.to(base.device)
        prep = ImagePrep.for_encoder(encoder, image_encoder.parent / "feature_extractor")
        t0 = time.perf_counter()
        logs = {}
        if cfg.stage1_steps:
            stream1 = _open_data(data, base, train_cfg.seed, "full")
            cfg1 = replace(train_cfg, max_steps=cfg.stage1_steps, learning_rate=cfg.stage1_learning_rate)
            task1 = Stage1(encoder, heads.to(base.device))
            data1 = stream1 if callable(getattr(stream1, "state_dict", None)) else None
            logs["stage1"] = train(
                task1,
                stage1_batches(stream1, prep, cfg1.batch_size),
                cfg1,
                out / "stage1",
                "blip_diffusion stage 1",
                data=data1,
            )
            logs["stage1"].terms = task1.terms
        from limner.adapters.lora import add_lora

        unet = base.pipe.unet
        stream2 = _open_data(data, base, train_cfg.seed + 1, cfg.captions)
        try:
            add_lora(unet, cfg.lora_rank, cfg.lora_rank, UNET_TARGETS)
            if cfg.init is not None:
                copy_unet_lora(unet, Path(cfg.init).expanduser())
            task2 = Stage2(base, encoder, cfg)
            data2 = stream2 if callable(getattr(stream2, "state_dict", None)) else None
            batches = stage2_batches(stream2, prep, base.resolution, train_cfg.batch_size)
            logs["stage2"] = train(task2, batches, train_cfg, out / "stage2", "blip_diffusion stage 2", data=data2)
            logs["stage2"].terms = task2.terms
            lora = unet_lora_state(unet)
        finally:
            remove_named_lora(unet, "default")
        if is_main_process():
            with disk_guard(f"the adapter in {out}"):
                formats.save_adapter_encoder(encoder.cpu(), out)
                save_unet_lora(lora, out)
                write_adapter_manifest(
                    out,
                    self.name,
                    base,
                    image_encoder_fingerprint=_fingerprint(image_encoder),
                    data=_describe(stream2),
                    steps={k: v.steps for k, v in logs.items()},
                    seconds={k: round(v.seconds, 2) for k, v in logs.items()},
                    wall_seconds=round(time.perf_counter() - t0, 2),
                    curve={k: thin_curve(v.curve) for k, v in logs.items()},
                    settings=asdict(cfg),
                    train=asdict(train_cfg),
                    started_from=origin,
                )
        return out

    @staticmethod
    def _new_encoder(cfg: BlipDiffusionSettings, base: Base, image_encoder: Path, seed: int):
        """A fresh Q-Former over the frozen image encoder, and stage 1's heads, drawn from `seed`."""
        tokenizer = build_bert_tokenizer(world_words())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = formats.new_subject_encoder(
                image_encoder,
                tokenizer,
                num_hidden_layers=cfg.qformer_layers,
                intermediate_size=cfg.qformer_intermediate,
                hidden_size=int(base.pipe.text_encoder.config.hidden_size),
                max_text_positions=32,
            )
            heads = Stage1Heads(encoder.config.qformer_config.hidden_size)
        return encoder, heads

    @staticmethod
    def _starting_encoder(cfg: BlipDiffusionSettings, image_encoder: Path) -> SubjectEncoder:
        """`init`'s Q-Former, checked to be the size these settings train."""
        where = Path(cfg.init).expanduser()
        if formats.is_pipeline_folder(where) or not (where / ADAPTER_MANIFEST).is_file():
            raise LimnerError(f"init={where}: start from an adapter folder limner pretrained (with its adapter.json)")
        encoder = _adapter_encoder(where, image_encoder)
        qformer = encoder.config.qformer_config
        if (qformer.num_hidden_layers, qformer.intermediate_size) != (cfg.qformer_layers, cfg.qformer_intermediate):
            raise LimnerError(
                f"init={where} has a Q-Former of {qformer.num_hidden_layers} layers, feed-forward "
                f"{qformer.intermediate_size}; set qformer_layers and qformer_intermediate to those"
            )
        return encoder

    # ---- diffusers' folder ------------------------------------------------------------------------------------

    def export(self, base: Base, adapter: str | Path | None, out: Path) -> Path:
        """The base with the adapter as diffusers' BlipDiffusionPipeline folder: the Q-Former over the frozen image
        encoder, the text encoder as ContextCLIPTextModel, and the stage-2 UNet (the base's with the LoRA merged)."""
        import copy
        from types import SimpleNamespace

        adapter = self.adapter_for(base, adapter)
        if formats.is_pipeline_folder(adapter):
            raise LimnerError(f"{adapter} is already a BlipDiffusionPipeline folder; copy it instead of exporting it")
        encoder, prep = self.load_encoder(base, adapter)
        unet = copy.deepcopy(base.pipe.unet)
        from safetensors.torch import load_file

        unet.load_lora_adapter(load_file(str(adapter / formats.LORA_FILE)), prefix="unet", adapter_name=LORA_NAME)
        unet.fuse_lora(adapter_names=[LORA_NAME])
        unet.unload_lora()
        pipe = base.pipe
        parts = SimpleNamespace(
            text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, vae=pipe.vae, unet=unet, scheduler=pipe.scheduler
        )
        return formats.export_pipeline(Path(out), parts, encoder.cpu(), prep.as_config(), CTX_BEGIN_POS)

    # ---- encoding ----------------------------------------------------------------------------------------------

    def recipes(self, num_subjects: int = 1) -> dict[str, dict[str, Any]]:
        """The paper's few-shot fine-tune (the cached subject embedding trained 40 steps at lr 5e-6, batch 3) and
        its generation, the subject embeddings in every step."""
        return {
            "paper": {
                "finetune_steps": 40,
                "finetune_learning_rate": 5e-6,
                "finetune_batch_size": 3,
                "layout_fraction": 0.0,
            }
        }

    def personalize(self, base: Base, subject: Any, out: Path, *, score: Any = None, **overrides: Any) -> Path:
        with_settings(BlipDiffusionSettings(), {k: v for k, v in overrides.items() if k != "adapter"}, self.name)
        return super().personalize(base, subject, out, score=score, **overrides)  # settings fail before any work

    def adapter_for(self, base: Base, adapter: str | Path | None) -> Path:
        """limner's adapter folder (checked as this method's and this base's), or a diffusers BlipDiffusionPipeline
        folder (every component there, qformer/ first)."""
        path = Path(adapter).expanduser() if adapter is not None else self.default_adapter(base)
        if path is not None and (path / "model_index.json").is_file():
            if not formats.is_pipeline_folder(path):
                raise LimnerError(f"{path} is a diffusers folder, but not a BlipDiffusionPipeline's")
            formats.check_pipeline_folder(path)
            return path
        if path is not None and not (path / ADAPTER_MANIFEST).is_file() and path.is_dir():
            raise LimnerError(
                f"{path} is neither a limner BLIP-Diffusion adapter (no {ADAPTER_MANIFEST}) nor a diffusers "
                "BlipDiffusionPipeline folder (no model_index.json)"
            )
        return super().adapter_for(base, path)

    def default_adapter(self, base: Base) -> Path | None:
        """A BlipDiffusionPipeline folder loaded as the base is its own adapter; the world's is the shipped one."""
        if formats.is_pipeline_folder(Path(base.path)):
            return Path(base.path)
        return super().default_adapter(base)

    @torch.no_grad()
    def subject_embeddings(
        self, encoder: SubjectEncoder, prep: ImagePrep, images: list, class_noun: str
    ) -> torch.Tensor:
        """The subject embeddings of each reference, averaged: [1, 16, d] (the official zero-shot and the
        fine-tune's starting cache)."""
        return encoder(prep(images).to(encoder.device), [class_noun] * len(images)).mean(0, keepdim=True)

    def encode(self, base: Base, adapter: Path, subject: Subject, out: Path, **settings: Any) -> Path:
        t0 = time.perf_counter()
        cfg = with_settings(BlipDiffusionSettings(), settings, self.name)
        adapter, out = Path(adapter), Path(out)
        images = check_references(subject, cfg.num_references)
        encoder, prep = self.load_encoder(base, adapter)
        ctx = self.subject_embeddings(encoder, prep, images, subject.class_noun)
        lora = None
        if cfg.finetune_steps:
            ctx, lora = self._finetune(base, adapter, encoder, prep, cfg, subject, images, ctx, out)
        return self._write_concept(base, adapter, subject, out, cfg, images, ctx, lora, t0)

    def _finetune(self, base, adapter, encoder, prep, cfg, subject, images, ctx, out):
        """The paper's few-shot fine-tune: the averaged subject embeddings as a trainable cache, trained with the
        UNet (here its LoRA) on the subject's own pictures captioned "a {subject}"."""
        from limner.data import Sample

        samples = [Sample(image=im, text=f"a {subject.class_noun}", references=[im]) for im in images]
        cache = nn.Parameter(ctx.detach().clone().float())
        train_cfg = TrainConfig(
            max_steps=cfg.finetune_steps,
            batch_size=min(cfg.finetune_batch_size, len(samples)),
            learning_rate=cfg.finetune_learning_rate,
            checkpoint_every=0,
        )
        unet = base.pipe.unet
        restore = self._install_unet(base, adapter, None, LORA_NAME)
        try:
            task = Stage2(base, encoder, replace(cfg, drop_subject=0.0), ctx_cache=cache)
            stream = _Cycle(samples)
            batches = stage2_batches(stream, prep, base.resolution, train_cfg.batch_size)
            train(task, batches, train_cfg, out / "finetune", "blip_diffusion fine-tune")
            lora = unet_lora_state(unet, LORA_NAME) if task.lora else None
        finally:
            restore()
        return cache.detach(), lora

    def _write_concept(self, base, adapter, subject, out, cfg, images, ctx, lora, t0) -> Path:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        with disk_guard(f"the concept in {out}"):
            write_references(out, images)
            with written_atomically(out / EMBEDS) as tmp:
                save_file({"ctx_embeddings": ctx.detach().float().cpu().contiguous()}, str(tmp))
            if lora is not None:
                save_unet_lora(lora, out)
            manifest = encoded_concept_manifest(
                self.name,
                base,
                adapter,
                subject,
                cfg,
                t0,
                steps=cfg.finetune_steps,
                num_references=len(images),
                unet_lora=formats.LORA_FILE if lora is not None else None,
            )
            write_concept_manifest(out, manifest)
        return out

    # ---- generation --------------------------------------------------------------------------------------------

    def _install_unet(self, base: Base, adapter: Path, concept: Path | None, name: str):
        """The adapter's UNet delta into the base: limner's LoRA (the concept's own, when fine-tuned), or a
        diffusers folder's whole UNet; returns what undoes it."""
        pipe = base.pipe
        own = concept is not None and read_manifest(concept).get("unet_lora")
        if own:
            child(Path(concept), own, f"concept {concept}'s unet_lora")
            load_unet_lora(pipe, Path(concept), name)
            return lambda: remove_named_lora(pipe.unet, name)
        if formats.is_pipeline_folder(adapter):
            if Path(adapter).resolve() == Path(base.path).resolve():  # loaded as the base: already in place
                return lambda: None
            return _swap_in_pipeline_weights(pipe, adapter)
        load_unet_lora(pipe, adapter, name)
        return lambda: remove_named_lora(pipe.unet, name)

    def install(self, base: Base, concepts: list[Path], regions: list[str] | None = None) -> Installation:
        if len(concepts) != 1:
            raise LimnerError(
                f"blip_diffusion draws one subject per image: {len(concepts)} of its concepts were given together"
            )
        if regions:
            raise LimnerError(
                "blip_diffusion concepts do not take regional prompts: its subject enters the whole prompt"
            )
        (concept,) = concepts
        adapter = encoded_with(concept, read_manifest(concept))
        undo = self._install_unet(base, adapter, concept, LORA_NAME)
        return Installation(undo=[undo])

    def condition(self, base: Base, concepts: list[Path], prompt: str) -> dict[str, Any]:
        """`prompt_embeds`: the official prompt built around `prompt` (which the bench templates start with
        "a {subject}") with the concept's subject embeddings inserted at ctx_begin_pos."""
        from safetensors.torch import load_file

        (concept,) = concepts
        manifest = read_manifest(concept)
        config = manifest.get("config", {})
        ctx = load_file(str(Path(concept) / EMBEDS))["ctx_embeddings"]
        text = official_prompt(
            prompt, manifest["class_noun"], config.get("prompt_reps", PROMPT_REPS), config.get("prompt_strength", 1.0)
        )
        pipe = base.pipe
        ids = tokenize_with_context(pipe.tokenizer, [text], ctx.shape[1])
        param = next(pipe.text_encoder.parameters())
        with torch.no_grad():
            embeds = encode_with_context(pipe.text_encoder, ids, ctx.to(param.device, param.dtype), CTX_BEGIN_POS)
        return {"prompt_embeds": embeds}

    def prompt(self, template: str, concept: Path) -> str:
        return template.format(read_manifest(concept)["class_noun"])


def official_prompt(prompt: str, class_noun: str, reps: int = PROMPT_REPS, strength: float = 1.0) -> str:
    """The official prompt for a limner prompt: one that starts "a {class_noun}" (what `prompt` gives for a bench
    template) has the rest as the official text prompt; any other is the text prompt after "a {class_noun}"."""
    head = f"a {class_noun}"
    starts = re.match(rf"{re.escape(head)}\b", prompt.strip(), re.IGNORECASE)  # "a ballerina" is not "a ball"
    rest = prompt.strip()[len(head) :] if starts else prompt
    return build_prompt(rest, class_noun, strength, reps)


class _Cycle:
    """The subject's pictures, round and round (the fine-tune's data)."""

    def __init__(self, samples: list):
        self.samples = samples

    def __iter__(self):
        while True:
            yield from self.samples


def _swap_in_pipeline_weights(pipe, folder: Path):
    """A diffusers BlipDiffusionPipeline folder's UNet and text encoder weights into the loaded base (the same
    architecture); returns what puts the base's own back."""
    unet_state = formats._safetensors_of(folder / "unet")
    text_state = formats.clip_text_state(formats._safetensors_of(folder / "text_encoder"), pipe.text_encoder)
    kept = []
    for module, state, what in ((pipe.unet, unet_state, "unet"), (pipe.text_encoder, text_state, "text_encoder")):
        own = module.state_dict()
        if set(own) != set(state) or any(tuple(own[k].shape) != tuple(state[k].shape) for k in own):
            raise LimnerError(f"{folder}/{what} is not of the loaded base's architecture: use it with its own base")
        kept.append((module, {k: v.detach().clone() for k, v in own.items()}))
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})

    def restore() -> None:
        for module, state in kept:
            module.load_state_dict(state)

    return restore


def _adapter_encoder(adapter: Path, image_encoder: Path) -> SubjectEncoder:
    """The adapter's Q-Former over `image_encoder`, which must be the one it was pretrained over."""
    wanted, found = read_adapter_manifest(adapter).get("image_encoder_fingerprint"), _fingerprint(image_encoder)
    if wanted and wanted != found:
        raise LimnerError(
            f"adapter {adapter} was pretrained over image encoder {wanted}, but {image_encoder} is {found}; pretrain "
            "one for this image encoder"
        )
    return formats.load_adapter_encoder(adapter, image_encoder)


def _fingerprint(folder: Path) -> str:
    from limner.models.loading import fingerprint

    return fingerprint(Path(folder))
