"""Faces: identity embeddings (Face-Sim, Face-Div) and the face analysis identity methods build on.

- `InsightFaceEmbedder`: ArcFace through insightface + onnxruntime, for real photos. It detects faces,
  so it is also a `FaceAnalysis`: each face's box, 5 keypoints and identity embedding.
- `WorldFaceEmbedder`: the world's identity embedder. World portraits are one face filling a 64 px
  picture, so it embeds the whole picture and detects nothing: it is a `FaceEmbedder` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from limner.errors import LimnerError
from limner.images import ImageLike, at_64px, to_pil


@dataclass(frozen=True, eq=False)
class Face:
    """One face found in a picture, in that picture's pixel coordinates."""

    box: np.ndarray  # [4] x0, y0, x1, y1
    keypoints: np.ndarray  # [5, 2] (x, y): the two eyes, the nose tip, the two mouth corners (the detector's order)
    embedding: torch.Tensor  # [d] float32, L2-normalised: cosine says "same person"
    mask: np.ndarray | None = None  # [H, W] bool where the face is; None where the analyser does not segment


@runtime_checkable
class FaceAnalysis(Protocol):
    """Finds the faces in each picture and describes each: what identity methods need from a reference
    (the box to crop, keypoints to align it or to draw as a control image, the identity embedding),
    after insightface's FaceAnalysis."""

    name: str

    def analyse(self, images: list[ImageLike]) -> list[list[Face]]:
        """Per picture, every face found (an empty list where none is)."""
        ...


class WorldFaceEmbedder:
    """The world's identity embedder (an ArcFace stand-in trained on renderer identities)."""

    name = "face:world-identity"

    def __init__(self, probes_folder: str | Path):
        from limner.world.probes import load_probe

        self.net = load_probe(Path(probes_folder), "identity")

    @torch.no_grad()
    def faces(self, images: list[ImageLike]) -> tuple[torch.Tensor, torch.Tensor]:
        from limner.world.probes import embed_identity

        return embed_identity(self.net, at_64px(images)).float(), torch.ones(len(images), dtype=torch.bool)


class InsightFaceEmbedder:
    """ArcFace embeddings of the largest detected face, from a local insightface model folder
    (e.g. buffalo_l or antelopev2, with its detector and recognition .onnx files), via onnxruntime."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        folder = Path(folder)
        if not folder.is_dir() or not list(folder.glob("*.onnx")):
            raise LimnerError(
                f"--face {folder}: no .onnx models there; give a local insightface model folder (e.g. "
                "models/buffalo_l with det_10g.onnx and w600k_r50.onnx)"
            )
        if folder.parent.name != "models":
            # insightface looks for <root>/models/<name> and downloads the pack when it is not exactly there
            raise LimnerError(
                f"--face {folder}: insightface needs the layout <root>/models/<name>/*.onnx (e.g. "
                "~/.insightface/models/buffalo_l); move the folder there so nothing is downloaded"
            )
        try:
            from insightface.app import FaceAnalysis
        except ImportError as e:
            raise LimnerError(
                "--face needs the insightface and onnxruntime packages: pip install insightface onnxruntime"
            ) from e
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if device.startswith("cuda")
            else ["CPUExecutionProvider"]
        )
        self.app = FaceAnalysis(name=folder.name, root=str(folder.parent.parent), providers=providers)
        self.app.prepare(ctx_id=0 if device.startswith("cuda") else -1, det_size=(640, 640))
        self.name = f"face:{folder.name}"

    def analyse(self, images: list[ImageLike]) -> list[list[Face]]:
        found = []
        for im in to_pil(images):
            faces = self.app.get(np.asarray(im.convert("RGB"))[:, :, ::-1])  # insightface reads BGR, as OpenCV does
            # insightface segments nothing: no mask
            found.append(
                [
                    Face(box=f.bbox, keypoints=f.kps, embedding=torch.from_numpy(f.normed_embedding).float())
                    for f in faces
                ]
            )
        return found

    def faces(self, images: list[ImageLike]) -> tuple[torch.Tensor, torch.Tensor]:
        embs, found = [], []
        for faces in self.analyse(images):
            if faces:
                face = max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
                embs.append(face.embedding)
                found.append(True)
            else:
                embs.append(torch.zeros(512))
                found.append(False)
        return torch.stack(embs), torch.tensor(found)
