"""FastComposer's headline on the world bench: two subjects in one image from one prompt, one reference each.

Pairs of the bench's held-out object subjects (never in the pretraining stream) are drawn side by side from
"a ball <|image|> on the left and a cup <|image|> on the right on the beach", each subject encoded from one of
its references. The world's subject probe reads each half of every image (a square around where the prompt puts
the subject, scaled to the probe's 64 px): both recognised means each half's most likely subject among the 12 is
its own; blending is the probability the probe gives the *other* subject of the pair in a half. Two reference
rows frame the numbers: `render` (the two subjects rendered side by side: what a perfect model would draw) and
`base` (the base from the same prompt without triggers: the classes, no subject), and for objects `described`
(the base told both subjects' looks in its captions' words, "a red and white ball with a blue heart on the left
and ...": how far words alone reach with two subjects, as the evaluation's `described` row for one). With --right-first the prompt
names the right-hand subject first; the row `by_naming_order` then reads the first-named subject on the left, to
tell whether the model placed the subjects by the words or by the order they are named in.
The `context` column is prompt fidelity: the share of images whose context (beach, snow, ...) the world's
attributes probe reads as asked. --subject-boxes columns draws with limner's box attention (each subject's token
confined to its half: limner.adapters.box_attention), not the paper's method.

With --characters the pairs are the bench's held-out people ("a woman <|image|> on the left and a man <|image|> on
the right"), each half read by the world's identity embedder: recognised means the half's embedding is nearest
(by cosine) to its own person's among the 8 people's references (mean of their 5 reference embeddings); the
`own` and `other` columns are then those cosines, not probabilities.

    python benchmarks/fastcomposer_two_subjects.py --out docs/world-bench-fastcomposer [--adapter DIR] [-n 4]
        [--subject-scale 2] [--subject-boxes columns] [--right-first]
    python benchmarks/fastcomposer_two_subjects.py --characters --out DIR [--adapter DIR] [-n 4]
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
from limner.data.multi_subject import CHARACTER_SCALES
from limner.generation import GenerationSettings, generate
from limner.methods import get_method
from limner.methods.fastcomposer import FastComposerSettings
from limner.models.loading import load_base
from limner.world import vocab
from limner.world.bench import IDENTITIES, SUBJECTS, BenchPrompt, described_prompt, subject_object
from limner.world.probes import Probes, embed_identity
from limner.world.render import Scene, render
from limner.world.scenes import random_character

TRIGGER = "<|image|>"
CONTEXTS = ("beach", "snow", "grass", "city")
# (left x0, right x0), top, side: squares around where "on the left" / "on the right" put a subject in 64 px
WINDOWS, TOP, SIDE = (0, 28), 20, 36
# two full-figure people: a square around each head and shirt, where the identity embedder reads renders best
PEOPLE_WINDOWS = (4, 36), 0, 24


def pairs(n: int, characters: bool = False) -> list[tuple]:
    """n pairs of bench subjects of different classes (people: any two), each subject in at most two pairs."""
    out, used = [], {}
    pool = IDENTITIES if characters else SUBJECTS
    for i, a in enumerate(pool):
        for b in pool[i + 1 :]:
            apart = characters or a.cls != b.cls
            if apart and used.get(a.name, 0) < 2 and used.get(b.name, 0) < 2 and len(out) < n:
                out.append((a, b))
                used[a.name], used[b.name] = used.get(a.name, 0) + 1, used.get(b.name, 0) + 1
    return out


def halves(image: np.ndarray, windows=(WINDOWS, TOP, SIDE)) -> list[np.ndarray]:
    """The left and right subject windows, each scaled to 64 px."""
    xs, top, side = windows
    return [
        np.asarray(Image.fromarray(image[top : top + side, x : x + side]).resize((64, 64), Image.BICUBIC)) for x in xs
    ]


class IdentityReader:
    """Each half's cosine to every bench person's mean reference embedding (the world's identity embedder). Two
    full figures in 64 px are too small for it to name one person among 8 (renders: both halves in 0.21), so a half
    is recognised when it is nearer its own person than the pair's other one (renders: both halves in 0.5)."""

    windows, pairwise = PEOPLE_WINDOWS, True

    def __init__(self, probes: Probes, subjects: dict):
        self.net = probes.net("identity")
        self.names = list(subjects)
        means = [embed_identity(self.net, np.stack(subjects[n].images)).float().mean(0) for n in self.names]
        self.references = torch.nn.functional.normalize(torch.stack(means), dim=-1)

    def subject_probabilities(self, windows: np.ndarray) -> tuple[torch.Tensor, list[str]]:
        embeddings = torch.nn.functional.normalize(embed_identity(self.net, windows).float(), dim=-1)
        return embeddings @ self.references.T, self.names


def read(probes, images: list[np.ndarray], pair: tuple) -> dict:
    """Per image: each half's probability (people: cosine) of its own subject and of the other one, and whether both
    are recognised (each half's most likely subject is its own)."""
    windows = np.stack([w for im in images for w in halves(im, getattr(probes, "windows", (WINDOWS, TOP, SIDE)))])
    probs, names = probes.subject_probabilities(windows)
    own = [names.index(pair[0].name), names.index(pair[1].name)]
    candidates = own if getattr(probes, "pairwise", False) else list(range(len(names)))
    rows = []
    for k in range(len(images)):
        left, right = probs[2 * k], probs[2 * k + 1]
        rows.append(
            {
                "own": [float(left[own[0]]), float(right[own[1]])],
                "other": [float(left[own[1]]), float(right[own[0]])],
                "both": bool(_best(left, candidates) == own[0] and _best(right, candidates) == own[1]),
                "either": bool(_best(left, candidates) == own[0] or _best(right, candidates) == own[1]),
            }
        )
    return {
        "both_recognised": float(np.mean([r["both"] for r in rows])),
        "one_recognised": float(np.mean([r["either"] for r in rows])),
        "own_probability": float(np.mean([r["own"] for r in rows])),
        "other_probability": float(np.mean([r["other"] for r in rows])),
        "images": rows,
    }


def _best(scores: torch.Tensor, candidates: list[int]) -> int:
    return candidates[int(scores[candidates].argmax())]


def context_share(probes: Probes, images: list[np.ndarray], context: str) -> float:
    """The share of images whose context the world's attributes probe reads as the prompt's (prompt fidelity)."""
    return float(np.mean([c == context for c in probes.read_attributes(np.stack(images), ("context",))["context"]]))


def rendered(pair: tuple, context: str, n: int, seed: int, characters: bool = False) -> list[np.ndarray]:
    """The two subjects drawn by the world's renderer, left and right, as the base saw two objects (or two people,
    full figures as the pretraining scenes place two)."""
    images = []
    for k in range(n):
        rng = np.random.default_rng([seed, k, 99])
        if characters:
            entities = [
                random_character(rng, x, "full", set(), CHARACTER_SCALES[2], identity=b.identity, cls=b.cls)
                for b, x in zip(pair, (0.25, 0.75))
            ]
        else:
            entities = [subject_object(s, rng, x=x, scale=(0.15, 0.22)) for s, x in zip(pair, (0.27, 0.73))]
        images.append(render(Scene(context, entities, variant=int(rng.integers(2**31)))).image)
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default=None, help="a FastComposer adapter folder (default: the shipped one)")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("-n", "--images", type=int, default=4, help="images per pair")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--subject-scale", type=float, default=1.0, help="limner's subject_scale (1: the paper's)")
    parser.add_argument(
        "--right-first",
        action="store_true",
        help="name the right-hand subject first ('a box <|image|> on the right and a ball <|image|> on the left')",
    )
    parser.add_argument("--references", type=int, default=1, help="references per subject")
    parser.add_argument(
        "--subject-boxes",
        default=None,
        help="limner's box attention: 'columns' (each subject its half; None: the paper's)",
    )
    parser.add_argument(
        "--box-boost",
        type=float,
        default=FastComposerSettings().box_boost,
        help="with --subject-boxes, the logit added inside a box",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--characters", action="store_true", help="pairs of the bench's people, not its objects")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from limner.evaluation.subjects import world_subjects

    base = load_base(None, device="cpu", dtype="float32")
    probes = Probes(Path(base.path).parent / "probes")
    method = get_method("fastcomposer")
    adapter = method.adapter_for(base, args.adapter)
    subjects = {s.name: s for s in world_subjects("world:identities" if args.characters else "world:objects")}
    reader = IdentityReader(probes, subjects) if args.characters else probes
    results: dict = {"settings": vars(args) | {"out": str(args.out), "adapter": str(adapter)}, "pairs": []}
    grid = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        concepts = {}
        for name, subject in subjects.items():
            concepts[name] = method.personalize(
                base,
                subject,
                Path(tmp) / name,
                adapter=adapter,
                num_references=args.references,
                alpha=args.alpha,
                subject_scale=args.subject_scale,
                subject_boxes=args.subject_boxes,
                box_boost=args.box_boost,
            )
        for i, pair in enumerate(pairs(args.pairs, args.characters)):
            context = CONTEXTS[i % len(CONTEXTS)]
            where = vocab.CONTEXTS[context]
            sides = [(pair[0], "left"), (pair[1], "right")]
            if args.right_first:  # the same placement asked with the right-hand subject named first
                sides.reverse()
            prompt = " and ".join(f"a {s.cls} {TRIGGER} on the {side}" for s, side in sides) + f" {where}"
            named = [s for s, _ in sides]
            plain = prompt.replace(f" {TRIGGER}", "")
            settings = GenerationSettings(
                prompt=prompt, num_images=args.images, seed=args.seed, steps=args.steps, guidance_scale=args.guidance
            )
            with apply_concepts(base, [concepts[n.name] for n in named]) as applied:
                drawn = [
                    np.asarray(im)
                    for im in generate(base, settings, None, applied.condition(prompt, args.steps)).images
                ]
            images = {
                "fastcomposer": drawn,
                "base": [np.asarray(im) for im in generate(base, replace(settings, prompt=plain)).images],
                "render": rendered(pair, context, args.images, args.seed, args.characters),
            }
            if not args.characters:  # each subject in the words of the base's captions, as the eval's described row
                words = BenchPrompt("{}", "described")
                told = " and ".join(f"{described_prompt(s, words)} on the {side}" for s, side in sides) + f" {where}"
                images["described"] = [np.asarray(im) for im in generate(base, replace(settings, prompt=told)).images]
            row = {"subjects": [pair[0].name, pair[1].name], "prompt": prompt}
            for name, drawn_here in images.items():
                row[name] = read(reader, drawn_here, pair) | {"context": context_share(probes, drawn_here, context)}
            if args.right_first:  # the same images read with the first-named subject on the left
                by_order = read(reader, drawn, tuple(named))
                row["by_naming_order"] = by_order | {"context": row["fastcomposer"]["context"]}
            results["pairs"].append(row)
            grid.append(np.concatenate(drawn, axis=1))
            print(f"{pair[0].name} + {pair[1].name}: both recognised {row['fastcomposer']['both_recognised']:.2f}")
    rows = ("render", "fastcomposer", *(("by_naming_order",) if args.right_first else ()), "base")
    rows += () if args.characters else ("described",)
    keys = ("both_recognised", "one_recognised", "own_probability", "other_probability", "context")
    results["mean"] = {r: {k: float(np.mean([p[r][k] for p in results["pairs"]])) for k in keys} for r in rows}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "two_subjects.json").write_text(json.dumps(results, indent=1))
    Image.fromarray(np.concatenate(grid, axis=0)).resize(
        (64 * args.images * 2, 64 * len(grid) * 2), Image.NEAREST
    ).save(args.out / "two_subjects.png")
    lines = [
        "| row | both subjects recognised | at least one | P(own subject) per half | P(other subject) per half | context |"
        if not args.characters
        else "| row | both people nearer their own | at least one | cosine to own person | cosine to the other | context |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = results["mean"][r]
        lines.append(
            f"| {r} | {m['both_recognised']:.2f} | {m['one_recognised']:.2f} | {m['own_probability']:.3f} | "
            f"{m['other_probability']:.3f} | {m['context']:.2f} |"
        )
    (args.out / "two_subjects.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
