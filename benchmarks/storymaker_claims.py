"""StoryMaker's claims on the world, measured on the 8 held-out people (docs/world-bench-identities/storymaker.md).

clothes   each person's reference portrait drawn in a known shirt colour (a colour the person's bench references do
          not wear, varied over people), then "a portrait of a CLASS CONTEXT" over the 8 contexts, n seeds each: the
          share of generated pictures whose shirt the world's attribute probe reads as the reference's colour. Beside
          it: the bare base from the same prompts (what a shirt colour is by chance) and the probe on renders of the
          person in that shirt and context (the probe's own ceiling).
blending  4 pairs of people, each in its own shirt colour, both references given: "a CLASS1 on the left and a CLASS2
          on the right CONTEXT" over 4 contexts x n seeds. Per picture, the faces the world analyser finds; "both
          recognised, each in its own half": the face nearest the left edge is nearer (identity cosine) to the left
          person's reference than to the right one's, and the face nearest the right edge to the right one's (a
          picture with fewer than two faces fails). Clothes per half: the attribute probe on each half (the other half
          grey) reads that person's shirt colour. Given several adapters (with and without the attention-map loss),
          each is measured on the same prompts and seeds; renders of the pairs give the readings' ceiling.
pose      each person's reference portrait, then 3 full-figure skeletons of that person (three places and arm poses,
          drawn from renders by limner.world.pose) as `pose_image` with the world pose ControlNet: "a CLASS CONTEXT",
          n seeds each, with the skeleton and without it (same prompts and seeds). Per picture the world analyser's
          largest face: its eyes' and nose's mean against the skeleton's (pixels; the share within 4 px), its identity
          cosine to the reference's face, and whether the probe reads the reference's shirt colour.
overhead  encode seconds per person (the concept's own timing, adapter loaded each time), and generation latency with
          one character against the bare base: one process, the two alternating, the fastest of 6 batches of 4.

    python benchmarks/storymaker_claims.py clothes|blending|pose|overhead [ADAPTER ...] [--n 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from limner.conditioning import apply_concepts
from limner.encoders.faces import face_analysis, largest_face
from limner.generation import GenerationSettings, generate
from limner.methods import Subject, get_method
from limner.models.loading import WORLD_PROBES, load_base
from limner.world import vocab
from limner.world.heldout import IDENTITIES
from limner.world.probes import Probes
from limner.world.render import CharacterSpec, Scene, render

SHIRTS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "white"]
PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7)]
PAIR_CONTEXTS = ["grass", "beach", "city", "snow"]


def portrait(k: int, shirt: str, context: str = "room", variant: int = 1) -> np.ndarray:
    h = IDENTITIES[k]
    spec = CharacterSpec(cls=h.cls, identity=h.identity, shirt_colour=shirt, framing="portrait")
    return render(Scene(context, [spec], variant=variant, caption="x")).image


def pair_render(a: int, b: int, context: str, variant: int) -> np.ndarray:
    specs = [
        CharacterSpec(
            cls=IDENTITIES[k].cls,
            identity=IDENTITIES[k].identity,
            shirt_colour=SHIRTS[k],
            framing="full",
            x=x,
            y=0.46,
            scale=0.85,
        )
        for k, x in ((a, 0.25), (b, 0.75))
    ]
    return render(Scene(context, specs, variant=variant, caption="x")).image


def colours(probes: Probes, images: list[np.ndarray]) -> list[str]:
    return probes.read_attributes(np.stack(images), heads=("colour",))["colour"]


def halves(image: np.ndarray) -> list[np.ndarray]:
    left, right = image.copy(), image.copy()
    w = image.shape[1] // 2
    left[:, w:] = 128
    right[:, :w] = 128
    return [left, right]


def draw(base, prompt: str, n: int, seed: int, concept: Path | None) -> list[np.ndarray]:
    s = GenerationSettings(prompt, num_images=n, steps=25, batch_size=n, seed=seed)
    if concept is None:
        return [np.asarray(im) for im in generate(base, s).images]
    with apply_concepts(base, [concept]) as applied:
        return [np.asarray(im) for im in generate(base, s, conditioning=applied.condition(prompt, s.steps)).images]


def clothes(base, adapters: list[str], n: int) -> dict:
    method, probes = get_method("storymaker"), Probes(WORLD_PROBES)
    rows: dict[str, list[bool]] = {"renders": [], "base": []} | {a: [] for a in adapters}
    for k, h in enumerate(IDENTITIES):
        shirt = SHIRTS[k]
        reference = portrait(k, shirt)
        concepts = {
            a: method.personalize(base, Subject(h.name, h.cls, [reference]), tempfile.mkdtemp(), adapter=a)
            for a in adapters
        }
        for c, context in enumerate(vocab.CONTEXTS):
            prompt = f"a portrait of a {h.cls} {vocab.CONTEXTS[context]}"
            rows["renders"] += [r == shirt for r in colours(probes, [portrait(k, shirt, context, 1 + c)])]
            rows["base"] += [r == shirt for r in colours(probes, draw(base, prompt, n, 100 * k + c, None))]
            for a in adapters:
                rows[a] += [r == shirt for r in colours(probes, draw(base, prompt, n, 100 * k + c, concepts[a]))]
    return {name: {"shirt_kept": float(np.mean(v)), "pictures": len(v)} for name, v in rows.items()}


def recognised(analyser, image: np.ndarray, refs: list[torch.Tensor]) -> bool:
    faces = analyser.analyse([image])[0]
    if len(faces) < 2:
        return False
    faces = sorted(faces, key=lambda f: (f.box[0] + f.box[2]) / 2)
    left, right = faces[0].embedding, faces[-1].embedding
    return bool(left @ refs[0] > left @ refs[1] and right @ refs[1] > right @ refs[0])


def blending(base, adapters: list[str], n: int) -> dict:
    method, probes, analyser = get_method("storymaker"), Probes(WORLD_PROBES), face_analysis(None)
    stats = {
        name: {"both_recognised": [], "shirts_in_place": [], "faces_found_2": []} for name in ["renders", *adapters]
    }
    for a, b in PAIRS:
        refs_pictures = [portrait(a, SHIRTS[a]), portrait(b, SHIRTS[b])]
        refs = [analyser.analyse([p])[0][0].embedding for p in refs_pictures]
        people = [Subject(IDENTITIES[k].name, IDENTITIES[k].cls, [p]) for k, p in zip((a, b), refs_pictures)]
        concepts = {x: method.personalize(base, people, tempfile.mkdtemp(), adapter=x) for x in adapters}
        for c, context in enumerate(PAIR_CONTEXTS):
            prompt = (
                f"a {IDENTITIES[a].cls} on the left and a {IDENTITIES[b].cls} on the right {vocab.CONTEXTS[context]}"
            )
            pictures = {"renders": [pair_render(a, b, context, 1 + c + 10 * i) for i in range(n)]}
            pictures |= {x: draw(base, prompt, n, 1000 * a + c, concepts[x]) for x in adapters}
            for name, images in pictures.items():
                for image in images:
                    stats[name]["both_recognised"].append(recognised(analyser, image, refs))
                    stats[name]["faces_found_2"].append(len(analyser.analyse([image])[0]) >= 2)
                    read = colours(probes, halves(image))
                    stats[name]["shirts_in_place"].append(read == [SHIRTS[a], SHIRTS[b]])
    return {
        name: {k: float(np.mean(v)) for k, v in s.items()} | {"pictures": len(s["both_recognised"])}
        for name, s in stats.items()
    }


POSE_PLACES = ((0.3, (20.0, 60.0)), (0.5, (120.0, 120.0)), (0.7, (60.0, 150.0)))
POSE_CONTEXTS = ["beach", "city", "snow"]


def pose(base, adapters: list[str], n: int) -> dict:
    from limner.images import write_png
    from limner.world.pose import head_error, pose_picture, skeletons_of

    method, probes, analyser = get_method("storymaker"), Probes(WORLD_PROBES), face_analysis(None)
    stats = {f"{a} {mode}": {"error": [], "found": [], "identity": [], "shirt": []} for a in adapters for mode in "+-"}
    side, scratch = base.resolution, tempfile.mkdtemp()
    for k, h in enumerate(IDENTITIES):
        reference = portrait(k, SHIRTS[k])
        reference_id = analyser.analyse([reference])[0][0].embedding
        for p, ((x, arms), context) in enumerate(zip(POSE_PLACES, POSE_CONTEXTS)):
            spec = CharacterSpec(
                cls=h.cls, identity=h.identity, shirt_colour=SHIRTS[k], framing="full", x=x, arm_angles=arms
            )
            (skeleton,) = skeletons_of(render(Scene(context, [spec], variant=1 + p, caption="x")).entities)
            folder = Path(tempfile.mkdtemp(dir=scratch))
            write_png(pose_picture([skeleton], side), folder / "skeleton.png")
            prompt = f"a {h.cls} {vocab.CONTEXTS[context]}"
            for i, a in enumerate(adapters):
                person = Subject(h.name, h.cls, [reference])
                for mode, extra in (("+", {"pose_image": str(folder / "skeleton.png")}), ("-", {})):
                    concept = method.personalize(base, person, folder / f"{mode}{i}", adapter=a, **extra)
                    images = draw(base, prompt, n, 100 * k + p, concept)
                    row = stats[f"{a} {mode}"]
                    row["shirt"] += [r == SHIRTS[k] for r in colours(probes, images)]
                    for image in images:
                        face = largest_face(analyser.analyse([image])[0])
                        row["found"].append(face is not None)
                        if face is not None:
                            row["error"].append(head_error(face.keypoints, skeleton, side))
                            row["identity"].append(float(face.embedding @ reference_id))
    shutil.rmtree(scratch)
    out = {}
    for name, row in stats.items():
        errors = np.array(row["error"])
        found = len(errors) > 0
        out[name] = {
            "pictures": len(row["found"]),
            "faces_found": round(float(np.mean(row["found"])), 3),
            "face_error_px": round(float(errors.mean()), 2) if found else None,
            "within_4px": round(float((errors <= 4).mean()), 3) if found else None,
            "identity_cosine": round(float(np.mean(row["identity"])), 3) if found else None,
            "shirt_kept": round(float(np.mean(row["shirt"])), 3),
        }
    return out


def overhead(base, adapters: list[str], n: int) -> dict:
    method = get_method("storymaker")
    adapter = adapters[0] if adapters else None
    seconds = []
    for k, h in enumerate(IDENTITIES):
        concept = method.personalize(
            base, Subject(h.name, h.cls, [portrait(k, SHIRTS[k])]), tempfile.mkdtemp(), adapter=adapter
        )
        seconds.append(json.loads((Path(concept) / "limner.json").read_text())["seconds"])
    prompt = f"a portrait of a {IDENTITIES[0].cls} on the beach"
    s = GenerationSettings(prompt, num_images=4, steps=25, batch_size=4, seed=0)
    bare, story = [], []
    generate(base, s)
    for _ in range(6):
        t = time.perf_counter()
        generate(base, s)
        bare.append(time.perf_counter() - t)
        with apply_concepts(base, [concept]) as applied:
            cond = applied.condition(prompt, s.steps)
            t = time.perf_counter()
            generate(base, s, conditioning=cond)
            story.append(time.perf_counter() - t)
    b, f = min(bare) / 4, min(story) / 4
    return {
        "encode_seconds_per_person": {"mean": float(np.mean(seconds)), "max": float(np.max(seconds))},
        "bare_s_per_image": round(b, 4),
        "storymaker_s_per_image": round(f, 4),
        "overhead_percent": round(100 * (f / b - 1), 1),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("claim", choices=("clothes", "blending", "pose", "overhead"))
    parser.add_argument("adapters", nargs="*")
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    base = load_base(None)
    adapters = args.adapters or [str(get_method("storymaker").adapter_for(base, None))]
    claims = {"clothes": clothes, "blending": blending, "pose": pose, "overhead": overhead}
    result = claims[args.claim](base, adapters, args.n)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
