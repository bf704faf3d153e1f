"""`limner world faces`: trains the world's face detector on renders and measures the world's face analysis.

The detector (limner.encoders.faces.world.WorldFaceNet) learns SCRFD's targets from the renderer's exact
keypoints: each face goes to one stride by its size (below 16 px to stride 4, else 8), and the cells whose
corner lies near the face's centre learn it (score 1, the distances to the box's sides, the keypoints'
offsets); every other cell learns score 0 (a focal loss, as SCRFD's). The mask head learns the union of the
characters' masks. Pictures are degraded as the probes' are (blur and noise, or a generator's loss of detail),
so the detector also reads the base model's drawings. The 8 held-out identities never appear in training.

A world face's box is derived from its keypoints: the square on the head, as tall as the head, whose place
follows from where the renderer puts the eyes (0.05 head radii above the head's centre) and the mouth (0.58
below).

Measured (`measure`): keypoint error in pixels (64 px pictures), faces found and false detections, and
identity verification accuracy (same person or not, from the cosine of two faces' embeddings, at the
threshold that is best on training identities), on renders of the held-out identities and on the world
base's redrawings of them (noised to 0.4 and 0.6 and denoised from "a portrait of a CLASS CONTEXT", as the
subject probe's check does).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from limner.encoders.faces.scrfd import INPUT_MEAN, INPUT_STD
from limner.encoders.faces.world import LAYOUT, WorldFaceAnalysis, WorldFaceNet, save_face_net
from limner.training import TrainConfig, train
from limner.world import vocab
from limner.world.bench import IDENTITIES, heldout_identity_keys, identity_character
from limner.world.probes import degrade, lose_detail, to_input
from limner.world.render import Render, Scene, render
from limner.world.scenes import random_character, training_scene
from limner.world.stages import WholeModelTask

MAX_FACES = 2  # a world picture shows at most two characters
EYE_Y, MOUTH_Y = -0.05, 0.58  # where the renderer puts the eyes and the mouth corners, in head radii below its centre


@dataclass
class FaceBuildConfig:
    seed: int = 0
    train_size: int = 12_000
    steps: int = 1200
    batch: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    width: int = 24
    threshold: float = 0.5
    checkpoint_every: int = 250
    threshold_renders: int = 600  # fresh renders the score threshold is chosen on

    @classmethod
    def quick(cls) -> FaceBuildConfig:
        return cls(train_size=300, steps=20, batch=16, checkpoint_every=10, threshold_renders=40)


# --------------------------------------------------------------------------------------------
# Ground truth: faces of a render, their boxes, the detector's targets
# --------------------------------------------------------------------------------------------


def face_box(keypoints: np.ndarray) -> np.ndarray:
    """[4] the head's square box from its 5 keypoints (see the module's docstring)."""
    eyes, mouth = keypoints[:2].mean(0), keypoints[3:].mean(0)
    axis = mouth - eyes  # head radii (MOUTH_Y - EYE_Y) long, pointing down the face
    radius = np.linalg.norm(axis) / (MOUTH_Y - EYE_Y)
    centre = eyes - axis * EYE_Y / (MOUTH_Y - EYE_Y)
    return np.concatenate([centre - radius, centre + radius]).astype(np.float32)


def faces_of(r: Render) -> np.ndarray:
    """[F, 5, 2] the render's faces' keypoints (64 px pixels)."""
    kps = [e.face_keypoints for e in r.entities if e.kind == "character"]
    return np.stack(kps).astype(np.float32) if kps else np.zeros((0, 5, 2), np.float32)


def character_mask(r: Render) -> np.ndarray:
    masks = [e.mask for e in r.entities if e.kind == "character"]
    return np.any(masks, axis=0) if masks else np.zeros(r.image.shape[:2], bool)


def make_training_set(n: int, seed: int) -> dict[str, np.ndarray]:
    """n renders with their faces' keypoints ([n, MAX_FACES, 5, 2], NaN where no face) and character masks."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 64, 64, 3), np.uint8)
    faces = np.full((n, MAX_FACES, 5, 2), np.nan, np.float32)
    masks = np.zeros((n, 64, 64), bool)
    for i in tqdm(range(n), desc="render faces", mininterval=2):
        r = render(training_scene(rng))
        images[i], masks[i] = r.image, character_mask(r)
        kps = faces_of(r)
        faces[i, : len(kps)] = kps
    return {"images": images, "faces": faces, "masks": masks}


