"""ControlNet (Zhang et al., 2023) in limner's generation path: a trainable copy of the UNet's encoder whose outputs
are added to the frozen UNet's skip connections, steered by a condition image.

    controlnet_from_unet   diffusers' `ControlNetModel.from_unet`: the UNet's conv_in, time embedding, down and mid
                           blocks copied, a small condition-image encoder and zero-initialised 1x1 convolutions
                           added, so a new ControlNet changes nothing until it trains (InstantID's IdentityNet,
                           StoryMaker's pose ControlNet)
    draw_kps               the 5 face keypoints drawn as InstantID's official code draws them (its condition image)
    draw_pose              people's body keypoints drawn as an OpenPose skeleton (the condition image of an OpenPose
                           ControlNet, StoryMaker's pose decoupling)
    ControlSignal          one ControlNet with its condition image, its scale and the cross-attention context it
                           reads (the text, or an adapter's image tokens: InstantID's IdentityNet reads the ID
                           tokens only)
    install_controlnet     adds a signal's residuals to every call of the UNet, whoever calls it (the diffusers
                           pipeline limner.generation runs, regional windows, a training loss): a forward pre-hook
                           runs the ControlNet on the very latents, timestep and conditioning the UNet gets and
                           passes `down_block_additional_residuals` / `mid_block_additional_residual`, the UNet's own
                           inputs for them. Several signals sum, as diffusers' MultiControlNetModel sums them.

The condition image follows the latents: under classifier-free guidance the batch is [unconditional; conditional]
and the image is repeated over it (the official InstantID pipeline conditions both halves); it is drawn (or
resized) to the latents' size times the ControlNet's downsampling, as diffusers' control image processor resizes
it to the requested height and width.

Files: `save_controlnet` writes diffusers' folder layout (config.json, diffusion_pytorch_model.safetensors, fp16),
so `ControlNetModel.from_pretrained` and the community pipelines load what limner trains; `load_controlnet` reads
such a folder and checks it was made for the UNet at hand.

A ControlNet stored as a delta against its UNet (`save_controlnet_delta`): most of a ControlNet is a trained copy of
the UNet's encoder, so the folder can hold config.json and `controlnet_delta.safetensors` instead of the weights:
each copied matrix (a convolution read as out x in*k*k) as the UNet's plus a truncated-SVD factor pair of what
training changed, every other tensor (the condition encoder, zero convolutions, biases, norms: anything where the
pair saves nothing) in full, and the fingerprint of the UNet tensors it was taken against. `load_controlnet`
materialises such a folder on that UNet (and refuses another one); `save_controlnet` writes the materialised
ControlNet back in diffusers' layout for other libraries. limner ships its world IdentityNet this way (10.4 MB
where the full one is 16.2); a folder diffusers wrote loads as before.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from limner.errors import LimnerError
from limner.io import pickle_opt_in, replace_folder
from limner.models.saving import diffusers_quiet

if TYPE_CHECKING:
    from diffusers import ControlNetModel, UNet2DConditionModel

    from limner.models.loading import Base

# InstantID's keypoint drawing (its pipeline's draw_kps): one colour per keypoint (RGB), in the detector's order
# (the two eyes, the nose tip, the two mouth corners); a limb from each of the other points to the nose, coloured
# as its first point, drawn as a filled ellipse of half-width `stickwidth` and then dimmed to 60%; then a filled
# circle on every point. The official sizes are in pixels of SDXL's ~1024 px pictures.
KPS_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
KPS_LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
KPS_STICKWIDTH = 4
KPS_RADIUS = 10
KPS_OFFICIAL_SIDE = 1024
LIMB_DIM = 0.6

# OpenPose's body format (the COCO 18 points that OpenPose ControlNets read). "right" is the person's right, which
# is the picture's left when they face us. Limb k and point k share the k-th colour of a hue wheel; limbs are drawn
# as filled ellipses (half-width `stickwidth`) dimmed to 60%, then a filled circle on every point seen. The official
# sizes (4 px sticks and circles) are for ~512 px pictures.
OPENPOSE_POINTS = (
    "nose", "neck",
    "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip
OPENPOSE_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
OPENPOSE_COLOURS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
OPENPOSE_STICKWIDTH = 4
OPENPOSE_RADIUS = 4
OPENPOSE_OFFICIAL_SIDE = 512

# attribute on the UNet: the installed signals and the hook that runs them
_SIGNALS = "_limner_control_signals"
_HOOK = "_limner_control_hook"


# ---------------------------------------------------------------------------------------------------------------
# The condition image
# ---------------------------------------------------------------------------------------------------------------


def _style(side: int, official: tuple[int, int], official_side: int) -> tuple[int, int]:
    """(stickwidth, radius) in proportion to a picture of `side` pixels below the official size, at least 1 px."""
    ratio = min(1.0, side / official_side)
    return max(1, round(official[0] * ratio)), max(1, round(official[1] * ratio))


def kps_style(side: int) -> tuple[int, int]:
    """(stickwidth, radius) for pictures of `side` pixels: the official sizes at SDXL's 1024 px, in proportion
    below it, at least 1 px (a 64 px world picture gets 1 and 1: the official 10 px circles would cover its
    whole face)."""
    return _style(side, (KPS_STICKWIDTH, KPS_RADIUS), KPS_OFFICIAL_SIDE)


def pose_style(side: int) -> tuple[int, int]:
    """(stickwidth, radius) of an OpenPose skeleton in pictures of `side` pixels (the official 4 and 4 at 512 px)."""
    return _style(side, (OPENPOSE_STICKWIDTH, OPENPOSE_RADIUS), OPENPOSE_OFFICIAL_SIDE)


def _ellipse_polygon(centre: tuple[int, int], axes: tuple[int, int], angle: int) -> list[tuple[int, int]]:
    """The outline of a rotated ellipse, one point per degree (what OpenCV's ellipse2Poly gives with delta 1)."""
    (cx, cy), (a, b) = centre, axes
    theta = math.radians(angle)
    phi = np.radians(np.arange(0, 361))
    x = cx + a * np.cos(phi) * math.cos(theta) - b * np.sin(phi) * math.sin(theta)
    y = cy + a * np.cos(phi) * math.sin(theta) + b * np.sin(phi) * math.cos(theta)
    return list(dict.fromkeys(zip(np.rint(x).astype(int).tolist(), np.rint(y).astype(int).tolist())))


def _draw_skeleton(
    width: int,
    height: int,
    skeletons: list[np.ndarray],
    limbs: tuple[tuple[int, int], ...],
    limb_colours: list[tuple[int, int, int]],
    point_colours: tuple[tuple[int, int, int], ...],
    stickwidth: int,
    radius: int,
) -> np.ndarray:
    """Skeletons ([points, 2] each, NaN where a point is not seen) on black: every limb whose two points are seen
    as a filled ellipse dimmed to 60%, then a filled circle on every point seen. uint8 [height, width, 3]."""
    from PIL import Image, ImageDraw

    limb_layer = Image.new("RGB", (width, height))
    pen = ImageDraw.Draw(limb_layer)
    for points in skeletons:
        for (a, b), colour in zip(limbs, limb_colours):
            (x0, y0), (x1, y1) = points[a], points[b]
            if np.isnan([x0, y0, x1, y1]).any():
                continue
            length = math.hypot(x0 - x1, y0 - y1)
            angle = int(math.degrees(math.atan2(y0 - y1, x0 - x1)))
            centre = (int((x0 + x1) / 2), int((y0 + y1) / 2))
            outline = _ellipse_polygon(centre, (int(length / 2), stickwidth), angle)
            if len(outline) > 2:
                pen.polygon(outline, fill=colour)
            else:  # a limb shorter than a pixel
                pen.point(outline, fill=colour)
    out = Image.fromarray((np.asarray(limb_layer, dtype=np.float64) * LIMB_DIM).astype(np.uint8))
    pen = ImageDraw.Draw(out)
    for points in skeletons:
        for (x, y), colour in zip(points, point_colours):
            if not np.isnan([x, y]).any():
                x, y = int(x), int(y)
                pen.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    return np.asarray(out)


def draw_kps(
    width: int,
    height: int,
    keypoints: np.ndarray,
    stickwidth: int | None = None,
    radius: int | None = None,
) -> np.ndarray:
    """The 5 face keypoints ([5, 2] x, y in this picture's pixels) drawn on black as InstantID's condition image:
    uint8 [height, width, 3]. stickwidth, radius: the official 4 and 10 px, or `kps_style`'s for small pictures
    when None. Each limb to the nose takes its first point's colour."""
    kps = np.asarray(keypoints, dtype=np.float64)
    if kps.shape != (len(KPS_COLOURS), 2):
        raise ValueError(f"draw_kps takes {len(KPS_COLOURS)} (x, y) keypoints, got shape {kps.shape}")
    style = kps_style(min(width, height))
    stickwidth = style[0] if stickwidth is None else stickwidth
    radius = style[1] if radius is None else radius
    limb_colours = [KPS_COLOURS[a] for a, _ in KPS_LIMBS]
    return _draw_skeleton(width, height, [kps], KPS_LIMBS, limb_colours, KPS_COLOURS, stickwidth, radius)


def draw_pose(
    width: int,
    height: int,
    people: np.ndarray | list[np.ndarray],
    stickwidth: int | None = None,
    radius: int | None = None,
) -> np.ndarray:
    """People's body keypoints in OpenPose's 18-point order (OPENPOSE_POINTS; [people, 18, 2] x, y in this picture's
    pixels, NaN where a point is not seen) drawn on black as an OpenPose ControlNet's condition image: uint8
    [height, width, 3]. stickwidth, radius: the official 4 px each, or `pose_style`'s for small pictures."""
    skeletons = [np.asarray(p, dtype=np.float64) for p in people]
    for p in skeletons:
        if p.shape != (len(OPENPOSE_POINTS), 2):
            raise ValueError(f"draw_pose takes {len(OPENPOSE_POINTS)} (x, y) points a person, got shape {p.shape}")
    style = pose_style(min(width, height))
    stickwidth = style[0] if stickwidth is None else stickwidth
    radius = style[1] if radius is None else radius
    return _draw_skeleton(
        width, height, skeletons, OPENPOSE_LIMBS, list(OPENPOSE_COLOURS), OPENPOSE_COLOURS, stickwidth, radius
    )


def condition_tensor(pictures: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] picture(s) as a ControlNet takes them: float [N, 3, H, W] in [0, 1] (diffusers' control
    image processor does not normalise to [-1, 1])."""
    batch = np.stack(pictures) if isinstance(pictures, list) else np.array(pictures)[None]
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0


# ---------------------------------------------------------------------------------------------------------------
# The ControlNet
# ---------------------------------------------------------------------------------------------------------------


def _moved(module: nn.Module, *args: Any) -> nn.Module:
    """module.to(*args) without diffusers' note that none of a ControlNet's modules must stay in float32."""
    import logging

    log = logging.getLogger("diffusers.models.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return module.to(*args)
    finally:
        log.setLevel(level)


def controlnet_from_unet(
    unet: UNet2DConditionModel,
    conditioning_channels: int = 3,
    embedding_channels: tuple[int, ...] = (16, 32, 96, 256),
) -> ControlNetModel:
    """A new ControlNet for `unet`: its encoder's weights copied, zero convolutions added (diffusers' from_unet),
    on the UNet's device and dtype. `embedding_channels`: the condition encoder's widths, each after the first
    halving the picture (diffusers' four: 8x, as SD's VAE)."""
    from diffusers import ControlNetModel

    param = next(unet.parameters())
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_channels=conditioning_channels, conditioning_embedding_out_channels=embedding_channels
    )
    return _moved(controlnet, param.device, param.dtype)


def downsampling(controlnet: nn.Module) -> int:
    """Pixels of condition image per latent pixel: the condition encoder halves the size once per stage after the
    first (8 for diffusers' default (16, 32, 96, 256))."""
    return 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)


