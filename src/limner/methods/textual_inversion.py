"""Textual Inversion (Gal et al., 2022): "An Image is Worth One Word".

A new pseudo-word S* (optionally several vectors S*, S*_1, ...) is added to the text encoder's
vocabulary, initialised from a coarse descriptor (the class noun). Only its embedding v* is
optimised, with the usual denoising loss on the reference images captioned by neutral templates
("a photo of a S*"); every other row of the embedding matrix is restored after each step, so the
model itself never changes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from limner.concepts import read_manifest
from limner.errors import LimnerError
from limner.io import check_safetensors, read_tensors, written_atomically
from limner.methods.base import Capabilities, Installation
from limner.methods.registry import register
from limner.methods.settings import recipe_setting, setting
from limner.methods.tuning import TuningMethod, TuningRun
from limner.subject import Subject
from limner.training import TrainConfig, TrainingTask, denoising_loss, noise_scheduler
from limner.training.conditioning import PromptEncoder
from limner.training.data import encode_images, image_captions, subject_loss_weights, with_caption
from limner.values import check_word, parse_fields

if TYPE_CHECKING:
    from limner.models.loading import Base

OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a picture of a {}",
    "a {}",
    "a photo of the {}",
    "a close up photo of a {}",
    "a photo of a small {}",
    "a photo of a big {}",
    "a good photo of a {}",
    "a bright photo of the {}",
    "a dark photo of a {}",
    "a cropped photo of the {}",
    "a photo of one {}",
    "a clean photo of a {}",
    "a photo of my {}",
    "a nice picture of the {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a picture in the style of {}",
    "a drawing in the style of {}",
    "a photo in the style of {}",
    "art in the style of {}",
    "a nice painting in the style of {}",
    "a {} style painting",
)

TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}

DIFFUSERS_FILE = "learned_embeds.safetensors"
DIFFUSERS_FILE_2 = "learned_embeds_2.safetensors"  # SDXL's second text encoder, as diffusers' SDXL script writes it
# {"emb_params": [n, d]} (SDXL: clip_l / clip_g) for A1111 / kohya / ComfyUI: named after the token
# (a1111_file_name), since A1111 takes a file's name as the word that calls it. Concepts written
# before have this name, and their limner.json says so.
LEGACY_A1111_FILE = "embedding.safetensors"
SYMBOL_WORDS = {"*": "star"}  # S*, the paper's name for the pseudo-word: "<s*>" -> "s-star"
WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def a1111_file_name(token: str) -> str:
    """The A1111 file of a token, "<stem>.safetensors", so the word A1111 takes from the name is the token's.

    The rule: letters, digits, "_" and "-" stay; "*" is spelled "star"; every other run of characters
    ("<", ">", spaces, "/", "." ...) becomes one "-", and none is left at either end. So "<s*>" ->
    "s-star", "<blob>" -> "blob", "<my cat>" -> "my-cat". The name is safe on every common filesystem:
    no separator or leading dot, at most 100 characters, not a name Windows reserves (those get
    "-embedding"), never this concept's diffusers files (those get "-a1111"), and "embedding" if nothing
    is left."""
    spelled = "".join(
        f"-{SYMBOL_WORDS[c]}-" if c in SYMBOL_WORDS else c if c.isalnum() or c in "_-" else "-" for c in token
    )
    stem = "-".join(w for w in spelled.split("-") if w)[:100].strip("-") or "embedding"
    if stem.lower() in WINDOWS_RESERVED:
        stem += "-embedding"
    if f"{stem}.safetensors" in (DIFFUSERS_FILE, DIFFUSERS_FILE_2):
        stem += "-a1111"
    return f"{stem}.safetensors"


# The paper's method as diffusers' example README trains it on SD (examples/textual_inversion): one vector, no
# captions, no layout steps at generation, every timestep weighed alike, no gradient clipping, mirrored
# references, weight decay 1e-2, lr 5e-4 scaled by the 4 images of each step (--scale_lr) for 3000 steps. Its
# batch of 1 accumulated over 4 is one batch of 4 here: the same mean gradient per step.
PAPER_RECIPE = {
    "num_vectors": 1,
    "captions": False,
    "layout_fraction": 0.0,
    "max_steps": 3000,
    "batch_size": 4,
    "learning_rate": 2e-3,
    "weight_decay": 1e-2,
    "min_snr_gamma": None,
    "max_grad_norm": 0.0,
    "flip": True,
    "checkpoint_every": 500,
}


def default_train_config() -> TrainConfig:
    # min-SNR weighting (gamma 5, Hang et al. 2023) costs nothing per step and weighs down the nearly
    # noise-free timesteps, whose gradients the paper finds pull against the others' (measured: docs/README.md)
    return TrainConfig(
        max_steps=400, batch_size=4, learning_rate=5e-3, weight_decay=0.0, checkpoint_every=100, min_snr_gamma=5.0
    )


@dataclass
class TextualInversionConfig:
    token: str = setting("<s*>", "the new pseudo-word S*", word=True, flag="--token")
    num_vectors: int = setting(
        4,
        "vectors per token: a subject's looks take several words, one vector one position",
        at_least=1,
        flag="--num-vectors",
    )
    initializer: str | None = setting(None, "the word S* starts from (default: the class noun)")
    templates: str = setting("object", "prompt templates: object | style", choices=tuple(TEMPLATES))
    captions: bool = setting(True, "append each reference image's caption (if it has one) to its prompts")
    norm_cap: float | None = setting(
        None,
        "after each step, cut each vector's norm to at most this multiple of a word's "
        "(None: free; free vectors end 4-6x a word's norm)",
        above=0,
    )
    background_weight: float | None = setting(
        None,
        "weight of the pixels off the subject in the loss, from the subject's masks "
        "(None: the paper's loss over the whole image)",
        at_least=0,
        at_most=1,
    )
    layout_fraction: float = setting(
        0.2,
        "share of the denoising steps drawn from the class prompt before S* takes over (limner's; the paper: 0)",
        added=True,
        at_least=0,
        below=1,
    )
    recipe: str = recipe_setting()
    train: TrainConfig = setting(default_factory=default_train_config, help="trainer settings")

    def __post_init__(self) -> None:
        parse_fields(self)  # every setting to its declared type and values, however the settings were built


def placeholder_tokens(token: str, num_vectors: int) -> list[str]:
    """S*, S*_1, ...: the names diffusers' loader gives a multi-vector embedding."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def check_new_words(tokenizer, tokens: list[str], flag: str) -> None:
    """A new pseudo-word must be new: one the vocabulary already has would silently take over a trained word
    (the base's "ball", or another concept's token loaded before it)."""
    vocab = tokenizer.get_vocab()
    clash = [t for t in tokens if t in vocab or f"{t}</w>" in vocab]  # CLIP's BPE stores whole words with "</w>"
    if clash:
        raise LimnerError(
            f"{flag}: token {clash[0]!r} is already in the tokenizer's vocabulary (a word the base knows, or a "
            f"concept's token loaded before it); choose another, e.g. '<{clash[0].strip('<>')}-1>'"
        )


