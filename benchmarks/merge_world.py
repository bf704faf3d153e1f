"""Two Custom Diffusion concepts in one image, on the world: closed-form merge vs joint training.

    python benchmarks/merge_world.py [--left duo_ball --right cross_cup] [--out benchmarks/merge]

Trains Custom Diffusion on each subject separately (modifier tokens <new1>, <new2>), merges the two in
closed form (`limner merge`), trains both jointly as a third variant, and draws "a <new1> ball on the
left and a <new2> cup on the right" in several contexts. Each image is scored by cropping the two
entity positions (where the world puts left and right objects) and asking the subject probe which of
the 12 held-out subjects each crop shows. Bounds in the same run: the base model given the class
nouns (lower) and fresh renders of the two subjects side by side (upper; this also shows what the
crop-and-probe measure can read at best).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CONTEXTS = ("on the beach", "in the snow", "on the grass", "in the city", "at night", "in a room")
IMAGES_PER_CONTEXT = 4
CROP = 32  # px of the 64 px image around each entity


def crops(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The left and right entity regions (the world's two-object layout: x 0.27 / 0.73, y ~0.6), upscaled."""
    h, w = image.shape[:2]
    size = CROP * w // 64
    top = min(h - size, max(0, int(0.6 * h) - size // 2))
    out = []
    for cx in (0.27, 0.73):
        left = min(w - size, max(0, int(cx * w) - size // 2))
        region = Image.fromarray(image[top:top + size, left:left + size]).resize((w, h), Image.BICUBIC)
        out.append(np.asarray(region))
    return out[0], out[1]


def two_subject_scores(images: list[np.ndarray], left: str, right: str, probes) -> dict[str, float]:
    """P(left subject) on the left crop, P(right subject) on the right crop (among the 12 held-out
    subjects), and the share of images where the probe names both correctly."""
    pairs = [crops(im) for im in images]
    fidelity, named = {}, {}
    for i, (side, subject) in enumerate((("left", left), ("right", right))):
        probs, names = probes.subject_probabilities(np.stack([p[i] for p in pairs]))
        fidelity[side] = float(probs[:, names.index(subject)].mean())
        named[side] = probs.argmax(-1).numpy() == names.index(subject)
    return {"left_fidelity": fidelity["left"], "right_fidelity": fidelity["right"],
            "both_recognised": float((named["left"] & named["right"]).mean())}


def upper_bound_images(left, right, n: int) -> list[np.ndarray]:
    from limner.world import vocab
    from limner.world.bench import subject_object
    from limner.world.render import Scene, render

    contexts = [k for k, v in vocab.CONTEXTS.items() if v in CONTEXTS]
    out = []
    for i in range(n):
        rng = np.random.default_rng([i, 7])
        a, b = subject_object(left, rng, x=0.27, scale=(0.15, 0.22)), subject_object(right, rng, x=0.73, scale=(0.15, 0.22))
        out.append(np.asarray(render(Scene(contexts[i % len(contexts)], [a, b], variant=int(rng.integers(2**31)))).pil()))
    return out


def draw(base, prompts: list[str], seed: int = 0) -> list[np.ndarray]:
    from limner.generation import GenerationSettings, generate

    images = []
    for j, prompt in enumerate(prompts):
        s = GenerationSettings(prompt, num_images=IMAGES_PER_CONTEXT, seed=seed + 100 * j, steps=25, batch_size=IMAGES_PER_CONTEXT)
        images += [np.asarray(im.convert("RGB")) for im in generate(base, s).images]
    return images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--left", default="duo_ball")
    ap.add_argument("--right", default="cross_cup")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "merge")
    ap.add_argument("--work", type=Path, default=Path("/tmp/limner-merge"))
    args = ap.parse_args()
    from limner.evaluation.subjects import world_subjects
    from limner.methods import get_method
    from limner.methods.custom_diffusion import merge
    from limner.models.loading import WORLD_PROBES, load_base
    from limner.world.probes import Probes

    torch.manual_seed(0)
    a, b = world_subjects(f"world:{args.left},{args.right}")
    cd = get_method("custom_diffusion")
    timings, concepts = {}, {}
    for key, subject, token in (("left", a, "<new1>"), ("right", b, "<new2>")):
        folder = args.work / f"cd-{subject.name}"
        t0 = time.perf_counter()
        if not (folder / "limner.json").exists():
            cd.personalize(load_base(None, dtype="fp32"), subject, folder, modifier_token=token)
        concepts[key], timings[f"train {subject.name}"] = folder, round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    merged = merge(load_base(None, dtype="fp32"), [concepts["left"], concepts["right"]], args.work / "merged")
    timings["merge"] = round(time.perf_counter() - t0, 1)
    joint = args.work / "joint"
    t0 = time.perf_counter()
    if not (joint / "limner.json").exists():
        cd.personalize_jointly(load_base(None, dtype="fp32"), [a, b], joint)
    timings["joint training"] = round(time.perf_counter() - t0, 1)

    def prompts(left_phrase: str, right_phrase: str) -> list[str]:
        return [f"a {left_phrase} on the left and a {right_phrase} on the right {c}" for c in CONTEXTS]

    probes = Probes(WORLD_PROBES)
    rows, grids = {}, {}
    n = IMAGES_PER_CONTEXT * len(CONTEXTS)
    grids["upper bound (renders)"] = upper_bound_images(a.world, b.world, n)
    grids["base, class nouns"] = draw(load_base(None), prompts(a.class_noun, b.class_noun))
    for name, folder in (("closed-form merge", merged), ("joint training", joint)):
        base = load_base(None)
        cd.apply(base, folder)
        grids[name] = draw(base, prompts(f"<new1> {a.class_noun}", f"<new2> {b.class_noun}"))
    # each single concept alone in the two-subject prompt: only its own side should match
    for key, folder in concepts.items():
        base = load_base(None)
        cd.apply(base, folder)
        tok = json.loads((folder / "limner.json").read_text())["tokens"][0]
        left = f"{tok} {a.class_noun}" if key == "left" else a.class_noun
        right = f"{tok} {b.class_noun}" if key == "right" else b.class_noun
        grids[f"only {a.name if key == 'left' else b.name} concept"] = draw(base, prompts(left, right))
    for name, images in grids.items():
        rows[name] = two_subject_scores(images, a.name, b.name, probes)

    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"| {a.name} (left) + {b.name} (right) | P(left subject), left crop | P(right subject), right crop | both recognised |",
             "|---|---|---|---|"]
    lines += [f"| {k} | {v['left_fidelity']:.3f} | {v['right_fidelity']:.3f} | {v['both_recognised']:.3f} |" for k, v in rows.items()]
    note = (f"\n{n} images per row ({IMAGES_PER_CONTEXT} seeds x {len(CONTEXTS)} contexts), 25 DPM++ steps, guidance 5. "
            "Chance for a probability is 1/12. Seconds: " + ", ".join(f"{k} {v}" for k, v in timings.items()) +
            ".\nCommand: `python benchmarks/merge_world.py`\n")
    (args.out / "results.md").write_text("\n".join(lines) + "\n" + note)
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "seconds": timings}, indent=1))
    # one row of the grid per variant: the first image of each context
    names = list(grids)
    sheet = Image.new("RGB", (64 * len(CONTEXTS), 64 * len(names)), "white")
    for r, name in enumerate(names):
        for c in range(len(CONTEXTS)):
            sheet.paste(Image.fromarray(grids[name][c * IMAGES_PER_CONTEXT]).resize((64, 64)), (64 * c, 64 * r))
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(args.out / "grid.png")
    print((args.out / "results.md").read_text())
    print("grid rows, top to bottom:", ", ".join(names))


if __name__ == "__main__":
    main()
