"""The evaluation protocol: rows (methods and reference bounds) x subjects x prompts x seeds.

For every row and subject: personalize (or reuse a cached concept), generate N images per prompt
with fixed seeds (each image cached under a key of everything that affects it), then score them.
On the world two reference rows give every score a scale:
- lower-bound: the base model given only the class noun ("a ball on the beach");
- upper-bound: fresh renders of the subject itself in what the prompt asks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from limner.conditioning import AppliedConcepts, apply_concepts, concept_prompt
from limner.errors import LimnerError
from limner.evaluation.cache_keys import concept_key, digest
from limner.evaluation.metrics import diversity, mean_similarity_to_references, text_alignment
from limner.evaluation.subjects import EvalSubject
from limner.images import at_64px
from limner.io import written_atomically
from limner.methods import get_method, parse_setting, split_settings
from limner.world.bench import BenchPrompt

if TYPE_CHECKING:
    from limner.models.loading import Base

LOWER, UPPER = "lower-bound", "upper-bound"
FIDELITY_THRESHOLD = 0.5  # "time to reach subject fidelity 0.5" in reports and bench


@dataclass
class EvalSettings:
    images_per_prompt: int = 4
    seed: int = 0
    steps: int = 25
    guidance: float = 5.0
    scheduler: str = "dpm++"
    max_prompts: int | None = None  # fewer prompts per subject, for quick runs
    layout_steps: int | None = None  # a concept's first steps follow the class prompt; None: each method's default


@dataclass
class Encoders:
    clip: object  # .images(list) / .texts(list) -> normalised embeddings
    dino: object | None = None
    face: object | None = None  # .faces(list) -> (embeddings, found)
    probes: object | None = None  # world Probes, for ground-truth measures


def build_encoders(world: bool, base: str | None, clip: Path | None, dino: Path | None, face: Path | None, device: str) -> Encoders:
    """The encoders that score images: the world's CLIP, identity embedder and probes on the world
    base; local CLIP / DINO / insightface folders on real subjects."""
    from limner.encoders import CLIPEncoder, DINOEncoder, InsightFaceEmbedder, WorldCLIP, WorldFaceEmbedder
    from limner.models.loading import WORLD_BASE, WORLD_PROBES, resolve_device
    from limner.world.probes import Probes

    dev = str(resolve_device(device))
    if clip is None and not (world and base is None):
        raise LimnerError("scoring real images needs --clip PATH, a local CLIPModel folder (e.g. openai/clip-vit-large-patch14 "
                          "saved with save_pretrained)")
    clip_enc = CLIPEncoder(clip, dev) if clip else WorldCLIP(WORLD_BASE, dev)
    face_enc = InsightFaceEmbedder(face, dev) if face else (WorldFaceEmbedder(WORLD_PROBES) if world else None)
    return Encoders(clip=clip_enc, dino=DINOEncoder(dino, dev) if dino else None, face=face_enc,
                    probes=Probes(WORLD_PROBES) if world else None)


@dataclass(frozen=True)
class Row:
    """One line of the results table: a reference bound, a method to personalize with, or an
    existing concept folder to score."""

    name: str
    method: str | None = None
    concept: Path | None = None
    config: tuple[tuple[str, object], ...] = ()  # method settings, e.g. (("prior_preservation", "none"),)

    @classmethod
    def parse(cls, spec: str) -> Row:
        """'lower-bound', 'upper-bound', 'METHOD' or 'METHOD:key=value,key=value'."""
        if spec in (LOWER, UPPER):
            return cls(spec)
        method, _, settings = spec.partition(":")
        config = [parse_setting(item, f"--method {spec}") for item in filter(None, settings.split(","))]
        return cls(spec, method=method, config=tuple(config))

    @classmethod
    def for_concept(cls, folder: Path) -> Row:
        from limner.concepts import read_manifest

        manifest = read_manifest(folder)
        if "method" not in manifest:
            raise LimnerError(f"--concept {folder}: limner.json names no method")
        return cls(f"{manifest['method']}:{folder.name}", method=manifest["method"], concept=folder)

    def subjects(self, subjects: list[EvalSubject]) -> list[EvalSubject]:
        """A concept folder belongs to one subject: the one its manifest names (or the only one given)."""
        if self.concept is None:
            return subjects
        from limner.concepts import read_manifest

        name = read_manifest(self.concept).get("subject")
        mine = [s for s in subjects if s.name == name]
        if not mine and len(subjects) == 1:
            return subjects
        if not mine:
            raise LimnerError(f"--concept {self.concept} was trained on subject {name!r}, which is not among --subjects "
                              f"({', '.join(s.name for s in subjects)}); pass --subjects with that subject")
        return mine


@dataclass
class RowResult:
    row: str
    per_subject: dict[str, dict[str, float]] = field(default_factory=dict)
    images: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # subject -> prompt -> image paths
    concepts: dict[str, dict] = field(default_factory=dict)  # subject -> concept manifest (methods only)
    seconds: dict[str, float] = field(default_factory=dict)
    layout_steps: int = 0  # of each concept's first denoising steps, drawn from the class prompt


def layout_steps_of(row: Row, settings: EvalSettings) -> int:
    """How many of a row's first denoising steps follow the class prompt: the setting, or the method's default."""
    if row.method is None:
        return 0
    if settings.layout_steps is not None:
        return settings.layout_steps
    return get_method(row.method).layout_steps(settings.steps)


class ImageCache:
    """Generated images stored by a key of everything that affects them."""

    def __init__(self, root: Path):
        self.root = root / "images"
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.png"

    def put(self, key: str, image: Image.Image) -> Path:
        p = self.path(key)
        with written_atomically(p) as tmp:  # parallel evaluations share one cache
            image.save(tmp, format="PNG")
        return p


# --------------------------------------------------------------------------------------------
# Producing images for one row
# --------------------------------------------------------------------------------------------


def class_prompt(template: str, subject: EvalSubject) -> str:
    """The prompt with the subject replaced by its class noun: the lower bound's prompt, and the
    text that CLIP-T compares against (as in DreamBench)."""
    return template.format(subject.class_noun)


def render_upper_bound(subject: EvalSubject, prompt: BenchPrompt, seed: int) -> Image.Image:
    """A fresh render of the world subject doing what the prompt asks: the best any method can do."""
    from dataclasses import replace

    from limner.world import vocab
    from limner.world.bench import identity_character, subject_object
    from limner.world.render import Scene, render

    rng = np.random.default_rng([seed, 99])
    ctx = prompt.context or str(rng.choice(list(vocab.CONTEXTS)))
    if subject.kind == "identity":
        spec = identity_character(subject.world, rng)
        if prompt.colour:
            spec.shirt_colour = prompt.colour
    else:
        world_subject = subject.world
        if prompt.colour:
            world_subject = replace(world_subject, colour_a=prompt.colour, colour_b=prompt.colour)
        spec = subject_object(world_subject, rng)
        spec.accessory = prompt.accessory
    return render(Scene(ctx, [spec], variant=int(rng.integers(2**31)))).pil()


class BaseHandle:
    """Loads the base only when an image is actually missing from the cache."""

    def __init__(self, spec: str | None, device: str, fingerprint: str):
        from limner.models.loading import resolve_device, resolve_dtype

        self.spec, self.device, self.fingerprint, self._base = spec, device, fingerprint, None
        dev = resolve_device(device)
        # images made in another precision are other images: the device type and dtype are part of the key
        self.precision = f"{dev.type}/{resolve_dtype('auto', dev, world=spec is None)}".replace("torch.", "")

    def get(self):
        if self._base is None:
            from limner.models.loading import load_base

            self._base = load_base(self.spec, device=self.device)
        return self._base

    def reset(self) -> None:
        """Drops the loaded pipeline, so the next concept starts from a clean base."""
        self._base = None


def generate_cached(handle: BaseHandle, cache: ImageCache, prompt: str, settings: EvalSettings, key_parts: dict,
                    prepare: Callable[[Base], AppliedConcepts] | None = None, layout_prompt: str | None = None,
                    layout_steps: int = 0) -> list[Path]:
    """N images of one prompt, from the cache where possible; `prepare(base)` installs the row's concept
    (once) and returns it. With `layout_steps`, the first steps follow `layout_prompt`."""
    from limner.generation import GenerationSettings, generate

    layout = {"layout_prompt": layout_prompt, "layout_steps": layout_steps} if layout_steps else {}  # keys without it are unchanged
    keys = [digest(key_parts | layout | {"prompt": prompt, "seed": settings.seed + i, "steps": settings.steps,
                                         "guidance": settings.guidance, "scheduler": settings.scheduler})
            for i in range(settings.images_per_prompt)]
    missing = [i for i, k in enumerate(keys) if not cache.path(k).exists()]
    cache.hits += len(keys) - len(missing)
    cache.misses += len(missing)
    if missing:
        base = handle.get()
        applied = prepare(base) if prepare is not None else None
        # one batched call when the run is contiguous (the usual case); image i always has seed + i
        runs = [missing] if missing == list(range(missing[0], missing[-1] + 1)) else [[i] for i in missing]
        for run in runs:
            s = GenerationSettings(prompt=prompt, num_images=len(run), seed=settings.seed + run[0], steps=settings.steps,
                                   guidance_scale=settings.guidance, scheduler=settings.scheduler, batch_size=len(run),
                                   layout_prompt=layout_prompt if layout_steps else None, layout_steps=layout_steps)
            # the concepts' per-call arguments; the layout steps are the row's (the key names them)
            pipe_kwargs = applied.condition(prompt, settings.steps, layout_steps=0).pipe_kwargs if applied is not None else {}
            for i, image in zip(run, generate(base, s, **pipe_kwargs).images):
                cache.put(keys[i], image)
    return [cache.path(k) for k in keys]


def row_images(row: Row, subject: EvalSubject, handle: BaseHandle, cache: ImageCache, settings: EvalSettings,
               concept: Path | None = None) -> dict[str, list[Path]]:
    """prompt text -> image paths, for every prompt of the subject (and the class-only drift prompt)."""
    prompts = subject.prompts[: settings.max_prompts] if settings.max_prompts else subject.prompts
    out: dict[str, list[Path]] = {}
    if row.name == UPPER:
        if subject.world is None:
            raise LimnerError("the upper bound needs world subjects (it renders the subject itself)")
        for p in prompts:
            keys = [digest({"row": UPPER, "subject": subject.fingerprint(), "prompt": p.template, "seed": settings.seed + i})
                    for i in range(settings.images_per_prompt)]
            out[class_prompt(p.template, subject)] = [
                cache.path(k) if cache.path(k).exists() else cache.put(k, render_upper_bound(subject, p, settings.seed + i))
                for i, k in enumerate(keys)]
        return out
    key = {"base": handle.fingerprint, "precision": handle.precision, "row": row.method or row.name}
    applied: list[AppliedConcepts] = []
    prepare = None
    if row.method is not None:
        key["concept"] = concept_fingerprint(concept)

        def prepare(base):  # the concept is installed only if an image is missing, then once
            if not applied:
                applied.append(apply_concepts(base, [concept]))
            return applied[0]

    layout_steps = layout_steps_of(row, settings)
    try:
        for p in prompts:
            class_text = class_prompt(p.template, subject)
            text = class_text if row.method is None else concept_prompt(concept, p.template)
            out[class_text] = generate_cached(handle, cache, text, settings, key, prepare, class_text, layout_steps)
        # language drift: the class prompt alone, with the concept installed
        out["__drift__"] = generate_cached(handle, cache, f"a {subject.class_noun}", settings, key, prepare)
    finally:
        for a in applied:
            a.uninstall()  # the next concept starts from the base as it was
    return out


def concept_fingerprint(concept: Path) -> str:
    """Weights and settings of a concept; not its logs, checkpoints or timings."""
    from limner.concepts import read_manifest
    from limner.models.loading import fingerprint

    m = read_manifest(concept)
    stable = {k: m.get(k) for k in ("method", "subject", "base_fingerprint", "config", "steps", "tokens")}
    return digest([stable, fingerprint(Path(concept), skip=("limner.json", "README.md", "train_log.csv"))])


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def load_rgb(paths: list[Path]) -> list[Image.Image]:
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def _asked(prompt: BenchPrompt) -> dict[str, str]:
    want = {}
    if prompt.context:
        want["context"] = prompt.context
    if prompt.colour:
        want["colour"] = prompt.colour
    if prompt.accessory:
        want["accessory"] = prompt.accessory
    return want


def score_subject(subject: EvalSubject, images: dict[str, list[Path]], enc: Encoders) -> dict[str, float]:
    """Mean scores over all prompts' images of one subject; ground-truth measures on world subjects."""
    prompts = {class_prompt(p.template, subject): p for p in subject.prompts}
    refs_clip = enc.clip.images(subject.images)
    refs_dino = enc.dino.images(subject.images) if enc.dino else None
    refs_face = None
    if enc.face is not None and subject.kind == "identity":
        refs_face, found = enc.face.faces(subject.images)
        refs_face = refs_face[found]
    acc: dict[str, list[float]] = {}

    def add(name, values):
        acc.setdefault(name, []).extend([float(v) for v in np.atleast_1d(values)])

    for text, paths in images.items():
        if text == "__drift__":
            continue
        ims = load_rgb(paths)
        emb = enc.clip.images(ims)
        add("clip_i", mean_similarity_to_references(emb, refs_clip))
        add("clip_t", text_alignment(emb, enc.clip.texts([text] * len(ims))))
        add("diversity", diversity(emb))
        if refs_dino is not None:
            add("dino", mean_similarity_to_references(enc.dino.images(ims), refs_dino))
        if refs_face is not None and len(refs_face):
            faces, found = enc.face.faces(ims)
            if found.any():
                add("face_sim", mean_similarity_to_references(faces[found], refs_face))
                add("face_div", diversity(faces[found]))
        if enc.probes is not None and subject.world is not None:
            fid, pf = world_measures(subject, prompts[text], ims, enc)
            add("subject_fidelity", fid)
            add("prompt_fidelity", pf)
    if enc.probes is not None and subject.world is not None and "__drift__" in images:
        drift_ims = load_rgb(images["__drift__"])
        fid, _ = world_measures(subject, None, drift_ims, enc)
        add("language_drift", fid)
        cls = enc.probes.predict("attributes", at_64px(drift_ims))["class"].argmax(-1)
        labels = enc.probes.labels("attributes", "class")
        add("class_prompt_accuracy", [labels[int(c)] == subject.class_noun for c in cls])
    return {k: float(np.nanmean(v)) for k, v in acc.items() if v}