def add_tokens(tokenizer, text_encoder, tokens: list[str], initializer: str) -> list[int]:
    """Adds tokens to the vocabulary, each initialised to the mean embedding of the initializer's
    pieces. Refuses a token the vocabulary already has (it would silently reuse a trained word)."""
    check_new_words(tokenizer, tokens, "--token")
    init_ids = tokenizer(initializer, add_special_tokens=False).input_ids
    if not init_ids:
        raise LimnerError(f"--initializer {initializer!r} tokenizes to nothing; give a word such as the class noun")
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer))
    emb = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        emb[ids] = emb[init_ids].mean(0, keepdim=True)
    return ids


class NewTokenRows:
    """The new tokens' rows of each text encoder's embedding matrix (two on SDXL): the only trainable
    rows. The optimizer sees whole matrices, so every other row's gradient is zeroed before clipping (else
    the prompt's other words count in the norm that clips the new rows; diffusers' Custom Diffusion script
    zeroes them before clipping too), and every other row is restored after each step (AdamW's weight decay
    moves a row whose gradient is zero; diffusers' Textual Inversion script restores them)."""

    def __init__(self, encoders: dict[str, torch.nn.Module], token_ids: dict[str, list[int]]):
        self.token_ids, self.embeddings, self.originals, self.keep, self.word_norm = token_ids, {}, {}, {}, {}
        for name, te in encoders.items():
            te.requires_grad_(False)
            emb = te.get_input_embeddings().weight
            emb.requires_grad_(True)
            self.embeddings[name], self.originals[name] = emb, emb.detach().clone()
            self.keep[name] = torch.ones(len(emb), dtype=torch.bool)
            self.keep[name][token_ids[name]] = False
            self.word_norm[name] = float(self.originals[name][self.keep[name]].norm(dim=-1).mean())

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.embeddings.values())

    @torch.no_grad()
    def zero_others_gradients(self) -> None:
        for name, emb in self.embeddings.items():
            if emb.grad is not None:
                emb.grad[self.keep[name]] = 0

    @torch.no_grad()
    def restore_others(self) -> None:
        for name, emb in self.embeddings.items():
            emb[self.keep[name]] = self.originals[name][self.keep[name]].to(emb)

    @torch.no_grad()
    def cap_norms(self, ratio: float) -> None:
        """Shrinks each new row whose norm exceeds `ratio` x the mean norm of the vocabulary's words."""
        for name, emb in self.embeddings.items():
            rows = emb[self.token_ids[name]]
            limit = ratio * self.word_norm[name]
            emb[self.token_ids[name]] = rows * (limit / rows.norm(dim=-1, keepdim=True)).clamp(max=1.0)

    def vectors(self) -> dict[str, torch.Tensor]:
        return {name: emb[self.token_ids[name]].detach().float() for name, emb in self.embeddings.items()}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        for name, emb in self.embeddings.items():
            emb[self.token_ids[name]] = state[name].to(emb)


