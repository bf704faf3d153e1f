"""The world's OpenPose ControlNet: what StoryMaker's pose decoupling trains beside (Zhou et al., 2024, 3.3).

On real bases the pose ControlNet is one a user already has (an OpenPose ControlNet for their SD version); the
world has none, so `limner world pose` trains one, as lllyasviel's were trained: a ControlNet copied from the
world UNet's encoder (limner.adapters.controlnet) learns the plain denoising loss on renders of the world's
characters with their body keypoints drawn as an OpenPose skeleton (`draw_pose`); the UNet, VAE and text encoder
stay frozen, the ControlNet reads the caption. The renders are the face analyser's training scenes (one person as a
portrait or a full figure, two side by side, a person beside an object, objects alone with an empty skeleton);
held-out identities never appear.

    openpose_points   a render's character keypoints in OpenPose's 18-point order (the renderer's left is the
                      picture's left, which is the person's right when they face us)
    PoseControlNet    the training task
    train_pose_controlnet  trains (resumable from `work`), then stores the ControlNet as a delta against the world
                      UNet (as the shipped IdentityNet) with `build.json` recording how it was made
    measure_pose      how well generations follow a requested skeleton: the world face analyser's face centre
                      against the skeleton's eyes and nose, with and without the ControlNet
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from limner.adapters.controlnet import (
    OPENPOSE_POINTS,
    ControlSignal,
    condition_side,
    condition_tensor,
    controlnet_from_unet,
    draw_pose,
    install_controlnet,
)
from limner.images import to_unit_range
from limner.models.loading import ASSETS
from limner.training import TrainConfig, TrainingTask, noise_scheduler, train
from limner.training.data import fit_square, sample_latents
from limner.training.losses import denoising_loss
from limner.world.render import SIZE, EntityTruth, render
from limner.world.scenes import caption_for

if TYPE_CHECKING:
    from limner.models.loading import Base

WORLD_POSE = ASSETS / "world" / "pose_controlnet"
RECORD = "build.json"  # how it was made, as the world base's build.json: not part of its fingerprint

# the renderer's names (picture left/right) -> OpenPose's (the person's right is the picture's left)
_BODY_NAMES = {
    "neck": "neck",
    "left_shoulder": "right_shoulder",
    "left_elbow": "right_elbow",
    "left_hand": "right_wrist",
    "right_shoulder": "left_shoulder",
    "right_elbow": "left_elbow",
    "right_hand": "left_wrist",
    "left_hip": "right_hip",
    "left_knee": "right_knee",
    "left_foot": "right_ankle",
    "right_hip": "left_hip",
    "right_knee": "left_knee",
    "right_foot": "left_ankle",
}


def openpose_points(face_keypoints: np.ndarray | None, body_keypoints: dict, scale: float = 1.0) -> np.ndarray:
    """[18, 2] one character's points in OpenPose's order (NaN where the world has none: its people have no ears,
    a portrait no arms or legs), from the renderer's face keypoints (eyes left and right in the picture, nose,
    mouth corners) and named body keypoints, times `scale`."""
    points = np.full((len(OPENPOSE_POINTS), 2), np.nan)
    index = {name: i for i, name in enumerate(OPENPOSE_POINTS)}
    for name, (x, y) in body_keypoints.items():
        if name in _BODY_NAMES:
            points[index[_BODY_NAMES[name]]] = (x, y)
    if face_keypoints is not None:
        face = np.asarray(face_keypoints, dtype=float)
        points[index["right_eye"]], points[index["left_eye"]], points[index["nose"]] = face[0], face[1], face[2]
    return points * scale


def skeletons_of(entities: list[EntityTruth], scale: float = 1.0) -> list[np.ndarray]:
    """The OpenPose points of every character of a render."""
    return [openpose_points(e.face_keypoints, e.body_keypoints, scale) for e in entities if e.kind == "character"]


def pose_picture(skeletons: list[np.ndarray], side: int) -> np.ndarray:
    """The condition image (uint8, side x side) of skeletons given in 64-px render pixels."""
    return draw_pose(side, side, [s * side / SIZE for s in skeletons])


def head_error(face_keypoints: np.ndarray, skeleton: np.ndarray, side: int) -> float:
    """Pixels between a found face's eyes and nose (their mean; the face analyser's first 3 keypoints) and the
    skeleton's (OpenPose points in 64-px render pixels), in a picture `side` pixels wide."""
    want = np.asarray(skeleton)[[0, 14, 15]].mean(0) * side / SIZE
    return float(np.linalg.norm(np.asarray(face_keypoints)[:3].mean(0) - want))


