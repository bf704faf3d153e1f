"""Image and text encoders that metrics are computed with, each loaded from a local folder.

- CLIP (CLIP-I, CLIP-T): a transformers CLIPModel folder, or the world's own CLIP;
- DINO: a transformers ViT / DINOv2 folder (CLS token features);
- faces (Face-Sim, Face-Div): ArcFace through insightface + onnxruntime for real photos, or the
  world's identity embedder.
Every encoder returns L2-normalised float32 embeddings, one row per input.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from limner.errors import LimnerError

ImageLike = Image.Image | np.ndarray


def _pil(images: list[ImageLike]) -> list[Image.Image]:
    return [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in images]


def _model_type(folder: Path, what: str, flag: str) -> str:
    cfg = folder / "config.json"
    if not folder.is_dir() or not cfg.exists():
        raise LimnerError(f"{flag} {folder}: not a transformers model folder (no config.json); point it at a local {what} folder")
    return json.loads(cfg.read_text()).get("model_type", "")


class CLIPEncoder:
    """CLIP image and text embeddings from a local transformers CLIPModel folder (--clip)."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(folder)
        kind = _model_type(folder, "CLIP (CLIPModel)", "--clip")
        if kind != "clip":
            raise LimnerError(f"--clip {folder}: this is a '{kind or 'unknown'}' model, not CLIP; give a CLIPModel folder "
                              "such as openai/clip-vit-base-patch32 saved locally")
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        self.device = device
        self.name = f"clip:{folder.name}"

    @torch.no_grad()
    def images(self, images: list[ImageLike]) -> torch.Tensor:
        px = self.processor(images=_pil(images), return_tensors="pt")["pixel_values"].to(self.device)
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
        self.vision = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder").to(device, torch.float32).eval()
        head = load_file(str(folder / "clip_text_projection.safetensors"))
        self.projection = head["text_projection.weight"].float().to(device)
        self.device = device
        self.name = "clip:world"

    @torch.no_grad()
    def images(self, images: list[ImageLike]) -> torch.Tensor:
        arr = np.stack([np.asarray(im.convert("RGB").resize((64, 64)) if isinstance(im, Image.Image) else im) for im in images])
        px = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(self.device)
        return F.normalize(self.vision(pixel_values=px).image_embeds.float(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
                             return_tensors="pt").input_ids.to(self.device)
        pooled = self.text(ids).pooler_output.float()
        return F.normalize(pooled @ self.projection.t(), dim=-1).cpu()


class DINOEncoder:
    """DINO / DINOv2 / ViT CLS features from a local transformers folder (--dino)."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModel

        folder = Path(folder)
        kind = _model_type(folder, "DINO or DINOv2 (ViT)", "--dino")
        if kind not in ("dinov2", "vit", "dinov2_with_registers", "dinov3_vit"):
            raise LimnerError(f"--dino {folder}: this is a '{kind or 'unknown'}' model; give a DINO ViT or DINOv2 folder "
                              "(e.g. facebook/dino-vits16 saved locally)")
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.device = device
        self.name = f"dino:{folder.name}"

    @torch.no_grad()
    def images(self, images: list[ImageLike]) -> torch.Tensor:
        px = self.processor(images=_pil(images), return_tensors="pt")["pixel_values"].to(self.device)
        cls = self.model(pixel_values=px).last_hidden_state[:, 0]
        return F.normalize(cls.float(), dim=-1).cpu()


class WorldFaceEmbedder:
    """The world's identity embedder (an ArcFace stand-in trained on renderer identities)."""

    name = "face:world-identity"

    def __init__(self, probes_folder: str | Path):
        from limner.world.probes import load_probe

        self.net = load_probe(Path(probes_folder), "identity")

    @torch.no_grad()
    def faces(self, images: list[ImageLike]) -> tuple[torch.Tensor, torch.Tensor]:
        from limner.world.probes import embed_identity

        arr = np.stack([np.asarray(im.convert("RGB").resize((64, 64)) if isinstance(im, Image.Image) else im) for im in images])
        return embed_identity(self.net, arr).float(), torch.ones(len(images), dtype=torch.bool)


class InsightFaceEmbedder:
    """ArcFace embeddings of the largest detected face, from a local insightface model folder
    (e.g. buffalo_l or antelopev2, with its detector and recognition .onnx files), via onnxruntime."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        folder = Path(folder)
        if not folder.is_dir() or not list(folder.glob("*.onnx")):
            raise LimnerError(f"--face {folder}: no .onnx models there; give a local insightface model folder (e.g. "
                              "models/buffalo_l with det_10g.onnx and w600k_r50.onnx)")
        if folder.parent.name != "models":
            # insightface looks for <root>/models/<name> and downloads the pack when it is not exactly there
            raise LimnerError(f"--face {folder}: insightface needs the layout <root>/models/<name>/*.onnx (e.g. "
                              "~/.insightface/models/buffalo_l); move the folder there so nothing is downloaded")
        try:
            from insightface.app import FaceAnalysis
        except ImportError as e:
            raise LimnerError("--face needs the insightface and onnxruntime packages: pip install insightface onnxruntime") from e
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
        self.app = FaceAnalysis(name=folder.name, root=str(folder.parent.parent), providers=providers)
        self.app.prepare(ctx_id=0 if device.startswith("cuda") else -1, det_size=(640, 640))
        self.name = f"face:{folder.name}"

    def faces(self, images: list[ImageLike]) -> tuple[torch.Tensor, torch.Tensor]:
        embs, found = [], []
        for im in _pil(images):
            faces = self.app.get(np.asarray(im.convert("RGB"))[:, :, ::-1])
            if faces:
                face = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
                embs.append(torch.from_numpy(face.normed_embedding).float())
                found.append(True)
            else:
                embs.append(torch.zeros(512))
                found.append(False)
        return torch.stack(embs), torch.tensor(found)