def add_tokens_everywhere(encoder: PromptEncoder, tokens: list[str], initializer: str) -> dict[str, list[int]]:
    """The tokens added to every tokenizer / text encoder pair of the pipeline."""
    return {
        name: add_tokens(tok, te, tokens, initializer)
        for tok, (name, te) in zip(encoder.tokenizers, encoder.text_encoders().items())
    }


class TextualInversionTask(TrainingTask):
    def __init__(
        self,
        pipe,
        encoder: PromptEncoder,
        token_ids: dict[str, list[int]],
        cfg: TrainConfig,
        norm_cap: float | None = None,
    ):
        self.pipe, self.encoder, self.cfg, self.norm_cap = pipe, encoder, cfg, norm_cap
        self.noise = noise_scheduler(pipe)
        pipe.unet.requires_grad_(False)
        self.rows = NewTokenRows(encoder.text_encoders(), token_ids)

    def modules(self):
        return self.encoder.text_encoders()

    def frozen_modules(self):
        return {"unet": self.pipe.unet}

    def trainable_parameters(self):
        return self.rows.parameters()

    def loss(self, batch, generator):
        cond, kwargs = self.encoder.encode(batch["input_ids"], self.wrapped)
        latents = batch["latents"].to(cond.device, cond.dtype)
        return denoising_loss(
            self.pipe.unet,
            self.noise,
            latents,
            cond,
            generator,
            self.cfg.noise_offset,
            self.cfg.min_snr_gamma,
            mask=batch.get("mask"),
            **kwargs,
        )

    def before_clipping(self):
        self.rows.zero_others_gradients()

    def after_optimizer_step(self):
        self.rows.restore_others()
        if self.norm_cap:
            self.rows.cap_norms(self.norm_cap)

    def trainable_state(self):
        return self.rows.vectors()

    def load_trainable_state(self, state):
        self.rows.load(state)


def save_embeddings(folder: Path, token: str, vectors: dict[str, torch.Tensor]) -> dict[str, str]:
    """SD: diffusers {token: [n, d]} and A1111/kohya {"emb_params": [n, d]}. SDXL: diffusers' two
    files and the A1111/ComfyUI {"clip_l": ..., "clip_g": ...}."""
    a1111 = a1111_file_name(token)
    if "text_encoder_2" in vectors:
        layouts = {
            DIFFUSERS_FILE: {token: vectors["text_encoder"]},
            DIFFUSERS_FILE_2: {token: vectors["text_encoder_2"]},
            a1111: {"clip_l": vectors["text_encoder"], "clip_g": vectors["text_encoder_2"]},
        }
    else:
        layouts = {DIFFUSERS_FILE: {token: vectors["text_encoder"]}, a1111: {"emb_params": vectors["text_encoder"]}}
    for name, state in layouts.items():
        with written_atomically(folder / name) as tmp:
            save_file({k: v.detach().cpu().half().contiguous() for k, v in state.items()}, str(tmp))
    return {"diffusers": DIFFUSERS_FILE, "a1111": a1111} | (
        {"diffusers_2": DIFFUSERS_FILE_2} if "text_encoder_2" in vectors else {}
    )


