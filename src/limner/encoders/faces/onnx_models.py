"""Real photos: an insightface model folder (antelopev2, buffalo_l, ...) run through onnxruntime, without
the insightface package.

A pack holds several ONNX models; two matter here, told apart by their input and output signatures as
insightface's model zoo does: the SCRFD detector (five or more outputs) and the ArcFace recogniser (one
square input of at least 112 px, a multiple of 16, one output). The rest (landmarks at 192 px, gender and
age at 96 px) are left alone. Where a pack has two of a kind, the first by file name is used, as
insightface does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from limner.encoders.faces.align import align, arcface_template
from limner.encoders.faces.base import Face, FaceEmbeddings
from limner.encoders.faces.scrfd import (
    NMS_THRESHOLD,
    SCORE_THRESHOLD,
    SCRFD_LAYOUTS,
    DetectorLayout,
    decode,
    letterbox,
    to_blob,
)
from limner.errors import LimnerError
from limner.images import ImageLike, to_pil

DET_SIZE = (640, 640)  # (width, height) a detector with a free input size is run at, as InstantID prepares it
EXPECTED = (
    "an insightface model folder holds a face detector (det_10g.onnx in buffalo_l, scrfd_10g_bnkps.onnx in "
    "antelopev2) and a recognition model (w600k_r50.onnx in buffalo_l, glintr100.onnx in antelopev2)"
)


def _session(path: Path, device: str):
    try:
        import onnxruntime
    except ImportError as e:
        raise LimnerError(
            f"reading the face models in {path.parent} needs onnxruntime: pip install 'limner[faces]'"
        ) from e
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's own warnings stay quiet, as the other libraries' do
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
        raise LimnerError(
            f"{path}: not a readable ONNX model ({str(e).splitlines()[0][:200]}); replace it with the pack's file"
        ) from e


def role(session) -> str | None:
    """ "detection", "recognition" or None (a model this runner does not use), from the model's signature."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = inputs[0].shape
    if len(outputs) >= 5:
        return "detection"
    square = len(shape) == 4 and isinstance(shape[2], int) and shape[2] == shape[3]
    if square and shape[2] in (192, 96):  # insightface's landmark and attribute models
        return None
    if square and len(inputs) == 1 and len(outputs) == 1 and shape[2] >= 112 and shape[2] % 16 == 0:
        return "recognition"
    return None


def recognition_normalisation(path: Path) -> tuple[float, float]:
    """(mean, std) the recogniser's input is normalised with. MXNet-converted ArcFace models subtract and scale
    inside the graph (a Sub and a Mul among their first nodes) and take raw pixels; the others, PyTorch
    exports such as w600k_r50 and glintr100, take (pixel - 127.5) / 127.5. Telling them apart needs the
    `onnx` package; without it the PyTorch convention is assumed."""
    try:
        import onnx
    except ImportError:
        return 127.5, 127.5
    names = [node.name for node in onnx.load(str(path), load_external_data=False).graph.node[:8]]
    subtracts = any(n.startswith(("Sub", "_minus")) for n in names)
    multiplies = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if subtracts and multiplies else (127.5, 127.5)