@dataclass
class PoseBuildConfig:
    steps: int = 2000
    batch: int = 8
    lr: float = 4e-4  # the world UNet's own
    seed: int = 0
    checkpoint_every: int = 200
    energy: float = 0.8  # of each copied matrix's change kept in the shipped delta: 3.0 MB, the losses of the full one

    @classmethod
    def quick(cls) -> PoseBuildConfig:
        return cls(steps=4, batch=2, checkpoint_every=2)


# The condition encoder halves the skeleton twice, as the world's VAE halves its pictures: the skeleton is drawn at
# the picture's own size (64 px), as SD's OpenPose ControlNets read 512 px skeletons beside 64-latent pictures.
EMBEDDING_CHANNELS = (16, 32, 96)


def new_pose_controlnet(unet: nn.Module) -> nn.Module:
    """A fresh world pose ControlNet: the UNet's encoder copied, zero convolutions, and a condition encoder that
    passes the skeleton on from the first step.

    diffusers initialises the condition encoder's convolutions by PyTorch's default and its last one at zero. On a
    skeleton (thin lines, 1% of the pixels lit) the default's shrinking variance leaves almost nothing of it after
    the encoder's layers, and the zero last layer gets a gradient only through the zero convolutions: two runs of
    2000 steps (lr 1e-4; 4e-4 with that last layer at the default) ended with the loss under the right skeletons
    and under shuffled ones equal to 5 decimals, no steering. He initialisation (zero biases) keeps the skeleton's
    variance through the encoder; the zero convolutions still keep a new ControlNet from changing the UNet."""
    controlnet = controlnet_from_unet(unet, embedding_channels=EMBEDDING_CHANNELS)
    encoder = controlnet.controlnet_cond_embedding
    for conv in [encoder.conv_in, *encoder.blocks, encoder.conv_out]:
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
    return controlnet


class PoseControlNet(TrainingTask):
    """A ControlNet copied from the base's UNet learns the denoising loss under its skeleton condition; the rest of
    the base is frozen."""

    def __init__(self, base: Base):
        from limner.training.conditioning import PromptEncoder

        self.base = base
        pipe = base.pipe
        for m in (pipe.unet, pipe.vae, pipe.text_encoder):
            m.requires_grad_(False)
        self.controlnet = new_pose_controlnet(pipe.unet).float().train().requires_grad_(True)
        self.prompts = PromptEncoder(pipe, base.resolution)
        self.scheduler = noise_scheduler(pipe)
        self.signal = ControlSignal(self.controlnet, torch.zeros(1, 3, 8, 8), scale=1.0, name="world pose")
        self.remove_signal = install_controlnet(pipe.unet, self.signal)  # last: nothing after it can fail

    def close(self) -> None:
        self.remove_signal()

    def modules(self) -> dict[str, nn.Module]:
        return {"controlnet": self.controlnet}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.base.pipe.unet, "vae": self.base.pipe.vae, **self.prompts.text_encoders()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.controlnet.parameters())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.controlnet.state_dict().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.controlnet.load_state_dict(state)

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        vae = self.base.pipe.vae
        # the ControlNet runs inside the UNet's call (a forward pre-hook): through accelerate's wrapper if any
        self.signal.controlnet = self.wrapped.get("controlnet", self.controlnet)
        self.signal.image = batch["poses"].to(self.base.device)
        with torch.no_grad():
            latents = sample_latents(vae, batch["images"], generator)
            cond, kwargs = self.prompts.encode_frozen(batch["prompts"])
        return denoising_loss(self.base.pipe.unet, self.scheduler, latents, cond, generator, **kwargs)


def pose_batches(batch_size: int, resolution: int, side: int):
    """next_batch: renders of the face analyser's training scenes at the base's resolution, their captions and their
    skeletons drawn `side` pixels wide; every scene drawn from the loop's generator (so a resumed run draws what it
    would have)."""
    from limner.world.scenes import training_scene

    def next_batch(generator: torch.Generator) -> dict:
        images, prompts, poses = [], [], []
        for _ in range(batch_size):
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
            scene = training_scene(rng)
            scene.caption = caption_for(scene, rng)
            drawn = render(scene)
            images.append(fit_square(drawn.image, resolution))
            prompts.append(drawn.caption)
            poses.append(pose_picture(skeletons_of(drawn.entities), side))
        return {"images": to_unit_range(np.stack(images)), "prompts": prompts, "poses": condition_tensor(poses)}

    return next_batch


