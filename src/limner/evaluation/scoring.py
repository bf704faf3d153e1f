"""Scoring generated images: DreamBench's CLIP-I, CLIP-T, DINO and face measures, and on the world the
ground-truth measures read by probes trained on renderer ground truth (subject and prompt fidelity,
language drift)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from limner.errors import LimnerError
from limner.evaluation.metrics import diversity, mean_similarity_to_references, text_alignment
from limner.evaluation.rows import class_prompt
from limner.evaluation.subjects import EvalSubject
from limner.images import at_64px
from limner.world.bench import BenchPrompt


@dataclass
class Encoders:
    clip: object  # .images(list) / .texts(list) -> normalised embeddings
    dino: object | None = None
    face: object | None = None  # .faces(list) -> (embeddings, found)
    probes: object | None = None  # world Probes, for ground-truth measures


def build_encoders(
    world: bool, base: str | None, clip: Path | None, dino: Path | None, face: Path | None, device: str
) -> Encoders:
    """The encoders that score images: the world's CLIP, identity embedder and probes on the world
    base; local CLIP / DINO / insightface folders on real subjects."""
    from limner.encoders import CLIPEncoder, DINOEncoder, InsightFaceEmbedder, WorldCLIP, WorldFaceEmbedder
    from limner.models.loading import WORLD_BASE, WORLD_PROBES, resolve_device
    from limner.world.probes import Probes

    dev = str(resolve_device(device))
    if clip is None and not (world and base is None):
        raise LimnerError(
            "scoring real images needs --clip PATH, a local CLIPModel folder (e.g. openai/clip-vit-large-patch14 "
            "saved with save_pretrained)"
        )
    clip_enc = CLIPEncoder(clip, dev) if clip else WorldCLIP(WORLD_BASE, dev)
    face_enc = InsightFaceEmbedder(face, dev) if face else (WorldFaceEmbedder(WORLD_PROBES) if world else None)
    return Encoders(
        clip=clip_enc,
        dino=DINOEncoder(dino, dev) if dino else None,
        face=face_enc,
        probes=Probes(WORLD_PROBES) if world else None,
    )


def load_rgb(paths: list[Path]) -> list[Image.Image]:
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def asked(prompt: BenchPrompt) -> dict[str, str]:
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
            if subject.kind == "object":
                add("class_accuracy", drawn_as_class(ims, subject.class_noun, enc))
    if enc.probes is not None and subject.world is not None and "__drift__" in images:
        drift_ims = load_rgb(images["__drift__"])
        fid, _ = world_measures(subject, None, drift_ims, enc)
        add("language_drift", fid)
        add("class_prompt_accuracy", drawn_as_class(drift_ims, subject.class_noun, enc))
    return {k: nan_mean(v) for k, v in acc.items() if v}


def drawn_as_class(images: list[Image.Image], class_noun: str, enc: Encoders) -> list[bool]:
    """Whether each image is read as `class_noun` by the attributes probe's class head: the subject's form, which
    the subject probe (trained to tell subjects apart by their looks) does not weigh on its own."""
    return [drawn == class_noun for drawn in enc.probes.read("attributes", at_64px(images))["class"]]


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
    want = asked(prompt)
    got = enc.probes.read_attributes(arr, tuple(want))
    hits = sum((np.array(got[head]) == value).astype(float) for head, value in want.items())
    return fidelity, hits / max(1, len(want))


def world_fidelity_score(subject: EvalSubject):
    """images -> mean subject fidelity, read by the world's probes (for validation during training)."""
    from limner.encoders import WorldFaceEmbedder
    from limner.models.loading import WORLD_PROBES
    from limner.world.probes import Probes

    enc = Encoders(
        clip=None,
        face=WorldFaceEmbedder(WORLD_PROBES) if subject.kind == "identity" else None,
        probes=Probes(WORLD_PROBES),
    )
    return lambda images: float(np.mean(world_measures(subject, None, images, enc)[0]))


def time_to_fidelity(concepts: dict[str, dict], threshold: float) -> dict:
    """Training seconds until validation first reached `threshold`, per subject, and their mean over
    the subjects that reached it."""
    times = {}
    for subject, meta in concepts.items():
        hit = [v["seconds"] for v in meta.get("validation", []) if v["score"] >= threshold]
        times[subject] = hit[0] if hit else None
    reached = [t for t in times.values() if t is not None]
    return {
        "threshold": threshold,
        "per_subject": times,
        "reached": len(reached),
        "of": len(times),
        "mean_seconds": float(np.mean(reached)) if reached else None,
    }


def aggregate(per_subject: dict[str, dict[str, float]]) -> dict[str, float]:
    names = sorted({k for v in per_subject.values() for k in v})
    return {k: nan_mean([v[k] for v in per_subject.values() if k in v]) for k in names}


def nan_mean(values) -> float:
    """The mean of what is not NaN; NaN, without numpy's warning, where nothing is (e.g. prompt fidelity over
    prompts that ask for nothing the probe reads)."""
    a = np.asarray(values, dtype=float).ravel()
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else float("nan")
