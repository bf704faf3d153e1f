"""Custom Diffusion (Kumari et al., 2023): "Multi-Concept Customization of Text-to-Image Diffusion".

Fine-tuning shows that the cross-attention key and value projections (W_k, W_v of every attn2,
about 5% of the UNet) change most; Custom Diffusion updates only those, plus a modifier token V*
placed before the class noun ("a V* dog"), initialised from a rare token. Regularisation images are
real images whose captions are close to the class prompt (retrieved by CLIP similarity), trained with
their own captions. Augmentation rescales the subject: shrunk images get "far away" / "very small"
prompts, enlarged ones "zoomed in" / "close up", and the loss is masked to the valid region.

Several concepts combine by joint training, or by a closed-form merge of separately tuned models:
for each W in {W_k, W_v}, find W closest to the base W0 on the regularisation captions' features
C_reg while reproducing each tuned model's outputs V on its own concept's features C:
    W = W0 + v d^T,  d^T = C (C_reg^T C_reg)^-1,  v = (V - W0 C^T) (d^T C^T)^-1.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from limner.concepts import MANIFEST, check_base, read_manifest, write_json_atomic, write_model_card
from limner.errors import LimnerError
from limner.io import cache_dir, disk_guard, written_atomically
from limner.methods.base import Capabilities, Installation
from limner.methods.registry import register
from limner.methods.settings import setting
from limner.methods.textual_inversion import NewTokenRows, add_tokens_everywhere, load_embedding, text_restorer
from limner.methods.tuning import TuningMethod, TuningRun
from limner.regions import WindowHook, prompt_names, warn_if_unnamed
from limner.subject import Subject
from limner.training import TrainConfig, TrainingTask, denoising_loss, noise_scheduler
from limner.training.conditioning import PromptEncoder, concat, select
from limner.training.data import encode_images, fit_square, image_captions, with_caption

if TYPE_CHECKING:
    from limner.models.loading import Base

WEIGHTS_FILE = "pytorch_custom_diffusion_weights.safetensors"
SHRINK_PREFIXES = ("a far away", "very small")
ENLARGE_PREFIXES = ("zoomed in", "close up")
MODES = {"crossattn_kv": ("to_k", "to_v"), "crossattn": ("to_q", "to_k", "to_v", "to_out.0")}


def default_train_config(num_concepts: int = 1) -> TrainConfig:
    # the paper: lr 1e-5 (x batch), 250 steps single-concept at 512 px; the small world model needs more.
    # Joint training gets as many steps per concept, as the paper's 500 for two (docs/README.md)
    return TrainConfig(max_steps=750 * num_concepts, batch_size=4, learning_rate=1e-3, weight_decay=0.0, checkpoint_every=100)


@dataclass
class CustomDiffusionConfig:
    modifier_token: str = setting("<new1>", "the modifier token V* placed before the class noun")
    initializer: str = setting("ktn", "the rare word V* starts from, as in the paper")
    mode: str = setting("crossattn", "crossattn: all of attn2 (Q, K, V, out); crossattn_kv: K and V only (the paper's "
                                     "default, and what the closed-form merge solves for)")
    prior_preservation: bool = setting(True, "train on retrieved real images with their own captions too")
    num_reg_images: int = setting(100, "regularisation images retrieved per subject")
    reg_pool: str | None = setting(None, "folder of captioned images (x.png + x.txt) to retrieve from (default on the world: renders)")
    reg_pool_size: int = setting(1500, "world renders to retrieve from")
    clip: str | None = setting(None, "CLIPModel folder for retrieval from a real pool")
    prior_loss_weight: float = setting(1.0, "weight of the regularisation loss")
    augment: bool = setting(True, "rescale references with 'far away' / 'zoomed in' prompts, the loss masked to the valid region")
    augment_variants: int = setting(8, "rescaled variants per reference image (their latents are cached)")
    captions: bool = setting(True, "append each reference image's caption (if it has one) to its prompts")
    train: TrainConfig | None = setting(None, "trainer settings (default: the method's, 750 steps per concept)")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LimnerError(f"mode {self.mode!r}: use one of {', '.join(MODES)}")


def cross_attention_layers(unet) -> dict[str, torch.nn.Module]:
    """name -> attn2 module, in the order of unet.attn_processors."""
    return {name: m for name, m in unet.named_modules() if name.endswith("attn2")}


def trained_projections(unet, mode: str):
    """(attn2 name, projection, parameter name, parameter) for every weight Custom Diffusion trains."""
    for name, attn in cross_attention_layers(unet).items():
        for proj in MODES[mode]:
            for pname, p in base_layer(attn.get_submodule(proj)).named_parameters(recurse=False):
                yield name, proj, pname, p


def base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The plain linear layer, also when a LoRA (peft) wraps it."""
    return getattr(module, "base_layer", module)


