"""InstantID (Wang et al., 2024): zero-shot identity-preserving generation in seconds, from one face picture.

The paper's three parts:

    ID embedding   a face recogniser's identity embedding of the reference (insightface antelopev2 on photos,
                   the world's face analyser here: `--faces DIR` or limner.encoders.faces), not CLIP's: it
                   carries who the person is and little else
    Image Adapter  the embedding -> a Resampler -> 16 ID tokens, read by the decoupled image attention of every
                   attn2 (IP-Adapter's, limner.adapters.ip_attention), scaled by `scale` (ip_adapter_scale)
    IdentityNet    a ControlNet (limner.adapters.controlnet) whose condition image is the face's 5 keypoints drawn
                   on black, and whose cross-attention reads the ID tokens only (no text): it steers where the
                   face goes and ties the identity to it; scaled by `controlnet_scale`

Only the Image Adapter and the IdentityNet train (limner.methods.instantid.training); the UNet stays frozen.
Inference as the official pipeline: ip_adapter_scale 0.8, controlnet_conditioning_scale 0.8; the pose is the
reference's keypoints, or another picture's (`pose_image`, `limner generate --pose-image`); several references'
embeddings are averaged; the unconditional ID input is a zero embedding.

Files (limner.methods.instantid.weights): an adapter folder holds `ip-adapter.safetensors` (the official
ip-adapter.bin's entries, flat, fp16), `ControlNetModel/` (diffusers' layout, fp16; the shipped world adapter's
stored as a delta against the world UNet, materialised at load, written out in full by `export`) and
`adapter.json`; the official download (ip-adapter.bin, read with allow_pickle only, and ControlNetModel/) is read
as it is. A concept folder holds the face embeddings (`face_embeds.safetensors`, diffusers'
ip_adapter_image_embeds for the Resampler), the pose (keypoints in `limner.json`, drawn at the size of each
generation), the references, and the adapter by path and fingerprint.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from limner.adapters import set_ip_scale
from limner.adapters.controlnet import (
    ControlSignal,
    check_controlnet_fits,
    image_token_context,
    install_controlnet,
    installed_signals,
    load_controlnet,
    save_controlnet,
)
from limner.concepts import read_manifest
from limner.errors import LimnerError
from limner.io import disk_guard, pickle_opt_in, write_json_atomic, written_atomically
from limner.methods.adapter import (
    ADAPTER_MANIFEST,
    AdapterMethod,
    adapter_fingerprint,
    encoded_concept_manifest,
    encoded_with,
    made_by_limner,
    read_adapter_manifest,
    read_reference_files,
    thin_curve,
    write_adapter_manifest,
    write_concept_manifest,
    write_references,
)
from limner.methods.base import Capabilities, Installation
from limner.methods.instantid.pose import kps_drawer, pose_from, pose_of
from limner.methods.instantid.weights import CONTROLNET, WEIGHTS, adapter_files
from limner.methods.ip_adapter import (
    attach,
    check_fits,
    detach,
    load_projection,
    official_state,
    read_adapter_weights,
    save_adapter_weights,
)
from limner.methods.registry import register
from limner.methods.settings import setting, with_settings
from limner.subject import Subject
from limner.training import TrainConfig, is_main_process, split_train_settings, train

if TYPE_CHECKING:
    from limner.models.loading import Base

EMBEDS = "face_embeds.safetensors"
OFFICIAL_RESAMPLER_DIM = 1280  # the official Resampler's width (20 heads of 64)
WORLD_RESAMPLER_DIM = 128  # the world's: half its cross-attention width (2 heads), to keep the adapter small


@dataclass
class InstantIDSettings:
    scale: float = setting(
        0.8, "Image Adapter scale (ip_adapter_scale): how strongly the ID tokens steer, 0.8 as the official pipeline"
    )
    controlnet_scale: float = setting(
        0.8,
        "IdentityNet scale (controlnet_conditioning_scale), 0.8 as the official pipeline; 0 switches the IdentityNet "
        "off (the Image Adapter alone, no extra pass)",
    )
    pose_image: str | None = setting(
        None,
        "a picture whose face's keypoints set the pose (the largest face); None: the first reference's",
    )
    faces: str | None = setting(
        None, "an insightface model folder for real photos (--faces); None: the world's face analyser"
    )
    num_references: int | None = setting(None, "use only the subject's first N references (None: all, averaged)")
    resampler_dim: int | None = setting(
        None,
        f"pretrain: the Resampler's width (heads of 64); None: the official {OFFICIAL_RESAMPLER_DIM}, or "
        f"{WORLD_RESAMPLER_DIM} on the world base",
    )
    num_tokens: int = setting(16, "pretrain: ID tokens (the Resampler's queries), 16 as the paper")
    embedding_norm: float | None = setting(
        None,
        "pretrain: the norm the unit face embedding is given before the Resampler; None: sqrt(its width), about "
        "the norm of insightface's raw 512-d embedding (~22) that the official code feeds",
    )
    controlnet: str | None = setting(
        None, "the IdentityNet's folder (diffusers ControlNet layout); None: ControlNetModel/ beside the adapter"
    )
    allow_pickle: bool = setting(
        False, "read the official pickled ip-adapter.bin (torch.load with weights_only=True); only files you trust"
    )
    captions: str | None = setting(
        None,
        "pretrain on the world stream: class (class noun and context only, so the ID must carry the person) or "
        "full. None: class on the world stream, your data's own captions otherwise",
    )

    def __post_init__(self) -> None:
        for name in ("scale", "controlnet_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise LimnerError(f"{name} must be a number, 0 or more, got {value!r}")
            setattr(self, name, float(value))
        if self.num_references is not None and (isinstance(self.num_references, bool) or self.num_references < 1):
            raise LimnerError(f"num_references must be at least 1, got {self.num_references}")
        if self.resampler_dim is not None and (self.resampler_dim < 64 or self.resampler_dim % 64):
            raise LimnerError(f"resampler_dim {self.resampler_dim} must be a positive multiple of 64 (heads of 64)")
        if isinstance(self.num_tokens, bool) or self.num_tokens < 1:
            raise LimnerError(f"num_tokens must be at least 1, got {self.num_tokens}")
        if self.captions not in (None, "class", "full"):
            raise LimnerError(f"captions {self.captions!r} is unknown; choose class or full")


def pretrain_defaults() -> TrainConfig:
    """AdamW at 1e-4 (weight decay 0.01) as IP-Adapter's and InstantID's training scripts, batch 8."""
    return TrainConfig(max_steps=1000, batch_size=8, learning_rate=1e-4, weight_decay=0.01, checkpoint_every=250)


def embedding_norm(adapter_manifest: dict | None) -> float | None:
    """The norm of the face embedding the adapter's Resampler reads (see encoders.faces.identity_input). An adapter
    limner pretrained records the norm it gave the unit embeddings (one pretrained before the setting existed read
    unit vectors); an official download (no manifest) reads insightface's raw embedding, as the official code feeds
    it: None."""
    if adapter_manifest is None:
        return None
    return float(adapter_manifest.get("embedding_norm", 1.0))


@register
class InstantID(AdapterMethod):
    """ID embedding -> Resampler -> decoupled image attention, and the IdentityNet on the face's keypoints."""

    name = "instantid"
    family = "identity"
    capabilities = Capabilities(needs_adapter=True, needs_faces=True)
    config_cls = InstantIDSettings
    call_settings = ("scale", "controlnet_scale")

    def key_inputs(self, overrides: dict) -> dict:
        inputs = super().key_inputs(overrides)
        if overrides.get("controlnet"):  # an IdentityNet outside the adapter folder
            inputs["identitynet"] = adapter_fingerprint(Path(overrides["controlnet"]).expanduser())
        return inputs

    # ---- pretraining -------------------------------------------------------------------------------------------

    def pretrain(self, base: Base, data: Any, out: Path, **settings: Any) -> Path:
        """Pretrains the Image Adapter and the IdentityNet on `data` ("world": the identity stream, another view of
        the same character as the reference; a path: limner.data's sources; or a stream of samples); writes the
        adapter folder `out` in the official layout and returns it."""
        from limner.encoders.faces import face_analysis
        from limner.methods.instantid.training import IdentityPretraining, batches

        out = Path(out)
        train_cfg = settings.pop("train", None) or pretrain_defaults()
        train_cfg, rest = split_train_settings(train_cfg, settings)
        cfg = with_settings(InstantIDSettings(), rest, self.name)
        world = isinstance(data, str) and data == "world"
        cfg.captions = cfg.captions or ("class" if world else "full")
        dim = cfg.resampler_dim or (WORLD_RESAMPLER_DIM if base.is_world else OFFICIAL_RESAMPLER_DIM)
        faces = face_analysis(cfg.faces)
        stream = _open_data(data, base, cfg, train_cfg)
        norm = cfg.embedding_norm or math.sqrt(int(faces.embedding_dim))
        task = IdentityPretraining(base, int(faces.embedding_dim), train_cfg, dim=dim, num_tokens=cfg.num_tokens)
        t0 = time.perf_counter()
        try:
            data_position = stream if callable(getattr(stream, "state_dict", None)) else None
            style = (None, None)
            log = train(
                task,
                batches(stream, base, faces, train_cfg.batch_size, style, norm),
                train_cfg,
                out,
                self.name,
                data=data_position,
            )
            state = official_state(task.unet.encoder_hid_proj.image_projection_layers[0], task.unet)
        finally:
            task.close()
        if is_main_process():
            with disk_guard(f"the adapter in {out}"):
                save_adapter_weights(state, out / WEIGHTS)
                save_controlnet(task.controlnet, out / CONTROLNET)
                describe = getattr(stream, "describe", None)
                write_adapter_manifest(
                    out,
                    self.name,
                    base,
                    resampler_dim=dim,
                    num_tokens=cfg.num_tokens,
                    face_analysis=faces.name,
                    embedding_dim=int(faces.embedding_dim),
                    embedding_norm=round(norm, 6),
                    data=describe() if callable(describe) else type(stream).__name__,
                    skipped=getattr(stream, "skipped", None),
                    steps=log.steps,
                    seconds=round(log.seconds, 2),
                    wall_seconds=round(time.perf_counter() - t0, 2),
                    curve=thin_curve(log.curve),
                    settings=asdict(cfg),
                    train=asdict(train_cfg),
                    num_processes=log.num_processes,
                )
        return out

    # ---- the adapter -------------------------------------------------------------------------------------------

    def adapter_for(self, base: Base, adapter: str | Path | None) -> Path:
        """A limner adapter folder (checked as this method's and this base's), or the official download."""
        path = Path(adapter).expanduser() if adapter is not None else self.default_adapter(base)
        if path is None:
            shipped = "this install of limner has no world adapter yet" if base.is_world else "limner ships none"
            raise LimnerError(
                f"instantid needs a pretrained adapter for this base ({base.path}) and {shipped}: pretrain one with "
                "`limner pretrain --method instantid --data world --out DIR`, or take the official InstantID files "
                "(ip-adapter.bin and ControlNetModel/, for SDXL) and pass the folder with --adapter DIR (with "
                "--allow-pickle for the .bin)"
            )
        if made_by_limner(path):
            return super().adapter_for(base, path)
        adapter_files(path)  # the weight file and the IdentityNet folder are there
        return path

    def export(self, base: Base, adapter: str | Path | None, out: Path) -> Path:
        """The adapter in the official InstantID layout for other libraries (the community pipeline,
        `ControlNetModel.from_pretrained`): ip-adapter.safetensors and ControlNetModel/ with its full weights, an
        IdentityNet stored as a delta against the base's UNet (as the shipped world adapter) materialised on it;
        adapter.json kept, so limner reads the folder too."""
        import shutil

        from limner.adapters.controlnet import load_controlnet

        adapter, out = self.adapter_for(base, adapter), Path(out)
        weights_path, controlnet_path = adapter_files(adapter)
        out.mkdir(parents=True, exist_ok=True)
        with disk_guard(f"the InstantID export in {out}"):
            if weights_path.suffix == ".safetensors":
                shutil.copyfile(weights_path, out / WEIGHTS)
            else:  # the official pickled file, read under --allow-pickle, written as safetensors
                save_adapter_weights(_flat(read_adapter_weights(weights_path, pickle_opt_in())), out / WEIGHTS)
            save_controlnet(load_controlnet(controlnet_path, base.pipe.unet), out / CONTROLNET)
            if (adapter / ADAPTER_MANIFEST).is_file():
                manifest = read_adapter_manifest(adapter)
                # the IdentityNet is full again: its delta's record (with the full weights' sha256) becomes history
                if "identitynet_delta" in manifest:
                    manifest["identitynet_materialised_from"] = manifest.pop("identitynet_delta")
                write_json_atomic(out / ADAPTER_MANIFEST, manifest)
        return out

    def personalize(self, base: Base, subject: Any, out: Path, *, score: Any = None, **overrides: Any) -> Path:
        with_settings(InstantIDSettings(), {k: v for k, v in overrides.items() if k != "adapter"}, self.name)
        return super().personalize(base, subject, out, score=score, **overrides)  # settings fail before any work

    # ---- encoding ----------------------------------------------------------------------------------------------

    def encode(self, base: Base, adapter: Path, subject: Subject, out: Path, **settings: Any) -> Path:
        """Each reference's face found and embedded (several averaged), the pose taken from the first reference or
        `pose_image`, written into a concept folder: seconds, no training."""
        from diffusers import ControlNetModel

        from limner.encoders.faces import face_analysis, identity_input, reference_face

        t0 = time.perf_counter()
        cfg = with_settings(InstantIDSettings(), settings, self.name)
        adapter, out = Path(adapter), Path(out)
        images = subject.images[: cfg.num_references]
        if not images:
            raise LimnerError(f"subject {subject.name}: no reference picture; InstantID encodes at least one face")
        weights_path, controlnet_path = adapter_files(adapter, cfg.controlnet)
        faces = face_analysis(cfg.faces)
        weights = read_adapter_weights(weights_path, cfg.allow_pickle)
        if "latents" not in weights["image_proj"]:
            raise LimnerError(f"{weights_path} is not an InstantID adapter: its image_proj is not a Resampler")
        check_fits(base.pipe.unet, weights, weights_path, int(faces.embedding_dim))
        load_projection(weights, weights_path)  # every image_proj key is one diffusers reads
        check_controlnet_fits(dict(ControlNetModel.load_config(controlnet_path)), base.pipe.unet, controlnet_path)
        folder = f" (folder {subject.meta['path']}, pictures in name order)" if subject.meta.get("path") else ""
        sources = subject.meta.get("files") or [
            f"reference {i + 1} of subject {subject.name}{folder}" for i in range(len(images))
        ]
        found, notes = [], []
        for picture, where in zip(images, sources):
            face, note = reference_face(faces.analyse([np.asarray(picture)])[0], str(where))
            if note:
                notes.append(note)
                warnings.warn(note, stacklevel=2)
            found.append(face)
        manifest = read_adapter_manifest(adapter) if made_by_limner(adapter) else None
        norm = embedding_norm(manifest)
        embedding = torch.stack([identity_input(f, norm) for f in found]).mean(0)  # several references averaged
        if cfg.pose_image is not None:
            pose_picture = read_reference_files([cfg.pose_image])[0]
            pose = pose_from(pose_picture, faces, f"pose image {cfg.pose_image}")
        else:
            h, w = np.asarray(images[0]).shape[:2]
            pose = pose_of(found[0].keypoints, w, h, str(sources[0]))
        return self._write_concept(
            base, adapter, controlnet_path, subject, out, cfg, images, embedding, pose, notes, t0
        )

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
        """`limner generate --method instantid --image ref.png [--pose-image pose.png]`: errors name the files."""
        default_name = Path(paths[0]).stem if paths else "subject"
        images = read_reference_files(paths)
        subject = Subject(
            name or default_name, class_noun, images, meta={"files": [f"reference image {p}" for p in paths]}
        )
        return self.personalize(base, subject, Path(out), adapter=adapter, **settings)

    def _write_concept(self, base, adapter, controlnet, subject, out, cfg, images, embedding, pose, notes, t0) -> Path:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        with disk_guard(f"the concept in {out}"):
            write_references(out, [np.asarray(im) for im in images])
            positive = embedding.reshape(1, 1, -1).cpu().contiguous()  # one image, one token: [n_images, 1, d]
            embeds = {"image_embeds": positive, "negative_image_embeds": torch.zeros_like(positive)}
            with written_atomically(out / EMBEDS) as tmp:
                save_file(embeds, str(tmp))
            manifest = encoded_concept_manifest(
                self.name,
                base,
                adapter,
                subject,
                cfg,
                t0,
                num_references=len(images),
                pose=pose,
                notes=notes,
                example_prompt=f"a portrait of a {subject.class_noun} on the beach",
                # the IdentityNet may sit outside the adapter (--set controlnet=DIR, or ControlNetModel/ beside an
                # official file), where the adapter's fingerprint does not see it
                identitynet_fingerprint=adapter_fingerprint(controlnet),
            )
            write_concept_manifest(out, manifest)
        return out

    # ---- generation --------------------------------------------------------------------------------------------

    def install(self, base: Base, concepts: list[Path], regions: list[str] | None = None) -> Installation:
        """One adapter slot and one IdentityNet signal per concept, each reading its own ID tokens."""
        unet = base.pipe.unet
        projections, states, scales, nets = [], [], [], []
        loaded: dict[str, Any] = {}
        for concept in concepts:
            manifest = read_manifest(concept)
            adapter = encoded_with(concept, manifest)
            config = manifest.get("config", {})
            weights_path, controlnet_path = adapter_files(adapter, config.get("controlnet"))
            recorded = manifest.get("identitynet_fingerprint")  # None: encoded before concepts recorded it
            if recorded is not None and recorded != (now := adapter_fingerprint(controlnet_path)):
                raise LimnerError(
                    f"the IdentityNet {controlnet_path} changed since concept {concept} was encoded with it "
                    f"(fingerprint {recorded}, now {now}); encode it again"
                )
            weights = read_adapter_weights(weights_path, pickle_opt_in())  # this call's --allow-pickle
            check_fits(unet, weights, weights_path)
            projections.append(load_projection(weights, weights_path))
            states.append(weights)
            scales.append(float(config.get("scale", 0.8)))
            key = str(controlnet_path.resolve())
            if key not in loaded:
                loaded[key] = load_controlnet(controlnet_path, unet)
            nets.append((loaded[key], manifest["pose"], float(config.get("controlnet_scale", 0.8))))
        attach(unet, projections, states, for_generation=True)
        installation = Installation(undo=[lambda: detach(unet)])
        try:
            set_ip_scale(unet, scales)
            for slot, (controlnet, pose, scale) in enumerate(nets):
                signal = ControlSignal(
                    controlnet, kps_drawer(pose), scale, context=image_token_context(unet, slot), name=self.name
                )
                installation.undo.append(install_controlnet(unet, signal))
        except BaseException:
            installation.uninstall()
            raise
        return installation

    def set_call_settings(self, base: Base, concepts: list[Path], settings: dict[str, Any]) -> None:
        """`scale` (the Image Adapter's) and `controlnet_scale` (the IdentityNet's) for every installed concept."""
        super().set_call_settings(base, concepts, settings)
        cfg = with_settings(InstantIDSettings(), settings, self.name)  # checked as the settings are
        if "scale" in settings:
            set_ip_scale(base.pipe.unet, [cfg.scale] * len(concepts))
        if "controlnet_scale" in settings:
            for signal in installed_signals(base.pipe.unet):
                if signal.name == self.name:
                    signal.scale = cfg.controlnet_scale

    def condition(self, base: Base, concepts: list[Path], prompt: str) -> dict[str, Any]:
        """`ip_adapter_image_embeds` per concept, [negative; positive] face embeddings ([2, 1, 1, d]: one image,
        one token), which the Resampler installed as the UNet's image projection turns into the ID tokens."""
        from safetensors.torch import load_file

        param = next(base.pipe.unet.parameters())
        embeds = []
        for concept in concepts:
            e = load_file(str(Path(concept) / EMBEDS))
            both = torch.stack([e["negative_image_embeds"], e["image_embeds"]])
            embeds.append(both.to(param.device, param.dtype))
        return {"ip_adapter_image_embeds": embeds}

    def prompt(self, template: str, concept: Path) -> str:
        return template.format(read_manifest(concept)["class_noun"])


