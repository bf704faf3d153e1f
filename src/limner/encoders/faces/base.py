"""What every face-analysis backend gives: the `Face`, the `FaceAnalysis` role, and the choice of one face
per picture."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from limner.errors import LimnerError
from limner.images import ImageLike


@dataclass(frozen=True, eq=False)
class Face:
    """One face found in a picture, in that picture's pixel coordinates."""

    box: np.ndarray  # [4] x0, y0, x1, y1
    keypoints: np.ndarray  # [5, 2] (x, y): the two eyes, the nose tip, the two mouth corners (the detector's order)
    embedding: torch.Tensor  # [d] float32, L2-normalised: cosine says "same person"
    mask: np.ndarray | None = None  # [H, W] bool where the person is; None where the backend does not segment
    crop: np.ndarray | None = None  # uint8 [S, S, 3] RGB: the face aligned onto the backend's keypoint template
    score: float = 1.0  # the detector's confidence
    # the recogniser's own norm of the embedding (insightface's `embedding` is embedding x raw_norm, what official
    # InstantID and PhotoMaker v2 feed their adapters); None where the backend gives only the unit vector
    raw_norm: float | None = None

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


@runtime_checkable
class FaceAnalysis(Protocol):
    """Finds the faces in each picture and describes each: what identity methods need from a reference
    (the box to crop, keypoints to align it or to draw as a control image, the identity embedding, the
    aligned crop), after insightface's FaceAnalysis."""

    name: str

    def analyse(self, images: list[ImageLike]) -> list[list[Face]]:
        """Per picture, every face found (an empty list where none is)."""
        ...


def identity_input(face: Face, norm: float | None) -> torch.Tensor:
    """The identity embedding as an adapter reads it: the unit embedding times `norm`, what a limner adapter was
    pretrained on (its manifest records the norm); with norm None, what the official checkpoints were trained on,
    insightface's raw embedding, whose norm the backend gives (sqrt of the width, about a 512-d ArcFace's ~22,
    where it gives none)."""
    unit = face.embedding.float()
    if norm is None:
        norm = face.raw_norm if face.raw_norm is not None else math.sqrt(unit.numel())
    return unit * norm


def largest_face(faces: list[Face]) -> Face | None:
    """The face with the largest box (the one the official identity pipelines take), None for no face."""
    return max(faces, key=lambda f: f.area) if faces else None


def reference_face(faces: list[Face], where: str) -> tuple[Face, str | None]:
    """The face a reference picture gives: its only face, or its largest with a note saying so. No face is an
    error naming the picture."""
    face = largest_face(faces)
    if face is None:
        raise LimnerError(f"{where}: no face found; give a picture where the person's face is visible and frontal")
    note = None
    if len(faces) > 1:
        x0, y0, x1, y1 = (int(round(v)) for v in face.box)
        note = f"{where}: {len(faces)} faces found; took the largest (box {x0},{y0}-{x1},{y1})"
    return face, note


class FaceEmbeddings:
    """A FaceAnalysis as a FaceEmbedder: each picture's largest face's embedding (zeros where none is found)."""

    embedding_dim: int = 512

    def faces(self, images: list[ImageLike]) -> tuple[torch.Tensor, torch.Tensor]:
        embs, found = [], []
        for faces in self.analyse(images):  # type: ignore[attr-defined]
            face = largest_face(faces)
            embs.append(face.embedding if face is not None else None)
            found.append(face is not None)
        rows = [e if e is not None else torch.zeros(self.embedding_dim) for e in embs]
        return (torch.stack(rows) if rows else torch.zeros(0, self.embedding_dim)), torch.tensor(
            found, dtype=torch.bool
        )