# --------------------------------------------------------------------------------------------
# Regularisation images: retrieved from a captioned pool by CLIP similarity to the class prompt
# --------------------------------------------------------------------------------------------


@dataclass
class Pool:
    """A captioned image pool to retrieve from, read lazily: only the retrieved images are loaded once
    the pool's CLIP index is cached."""

    key: str  # names the pool's content, for its cached index
    size: int
    load: Callable[[list[int]], list[tuple[np.ndarray, str]]]  # (image, caption) at these indices


def world_pool(n: int, seed: int = 7) -> Pool:
    """n world renders with their captions; render i depends only on (seed, i)."""
    from limner.world.render import render
    from limner.world.scenes import random_scene

    def load(indices: list[int]) -> list[tuple[np.ndarray, str]]:
        renders = [render(random_scene(np.random.default_rng([seed, i]))) for i in indices]
        return [(r.image, r.caption) for r in renders]

    # the renderer's source is part of the key: a change to the world changes what render i shows
    world = files("limner.world")
    code = hashlib.sha256(b"".join((world / f).read_bytes() for f in ("render.py", "scenes.py", "vocab.py"))).hexdigest()[:12]
    return Pool(f"world-{seed}-{n}-{code}", n, load)


def folder_pool(folder: Path) -> Pool:
    from limner.evaluation.subjects import IMAGE_SUFFIXES

    folder = Path(folder)
    images = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").exists()]
    if not images:
        raise LimnerError(f"reg_pool {folder}: no captioned images (each image needs a .txt caption beside it)")
    # a changed, added or removed file changes the key, and with it the index
    stats = [(p.name, p.stat()) for p in images]  # ctime changes with every write, whatever the mtime says
    stamp = hashlib.sha256("".join(f"{n}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}\n" for n, st in stats).encode()).hexdigest()[:16]

    def load(indices: list[int]) -> list[tuple[np.ndarray, str]]:
        pairs = []
        for i in indices:
            with Image.open(images[i]) as im:
                pairs.append((np.asarray(im.convert("RGB")), images[i].with_suffix(".txt").read_text().strip()))
        return pairs

    return Pool(f"{folder.resolve()}-{stamp}", len(images), load)


def pool_index(pool: Pool, clip, clip_id: str, chunk: int = 256) -> torch.Tensor:
    """CLIP image embeddings [size, d] of the whole pool, computed once per (pool, CLIP model) and kept
    in the cache, as retrieval services keep their index: later trainings only embed the class prompt."""
    path = cache_dir("retrieval") / f"{hashlib.sha256(f'{pool.key}|{clip_id}'.encode()).hexdigest()[:24]}.safetensors"
    try:
        embs = load_file(str(path))["embeddings"]
        if embs.shape[0] == pool.size:
            return embs
    except Exception:  # noqa: BLE001 - missing or unreadable: the index is built again
        pass
    embs = torch.cat([clip.images([im for im, _ in pool.load(list(range(i, min(i + chunk, pool.size))))])
                      for i in range(0, pool.size, chunk)])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with written_atomically(path) as tmp:
            save_file({"embeddings": embs.contiguous()}, str(tmp))
    except Exception as e:  # noqa: BLE001 - a cache that cannot be written (read-only, full) only costs the next run time
        warnings.warn(f"could not cache the retrieval index in {path.parent} ({e}); set LIMNER_CACHE to a writable folder", stacklevel=2)
    return embs


def retrieve(pool: Pool, class_prompt: str, n: int, clip, clip_id: str) -> list[tuple[np.ndarray, str]]:
    """The n pool images most similar (CLIP image-text cosine) to the class prompt; clip_id names the
    CLIP model (its fingerprint)."""
    sims = pool_index(pool, clip, clip_id) @ clip.texts([class_prompt])[0]
    return pool.load(sims.argsort(descending=True)[:n].tolist())


