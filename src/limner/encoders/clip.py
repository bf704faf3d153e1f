"""CLIP image and text embeddings (CLIP-I, CLIP-T; Custom Diffusion's retrieval): a transformers
CLIPModel folder for real images, or the world's own CLIP, read from the world base folder."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from limner.encoders.folders import transformers_model_type
from limner.errors import LimnerError
from limner.images import ImageLike, at_64px, to_pil, to_unit_range


class CLIPEncoder:
    """CLIP image and text embeddings from a local transformers CLIPModel folder (--clip)."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(folder)
        kind = transformers_model_type(folder, "CLIP (CLIPModel)", "--clip")
        if kind != "clip":
            raise LimnerError(
                f"--clip {folder}: this is a '{kind or 'unknown'}' model, not CLIP; give a CLIPModel folder "
                "such as openai/clip-vit-base-patch32 saved locally"
            )
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        self.device = device
        self.name = f"clip:{folder.name}"

    @torch.no_grad()
    def images(self, images: list[ImageLike]) -> torch.Tensor:
        px = self.processor(images=to_pil(images), return_tensors="pt")["pixel_values"].to(self.device)
        out = self.model.get_image_features(pixel_values=px)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(out.float(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        tok = self.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        out = self.model.get_text_features(**tok)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(out.float(), dim=-1).cpu()


class WorldCLIP:
    """The world's CLIP: the base folder's text encoder + vision tower + the saved text projection."""

    def __init__(self, base_folder: str | Path, device: str = "cpu"):
        from safetensors.torch import load_file
        from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

        folder = Path(base_folder)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.text = CLIPTextModel.from_pretrained(folder / "text_encoder").to(device, torch.float32).eval()
        self.vision = (
            CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder").to(device, torch.float32).eval()
        )
        head = load_file(str(folder / "clip_text_projection.safetensors"))
        self.projection = head["text_projection.weight"].float().to(device)
        self.device = device
        self.name = "clip:world"

    @torch.no_grad()
    def images(self, images: list[ImageLike]) -> torch.Tensor:
        px = to_unit_range(at_64px(images)).to(self.device)
        return F.normalize(self.vision(pixel_values=px).image_embeds.float(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids.to(self.device)
        pooled = self.text(ids).pooler_output.float()
        return F.normalize(pooled @ self.projection.t(), dim=-1).cpu()