# the UNet config fields a ControlNet copies: one that differs was made for another base
_MATCHING = (
    "in_channels",
    "block_out_channels",
    "down_block_types",
    "layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
    "transformer_layers_per_block",
    "addition_embed_type",
    "projection_class_embeddings_input_dim",
)


def condition_side(base: Base, controlnet: nn.Module) -> int:
    """The side of the condition image the ControlNet reads at the base's resolution (the latents' side times its
    downsampling): skeletons are drawn there, sharper than a smaller drawing resized."""
    return base.resolution // int(base.pipe.vae_scale_factor) * downsampling(controlnet)


def check_controlnet_fits(controlnet: nn.Module | dict, unet: UNet2DConditionModel, where: str | Path) -> None:
    """A LimnerError naming the fields that differ when the ControlNet (a module, or its config.json as a dict)
    was made for another UNet."""
    config = controlnet if isinstance(controlnet, dict) else controlnet.config
    problems = []
    for name in _MATCHING:
        if name not in unet.config or name not in config:
            continue
        mine, theirs = unet.config[name], config[name]
        if isinstance(mine, (list, tuple)) and isinstance(theirs, (list, tuple)):
            mine, theirs = list(mine), list(theirs)
        elif isinstance(mine, (list, tuple)) or isinstance(theirs, (list, tuple)):  # one value for all blocks
            n = len(unet.config.block_out_channels)
            mine = list(mine) if isinstance(mine, (list, tuple)) else [mine] * n
            theirs = list(theirs) if isinstance(theirs, (list, tuple)) else [theirs] * n
        if mine != theirs:
            problems.append(f"{name} {theirs} (this base: {mine})")
    if problems:
        raise LimnerError(
            f"ControlNet {where} was made for another base: {'; '.join(problems)}; give one made for this base "
            "(or pretrain one)"
        )


