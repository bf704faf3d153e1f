"""Faces: the face analysis identity methods build on, and identity embeddings (Face-Sim, Face-Div).

One role, `FaceAnalysis`: for each picture, every face found, each with its box, 5 keypoints, identity
embedding, the crop aligned onto the backend's template, and a mask where the backend segments. Two
backends run the same steps (letterbox, SCRFD-style detection and decoding, NMS, similarity alignment,
embedding of the aligned crop):

- `OnnxFaceAnalysis` (real photos): an insightface model folder (antelopev2, buffalo_l) through
  onnxruntime (scrfd.py, align.py, onnx_models.py). `InsightFaceEmbedder` is it as a FaceEmbedder.
- `WorldFaceAnalysis` (the world): a small detector trained on renders and the identity probe (world.py).

`WorldFaceEmbedder` is the world's whole-picture identity embedder that evaluation scores with (world
portraits are one face filling a 64 px picture); it finds no faces, so it is a `FaceEmbedder` only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from limner.encoders.faces.base import (
    Face,
    FaceAnalysis,
    FaceEmbeddings,
    identity_input,
    largest_face,
    reference_face,
)
from limner.encoders.faces.onnx_models import InsightFaceEmbedder, OnnxFaceAnalysis
from limner.encoders.faces.world import WorldFaceAnalysis
from limner.images import ImageLike, at_64px


class WorldFaceEmbedder:
    """The world's identity embedder (an ArcFace stand-in trained on renderer identities) on whole pictures."""

    name = "face:world-identity"

    def __init__(self, probes_folder: str | Path):
        from limner.world.probes import load_probe

        self.net = load_probe(Path(probes_folder), "identity")

    @torch.no_grad()
    def faces(self, images: list[ImageLike]) -> tuple[torch.Tensor, torch.Tensor]:
        from limner.world.probes import embed_identity

        return embed_identity(self.net, at_64px(images)).float(), torch.ones(len(images), dtype=torch.bool)


def face_analysis(folder: str | Path | None, device: str = "cpu") -> FaceAnalysis:
    """The face analysis for `--faces DIR`: an insightface model folder, or the world's own when None."""
    return OnnxFaceAnalysis(folder, device) if folder is not None else WorldFaceAnalysis()


__all__ = [
    "Face",
    "FaceAnalysis",
    "FaceEmbeddings",
    "InsightFaceEmbedder",
    "OnnxFaceAnalysis",
    "WorldFaceAnalysis",
    "WorldFaceEmbedder",
    "face_analysis",
    "identity_input",
    "largest_face",
    "reference_face",
]
