"""FastComposer (Xiao et al., 2023): tuning-free multi-subject generation with localized attention.

Each subject of a prompt is named by its noun followed by the trigger ("a ball <|image|> and a dog <|image|> on the
beach"; the official image token, `trigger` to change it). A CLIP image encoder reads each subject's reference
(its pooled, projected embedding: one token per subject); the fuse MLP writes that embedding into the text
encoder's output at the noun before the trigger, and the UNet denoises from the result. Several subjects in one
image from one prompt, one reference each, with no training per subject: the k-th trigger takes the k-th subject.

    pretrain   the UNet (a LoRA here), the fuse MLP and the image encoder's last 2 layers on scenes of up to 4
               subjects, with the masked denoising loss and the cross-attention localization loss
               (limner.methods.fastcomposer.training); `limner pretrain --method fastcomposer --data world`
    encode     each subject's references -> its embedding (mean over references), stored in a concept folder
    generate   delayed subject conditioning: the first (1 - alpha) of the steps from the text-only prompt (the
               triggers removed), the rest with the subjects fused in (alpha 0.7; limner.generation switches the
               prompt embeddings at that step, as it does for every method's layout steps)
    boxes      limner's `subject_boxes`, not the paper's: each subject's token seen only inside its box of the image
               and boosted there (limner.adapters.box_attention), so that neither of two subjects takes the picture

Files: an adapter folder holds `fastcomposer.safetensors` (fp16, official prefixes, the UNet's delta as a LoRA:
limner.methods.fastcomposer.weights) and `adapter.json`; the official `pytorch_model.bin` is read too (with
allow_pickle), its UNet and text encoder replacing the base's while installed. A concept folder holds
`subject_embeds.safetensors` (one row per subject), its references and `limner.json` naming the adapter by path and
fingerprint.

Generation: `limner generate "a ball <|image|> and a dog <|image|> on the beach" --method fastcomposer --image
ball.png --image dog.png` (each --image one subject, in the order of the triggers), or concept folders with
--concept (each concept's subjects in the order given); `limner train --method fastcomposer --subject DIR` encodes a
subject's several references into one concept.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from limner.adapters.box_attention import BoxAttention, parse_boxes
from limner.adapters.lora import remove_named_lora
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
from limner.methods.fastcomposer.prompts import (
    TRIGGER,
    check_subject_count,
    count_triggers,
    text_only_steps,
    tokenize_with_triggers,
    without_triggers,
)
from limner.methods.fastcomposer.weights import (
    LORA_NAME,
    WEIGHTS,
    check_complete,
    is_lora,
    load_into,
    load_unet_lora,
    read_weights,
    save_weights,
    weights_path,
)
from limner.methods.registry import register
from limner.methods.settings import setting, with_settings
from limner.subject import Subject

if TYPE_CHECKING:
    from limner.models.loading import Base

EMBEDS = "subject_embeds.safetensors"
IMAGE_ENCODER = "image_encoder"
MIN_REFERENCE_SIDE = 8
FLAT = 4  # a reference whose pixels all lie within this many levels of each other shows no subject


@dataclass
class FastComposerSettings:
    alpha: float = setting(
        0.7,
        "delayed subject conditioning: the share of denoising steps drawn with the subjects fused in; the first "
        "(1 - alpha) come from the text-only prompt (paper: 0.6-0.8; higher keeps identity, lower follows the text)",
    )
    trigger: str = setting(
        TRIGGER, "the word written after each subject's noun ('a dog <|image|> on the beach'): the official token"
    )
    subject_scale: float = setting(
        1.0,
        "limner's: how far each subject's fused token is pushed from its word (text + scale * (fused - text)); 1 is "
        "the paper's, above 1 trades prompt fidelity for the subject as IP-Adapter's scale does",
        added=True,
        at_least=0.0,
    )
    subject_boxes: str | None = setting(
        None,
        "limner's: confine each subject's token to a box of the image, boosted inside it (box attention, "
        "limner.adapters.box_attention): 'columns' (the subjects left to right in the order of their triggers, in "
        "equal bands) or 'x0,y0,x1,y1;...' in fractions of the image, one box per subject; None: the paper's",
        added=True,
    )
    box_boost: float = setting(
        6.0,
        "limner's: with subject_boxes, the logit added to a subject's token inside its box",
        added=True,
        at_least=0.0,
    )
    num_references: int | None = setting(None, "use only each subject's first N references (None: all, averaged)")
    image_encoder: str | None = setting(
        None, "a CLIPVisionModelWithProjection folder (its config; weights from the adapter); default: the base's"
    )
    allow_pickle: bool = setting(
        False, "read the official pickled pytorch_model.bin (torch.load with weights_only=True); only files you trust"
    )
    max_subjects: int = setting(4, "pretrain: subjects a training scene shows at most (paper: 4)", at_least=1)
    localization_weight: float = setting(1e-3, "pretrain: weight of the localization loss (paper: 1e-3; 0: off)")
    localization_blocks: int = setting(
        5, "pretrain: the middle N cross-attention blocks whose maps the localization loss reads (paper: 5)"
    )
    mask_loss_prob: float = setting(0.5, "pretrain: share of steps whose denoising loss counts only inside the masks")
    uncondition_prob: float = setting(0.1, "pretrain: share of samples with an empty caption and no subject")
    object_appear_prob: float = setting(0.9, "pretrain: each subject's chance to be conditioned on (official: 0.9)")
    image_encoder_trainable_layers: int = setting(2, "pretrain: the image encoder's last N layers train (paper: 2)")
    lora_rank: int = setting(32, "pretrain: rank of the UNet's LoRA (the paper tunes the whole UNet)", at_least=1)
    pair: str | None = setting(
        None,
        "pretrain on the world: self (each subject cropped from the target, as the paper) or view (from another view "
        "of it drawn alone; limner's, measured behind self). None: self",
    )
    init: str | None = setting(
        None,
        "pretrain: start from this adapter's weights (a folder limner pretrained, with the same lora_rank and "
        "trained encoder layers) rather than fresh ones, to train a shipped adapter on; a resumed run continues "
        "from its checkpoint",
        added=True,
    )

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise LimnerError(f"alpha {self.alpha} must be in (0, 1]: the share of steps with the subjects fused in")
        if not self.trigger or any(c.isspace() for c in self.trigger):
            raise LimnerError(f"trigger {self.trigger!r} must be one word")
        for name in ("localization_weight",):
            if getattr(self, name) < 0:
                raise LimnerError(f"{name} must be 0 or more")
        for name in ("mask_loss_prob", "uncondition_prob", "object_appear_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise LimnerError(f"{name} {getattr(self, name)} must be between 0 and 1")
        if self.pair not in (None, "self", "view"):
            raise LimnerError(f"pair {self.pair!r}: use self or view")
        if self.subject_boxes is not None:
            parse_boxes(self.subject_boxes)  # a malformed box fails here, before any work
        if self.num_references is not None and self.num_references < 1:
            raise LimnerError(f"num_references must be at least 1, got {self.num_references}")


def pretrain_defaults():
    """Batch 8, AdamW 1e-4 (the paper's 1e-5 is for its 150k steps on 8 GPUs; a CPU hour is a few thousand)."""
    from limner.training import TrainConfig

    return TrainConfig(max_steps=1000, batch_size=8, learning_rate=1e-4, weight_decay=0.01, checkpoint_every=250)


# ---------------------------------------------------------------------------------------------------------------
# The subject encoder: the CLIP image encoder with the adapter's trained layers
# ---------------------------------------------------------------------------------------------------------------


def subject_encoder(base: Base, adapter: Path | None, weights: dict | None, given: str | None, where: Path | str):
    """limner's ImageEncoder (the base's CLIP vision tower and preprocessing), with the adapter's image_encoder.*
    weights in place: all of them for the official checkpoint, the trained last layers for limner's."""
    from limner.methods.ip_adapter import ImageEncoder, find_image_encoder

    folder = adapter if adapter is not None and Path(adapter).is_dir() else None
    encoder = ImageEncoder(find_image_encoder(base, folder, given), base.device)
    state = (weights or {}).get("image_encoder") or {}
    if weights is not None and not is_lora(weights["unet"]):  # the official checkpoint: a whole encoder
        check_complete(state, encoder.model, "image_encoder", where)
    load_into(encoder.model, state, "image_encoder", where)
    return encoder


def reference_crops(subject: Subject, limit: int | None) -> list[np.ndarray]:
    """Each reference as the image encoder reads it: with a mask, the subject's crop on noise (as in training, noise
    seeded so encoding is repeatable); without, the whole picture padded square. A reference that shows no subject
    (an empty mask, a flat picture) is an error naming it."""
    from limner.data.multi_subject import pad_square, subject_crop

    images = subject.images[:limit]
    if not images:
        raise LimnerError(f"subject {subject.name}: no reference image; FastComposer encodes one picture per subject")
    crops = []
    for i, image in enumerate(images):
        a = np.asarray(image)
        where = f"subject {subject.name}, reference {i}"
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise LimnerError(f"{where} is not an RGB picture (shape {a.shape}, {a.dtype})")
        if min(a.shape[:2]) < MIN_REFERENCE_SIDE:
            raise LimnerError(f"{where} is {a.shape[1]}x{a.shape[0]} px; give at least {MIN_REFERENCE_SIDE} px a side")
        if subject.masks is not None:
            mask = np.asarray(subject.masks[i], dtype=bool)
            if not mask.any():
                raise LimnerError(f"{where}: its mask is empty, so it shows no subject (all background)")
            crops.append(subject_crop(a, mask, np.random.default_rng(i)))
        else:
            if int(a.max()) - int(a.min()) <= FLAT:
                raise LimnerError(f"{where} is one flat colour: it shows no subject (all background)")
            crops.append(pad_square(a))
    return crops


@register
class FastComposer(AdapterMethod):
    """Subjects fused into the text at their nouns, attention localized to each (Xiao et al., 2023)."""

    name = "fastcomposer"
    official_adapter = "the official pytorch_model.bin (an SD 1.5 base, --allow-pickle)"
    family = "encoder"
    capabilities = Capabilities(needs_adapter=True, reads_masks=True)
    config_cls = FastComposerSettings

    def __init__(self) -> None:
        self._installed: dict | None = None  # what install loaded for condition(): fuse MLP, trigger

    def reads_masks(self, overrides: dict) -> bool:
        return True  # a reference with a mask is encoded as its crop on noise, as in training

    # ---- pretraining -------------------------------------------------------------------------------------------

    def pretrain(self, base: Base, data: Any, out: Path, **settings: Any) -> Path:
        """Pretrains on `data` ("world", or a stream of limner.data.multi_subject samples); writes the adapter."""
        from limner.methods.fastcomposer.training import Pretraining, SubjectBatches
        from limner.training import is_main_process, split_train_settings, train

        out = Path(out)
        train_cfg = settings.pop("train", None) or pretrain_defaults()
        train_cfg, rest = split_train_settings(train_cfg, settings)
        cfg = with_settings(FastComposerSettings(), rest, self.name)
        cfg.pair = cfg.pair or "self"  # the paper's: ahead of view from scratch and past view's plateau
        origin = started_from(cfg.init, out)
        stream = self._open_data(data, base, cfg, train_cfg)
        encoder = subject_encoder(base, None, None, cfg.image_encoder, "the base")
        task = Pretraining(base, encoder, cfg, train_cfg)
        t0 = time.perf_counter()
        try:
            if cfg.init is not None:
                task.load_trainable_state(self._starting_state(cfg, task))
            batches = SubjectBatches(
                stream, base, lambda crops: encoder.pixels(crops).cpu(), cfg, train_cfg.batch_size
            )
            log = train(task, batches, train_cfg, out, self.name, data=stream)
            state = task.trainable_state()
        finally:
            task.close()
        if is_main_process():
            self._write_adapter(base, out, cfg, train_cfg, task, state, encoder, stream, log, t0, origin)
        return out

    @staticmethod
    def _starting_state(cfg: FastComposerSettings, task) -> dict[str, torch.Tensor]:
        """`init`'s weights, in fp32, checked to be exactly what these settings train (every key, every shape)."""
        from limner.io import read_tensors

        where = Path(cfg.init).expanduser()
        path = weights_path(where)
        if path.suffix != ".safetensors":
            raise LimnerError(f"init={where}: start from an adapter limner pretrained (its {WEIGHTS})")
        given = read_tensors(path, False)
        wanted = task.trainable_state()
        missing, unknown = sorted(set(wanted) - set(given)), sorted(set(given) - set(wanted))
        reshaped = sorted(k for k in set(wanted) & set(given) if given[k].shape != wanted[k].shape)
        if missing or unknown or reshaped:
            first = (missing or unknown or reshaped)[:3]
            raise LimnerError(
                f"init={where} does not fit these settings ({len(missing)} weights missing, {len(unknown)} "
                f"unknown, {len(reshaped)} of another shape, e.g. {', '.join(first)}); set lora_rank and "
                "image_encoder_trainable_layers as it was pretrained (its adapter.json records them)"
            )
        return {k: v.float() for k, v in given.items()}

    @staticmethod
    def _open_data(data: Any, base: Base, cfg: FastComposerSettings, train_cfg) -> Any:
        if not isinstance(data, (str, Path)):
            return data
        if str(data) != "world":
            raise LimnerError(
                f"--data {data}: FastComposer pretrains on scenes with every subject's mask and the place its noun "
                "ends in the caption; limner draws them from the world (--data world). Real data in that form "
                "(COCO-style segments, as the official FFHQ-wild) is not read yet"
            )
        from accelerate import PartialState

        from limner.data.multi_subject import MultiSubjectWorldStream

        state = PartialState(cpu=torch.device(base.device).type == "cpu")
        return MultiSubjectWorldStream(
            seed=train_cfg.seed,
            rank=state.process_index,
            world_size=state.num_processes,
            max_subjects=cfg.max_subjects,
            pair=cfg.pair,
        )

    def _write_adapter(self, base, out, cfg, train_cfg, task, state, encoder, stream, log, t0, origin) -> None:
        from limner.methods.fastcomposer.training import LORA_TARGETS
        from limner.methods.ip_adapter import encoder_fingerprint

        terms = task.terms[:: max(1, len(task.terms) // CURVE_POINTS)]
        own = encoder.folder.resolve() == (Path(base.path) / IMAGE_ENCODER).resolve()
        with disk_guard(f"the adapter in {out}"):
            if not own and not (out / IMAGE_ENCODER).exists():  # an encoder the base lacks travels with the adapter
                copy_folder(encoder.folder, out / IMAGE_ENCODER)
            save_weights(state, out / WEIGHTS)
            describe = getattr(stream, "describe", None)
            write_adapter_manifest(
                out,
                self.name,
                base,
                image_encoder=str(encoder.folder) if own else IMAGE_ENCODER,
                image_encoder_fingerprint=encoder_fingerprint(encoder.folder),
                lora={"rank": cfg.lora_rank, "alpha": cfg.lora_rank, "targets": LORA_TARGETS},
                image_encoder_trained_layers=task.layers,
                localization_blocks=task.blocks,
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
            )

    # ---- adapters ----------------------------------------------------------------------------------------------

    def check_official_adapter(self, path: Path) -> None:
        weights_path(path)

    # ---- encoding ----------------------------------------------------------------------------------------------

    def personalize(self, base: Base, subject: Any, out: Path, *, score: Any = None, **overrides: Any) -> Path:
        """One concept for one subject, or for several in order (each then takes one trigger of a prompt)."""
        adapter = overrides.pop("adapter", None)
        with_settings(FastComposerSettings(), overrides, self.name)  # settings fail before any work
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
        """`limner generate --image a.png --image b.png`: each file one subject, in the order of the triggers."""
        images = read_reference_files(paths)
        subjects = [Subject(name or Path(p).stem, class_noun, [im]) for p, im in zip(paths, images)]
        with_settings(FastComposerSettings(), settings, self.name)
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
        """Each subject's references through the adapter's image encoder: its embedding, averaged over references.
        given_as: "files" for references given with a prompt (`limner generate --image`), which must then name them."""
        from limner.methods.ip_adapter import encoder_fingerprint

        t0 = time.perf_counter()
        cfg = with_settings(FastComposerSettings(), settings, self.name)
        subjects = list(subject) if isinstance(subject, (list, tuple)) else [subject]
        if not subjects:
            raise LimnerError("fastcomposer: no subject to encode")
        adapter, out = Path(adapter), Path(out)
        crops = [reference_crops(s, cfg.num_references) for s in subjects]  # bad references fail before loading
        weights = read_weights(adapter, cfg.allow_pickle)
        manifest = read_adapter_manifest(adapter) if (adapter / ADAPTER_MANIFEST).is_file() else {}
        encoder = subject_encoder(base, adapter, weights, cfg.image_encoder, adapter)
        wanted, found = manifest.get("image_encoder_fingerprint"), encoder_fingerprint(encoder.folder)
        if wanted and wanted != found:
            raise LimnerError(
                f"adapter {adapter} was pretrained with image encoder {wanted}, but {encoder.folder} is {found}; give "
                "the one it was trained with (--set image_encoder=DIR)"
            )
        with torch.no_grad():
            embeds = torch.stack([encoder.model(encoder.pixels(c)).image_embeds.float().mean(0) for c in crops])
        return self._write_concept(base, adapter, subjects, crops, embeds, cfg, out, t0, given_as)

    def _write_concept(self, base, adapter, subjects, crops, embeds, cfg, out, t0, given_as) -> Path:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        with disk_guard(f"the concept in {out}"):
            write_references(out, {f"{k:02d}-{i:02d}": im for k, c in enumerate(crops) for i, im in enumerate(c)})
            with written_atomically(out / EMBEDS) as tmp:
                save_file({"subject_embeds": embeds.cpu().contiguous()}, str(tmp))
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
                trigger=cfg.trigger,
                num_subjects=len(subjects),
                given_as=given_as,
                num_references=[len(c) for c in crops],
                example_prompt=" and ".join(f"a {n} {cfg.trigger}" for n in nouns) + " on the beach",
            )
            write_concept_manifest(out, manifest)
        return out

    # ---- generation --------------------------------------------------------------------------------------------

    def install(self, base: Base, concepts: list[Path], regions: list[str] | None = None) -> Installation:
        """The concepts' adapter into the base (they must share one): its UNet LoRA (or the official checkpoint's
        UNet and text encoder in place of the base's) and its fuse MLP, for condition() to use."""
        from limner.adapters import FuseMLP

        if regions:
            raise LimnerError("fastcomposer places several subjects from one prompt; draw without --regions")
        manifests = [read_manifest(c) for c in concepts]
        adapters = {m["adapter"] for m in manifests}
        if len(adapters) > 1:
            raise LimnerError(
                f"fastcomposer concepts encoded with different adapters ({', '.join(sorted(adapters))}) cannot draw "
                "together: the adapter's UNet is shared; encode them with one adapter"
            )
        adapter = Path(manifests[0]["adapter"])
        for concept, manifest in zip(concepts, manifests):
            encoded_with(concept, manifest)
        config = manifests[0].get("config", {})
        weights = read_weights(adapter, pickle_opt_in())
        pipe, installation = base.pipe, Installation()
        try:
            if is_lora(weights["unet"]):
                lora = read_adapter_manifest(adapter)["lora"]
                load_unet_lora(pipe.unet, weights["unet"], lora, adapter)
                installation.undo.append(lambda: remove_named_lora(pipe.unet, LORA_NAME))
            else:  # the official checkpoint: its whole UNet and text encoder, the base's put back on uninstall
                for part in ("unet", "text_encoder"):
                    module = getattr(pipe, part)
                    check_complete(weights[part], module, part, adapter)
                    saved = {k: v.clone() for k, v in module.state_dict().items()}
                    load_into(module, weights[part], part, adapter)
                    installation.undo.append(lambda m=module, s=saved: m.load_state_dict(s))
            fuse = FuseMLP(int(pipe.text_encoder.config.hidden_size), _image_width(weights["postfuse_module"]))
            check_complete(weights["postfuse_module"], fuse, "postfuse_module", adapter)
            fuse.load_state_dict(weights["postfuse_module"])
        except BaseException:
            installation.uninstall()
            raise
        param = next(pipe.unet.parameters())
        self._installed = {
            "fuse": fuse.to(param.device, torch.float32).eval(),
            "trigger": config.get("trigger"),
            "subject_scale": float(config.get("subject_scale", 1.0)),
            "subject_boxes": config.get("subject_boxes"),
            "box_boost": float(config.get("box_boost", FastComposerSettings().box_boost)),
            "box_attention": None,
        }
        installation.undo.append(lambda: setattr(self, "_installed", None))
        if self._installed["subject_boxes"]:
            boxes = self._installed["box_attention"] = BoxAttention(pipe)
            installation.undo.append(boxes.remove)
        return installation

    def condition(self, base: Base, concepts: list[Path], prompt: str) -> dict[str, Any]:
        """`prompt_embeds`: the text encoder's output for the prompt without its triggers, each subject fused in at
        the noun before its trigger (the k-th trigger, the k-th subject of the concepts in order)."""
        from safetensors.torch import load_file

        if self._installed is None:
            raise LimnerError("fastcomposer concepts must be installed (limner.conditioning) before a prompt")
        trigger = self._installed["trigger"] or TRIGGER
        embeds = torch.cat([load_file(str(Path(c) / EMBEDS))["subject_embeds"] for c in concepts])
        triggers = count_triggers(prompt, trigger)
        boxes = self._installed["box_attention"]
        if boxes is not None:
            boxes.clear()  # set again below for a prompt that names its subjects
        if not triggers and all(read_manifest(c).get("given_as") != "files" for c in concepts):
            # a prompt that names no subject draws none, as a tuning concept's token left out of a prompt (eval's
            # language-drift prompt); references given with the prompt itself must be named in it
            return {}
        check_subject_count(prompt, triggers, len(embeds), trigger)
        pipe = base.pipe
        ids, positions = tokenize_with_triggers(pipe.tokenizer, prompt, trigger)
        if boxes is not None:  # the same positions hold the nouns in the text-only steps' prompt
            boxes.set(
                positions, parse_boxes(self._installed["subject_boxes"], len(positions)), self._installed["box_boost"]
            )
        device = pipe.text_encoder.device
        fuse = self._installed["fuse"]
        with torch.no_grad():
            text = pipe.text_encoder(torch.tensor([ids], device=device))[0].float()
            fused = fuse.fuse_at(text, embeds[None].to(text), [positions])
            scale = self._installed["subject_scale"]
            if scale != 1.0:  # 1 is the paper's fused token itself
                fused = text + scale * (fused - text)
        return {"prompt_embeds": fused.to(pipe.unet.dtype)}

    def class_prompt(self, prompt: str, manifest: dict) -> str:
        """The text-only prompt of the delayed conditioning: the triggers removed."""
        return without_triggers(prompt, manifest.get("trigger") or TRIGGER)

    def layout_steps(self, steps: int, manifest: dict | None = None) -> int:
        alpha = (manifest or {}).get("config", {}).get("alpha", FastComposerSettings().alpha)
        return text_only_steps(float(alpha), steps)

    def prompt(self, template: str, concept: Path) -> str:
        manifest = read_manifest(concept)
        return template.format(f"{manifest['class_noun']} {manifest.get('trigger') or TRIGGER}")


def _image_width(fuse_state: dict[str, torch.Tensor]) -> int:
    """The image embedding width a fuse MLP reads: mlp1 takes [text token; image embedding] to the text's width."""
    if "mlp1.fc1.weight" not in fuse_state or "mlp1.fc2.weight" not in fuse_state:
        raise LimnerError("the adapter's postfuse_module has no mlp1.fc1 / mlp1.fc2 weights: not a fuse MLP")
    return int(fuse_state["mlp1.fc1.weight"].shape[1]) - int(fuse_state["mlp1.fc2.weight"].shape[0])


__all__ = ["EMBEDS", "WEIGHTS", "FastComposer", "FastComposerSettings"]