def load_controlnet(folder: str | Path, unet: UNet2DConditionModel) -> ControlNetModel:
    """A ControlNet folder in diffusers' layout, or one stored as a delta against `unet` (materialised on it),
    checked against `unet`, on its device and dtype."""
    from diffusers import ControlNetModel

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise LimnerError(
            f"ControlNet {folder} has no config.json: give a folder in diffusers' layout (config.json and "
            "diffusion_pytorch_model.safetensors), as InstantID's ControlNetModel/"
        )
    if is_controlnet_delta(folder):
        controlnet = materialise_controlnet(folder, unet)
        param = next(unet.parameters())
        return _moved(controlnet, param.device, param.dtype).eval().requires_grad_(False)
    pickled = folder / "diffusion_pytorch_model.bin"
    if not (folder / "diffusion_pytorch_model.safetensors").is_file() and pickled.is_file() and not pickle_opt_in():
        raise LimnerError(
            f"ControlNet {folder} holds its weights as a pickle ({pickled.name}); limner reads one only with "
            "--allow-pickle (then with weights_only=True). Prefer diffusion_pytorch_model.safetensors."
        )
    try:
        controlnet = ControlNetModel.from_pretrained(
            folder, local_files_only=True, use_safetensors=(folder / "diffusion_pytorch_model.safetensors").is_file()
        )
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LimnerError(
            f"ControlNet {folder} could not be read ({first}); give a diffusers ControlNet folder"
        ) from e
    check_controlnet_fits(controlnet, unet, folder)
    param = next(unet.parameters())
    return _moved(controlnet, param.device, param.dtype).eval().requires_grad_(False)


