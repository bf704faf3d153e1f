"""A character as StoryMaker reads it from one picture: the face found, its identity embedding and aligned crop, and
the whole character cut out with its mask on white.

The official pipeline takes a reference picture, its portrait mask and the face analyser's largest face: the
identity embedding (ArcFace's normed embedding), the face aligned by its 5 keypoints, and the mask's bounding box
with everything outside the mask painted white, squeezed to the image encoder's square input. limner does the
same with its face analysis (`limner.encoders.faces`): the world's analyser segments the character, so its mask
is the analyser's, never the renderer's; an insightface pack segments nothing, so a real photo is cut out with
the mask the user gave with the subject, or read whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from limner.encoders.faces import FaceAnalysis, reference_face
from limner.errors import LimnerError

WHITE = 255
MIN_SIDE = 8


@dataclass
class CharacterPicture:
    """What the encoders read of one character: the identity embedding [d], the aligned face crop and the cut-out
    (uint8 RGB), and a note where the picture showed several faces."""

    id_embed: np.ndarray
    face_crop: np.ndarray
    cutout: np.ndarray
    note: str | None = None
    mask_from: str = "analyser"  # analyser | given | none


def cut_out_on_white(picture: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The mask's bounding box with everything outside the mask white (the official crop_image); the whole picture
    where there is no mask."""
    if mask is None:
        return picture
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != picture.shape[:2]:
        mask = np.asarray(Image.fromarray(mask).resize(picture.shape[1::-1], Image.NEAREST))
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return picture
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    return np.where(mask[box][..., None], picture[box], np.uint8(WHITE)).astype(np.uint8)


def character_pictures(
    pictures: list[np.ndarray],
    analyser: FaceAnalysis,
    where: list[str],
    masks: list[np.ndarray | None] | None = None,
) -> list[CharacterPicture]:
    """Each picture's character: its largest face (no face is an error naming the picture; several faces a note
    naming the one taken), cut out with the analyser's mask, else the given one, else whole."""
    for picture, name in zip(pictures, where):
        a = np.asarray(picture)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise LimnerError(f"{name} is not an RGB picture (shape {a.shape}, {a.dtype})")
        if min(a.shape[:2]) < MIN_SIDE:
            raise LimnerError(f"{name} is {a.shape[1]}x{a.shape[0]} px; give at least {MIN_SIDE} px a side")
    found = analyser.analyse([np.asarray(p) for p in pictures])
    out = []
    for k, (picture, faces, name) in enumerate(zip(pictures, found, where)):
        face, note = reference_face(faces, name)
        mask, mask_from = face.mask, "analyser"
        if mask is None:  # a backend that segments nothing (insightface): the user's own mask, else the whole picture
            given = masks[k] if masks is not None else None
            mask, mask_from = (given, "given") if given is not None else (None, "none")
        elif not np.asarray(mask).any():
            mask, mask_from = None, "none"
        crop = face.crop if face.crop is not None else _box_crop(picture, face.box)
        out.append(
            CharacterPicture(
                id_embed=face.embedding.detach().float().numpy(),
                face_crop=np.asarray(crop, dtype=np.uint8),
                cutout=cut_out_on_white(np.asarray(picture), mask),
                note=note,
                mask_from=mask_from,
            )
        )
    return out


def _box_crop(picture: np.ndarray, box: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    h, w = picture.shape[:2]
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, max(x1, x0 + 1)), min(h, max(y1, y0 + 1))
    return picture[y0:y1, x0:x1]


def squeezed(pictures: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Each picture resized to size x size whatever its aspect (the official `ref_img.resize((224, 224))`), so the
    image encoder's centre crop cuts nothing off a tall figure."""
    return [np.asarray(Image.fromarray(p).resize((size, size), Image.BICUBIC)) for p in pictures]