def level_of(box: np.ndarray) -> int:
    """Which stride learns a face: 4 for faces under 16 px tall, else 8."""
    return 0 if box[3] - box[1] < 16 else 1


def targets(faces: np.ndarray, size: int = 64) -> list[dict[str, np.ndarray]]:
    """One picture's detector targets per stride: score [cells], box distances [cells, 4] and keypoint offsets
    [cells, 10] (in strides), positive [cells] bool. A face is learnt by the cells whose corner lies within
    a quarter of its size (at least a stride) from its centre, and always by the nearest one; a smaller face
    wins a shared cell. (Within half a stride, a 7 px face of two figures side by side had one cell to learn
    from and scored under 0.5 in 8% of pairs.)"""
    out = []
    for stride in LAYOUT.strides:
        n = size // stride
        cells = n * n
        out.append(
            {
                "score": np.zeros(cells, np.float32),
                "box": np.zeros((cells, 4), np.float32),
                "kps": np.zeros((cells, 10), np.float32),
                "positive": np.zeros(cells, bool),
                "side": np.full(cells, np.inf, np.float32),
            }
        )
    for kps in faces:
        if np.isnan(kps).any():
            continue
        box = face_box(kps)
        level, side = level_of(box), box[3] - box[1]
        stride = LAYOUT.strides[level]
        n, t = size // stride, out[level]
        centre = (box[:2] + box[2:]) / 2
        ys, xs = np.mgrid[:n, :n]
        corners = np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float32) * stride
        near = np.abs(corners - centre).max(1) <= max(0.25 * side, stride)
        near[np.argmin(np.linalg.norm(corners - centre, axis=1))] = True
        near &= side < t["side"]
        t["score"][near], t["positive"][near], t["side"][near] = 1.0, True, side
        t["box"][near] = np.concatenate([corners[near] - box[:2], box[2:] - corners[near]], 1) / stride
        t["kps"][near] = (kps[None] - corners[near, None]).reshape(-1, 10) / stride
    return out


def to_detector_blob(x: torch.Tensor) -> torch.Tensor:
    """Unit-range pictures [B, 3, 64, 64] (the probes' degradations work there) -> SCRFD's normalisation."""
    return (x * 127.5 + 127.5 - INPUT_MEAN) / INPUT_STD


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    return (ce * (1 - p_t) ** gamma * (alpha * target + (1 - alpha) * (1 - target))).sum()


class FaceTask(WholeModelTask):
    name = "face_detector"

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        out = self.forward(batch["x"])
        total = F.binary_cross_entropy_with_logits(out["mask"][:, 0], batch["mask"])
        positives = max(1.0, sum(float(t["positive"].sum()) for t in batch["levels"]))
        for level, t in enumerate(batch["levels"]):
            pos = t["positive"]
            total = total + focal_loss(out["scores"][level][..., 0], t["score"]) / positives
            total = total + F.l1_loss(out["boxes"][level][pos], t["box"][pos], reduction="sum") / (4 * positives)
            total = total + F.l1_loss(out["keypoints"][level][pos], t["kps"][pos], reduction="sum") / (10 * positives)
        return total


def face_batches(data: dict[str, np.ndarray], batch: int):
    """Training batches: pictures degraded half the time as the probes' (blur, noise) and half as a generator
    draws (lost detail, colour cast), with their targets."""

    def next_batch(g: torch.Generator) -> dict:
        idx = torch.randint(len(data["images"]), (batch,), generator=g).numpy()
        x = to_input(data["images"][idx])
        drawn = torch.rand(batch, generator=g) < 0.5
        x = torch.where(drawn[:, None, None, None], lose_detail(x, g), degrade(x, g))
        per_image = [targets(f) for f in data["faces"][idx]]
        levels = [
            {
                k: torch.from_numpy(np.stack([p[level][k] for p in per_image]))
                for k in ("score", "box", "kps", "positive")
            }
            for level in range(len(LAYOUT.strides))
        ]
        return {"x": to_detector_blob(x), "levels": levels, "mask": torch.from_numpy(data["masks"][idx]).float()}

    return next_batch


def portrait_template(n: int = 400, seed: int = 7) -> np.ndarray:
    """[5, 2] where a portrait's keypoints lie on average (tilt 0, centred, unit scale, every identity and
    class): the world's alignment template, the portraits the identity probe learnt from."""
    rng = np.random.default_rng(seed)
    points = []
    for _ in range(n):
        spec = random_character(rng, 0.5, "portrait", set())
        spec.x, spec.y, spec.scale, spec.head_tilt = 0.5, 0.5, 1.0, 0.0
        points.append(faces_of(render(Scene("room", [spec])))[0])
    return np.mean(points, axis=0)