def save_controlnet(controlnet: nn.Module, folder: str | Path, dtype: torch.dtype = torch.float16) -> None:
    """The ControlNet in diffusers' layout (safetensors, `dtype`), written beside `folder` and renamed into place, so
    an interrupted write leaves no folder that passes for a ControlNet."""
    moved = _moved(copy.deepcopy(controlnet), "cpu", dtype)
    replace_folder(Path(folder), lambda tmp: moved.save_pretrained(tmp, safe_serialization=True))


# ---------------------------------------------------------------------------------------------------------------
# A ControlNet stored as a delta against its UNet
# ---------------------------------------------------------------------------------------------------------------

DELTA_WEIGHTS = "controlnet_delta.safetensors"
DELTA_FORMAT = "limner-controlnet-delta/1"
_UP, _DOWN = ".delta_up", ".delta_down"  # a copied matrix's change, up @ down, reshaped to the tensor


def _own_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's own tensors by their plain names, whatever LoRA adapters peft has wrapped around its layers (a
    LoRA concept installed: `to_k.base_layer.weight` is `to_k.weight`, the lora_ tensors are not the UNet's)."""
    state = {}
    for name, tensor in unet.state_dict().items():
        if ".lora_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    return state


def unet_fingerprint(unet: nn.Module, names: list[str]) -> str:
    """A hash of the UNet tensors `names` (names, shapes and values rounded to bfloat16): what a delta was taken
    against. Rounded, so the same UNet loaded in fp32, fp16 or bf16, on any device, reads the same; any other UNet
    (another base, a fine-tune) moves far more than bfloat16's rounding."""
    import hashlib

    state = _own_state(unet)
    digest = hashlib.sha256()
    for name in sorted(names):
        tensor = state[name].detach().to("cpu", torch.bfloat16).contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def _truncation(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """The rank that keeps `energy` of the squared singular values `s` (at least 1), or `rank`, whichever is lower
    when both are given."""
    chosen = len(s)
    if energy is not None:
        kept = torch.cumsum(s.double() ** 2, 0) / max(float((s.double() ** 2).sum()), 1e-30)
        chosen = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype)).item()) + 1
    if rank is not None:
        chosen = min(chosen, rank)
    return max(1, min(chosen, len(s)))


