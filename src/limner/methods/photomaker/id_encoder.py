"""PhotoMaker's ID encoder (Li et al., 2024, section 3.2): ID images -> an embedding each -> fused into the class word.

    e_i   = [P_1 f(x_i) ; P_2 f(x_i)]      f: the CLIP vision tower's pooled output; P_k: one projection per text
                                           encoder of the base (SDXL: 768 + 1280 = 2048, the width of its prompt
                                           embedding; a one-encoder base such as SD 1.5 or the world's: one)
    s*_i  = Fuse(s_class, e_i)             the class word's text embedding fused with image i (the shared fuse MLP)
    s*    = [s*_1, ..., s*_N]              the stacked ID embedding, written over the N copies of the class token

Submodule names are the official `PhotoMakerIDEncoder`'s (vision_model, visual_projection, visual_projection_2,
fuse_module), so its `id_encoder` state dict loads by key. The vision tower's shape comes from the base's image
encoder (limner's pretraining) or from the checkpoint's own tensors (`vision_config_from_state`: the official file
carries no config).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from limner.adapters import FuseMLP
from limner.errors import LimnerError

OPENAI_HEAD_DIM = 64  # CLIP's vision towers (ViT-L/14 included) use 64-wide attention heads


class IDEncoder(nn.Module):
    """The CLIP vision tower, the projections onto the text encoders' widths, and the fuse module."""

    def __init__(self, vision_config, text_widths: Sequence[int]):
        from transformers import CLIPVisionModelWithProjection

        super().__init__()
        if not 1 <= len(text_widths) <= 2:
            raise LimnerError(f"PhotoMaker fuses into one or two text encoders' embeddings, not {len(text_widths)}")
        config = vision_config.__class__(**(vision_config.to_dict() | {"projection_dim": int(text_widths[0])}))
        clip = CLIPVisionModelWithProjection(config)
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection
        hidden = int(config.hidden_size)
        if len(text_widths) == 2:
            self.visual_projection_2 = nn.Linear(hidden, int(text_widths[1]), bias=False)
        self.fuse_module = FuseMLP(sum(int(w) for w in text_widths))
        self.text_widths = [int(w) for w in text_widths]
        self.vision_config = config

    @property
    def projections(self) -> list[nn.Linear]:
        extra = [self.visual_projection_2] if hasattr(self, "visual_projection_2") else []
        return [self.visual_projection, *extra]

    tokens_per_image = 1  # class-token copies an ID image fills (v2: 2)

    def embed(self, pixels: torch.Tensor, id_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """[N, 3, S, S] ID images -> [N, sum of text widths]: each image's ID embedding e_i (v1 reads no face
        embedding: `id_embeds` is v2's)."""
        pooled = self.vision_model(pixel_values=pixels).pooler_output
        return torch.cat([p(pooled) for p in self.projections], dim=-1)

    def forward(
        self,
        pixels: torch.Tensor,
        prompt_embeds: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        id_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The ID embeddings of `pixels`; with `prompt_embeds` [B, L, d], those embeddings with position
        (rows[j], tokens[j]) replaced by the fusion of that class-token copy and ID token j (image j for v1; image
        j // 2, its token j % 2 for v2), as the official forward(id_pixel_values, prompt_embeds, class_tokens_mask,
        id_embeds)."""
        embeds = self.embed(pixels, id_embeds)
        if prompt_embeds is None:
            return embeds
        embeds = embeds.reshape(-1, embeds.shape[-1])
        fused = self.fuse_module(prompt_embeds[rows, tokens], embeds)
        return prompt_embeds.index_put((rows, tokens), fused.to(prompt_embeds.dtype))

    def load_from_clip(self, folder: Path) -> None:
        """The vision tower (and the first projection, where its width fits) from a CLIPVisionModelWithProjection
        folder: where limner's pretraining starts."""
        from transformers import CLIPVisionModelWithProjection

        clip = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True)
        self.vision_model.load_state_dict(clip.vision_model.state_dict())
        if tuple(clip.visual_projection.weight.shape) == tuple(self.visual_projection.weight.shape):
            self.visual_projection.load_state_dict(clip.visual_projection.state_dict())

    def trainable_layer_names(self, n: int) -> list[str]:
        """State-dict prefixes of what trains: the tower's last `n` layers, its final norm, the projections and the
        fuse module (the paper fine-tunes the image encoder's last layers with the new parts)."""
        layers = self.vision_model.encoder.layers
        if not 0 <= n <= len(layers):
            raise LimnerError(f"image_encoder_trainable_layers={n}: the image encoder has {len(layers)} layers")
        tail = [f"vision_model.encoder.layers.{i}." for i in range(len(layers) - n, len(layers))]
        heads = ["visual_projection.", "visual_projection_2.", "fuse_module."]
        return [*tail, *(["vision_model.post_layernorm."] if n else []), *heads]


def vision_config_from_state(state: dict[str, torch.Tensor], where: Path | str):
    """The CLIPVisionConfig an official `id_encoder` state dict was made with, read off its tensors' shapes (the
    heads from CLIP's 64-wide heads)."""
    from transformers import CLIPVisionConfig

    try:
        patch = state["vision_model.embeddings.patch_embedding.weight"]
        positions = state["vision_model.embeddings.position_embedding.weight"]
        fc1 = state["vision_model.encoder.layers.0.mlp.fc1.weight"]
    except KeyError as e:
        raise LimnerError(
            f"PhotoMaker checkpoint {where}: id_encoder has no {e.args[0]}: not a CLIP vision tower"
        ) from e
    layers = {int(m.group(1)) for k in state if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))}
    hidden, side = int(patch.shape[0]), int(patch.shape[-1])
    grid = int(round((int(positions.shape[0]) - 1) ** 0.5))
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=int(fc1.shape[0]),
        num_hidden_layers=max(layers) + 1,
        num_attention_heads=max(1, hidden // OPENAI_HEAD_DIM),
        image_size=grid * side,
        patch_size=side,
        projection_dim=int(state["visual_projection.weight"].shape[0])
        if "visual_projection.weight" in state
        else hidden,
    )


def text_widths(pipe) -> list[int]:
    """The widths of the base's text encoders' hidden states, in the order their embeddings are concatenated."""
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    return [int(te.config.hidden_size) for te in encoders]


def id_processor(image_size: int, extractor: Path | None):
    """The ID images' preprocessing: the base's own CLIP feature extractor where it has one (the world's), else
    CLIP's standard one at the tower's size (what the official pipeline uses: CLIPImageProcessor())."""
    from transformers import CLIPImageProcessor

    if extractor is not None and (Path(extractor) / "preprocessor_config.json").is_file():
        return CLIPImageProcessor.from_pretrained(extractor)
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=image_size)


def pixels_of(processor, crops: list[np.ndarray]) -> torch.Tensor:
    from limner.images import to_pil

    return processor(images=to_pil(crops), return_tensors="pt").pixel_values