def regularization_set(base, class_noun: str, cfg: CustomDiffusionConfig) -> list[tuple[np.ndarray, str]]:
    from limner.evaluation.encoders import CLIPEncoder, WorldCLIP
    from limner.models.loading import fingerprint

    if cfg.reg_pool:
        if not cfg.clip:
            raise LimnerError("retrieving regularisation images from --reg-pool needs a CLIP model: set clip to a local CLIPModel folder")
        return retrieve(folder_pool(Path(cfg.reg_pool)), f"a photo of a {class_noun}", cfg.num_reg_images, CLIPEncoder(cfg.clip),
                        fingerprint(Path(cfg.clip)))
    if not base.is_world:
        raise LimnerError("Custom Diffusion's prior preservation on a real model needs reg_pool (a folder of captioned images) and "
                          "clip; or set prior_preservation to false")
    from limner.models.loading import WORLD_BASE

    # the world's CLIP lives in the base folder: the base's fingerprint names it
    return retrieve(world_pool(cfg.reg_pool_size), f"a {class_noun}", cfg.num_reg_images, WorldCLIP(WORLD_BASE), base.fingerprint)


# --------------------------------------------------------------------------------------------
# Augmentation: random rescale with prompt prefixes and a mask of the valid region
# --------------------------------------------------------------------------------------------