def controlnet_delta(
    controlnet: nn.Module,
    unet: nn.Module,
    rank: int | None = None,
    energy: float | None = None,
    dtype: torch.dtype = torch.float16,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the ControlNet as a delta against the UNet it was copied from. Each tensor of 2 or more
    dimensions with the UNet's name and shape is stored as a factor pair of its change (truncated SVD: `rank`, or
    the rank keeping `energy` of the change's squared norm; neither: full rank), when the pair is smaller than the
    tensor; the rest in full. The square roots of the singular values go to both factors, so neither leaves fp16's
    range."""
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    mine = {k: v.detach().float().cpu() for k, v in controlnet.state_dict().items()}
    theirs = _own_state(unet)
    tensors, against, ranks = {}, [], []
    for name, weight in mine.items():
        base = theirs.get(name)
        if base is None or tuple(base.shape) != tuple(weight.shape) or weight.ndim < 2:
            tensors[name] = weight.to(dtype).contiguous()
            continue
        base = base.detach().float().cpu()
        change = (weight - base).reshape(weight.shape[0], -1)
        u, s, vh = torch.linalg.svd(change, full_matrices=False)
        r = _truncation(s, rank, energy)
        if r * sum(change.shape) >= change.numel():  # the pair would be no smaller
            tensors[name] = weight.to(dtype).contiguous()
            continue
        root = s[:r].sqrt()
        tensors[name + _UP] = (u[:, :r] * root).to(dtype).contiguous()
        tensors[name + _DOWN] = (root[:, None] * vh[:r]).to(dtype).contiguous()
        against.append(name)
        ranks.append(r)
    metadata = {
        "format": DELTA_FORMAT,
        "unet_fingerprint": unet_fingerprint(unet, against),
        "rank": "" if rank is None else str(rank),
        "energy": "" if energy is None else str(energy),
        "ranks": f"{min(ranks, default=0)}-{max(ranks, default=0)}, mean {sum(ranks) / max(len(ranks), 1):.1f}",
    }
    return tensors, metadata


def save_controlnet_delta(
    controlnet: nn.Module,
    unet: nn.Module,
    folder: str | Path,
    rank: int | None = None,
    energy: float | None = None,
) -> dict[str, str]:
    """The ControlNet as a delta against `unet` (`controlnet_delta`, fp16): config.json and
    controlnet_delta.safetensors written beside `folder` and renamed into place. Returns the file's metadata."""
    from safetensors.torch import save_file

    tensors, metadata = controlnet_delta(getattr(controlnet, "module", controlnet), unet, rank, energy)

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        getattr(controlnet, "module", controlnet).save_config(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config.pop("_name_or_path", None)  # where it was read from: a local path, no part of the model
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / DELTA_WEIGHTS), metadata=metadata)

    replace_folder(Path(folder), write)
    return metadata


def is_controlnet_delta(folder: str | Path) -> bool:
    """Whether a ControlNet folder is stored as a delta against its UNet (and holds no full weights)."""
    folder = Path(folder)
    full = any((folder / f"diffusion_pytorch_model.{ext}").is_file() for ext in ("safetensors", "bin"))
    return (folder / DELTA_WEIGHTS).is_file() and not full


