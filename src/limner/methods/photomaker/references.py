"""What PhotoMaker's ID encoder reads of each reference: the person's face, found by the face analysis.

The paper's ID images are crops around the face (its data pipeline detects the face and crops the head with some
context); limner finds each reference's faces with the face analysis (the world's, or an insightface folder with
`--faces`), takes the largest (as the official identity pipelines do, saying so when there were several) and cuts
a square `crop_scale` times the face box's side around its centre, padded with the picture's edge where the square
runs off it. Training crops its references the same way, with the same analyser: the encoder never sees a crop
drawn any other way. No face is an error naming the picture.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from limner.encoders.faces import FaceAnalysis, identity_input, reference_face
from limner.errors import LimnerError
from limner.io import IMAGE_SUFFIXES
from limner.subject import Subject

MIN_SIDE = 8  # a reference smaller than this shows no face the analyser can find


def face_square(image: np.ndarray, box: np.ndarray, scale: float) -> np.ndarray:
    """The square of side `scale` x the box's longer side centred on the box, edge-padded where it leaves the
    picture."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(2, int(round(scale * max(x1 - x0, y1 - y0))))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    h, w = image.shape[:2]
    pad = max(0, -left, -top, left + side - w, top + side - h)
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge") if pad else image
    return np.ascontiguousarray(padded[top + pad : top + pad + side, left + pad : left + pad + side])


def reference_names(subject: Subject) -> list[str]:
    """How an error names each reference: its file where known (`--image`, a subject folder), else its index."""
    files = subject.meta.get("files")
    if files is None and subject.meta.get("path"):
        folder = Path(subject.meta["path"])  # a subject folder's pictures, in the order limner reads them
        files = (
            sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else None
        )
    if files is not None and len(files) == len(subject.images):
        return [f"reference {f}" for f in files]
    return [f"subject {subject.name}, reference {i}" for i in range(len(subject.images))]


def id_faces(
    images: list[np.ndarray],
    names: list[str],
    analysis: FaceAnalysis,
    scale: float,
    strict: bool = True,
    norm: float | None = 1.0,
) -> tuple[list[np.ndarray | None], list[torch.Tensor | None], list[str]]:
    """Each picture's face crop and that face's identity embedding (PhotoMaker v2 reads both; the largest face the
    analysis found), and notes for pictures with several faces. strict: a picture with no face is an error naming it
    (encoding); otherwise its crop and embedding are None (training skips it). The embedding has norm `norm`, or is
    the recogniser's raw one with None (the official v2 checkpoint's input: encoders.faces.identity_input)."""
    for image, name in zip(images, names):
        a = np.asarray(image)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise LimnerError(f"{name} is not an RGB picture (shape {a.shape}, {a.dtype})")
        if min(a.shape[:2]) < MIN_SIDE:
            raise LimnerError(f"{name} is {a.shape[1]}x{a.shape[0]} px; give a photo of the person's face")
    crops: list[np.ndarray | None] = []
    embeddings: list[torch.Tensor | None] = []
    notes: list[str] = []
    for image, faces, name in zip(images, analysis.analyse(list(images)), names):
        if not faces and not strict:
            crops.append(None)
            embeddings.append(None)
            continue
        face, note = reference_face(faces, name)
        if note:
            notes.append(note)
        crops.append(face_square(np.asarray(image), face.box, scale))
        embeddings.append(identity_input(face, norm))
    return crops, embeddings, notes


def warn_notes(notes: list[str]) -> None:
    for note in notes:
        warnings.warn(note, stacklevel=2)