def world_measures(subject: EvalSubject, prompt: BenchPrompt | None, images: list[Image.Image], enc: Encoders):
    """Subject fidelity (is it this subject?) and prompt fidelity (does it do what was asked?),
    read by probes trained on renderer ground truth."""
    arr = at_64px(images)
    if subject.kind == "identity":
        refs, ref_found = enc.face.faces(subject.images)
        emb, found = enc.face.faces(list(arr))
        # an image with no face found has no identity: fidelity 0
        fidelity = (mean_similarity_to_references(emb, refs[ref_found]) * found).numpy()
    else:
        probs, names = enc.probes.subject_probabilities(arr)
        fidelity = probs[:, names.index(subject.name)].numpy()
    if prompt is None:
        return fidelity, None
    want = _asked(prompt)
    got = enc.probes.read_attributes(arr, tuple(want))
    hits = sum((np.array(got[head]) == value).astype(float) for head, value in want.items())
    return fidelity, hits / max(1, len(want))


def world_fidelity_score(subject: EvalSubject):
    """images -> mean subject fidelity, read by the world's probes (for validation during training)."""
    from limner.encoders import WorldFaceEmbedder
    from limner.models.loading import WORLD_PROBES
    from limner.world.probes import Probes

    enc = Encoders(clip=None, face=WorldFaceEmbedder(WORLD_PROBES) if subject.kind == "identity" else None, probes=Probes(WORLD_PROBES))
    return lambda images: float(np.mean(world_measures(subject, None, images, enc)[0]))


