"""SCRFD (Guo et al. 2021), the face detector of insightface's model packs: its input and the decoding of
its outputs, in numpy, shared by the ONNX runner and the world's own detector (which is trained to give
the same outputs, so both backends run this code).

Input: the picture letterboxed into the detector's size (scaled to fit, aspect kept, placed top-left on
black), RGB, (pixel - 127.5) / 128. Outputs, per feature stride (8, 16, 32 for the packs' models): a
score per anchor (already a probability), the distances from the anchor's centre to the box's four
sides, and each keypoint's offset from the centre, both in units of the stride. Anchors sit on the grid
of the stride, at the top-left corner of each cell, `anchors` of them per cell in a row. Decoded boxes
above the score threshold meet non-maximum suppression; the rest are scaled back to the picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

INPUT_MEAN, INPUT_STD = 127.5, 128.0
SCORE_THRESHOLD, NMS_THRESHOLD = 0.5, 0.4  # insightface's defaults


@dataclass(frozen=True)
class DetectorLayout:
    """How a detector's outputs are laid out: [scores per stride..., boxes per stride..., keypoints per stride...]."""

    strides: tuple[int, ...]
    anchors: int  # per grid cell
    keypoints: bool

    @property
    def outputs(self) -> int:
        return len(self.strides) * (3 if self.keypoints else 2)


# SCRFD's exported models, told apart by their number of outputs (as insightface's model zoo does)
SCRFD_LAYOUTS = {
    layout.outputs: layout
    for layout in (
        DetectorLayout((8, 16, 32), 2, False),
        DetectorLayout((8, 16, 32), 2, True),
        DetectorLayout((8, 16, 32, 64, 128), 1, False),
        DetectorLayout((8, 16, 32, 64, 128), 1, True),
    )
}


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """image (uint8 [H, W, 3]) scaled to fit `size` (width, height) with its aspect kept, top-left on black:
    (the detector's picture, the scale from picture to detector pixels). Sizes truncate, as insightface's."""
    h, w = image.shape[:2]
    width, height = size
    if h / w > height / width:
        new_h, new_w = height, int(height / (h / w))
    else:
        new_w, new_h = width, int(width * (h / w))
    # bilinear without antialiasing, half-pixel centres: what cv2.resize does by default
    x = torch.from_numpy(np.array(image, np.float32)).permute(2, 0, 1)[None]
    resized = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    canvas = np.zeros((height, width, 3), np.uint8)
    canvas[:new_h, :new_w] = resized[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    return canvas, new_h / h


def to_blob(canvas: np.ndarray) -> np.ndarray:
    """The detector's input [1, 3, H, W] float32 from an RGB uint8 picture."""
    return ((canvas.astype(np.float32) - INPUT_MEAN) / INPUT_STD).transpose(2, 0, 1)[None]


def anchor_centres(height: int, width: int, stride: int, anchors: int) -> np.ndarray:
    """[height * width * anchors, 2] (x, y): each cell's top-left corner in input pixels, row by row,
    repeated `anchors` times in a row."""
    ys, xs = np.mgrid[:height, :width]
    centres = (np.stack([xs, ys], -1).astype(np.float32) * stride).reshape(-1, 2)
    return np.repeat(centres, anchors, axis=0)


def distance_to_box(centres: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """[N, 4] (x0, y0, x1, y1) from the distances (left, top, right, bottom) to the sides, in pixels."""
    return np.concatenate([centres - distances[:, :2], centres + distances[:, 2:4]], axis=1)


def distance_to_keypoints(centres: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """[N, K, 2] from [N, 2K] (dx, dy) offsets from the centres, in pixels."""
    return centres[:, None, :] + offsets.reshape(len(offsets), offsets.shape[1] // 2, 2)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float = NMS_THRESHOLD) -> list[int]:
    """Indices kept by greedy non-maximum suppression, best score first: a box is dropped when it overlaps a
    kept one by more than `threshold` IoU. Areas count pixels inclusively (+1), as insightface's does."""
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= threshold]
    return keep


@dataclass
class Detections:
    """Faces a detector found in one picture, best score first, in that picture's pixels."""

    boxes: np.ndarray  # [N, 4]
    scores: np.ndarray  # [N]
    keypoints: np.ndarray  # [N, 5, 2]


def decode(
    outputs: list[np.ndarray],
    layout: DetectorLayout,
    input_hw: tuple[int, int],
    scale: float,
    threshold: float = SCORE_THRESHOLD,
    nms_threshold: float = NMS_THRESHOLD,
) -> Detections:
    """One picture's detections from the detector's outputs for it (each [anchors, C], or [1, anchors, C]
    from a batched export), the letterbox `scale` undone."""
    if not layout.keypoints:
        raise ValueError("this detector gives no keypoints")
    n = len(layout.strides)
    boxes, scores, keypoints = [], [], []
    for level, stride in enumerate(layout.strides):
        score, dist, offsets = (np.asarray(outputs[level + k * n]) for k in range(3))
        if score.ndim == 3:
            score, dist, offsets = score[0], dist[0], offsets[0]
        centres = anchor_centres(input_hw[0] // stride, input_hw[1] // stride, stride, layout.anchors)
        keep = score.reshape(-1) >= threshold
        scores.append(score.reshape(-1)[keep])
        boxes.append(distance_to_box(centres[keep], dist[keep] * stride))
        keypoints.append(distance_to_keypoints(centres[keep], offsets[keep] * stride))
    all_scores = np.concatenate(scores).astype(np.float32)
    all_boxes = np.concatenate(boxes).astype(np.float32) / scale
    all_keypoints = np.concatenate(keypoints).astype(np.float32) / scale
    kept = nms(all_boxes, all_scores, nms_threshold)
    return Detections(all_boxes[kept], all_scores[kept], all_keypoints[kept])
