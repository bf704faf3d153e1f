"""Encoders fit their roles (the Protocols in limner.encoders). The insightface-folder face analysis is
checked in test_faces.py on small ONNX models built there."""

from __future__ import annotations

import numpy as np
from PIL import Image

from limner.encoders import (
    FaceAnalysis,
    FaceEmbedder,
    ImageEncoder,
    TextEncoder,
    WorldCLIP,
    WorldFaceEmbedder,
)
from limner.images import at_64px, to_unit_range
from limner.models.loading import WORLD_BASE, WORLD_PROBES


def test_world_encoders_fit_their_roles():
    clip, face = WorldCLIP(WORLD_BASE), WorldFaceEmbedder(WORLD_PROBES)
    assert isinstance(clip, ImageEncoder) and isinstance(clip, TextEncoder) and isinstance(face, FaceEmbedder)
    assert not isinstance(face, FaceAnalysis)  # it finds no faces: it embeds the whole picture


def test_image_helpers():
    pixels = np.array([[[0, 255, 51]]], np.uint8)[None]
    x = to_unit_range(pixels)
    assert (
        x.shape == (1, 3, 1, 1) and x.flatten()[:2].tolist() == [-1.0, 1.0] and abs(x.flatten()[2].item() + 0.6) < 1e-6
    )
    mixed = [Image.new("RGBA", (80, 96)), np.zeros((64, 64, 3), np.uint8)]
    assert at_64px(mixed).shape == (2, 64, 64, 3)