def train_face_analysis(out: Path, work: Path, cfg: FaceBuildConfig) -> dict:
    """Trains the detector (resumable from `work`), writes detector.safetensors and faces.json to `out`."""
    start = time.time()
    torch.manual_seed(cfg.seed)
    data = make_training_set(cfg.train_size, cfg.seed)
    net = WorldFaceNet(cfg.width)
    settings = TrainConfig(
        max_steps=cfg.steps,
        batch_size=cfg.batch,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        lr_schedule="cosine",
        lr_warmup_steps=min(100, cfg.steps // 10),
        max_grad_norm=5.0,
        seed=cfg.seed,
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=1,
        resume="latest",
    )
    train(FaceTask(net), face_batches(data, cfg.batch), settings, work / "face_detector", desc="face detector")
    record = {
        "template": portrait_template().round(3).tolist(),
        "settings": asdict(cfg) | {"strides": list(LAYOUT.strides), "anchors": LAYOUT.anchors},
        "seconds": round(time.time() - start, 1),
    }
    save_face_net(net.eval(), out, record)
    record["settings"]["threshold"] = choose_threshold(WorldFaceAnalysis(out), cfg.seed + 1, cfg.threshold_renders)
    save_face_net(net, out, record)
    return record


THRESHOLDS = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)


def choose_threshold(analysis: WorldFaceAnalysis, seed: int, n: int = 600) -> float:
    """The score threshold that finds the most faces net of false detections on fresh renders of the training
    distribution (training identities only). The small faces of two full figures side by side score lower
    than a portrait's, so insightface's 0.5 would miss many of them."""
    data = make_training_set(n, seed)
    truth = [f[~np.isnan(f[:, 0, 0])] for f in data["faces"]]

    def net_found(threshold: float) -> float:
        analysis.threshold = threshold
        scores = detection_scores(analysis, data["images"], truth)
        return scores["found"] - scores["false_per_picture"]

    return max(THRESHOLDS, key=net_found)


# --------------------------------------------------------------------------------------------
# Measuring the face analysis
# --------------------------------------------------------------------------------------------


def heldout_renders(per_identity: int, framing: str, seed: int) -> tuple[list[Render], np.ndarray, list[str]]:
    """Renders of the 8 held-out identities (not the bench's references), their identity indices and prompts."""
    rng = np.random.default_rng(seed)
    renders, labels, prompts = [], [], []
    for i, b in enumerate(IDENTITIES):
        for _ in range(per_identity):
            context = str(rng.choice(list(vocab.CONTEXTS)))
            renders.append(
                render(Scene(context, [identity_character(b, rng, framing)], variant=int(rng.integers(2**31))))
            )
            labels.append(i)
            what = f"a portrait of a {b.cls}" if framing == "portrait" else f"a {b.cls}"
            prompts.append(f"{what} {vocab.CONTEXTS[context]}")
    return renders, np.array(labels), prompts


def calibration_renders(identities: int = 40, per_identity: int = 4, seed: int = 99) -> tuple[np.ndarray, np.ndarray]:
    """Portraits and full figures of training identities: the set the verification threshold is chosen on."""
    rng = np.random.default_rng(seed)
    exclude = set(heldout_identity_keys())
    images, labels = [], []
    for i in range(identities):
        spec = random_character(rng, 0.5, "portrait", exclude)
        for k in range(per_identity):
            c = random_character(
                rng, 0.5, "portrait" if k % 2 == 0 else "full", exclude, identity=spec.identity, cls=spec.cls
            )
            images.append(
                render(Scene(str(rng.choice(list(vocab.CONTEXTS))), [c], variant=int(rng.integers(2**31)))).image
            )
            labels.append(i)
    return np.stack(images), np.array(labels)


