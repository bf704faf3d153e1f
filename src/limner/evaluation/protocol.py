"""The evaluation protocol: rows (methods and reference bounds) x subjects x prompts x seeds.

For every row and subject: personalize (or reuse a cached concept), generate N images per prompt
with fixed seeds (each image cached under a key of everything that affects it), then score them.
On the world two reference rows give every score a scale:
- lower-bound: the base model given only the class noun ("a ball on the beach");
- upper-bound: fresh renders of the subject itself in what the prompt asks.
A third, asked for by name (`--method described`), reads how far words alone reach:
- described: the base model given the subject told in its training captions' words ("a red and white ball
  with a blue heart on the beach"): what an encoder method's image has to add beyond them.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from limner import progress
from limner.concepts import read_manifest
from limner.conditioning import AppliedConcepts, apply_concepts, concept_prompt
from limner.errors import LimnerError
from limner.evaluation.cache import (
    BaseHandle,
    ImageCache,
    concept_fingerprint,
    generate_cached,
    personalize_cached,
    save_references,
)
from limner.evaluation.cache_keys import digest
from limner.evaluation.rows import (
    DESCRIBED,
    FIDELITY_THRESHOLD,
    LOWER,
    UPPER,
    EvalSettings,
    Row,
    RowResult,
    class_prompt,
    layout_steps_of,
)
from limner.evaluation.scoring import (
    Encoders,
    aggregate,
    build_encoders,
    score_subject,
    time_to_fidelity,
    world_measures,
)
from limner.evaluation.subjects import EvalSubject
from limner.world.bench import BenchPrompt, described_prompt


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


def row_images(
    row: Row,
    subject: EvalSubject,
    handle: BaseHandle,
    cache: ImageCache,
    settings: EvalSettings,
    concept: Path | None = None,
) -> dict[str, list[Path]]:
    """prompt text -> image paths, for every prompt of the subject (and the class-only drift prompt)."""
    prompts = subject.prompts[: settings.max_prompts] if settings.max_prompts else subject.prompts
    out: dict[str, list[Path]] = {}
    if row.name == UPPER:
        if subject.world is None:
            raise LimnerError("the upper bound needs world subjects (it renders the subject itself)")
        for p in prompts:
            keys = [
                digest(
                    {"row": UPPER, "subject": subject.fingerprint(), "prompt": p.template, "seed": settings.seed + i}
                )
                for i in range(settings.images_per_prompt)
            ]
            out[class_prompt(p.template, subject)] = [
                cache.path(k)
                if cache.path(k).exists()
                else cache.put(k, render_upper_bound(subject, p, settings.seed + i))
                for i, k in enumerate(keys)
            ]
            progress.advance(len(keys))
        return out
    key = {"base": handle.fingerprint, "precision": handle.precision, "row": row.method or row.name}
    applied: list[AppliedConcepts] = []
    prepare = None
    if row.method is not None:
        key["concept"] = concept_fingerprint(concept)

        def prepare(base):  # the concept is installed only if an image is missing, then once
            if not applied:
                # a pickled adapter is read only where this row's settings opt in (method:allow_pickle=true)
                applied.append(
                    apply_concepts(base, [concept], allow_pickle=bool(dict(row.config).get("allow_pickle")))
                )
            return applied[0]

    layout_steps = layout_steps_of(row, settings, read_manifest(concept) if concept is not None else None)
    try:
        for p in prompts:
            class_text = class_prompt(p.template, subject)
            if row.name == DESCRIBED:
                text = described_prompt(subject.world, p)
            else:
                text = class_text if row.method is None else concept_prompt(concept, p.template)
            out[class_text] = generate_cached(handle, cache, text, settings, key, prepare, class_text, layout_steps)
        if row.draws_drift:  # language drift: the class prompt alone, with the concept installed
            out["__drift__"] = generate_cached(handle, cache, f"a {subject.class_noun}", settings, key, prepare)
    finally:
        for a in applied:
            a.uninstall()  # the next concept starts from the base as it was
    return out


def planned_images(row: Row, subject: EvalSubject, settings: EvalSettings) -> int:
    """The images a row draws (or finds in the cache) for a subject: the progress bar's share of it."""
    prompts = len(subject.prompts[: settings.max_prompts] if settings.max_prompts else subject.prompts)
    return (prompts + row.draws_drift) * settings.images_per_prompt


def run_subject(
    row: Row,
    subject: EvalSubject,
    res: RowResult,
    handle: BaseHandle,
    cache: ImageCache,
    enc: Encoders,
    cache_root: Path,
    settings: EvalSettings,
    method_config: dict | None,
) -> None:
    """One row on one subject: personalize (or reuse), draw, score; the results go into `res`."""
    t0 = time.perf_counter()
    concept = row.concept
    if row.method is not None and concept is None:
        config = (method_config or {}) | dict(row.config)
        concept, res.concepts[subject.name] = personalize_cached(row.method, subject, handle, cache_root, config)
    if concept is not None:
        res.layout_steps = layout_steps_of(row, settings, read_manifest(concept))
    images = row_images(row, subject, handle, cache, settings, concept)
    res.per_subject[subject.name] = score_subject(subject, images, enc)
    res.images[subject.name] = {k: [str(p) for p in v] for k, v in images.items()}
    res.seconds[subject.name] = round(time.perf_counter() - t0, 2)


def run_eval(
    rows: list[Row],
    subjects: list[EvalSubject],
    enc: Encoders,
    cache_root: Path,
    settings: EvalSettings,
    base: str | None = None,
    device: str = "auto",
    method_config: dict | None = None,
) -> dict:
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
    plan = [(row, row.subjects(subjects)) for row in rows]  # a concept given for another subject fails here
    total = sum(planned_images(row, s, settings) for row, mine in plan for s in mine)
    with progress.task_bar(total, "eval"):
        for row, mine in plan:
            res = results[row.name] = RowResult(row.name, layout_steps=layout_steps_of(row, settings))
            for i, subject in enumerate(mine):
                progress.status(row=row.name, subject=f"{i + 1}/{len(mine)} {subject.name}")
                run_subject(row, subject, res, handle, cache, enc, cache_root, settings, method_config)
    return {
        "settings": asdict(settings),
        "base": str(base_path),
        "base_fingerprint": handle.fingerprint,
        "world": all(s.world is not None for s in subjects),
        "subjects": [{"name": s.name, "class_noun": s.class_noun, "kind": s.kind} for s in subjects],
        "encoders": {k: getattr(getattr(enc, k), "name", None) for k in ("clip", "dino", "face")},
        "probes": probe_digests(enc.probes.folder) if enc.probes is not None else None,
        "rows": {
            r: {
                "mean": aggregate(v.per_subject),
                "per_subject": v.per_subject,
                "images": v.images,
                "concepts": v.concepts,
                "seconds": v.seconds,
                "layout_steps": v.layout_steps,
                "time_to_fidelity": time_to_fidelity(v.concepts, FIDELITY_THRESHOLD) if v.concepts else None,
            }
            for r, v in results.items()
        },
        "references": references,
        "cache": {"hits": cache.hits, "misses": cache.misses},
        "seconds": round(time.perf_counter() - t_start, 2),
    }


# the protocol's public names, wherever they live
__all__ = [
    "DESCRIBED",
    "FIDELITY_THRESHOLD",
    "LOWER",
    "UPPER",
    "BaseHandle",
    "Encoders",
    "EvalSettings",
    "ImageCache",
    "Row",
    "RowResult",
    "build_encoders",
    "personalize_cached",
    "row_images",
    "run_eval",
    "score_subject",
    "time_to_fidelity",
    "world_measures",
]