def rescale(image: np.ndarray, resolution: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """(image, valid-region mask, prompt prefix) for one random rescale of a reference image."""
    im = fit_square(image, resolution)
    r = rng.random()
    if r < 1 / 3:  # shrink onto a blank canvas: only the pasted region counts in the loss
        size = max(8, int(resolution * rng.uniform(1 / 3, 0.9)))
        small = np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
        canvas = np.zeros_like(im)
        mask = np.zeros(im.shape[:2], bool)
        y, x = rng.integers(0, resolution - size + 1, 2)
        canvas[y:y + size, x:x + size] = small
        mask[y:y + size, x:x + size] = True
        return canvas, mask, str(rng.choice(SHRINK_PREFIXES))
    if r < 2 / 3:  # enlarge and crop
        size = int(resolution * rng.uniform(1.2, 1.4))
        big = np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
        y, x = rng.integers(0, size - resolution + 1, 2)
        return big[y:y + resolution, x:x + resolution].copy(), np.ones(im.shape[:2], bool), str(rng.choice(ENLARGE_PREFIXES))
    return im, np.ones(im.shape[:2], bool), ""


def instance_prompt(prefix: str, token: str, class_noun: str) -> str:
    return f"{prefix} photo of a {token} {class_noun}".strip() if prefix else f"a photo of a {token} {class_noun}"


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


class CustomDiffusionTask(TrainingTask):
    def __init__(self, pipe, encoder: PromptEncoder, cfg: CustomDiffusionConfig, token_ids: dict[str, list[int]], reg_cond):
        self.pipe, self.encoder, self.cfg, self.train_cfg, self.reg_cond = pipe, encoder, cfg, cfg.train, reg_cond
        self.noise = noise_scheduler(pipe)
        pipe.unet.requires_grad_(False)
        self.weights = {f"{name}.{proj}.{pname}": p for name, proj, pname, p in trained_projections(pipe.unet, cfg.mode)}
        for p in self.weights.values():
            p.requires_grad_(True)
        self.rows = NewTokenRows(encoder.text_encoders(), token_ids)

    def modules(self):
        return {"unet": self.pipe.unet} | self.encoder.text_encoders()

    def trainable_parameters(self):
        return list(self.weights.values()) + self.rows.parameters()

    def loss(self, batch, generator):
        unet, tc = self.wrapped["unet"], self.train_cfg
        cond, kw = self.encoder.encode(batch["input_ids"], self.wrapped)
        latents, mask = batch["latents"].to(cond), batch["mask"]
        n = latents.shape[0]
        if "reg_latents" in batch:
            cond, kw = concat([(cond, kw), select(*self.reg_cond, batch["reg_idx"])])
            latents = torch.cat([latents, batch["reg_latents"].to(cond)])
            mask = torch.cat([mask, torch.ones((latents.shape[0] - n, *mask.shape[1:]), dtype=mask.dtype)])
        per = denoising_loss(unet, self.noise, latents, cond, generator, tc.noise_offset, tc.min_snr_gamma,
                             mask=mask, reduction="none", **kw)
        loss = per[:n].mean()
        if per.shape[0] > n:
            loss = loss + self.cfg.prior_loss_weight * per[n:].mean()
        return loss

    def after_optimizer_step(self):
        self.rows.restore_others()

    def trainable_state(self):
        return {k: v.detach().float() for k, v in self.weights.items()} | {f"tokens.{k}": v for k, v in self.rows.vectors().items()}

    def load_trainable_state(self, state):
        with torch.no_grad():
            for k, p in self.weights.items():
                p.copy_(state[k].to(p))
        self.rows.load({k.removeprefix("tokens."): v for k, v in state.items() if k.startswith("tokens.")})


# --------------------------------------------------------------------------------------------
# The weights file: diffusers' attention-processor keys, read back by limner's own loader
# --------------------------------------------------------------------------------------------

_KEY = {"to_k": "to_k_custom_diffusion", "to_v": "to_v_custom_diffusion", "to_q": "to_q_custom_diffusion",
        "to_out.0": "to_out_custom_diffusion.0"}


def layer_weights(unet, mode: str) -> dict[str, torch.Tensor]:
    """diffusers' Custom Diffusion layout: '<attn2 name>.processor.to_k_custom_diffusion.weight', ..."""
    # a copy: on a CPU in fp32, .cpu().float() would be the parameter itself, and installing other weights
    # would change what was meant to be kept
    return {f"{name}.processor.{_KEY[proj]}.{pname}": p.detach().to("cpu", torch.float32, copy=True)
            for name, proj, pname, p in trained_projections(unet, mode)}


def read_weights(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Reads limner's and diffusers' Custom Diffusion files (.safetensors; .bin only with opt-in,
    then with weights_only=True). Entries of self-attention processors, which diffusers' trainer
    also writes, carry no weights and are ignored."""
    path = Path(path)
    if path.suffix == ".bin":
        if not allow_pickle:
            raise LimnerError(f"{path} is a pickle file; load it only with --allow-pickle (read with torch.load(weights_only=True))")
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        state = load_file(str(path))
    return {k: v for k, v in state.items() if "_custom_diffusion" in k and ".attn2." in k}


def install_weights(unet, state: dict[str, torch.Tensor]) -> int:
    """Writes Custom Diffusion weights into the matching attn2 projections (equivalent to diffusers'
    CustomDiffusionAttnProcessor with train_kv, which computes k and v with those weights)."""
    layers = cross_attention_layers(unet)
    reverse = {v: k for k, v in _KEY.items()}
    n = 0
    for key, value in state.items():
        layer, _, rest = key.partition(".processor.")
        proj_key, _, pname = rest.rpartition(".")
        if layer not in layers or proj_key not in reverse:
            raise LimnerError(f"Custom Diffusion weight {key} does not match this UNet (no layer {layer}); was it trained on another base?")
        target = base_layer(layers[layer].get_submodule(reverse[proj_key]))
        param = getattr(target, pname)
        if param.shape != value.shape:
            raise LimnerError(f"Custom Diffusion weight {key} has shape {tuple(value.shape)}, the UNet's is {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value.to(param))
        n += 1
    return n


def save_concept(pipe, folder: Path, mode: str, tokens: list[str], vectors: dict[str, torch.Tensor]) -> dict:
    """The K/V weights, and one embedding file per modifier token, `<new1>.safetensors` as diffusers
    writes it ({token: [1, d]}; on SDXL {"clip_l", "clip_g"} as A1111 does)."""
    with written_atomically(folder / WEIGHTS_FILE) as tmp:
        save_file({k: v.half() for k, v in layer_weights(pipe.unet, mode).items()}, str(tmp))
    files = {"weights": WEIGHTS_FILE, "tokens": {}}
    for i, token in enumerate(tokens):
        rows = {name: v[i:i + 1].detach().cpu().half().contiguous() for name, v in vectors.items()}
        state = {"clip_l": rows["text_encoder"], "clip_g": rows["text_encoder_2"]} if "text_encoder_2" in rows else {token: rows["text_encoder"]}
        name = f"{token}.safetensors"
        with written_atomically(folder / name) as tmp:
            save_file(state, str(tmp))
        files["tokens"][token] = name
    return files


@register
class CustomDiffusion(TuningMethod):
    name = "custom_diffusion"
    config_cls = CustomDiffusionConfig
    capabilities = Capabilities(joint=True, regional=True)
    token_setting = "modifier_token"

    def default_train_config(self, num_subjects: int = 1) -> TrainConfig:
        return default_train_config(num_subjects)

    def prepare(self, base: Base, subjects: list[Subject], cfg: CustomDiffusionConfig) -> TuningRun:
        """One or several concepts trained together; concept i gets modifier token <new{i+1}>."""
        pipe, res = base.pipe, base.resolution
        encoder = PromptEncoder(pipe, res)
        tokens = [cfg.modifier_token] if len(subjects) == 1 else [f"<new{i + 1}>" for i in range(len(subjects))]
        token_ids = add_tokens_everywhere(encoder, tokens, cfg.initializer)
        rng = np.random.default_rng(cfg.train.seed)
        images, masks, prompts = [], [], []
        for subject, token in zip(subjects, tokens):
            for im, caption in zip(subject.images, image_captions(subject, cfg.captions)):
                for v in range(cfg.augment_variants if cfg.augment else 1):
                    aug, mask, prefix = rescale(im, res, rng) if cfg.augment and v > 0 else (fit_square(im, res), np.ones((res, res), bool), "")
                    images.append(aug)
                    masks.append(mask)
                    prompts.append(with_caption(instance_prompt(prefix, token, subject.class_noun), caption))
        lat = encode_images(pipe.vae, images, res, flip=cfg.train.flip)
        mask_t = torch.from_numpy(np.stack(masks)).float()[:, None]
        ids = encoder.tokenize(prompts)
        reg_lat, reg_cond = None, None
        if cfg.prior_preservation:
            reg = [pair for s in subjects for pair in regularization_set(base, s.class_noun, cfg)]
            reg_lat = encode_images(pipe.vae, [im for im, _ in reg], res, flip=False)
            reg_cond = encoder.encode_frozen([c for _, c in reg])  # captions without new tokens: cached once
        task = CustomDiffusionTask(pipe, encoder, cfg, token_ids, reg_cond)
        bs = cfg.train.batch_size

        def next_batch(g: torch.Generator) -> dict:
            idx = torch.randint(len(lat.mean), (bs,), generator=g)
            batch = {"latents": lat.sample(idx, g), "mask": mask_t[idx], "input_ids": ids[idx]}
            if reg_lat is not None:
                ridx = torch.randint(len(reg_lat.mean), (bs,), generator=g)
                batch.update(reg_latents=reg_lat.sample(ridx, g), reg_idx=ridx)
            return batch

        return TuningRun(task, next_batch, [f"a {t} {s.class_noun} on the beach" for t, s in zip(tokens, subjects)],
                         f"custom diffusion {'+'.join(s.name for s in subjects)}", {"tokens": tokens, "prompts": prompts})

    def save(self, base: Base, subjects: list[Subject], cfg: CustomDiffusionConfig, run: TuningRun, out: Path) -> dict:
        tokens = run.state["tokens"]
        files = save_concept(base.pipe, out, cfg.mode, tokens, run.task.rows.vectors())
        joint = {} if len(subjects) == 1 else {"subject": [s.name for s in subjects]}
        return joint | {"class_nouns": [s.class_noun for s in subjects], "tokens": tokens, "config": asdict(cfg), "mode": cfg.mode,
                        "files": files, "example_prompt": f"a {tokens[0]} {subjects[0].class_noun} on the beach",
                        "training_prompts": sorted(set(run.state["prompts"]))}

    def install(self, base: Base, concepts: list[Path], regions: list[str] | None = None) -> Installation:
        """One concept: its weights and tokens. Several, or regional prompts: composed (`compose`), as
        installing one after another would let the last overwrite the others' attention weights."""
        manifests = [read_manifest(c) for c in concepts]
        installation = Installation(undo=[text_restorer(base.pipe)])
        unet = base.pipe.unet
        original = layer_weights(unet, "crossattn" if any(m["mode"] == "crossattn" for m in manifests) else "crossattn_kv")
        installation.undo.append(lambda: install_weights(unet, original))
        if len(concepts) > 1 or regions:
            # the caller has checked each concept's base (and honoured --force)
            installation.before_window = compose(base, concepts, regions, force=True)
            return installation
        concept, m = Path(concepts[0]), manifests[0]
        for token, name in m["files"]["tokens"].items():
            load_embedding(base, concept / name, token=token)
        install_weights(unet, read_weights(concept / m["files"]["weights"]))
        return installation

    def prompt(self, template: str, concept: Path) -> str:
        m = read_manifest(concept)
        return template.format(f"{m['tokens'][0]} {m['class_noun']}")


# --------------------------------------------------------------------------------------------
# Closed-form merge of separately tuned concepts
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def prompt_features(encoder: PromptEncoder, prompts: list[str], from_token: str | None = None) -> torch.Tensor:
    """Every encoder-output row the UNet's cross-attention sees for these prompts, padding included,
    deduplicated: the inputs of W_k and W_v. With `from_token`, only the rows from that token on: the
    text encoder is causal, so the rows before it (begin token, "a photo of") are the same in every
    prompt and belong to C_reg, not to one concept. The rows after the end token matter as much as the
    phrase: they carry the concept too, and a merge that leaves them out loses it."""
    tokenizer = encoder.tokenizers[0]
    feats = encoder.encode(encoder.tokenize(prompts))[0].float().cpu()
    first = [0] * len(prompts)
    if from_token is not None:
        token_id = tokenizer.convert_tokens_to_ids(from_token)
        ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=feats.shape[1], return_tensors="pt").input_ids
        first = [int((row == token_id).nonzero()[0]) for row in ids]
    rows = torch.cat([feats[i, start:] for i, start in enumerate(first)])
    return torch.unique(rows.round(decimals=5), dim=0)


def closed_form_solver(C_reg: torch.Tensor, C: torch.Tensor, constraint_weight: float = 10.0,
                       ridge: float = 1e-4) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The merge for every layer that reads these features: W = solve(W0, V) minimises
    ||W C_reg^T - W0 C_reg^T||^2 + w ||W C^T - V||^2, the paper's eq. 4-5 with its constraint W C^T = V
    made a weighted least-squares term, w = constraint_weight * N / M per row.

    Once padding rows are constrained, C has more rows than the feature dimension and the paper's
    equality has no solution; its pseudo-inverse then silently fits C alone and ignores C_reg. The
    weighted form is defined either way and tends to the paper's solution as the weight grows. Every
    K and V layer reads the same text features, so the system is built and factored once.
    C_reg [N, d]; C [M, d]; W0 [out, d]; V [out, M]."""
    w = constraint_weight * C_reg.shape[0] / C.shape[0]
    gram = C_reg.t() @ C_reg
    A = gram + w * C.t() @ C
    A = A + ridge * A.diagonal().mean() * torch.eye(A.shape[0])
    factors = torch.linalg.lu_factor(A)

    def solve(W0: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        B = W0 @ gram + w * V @ C  # [out, d]
        return torch.linalg.lu_solve(*factors, B.t()).t()  # A is symmetric

    return solve


def closed_form(W0: torch.Tensor, C_reg: torch.Tensor, C: torch.Tensor, V: torch.Tensor,
                constraint_weight: float = 10.0, ridge: float = 1e-4) -> torch.Tensor:
    """The merged weights of one layer (see `closed_form_solver`)."""
    return closed_form_solver(C_reg, C, constraint_weight, ridge)(W0, V)


# C_reg on a real base without a caption file: varied everyday captions. The paper takes 200 real
# captions; a handful of "a photo of a dog" prompts gives a few dozen distinct feature rows for 768 or
# 2048 dimensions, so the solve's ridge, not the captions, would decide what the merge keeps.
GENERIC_NOUNS = ("dog", "cat", "person", "woman", "man", "child", "car", "bicycle", "house", "tree", "flower", "cup",
                 "chair", "table", "book", "bird", "horse", "boat", "mountain", "city street", "bowl of fruit",
                 "teddy bear", "backpack", "guitar", "clock", "lamp", "vase", "shoe", "hat", "kitchen")
GENERIC_SETTINGS = ("", "on a table", "in a park", "on the beach", "in the snow", "at night", "in a living room",
                    "in the city", "in a forest", "under a blue sky", "next to a window", "on the grass")
GENERIC_FORMS = ("a photo of a {}", "a {}", "a close-up photo of a {}", "a painting of a {}", "a picture of a {}",
                 "a watercolor of a {}", "an old photo of a {}", "a drawing of a {}")


def generic_captions(n: int) -> list[str]:
    """n distinct captions: a fixed shuffle of every form x noun x setting."""
    combos = [(f, noun, setting) for f in GENERIC_FORMS for noun in GENERIC_NOUNS for setting in GENERIC_SETTINGS]
    order = np.random.default_rng(0).permutation(len(combos))[:n]
    return [f"{combos[i][0].format(combos[i][1])} {combos[i][2]}".strip() for i in order]


def merge_captions(base, n: int, captions: Path | None = None) -> list[str]:
    """C_reg: n captions that must keep their meaning through the merge: the first n lines of a caption
    file (the paper's source), else the world's own captions, or varied generic captions on a real model."""
    if captions is not None:
        try:
            lines = [line.strip() for line in Path(captions).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise LimnerError(f"--captions {captions}: cannot read it as text ({e}); give a UTF-8 file with one caption per line") from e
        if not lines:
            raise LimnerError(f"--captions {captions} has no captions; give one caption per line")
        return lines[:n]
    if base.is_world:
        pool = world_pool(n, seed=11)
        return [caption for _, caption in pool.load(list(range(n)))]
    return generic_captions(n)


def read_concepts(base, concepts: list[Path], force: bool = False) -> list[dict]:
    """The manifests of Custom Diffusion concepts that can be used together on this base."""
    manifests = [read_manifest(c) for c in concepts]
    for c, m in zip(concepts, manifests):
        if m.get("method") != CustomDiffusion.name:
            raise LimnerError(f"{c} is a {m.get('method')} concept; only Custom Diffusion concepts merge in closed form")
        check_base(m, c, base, force)
    tokens = [t for m in manifests for t in m["tokens"]]
    if len(set(tokens)) != len(tokens):
        raise LimnerError(f"the concepts share a modifier token ({', '.join(tokens)}); train them with distinct tokens (e.g. <new1>, <new2>)")
    if len({m["mode"] for m in manifests}) != 1:
        modes = ", ".join(f"{c} ({m['mode']})" for c, m in zip(concepts, manifests))
        raise LimnerError(f"Custom Diffusion concepts of different modes cannot be merged or composed: {modes}; "
                          "train them with one --set mode=crossattn_kv (what the closed-form merge solves for) or mode=crossattn")
    return manifests


def concept_features(encoder: PromptEncoder, manifest: dict) -> torch.Tensor:
    """C of one concept: for each of its modifier tokens (a merged or jointly trained concept has
    several), the features from the token on in "<new1> noun", "a photo of a <new1> noun" and every
    training prompt that names it (contexts, captions, augmentation prefixes): the prompts whose
    outputs the concept learned, so the ones on which the merge must keep them."""
    tokens = manifest["tokens"]
    nouns = manifest.get("class_nouns") or []
    nouns = nouns if len(nouns) == len(tokens) else [manifest["class_noun"]] * len(tokens)
    trained = manifest.get("training_prompts") or []
    rows = [prompt_features(encoder, [f"{t} {n}", f"a photo of a {t} {n}", *(p for p in trained if t in p.split())], from_token=t)
            for t, n in zip(tokens, nouns)]
    return torch.unique(torch.cat(rows), dim=0)


def merged_weights(base, concepts: list[Path], manifests: list[dict], num_reg_captions: int = 200,
                   captions: Path | None = None) -> dict[str, torch.Tensor]:
    """The closed-form merge of the concepts' attn2 weights (their modifier tokens must be loaded)."""
    mode = manifests[0]["mode"]
    if mode == "crossattn":
        warnings.warn("the closed form covers attn2's K and V; these concepts also trained Q and the output projection, "
                      "which are averaged. For the paper's merge, train with --set mode=crossattn_kv.", stacklevel=3)
    encoder = PromptEncoder(base.pipe, base.resolution)
    W0 = layer_weights(base.pipe.unet, mode)
    tuned = [read_weights(Path(c) / m["files"]["weights"]) for c, m in zip(concepts, manifests)]
    C_reg = prompt_features(encoder, merge_captions(base, num_reg_captions, captions))
    # C: the features from each concept's modifier token on, padding rows included, in the paper's two
    # prompts and the concept's training prompts. On the world (regional prompts, both subjects
    # recognised) the paper's two prompts alone kept 0.000 and 0.083 of images on two pairs, because
    # the concept also lives in the rows after the phrase; these constraints keep 0.375 and 0.583.
    per_concept = [concept_features(encoder, m) for m in manifests]
    C = torch.cat(per_concept)
    solve, merged = closed_form_solver(C_reg, C), {}
    for key, w0 in W0.items():
        if not key.endswith(".weight") or not any(p in key for p in ("to_k_custom", "to_v_custom")):
            merged[key] = torch.stack([t[key].float() for t in tuned]).mean(0)  # q/out (crossattn mode): average
            continue
        V = torch.cat([t[key].float() @ c.t() for t, c in zip(tuned, per_concept)], dim=1)
        merged[key] = solve(w0, V)
    return merged


def load_tokens(base, concepts: list[Path], manifests: list[dict]) -> None:
    for c, m in zip(concepts, manifests):
        for token, name in m["files"]["tokens"].items():
            load_embedding(base, Path(c) / name, token=token)


def compose(base: Base, concepts: list[Path], region_prompts: list[str] | None = None,
            force: bool = False) -> WindowHook | None:
    """Several separately trained concepts in one generation, each with its modifier tokens.

    Without regions they are merged in closed form. With regional prompts (one per window, left to
    right) each window is denoised with the weights of the concepts its prompt names: one concept's
    own weights, the closed-form merge of several, the base's for none. No concept then gives up
    fidelity to another. Returns the hook for `regional_images`: `use_window(i)` installs window i's
    weights, `use_window(None)` the base's again."""
    manifests = read_concepts(base, concepts, force)
    load_tokens(base, concepts, manifests)
    unet = base.pipe.unet
    if region_prompts is None:
        install_weights(unet, merged_weights(base, concepts, manifests))
        return None
    for c, m in zip(concepts, manifests):
        warn_if_unnamed(str(c), m["tokens"], region_prompts)
    original = layer_weights(unet, manifests[0]["mode"])
    weights = []
    for prompt in region_prompts:
        named = [i for i, m in enumerate(manifests) if prompt_names(prompt, m["tokens"])]
        if not named:
            state = original
        elif len(named) == 1:
            state = read_weights(Path(concepts[named[0]]) / manifests[named[0]]["files"]["weights"])
        else:
            state = merged_weights(base, [concepts[i] for i in named], [manifests[i] for i in named])
        # cast once, so switching windows at every step is a copy on the UNet's device
        weights.append({k: v.to(unet.device, unet.dtype) for k, v in state.items()})
    installed = None

    def use_window(i: int | None) -> None:
        nonlocal installed
        state = original if i is None else weights[i]
        if state is not installed:
            install_weights(unet, state)
            installed = state

    return use_window


def merge(base, concepts: list[Path], out: Path, num_reg_captions: int = 200, force: bool = False,
          captions: Path | None = None) -> Path:
    """Merges separately trained Custom Diffusion concepts (distinct modifier tokens) into one."""
    pipe = base.pipe
    manifests = read_concepts(base, concepts, force)
    load_tokens(base, concepts, manifests)
    merged = merged_weights(base, concepts, manifests, num_reg_captions, captions)
    mode, tokens = manifests[0]["mode"], [t for m in manifests for t in m["tokens"]]
    encoder = PromptEncoder(pipe, base.resolution)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    install_weights(pipe.unet, merged)
    vectors = {name: te.get_input_embeddings().weight[tok.convert_tokens_to_ids(tokens)].detach().float()
               for tok, (name, te) in zip(encoder.tokenizers, encoder.text_encoders().items())}
    with disk_guard(f"the merged concept in {out}"):
        files = save_concept(pipe, out, mode, tokens, vectors)
    manifest = {"method": CustomDiffusion.name, "subject": [m["subject"] for m in manifests], "class_noun": manifests[0]["class_noun"],
                "class_nouns": [m["class_noun"] for m in manifests], "tokens": tokens, "mode": mode, "merged_from": [str(c) for c in concepts],
                "base_fingerprint": base.fingerprint, "base_path": str(base.path), "files": files, "steps": 0,
                "example_prompt": " and ".join(f"a {m['tokens'][0]} {m['class_noun']}" for m in manifests),
                "training_prompts": sorted({p for m in manifests for p in m.get("training_prompts") or []})}
    write_json_atomic(out / MANIFEST, manifest)
    write_model_card(out, manifest)
    return out