def load_embedding_file(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Reads any Textual Inversion layout into {"token"?: name, "clip_l"/"vectors": tensor}:
    diffusers {token: [n, d]}, A1111/kohya safetensors {"emb_params"}, SDXL {"clip_l", "clip_g"},
    and A1111 .pt {"string_to_param": {"*": ...}} only with allow_pickle (then weights_only=True)."""
    state = read_tensors(Path(path), allow_pickle)
    if "string_to_param" in state:  # A1111's .pt
        return {"token": state.get("name"), "vectors": state["string_to_param"]["*"]}
    if "clip_l" in state:
        return {"clip_l": state["clip_l"], "clip_g": state["clip_g"]}
    if "emb_params" in state:
        return {"vectors": state["emb_params"]}
    if len(state) == 1:
        token, vectors = next(iter(state.items()))
        return {"token": token, "vectors": vectors}
    raise LimnerError(
        f"{path}: not a Textual Inversion embedding (expected {{token: tensor}}, emb_params, clip_l/clip_g or "
        "string_to_param)"
    )


def load_embedding(base, path: Path, token: str | None = None, allow_pickle: bool = False) -> str:
    """Adds a Textual Inversion embedding in any supported layout to a loaded base; returns the token
    to write in prompts. SDXL files (clip_l / clip_g) go into both text encoders."""
    emb = load_embedding_file(path, allow_pickle)
    pipe = base.pipe
    token = token or emb.get("token") or Path(path).stem
    if "clip_l" in emb:
        if base.family != "sdxl":
            raise LimnerError(f"{path} is an SDXL embedding (clip_l + clip_g); load an SDXL base to use it")
        pipe.load_textual_inversion(
            emb["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            emb["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
        return token
    vectors = emb["vectors"]
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    if vectors.shape[-1] != width:
        raise LimnerError(
            f"{path}: embedding width {vectors.shape[-1]} does not match this base's text encoder ({width}); "
            "it was trained for another model family"
        )
    pipe.load_textual_inversion(vectors, token=token)
    return token


def load_embedding_spec(base: Base, spec: str, allow_pickle: bool = False) -> str:
    """`limner generate --embedding FILE[:TOKEN]`: loads the file; returns the token to write in prompts."""
    path, _, token = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    if not Path(path).exists():
        raise LimnerError(f"--embedding {path} does not exist")
    if token:
        check_word(token, f"--embedding {spec}")
    word = token or load_embedding_file(Path(path), allow_pickle).get("token") or Path(path).stem
    for tokenizer in (t for t in (base.pipe.tokenizer, getattr(base.pipe, "tokenizer_2", None)) if t is not None):
        check_new_words(tokenizer, [word], f"--embedding {spec}")  # as training refuses it
    return load_embedding(base, Path(path), word, allow_pickle)


def text_restorer(pipe: Any) -> Callable[[], None]:
    """Undoes the new tokens that loading embeddings adds: each tokenizer as it was, and each text
    encoder's embedding matrix cut back to its old rows (loading writes only the rows it adds)."""
    pairs = [
        (t, e)
        for t, e in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
        if getattr(pipe, e, None) is not None
    ]
    saved = [
        (t, copy.deepcopy(getattr(pipe, t)), e, getattr(pipe, e).get_input_embeddings().num_embeddings)
        for t, e in pairs
    ]

    def restore() -> None:
        for tok_name, tokenizer, te_name, rows in saved:
            setattr(pipe, tok_name, tokenizer)
            te = getattr(pipe, te_name)
            if te.get_input_embeddings().num_embeddings != rows:
                te.resize_token_embeddings(rows, mean_resizing=False)

    return restore


@register
class TextualInversion(TuningMethod):
    name = "textual_inversion"
    config_cls = TextualInversionConfig
    capabilities = Capabilities(reads_masks=True)
    token_setting = "token"
    artifact = "the embedding"
    # S*'s vectors, several times a word's norm, outweigh the prompt's other words; drawing the first fifth
    # of the steps from the class prompt settles the place and the things asked for first (docs/world-bench-ti)
    layout_fraction = 0.2

    def recipes(self, num_subjects: int = 1) -> dict[str, dict[str, Any]]:
        return {"paper": PAPER_RECIPE}

    def reads_masks(self, overrides: dict) -> bool:
        return overrides.get("background_weight") is not None  # the masked loss

    def default_train_config(self, num_subjects: int = 1) -> TrainConfig:
        return default_train_config()

    def prepare(self, base: Base, subjects: list[Subject], cfg: TextualInversionConfig) -> TuningRun:
        (subject,) = subjects
        pipe = base.pipe
        encoder = PromptEncoder(pipe, base.resolution)
        tokens = placeholder_tokens(cfg.token, cfg.num_vectors)
        ids = add_tokens_everywhere(encoder, tokens, cfg.initializer or subject.class_noun)
        templates = TEMPLATES[cfg.templates]
        phrase = " ".join(tokens)
        # token ids [image, template, ...]: every template, followed by that image's caption
        captions = image_captions(subject, cfg.captions)
        prompt_ids = torch.stack(
            [encoder.tokenize([with_caption(t.format(phrase), c) for t in templates]) for c in captions]
        )
        latents = encode_images(pipe.vae, subject.images, base.resolution, flip=cfg.train.flip)
        weights = None
        if cfg.background_weight is not None:
            weights = subject_loss_weights(
                subject, base.resolution, latents.mean.shape[-1], cfg.train.flip, cfg.background_weight
            )

        def next_batch(g: torch.Generator) -> dict:
            idx = torch.randint(len(latents.mean), (cfg.train.batch_size,), generator=g)
            tpl = torch.randint(len(templates), (cfg.train.batch_size,), generator=g)
            batch = {"latents": latents.sample(idx, g), "input_ids": prompt_ids[latents.source[idx], tpl]}
            return batch | ({"mask": weights[idx]} if weights is not None else {})

        task = TextualInversionTask(pipe, encoder, ids, cfg.train, cfg.norm_cap)
        prompts = [with_caption(templates[0].format(phrase), c) for c in captions]
        return TuningRun(
            task,
            next_batch,
            [f"a {phrase} on the beach", f"a {phrase} in the snow"],
            f"textual inversion {subject.name}",
            {"tokens": tokens, "training_prompts": prompts},
        )

    def save(
        self, base: Base, subjects: list[Subject], cfg: TextualInversionConfig, run: TuningRun, out: Path
    ) -> dict:
        files = save_embeddings(out, cfg.token, run.task.rows.vectors())
        return {
            "tokens": run.state["tokens"],
            "token": cfg.token,
            "num_vectors": cfg.num_vectors,
            "config": asdict(cfg),
            "files": files,
            "family": base.family,
            "training_prompts": run.state["training_prompts"],
            "example_prompt": f"a photo of a {cfg.token} on the beach",
        }

    def install(self, base: Base, concepts: list[Path], regions: list[str] | None = None) -> Installation:
        installation = Installation(undo=[text_restorer(base.pipe)])
        for concept in concepts:
            m = read_manifest(concept)
            if base.family == "sdxl":
                # the file limner.json names: the token's own name, or embedding.safetensors in concepts written before
                load_embedding(
                    base, Path(concept) / m.get("files", {}).get("a1111", LEGACY_A1111_FILE), token=m["token"]
                )
            else:  # diffusers' own loader: the file is exactly what plain diffusers users load
                check_safetensors(Path(concept) / DIFFUSERS_FILE)  # a damaged file named, not the loader's error
                base.pipe.load_textual_inversion(str(Path(concept) / DIFFUSERS_FILE), token=m["token"])
        return installation

    def prompt(self, template: str, concept: Path) -> str:
        return template.format(read_manifest(concept)["token"])