def _flat(weights: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{"image_proj": {...}, "ip_adapter": {...}} as the flat `image_proj.*` / `ip_adapter.*` entries."""
    return {f"{part}.{key}": value for part, entries in weights.items() for key, value in entries.items()}


def _open_data(data: Any, base: Base, cfg: InstantIDSettings, train_cfg: TrainConfig) -> Any:
    """A data stream: given (anything iterable over samples), or opened from a spec: on the world, its identity
    stream (characters, another view in other clothes as the reference)."""
    if not isinstance(data, (str, Path)):
        return data
    from accelerate import PartialState

    from limner.data import open_stream
    from limner.encoders.faces.world import DET_SIZE

    state = PartialState(cpu=torch.device(base.device).type == "cpu")
    world = str(data) == "world"
    return open_stream(
        str(data),
        seed=train_cfg.seed,
        rank=state.process_index,
        world_size=state.num_processes,
        # world pictures no smaller than the world face analyser's 64 px, so a tiny test base still finds faces
        resolution=max(base.resolution, DET_SIZE) if world else base.resolution,
        pair="view" if world else "self",
        captions=cfg.captions or ("class" if world else "full"),
        **({"subjects": "characters", "clothes": "vary"} if world else {}),
    )


__all__ = ["InstantID", "InstantIDSettings"]
