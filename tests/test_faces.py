"""Face analysis: the insightface-folder runner on small ONNX models built here with the packs' signatures
(their outputs designed so the expected faces are known by hand), the SCRFD decoding and the alignment on
hand-computed cases, bad model folders, and the world's own analyser on renders."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from limner.encoders import FaceAnalysis, FaceEmbedder, InsightFaceEmbedder, OnnxFaceAnalysis, WorldFaceAnalysis
from limner.encoders.faces import identity_input, reference_face
from limner.encoders.faces.align import ARCFACE_TEMPLATE, arcface_template, similarity_transform, warp_affine
from limner.encoders.faces.scrfd import (
    SCRFD_LAYOUTS,
    anchor_centres,
    decode,
    distance_to_box,
    distance_to_keypoints,
    letterbox,
    nms,
    to_blob,
)
from limner.errors import LimnerError

onnx = pytest.importorskip("onnx", reason="the test models are exported with torch.onnx, which needs onnx")
pytest.importorskip("onnxruntime", reason="pip install 'limner[faces]'")

# the designed detector's box distances (left, top, right, bottom) and keypoint offsets, in strides
DISTANCES = (0.5, 1.0, 1.5, 2.0)
OFFSETS = ((0.25, 0.25), (0.75, 0.25), (0.5, 0.5), (0.3, 0.8), (0.7, 0.8))  # a face inside its cell


class DesignedScrfd(nn.Module):
    """SCRFD's signature (9 outputs: scores, boxes, keypoints for strides 8, 16, 32; 2 anchors a cell). Stride 32
    fires on cells that are red on average, stride 16 on green ones, stride 8 never; every box and keypoint
    sits at fixed distances from its anchor. A red square covering one stride-32 cell is one face whose box
    and keypoints follow by hand."""

    def __init__(self, batched: bool = False, keypoints: bool = True):
        super().__init__()
        self.batched, self.keypoints = batched, keypoints
        self.register_buffer("distances", torch.tensor([DISTANCES]))
        self.register_buffer("offsets", torch.tensor([sum(OFFSETS, ())]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scores, boxes, kps = [], [], []
        for stride, channel in ((8, None), (16, 1), (32, 0)):
            pooled = F.avg_pool2d(x[:, :1], stride).permute(0, 2, 3, 1).reshape(-1, 1)
            zero = pooled * 0
            if channel is None:
                score = torch.sigmoid(zero - 10)
            else:
                lit = F.avg_pool2d(x[:, channel : channel + 1], stride).permute(0, 2, 3, 1).reshape(-1, 1)
                score = torch.sigmoid(20 * (lit - 0.5))
            two = lambda t: torch.cat([t, t], 1).reshape(-1, t.shape[1])  # noqa: E731 (2 anchors per cell)
            scores.append(two(score))
            boxes.append(two(zero + self.distances))
            kps.append(two(zero + self.offsets))
        outs = scores + boxes + (kps if self.keypoints else [])
        return tuple(o[None] for o in outs) if self.batched else tuple(outs)


class DesignedArcFace(nn.Module):
    """ArcFace's signature ([N, 3, 112, 112] -> [N, 512]): a fixed projection of the mean of each channel."""

    def __init__(self, size: int = 112):
        super().__init__()
        self.size = size
        self.proj = nn.Linear(3, 512, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(512, 3, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.mean((2, 3)))


def _export(module: nn.Module, path: Path, shape: tuple[int, ...], n_out: int, dynamic: bool = False) -> Path:
    names = [f"out{i}" for i in range(n_out)]
    axes = {"input.1": {2: "h", 3: "w"}} if dynamic else None
    torch.onnx.export(
        module.eval(), (torch.zeros(shape),), str(path), input_names=["input.1"], output_names=names,
        dynamic_axes=axes, dynamo=False,
    )  # fmt: skip
    return path


def _arcface_weight() -> np.ndarray:
    return DesignedArcFace().proj.weight.detach().numpy()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """The packs' files, built small: a detector, a recogniser, a landmark model and an attribute model."""
    folder = tmp_path_factory.mktemp("models") / "buffalo_t"
    folder.mkdir()
    _export(DesignedScrfd(), folder / "det_10g.onnx", (1, 3, 640, 640), 9, dynamic=True)
    _export(DesignedArcFace(), folder / "w600k_r50.onnx", (1, 3, 112, 112), 1)
    _export(DesignedArcFace(192), folder / "2d106det.onnx", (1, 3, 192, 192), 1)  # landmarks: not a recogniser
    _export(DesignedArcFace(96), folder / "genderage.onnx", (1, 3, 96, 96), 1)
    return folder


def _picture() -> np.ndarray:
    """320 x 160 RGB: a red square on one stride-32 cell once letterboxed (x2), a green one on a stride-16 cell."""
    image = np.zeros((160, 320, 3), np.uint8)
    image[32:48, 96:112] = (255, 0, 0)  # -> [64, 96) x [192, 224): the cell with its corner at (192, 64)
    image[96:104, 200:208] = (0, 255, 0)  # -> [192, 208) x [400, 416): the stride-16 cell at (400, 192)
    return image


def _expected_face(corner: tuple[float, float], stride: int, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    cx, cy = corner
    left, top, right, bottom = (d * stride for d in DISTANCES)
    box = np.array([cx - left, cy - top, cx + right, cy + bottom]) / scale
    kps = (np.array(corner) + np.array(OFFSETS) * stride) / scale
    return box, kps


# --------------------------------------------------------------------------------------------
# SCRFD's pre- and post-processing by hand
# --------------------------------------------------------------------------------------------


def test_letterbox_keeps_the_aspect_top_left_on_black():
    wide, scale = letterbox(np.full((160, 320, 3), 200, np.uint8), (640, 640))
    assert scale == 2.0 and wide.shape == (640, 640, 3)
    assert (wide[:320] == 200).all() and (wide[320:] == 0).all()
    tall, scale = letterbox(np.full((100, 50, 3), 90, np.uint8), (640, 640))
    assert scale == 6.4 and (tall[:, :320] == 90).all() and (tall[:, 320:] == 0).all()
    odd, scale = letterbox(np.zeros((3, 7, 3), np.uint8), (640, 640))  # 640 * 3 / 7 = 274.3: truncated
    assert math.isclose(scale, 274 / 3)
    blob = to_blob(wide)
    assert blob.shape == (1, 3, 640, 640) and math.isclose(blob[0, 0, 0, 0], (200 - 127.5) / 128, rel_tol=1e-6)
    assert math.isclose(blob[0, 0, -1, 0], -127.5 / 128, rel_tol=1e-6)  # the black border


def test_anchor_centres_are_cell_corners_row_by_row_each_repeated_per_anchor():
    centres = anchor_centres(2, 3, 8, 2)
    assert centres.tolist() == [[x, y] for y in (0, 8) for x in (0, 8, 16) for _ in range(2)]


def test_distances_decode_to_boxes_and_keypoints():
    centres = np.array([[10.0, 20.0]])
    assert distance_to_box(centres, np.array([[1.0, 2.0, 3.0, 4.0]])).tolist() == [[9.0, 18.0, 13.0, 24.0]]
    kps = distance_to_keypoints(centres, np.array([[1.0, -1.0] * 5]))
    assert kps.shape == (1, 5, 2) and kps[0, 4].tolist() == [11.0, 19.0]


def test_nms_keeps_the_best_of_overlapping_boxes_counting_pixels_inclusively():
    boxes = np.array([[0, 0, 9, 9], [1, 1, 10, 10], [20, 20, 29, 29], [0, 0, 9, 12]], np.float32)
    scores = np.array([0.8, 0.9, 0.7, 0.6], np.float32)
    # (1,1)-(10,10), the best, overlaps (0,0)-(9,9) by 81 / 119 pixels and (0,0)-(9,12) by 108 / 122
    assert nms(boxes, scores, 0.4) == [1, 2]
    # at 0.7 (0,0)-(9,9) stays beside (1,1)-(10,10); (0,0)-(9,12) still overlaps that by 108 / 122
    assert nms(boxes, scores, 0.7) == [1, 0, 2]


def test_decode_finds_the_designed_faces_in_the_letterboxed_picture():
    canvas, scale = letterbox(_picture(), (640, 640))
    outputs = [o.numpy() for o in DesignedScrfd()(torch.from_numpy(to_blob(canvas)))]
    found = decode(outputs, SCRFD_LAYOUTS[9], canvas.shape[:2], scale)
    assert len(found.scores) == 2  # each cell's two anchors gave the same box: one of each kept
    big_box, big_kps = _expected_face((192, 64), 32)
    small_box, small_kps = _expected_face((400, 192), 16)
    np.testing.assert_allclose(found.boxes, [big_box, small_box], atol=1e-4)
    np.testing.assert_allclose(found.keypoints, [big_kps, small_kps], atol=1e-4)


# --------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------


def test_similarity_transform_recovers_a_known_one_and_maps_the_keypoints_onto_the_template():
    angle, scale, shift = math.radians(20), 1.7, np.array([5.0, -3.0])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    src = np.random.default_rng(0).uniform(0, 100, (5, 2))
    m = similarity_transform(src, src @ (scale * rot).T + shift)
    np.testing.assert_allclose(m, np.hstack([scale * rot, shift[:, None]]), atol=1e-9)
    # keypoints that are the template moved: the fit undoes the move exactly
    kps = (ARCFACE_TEMPLATE - 56) @ (0.5 * rot).T + [300, 200]
    m = similarity_transform(kps, arcface_template(112))
    np.testing.assert_allclose(kps @ m[:, :2].T + m[:, 2], ARCFACE_TEMPLATE, atol=1e-9)
    np.testing.assert_allclose(arcface_template(224), ARCFACE_TEMPLATE * 2)
    np.testing.assert_allclose(arcface_template(128)[0], ARCFACE_TEMPLATE[0] + [8, 0])


def test_warp_samples_through_the_inverse_with_black_outside():
    image = np.zeros((20, 30, 3), np.uint8)
    image[5, 7] = (255, 128, 1)
    shifted = warp_affine(image, np.array([[1.0, 0, 3], [0, 1.0, -2]]), 16)
    assert shifted[3, 10].tolist() == [255, 128, 1] and shifted.sum() == 384
    turned = warp_affine(image, np.array([[0.0, -1, 19], [1, 0, 0]]), 20)  # 90 degrees: (x, y) -> (19 - y, x)
    assert turned[7, 14].tolist() == [255, 128, 1]
    half = warp_affine(np.full((4, 4, 3), 200, np.uint8), np.array([[1.0, 0, 0.5], [0, 1.0, 0]]), 6)
    assert half[0, 0, 0] == 100 and half[0, 2, 0] == 200 and half[0, 5, 0] == 0  # half a pixel of black mixed in


# --------------------------------------------------------------------------------------------
# The runner on a model folder
# --------------------------------------------------------------------------------------------


def test_runner_finds_aligns_and_embeds_every_face_and_the_embedder_takes_the_largest(models):
    analysis = OnnxFaceAnalysis(models)
    assert isinstance(analysis, FaceAnalysis) and analysis.crop_size == 112
    assert (analysis.mean, analysis.std) == (127.5, 127.5)  # a PyTorch export: normalised outside the graph
    faces = analysis.analyse([_picture(), np.zeros((50, 50, 3), np.uint8)])
    assert [len(f) for f in faces] == [2, 0]
    big_box, big_kps = _expected_face((192, 64), 32)
    big = max(faces[0], key=lambda f: f.area)
    np.testing.assert_allclose(big.box, big_box, atol=1e-4)
    np.testing.assert_allclose(big.keypoints, big_kps, atol=1e-4)
    for face in faces[0]:
        assert face.crop.shape == (112, 112, 3) and face.mask is None and face.score > 0.99
        expected = _arcface_weight() @ ((face.crop.astype(np.float64) - 127.5) / 127.5).mean((0, 1))
        np.testing.assert_allclose(face.embedding.numpy(), expected / np.linalg.norm(expected), atol=1e-5)
        # the recogniser's raw output (insightface's `embedding`, what official InstantID and PhotoMaker v2 feed)
        assert face.raw_norm == pytest.approx(np.linalg.norm(expected), rel=1e-4)
        np.testing.assert_allclose(identity_input(face, None).numpy(), expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(identity_input(face, 3.0).numpy(), 3 * face.embedding.numpy(), rtol=1e-6)
    # the crop is the face aligned onto ArcFace's template: the red square's middle fills its middle
    assert (big.crop[45:70, 45:70] == (255, 0, 0)).all() and big.crop[0, 0].tolist() == [0, 0, 0]
    embedder = InsightFaceEmbedder(models)
    assert isinstance(embedder, FaceEmbedder) and embedder.name == "face:buffalo_t"
    emb, found = embedder.faces([_picture(), np.zeros((50, 50, 3), np.uint8)])
    assert found.tolist() == [True, False] and torch.allclose(emb[0], big.embedding) and not emb[1].any()


def test_runner_reads_a_batched_detector_and_an_mxnet_recogniser(models, tmp_path):
    _export(DesignedScrfd(batched=True), tmp_path / "scrfd_10g_bnkps.onnx", (1, 3, 320, 320), 9)
    model = onnx.load(str(models / "w600k_r50.onnx"))
    sub = onnx.helper.make_node("Sub", ["input.1", "c0"], ["s"], name="Sub_0")
    mul = onnx.helper.make_node("Mul", ["s", "c1"], ["x"], name="Mul_1")
    for node in model.graph.node:  # the converted MXNet models normalise inside the graph
        node.input[:] = ["x" if i == "input.1" else i for i in node.input]
    consts = [onnx.helper.make_tensor(n, onnx.TensorProto.FLOAT, [], [v]) for n, v in (("c0", 127.5), ("c1", 1 / 128))]
    model.graph.initializer.extend(consts)
    model.graph.node.insert(0, mul)
    model.graph.node.insert(0, sub)
    onnx.save(model, str(tmp_path / "glintr100.onnx"))
    analysis = OnnxFaceAnalysis(tmp_path)
    assert analysis.det_size == (320, 320) and (analysis.mean, analysis.std) == (0.0, 1.0)
    picture = np.zeros((160, 320, 3), np.uint8)
    picture[64:96, 128:160] = (255, 0, 0)  # letterboxed at 320 the picture keeps its size: one stride-32 cell
    (face,) = analysis.analyse([picture])[0]
    np.testing.assert_allclose(face.box, _expected_face((128, 64), 32, scale=1.0)[0], atol=1e-4)


@pytest.mark.parametrize(
    "keep, message",
    [
        (["w600k_r50.onnx", "2d106det.onnx"], "no face detector (SCRFD) among 2d106det.onnx, w600k_r50.onnx"),
        (["det_10g.onnx", "genderage.onnx"], "no recognition model (ArcFace) among det_10g.onnx, genderage.onnx"),
        ([], "no .onnx files there"),
    ],
)
def test_an_incomplete_model_folder_names_the_files_expected(models, tmp_path, keep, message):
    for name in keep:
        (tmp_path / name).write_bytes((models / name).read_bytes())
    with pytest.raises(LimnerError) as e:
        OnnxFaceAnalysis(tmp_path)
    assert message in str(e.value) and "det_10g.onnx" in str(e.value) and "glintr100.onnx" in str(e.value)


def test_bad_model_files_are_named(models, tmp_path):
    with pytest.raises(LimnerError, match="no such folder"):
        OnnxFaceAnalysis(tmp_path / "antelopev2")
    (tmp_path / "det_10g.onnx").write_bytes(b"not a model")
    with pytest.raises(LimnerError, match="det_10g.onnx: not a readable ONNX model"):
        OnnxFaceAnalysis(tmp_path)
    _export(DesignedScrfd(keypoints=False), tmp_path / "det_10g.onnx", (1, 3, 640, 640), 6, dynamic=True)
    (tmp_path / "w600k_r50.onnx").write_bytes((models / "w600k_r50.onnx").read_bytes())
    with pytest.raises(LimnerError, match="det_10g.onnx: a detector without the 5 face keypoints"):
        OnnxFaceAnalysis(tmp_path)


def test_a_reference_needs_a_face_and_says_which_of_several_it_took(models):
    faces = OnnxFaceAnalysis(models).analyse([_picture(), np.zeros((50, 50, 3), np.uint8)])
    face, note = reference_face(faces[0], "refs/a.png")
    assert face.area == max(f.area for f in faces[0]) and "2 faces found; took the largest (box 88,16-120,64)" in note
    with pytest.raises(LimnerError, match="refs/b.png: no face found"):
        reference_face(faces[1], "refs/b.png")


# --------------------------------------------------------------------------------------------
# The world's analyser
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> WorldFaceAnalysis:
    return WorldFaceAnalysis()


def test_world_targets_decode_back_to_the_face_through_the_shared_decoder():
    from limner.encoders.faces.world import LAYOUT
    from limner.world.faces import face_box, targets

    kps = np.array([[27.0, 27.5], [37.0, 27.5], [32.0, 31.9], [29.9, 35.9], [34.1, 35.9]], np.float32)
    small = kps[:, :] * 0.35 + 5  # a full figure's face, 9 px: stride 4
    per_level = targets(np.stack([kps, small]))
    assert per_level[1]["positive"].sum() >= 1 and per_level[0]["positive"].sum() >= 1
    outputs = [np.where(t["positive"], 1.0, 0.0)[:, None] for t in per_level]
    outputs += [t["box"] for t in per_level] + [t["kps"] for t in per_level]
    found = decode(outputs, LAYOUT, (64, 64), 1.0, nms_threshold=0.4)
    order = np.argsort(-found.boxes[:, 2] + found.boxes[:, 0])  # larger first
    np.testing.assert_allclose(found.keypoints[order], [kps, small], atol=1e-4)
    np.testing.assert_allclose(found.boxes[order], [face_box(kps), face_box(small)], atol=1e-4)


def test_world_analysis_finds_aligns_segments_and_tells_identities_apart(world):
    from limner.world.bench import IDENTITIES, identity_character
    from limner.world.faces import faces_of, two_character_renders
    from limner.world.render import Scene, render

    rng = np.random.default_rng(5)
    renders = [render(Scene("grass", [identity_character(IDENTITIES[i], rng)], variant=i)) for i in (0, 0, 3)]
    faces = world.analyse([r.image for r in renders])
    assert [len(f) for f in faces] == [1, 1, 1]
    for (face,), r in zip(faces, renders):
        assert np.linalg.norm(face.keypoints - faces_of(r)[0], axis=1).mean() < 1.5
        assert face.crop.shape == (64, 64, 3) and face.embedding.shape == (128,)
        truth = r.entities[0].mask
        assert (face.mask & truth).sum() / (face.mask | truth).sum() > 0.7
    same = float(faces[0][0].embedding @ faces[1][0].embedding)
    other = float(faces[0][0].embedding @ faces[2][0].embedding)
    assert same > other + 0.1
    images, _ = two_character_renders(seed=1, n=2)
    for found in world.analyse(list(images)):
        assert len(found) == 2
        left, right = sorted(found, key=lambda f: f.box[0])
        assert left.mask[:, :32].sum() > left.mask[:, 32:].sum()
        assert right.mask[:, 32:].sum() > right.mask[:, :32].sum()
    empty = render(Scene("room", [], variant=1)).image
    assert world.analyse([empty]) == [[]]
    emb, found = world.faces([empty, renders[0].image])
    assert emb.shape == (2, 128) and found.tolist() == [False, True] and not emb[0].any()


def test_world_faces_training_writes_a_loadable_analyser_with_its_record(tmp_path):
    from limner.world.faces import THRESHOLDS, FaceBuildConfig, train_face_analysis

    record = train_face_analysis(tmp_path / "faces", tmp_path / "work", FaceBuildConfig.quick())
    assert sorted(p.name for p in (tmp_path / "faces").iterdir()) == ["detector.safetensors", "faces.json"]
    assert np.asarray(record["template"]).shape == (5, 2) and record["settings"]["threshold"] in THRESHOLDS
    analysis = WorldFaceAnalysis(tmp_path / "faces")
    assert analysis.threshold == record["settings"]["threshold"]
    assert len(analysis.analyse([np.zeros((64, 64, 3), np.uint8)])) == 1
    with pytest.raises(LimnerError, match="detector.safetensors and faces.json expected"):
        WorldFaceAnalysis(tmp_path / "work")


def test_faces_option_is_checked_before_any_work_and_only_for_identity_methods(models, tmp_path):
    """--faces DIR reaches an identity method as its `faces` setting; a folder lacking its detector is told at
    once (naming the files expected), and another family's method refuses the option instead of ignoring it."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from limner.cli import app
    from limner.commands.options import faces_setting

    identity = SimpleNamespace(name="someid", family="identity")
    assert faces_setting(identity, None) == {} and faces_setting(identity, models) == {"faces": str(models)}
    (tmp_path / "w600k_r50.onnx").write_bytes((models / "w600k_r50.onnx").read_bytes())
    with pytest.raises(LimnerError, match="no face detector .SCRFD."):
        faces_setting(identity, tmp_path)
    r = CliRunner().invoke(
        app,
        [
            "train",
            "--method",
            "dreambooth",
            "--subject",
            "world:ada",
            "--faces",
            str(models),
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert r.exit_code == 2 and "--faces: dreambooth finds no faces" in r.output
    assert not (tmp_path / "x").exists()
