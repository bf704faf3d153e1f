"""The pose InstantID's IdentityNet is given: a face's 5 keypoints found in a picture (the reference, or another
picture with `pose_image`), kept in that picture's pixels with its size, and drawn at the size of each
generation (limner.adapters.controlnet.draw_kps), fitted as limner fits every picture to a base's size: resized
to cover the picture asked, then centre-cropped."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from limner.adapters.controlnet import condition_tensor, draw_kps
from limner.errors import LimnerError
from limner.training.data import fit_points

MIN_POSE_SIDE = 16  # pixels: a smaller picture has no face to find keypoints on


def pose_from(picture: np.ndarray, faces: Any, where: str) -> dict:
    """The pose a picture gives: its largest face's keypoints, in its pixels, with its size. No face (or a picture
    too small to hold one) is an error naming it; several faces, a note naming the one taken."""
    from limner.encoders.faces import reference_face

    h, w = picture.shape[:2]
    if min(h, w) < MIN_POSE_SIDE:
        raise LimnerError(
            f"{where} is {w}x{h} px: too small to find a face's keypoints on; give a picture of at least "
            f"{MIN_POSE_SIDE} px a side showing a face in the pose wanted"
        )
    face, note = reference_face(faces.analyse([picture])[0], where)
    if note:
        warnings.warn(note, stacklevel=2)
    return pose_of(face.keypoints, w, h, where)


def pose_of(keypoints: np.ndarray, width: int, height: int, where: str) -> dict:
    """A pose record (what a concept's limner.json keeps): the keypoints in a width x height picture's pixels."""
    kps = np.asarray(keypoints, dtype=float).round(3).tolist()
    return {"source": where, "size": [int(width), int(height)], "keypoints": kps}


def fitted_keypoints(pose: dict, width: int, height: int) -> np.ndarray:
    """The pose's keypoints in a width x height picture. A face the crop cuts off is an error: the pose picture's
    shape does not fit the picture asked."""
    fitted = fit_points(pose["keypoints"], tuple(pose["size"]), width, height)
    if (fitted < 0).any() or (fitted[:, 0] >= width).any() or (fitted[:, 1] >= height).any():
        w, h = pose["size"]
        raise LimnerError(
            f"the pose from {pose['source']} ({w}x{h} px) does not fit a {width}x{height} picture: the face falls "
            f"outside once the picture is cropped to that shape; give a pose picture of the shape asked ({width}x"
            f"{height}) or draw at the pose picture's shape (--width/--height)"
        )
    return fitted


def kps_drawer(pose: dict, style: tuple[int | None, int | None] = (None, None)):
    """(height, width) -> the IdentityNet's condition image for this pose, [1, 3, H, W] in [0, 1]."""

    def draw(height: int, width: int) -> torch.Tensor:
        return condition_tensor(draw_kps(width, height, fitted_keypoints(pose, width, height), *style))

    return draw


__all__ = ["MIN_POSE_SIDE", "fitted_keypoints", "kps_drawer", "pose_from", "pose_of"]