def detection_scores(analysis: WorldFaceAnalysis, images: np.ndarray, truth: list[np.ndarray]) -> dict:
    """Faces found (a detection within half a face's size of a true face's centre), false detections per
    picture, and the found faces' mean keypoint error in pixels."""
    hits = total = false = 0
    errors = []
    for (_, detected, _), kps_true in zip(analysis.detect(list(images)), truth):
        centres = (detected.boxes[:, :2] + detected.boxes[:, 2:]) / 2
        used: set[int] = set()
        for kps in kps_true:
            box = face_box(kps)
            distance = np.linalg.norm(centres - (box[:2] + box[2:]) / 2, axis=1)
            distance[list(used)] = np.inf
            total += 1
            if len(distance) and distance.min() < (box[3] - box[1]) / 2:
                j = int(distance.argmin())
                used.add(j)
                hits += 1
                errors.append(np.linalg.norm(detected.keypoints[j] - kps, axis=1).mean())
        false += len(centres) - len(used)
    return {
        "found": round(hits / max(total, 1), 4),
        "false_per_picture": round(false / max(len(images), 1), 4),
        "keypoint_error_px": round(float(np.mean(errors)), 3) if errors else None,
    }


def best_threshold(emb: torch.Tensor, labels: np.ndarray) -> float:
    same, sims = _pairs(emb, labels)
    candidates = np.unique(np.round(sims, 3))
    return float(max(candidates, key=lambda t: _balanced_accuracy(sims, same, t)))


