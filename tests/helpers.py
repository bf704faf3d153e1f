"""Helpers shared by the training tests (a tiny subject, a folder of its images, train settings, two
trained Custom Diffusion concepts). Imported as `from helpers import ...`: pytest puts tests/ on sys.path
for its conftest.py, as it does for every test file here."""

from __future__ import annotations

import numpy as np

from limner.methods import Subject, get_method
from limner.models.loading import load_base
from limner.training import TrainConfig


def subject(n=3):
    rng = np.random.default_rng(0)
    return Subject("blob", "ball", [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(n)])


def image_folder(folder, n=2):
    """A user's folder of reference images: the subject's images saved as PNG files."""
    from PIL import Image

    folder.mkdir()
    for i, im in enumerate(subject(n).images):
        Image.fromarray(im).save(folder / f"{i}.png")
    return folder


def ti_config(steps, **kw):
    return {
        "train": TrainConfig(
            max_steps=steps, batch_size=2, learning_rate=5e-2, weight_decay=0.0, checkpoint_every=2, **kw
        )
    }


def db_train(steps=2, **kw):
    return TrainConfig(max_steps=steps, batch_size=2, learning_rate=1e-3, checkpoint_every=0, **kw)


def two_custom_diffusion_concepts(tiny_base, tmp_path) -> tuple:
    cfg = dict(
        prior_preservation=False,
        augment=False,
        train=TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-2, checkpoint_every=0),
    )
    a = get_method("custom_diffusion").personalize(
        load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "a", **cfg
    )
    b = get_method("custom_diffusion").personalize(
        load_base(str(tiny_base), device="cpu"),
        Subject("cube", "box", subject().images),
        tmp_path / "b",
        modifier_token="<new2>",
        **cfg,
    )
    return a, b


def record_first_step_gradients(monkeypatch) -> tuple[list, list]:
    """Makes the trainer's AdamW record, at its first step, each trained parameter's gradient as the backward
    pass gave it and as the step receives it (after clipping): two lists in the optimizer's order, filled
    when training runs (one process, no gradient accumulation)."""
    import torch

    raw, clipped = [], []

    class Recording(torch.optim.AdamW):
        def __init__(self, params, **kw):
            params = list(params)
            super().__init__(params, **kw)
            raw.extend([None] * len(params))
            for i, p in enumerate(params):
                p.register_hook(lambda g, i=i: raw.__setitem__(i, g.detach().clone()) if raw[i] is None else None)

        def step(self, *args, **kw):
            if not clipped:
                clipped.extend(p.grad.detach().clone() for p in self.param_groups[0]["params"])
            return super().step(*args, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    return raw, clipped


def clipped_alone(grads: list, max_norm: float) -> list:
    """The gradients as torch.nn.utils.clip_grad_norm_ clips them when they are all there is."""
    import torch

    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return [g * (max_norm / (norm + 1e-6)).clamp(max=1.0) for g in grads]


def lora_concept(tiny_base, out, name: str, identifier: str, noun: str, train):
    """A DreamBooth LoRA concept of a subject `name` (a `noun`) in `out`, without prior preservation."""
    return get_method("dreambooth_lora").personalize(
        load_base(str(tiny_base), device="cpu"),
        Subject(name, noun, subject().images),
        out,
        identifier=identifier,
        prior_preservation="none",
        train=train,
    )


# ---------------------------------------------------------------------------------------------------------------
# Encoder methods (IP-Adapter): a tiny CLIP vision tower and a tiny pretraining stream
# ---------------------------------------------------------------------------------------------------------------


def tiny_image_encoder(folder, width=16, image_size=32):
    """A random CLIPVisionModelWithProjection saved in `folder` (17 tokens of width 16 for a 32 px picture)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
            projection_dim=width,
        )
    ).save_pretrained(folder)
    return folder


class ToyStream:
    """A finite stream with the interface of limner.data's (samples with image, text, references, mask,
    subject; state_dict/load_state_dict; skipped; describe), over a few random pictures."""

    def __init__(self, n=4, size=24, seed=0):
        from types import SimpleNamespace

        rng = np.random.default_rng(seed)
        self.samples = [
            SimpleNamespace(
                image=rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
                text=f"a photo of a ball {i}",
                references=[],
                mask=None,
                subject=f"s{i}",
            )
            for i in range(n)
        ]
        self.position, self.skipped = 0, 0

    def __iter__(self):
        while self.position < len(self.samples):
            self.position += 1
            yield self.samples[self.position - 1]
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]

    def describe(self):
        return f"toy stream of {len(self.samples)} samples"


def tiny_ip_base(folder):
    """The tiny SD pipeline (conftest's) with a tiny CLIP vision tower as its image_encoder component, as the world
    base has one: what IP-Adapter reads references with."""
    from conftest import build_tiny_pipeline
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    build_tiny_pipeline(folder)
    encoder = tiny_image_encoder(folder.parent / f"{folder.name}-image-encoder")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.register_modules(image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def pretraining_folder(folder, n=4, size=24):
    """A user's pretraining data: an image folder with metadata.jsonl (datasets' imagefolder convention)."""
    import json

    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo of a ball {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def lineage(manifest: dict) -> list[dict]:
    """An adapter's own record, then each one it was continued from (`init`'s `started_from`), back to the first."""
    records = []
    while manifest:
        records.append(manifest)
        manifest = manifest.get("started_from")
    return records
