"""Custom Diffusion as a limner method: prepare (new modifier tokens, augmented references, retrieved
regularisation images, the task), save (diffusers' weights layout and one embedding per token) and
install (one concept's weights, or several composed; see the package docstring for the paper's idea)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from limner.concepts import read_manifest
from limner.io import child
from limner.methods.base import Capabilities, Installation
from limner.methods.custom_diffusion.config import CustomDiffusionConfig, default_train_config, paper_recipe
from limner.methods.custom_diffusion.formats import (
    install_weights,
    layer_weights,
    read_weights,
    save_concept,
)
from limner.methods.custom_diffusion.merge import compose
from limner.methods.custom_diffusion.retrieval import regularization_set
from limner.methods.custom_diffusion.task import CustomDiffusionTask, instance_prompt, rescale
from limner.methods.registry import register
from limner.methods.textual_inversion import add_tokens_everywhere, load_embedding, text_restorer
from limner.methods.tuning import TuningMethod, TuningRun
from limner.subject import Subject
from limner.training import TrainConfig
from limner.training.conditioning import PromptEncoder
from limner.training.data import encode_images, fit_square, image_captions, with_caption

if TYPE_CHECKING:
    from limner.models.loading import Base


# what a concept's mode trained, for its model card: the paper's method is K and V only
TRAINS = {
    "crossattn_kv": "the K and V projections of every cross-attention (the paper's Custom Diffusion)",
    "crossattn": "all of every cross-attention: Q, K, V and out (limner's variant; the paper trains K and V only)",
}


@register
class CustomDiffusion(TuningMethod):
    name = "custom_diffusion"
    config_cls = CustomDiffusionConfig
    capabilities = Capabilities(joint=True, regional=True)
    token_setting = "modifier_token"

    def default_train_config(self, num_subjects: int = 1) -> TrainConfig:
        return default_train_config(num_subjects)

    def recipes(self, num_subjects: int = 1) -> dict[str, dict[str, Any]]:
        return {"paper": paper_recipe(num_subjects)}

    def prepare(self, base: Base, subjects: list[Subject], cfg: CustomDiffusionConfig) -> TuningRun:
        """One or several concepts trained together; concept i gets modifier token <new{i+1}>."""
        pipe, res = base.pipe, base.resolution
        encoder = PromptEncoder(pipe, res)
        tokens = [cfg.modifier_token] if len(subjects) == 1 else [f"<new{i + 1}>" for i in range(len(subjects))]
        words = cfg.initializer.split("+")
        added = [add_tokens_everywhere(encoder, [t], words[i % len(words)]) for i, t in enumerate(tokens)]
        token_ids = {name: [i for ids in added for i in ids[name]] for name in added[0]}
        rng = np.random.default_rng(cfg.train.seed)
        images, masks, prompts = [], [], []
        for subject, token in zip(subjects, tokens):
            for im, caption in zip(subject.images, image_captions(subject, cfg.captions)):
                for v in range(cfg.augment_variants if cfg.augment else 1):
                    aug, mask, prefix = (
                        rescale(im, res, rng)
                        if cfg.augment and v > 0
                        else (fit_square(im, res), np.ones((res, res), bool), "")
                    )
                    images.append(aug)
                    masks.append(mask)
                    prompts.append(with_caption(instance_prompt(prefix, token, subject.class_noun), caption))
        lat = encode_images(pipe.vae, images, res, flip=cfg.train.flip)
        if cfg.train.flip:  # the mirror images' rows follow the originals', and their valid regions mirror too
            masks += [m[:, ::-1] for m in masks]
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
            batch = {"latents": lat.sample(idx, g), "mask": mask_t[idx], "input_ids": ids[lat.source[idx]]}
            if reg_lat is not None:
                ridx = torch.randint(len(reg_lat.mean), (bs,), generator=g)
                batch.update(reg_latents=reg_lat.sample(ridx, g), reg_idx=ridx)
            return batch

        return TuningRun(
            task,
            next_batch,
            [f"a {t} {s.class_noun} on the beach" for t, s in zip(tokens, subjects)],
            f"custom diffusion {'+'.join(s.name for s in subjects)}",
            {"tokens": tokens, "prompts": prompts},
        )

    def save(self, base: Base, subjects: list[Subject], cfg: CustomDiffusionConfig, run: TuningRun, out: Path) -> dict:
        tokens = run.state["tokens"]
        files = save_concept(base.pipe, out, cfg.mode, tokens, run.task.rows.vectors())
        joint = {} if len(subjects) == 1 else {"subject": [s.name for s in subjects]}
        return joint | {
            "class_nouns": [s.class_noun for s in subjects],
            "tokens": tokens,
            "config": asdict(cfg),
            "mode": cfg.mode,
            "trains": TRAINS[cfg.mode],
            "files": files,
            "example_prompt": f"a {tokens[0]} {subjects[0].class_noun} on the beach",
            "training_prompts": sorted(set(run.state["prompts"])),
        }

    def install(self, base: Base, concepts: list[Path], regions: list[str] | None = None) -> Installation:
        """One concept: its weights and tokens. Several, or regional prompts: composed (`compose`), as
        installing one after another would let the last overwrite the others' attention weights."""
        manifests = [read_manifest(c) for c in concepts]
        installation = Installation(undo=[text_restorer(base.pipe)])
        unet = base.pipe.unet
        original = layer_weights(
            unet, "crossattn" if any(m["mode"] == "crossattn" for m in manifests) else "crossattn_kv"
        )
        installation.undo.append(lambda: install_weights(unet, original))
        if len(concepts) > 1 or regions:
            # the caller has checked each concept's base (and honoured --force)
            installation.before_window = compose(base, concepts, regions, force=True)
            return installation
        concept, m = Path(concepts[0]), manifests[0]
        for token, name in m["files"]["tokens"].items():
            load_embedding(base, child(concept, name, f"{concept}/limner.json's file of {token}"), token=token)
        install_weights(unet, read_weights(concept / m["files"]["weights"]))
        return installation

    def prompt(self, template: str, concept: Path) -> str:
        m = read_manifest(concept)
        return template.format(f"{m['tokens'][0]} {m['class_noun']}")


# --------------------------------------------------------------------------------------------
