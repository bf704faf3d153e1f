"""StoryMaker (Zhou et al., 2024): consistent characters, face, hair and clothes, for up to two people in one picture.

Each character is read from one picture of it: the face analyser's largest face gives the identity embedding and
the aligned face crop, and the character is cut out with its mask on white. The identity embedding becomes 4
tokens refined over the face crop's CLIP tokens; the cut-out's CLIP tokens become 16 through a Resampler; a
positional embedding marks the character's place (first, second) and a learned background embedding (20 tokens)
precedes all characters (limner.methods.storymaker.projection). The tokens enter every cross-attention through the
decoupled image attention (IP-Adapter's, limner.adapters.ip_attention), and a LoRA on the UNet's attention adapts
it; trained with the denoising loss weighted onto the characters and the cross-attention map loss that ties each
character's tokens to its own region (limner.methods.storymaker.training).

    pretrain   `limner pretrain --method storymaker --data world`: the identity stream's characters in a second
               view with the same clothes, and scenes of two (limner.methods.storymaker.data)
    encode     each character's picture -> identity embedding, face crop tokens, body tokens (seconds); a concept
               holds one character or several in order
    generate   `limner generate "a man and a woman in the park" --method storymaker --image a.png --image b.png`:
               the characters' tokens [background; first; second] at image scale 0.8 and LoRA scale 0.8 (the
               official pipeline's defaults); at most 2 characters in one picture

Files: an adapter folder holds `storymaker.safetensors` in the official key layout (`image_proj.*`,
`ip_adapter.{i}.to_k_ip.weight`, `ip_adapter.{i}.to_q_lora.down.weight`, ...; limner.methods.storymaker.weights)
and `adapter.json`; the official `mask.bin` is read with allow_pickle. A concept folder holds
`characters.safetensors` (per character: id_embeds, face_tokens, body_tokens), the pictures the encoders read, and
`limner.json`; with a pose, `pose.png` (the skeleton picture) and the pose ControlNet by path and fingerprint.

Pose decoupling: `--set pose_controlnet=DIR|world` pretrains beside a frozen OpenPose ControlNet fed each target's
skeleton; at generation `--pose-image SKELETON.png` draws the characters where the skeleton stands, through that
ControlNet (the world's, `limner world pose`, on the world base), and without one the pose is the prompt's.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from limner.concepts import read_manifest
from limner.errors import LimnerError
from limner.io import copy_folder, disk_guard, pickle_opt_in, written_atomically
from limner.methods.adapter import (
    ADAPTER_MANIFEST,
    CURVE_POINTS,
    AdapterMethod,
    encoded_concept_manifest,
    encoded_with,
    read_adapter_manifest,
    read_reference_files,
    started_from,
    thin_curve,
    write_adapter_manifest,
    write_concept_manifest,
    write_references,
)
from limner.methods.base import Capabilities, Installation
from limner.methods.registry import register
from limner.methods.settings import setting, with_settings
from limner.methods.storymaker.projection import MAX_CHARACTERS, ProjectionShape, StoryMakerProjection
from limner.methods.storymaker.weights import WEIGHTS, read_weights
from limner.subject import Subject

if TYPE_CHECKING:
    from limner.models.loading import Base

CHARACTERS = "characters.safetensors"
POSE_PICTURE = "pose.png"
IMAGE_ENCODER = "image_encoder"
MAX_PER_PICTURE = 2  # the official pipeline draws one or two characters


@dataclass
class StoryMakerSettings:
    scale: float = setting(0.8, "image scale of the characters' tokens (official default 0.8; 0 switches them off)")
    lora_scale: float = setting(0.8, "scale of the adapter's UNet LoRA at generation (official default 0.8)")
    faces: str | None = setting(None, "an insightface model folder for real photos (--faces); None: the world's")
    image_encoder: str | None = setting(
        None, "a CLIPVisionModelWithProjection folder; default: the adapter's image_encoder/, else the base's"
    )
    allow_pickle: bool = setting(
        False, "read the official pickled mask.bin (torch.load with weights_only=True); only files you trust"
    )
    lora_rank: int = setting(8, "pretrain: rank of the UNet attention LoRA (official 128 on SDXL's 2048 width)")
    face_depth: int = setting(1, "pretrain: blocks of the face perceiver (official 4; 1 keeps the world's under 7 MB)")
    resampler_dim: int = setting(128, "pretrain: the body Resampler's width (official 1280), a multiple of 64")
    mask_loss_weight: float = setting(5.0, "pretrain: extra weight of the denoising error on the characters (5)")
    attention_loss_weight: float = setting(0.1, "pretrain: weight of the cross-attention map loss (official 0.1)")
    drop_text: float = setting(0.2, "pretrain: share of samples with an empty caption (official 0.2)")
    drop_image: float = setting(0.05, "pretrain: share of samples with the characters dropped (official 0.05)")
    drop_both: float = setting(0.05, "pretrain: share of samples with both dropped (official 0.05)")
    drop_face: float = setting(0.1, "pretrain: share of characters whose face tokens are zeroed (official 0.1)")
    drop_body: float = setting(0.1, "pretrain: share of characters whose body tokens are zeroed (official 0.1)")
    two_share: float = setting(0.25, "pretrain: share of batches showing two characters side by side")
    pose_controlnet: str | None = setting(
        None,
        "an OpenPose ControlNet folder (diffusers layout; 'world': the world's, limner world pose): pretraining "
        "trains beside it on each target's skeleton (the paper's pose decoupling), generation draws with it where a "
        "pose_image is given (default there: the world's on the world base)",
    )
    pose_image: str | None = setting(
        None, "an OpenPose skeleton picture (--pose-image) setting where the characters stand; None: no pose"
    )
    controlnet_scale: float = setting(
        1.0, "the pose ControlNet's scale with a pose_image (controlnet_conditioning_scale; diffusers' default 1.0)"
    )
    init: str | None = setting(
        None,
        "pretrain: start from this adapter's weights (a folder limner pretrained, or the official mask.bin with "
        "allow_pickle) rather than fresh ones, as diffusers' --pretrained_ip_adapter_path; a resumed run continues "
        "from its checkpoint",
    )

    def __post_init__(self) -> None:
        for name in ("scale", "lora_scale", "mask_loss_weight", "attention_loss_weight", "controlnet_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise LimnerError(f"{name} must be a number, 0 or more, got {value!r}")
        for name in ("drop_text", "drop_image", "drop_both", "drop_face", "drop_body", "two_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise LimnerError(f"{name} {getattr(self, name)} must be between 0 and 1")
        if self.drop_text + self.drop_image + self.drop_both > 1:
            raise LimnerError("drop_text + drop_image + drop_both must be at most 1")
        if isinstance(self.lora_rank, bool) or int(self.lora_rank) < 1:
            raise LimnerError(f"lora_rank must be at least 1, got {self.lora_rank}")
        if int(self.face_depth) < 1:
            raise LimnerError(f"face_depth must be at least 1, got {self.face_depth}")
        if self.resampler_dim < 64 or self.resampler_dim % 64:
            raise LimnerError(f"resampler_dim {self.resampler_dim} must be a positive multiple of 64")


def pretrain_defaults():
    """Batch 8, AdamW 1e-4 (the official learning rate), weight decay 0.01."""
    from limner.training import TrainConfig

    return TrainConfig(max_steps=1000, batch_size=8, learning_rate=1e-4, weight_decay=0.01, checkpoint_every=250)


def _note(text: str) -> None:
    """A note for the user on stderr (limner's own; --quiet hides progress bars, not notes)."""
    sys.stderr.write(f"storymaker: {text}\n")


class _Tokens(nn.Module):
    """The UNet's encoder_hid_proj while concepts are installed: the characters' tokens are computed once per
    generation (condition), so the UNet passes them through as they are."""

    def forward(self, image_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(image_embeds)


def _encoder(base: Base, adapter: Path | None, given: str | None):
    from limner.methods.ip_adapter import ImageEncoder, find_image_encoder

    folder = adapter if adapter is not None and Path(adapter).is_dir() else None
    return ImageEncoder(find_image_encoder(base, folder, given), base.device)


def _projection(weights: dict, unet: nn.Module, where: Path) -> StoryMakerProjection:
    """The adapter's projection, its shape read from the weights (checked against the UNet)."""
    from limner.methods.storymaker.projection import load_official_state

    projection = StoryMakerProjection(projection_shape(weights, unet, where))
    load_official_state(projection, weights["image_proj"], str(where))
    return projection.eval()


def pose_controlnet_folder(base: Base, given: str | None, what: str) -> Path | None:
    """The pose ControlNet's folder: `given` ('world': the world's, which only fits the world base), or None."""
    if given is None:
        return None
    if given != "world":
        folder = Path(given).expanduser()
        if not folder.is_dir():
            raise LimnerError(f"{what}: {given} is no folder; give an OpenPose ControlNet in diffusers' layout")
        return folder
    from limner.world.pose import WORLD_POSE

    if not base.is_world:
        raise LimnerError(
            f"{what}: the world's pose ControlNet draws on the world base only; for {base.path} give an OpenPose "
            "ControlNet made for it (a diffusers folder, e.g. lllyasviel's control_v11p_sd15_openpose for SD 1.5) "
            "with --set pose_controlnet=DIR (limner train --method storymaker ... --set pose_image=SKELETON.png)"
        )
    if not WORLD_POSE.is_dir():
        raise LimnerError(f"the world's pose ControlNet is missing ({WORLD_POSE}); make it with `limner world pose`")
    return WORLD_POSE


def read_pose_picture(path: str | Path) -> np.ndarray:
    """An OpenPose skeleton picture as uint8 RGB; a missing one, or one with nothing drawn on it, is an error
    naming it."""
    if not Path(path).is_file():
        raise LimnerError(f"pose image {path} does not exist; give an OpenPose skeleton picture")
    picture = read_reference_files([path])[0]
    if int(picture.max()) < 32:
        raise LimnerError(
            f"pose image {path} is black: give an OpenPose skeleton picture (the coloured limbs on black that an "
            "OpenPose ControlNet reads)"
        )
    return picture


def install_pose(base: Base, concept: Path, manifest: dict, name: str) -> Any:
    """The concept's pose ControlNet, reading its skeleton picture (cover-fitted to the size drawn) and the text;
    returns the function that takes it out."""
    from PIL import Image, ImageOps

    from limner.adapters.controlnet import ControlSignal, condition_tensor, install_controlnet, load_controlnet
    from limner.io import child
    from limner.models.loading import fingerprint

    pose, unet = manifest["pose"], base.pipe.unet
    folder = pose_controlnet_folder(base, pose["controlnet"], f"the pose ControlNet of concept {concept}")
    if fingerprint(folder) != pose["controlnet_fingerprint"]:
        raise LimnerError(
            f"the pose ControlNet {folder} changed since concept {concept} was encoded with it; "
            "encode the concept again"
        )
    path = child(child(concept, "references", "a folder"), POSE_PICTURE, "a pose picture")  # never the manifest's
    if not path.is_file():
        raise LimnerError(f"concept {concept} lost its pose picture ({path}); encode the concept again")
    with Image.open(path) as im:
        picture = im.convert("RGB")

    def drawn(height: int, width: int) -> torch.Tensor:
        return condition_tensor(np.asarray(ImageOps.fit(picture, (width, height), Image.Resampling.BILINEAR)))

    scale = float(manifest.get("config", {}).get("controlnet_scale", 1.0))
    return install_controlnet(unet, ControlSignal(load_controlnet(folder, unet), drawn, scale, name=name))


def projection_shape(weights: dict, unet: nn.Module, where: Path) -> ProjectionShape:
    """The projection's shape, read from an adapter's weights and checked against the UNet."""
    proj = weights["image_proj"]
    cross = int(proj["bg_embed"].shape[-1])
    if cross != int(unet.config.cross_attention_dim):
        raise LimnerError(
            f"StoryMaker adapter {where} has tokens of width {cross}, this base's cross-attention is "
            f"{unet.config.cross_attention_dim} wide: it was made for another base"
        )
    return ProjectionShape(
        id_dim=int(proj["proj.0.weight"].shape[1]),
        clip_dim=int(proj["perceiver_resampler.proj_in.weight"].shape[1]),
        cross_dim=cross,
        face_depth=len({k.split(".")[2] for k in proj if k.startswith("perceiver_resampler.layers.")}),
        resampler_dim=int(proj["resample.proj_in.weight"].shape[0]),
    )


@register
class StoryMaker(AdapterMethod):
    """Characters' faces and bodies as image tokens, each bound to its own region (Zhou et al., 2024)."""

    name = "storymaker"
    official_adapter = "the official mask.bin (an SDXL base, --allow-pickle)"
    family = "identity"
    capabilities = Capabilities(needs_adapter=True, needs_faces=True)
    config_cls = StoryMakerSettings
    call_settings = ("scale", "lora_scale", "controlnet_scale")

    def __init__(self) -> None:
        self._installed: dict | None = None

    # ---- pretraining -------------------------------------------------------------------------------------------

    def pretrain(self, base: Base, data: Any, out: Path, **settings: Any) -> Path:
        """Pretrains on the world's characters (data "world", or a stream of StorySample); writes the adapter."""
        from limner.adapters import ip_state_dict
        from limner.adapters.controlnet import condition_side, load_controlnet
        from limner.encoders.faces import face_analysis
        from limner.methods.storymaker.projection import official_state
        from limner.methods.storymaker.training import Pretraining, StoryBatches
        from limner.training import is_main_process, split_train_settings, train

        out = Path(out)
        train_cfg = settings.pop("train", None) or pretrain_defaults()
        train_cfg, rest = split_train_settings(train_cfg, settings)
        cfg = with_settings(StoryMakerSettings(), rest, self.name)
        stream = self._open_data(data, base, cfg, train_cfg)
        analyser = face_analysis(cfg.faces)
        encoder = _encoder(base, None, cfg.image_encoder)
        shape = ProjectionShape(
            id_dim=int(analyser.embedding_dim),
            clip_dim=encoder.width("plus"),
            cross_dim=int(base.pipe.unet.config.cross_attention_dim),
            face_depth=int(cfg.face_depth),
            resampler_dim=int(cfg.resampler_dim),
        )
        start = self._starting_weights(base, cfg, shape)
        origin = started_from(cfg.init, out)
        pose_folder = pose_controlnet_folder(base, cfg.pose_controlnet, "pose_controlnet")
        pose_controlnet = None if pose_folder is None else load_controlnet(pose_folder, base.pipe.unet)
        task = Pretraining(base, encoder, shape, cfg, train_cfg, pose_controlnet=pose_controlnet)
        t0 = time.perf_counter()
        try:
            if start is not None:
                task.start_from(start, cfg.init)
            size = int(encoder.model.config.image_size)
            pose_side = None if pose_controlnet is None else condition_side(base, pose_controlnet)
            batches = StoryBatches(stream, base, analyser, size, train_cfg.batch_size, pose_side)
            log = train(task, batches, train_cfg, out, self.name, data=stream)
            ip = {f"ip_adapter.{k.removeprefix('ip_adapter.')}": v for k, v in ip_state_dict(base.pipe.unet).items()}
            lora = {f"ip_adapter.{k}": v for k, v in task.official_lora().items()}
            state = {f"image_proj.{k}": v for k, v in official_state(task.projection).items()} | ip | lora
        finally:
            task.close()
        if is_main_process():
            self._write_adapter(
                base, out, cfg, train_cfg, task, shape, state, encoder, analyser, stream, log, t0, pose_folder, origin
            )
            if batches.skipped:
                _note(f"{batches.skipped} samples skipped in pretraining: no face found in a reference")
        return out

    @staticmethod
    def _starting_weights(base: Base, cfg: StoryMakerSettings, shape: ProjectionShape) -> dict | None:
        """With `init`, the adapter's weights to start from, checked to be the shape these settings train."""
        if cfg.init is None:
            return None
        from limner.methods.storymaker.weights import lora_peft_state

        where = Path(cfg.init).expanduser()
        weights = read_weights(where, cfg.allow_pickle or pickle_opt_in())
        found = projection_shape(weights, base.pipe.unet, where)
        _, rank = lora_peft_state(base.pipe.unet, weights["ip_adapter"], where)
        if found != shape or rank != cfg.lora_rank:
            raise LimnerError(
                f"init={where}: its projection is {found} with LoRA rank {rank}, these settings train {shape} with "
                f"rank {cfg.lora_rank}; set face_depth, resampler_dim and lora_rank as it was pretrained (its "
                "adapter.json records them), and the face analyser and image encoder it read"
            )
        return weights

    @staticmethod
    def _open_data(data: Any, base: Base, cfg: StoryMakerSettings, train_cfg) -> Any:
        if not isinstance(data, (str, Path)):
            return data
        if str(data) != "world":
            raise LimnerError(
                f"--data {data}: StoryMaker pretrains on pictures of one or two people with each person's mask and "
                "another picture of the same person in the same clothes; limner draws them from the world (--data "
                "world). Real data in that form is not read yet"
            )
        from accelerate import PartialState

        from limner.methods.storymaker.data import StoryStream

        state = PartialState(cpu=torch.device(base.device).type == "cpu")
        return StoryStream(
            seed=train_cfg.seed,
            rank=state.process_index,
            world_size=state.num_processes,
            batch_size=train_cfg.batch_size,
            two_share=cfg.two_share,
        )

    def _write_adapter(
        self, base, out, cfg, train_cfg, task, shape, state, encoder, analyser, stream, log, t0, pose_folder, origin
    ):
        from limner.methods.ip_adapter import encoder_fingerprint
        from limner.methods.storymaker.weights import save_weights
        from limner.models.loading import fingerprint

        terms = task.terms[:: max(1, len(task.terms) // CURVE_POINTS)]
        own = encoder.folder.resolve() == (Path(base.path) / IMAGE_ENCODER).resolve()
        describe = getattr(stream, "describe", None)
        with disk_guard(f"the adapter in {out}"):
            if not own and not (out / IMAGE_ENCODER).exists():  # an encoder the base lacks travels with it
                copy_folder(encoder.folder, out / IMAGE_ENCODER)
            save_weights(state, out / WEIGHTS)
            write_adapter_manifest(
                out,
                self.name,
                base,
                image_encoder=str(encoder.folder) if own else IMAGE_ENCODER,
                image_encoder_fingerprint=encoder_fingerprint(encoder.folder),
                faces=analyser.name,
                face_embedding_dim=shape.id_dim,
                projection=asdict(shape),
                lora={"rank": cfg.lora_rank, "targets": "attn1, attn2: to_q, to_k, to_v, to_out"},
                attention_loss_blocks=task.blocks,
                data=describe() if callable(describe) else type(stream).__name__,
                steps=log.steps,
                seconds=round(log.seconds, 2),
                wall_seconds=round(time.perf_counter() - t0, 2),
                curve=thin_curve(log.curve),
                loss_terms=[{k: (round(v, 5) if isinstance(v, float) else v) for k, v in t.items()} for t in terms],
                settings=asdict(cfg),
                train=asdict(train_cfg),
                num_processes=log.num_processes,
                started_from=origin,
                pose_controlnet=None  # as given ("world": the shipped one), and by fingerprint
                if pose_folder is None
                else {"path": cfg.pose_controlnet, "fingerprint": fingerprint(pose_folder)},
            )

    # ---- adapters ----------------------------------------------------------------------------------------------

    def check_official_adapter(self, path: Path) -> None:
        from limner.methods.storymaker.weights import weights_path

        weights_path(path)

    # ---- encoding ----------------------------------------------------------------------------------------------

    def personalize(self, base: Base, subject: Any, out: Path, *, score: Any = None, **overrides: Any) -> Path:
        """One concept for one character, or for two in order (the first takes the left of the prompt's story)."""
        adapter = overrides.pop("adapter", None)
        with_settings(StoryMakerSettings(), overrides, self.name)  # settings fail before any work
        return self.encode(base, self.adapter_for(base, adapter), subject, Path(out), **overrides)

    def concept_from_files(
        self,
        base: Base,
        paths: list[str | Path],
        out: Path,
        *,
        class_noun: str,
        adapter: str | Path | None = None,
        name: str | None = None,
        **settings: Any,
    ) -> Path:
        """`limner generate --image a.png [--image b.png]`: each file one character, in order."""
        if len(paths) > MAX_PER_PICTURE:
            raise LimnerError(
                f"storymaker draws at most {MAX_PER_PICTURE} characters in one picture; {len(paths)} --image files "
                f"were given ({', '.join(map(str, paths))}): give one picture per character, two at most"
            )
        images = read_reference_files(paths)
        subjects = [
            Subject(name or Path(p).stem, class_noun, [im], meta={"file": str(p)}) for p, im in zip(paths, images)
        ]
        with_settings(StoryMakerSettings(), settings, self.name)
        return self.encode(base, self.adapter_for(base, adapter), subjects, Path(out), given_as="files", **settings)

    def encode(
        self,
        base: Base,
        adapter: Path,
        subject: Subject | list[Subject],
        out: Path,
        given_as: str = "subjects",
        **settings: Any,
    ) -> Path:
        """Each character's first picture: its face found (the largest), identity embedding, face crop tokens and
        cut-out tokens, stored in order in one concept."""
        from limner.encoders.faces import face_analysis
        from limner.methods.ip_adapter import encoder_fingerprint
        from limner.methods.storymaker.characters import character_pictures, squeezed

        t0 = time.perf_counter()
        cfg = with_settings(StoryMakerSettings(), settings, self.name)
        subjects = list(subject) if isinstance(subject, (list, tuple)) else [subject]
        if not subjects:
            raise LimnerError("storymaker: no character to encode")
        if len(subjects) > MAX_PER_PICTURE:
            raise LimnerError(
                f"storymaker draws at most {MAX_PER_PICTURE} characters in one picture, got {len(subjects)}"
            )
        for s in subjects:
            if not s.images:
                raise LimnerError(
                    f"subject {s.name}: no reference picture; StoryMaker reads one picture per character"
                )
        adapter, out = Path(adapter), Path(out)
        where = [s.meta.get("file") or f"subject {s.name}, reference 0" for s in subjects]
        # a user's own mask is read for a real photo (an insightface pack segments nothing); the world analyser's
        # mask always comes first, so the world's ground truth is never read
        masks = [s.masks[0] if s.masks else None for s in subjects]
        analyser = face_analysis(cfg.faces)
        chars = character_pictures([s.images[0] for s in subjects], analyser, where, masks)
        for c in chars:
            if c.note:
                _note(c.note)
        weights = read_weights(adapter, cfg.allow_pickle)
        manifest = read_adapter_manifest(adapter) if (adapter / ADAPTER_MANIFEST).is_file() else {}
        id_dim = int(weights["image_proj"]["proj.0.weight"].shape[1])
        if int(chars[0].id_embed.shape[0]) != id_dim:
            raise LimnerError(
                f"StoryMaker adapter {adapter} reads {id_dim}-d face embeddings, the face analyser ({analyser.name}) "
                f"gives {chars[0].id_embed.shape[0]}-d ones: use the face analyser it was pretrained with (--faces)"
            )
        encoder = _encoder(base, adapter, cfg.image_encoder)
        wanted, found = manifest.get("image_encoder_fingerprint"), encoder_fingerprint(encoder.folder)
        if wanted and wanted != found:
            raise LimnerError(
                f"adapter {adapter} was pretrained with image encoder {wanted}, but {encoder.folder} is {found}; give "
                "the one it was trained with (--set image_encoder=DIR)"
            )
        size = int(encoder.model.config.image_size)
        face_pixels = encoder.pixels(squeezed([c.face_crop for c in chars], size))
        body_pixels = encoder.pixels(squeezed([c.cutout for c in chars], size))
        tensors = {
            "id_embeds": torch.from_numpy(np.stack([c.id_embed for c in chars])).float(),
            "face_tokens": encoder.features(face_pixels, "plus").float(),
            "body_tokens": encoder.features(body_pixels, "plus").float(),
            # the unconditional input as pretraining drops an image: zero pixels through the encoder, zero identity
            "negative_tokens": encoder.unconditional(body_pixels[:1], "plus").float(),
        }
        pose = None
        if cfg.pose_image is not None:
            picture = read_pose_picture(cfg.pose_image)
            given = cfg.pose_controlnet or (manifest.get("pose_controlnet") or {}).get("path") or "world"
            folder = pose_controlnet_folder(base, given, "the pose ControlNet for pose_image (--pose-image)")
            pose = {"picture": picture, "source": str(cfg.pose_image), "given": given, "controlnet": folder}
        return self._write_concept(base, adapter, subjects, chars, tensors, cfg, out, t0, given_as, pose)

    def _write_concept(self, base, adapter, subjects, chars, tensors, cfg, out, t0, given_as, pose) -> Path:
        from safetensors.torch import save_file

        from limner.models.loading import fingerprint

        out.mkdir(parents=True, exist_ok=True)
        with disk_guard(f"the concept in {out}"):
            pictures = {f"{k:02d}-character": c.cutout for k, c in enumerate(chars)}
            pictures |= {POSE_PICTURE.removesuffix(".png"): pose["picture"]} if pose else {}
            write_references(out, pictures | {f"{k:02d}-face": c.face_crop for k, c in enumerate(chars)})
            with written_atomically(out / CHARACTERS) as tmp:
                save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(tmp))
            nouns = [s.class_noun for s in subjects]
            manifest = encoded_concept_manifest(
                self.name,
                base,
                adapter,
                subjects[0],
                cfg,
                t0,
                subject=subjects[0].name if len(subjects) == 1 else [s.name for s in subjects],
                class_nouns=nouns,
                num_characters=len(subjects),
                num_references=[1] * len(subjects),  # each character's first picture, as the official pipeline
                given_as=given_as,
                notes=[c.note for c in chars if c.note],
                masks_from=[c.mask_from for c in chars],
                example_prompt=" and ".join(f"a {n}" for n in nouns) + " on the grass",
                pose=None
                if pose is None
                else {
                    "picture": f"references/{POSE_PICTURE}",
                    "source": pose["source"],
                    # as given ("world" resolves to this install's), so the concept moves with the package
                    "controlnet": pose["given"] if pose["given"] == "world" else str(pose["controlnet"].resolve()),
                    "controlnet_fingerprint": fingerprint(pose["controlnet"]),
                },
            )
            write_concept_manifest(out, manifest)
        return out

    # ---- generation --------------------------------------------------------------------------------------------

    def install(self, base: Base, concepts: list[Path], regions: list[str] | None = None) -> Installation:
        """The concepts' adapter (they must share one): its LoRA, image keys and values, and projection; at most
        two characters over all concepts, in the order given."""
        from limner.adapters import install_ip_attention, load_ip_state_dict, remove_ip_attention, set_ip_scale
        from limner.adapters.lora import activate_named_lora, remove_named_lora
        from limner.methods.storymaker.weights import LORA_NAME, ip_entries, load_lora

        if regions:
            raise LimnerError("storymaker places its characters from one prompt; draw without --regions")
        manifests = [read_manifest(c) for c in concepts]
        total = sum(int(m.get("num_characters", 1)) for m in manifests)
        if total > MAX_PER_PICTURE:
            raise LimnerError(
                f"storymaker draws at most {MAX_PER_PICTURE} characters in one picture; the concepts given hold "
                f"{total} ({', '.join(map(str, concepts))}): give two characters at most"
            )
        adapters = {m["adapter"] for m in manifests}
        if len(adapters) > 1:
            raise LimnerError(
                f"storymaker concepts encoded with different adapters ({', '.join(sorted(adapters))}) cannot draw "
                "together; encode them with one adapter"
            )
        adapter = encoded_with(concepts[0], manifests[0])
        config = manifests[0].get("config", {})
        weights = read_weights(adapter, pickle_opt_in())
        unet = base.pipe.unet
        if getattr(unet, "encoder_hid_proj", None) is not None:
            raise LimnerError("this UNet already has an encoder_hid_proj (an IP-Adapter loaded); unload it first")
        projection = _projection(weights, unet, adapter)
        param = next(unet.parameters())
        installation = Installation()
        try:
            load_lora(unet, weights["ip_adapter"], adapter)
            installation.undo.append(lambda: remove_named_lora(unet, LORA_NAME))
            install_ip_attention(unet, num_tokens=(1 + MAX_CHARACTERS) * 20)
            installation.undo.append(lambda: remove_ip_attention(unet))
            load_ip_state_dict(unet, {"ip_adapter": ip_entries(weights["ip_adapter"])})
            saved = unet.config.encoder_hid_dim_type
            unet.encoder_hid_proj = _Tokens()
            unet.config.encoder_hid_dim_type = "ip_image_proj"

            def restore() -> None:
                unet.encoder_hid_proj = None
                unet.config.encoder_hid_dim_type = saved

            installation.undo.append(restore)
            set_ip_scale(unet, float(config.get("scale", 0.8)))
            activate_named_lora(unet, LORA_NAME, float(config.get("lora_scale", 0.8)))
            posed = [(Path(c), m) for c, m in zip(concepts, manifests) if m.get("pose")]
            if len(posed) > 1:  # two skeleton pictures would sum, each at full strength
                raise LimnerError(
                    f"storymaker draws one skeleton a picture; concepts {posed[0][0]} and {posed[1][0]} each hold "
                    "one: encode the characters together with one --pose-image"
                )
            for concept, manifest in posed:
                installation.undo.append(install_pose(base, concept, manifest, self.name))
        except BaseException:
            installation.uninstall()
            raise
        self._installed = {"projection": projection.to(param.device, torch.float32)}
        installation.undo.append(lambda: setattr(self, "_installed", None))
        return installation

    def set_call_settings(self, base: Base, concepts: list[Path], settings: dict[str, Any]) -> None:
        from limner.adapters import set_ip_scale
        from limner.adapters.lora import activate_named_lora
        from limner.methods.storymaker.weights import LORA_NAME

        super().set_call_settings(base, concepts, settings)
        checked = with_settings(StoryMakerSettings(), settings, self.name)
        if "scale" in settings:
            set_ip_scale(base.pipe.unet, float(checked.scale))
        if "lora_scale" in settings:
            activate_named_lora(base.pipe.unet, LORA_NAME, float(checked.lora_scale))
        if "controlnet_scale" in settings:
            from limner.adapters.controlnet import installed_signals

            mine = [s for s in installed_signals(base.pipe.unet) if s.name == self.name]
            if not mine:
                raise LimnerError(
                    "controlnet_scale (--controlnet-scale) scales storymaker's pose ControlNet, and no concept given "
                    "holds a pose: give --pose-image"
                )
            for signal in mine:
                signal.scale = float(checked.controlnet_scale)

    @torch.no_grad()
    def condition(self, base: Base, concepts: list[Path], prompt: str) -> dict[str, Any]:
        """`ip_adapter_image_embeds`: [negative; positive] image tokens [background; character 1; character 2].
        The negative reads a zero identity and the encoded zero picture for every character, as pretraining
        drops an image (the official pipeline feeds zero encoder states instead, which training never shows)."""
        from safetensors.torch import load_file

        if self._installed is None:
            raise LimnerError("storymaker concepts must be installed (limner.conditioning) before a prompt")
        projection = self._installed["projection"]
        device = projection.bg_embed.device
        parts = [load_file(str(Path(c) / CHARACTERS)) for c in concepts]
        ids, faces, bodies = (
            torch.cat([p[k] for p in parts]).to(device) for k in ("id_embeds", "face_tokens", "body_tokens")
        )
        positive = projection(ids, faces, bodies).flatten(0, 1)
        blank = torch.cat([p["negative_tokens"].expand(len(p["id_embeds"]), -1, -1) for p in parts]).to(device)
        negative = projection(torch.zeros_like(ids), blank, blank).flatten(0, 1)
        param = next(base.pipe.unet.parameters())
        return {"ip_adapter_image_embeds": [torch.stack([negative, positive]).to(param.device, param.dtype)]}

    def prompt(self, template: str, concept: Path) -> str:
        return template.format(read_manifest(concept)["class_noun"])


__all__ = ["CHARACTERS", "WEIGHTS", "StoryMaker", "StoryMakerSettings"]