class OnnxFaceAnalysis(FaceEmbeddings):
    """Faces in photos from an insightface model folder: SCRFD finds each face's box and 5 keypoints, the face
    is aligned onto ArcFace's template, ArcFace embeds it (L2-normalised, 512-d for the packs' models)."""

    def __init__(
        self,
        folder: str | Path,
        device: str = "cpu",
        det_size: tuple[int, int] = DET_SIZE,
        threshold: float = SCORE_THRESHOLD,
        nms_threshold: float = NMS_THRESHOLD,
    ):
        folder = Path(folder)
        if not folder.is_dir():
            raise LimnerError(f"face models {folder}: no such folder; {EXPECTED}")
        files = sorted(folder.glob("*.onnx"))
        if not files:
            raise LimnerError(f"face models {folder}: no .onnx files there; {EXPECTED}")
        found: dict[str, tuple[Path, object]] = {}
        for path in files:
            session = _session(path, device)
            kind = role(session)
            if kind is not None and kind not in found:
                found[kind] = (path, session)
        names = ", ".join(p.name for p in files)
        for kind, what in (("detection", "face detector (SCRFD)"), ("recognition", "recognition model (ArcFace)")):
            if kind not in found:
                raise LimnerError(f"face models {folder}: no {what} among {names}; {EXPECTED}")
        det_path, self.detector = found["detection"]
        self.layout: DetectorLayout = SCRFD_LAYOUTS.get(len(self.detector.get_outputs()))
        if self.layout is None or not self.layout.keypoints:
            raise LimnerError(
                f"{det_path}: a detector without the 5 face keypoints (or of an unknown layout: "
                f"{len(self.detector.get_outputs())} outputs); use an SCRFD model with keypoints (*_kps), {EXPECTED}"
            )
        shape = self.detector.get_inputs()[0].shape
        # a model exported at a fixed size runs at it; one with a free size at det_size
        self.det_size = (shape[3], shape[2]) if isinstance(shape[2], int) and isinstance(shape[3], int) else det_size
        rec_path, self.recognizer = found["recognition"]
        self.crop_size = self.recognizer.get_inputs()[0].shape[2]
        width = self.recognizer.get_outputs()[0].shape[-1]
        self.embedding_dim = width if isinstance(width, int) else 512
        self.template = arcface_template(self.crop_size)
        self.mean, self.std = recognition_normalisation(rec_path)
        self.threshold, self.nms_threshold = threshold, nms_threshold
        self.name = f"face:{folder.name}"

    def analyse(self, images: list[ImageLike]) -> list[list[Face]]:
        return [self._analyse_one(np.asarray(im.convert("RGB"))) for im in to_pil(images)]

    def _analyse_one(self, image: np.ndarray) -> list[Face]:
        canvas, scale = letterbox(image, self.det_size)
        inputs = {self.detector.get_inputs()[0].name: to_blob(canvas)}
        outputs = self.detector.run(None, inputs)
        found = decode(outputs, self.layout, canvas.shape[:2], scale, self.threshold, self.nms_threshold)
        crops = [align(image, kps, self.template, self.crop_size)[0] for kps in found.keypoints]
        raw = self.raw_embeddings(crops)
        return [
            Face(box=b, keypoints=k, embedding=unit(emb), raw_norm=float(emb.norm()), crop=c, score=float(score))
            for b, k, score, c, emb in zip(found.boxes, found.keypoints, found.scores, crops, raw)
        ]

    def embed_crops(self, crops: list[np.ndarray]) -> list[torch.Tensor]:
        """ArcFace's L2-normalised embedding of each aligned RGB crop."""
        return [unit(emb) for emb in self.raw_embeddings(crops)]

    def raw_embeddings(self, crops: list[np.ndarray]) -> list[torch.Tensor]:
        """What the recogniser outputs for each aligned RGB crop (insightface's `embedding`, before its
        `normed_embedding`), one crop per run (some exports fix the batch at 1)."""
        name = self.recognizer.get_inputs()[0].name
        out = []
        for crop in crops:
            blob = ((crop.astype(np.float32) - self.mean) / self.std).transpose(2, 0, 1)[None]
            output = self.recognizer.run(None, {name: blob})[0]
            out.append(torch.from_numpy(np.asarray(output, np.float32).reshape(-1)))
        return out


def unit(embedding: torch.Tensor) -> torch.Tensor:
    return embedding / embedding.norm().clamp_min(1e-12)


class InsightFaceEmbedder(OnnxFaceAnalysis):
    """ArcFace embeddings of the largest face in each picture from a local insightface model folder
    (`--face DIR`: Face-Sim and Face-Div in evaluation), on limner's own runner."""
