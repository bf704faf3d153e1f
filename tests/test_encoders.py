"""Encoders fit their roles (the Protocols in limner.encoders), and InsightFace's face analysis keeps
every face while the embedder scores the largest: checked with a stand-in for insightface's app, so
no model pack is needed."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from limner.encoders import (
    FaceAnalysis,
    FaceEmbedder,
    ImageEncoder,
    InsightFaceEmbedder,
    TextEncoder,
    WorldCLIP,
    WorldFaceEmbedder,
)
from limner.images import at_64px, to_unit_range
from limner.models.loading import WORLD_BASE, WORLD_PROBES


class _Detected:
    """What insightface's FaceAnalysis.get returns per face: bbox, kps, normed_embedding."""

    def __init__(self, box: list[float], seed: int):
        self.bbox = np.array(box, np.float32)
        self.kps = np.zeros((5, 2), np.float32)
        e = np.random.default_rng(seed).standard_normal(512).astype(np.float32)
        self.normed_embedding = e / np.linalg.norm(e)


class _App:
    def __init__(self, per_image: list[list[_Detected]]):
        self.per_image = iter(per_image)

    def get(self, bgr: np.ndarray) -> list[_Detected]:
        return next(self.per_image)


def _insightface(per_image: list[list[_Detected]]) -> InsightFaceEmbedder:
    emb = object.__new__(InsightFaceEmbedder)  # skips loading a model pack
    emb.app, emb.name = _App(per_image), "face:stand-in"
    return emb


def test_insightface_analysis_keeps_every_face_and_the_embedder_scores_the_largest():
    small, large = _Detected([0, 0, 10, 10], 1), _Detected([5, 5, 40, 30], 2)
    images = [np.zeros((48, 48, 3), np.uint8)] * 2
    faces = _insightface([[small, large], []]).analyse(images)
    assert [len(f) for f in faces] == [2, 0]
    assert faces[0][1].keypoints.shape == (5, 2) and faces[0][1].mask is None
    emb, found = _insightface([[small, large], []]).faces(images)
    assert found.tolist() == [True, False]
    assert torch.equal(emb[0], torch.from_numpy(large.normed_embedding)) and not emb[1].any()
    assert isinstance(_insightface([]), FaceAnalysis) and isinstance(_insightface([]), FaceEmbedder)


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