def _pairs(emb: torch.Tensor, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pairs = np.array(list(itertools.combinations(range(len(labels)), 2)))
    sims = (emb[pairs[:, 0]] * emb[pairs[:, 1]]).sum(-1).numpy()
    return labels[pairs[:, 0]] == labels[pairs[:, 1]], sims


def _balanced_accuracy(sims: np.ndarray, same: np.ndarray, threshold: float) -> float:
    """Mean of the accuracies on same-person and on different-person pairs (there are far more of the latter)."""
    return 0.5 * (float((sims[same] >= threshold).mean()) + float((sims[~same] < threshold).mean()))


def verification(emb: torch.Tensor, found: torch.Tensor, labels: np.ndarray, threshold: float) -> float:
    """Balanced verification accuracy over every pair of pictures; a picture without a face fails its pairs."""
    same, sims = _pairs(emb, labels)
    pairs = np.array(list(itertools.combinations(range(len(labels)), 2)))
    ok = found.numpy()[pairs].all(1)
    sims = np.where(ok, sims, np.where(same, -np.inf, np.inf))
    return round(_balanced_accuracy(sims, same, threshold), 4)


def redraw(base, renders: list[Render], prompts: list[str], strength: float, seed: int = 4242) -> np.ndarray:
    """The renders noised to `strength` and denoised by the base model from their prompts."""
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    pipe = StableDiffusionImg2ImgPipeline(**base.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for k in tqdm(range(0, len(renders), 16), desc=f"redraw from {strength}", mininterval=2):
        images = pipe(
            prompts[k : k + 16],
            image=[Image.fromarray(r.image) for r in renders[k : k + 16]],
            strength=strength,
            num_inference_steps=25,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(seed + k),
            output_type="np",
        ).images
        out.append((images * 255).round().astype(np.uint8))
    return np.concatenate(out)


def measure(analysis: WorldFaceAnalysis, base=None, per_identity: int = 8, seed: int = 2024) -> dict:
    """The world face analysis's readings on held-out identities: renders, and the base's redrawings when a
    base is given. Whole-picture embeddings (evaluation's WorldFaceEmbedder) are measured beside them."""
    from limner.encoders.faces import WorldFaceEmbedder
    from limner.models.loading import WORLD_PROBES

    whole = WorldFaceEmbedder(WORLD_PROBES)
    cal_images, cal_labels = calibration_renders()
    threshold = best_threshold(analysis.faces(list(cal_images))[0], cal_labels)
    whole_threshold = best_threshold(whole.faces(list(cal_images))[0], cal_labels)
    results: dict = {"threshold": threshold, "whole_picture_threshold": whole_threshold}
    sets: dict[str, tuple[np.ndarray, list[np.ndarray], np.ndarray]] = {}
    for framing in ("portrait", "full"):
        renders, labels, prompts = heldout_renders(per_identity, framing, seed + (framing == "full"))
        truth = [faces_of(r) for r in renders]
        sets[f"renders/{framing}"] = (np.stack([r.image for r in renders]), truth, labels)
        if base is not None:
            for strength in (0.4, 0.6):
                sets[f"redrawn {strength}/{framing}"] = (redraw(base, renders, prompts, strength), truth, labels)
    for name, (images, truth, labels) in sets.items():
        row = detection_scores(analysis, images, truth)
        emb, found = analysis.faces(list(images))
        row["verification"] = verification(emb, found, labels, threshold)
        row["verification_whole_picture"] = verification(*whole.faces(list(images)), labels, whole_threshold)
        results[name] = row
    two = two_character_renders(seed + 2)
    results["renders/two characters"] = detection_scores(analysis, *two)
    if base is not None:
        results |= drawn_faces(analysis, base)
    return results


def drawn_faces(analysis: WorldFaceAnalysis, base, per_framing: int = 16, seed: int = 31) -> dict:
    """Faces found in the base's own drawings from text alone ("a portrait of a CLASS CONTEXT", "a CLASS
    CONTEXT"), where no keypoints are known: the share of drawings with exactly one face, and faces per drawing."""
    from limner.world.check import draw

    rng = np.random.default_rng(seed)
    out = {}
    for framing, what in (("portrait", "a portrait of a"), ("full", "a")):
        prompts = [
            f"{what} {rng.choice(vocab.CHARACTER_CLASSES)} {vocab.CONTEXTS[str(rng.choice(list(vocab.CONTEXTS)))]}"
            for _ in range(per_framing)
        ]
        counts = np.array([len(f) for f in analysis.analyse(draw(base, prompts, seed=seed))])
        out[f"drawn from text/{framing}"] = {
            "one_face": round(float((counts == 1).mean()), 4),
            "faces_per_picture": round(float(counts.mean()), 4),
        }
    return out


def two_character_renders(seed: int, n: int = 32) -> tuple[np.ndarray, list[np.ndarray]]:
    """Pictures of two held-out identities side by side, and their faces' keypoints."""
    rng = np.random.default_rng(seed)
    images, truth = [], []
    for _ in range(n):
        a, b = rng.choice(len(IDENTITIES), 2, replace=False)
        left, right = identity_character(IDENTITIES[a], rng, "full"), identity_character(IDENTITIES[b], rng, "full")
        left.x, right.x, left.scale, right.scale = 0.28, 0.72, 0.85, 0.85
        r = render(Scene(str(rng.choice(list(vocab.CONTEXTS))), [left, right], variant=int(rng.integers(2**31))))
        images.append(r.image)
        truth.append(faces_of(r))
    return np.stack(images), truth


def sheet(analysis: WorldFaceAnalysis, images: np.ndarray, zoom: int = 4):
    """A picture of what the analysis reads: each image (enlarged) with its faces' boxes and keypoints, the
    mask tinted, and beside it each face's aligned crop."""
    from PIL import Image, ImageDraw

    tiles = []
    for image, faces in zip(images, analysis.analyse(list(images))):
        big = image.astype(np.float32)
        for f in faces:
            big[f.mask] = 0.6 * big[f.mask] + 0.4 * np.array([255, 255, 0])
        tile = Image.fromarray(big.astype(np.uint8)).resize((64 * zoom, 64 * zoom), Image.NEAREST)
        d = ImageDraw.Draw(tile)
        for f in faces:
            d.rectangle([float(v) * zoom for v in f.box], outline=(255, 0, 0), width=2)
            for x, y in f.keypoints * zoom:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(0, 255, 0))
        row = Image.new("RGB", (64 * zoom * 2, 64 * zoom), (40, 40, 40))
        row.paste(tile, (0, 0))
        for k, f in enumerate(faces[:2]):
            crop = Image.fromarray(f.crop).resize((32 * zoom, 32 * zoom), Image.NEAREST)
            row.paste(crop, (64 * zoom, 32 * zoom * k))
        tiles.append(row)
    cols = 4
    rows = (len(tiles) + cols - 1) // cols
    out = Image.new("RGB", (tiles[0].width * cols, tiles[0].height * rows), (40, 40, 40))
    for i, t in enumerate(tiles):
        out.paste(t, ((i % cols) * t.width, (i // cols) * t.height))
    return out


def sheet_images(base=None, seed: int = 11) -> np.ndarray:
    """16 pictures for `sheet`: held-out identities as portraits, full figures and pairs, and (given a base) the
    base's redrawings of portraits and full figures from 0.6 noise."""
    portraits, _, p_prompts = heldout_renders(1, "portrait", seed)
    full, _, f_prompts = heldout_renders(1, "full", seed + 1)
    pairs, _ = two_character_renders(seed + 2, 4)
    images = [r.image for r in portraits[:4] + full[:4]] + list(pairs)
    if base is not None:
        images += list(redraw(base, portraits[4:6] + full[4:6], p_prompts[4:6] + f_prompts[4:6], 0.6))
    return np.stack(images)
