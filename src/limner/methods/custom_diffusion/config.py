"""Custom Diffusion's settings and its trainer defaults."""

from __future__ import annotations

from dataclasses import dataclass

from limner.errors import LimnerError
from limner.methods.custom_diffusion.formats import MODES
from limner.methods.settings import recipe_setting, setting
from limner.training import TrainConfig
from limner.values import parse_fields


def default_train_config(num_concepts: int = 1) -> TrainConfig:
    # the paper: lr 1e-5 (x batch), 250 steps single-concept at 512 px; the small world model needs more.
    # Joint training gets as many steps per concept, as the paper's 500 for two (docs/README.md)
    return TrainConfig(
        max_steps=750 * num_concepts, batch_size=4, learning_rate=1e-3, weight_decay=0.0, checkpoint_every=100
    )


def paper_recipe(num_concepts: int = 1) -> dict:
    """The paper's method as diffusers' example README trains it (examples/custom_diffusion): K and V of
    attn2 only, 200 retrieved real images, rescaling augmentation and mirrored references, no captions,
    batch 2 at lr 1e-5 scaled by the batch (--scale_lr), weight decay 1e-2, 250 steps per concept (the
    README's 500 for two), and one initial rare word per joint concept, as the official code gives them."""
    return {
        "mode": "crossattn_kv",
        "initializer": "ktn+pll+ucd",
        "captions": False,
        "num_reg_images": 200,
        "augment": True,
        "flip": True,
        "max_steps": 250 * num_concepts,
        "batch_size": 2,
        "learning_rate": 2e-5,
        "weight_decay": 1e-2,
        "checkpoint_every": 125,
    }


@dataclass
class CustomDiffusionConfig:
    modifier_token: str = setting(
        "<new1>", "the modifier token V* placed before the class noun", word=True, flag="--token"
    )
    initializer: str = setting(
        "ktn",
        "the rare word V* starts from, as in the paper; jointly trained tokens take one word each from a "
        "'+'-separated list (ktn+pll+ucd), in turn",
    )
    mode: str = setting(
        "crossattn",
        "crossattn: all of attn2 (Q, K, V, out); crossattn_kv: K and V only (the paper's "
        "default, and what the closed-form merge solves for)",
        choices=MODES,
    )
    prior_preservation: bool = setting(True, "train on retrieved real images with their own captions too")
    num_reg_images: int = setting(100, "regularisation images retrieved per subject", at_least=1)
    reg_pool: str | None = setting(
        None, "folder of captioned images (x.png + x.txt) to retrieve from (default on the world: renders)"
    )
    reg_pool_size: int = setting(1500, "world renders to retrieve from", at_least=1)
    clip: str | None = setting(None, "CLIPModel folder for retrieval from a real pool")
    prior_loss_weight: float = setting(1.0, "weight of the regularisation loss", at_least=0)
    augment: bool = setting(
        True, "rescale references with 'far away' / 'zoomed in' prompts, the loss masked to the valid region"
    )
    augment_variants: int = setting(8, "rescaled variants per reference image (their latents are cached)", at_least=1)
    captions: bool = setting(True, "append each reference image's caption (if it has one) to its prompts")
    recipe: str = recipe_setting()
    train: TrainConfig | None = setting(None, "trainer settings (default: the method's, 750 steps per concept)")

    def __post_init__(self) -> None:
        parse_fields(self)  # every setting to its declared type and values, however the settings were built
        if not all(self.initializer.split("+")):
            raise LimnerError(f"--set initializer={self.initializer!r}: give a word, or words joined by '+'")
