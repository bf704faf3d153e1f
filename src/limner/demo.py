"""`limner demo`: personalize a held-out world subject from its 5 reference images, draw it in 4
contexts it was never shown in, and score the result against the base model's class-only prompt.

A tuning method trains on the 5 references (DreamBooth: about two minutes on a CPU); an encoder method
encodes them with its pretrained adapter (the one limner ships for the world, or `adapter`), in seconds."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from limner.errors import LimnerError
from limner.io import write_json_atomic

# the demo's one choice of method: the best world-bench subject fidelity per minute of training
# (docs/world-bench/results.md), for half its default 300 steps (duo_ball: subject fidelity 0.999 against
# 0.975 at 300, in 139 s of training against 325 s on a slow 2-core machine: within the demo's 5 minutes)
DEFAULT_METHOD, DEFAULT_METHOD_STEPS = "dreambooth", 150
DEFAULT_SUBJECT, DEFAULT_PERSON = "duo_ball", "ada"  # an identity method's demo draws a held-out person


def label_strip(text: str, width: int, height: int = 14) -> Image.Image:
    im = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(im).text((2, 1), text, fill=(0, 0, 0))
    return im


def new_contexts(subject, n: int = 4) -> list:
    """n prompts that put the subject where its references never showed it. A world subject's 5
    references cover 5 of the 8 places, so an object also gets a hat in the first unseen place."""
    from limner.world import vocab
    from limner.world.bench import BenchPrompt

    unseen = [c for c in vocab.CONTEXTS if c not in subject.meta["contexts"]]
    article = "a portrait of a {} " if subject.kind == "identity" else "a {} "
    prompts = [BenchPrompt(article + vocab.CONTEXTS[c], "recontextualisation", context=c) for c in unseen]
    if subject.kind != "identity":
        prompts += [
            BenchPrompt(f"a {{}} with a hat {vocab.CONTEXTS[c]}", "accessorisation", context=c, accessory="hat")
            for c in unseen
        ]
    return prompts[:n]


def run_demo(
    out: Path,
    subject_name: str | None = None,
    method_name: str = DEFAULT_METHOD,
    steps: int | None = None,
    images_per_prompt: int = 2,
    device: str = "auto",
    seed: int = 0,
    adapter: str | Path | None = None,
) -> dict:
    from dataclasses import replace

    from limner.concepts import read_manifest
    from limner.conditioning import apply_concepts, concept_prompt
    from limner.encoders import WorldFaceEmbedder
    from limner.evaluation.protocol import Encoders, world_measures
    from limner.evaluation.subjects import world_subjects
    from limner.generation import GenerationSettings, generate, make_grid, prepare_output
    from limner.methods import get_method
    from limner.methods.adapter import AdapterMethod
    from limner.models.loading import WORLD_PROBES, load_base
    from limner.world.probes import Probes

    method = get_method(method_name)
    person = method.family == "identity"
    subject_name = (subject_name or (DEFAULT_PERSON if person else DEFAULT_SUBJECT)).removeprefix("world:")
    (subject,) = world_subjects(f"world:{subject_name}")
    if person and subject.kind != "identity":
        from limner.world.heldout import IDENTITIES

        raise LimnerError(
            f"--subject {subject_name}: {method_name} personalizes a person; give one of the held-out people "
            f"({', '.join(h.name for h in IDENTITIES)})"
        )
    overrides: dict = {}
    train_cfg = method.default_train_config()
    if train_cfg is not None:  # checked (--steps 0 refused) before the base loads
        overrides["train"] = replace(
            train_cfg,
            seed=seed,
            max_steps=steps
            if steps is not None
            else (DEFAULT_METHOD_STEPS if method_name == DEFAULT_METHOD else train_cfg.max_steps),
        )
    trainable = load_base(device=device, dtype="fp32")
    encodes = isinstance(method, AdapterMethod)
    if encodes:  # before anything is written: the adapter it encodes with (the world's shipped one by default)
        if steps is not None:
            raise LimnerError(f"--steps: {method_name} does not train, it encodes the references with its adapter")
        overrides["adapter"] = method.adapter_for(trainable, adapter)
    elif adapter is not None:
        raise LimnerError(f"--adapter: {method_name} trains on the references and reads no pretrained adapter")
    prepare_output(out)
    t0 = time.perf_counter()
    # 1. Personalize from the 5 references: train, or encode with the pretrained adapter
    concept = method.personalize(trainable, subject, out / "concept", **overrides)
    train_s = time.perf_counter() - t0
    # 2. Four contexts the references never showed
    prompts = new_contexts(subject)
    base = load_base(device=device)
    applied = apply_concepts(base, [concept])
    lower = load_base(device=device)
    probes = Probes(WORLD_PROBES)
    enc = Encoders(
        clip=None, face=WorldFaceEmbedder(WORLD_PROBES) if subject.kind == "identity" else None, probes=probes
    )
    rows, scores = (
        [],
        {
            "personalized": {"subject_fidelity": [], "prompt_fidelity": []},
            "base_class_prompt": {"subject_fidelity": [], "prompt_fidelity": []},
        },
    )
    t1 = time.perf_counter()
    for p in prompts:
        s = GenerationSettings(
            concept_prompt(concept, p.template), num_images=images_per_prompt, seed=seed, batch_size=images_per_prompt
        )
        ims = generate(base, s, conditioning=applied.condition(s.prompt, s.steps)).images
        base_ims = generate(lower, replace(s, prompt=p.template.format(subject.class_noun))).images
        for key, batch in (("personalized", ims), ("base_class_prompt", base_ims)):
            fid, pf = world_measures(subject, p, batch, enc)
            scores[key]["subject_fidelity"] += [float(x) for x in fid]
            scores[key]["prompt_fidelity"] += [float(x) for x in pf]
        rows.append((s.prompt, ims))
    gen_s = time.perf_counter() - t1
    # 3. A grid: references on top, then one row per new context
    refs = [Image.fromarray(im) for im in subject.images]
    width = max(len(refs), images_per_prompt) * refs[0].width
    parts = [label_strip(f"{subject_name}: 5 reference images", width), make_grid(refs, cols=len(refs))]
    for prompt, ims in rows:
        parts += [label_strip(prompt, width), make_grid(ims, cols=images_per_prompt)]
    grid = Image.new("RGB", (width, sum(p.height for p in parts)), "white")
    y = 0
    for p in parts:
        grid.paste(p, (0, y))
        y += p.height
    grid = grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST)
    grid_path = out / "demo-grid.png"
    grid.save(grid_path)
    summary = {k: {m: round(float(np.mean(v)), 3) for m, v in d.items()} for k, d in scores.items()}
    record = {
        "subject": subject_name,
        "method": method_name,
        "family": method.family,
        "encoded": encodes,
        "concept": str(concept),
        "references_used": references_used(read_manifest(concept), len(subject.images)),
        "prompts": [r[0] for r in rows],
        "scores": summary,
        "train_seconds": round(train_s, 1),
        "generate_seconds": round(gen_s, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "grid": str(grid_path),
    }
    write_json_atomic(out / "scores.json", record)
    return record


def references_used(manifest: dict, given: int) -> int:
    """How many of the references the concept was made from (an identity method may take fewer: PhotoMaker stacks
    at most 4, StoryMaker reads a character's first picture)."""
    n = manifest.get("num_references")
    n = n[0] if isinstance(n, list) and n else n
    return n if isinstance(n, int) and 0 < n <= given else given


def format_summary(record: dict) -> str:
    s = record["scores"]
    if record.get("encoded"):  # an encoder method: no training, seconds
        n = record.get("references_used", 5)
        used = "5 references" if n == 5 else f"{n} of its 5 references"
        learned = (
            f"{record['method']} encoded {record['subject']}'s {used} in {record['train_seconds']:.1f} s, with "
            f"no training ({DEFAULT_METHOD} trains {DEFAULT_METHOD_STEPS} steps on them: `limner demo --method "
            f"{DEFAULT_METHOD}`)."
        )
    else:
        learned = f"{record['method']} learned {record['subject']} in {record['train_seconds']:.0f} s."
    return (
        f"{learned} Subject fidelity {s['personalized']['subject_fidelity']:.2f} (base model, class prompt: "
        f"{s['base_class_prompt']['subject_fidelity']:.2f}); prompt fidelity "
        f"{s['personalized']['prompt_fidelity']:.2f}.\n"
        f"Grid: {record['grid']}  Scores: {Path(record['grid']).parent / 'scores.json'}"
    )
