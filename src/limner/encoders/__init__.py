"""Encoders: images, texts and faces to L2-normalised float32 embeddings, one row per input, each
model loaded from a local folder (or the world's own stand-ins).

- clip.py: CLIP images and texts (CLIP-I, CLIP-T, Custom Diffusion's retrieval);
- dino.py: DINO images (DINO subject fidelity);
- faces/: identity embeddings (Face-Sim, Face-Div) and the `FaceAnalysis` identity methods need (insightface
  model folders through onnxruntime, and the world's own analyser).

Callers type against the roles below, not the classes, so a new encoder only has to fit its role.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from limner.encoders.clip import CLIPEncoder, WorldCLIP
from limner.encoders.dino import DINOEncoder
from limner.encoders.faces import (
    Face,
    FaceAnalysis,
    InsightFaceEmbedder,
    OnnxFaceAnalysis,
    WorldFaceAnalysis,
    WorldFaceEmbedder,
    face_analysis,
)
from limner.images import ImageLike


@runtime_checkable
class ImageEncoder(Protocol):
    name: str

    def images(self, images: list[ImageLike]) -> torch.Tensor:
        """[B, d] embeddings, one row per picture."""
        ...


@runtime_checkable
class TextEncoder(Protocol):
    name: str

    def texts(self, texts: list[str]) -> torch.Tensor:
        """[B, d] embeddings, one row per text."""
        ...


@runtime_checkable
class FaceEmbedder(Protocol):
    name: str

    def faces(self, images: list[ImageLike]) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, d] embeddings of each picture's face, [B] bool: whether a face was found; a zero row where not)."""
        ...


__all__ = [
    "CLIPEncoder",
    "DINOEncoder",
    "Face",
    "FaceAnalysis",
    "FaceEmbedder",
    "ImageEncoder",
    "ImageLike",
    "InsightFaceEmbedder",
    "OnnxFaceAnalysis",
    "TextEncoder",
    "WorldCLIP",
    "WorldFaceAnalysis",
    "WorldFaceEmbedder",
    "face_analysis",
]
