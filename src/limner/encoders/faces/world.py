"""The world's face analysis: a small detector trained on renders that gives SCRFD's outputs (so its
pictures go through the very letterbox, decoding and NMS the real detector's do), the face aligned onto
the world's portrait template, and the shipped identity probe reading the aligned crop.

The world's pictures are 64 px: the detector runs at 64 px with strides 4 and 8 (a full-figure
character's face is about 9 px tall, a portrait's about 26 px) and one anchor per cell. It also
segments the characters (a mask head at stride 4), which the real packs do not. The template is where a
portrait's keypoints lie on average (`limner world faces` measures it from renders), so an aligned crop
looks like the portraits the identity probe was trained on, whatever the face's place, size and tilt.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from limner.encoders.faces.align import align
from limner.encoders.faces.base import Face, FaceEmbeddings
from limner.encoders.faces.scrfd import Detections, DetectorLayout, decode, letterbox, to_blob
from limner.errors import LimnerError
from limner.images import ImageLike, to_pil
from limner.models.loading import ASSETS, WORLD_PROBES

WORLD_FACES = ASSETS / "world" / "faces"
LAYOUT = DetectorLayout(strides=(4, 8), anchors=1, keypoints=True)
DET_SIZE = 64
CROP_SIZE = 64


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class WorldFaceNet(nn.Module):
    """64 px picture (SCRFD's input normalisation) -> per stride (4, 8): a face score logit, the distances to
    the box's sides and the 5 keypoints' offsets from each cell's corner (in strides); and a character
    mask logit at 64 px. The stride-8 features are added into the stride-4 ones (a two-level FPN), so the
    small faces' cells see their body around them."""

    def __init__(self, width: int = 24):
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv(3, w, 2), _conv(w, w))  # 32 px
        self.down4 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))  # 16 px: stride 4
        self.down8 = nn.Sequential(_conv(2 * w, 3 * w, 2), _conv(3 * w, 3 * w), _conv(3 * w, 3 * w))  # stride 8
        self.lateral = nn.Conv2d(3 * w, 2 * w, 1)
        self.heads = nn.ModuleList(nn.Sequential(_conv(c, c), nn.Conv2d(c, 1 + 4 + 10, 1)) for c in (2 * w, 3 * w))
        self.mask = nn.Conv2d(2 * w, 1, 1)

    def forward(self, blob: torch.Tensor) -> dict[str, list[torch.Tensor] | torch.Tensor]:
        f4 = self.down4(self.stem(blob))
        f8 = self.down8(f4)
        f4 = f4 + F.interpolate(self.lateral(f8), scale_factor=2, mode="nearest")
        out: dict = {"scores": [], "boxes": [], "keypoints": []}
        for head, f in zip(self.heads, (f4, f8)):
            y = head(f).permute(0, 2, 3, 1).flatten(1, 2)  # [B, cells row by row, 15]
            out["scores"].append(y[..., :1])
            out["boxes"].append(F.softplus(y[..., 1:5]))  # distances to the sides are positive
            out["keypoints"].append(y[..., 5:])
        out["mask"] = F.interpolate(self.mask(f4), scale_factor=4, mode="bilinear", align_corners=False)
        return out

    @torch.no_grad()
    def detector_outputs(self, blob: torch.Tensor) -> tuple[list[list[np.ndarray]], torch.Tensor]:
        """Per picture SCRFD's output list (scores as probabilities per stride, then boxes, then keypoints), and
        the mask logits [B, 1, 64, 64]."""
        out = self(blob)
        levels = [s.sigmoid() for s in out["scores"]] + out["boxes"] + out["keypoints"]
        return [[t[i].numpy() for t in levels] for i in range(len(blob))], out["mask"]


def save_face_net(net: WorldFaceNet, folder: Path, record: dict) -> None:
    """fp16 safetensors (the batch-norm counters as they are) and faces.json: template, settings, metrics."""
    from safetensors.torch import save_file

    from limner.io import write_json_atomic, written_atomically

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.dtype.is_floating_point else v).contiguous() for k, v in net.state_dict().items()}
    with written_atomically(folder / "detector.safetensors") as tmp:
        save_file(state, str(tmp))
    write_json_atomic(folder / "faces.json", record)