def time_to_fidelity(concepts: dict[str, dict], threshold: float) -> dict:
    """Training seconds until validation first reached `threshold`, per subject, and their mean over
    the subjects that reached it."""
    times = {}
    for subject, meta in concepts.items():
        hit = [v["seconds"] for v in meta.get("validation", []) if v["score"] >= threshold]
        times[subject] = hit[0] if hit else None
    reached = [t for t in times.values() if t is not None]
    return {"threshold": threshold, "per_subject": times, "reached": len(reached), "of": len(times),
            "mean_seconds": float(np.mean(reached)) if reached else None}


def aggregate(per_subject: dict[str, dict[str, float]]) -> dict[str, float]:
    names = sorted({k for v in per_subject.values() for k in v})
    return {k: float(np.nanmean([v[k] for v in per_subject.values() if k in v])) for k in names}


# --------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------


def personalize_cached(method_name: str, subject: EvalSubject, handle: BaseHandle, cache_root: Path, config: dict) -> tuple[Path, dict]:
    """Trains (or encodes) a concept once per (method, subject, base, config); reused afterwards."""
    from limner.concepts import read_manifest, write_json_atomic

    method = get_method(method_name)
    key = concept_key(method, config, subject.fingerprint(masks=method.reads_masks(config)), handle.fingerprint)
    folder = cache_root / "concepts" / f"{method_name}-{subject.name}-{key}"
    if not (folder / "limner.json").exists():
        # trained in a side folder (resumable after an interruption) and renamed when complete
        work = folder.with_name(folder.name + ".partial")
        t0 = time.perf_counter()
        train_cfg = method.default_train_config()
        if train_cfg is not None and "train" not in config:
            from dataclasses import replace

            # training settings (max_steps=600, learning_rate=1e-3) go into the method's TrainConfig
            train_cfg, config = split_settings(train_cfg, config)
            # validation every sixth of training, scored by the world's probes: a fidelity-vs-time curve
            every = max(1, train_cfg.max_steps // 6) if subject.world is not None else 0
            config = config | {"train": replace(train_cfg, resume="latest", validate_every=every)}
        score = world_fidelity_score(subject) if subject.world is not None else None
        from limner.models.loading import load_base

        handle.reset()
        # trained in full precision (mixed precision is the trainer's business), whatever the device
        method.personalize(load_base(handle.spec, device=handle.device, dtype="fp32"), subject, work, score=score, **config)
        meta = read_manifest(work)
        meta.setdefault("personalize_seconds", round(time.perf_counter() - t0, 2))
        write_json_atomic(work / "limner.json", meta)
        os.replace(work, folder)
    return folder, read_manifest(folder)


def save_references(subject: EvalSubject, cache_root: Path) -> list[Path]:
    folder = cache_root / "references" / f"{subject.name}-{subject.fingerprint()}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(subject.images):
        p = folder / f"{i}.png"
        if not p.exists():
            Image.fromarray(im).save(p)
        paths.append(p)
    return paths


def run_eval(rows: list[Row], subjects: list[EvalSubject], enc: Encoders, cache_root: Path, settings: EvalSettings,
             base: str | None = None, device: str = "auto", method_config: dict | None = None) -> dict:
    """Runs every row on every subject and returns the results (JSON-ready)."""
    from limner.models.loading import WORLD_BASE, check_folder, fingerprint
    from limner.world.probes import probe_digests

    base_path = WORLD_BASE if base is None else Path(base)
    if base_path.is_dir():
        check_folder(base_path)
    handle = BaseHandle(base, device, fingerprint(base_path))
    cache = ImageCache(cache_root)
    references = {s.name: [str(p) for p in save_references(s, cache_root)] for s in subjects}
    results: dict[str, RowResult] = {}
    t_start = time.perf_counter()
    for row in rows:
        res = results[row.name] = RowResult(row.name, layout_steps=layout_steps_of(row, settings))
        for subject in row.subjects(subjects):
            t0 = time.perf_counter()
            concept = row.concept
            if row.method is not None and concept is None:
                config = (method_config or {}) | dict(row.config)
                concept, res.concepts[subject.name] = personalize_cached(row.method, subject, handle, cache_root, config)
            images = row_images(row, subject, handle, cache, settings, concept)
            res.per_subject[subject.name] = score_subject(subject, images, enc)
            res.images[subject.name] = {k: [str(p) for p in v] for k, v in images.items()}
            res.seconds[subject.name] = round(time.perf_counter() - t0, 2)
    return {
        "settings": asdict(settings), "base": str(base_path), "base_fingerprint": handle.fingerprint,
        "world": all(s.world is not None for s in subjects),
        "subjects": [{"name": s.name, "class_noun": s.class_noun, "kind": s.kind} for s in subjects],
        "encoders": {k: getattr(getattr(enc, k), "name", None) for k in ("clip", "dino", "face")},
        "probes": probe_digests(enc.probes.folder) if enc.probes is not None else None,
        "rows": {r: {"mean": aggregate(v.per_subject), "per_subject": v.per_subject, "images": v.images,
                     "concepts": v.concepts, "seconds": v.seconds, "layout_steps": v.layout_steps,
                     "time_to_fidelity": time_to_fidelity(v.concepts, FIDELITY_THRESHOLD) if v.concepts else None}
                 for r, v in results.items()},
        "references": references,
        "cache": {"hits": cache.hits, "misses": cache.misses},
        "seconds": round(time.perf_counter() - t_start, 2),
    }