def train_pose_controlnet(base: Base, out: Path, work: Path, cfg: PoseBuildConfig) -> dict:
    """Trains the world's OpenPose ControlNet (resumable from `work`); writes it to `out` as a delta against the
    base's UNet, with build.json (settings, time, loss curve); the full ControlNet stays in `work`/full."""
    from limner.adapters.controlnet import save_controlnet, save_controlnet_delta
    from limner.io import write_json_atomic

    start = time.time()
    settings = TrainConfig(
        max_steps=cfg.steps,
        batch_size=cfg.batch,
        learning_rate=cfg.lr,
        weight_decay=0.01,
        lr_schedule="cosine",
        lr_warmup_steps=min(100, cfg.steps // 10),
        seed=cfg.seed,
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=1,
        resume="latest",
    )
    task = PoseControlNet(base)
    try:
        side = condition_side(base, task.controlnet)
        log = train(task, pose_batches(cfg.batch, base.resolution, side), settings, work / "pose_controlnet", "pose")
    finally:
        task.close()
    controlnet = task.controlnet.eval()
    save_controlnet(controlnet, work / "full")
    delta = save_controlnet_delta(controlnet, base.pipe.unet, out, energy=cfg.energy)
    record = {
        "what": "the world's OpenPose ControlNet (limner.world.pose): StoryMaker's pose decoupling",
        "settings": asdict(cfg),
        "steps": log.steps,
        "seconds": round(time.time() - start, 1),
        "curve": log.curve[:: max(1, len(log.curve) // 200)] + log.curve[-1:],  # ~200 points and the last
        "delta": {"energy": cfg.energy, "ranks": delta["ranks"], "unet_fingerprint": delta["unet_fingerprint"]},
    }
    write_json_atomic(out / RECORD, record)
    return record


def measure_pose(base: Base, folder: Path, n: int = 24, seed: int = 0, scale: float = 1.0, steps: int = 25) -> dict:
    """Generations under skeletons of held-out people (portraits and full figures, fresh scenes), with the ControlNet
    at `scale` and without it, same prompts and seeds: per picture the world face analyser's largest face, and the
    distance in pixels from its eyes' and nose's mean to the skeleton's. Returns the mean distance, the share
    within 4 px and the share of pictures with a face found, for both."""
    from limner.adapters.controlnet import load_controlnet
    from limner.encoders.faces import face_analysis, largest_face
    from limner.generation import GenerationSettings, generate
    from limner.world import vocab
    from limner.world.bench import IDENTITIES, identity_character
    from limner.world.render import Scene

    rng = np.random.default_rng(seed)
    scenes = []
    for i in range(n):
        spec = identity_character(IDENTITIES[i % len(IDENTITIES)], rng, "portrait" if i % 2 == 0 else "full")
        spec.x = rng.uniform(0.3, 0.7) if spec.framing == "portrait" else rng.uniform(0.2, 0.8)  # off the centre too
        scene = Scene(str(rng.choice(list(vocab.CONTEXTS))), [spec], variant=int(rng.integers(2**31)))
        scene.caption = caption_for(scene, rng)
        scenes.append(render(scene))
    controlnet = load_controlnet(folder, base.pipe.unet)
    analyser = face_analysis(None)
    side = condition_side(base, controlnet)
    out = {}
    for label, s in (("with", scale), ("without", 0.0)):
        errors, found = [], 0
        for i, drawn in enumerate(scenes):
            skeleton = skeletons_of(drawn.entities)[0]
            picture = pose_picture([skeleton], side)
            signal = ControlSignal(controlnet, condition_tensor(picture), scale=s, name="world pose")
            remove = install_controlnet(base.pipe.unet, signal)
            try:
                settings = GenerationSettings(drawn.caption, num_images=1, seed=seed + i, steps=steps, batch_size=1)
                image = np.asarray(generate(base, settings).images[0])
            finally:
                remove()
            face = largest_face(analyser.analyse([image])[0])
            if face is None:
                continue
            found += 1
            errors.append(head_error(face.keypoints, skeleton, base.resolution))
        errs = np.array(errors)
        out[label] = {
            "scale": s,
            "pictures": n,
            "faces_found": round(found / n, 3),
            "face_error_px": round(float(errs.mean()), 2) if len(errs) else None,
            "within_4px": round(float((errs <= 4).mean()), 3) if len(errs) else None,
        }
    return out


def read_record(folder: Path = WORLD_POSE) -> dict:
    return json.loads((Path(folder) / RECORD).read_text())
