"""PhotoMaker (Li et al., 2024): a person from one to four photos, in seconds, through a stacked ID embedding.

The user writes the trigger `img` after the class word ("a portrait of a woman img on the beach"). Each reference's
face crop (limner.methods.photomaker.references) goes through the ID encoder (a CLIP vision tower and one projection
per text encoder: limner.methods.photomaker.id_encoder); the class token is repeated once per reference and each
copy fused with one image's embedding (the shared fuse MLP, limner.adapters.fuse); the UNet, carrying PhotoMaker's
LoRA on every attention projection, denoises from that.

v2 (`--set variant=v2`, or read off an official file's keys) describes each reference by its face's identity
embedding (the face analysis's: insightface's ArcFace with --faces DIR, the world's own otherwise) read through a
perceiver over the CLIP tower's patch tokens, two tokens an image: the class token is repeated twice per reference
(limner.methods.photomaker.id_encoder_v2).

    pretrain   the LoRA, the ID encoder's last layers, projections and fuse module on the world's people (several
               views of each: other context, pose, scale, clothes), masked diffusion loss with p 0.5, 10% null
               text (limner.methods.photomaker.training); `limner pretrain --method photomaker --data world`
    encode     each reference -> face found -> crop -> ID embedding e_i, stored in a concept (no training)
    generate   start_merge_step: the first 20% of the steps from the prompt without its trigger, the rest with the
               stacked ID embedding (limner's layout steps); identity mixing: several concepts (people) stack at
               the one trigger, each taking a share of the stack set by its `weight`

Files: an adapter folder holds `photomaker.safetensors` in the official layout (limner.methods.photomaker.weights)
and `adapter.json`; the official `photomaker-v1.bin` / `-v2.bin` is read with allow_pickle, its safetensors conversion
without. A concept folder holds `id_embeds.safetensors` (one row per reference; v2: [references, 2, width]), the face
crops and `limner.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from limner.concepts import read_manifest
from limner.errors import LimnerError
from limner.io import disk_guard, pickle_opt_in, written_atomically
from limner.methods.adapter import (
    ADAPTER_MANIFEST,
    CURVE_POINTS,
    AdapterMethod,
    encoded_concept_manifest,
    encoded_with,
    made_by_limner,
    read_reference_files,
    thin_curve,
    write_adapter_manifest,
    write_concept_manifest,
    write_references,
)
from limner.methods.base import Capabilities, Installation
from limner.methods.photomaker.id_encoder import (
    IDEncoder,
    id_processor,
    pixels_of,
    text_widths,
    vision_config_from_state,
)
from limner.methods.photomaker.id_encoder_v2 import IDEncoderV2, face_width_of
from limner.methods.photomaker.prompts import (
    TRIGGER,
    count_triggers,
    merge_step_count,
    stacked_token_ids,
    without_triggers,
)
from limner.methods.photomaker.references import id_faces, reference_names, warn_notes
from limner.methods.photomaker.weights import (
    LORA_NAME,
    WEIGHTS,
    check_lora_shapes,
    lora_to_peft,
    read_weights,
    save_weights,
    variant_of,
    weights_path,
)
from limner.methods.registry import register
from limner.methods.settings import setting, with_settings
from limner.subject import Subject

if TYPE_CHECKING:
    from limner.models.loading import Base

EMBEDS = "id_embeds.safetensors"
IMAGE_ENCODER = "image_encoder"
FEATURE_EXTRACTOR = "feature_extractor"
# ID images a concept of each variant takes: the paper stacks 1 to 4 (v2's 2 tokens an image fill the same room)
MAX_REFERENCES = {"v1": 4, "v2": 4}


VARIANTS = ("v1", "v2")


@dataclass
class PhotoMakerSettings:
    variant: str | None = setting(
        None,
        "v1 (the ID image's CLIP embedding) or v2 (its face embedding through a perceiver, 2 tokens an image); "
        "pretrain: which to train (None: v1); encode: the adapter's (None: read off its keys)",
    )
    merge_ratio: float = setting(
        0.2,
        "start_merge_step as a share of the steps: steps i <= int(ratio x steps) draw from the prompt without its "
        "trigger, the rest with the stacked ID embedding (official default 20%; higher follows the text more)",
    )
    trigger: str = setting(
        TRIGGER, "the word written after the class word ('a man img in the snow'): the official one"
    )
    num_references: int | None = setting(None, "use only the subject's first N references (None: all, at most 4)")
    weight: float = setting(
        1.0,
        "identity mixing: this person's share of the stacked ID embedding when several concepts stack at one "
        "trigger (shares are weight / sum of weights)",
    )
    crop_scale: float = setting(2.0, "the ID image: a square this many face-box sides around the face found")
    faces: str | None = setting(None, "an insightface model folder that finds the faces (None: the world's analyser)")
    image_encoder: str | None = setting(
        None, "pretrain: a CLIPVisionModelWithProjection folder to start the ID encoder from; default: the base's"
    )
    allow_pickle: bool = setting(
        False,
        "read the official pickled photomaker-v1.bin / -v2.bin (torch.load with weights_only=True); only files you "
        "trust",
    )
    max_references: int = setting(4, "pretrain: a training sample stacks 1 to N views of its person", at_least=1)
    mask_loss_prob: float = setting(0.5, "pretrain: share of steps whose loss counts only inside the person's mask")
    uncondition_prob: float = setting(0.1, "pretrain: share of samples with an empty caption and no ID image")
    image_encoder_trainable_layers: int = setting(2, "pretrain: the image encoder's last N layers train")
    lora_rank: int = setting(32, "pretrain: rank of the UNet's LoRA (the official model card: 64 on SDXL)", at_least=1)

    def __post_init__(self) -> None:
        if self.variant is not None and self.variant not in VARIANTS:
            raise LimnerError(f"variant {self.variant!r}: PhotoMaker has {' and '.join(VARIANTS)}")
        if not 0 <= self.merge_ratio < 1:
            raise LimnerError(f"merge_ratio {self.merge_ratio} must be in [0, 1): the share of text-only steps")
        if not self.trigger or not self.trigger.isalnum():
            raise LimnerError(f"trigger {self.trigger!r} must be one word of letters or digits")
        if self.weight <= 0:
            raise LimnerError(f"weight {self.weight} must be above 0 (a person's share of the stacked ID embedding)")
        if self.crop_scale < 1:
            raise LimnerError(f"crop_scale {self.crop_scale} must be 1 or more (the crop holds the whole face box)")
        for name in ("mask_loss_prob", "uncondition_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise LimnerError(f"{name} {getattr(self, name)} must be between 0 and 1")
        if self.num_references is not None and self.num_references < 1:
            raise LimnerError(f"num_references must be at least 1, got {self.num_references}")


def pretrain_defaults():
    """Batch 8, AdamW 1e-4 (the paper's rate for the LoRA; a CPU hour is a few thousand steps)."""
    from limner.training import TrainConfig

    return TrainConfig(max_steps=1000, batch_size=8, learning_rate=1e-4, weight_decay=0.01, checkpoint_every=250)


def stack_shares(counts: list[int], weights: list[float]) -> list[int]:
    """How many stacked tokens each person takes: the stack holds as many as all references together, shared out in
    proportion to the weights (largest remainders), each person at least one. Equal weights with equal references
    give each person their own references; weight 3:1 over 4 + 4 references gives 6 and 2."""
    total = sum(counts)
    if len(counts) == 1:
        return counts
    exact = [w / sum(weights) * total for w in weights]
    shares = [max(1, int(e)) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for i in order:
        if sum(shares) >= total:
            break
        shares[i] += 1
    while sum(shares) > total:  # the one-each floor overdrew: the largest share gives back
        shares[shares.index(max(shares))] -= 1
    return shares


VISION_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
)


def vision_config_of(adapter: Path, state: dict[str, torch.Tensor], where: Path | str):
    """The vision tower's config: as limner's adapter.json records it, else read off the official file's weights."""
    from transformers import CLIPVisionConfig

    manifest = Path(adapter) / ADAPTER_MANIFEST
    recorded = json.loads(manifest.read_text()).get("vision_config") if manifest.is_file() else None
    return CLIPVisionConfig(**recorded) if recorded else vision_config_from_state(state, where)


def stackable_references(
    subject: Subject, variant: str, limit: int | None, given_as: str
) -> tuple[list, list[str], list[str]]:
    """(the references to stack, how errors name them, notes). More than the variant stacks is an error where the
    user named them (photos given one by one, or num_references); a subject with more pictures (a folder, the
    bench's five) stacks its first ones, with a note saying so."""
    most = MAX_REFERENCES[variant]
    images, names = list(subject.images), reference_names(subject)
    if limit is not None and limit > most:
        raise LimnerError(f"num_references={limit}: PhotoMaker {variant} stacks at most {most} ID images")
    if given_as == "files" and len(images) > most:
        raise LimnerError(
            f"{len(images)} references given, but PhotoMaker {variant} stacks at most {most} ID images: give at "
            f"most {most} photos of the person"
        )
    notes = []
    if limit is None and len(images) > most:
        notes.append(
            f"subject {subject.name} has {len(images)} references; PhotoMaker {variant} stacks at most {most}: took "
            f"the first {most} (--set num_references=N to choose fewer)"
        )
    keep = min(limit or most, most)
    if not images:
        raise LimnerError(
            f"subject {subject.name}: no reference image; PhotoMaker needs 1 to {most} photos of the person"
        )
    return images[:keep], names[:keep], notes


def build_id_encoder(base: Base, adapter: Path, state: dict[str, torch.Tensor], where: Path | str) -> IDEncoder:
    """The ID encoder for this base with the adapter's weights, the projections and fuse module checked against the
    base's text widths (an official SDXL file on another base is an error saying so)."""
    widths = text_widths(base.pipe)
    fuse = state.get("fuse_module.layer_norm.weight")
    if fuse is None:
        raise LimnerError(f"PhotoMaker checkpoint {where}: id_encoder has no fuse_module: not a PhotoMaker ID encoder")
    if int(fuse.shape[0]) != sum(widths):
        raise LimnerError(
            f"PhotoMaker checkpoint {where} fuses into {int(fuse.shape[0])}-wide text embeddings, this base's are "
            f"{sum(widths)} ({' + '.join(map(str, widths))}): it was made for another base (the official files are "
            "for SDXL: 768 + 1280)"
        )
    config = vision_config_of(adapter, state, where)
    if variant_of(state) == "v2":
        encoder: IDEncoder = IDEncoderV2(config, widths, face_width_of(state, where))
    else:
        encoder = IDEncoder(config, widths)
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unknown = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unknown or bad:
        what = (
            f"misses {missing[:3]}"
            if missing
            else f"has {unknown[:3]}"
            if unknown
            else f"has other shapes for {bad[:3]}"
        )
        raise LimnerError(
            f"PhotoMaker checkpoint {where}: its id_encoder {what} for this base: give the complete file made for it"
        )
    encoder.load_state_dict({k: state[k] for k in own})
    return encoder.to(base.device, torch.float32).eval().requires_grad_(False)


def processor_for(base: Base, adapter: Path | None, encoder: IDEncoder):
    """The ID images' preprocessing: the adapter's feature extractor, else the base's, else CLIP's standard; one
    that crops to another size than the tower reads is passed over (the world's 64 px for a 224 px tower)."""
    size = int(encoder.vision_config.image_size)
    for place in ([Path(adapter)] if adapter is not None and Path(adapter).is_dir() else []) + [Path(base.path)]:
        if (place / FEATURE_EXTRACTOR / "preprocessor_config.json").is_file():
            processor = id_processor(size, place / FEATURE_EXTRACTOR)
            if int(processor.crop_size["height"]) == size:
                return processor
    return id_processor(size, None)


@register
class PhotoMaker(AdapterMethod):
    """A person from 1-4 photos: one fused class-token copy per photo (Li et al., 2024)."""

    name = "photomaker"
    official_adapter = "the official photomaker-v1.bin or photomaker-v2.bin (an SDXL base, --allow-pickle)"
    family = "identity"
    capabilities = Capabilities(needs_adapter=True, needs_faces=True)
    config_cls = PhotoMakerSettings

    def __init__(self) -> None:
        self._installed: dict | None = None  # what install loaded for condition(): the fuse module, trigger

    # ---- pretraining -------------------------------------------------------------------------------------------

    def pretrain(self, base: Base, data: Any, out: Path, **settings: Any) -> Path:
        """Pretrains on `data` ("world": the identity stream, or a stream of Samples with references); writes the
        adapter folder (the official layout + adapter.json)."""
        from limner.encoders.faces import face_analysis
        from limner.methods.ip_adapter import find_image_encoder
        from limner.methods.photomaker.training import IDBatches, Pretraining
        from limner.training import is_main_process, split_train_settings, train

        out = Path(out)
        train_cfg = settings.pop("train", None) or pretrain_defaults()
        train_cfg, rest = split_train_settings(train_cfg, settings)
        cfg = with_settings(PhotoMakerSettings(), rest, self.name)
        stream = self._open_data(data, base, train_cfg)
        clip_folder = find_image_encoder(base, None, cfg.image_encoder)
        from transformers import CLIPVisionConfig

        variant = cfg.variant or "v1"
        analysis = face_analysis(cfg.faces)
        vision = CLIPVisionConfig.from_pretrained(clip_folder)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(train_cfg.seed)
            if variant == "v2":  # the face embedding's width is the analyser's (512 for insightface's ArcFace)
                encoder = IDEncoderV2(vision, text_widths(base.pipe), int(analysis.embedding_dim))
            else:
                encoder = IDEncoder(vision, text_widths(base.pipe))
        encoder.load_from_clip(clip_folder)
        encoder = encoder.to(base.device)
        processor = processor_for(base, None, encoder)
        task = Pretraining(base, encoder, cfg, train_cfg)
        t0 = time.perf_counter()
        try:
            batches = IDBatches(stream, base, analysis, processor, cfg, train_cfg.batch_size, encoder.tokens_per_image)
            log = train(task, batches, train_cfg, out, self.name, data=stream)
            lora = {k.partition(".")[2]: v for k, v in task.trainable_state().items() if k.startswith("unet.")}
        finally:
            task.close()
        if is_main_process():
            with disk_guard(f"the adapter in {out}"):
                save_weights(encoder.state_dict(), lora, out / WEIGHTS)
                terms = task.terms[:: max(1, len(task.terms) // CURVE_POINTS)]
                describe = getattr(stream, "describe", None)
                write_adapter_manifest(
                    out,
                    self.name,
                    base,
                    variant=variant,
                    vision_config={k: getattr(encoder.vision_config, k) for k in VISION_KEYS},
                    image_encoder_start=str(clip_folder),
                    lora={
                        "rank": cfg.lora_rank,
                        "alpha": cfg.lora_rank,
                        "targets": ["to_q", "to_k", "to_v", "to_out.0"],
                    },
                    trained=task.trained,
                    data=describe() if callable(describe) else type(stream).__name__,
                    skipped=batches.skipped,
                    steps=log.steps,
                    seconds=round(log.seconds, 2),
                    wall_seconds=round(time.perf_counter() - t0, 2),
                    curve=thin_curve(log.curve),
                    loss_terms=terms,
                    settings=asdict(cfg),
                    train=asdict(train_cfg),
                    num_processes=log.num_processes,
                )
        return out

    @staticmethod
    def _open_data(data: Any, base: Base, train_cfg) -> Any:
        if not isinstance(data, (str, Path)):
            return data
        if str(data) != "world":
            raise LimnerError(
                f"--data {data}: PhotoMaker pretrains on several photos of each person with the person's mask; limner "
                "draws them from the world (--data world). Real identity data in that form is not read yet"
            )
        from accelerate import PartialState

        from limner.data import open_stream

        state = PartialState(cpu=torch.device(base.device).type == "cpu")
        return open_stream(
            "world",
            seed=train_cfg.seed,
            rank=state.process_index,
            world_size=state.num_processes,
            pair="view",  # drawn at the world's 64 px, where its faces are found; the batches resize the targets
            subjects="characters",
            clothes="vary",
        )

    # ---- adapters ----------------------------------------------------------------------------------------------

    def check_official_adapter(self, path: Path) -> None:
        weights_path(path)

    # ---- encoding ----------------------------------------------------------------------------------------------

    def personalize(self, base: Base, subject: Any, out: Path, *, score: Any = None, **overrides: Any) -> Path:
        adapter = overrides.pop("adapter", None)
        with_settings(PhotoMakerSettings(), overrides, self.name)  # settings fail before any work
        if isinstance(subject, (list, tuple)):
            if len(subject) != 1:
                raise LimnerError(
                    f"photomaker encodes one person per concept, got {len(subject)}; to mix identities, encode each "
                    "and give both concepts (each with its weight)"
                )
            (subject,) = subject
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
        """`limner generate --image a.png --image b.png`: the files are photos of one person, stacked."""
        images = read_reference_files(paths)
        default_name = Path(paths[0]).stem if paths else "person"
        subject = Subject(name or default_name, class_noun, images, meta={"files": [str(p) for p in paths]})
        with_settings(PhotoMakerSettings(), settings, self.name)
        return self.encode(base, self.adapter_for(base, adapter), subject, Path(out), given_as="files", **settings)

    def encode(
        self, base: Base, adapter: Path, subject: Subject, out: Path, given_as: str = "subject", **settings: Any
    ) -> Path:
        """Each reference's face crop through the adapter's ID encoder: one ID embedding per reference.
        given_as: "files" for photos given with a prompt (`limner generate --image`), which must then name them."""
        from limner.encoders.faces import face_analysis

        t0 = time.perf_counter()
        cfg = with_settings(PhotoMakerSettings(), settings, self.name)
        adapter, out = Path(adapter), Path(out)
        weights = read_weights(adapter, cfg.allow_pickle or pickle_opt_in())
        variant = variant_of(weights["id_encoder"])
        if cfg.variant is not None and cfg.variant != variant:
            raise LimnerError(
                f"variant={cfg.variant}, but {weights_path(adapter)} is a PhotoMaker {variant} checkpoint (v2's ID "
                "encoder has qformer_perceiver.*, v1's none): leave variant out or give the other file"
            )
        images, names, notes = stackable_references(subject, variant, cfg.num_references, given_as)
        # limner's adapters were pretrained on unit face embeddings, the official photomaker-v2.bin on insightface's
        # raw ones (its scripts feed faces[0]['embedding']): a file without limner's manifest is an official download
        norm = 1.0 if made_by_limner(adapter) else None
        crops, faces, found = id_faces(images, names, face_analysis(cfg.faces), cfg.crop_scale, norm=norm)
        notes += found
        warn_notes(notes)
        encoder = build_id_encoder(base, adapter, weights["id_encoder"], weights_path(adapter))
        pixels = pixels_of(processor_for(base, adapter, encoder), crops).to(base.device)
        id_embeds = torch.stack(faces).to(base.device) if variant == "v2" else None
        if id_embeds is not None and id_embeds.shape[1] != encoder.id_embeddings_dim:
            raise LimnerError(
                f"PhotoMaker v2 adapter {weights_path(adapter)} reads {encoder.id_embeddings_dim}-wide face "
                f"embeddings; the face analysis gives {id_embeds.shape[1]}-wide ones: use the analyser it was made "
                "with (--faces DIR: an insightface pack for the official file, whose scripts use insightface's "
                "default buffalo_l; none: the world's analyser)"
            )
        with torch.no_grad():  # v1: [N, d], one per image; v2: [N, 2, d], two tokens an image
            embeds = encoder.embed(pixels, id_embeds).float().cpu()
        fields = {"variant": variant, "notes": notes, "given_as": given_as}
        return self._write_concept(base, adapter, subject, crops, embeds, fields, cfg, out, t0)

    def _write_concept(self, base, adapter, subject, crops, embeds, fields, cfg, out, t0) -> Path:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        with disk_guard(f"the concept in {out}"):
            write_references(out, crops)
            with written_atomically(out / EMBEDS) as tmp:
                save_file({"id_embeds": embeds.contiguous()}, str(tmp))
            manifest = encoded_concept_manifest(
                self.name,
                base,
                adapter,
                subject,
                cfg,
                t0,
                trigger=cfg.trigger,
                num_references=len(crops),
                **fields,
                example_prompt=f"a portrait of a {subject.class_noun} {cfg.trigger} on the beach",
            )
            manifest["config"].pop("allow_pickle")  # a permission of the call that encoded, not of the concept
            write_concept_manifest(out, manifest)
        return out

    # ---- generation --------------------------------------------------------------------------------------------

    def install(self, base: Base, concepts: list[Path], regions: list[str] | None = None) -> Installation:
        """The concepts' adapter into the base (they must share one): its LoRA on the UNet's attention, and its fuse
        module for condition()."""
        from limner.adapters import FuseMLP
        from limner.adapters.lora import load_named_lora, remove_named_lora

        if regions:
            raise LimnerError("photomaker stacks its people at the prompt's trigger; draw without --regions")
        manifests = [read_manifest(c) for c in concepts]
        adapters = {m["adapter"] for m in manifests}
        if len(adapters) > 1:
            raise LimnerError(
                f"photomaker concepts encoded with different adapters ({', '.join(sorted(adapters))}) cannot draw "
                "together: the adapter's LoRA is shared; encode them with one adapter"
            )
        adapter = [encoded_with(c, m) for c, m in zip(concepts, manifests)][0]
        where = weights_path(adapter)
        weights = read_weights(adapter, pickle_opt_in())
        lora, rank = lora_to_peft(weights["lora_weights"], where)
        pipe = base.pipe
        check_lora_shapes(lora, pipe.unet, where)
        targets = sorted({k.rpartition(".lora_")[0] for k in lora})
        problems = load_named_lora(pipe.unet, LORA_NAME, lora, rank, rank, targets)
        if problems:
            raise LimnerError(f"PhotoMaker adapter {where}: {'; '.join(problems)}")
        installation = Installation(undo=[lambda: remove_named_lora(pipe.unet, LORA_NAME)])
        try:
            fuse_state = {
                k.partition(".")[2]: v for k, v in weights["id_encoder"].items() if k.startswith("fuse_module.")
            }
            fuse = FuseMLP(sum(text_widths(pipe)))
            fuse.load_state_dict(fuse_state)
        except (RuntimeError, KeyError) as e:
            installation.uninstall()
            raise LimnerError(f"PhotoMaker adapter {where}: its fuse_module does not fit this base ({e})") from e
        trigger = manifests[0].get("trigger") or TRIGGER
        param = next(pipe.unet.parameters())
        self._installed = {"fuse": fuse.to(param.device, torch.float32).eval(), "trigger": trigger}
        installation.undo.append(lambda: setattr(self, "_installed", None))
        return installation

    def condition(self, base: Base, concepts: list[Path], prompt: str) -> dict[str, Any]:
        """`prompt_embeds` (and SDXL's pooled embedding): the prompt's text embedding with the class word before the
        trigger repeated once per stacked ID image, each copy fused with one image's embedding. Several concepts
        (identity mixing) share the stack by their weights."""
        from safetensors.torch import load_file

        if self._installed is None:
            raise LimnerError("photomaker concepts must be installed (limner.conditioning) before a prompt")
        trigger = self._installed["trigger"]
        manifests = [read_manifest(c) for c in concepts]
        if count_triggers(prompt, trigger) == 0:
            if any(m.get("given_as") == "files" for m in manifests):
                raise LimnerError(
                    f"PhotoMaker prompt {prompt!r} has no trigger word {trigger!r}: write it right after the class "
                    f"word, e.g. 'a portrait of a woman {trigger} on the beach', so the photos given take its place"
                )
            return {}  # a prompt that names no person draws none, as a tuning concept's token left out of a prompt
        embeds = [load_file(str(Path(c) / EMBEDS))["id_embeds"] for c in concepts]
        shares = stack_shares([len(e) for e in embeds], [float(m["config"].get("weight", 1.0)) for m in manifests])
        # whole images share the stack (a v2 image's 2 tokens stay together), then every token takes a copy
        stacked = torch.cat([e[torch.arange(n) % len(e)] for e, n in zip(embeds, shares)])
        stacked = stacked.reshape(-1, stacked.shape[-1])
        return self.fused_prompt(base, prompt, stacked, trigger)

    def fused_prompt(self, base: Base, prompt: str, stacked: torch.Tensor, trigger: str) -> dict[str, torch.Tensor]:
        """The text encoders' output for the prompt with the class token stacked len(stacked) times, each copy fused
        with one row of `stacked` [N, d]; on SDXL the pooled embedding of the same ids beside it (as the official
        pipeline computes both)."""
        pipe = base.pipe
        sdxl = getattr(pipe, "text_encoder_2", None) is not None
        tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if sdxl else [])
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
        device = pipe.text_encoder.device
        states, pooled, positions = [], None, None
        with torch.no_grad():
            for tokenizer, encoder in zip(tokenizers, encoders):
                ids, where = stacked_token_ids(tokenizer, prompt, len(stacked), trigger)
                if positions is not None and where != positions:
                    raise LimnerError(
                        "the base's two tokenizers split the class word differently; PhotoMaker needs both alike"
                    )
                positions = where
                out = encoder(torch.tensor([ids], device=device), output_hidden_states=sdxl)
                states.append(out.hidden_states[-2] if sdxl else out[0])
                pooled = out[0] if sdxl else None
            text = torch.cat(states, dim=-1).float()
            rows = torch.zeros(len(stacked), dtype=torch.long, device=device)
            cols = torch.tensor(positions, dtype=torch.long, device=device)
            fuse = self._installed["fuse"]
            fused = text.index_put((rows, cols), fuse(text[rows, cols], stacked.to(text)).to(text.dtype))
        result = {"prompt_embeds": fused.to(pipe.unet.dtype)}
        if sdxl:
            result["pooled_prompt_embeds"] = pooled.to(pipe.unet.dtype)
        return result

    def class_prompt(self, prompt: str, manifest: dict) -> str:
        """The prompt of the steps before start_merge_step: the trigger removed."""
        return without_triggers(prompt, manifest.get("trigger") or TRIGGER)

    def layout_steps(self, steps: int, manifest: dict | None = None) -> int:
        ratio = (manifest or {}).get("config", {}).get("merge_ratio", PhotoMakerSettings().merge_ratio)
        return merge_step_count(steps, float(ratio))

    def prompt(self, template: str, concept: Path) -> str:
        manifest = read_manifest(concept)
        return template.format(f"{manifest['class_noun']} {manifest.get('trigger') or TRIGGER}")


__all__ = ["EMBEDS", "MAX_REFERENCES", "WEIGHTS", "PhotoMaker", "PhotoMakerSettings", "stack_shares"]