def load_face_net(folder: Path) -> tuple[WorldFaceNet, dict]:
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, meta = folder / "detector.safetensors", folder / "faces.json"
    if not weights.exists() or not meta.exists():
        raise LimnerError(
            f"world face analysis: {weights.name} and {meta.name} expected in {folder}; reinstall limner or "
            "run `limner world faces` to train them"
        )
    record = json.loads(meta.read_text())
    net = WorldFaceNet(record["settings"]["width"])
    net.load_state_dict({k: v.float() if v.dtype.is_floating_point else v for k, v in load_file(str(weights)).items()})
    return net.eval(), record


class WorldFaceAnalysis(FaceEmbeddings):
    """Faces in world pictures, found the way real photos' are: detected, aligned, embedded by the identity
    probe (128-d); each with the character's mask."""

    name = "face:world-analysis"

    def __init__(self, faces_folder: str | Path = WORLD_FACES, probes_folder: str | Path = WORLD_PROBES):
        from limner.world.probes import load_probe

        self.net, record = load_face_net(Path(faces_folder))
        self.template = np.asarray(record["template"], np.float64)
        self.threshold = float(record["settings"].get("threshold", 0.5))
        self.identity = load_probe(Path(probes_folder), "identity")
        self.embedding_dim = self.identity.heads[next(iter(self.identity.heads))].in_features

    @torch.no_grad()
    def detect(self, images: list[ImageLike], batch: int = 256) -> list[tuple[np.ndarray, Detections, np.ndarray]]:
        """Per picture: the picture (uint8 RGB), its detections, and the character mask logits in its pixels."""
        pictures = [np.asarray(im.convert("RGB")) for im in to_pil(images)]
        found = []
        for start in range(0, len(pictures), batch):
            chunk = pictures[start : start + batch]
            boxed = [letterbox(p, (DET_SIZE, DET_SIZE)) for p in chunk]
            blob = torch.from_numpy(np.concatenate([to_blob(canvas) for canvas, _ in boxed]))
            outputs, masks = self.net.detector_outputs(blob)
            for picture, (canvas, scale), out, mask in zip(chunk, boxed, outputs, masks):
                detected = decode(out, LAYOUT, canvas.shape[:2], scale, self.threshold)
                found.append((picture, detected, _unletterbox(mask, scale, picture.shape[:2])))
        return found

    @torch.no_grad()
    def analyse(self, images: list[ImageLike]) -> list[list[Face]]:
        return [self._faces(picture, detected, mask) for picture, detected, mask in self.detect(images)]

    def _faces(self, picture: np.ndarray, detected: Detections, mask_logits: np.ndarray) -> list[Face]:
        from limner.world.probes import embed_identity

        if not len(detected.scores):
            return []
        template = self.template * (CROP_SIZE / DET_SIZE)
        crops = [align(picture, kps, template, CROP_SIZE)[0] for kps in detected.keypoints]
        embeddings = embed_identity(self.identity, np.stack(crops)).float()
        masks = _split_mask(mask_logits > 0, detected.boxes)
        return [
            Face(box=b, keypoints=k, embedding=e, mask=m, crop=c, score=float(s))
            for b, k, e, m, c, s in zip(detected.boxes, detected.keypoints, embeddings, masks, crops, detected.scores)
        ]


def _unletterbox(logits: torch.Tensor, scale: float, hw: tuple[int, int]) -> np.ndarray:
    """A [1, 64, 64] map of the letterboxed picture back in the picture's pixels: its top-left part, resized."""
    h, w = max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale))
    return F.interpolate(logits[None, :, :h, :w], size=hw, mode="bilinear", align_corners=False)[0, 0].numpy()


def _split_mask(mask: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """Each face's share of the character mask: every masked pixel goes to the face whose box centre is
    nearest, distances measured in each face's size (a body hangs below its head, and a small far face
    should not take a near one's body)."""
    ys, xs = np.mgrid[: mask.shape[0], : mask.shape[1]]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    sizes = np.maximum(boxes[:, 3] - boxes[:, 1], 1.0)
    # horizontal distance counts fully, vertical a third: bodies are tall and stand side by side
    dist = [np.hypot(xs - cx, (ys - cy) / 3) / s for (cx, cy), s in zip(centres, sizes)]
    owner = np.argmin(np.stack(dist), axis=0)
    return [mask & (owner == i) for i in range(len(boxes))]