def materialise_controlnet(folder: str | Path, unet: UNet2DConditionModel) -> ControlNetModel:
    """The ControlNet a delta folder stores, built on `unet` (float32, on the CPU): its config, each copied matrix
    the UNet's plus the stored change. A LimnerError when the folder was taken against another UNet (the
    fingerprint of the UNet tensors it reads differs) or its file is not a complete delta."""
    from diffusers import ControlNetModel
    from safetensors import safe_open

    folder = Path(folder)
    path = folder / DELTA_WEIGHTS
    config = dict(ControlNetModel.load_config(folder))
    check_controlnet_fits(config, unet, folder)
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise LimnerError(
            f"{path} could not be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from e
    if metadata.get("format") != DELTA_FORMAT:
        raise LimnerError(f"{path} is not a ControlNet delta limner wrote (format {metadata.get('format')!r})")
    against = sorted(k[: -len(_UP)] for k in stored if k.endswith(_UP))
    theirs = _own_state(unet)
    missing = [k for k in against if k not in theirs]
    found = f"lacks {missing[0]}" if missing else unet_fingerprint(unet, against)
    if found != metadata.get("unet_fingerprint"):
        raise LimnerError(
            f"ControlNet {folder} is stored as a delta against another UNet (fingerprint "
            f"{metadata.get('unet_fingerprint')}, this base's {found}): use it with the base it was made from, or "
            "give a full ControlNet folder (diffusers' layout)"
        )
    with diffusers_quiet():
        controlnet = ControlNetModel.from_config(config)
    state = {}
    for name, current in controlnet.state_dict().items():
        if name in stored:
            state[name] = stored[name].float()
        elif name + _UP in stored and name + _DOWN in stored:
            change = stored[name + _UP].float() @ stored[name + _DOWN].float()
            state[name] = theirs[name].detach().float().cpu() + change.reshape(current.shape)
        else:
            raise LimnerError(f"{path} has no entry for {name}: the file is incomplete; write it again")
    extra = set(stored) - set(state) - {n + _UP for n in against} - {n + _DOWN for n in against}
    if extra:
        raise LimnerError(f"{path} holds {sorted(extra)[0]}, which {config.get('_class_name')} has not")
    controlnet.load_state_dict(state)
    return controlnet


# ---------------------------------------------------------------------------------------------------------------
# Installing into the UNet's calls
# ---------------------------------------------------------------------------------------------------------------

Context = Callable[[Any, dict], torch.Tensor]


def text_context(encoder_hidden_states: Any, added_cond_kwargs: dict) -> torch.Tensor:
    """The ControlNet reads what the UNet's cross-attention reads as text (ControlNet's own setting)."""
    if isinstance(encoder_hidden_states, tuple):  # (text, image tokens): limner's with_image_tokens
        return encoder_hidden_states[0]
    return encoder_hidden_states


def image_token_context(unet: UNet2DConditionModel, adapter: int = 0) -> Context:
    """The ControlNet reads one IP adapter's image tokens instead of the text (InstantID's IdentityNet): the
    UNet's image projection applied to the image embeddings it is given, [B, n_images * tokens, d].

    The rows are folded onto the batch as diffusers' IP attention folds them (`view(batch, -1, heads, dim)`):
    a pipeline handed `ip_adapter_image_embeds` for the whole batch repeats them once more per image, and each
    sample then reads its tokens repeated, which attention reads as the tokens once."""

    def context(encoder_hidden_states: Any, added_cond_kwargs: dict) -> torch.Tensor:
        batch = text_context(encoder_hidden_states, added_cond_kwargs).shape[0]
        if isinstance(encoder_hidden_states, tuple):
            tokens = encoder_hidden_states[1][adapter]
        else:
            embeds = (added_cond_kwargs or {}).get("image_embeds")
            if embeds is None or getattr(unet, "encoder_hid_proj", None) is None:
                raise LimnerError(
                    "the ControlNet reads image tokens, but the UNet was called without image embeddings"
                )
            tokens = unet.encoder_hid_proj(embeds)[adapter]
        return tokens.reshape(batch, -1, tokens.shape[-1])

    return context


@dataclass(eq=False)
class ControlSignal:
    """One ControlNet acting on the UNet's calls. `image`: the condition image as a tensor [N, 3, H, W] in [0, 1]
    (N 1, or one per sample of the batch), or a function (height, width) -> such a tensor that draws it at the
    size asked (sharper than resizing a drawing; it may raise a LimnerError). `scale`: diffusers'
    controlnet_conditioning_scale; 0 skips the ControlNet's pass altogether. `context`: what its cross-attention
    reads (text_context by default)."""

    controlnet: nn.Module
    image: torch.Tensor | Callable[[int, int], torch.Tensor]
    scale: float = 1.0
    context: Context = text_context
    name: str = ""  # who installed it (a method's name), to find it again among several
    _drawn: dict = field(default_factory=dict, repr=False)

    def condition(self, height: int, width: int, batch: int, like: torch.Tensor) -> torch.Tensor:
        if callable(self.image):
            if (height, width) not in self._drawn:
                self._drawn = {(height, width): self.image(height, width)}
            image = self._drawn[(height, width)]
        else:
            image = self.image
            if tuple(image.shape[-2:]) != (height, width):
                image = F.interpolate(image.float(), size=(height, width), mode="bilinear", align_corners=False)
        n = image.shape[0]
        if batch % n:
            raise ValueError(f"a ControlNet condition of {n} images does not divide a batch of {batch}")
        # the batch is [unconditional; conditional] under guidance, each the n images in order
        return image.repeat(batch // n, 1, 1, 1).to(like.device, like.dtype)

    def residuals(self, sample: torch.Tensor, timestep: Any, context: torch.Tensor, extra: dict):
        factor = downsampling(getattr(self.controlnet, "module", self.controlnet))  # unwrapped from DDP
        cond = self.condition(sample.shape[-2] * factor, sample.shape[-1] * factor, sample.shape[0], sample)
        param = next(self.controlnet.parameters())
        down, mid = self.controlnet(
            sample.to(param.dtype),
            timestep,
            encoder_hidden_states=context.to(param.dtype),
            controlnet_cond=cond.to(param.dtype),
            conditioning_scale=float(self.scale),
            return_dict=False,
            **extra,
        )
        return [d.to(sample.dtype) for d in down], mid.to(sample.dtype)


_POSITIONAL = ("sample", "timestep", "encoder_hidden_states")


def _control_hook(unet: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Runs every installed signal on this call's inputs and hands their summed residuals to the UNet."""
    signals = [s for s in getattr(unet, _SIGNALS, []) if s.scale]
    if not signals:
        return args, kwargs
    given = dict(zip(_POSITIONAL, args)) | {k: kwargs[k] for k in _POSITIONAL if k in kwargs}
    sample, timestep, hidden = given["sample"], given["timestep"], given.get("encoder_hidden_states")
    added = kwargs.get("added_cond_kwargs") or {}
    extra = {"timestep_cond": kwargs.get("timestep_cond")}
    without_images = {k: v for k, v in added.items() if k != "image_embeds"}  # a ControlNet has no image projection
    if without_images:
        extra["added_cond_kwargs"] = without_images
    down = kwargs.get("down_block_additional_residuals")
    mid = kwargs.get("mid_block_additional_residual")
    for signal in signals:
        d, m = signal.residuals(sample, timestep, signal.context(hidden, added), extra)
        down = d if down is None else [a + b for a, b in zip(down, d)]
        mid = m if mid is None else mid + m
    return args, kwargs | {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def install_controlnet(unet: UNet2DConditionModel, signal: ControlSignal) -> Callable[[], None]:
    """Adds the signal's residuals to every call of `unet` from now on; returns the function that takes it out
    again (the last one out removes the hook)."""
    signals = getattr(unet, _SIGNALS, None)
    if signals is None:
        signals = []
        setattr(unet, _SIGNALS, signals)
        setattr(unet, _HOOK, unet.register_forward_pre_hook(_control_hook, with_kwargs=True))
    signals.append(signal)

    def remove() -> None:
        current = getattr(unet, _SIGNALS, [])
        if signal in current:
            current.remove(signal)
        if not current and hasattr(unet, _HOOK):
            getattr(unet, _HOOK).remove()
            delattr(unet, _HOOK)
            delattr(unet, _SIGNALS)

    return remove


def installed_signals(unet: UNet2DConditionModel) -> list[ControlSignal]:
    """The ControlSignals acting on `unet`'s calls now."""
    return list(getattr(unet, _SIGNALS, []))


__all__ = [
    "DELTA_WEIGHTS",
    "KPS_COLOURS",
    "KPS_LIMBS",
    "OPENPOSE_POINTS",
    "ControlSignal",
    "check_controlnet_fits",
    "condition_side",
    "condition_tensor",
    "controlnet_delta",
    "controlnet_from_unet",
    "downsampling",
    "draw_kps",
    "draw_pose",
    "image_token_context",
    "install_controlnet",
    "installed_signals",
    "is_controlnet_delta",
    "kps_style",
    "load_controlnet",
    "materialise_controlnet",
    "pose_style",
    "save_controlnet",
    "save_controlnet_delta",
    "text_context",
    "unet_fingerprint",
]
