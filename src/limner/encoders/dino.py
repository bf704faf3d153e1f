"""DINO image embeddings (the DINO subject-fidelity score): CLS features of a DINO, DINOv2 or ViT
transformers folder. Apart from CLIP because it embeds images only and has no world stand-in."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from limner.encoders.folders import transformers_model_type
from limner.errors import LimnerError
from limner.images import ImageLike, to_pil


class DINOEncoder:
    """DINO / DINOv2 / ViT CLS features from a local transformers folder (--dino)."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel

        folder = Path(folder)
        kind = transformers_model_type(folder, "DINO or DINOv2 (ViT)", "--dino")
        if kind not in ("dinov2", "vit", "dinov2_with_registers", "dinov3_vit"):
            raise LimnerError(
                f"--dino {folder}: this is a '{kind or 'unknown'}' model; give a DINO ViT or DINOv2 folder "
                "(e.g. facebook/dino-vits16 saved locally)"
            )
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.device = device
        self.name = f"dino:{folder.name}"

    @torch.no_grad()
    def images(self, images: list[ImageLike]) -> torch.Tensor:
        px = self.processor(images=to_pil(images), return_tensors="pt")["pixel_values"].to(self.device)
        cls = self.model(pixel_values=px).last_hidden_state[:, 0]
        return F.normalize(cls.float(), dim=-1).cpu()
