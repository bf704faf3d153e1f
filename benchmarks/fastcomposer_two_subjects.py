"""FastComposer's headline on the world bench: two subjects in one image from one prompt, one reference each.

Pairs of the bench's held-out object subjects (never in the pretraining stream) are drawn side by side from
"a ball <|image|> on the left and a cup <|image|> on the right on the beach", each subject encoded from one of
its references. The world's subject probe reads each half of every image (a square around where the prompt puts
the subject, scaled to the probe's 64 px): both recognised means each half's most likely subject among the 12 is
its own; blending is the probability the probe gives the *other* subject of the pair in a half. Two reference
rows frame the numbers: `render` (the two subjects rendered side by side: what a perfect model would draw) and
`base` (the base from the same prompt without triggers: the classes, no subject).

    python benchmarks/fastcomposer_two_subjects.py --out docs/world-bench-fastcomposer [--adapter DIR] [-n 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from limner.conditioning import apply_concepts
from limner.generation import GenerationSettings, generate
from limner.methods import get_method
from limner.models.loading import load_base
from limner.world import vocab
from limner.world.bench import SUBJECTS, subject_object
from limner.world.probes import Probes
from limner.world.render import Scene, render

TRIGGER = "<|image|>"
CONTEXTS = ("beach", "snow", "grass", "city")
# (left x0, right x0), top, side: squares around where "on the left" / "on the right" put a subject in 64 px
WINDOWS, TOP, SIDE = (0, 28), 20, 36


def pairs(n: int) -> list[tuple]:
    """n pairs of bench subjects of different classes, each subject in at most two pairs."""
    out, used = [], {}
    for i, a in enumerate(SUBJECTS):
        for b in SUBJECTS[i + 1 :]:
            if a.cls != b.cls and used.get(a.name, 0) < 2 and used.get(b.name, 0) < 2 and len(out) < n:
                out.append((a, b))
                used[a.name], used[b.name] = used.get(a.name, 0) + 1, used.get(b.name, 0) + 1
    return out


def halves(image: np.ndarray) -> list[np.ndarray]:
    """The left and right subject windows, each scaled to 64 px."""
    return [
        np.asarray(Image.fromarray(image[TOP : TOP + SIDE, x : x + SIDE]).resize((64, 64), Image.BICUBIC))
        for x in WINDOWS
    ]


def read(probes: Probes, images: list[np.ndarray], pair: tuple) -> dict:
    """Per image: each half's probability of its own subject and of the other one, and whether both are recognised."""
    windows = np.stack([w for im in images for w in halves(im)])
    probs, names = probes.subject_probabilities(windows)
    own = [names.index(pair[0].name), names.index(pair[1].name)]
    rows = []
    for k in range(len(images)):
        left, right = probs[2 * k], probs[2 * k + 1]
        rows.append(
            {
                "own": [float(left[own[0]]), float(right[own[1]])],
                "other": [float(left[own[1]]), float(right[own[0]])],
                "both": bool(int(left.argmax()) == own[0] and int(right.argmax()) == own[1]),
                "either": bool(int(left.argmax()) == own[0] or int(right.argmax()) == own[1]),
            }
        )
    return {
        "both_recognised": float(np.mean([r["both"] for r in rows])),
        "one_recognised": float(np.mean([r["either"] for r in rows])),
        "own_probability": float(np.mean([r["own"] for r in rows])),
        "other_probability": float(np.mean([r["other"] for r in rows])),
        "images": rows,
    }


def rendered(pair: tuple, context: str, n: int, seed: int) -> list[np.ndarray]:
    """The two subjects drawn by the world's renderer, left and right, as the base saw two objects."""
    images = []
    for k in range(n):
        rng = np.random.default_rng([seed, k, 99])
        entities = [subject_object(s, rng, x=x, scale=(0.15, 0.22)) for s, x in zip(pair, (0.27, 0.73))]
        images.append(render(Scene(context, entities, variant=int(rng.integers(2**31)))).image)
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default=None, help="a FastComposer adapter folder (default: the shipped one)")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("-n", "--images", type=int, default=4, help="images per pair")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--references", type=int, default=1, help="references per subject")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from limner.evaluation.subjects import world_subjects

    base = load_base(None, device="cpu", dtype="float32")
    probes = Probes(Path(base.path).parent / "probes")
    method = get_method("fastcomposer")
    adapter = method.adapter_for(base, args.adapter)
    subjects = {s.name: s for s in world_subjects("world:objects")}
    results: dict = {"settings": vars(args) | {"out": str(args.out), "adapter": str(adapter)}, "pairs": []}
    grid = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        concepts = {}
        for name, subject in subjects.items():
            concepts[name] = method.personalize(
                base, subject, Path(tmp) / name, adapter=adapter, num_references=args.references, alpha=args.alpha
            )
        for i, pair in enumerate(pairs(args.pairs)):
            context = CONTEXTS[i % len(CONTEXTS)]
            where = vocab.CONTEXTS[context]
            prompt = f"a {pair[0].cls} {TRIGGER} on the left and a {pair[1].cls} {TRIGGER} on the right {where}"
            plain = prompt.replace(f" {TRIGGER}", "")
            settings = GenerationSettings(prompt=prompt, num_images=args.images, seed=args.seed, steps=args.steps)
            with apply_concepts(base, [concepts[pair[0].name], concepts[pair[1].name]]) as applied:
                drawn = [
                    np.asarray(im)
                    for im in generate(base, settings, None, applied.condition(prompt, args.steps)).images
                ]
            base_images = [np.asarray(im) for im in generate(base, replace(settings, prompt=plain)).images]
            row = {
                "subjects": [pair[0].name, pair[1].name],
                "prompt": prompt,
                "fastcomposer": read(probes, drawn, pair),
                "base": read(probes, base_images, pair),
                "render": read(probes, rendered(pair, context, args.images, args.seed), pair),
            }
            results["pairs"].append(row)
            grid.append(np.concatenate(drawn, axis=1))
            print(f"{pair[0].name} + {pair[1].name}: both recognised {row['fastcomposer']['both_recognised']:.2f}")
    rows = ("render", "fastcomposer", "base")
    keys = ("both_recognised", "one_recognised", "own_probability", "other_probability")
    results["mean"] = {r: {k: float(np.mean([p[r][k] for p in results["pairs"]])) for k in keys} for r in rows}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "two_subjects.json").write_text(json.dumps(results, indent=1))
    Image.fromarray(np.concatenate(grid, axis=0)).resize(
        (64 * args.images * 2, 64 * len(grid) * 2), Image.NEAREST
    ).save(args.out / "two_subjects.png")
    lines = [
        "| row | both subjects recognised | at least one | P(own subject) per half | P(other subject) per half |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        m = results["mean"][r]
        lines.append(
            f"| {r} | {m['both_recognised']:.2f} | {m['one_recognised']:.2f} | {m['own_probability']:.3f} | {m['other_probability']:.3f} |"
        )
    (args.out / "two_subjects.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
