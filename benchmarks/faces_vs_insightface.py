"""limner's face-analysis runner against the insightface package on the same ONNX models and pictures.

No insightface pack can be downloaded here, so this builds a model folder with the packs' signatures whose
outputs depend on the picture (an SCRFD-shaped detector: 9 outputs, strides 8/16/32, 2 anchors, scores,
distances and keypoint offsets from fixed random projections of each cell's colours; an ArcFace-shaped
recogniser: a small random CNN, 112 px in, 512 out), then reads the same pictures (world renders
enlarged to several sizes and aspects) through limner's `OnnxFaceAnalysis` and through insightface's
`FaceAnalysis` (OpenCV resize and warp, scikit-image's similarity fit), and compares the faces found,
their boxes, keypoints and embeddings.

insightface needs OpenCV and scikit-image, which limner does not: run its side in a venv of its own.

    python -m venv /tmp/ifvenv && /tmp/ifvenv/bin/pip install insightface opencv-python-headless onnxruntime
    python benchmarks/faces_vs_insightface.py --insightface-python /tmp/ifvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

INSIGHTFACE_SIDE = r"""
import json, sys
import numpy as np
from PIL import Image
from insightface.app import FaceAnalysis

root, pictures, out = sys.argv[1:4]
app = FaceAnalysis(name="bench", root=root, providers=["CPUExecutionProvider"])
app.prepare(ctx_id=-1, det_size=(640, 640))
results = []
for path in json.loads(pictures):
    bgr = np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1].copy()
    results.append([
        {"box": f.bbox.tolist(), "keypoints": f.kps.tolist(), "embedding": f.normed_embedding.tolist(),
         "score": float(f.det_score)}
        for f in app.get(bgr)
    ])
json.dump(results, open(out, "w"))
"""


def build_models(folder: Path) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(1)
            # per stride: 2 anchors x (score, 4 distances, 10 offsets) from each cell's mean colour and contrast
            self.proj = nn.ParameterList(nn.Parameter(torch.randn(30, 6, generator=g)) for _ in range(3))

        def forward(self, x):
            outs = [[], [], []]
            for proj, stride in zip(self.proj, (8, 16, 32)):
                mean = F.avg_pool2d(x, stride)
                spread = F.avg_pool2d(x * x, stride) - mean * mean
                f = torch.cat([mean, spread], 1).permute(0, 2, 3, 1).reshape(-1, 6) @ proj.t()
                f = f.reshape(-1, 2, 15).reshape(-1, 15)  # anchors of a cell in a row
                outs[0].append(torch.sigmoid(3 * f[:, :1] - 10))
                outs[1].append(F.softplus(f[:, 1:5]) + 0.5)
                outs[2].append(torch.tanh(f[:, 5:]) * 1.5)
            return tuple(outs[0] + outs[1] + outs[2])

    class Recognizer(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, 5, 2, 2), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(512, 512),
            )  # fmt: skip

        def forward(self, x):
            return self.net(x)

    folder.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        Detector().eval(), (torch.zeros(1, 3, 640, 640),), str(folder / "det_10g.onnx"), input_names=["input.1"],
        output_names=[f"o{i}" for i in range(9)], dynamic_axes={"input.1": {2: "h", 3: "w"}}, dynamo=False,
    )  # fmt: skip
    torch.onnx.export(
        Recognizer().eval(), (torch.zeros(1, 3, 112, 112),), str(folder / "w600k_r50.onnx"),
        input_names=["input.1"], output_names=["embedding"], dynamic_axes={"input.1": {0: "n"}}, dynamo=False,
    )  # fmt: skip


def make_pictures(folder: Path) -> list[Path]:
    from PIL import Image

    from limner.world.faces import heldout_renders

    renders, _, _ = heldout_renders(1, "portrait", seed=3)
    sizes = [(640, 640), (300, 200), (480, 640), (1000, 700), (256, 256), (123, 457), (800, 450), (640, 480)]
    paths = []
    for i, (r, size) in enumerate(zip(renders, sizes)):
        path = folder / f"{i}.png"
        Image.fromarray(r.image).resize(size, Image.BILINEAR).save(path)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--insightface-python", required=True, help="A python with insightface, OpenCV and onnxruntime")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "faces_vs_insightface")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from PIL import Image

    from limner.encoders.faces import OnnxFaceAnalysis

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_models(tmp / "models" / "bench")
        pictures = make_pictures(tmp)
        theirs_path = tmp / "insightface.json"
        subprocess.run(
            [args.insightface_python, "-c", INSIGHTFACE_SIDE, str(tmp), json.dumps([str(p) for p in pictures]),
             str(theirs_path)],
            check=True, capture_output=True,
        )  # fmt: skip
        theirs = json.loads(theirs_path.read_text())
        ours = OnnxFaceAnalysis(tmp / "models" / "bench").analyse([Image.open(p) for p in pictures])
        sizes = [Image.open(p).size for p in pictures]
    rows, worst = [], {"box": 0.0, "keypoints": 0.0, "embedding_cosine": 1.0}
    for path, size, mine, other in zip(pictures, sizes, ours, theirs):
        matched = []
        for f in other:  # each of insightface's faces against limner's nearest by box
            if not mine:
                break
            j = int(np.argmin([np.abs(m.box - np.array(f["box"])).max() for m in mine]))
            m = mine[j]
            matched.append(
                (
                    float(np.abs(m.box - np.array(f["box"])).max()),
                    float(np.abs(m.keypoints - np.array(f["keypoints"])).max()),
                    float(m.embedding.numpy() @ np.array(f["embedding"])),
                )
            )
        box = max((b for b, _, _ in matched), default=0.0)
        kps = max((k for _, k, _ in matched), default=0.0)
        cos = min((c for _, _, c in matched), default=1.0)
        worst = {
            "box": max(worst["box"], box),
            "keypoints": max(worst["keypoints"], kps),
            "embedding_cosine": min(worst["embedding_cosine"], cos),
        }
        rows.append((path.name, size, len(mine), len(other), box, kps, cos))
    lines = [
        "limner's face runner against insightface 2.1 (FaceAnalysis, det_size 640) on the same ONNX models: faces",
        "found, and over insightface's faces, the largest difference of box and keypoint coordinates (pixels of the",
        "picture) and the lowest cosine between the two embeddings of a face.",
        "",
        "| picture | size | faces (limner) | faces (insightface) | box max diff | keypoints max diff | min cosine |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {s[0]}x{s[1]} | {a} | {b} | {bx:.4f} | {k:.4f} | {c:.6f} |" for n, s, a, b, bx, k, c in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "worst": worst}, indent=2))
    print("\n".join(lines))
    print(json.dumps(worst))


if __name__ == "__main__":
    main()
