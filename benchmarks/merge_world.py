"""Two Custom Diffusion concepts in one image, on the world: closed-form merge vs joint training.

    python benchmarks/merge_world.py [--left duo_ball --right cross_cup] [--out benchmarks/merge]

Trains Custom Diffusion on each subject separately (modifier tokens <new1>, <new2>), merges the two in
closed form (`limner merge`), trains both jointly as a third variant, and draws both subjects in one
image in several contexts, two ways:

- one prompt, "a <new1> ball on the left and a <new2> cup on the right ...": each image is scored by
  cropping the two entity positions (where the world puts left and right objects);
- regional prompts, "a <new1> ball ... BREAK a <new2> cup ..." (`limner generate --regions`): each
  subject is drawn in its own window of a wider canvas, and each window is scored.

With regional prompts, three more rows compose separately trained concepts at sampling time, as
`limner generate --regions --concept A --concept B` does, each concept acting only in the window whose
prompt names it: the K/V-only Custom Diffusion concepts above, Custom Diffusion concepts trained with
their defaults (all of attn2), and DreamBooth LoRA concepts (identifiers sks, zwx).

The subject probe says which of the 12 held-out subjects each crop shows. Bounds in the same run: the
base model given the class nouns (lower) and fresh renders of the two subjects (upper; this also shows
what the crop-and-probe measure can read at best). Language drift: with each variant's weights
installed, the class prompts alone ("a ball on the beach") and how often the probe reads the subject.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
LORA_IDS = ("sks", "zwx")  # DreamBooth identifiers of the left and right subject
MODE = "crossattn_kv"  # the paper's merge: the closed form solves for attn2's K and V, the only weights trained


def crops(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The left and right entity regions (the world's two-object layout: x 0.27 / 0.73, y ~0.6), upscaled."""
    h, w = image.shape[:2]
    size = CROP * w // 64
    top = min(h - size, max(0, int(0.6 * h) - size // 2))
    out = []
    for cx in (0.27, 0.73):
        left = min(w - size, max(0, int(cx * w) - size // 2))
        region = Image.fromarray(image[top : top + size, left : left + size]).resize((w, h), Image.BICUBIC)
        out.append(np.asarray(region))
    return out[0], out[1]


def window_crops(image: np.ndarray, lefts: list[int], window: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The first and last region windows of a regional image."""
    return image[:, lefts[0] : lefts[0] + window], image[:, lefts[-1] : lefts[-1] + window]


def two_subject_scores(pairs: list[tuple[np.ndarray, np.ndarray]], left: str, right: str, probes) -> dict[str, float]:
    """P(left subject) on the left crop, P(right subject) on the right crop (among the 12 held-out
    subjects), and the share of images where the probe names both correctly."""
    fidelity, named = {}, {}
    for i, (side, subject) in enumerate((("left", left), ("right", right))):
        probs, names = probes.subject_probabilities(np.stack([p[i] for p in pairs]))
        fidelity[side] = float(probs[:, names.index(subject)].mean())
        named[side] = probs.argmax(-1).numpy() == names.index(subject)
    return {
        "left_fidelity": fidelity["left"],
        "right_fidelity": fidelity["right"],
        "both_recognised": float((named["left"] & named["right"]).mean()),
    }


def language_drift(base, left, right, probes) -> dict[str, float]:
    """P(subject) on images of its class prompt alone ("a ball on the beach", no modifier token): how
    far the installed weights pull the class toward the subject. The base's own reading is the floor."""
    drift = {}
    for side, subject in (("left", left), ("right", right)):
        images, _, _ = draw(base, [f"a {subject.class_noun} {c}" for c in CONTEXTS])
        probs, names = probes.subject_probabilities(np.stack(images))
        drift[side] = float(probs[:, names.index(subject.name)].mean())
    return drift


def upper_bound_images(left, right, n: int) -> list[np.ndarray]:
    from limner.world import vocab
    from limner.world.bench import subject_object
    from limner.world.render import Scene, render

    contexts = [k for k, v in vocab.CONTEXTS.items() if v in CONTEXTS]
    out = []
    for i in range(n):
        rng = np.random.default_rng([i, 7])
        a, b = (
            subject_object(left, rng, x=0.27, scale=(0.15, 0.22)),
            subject_object(right, rng, x=0.73, scale=(0.15, 0.22)),
        )
        out.append(
            np.asarray(render(Scene(contexts[i % len(contexts)], [a, b], variant=int(rng.integers(2**31)))).pil())
        )
    return out


def single_renders(left, right, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Upper bound for regional images: each subject rendered alone, as one window would show it."""
    from limner.world import vocab
    from limner.world.bench import subject_object
    from limner.world.render import Scene, render

    contexts = [k for k, v in vocab.CONTEXTS.items() if v in CONTEXTS]
    pairs = []
    for i in range(n):
        rng = np.random.default_rng([i, 8])
        scenes = [
            Scene(contexts[i % len(contexts)], [subject_object(s, rng)], variant=int(rng.integers(2**31)))
            for s in (left, right)
        ]
        pairs.append(tuple(np.asarray(render(sc).pil()) for sc in scenes))
    return pairs


def draw(
    base, prompts: list[str], regions: bool = False, seed: int = 0, **kwargs
) -> tuple[list[np.ndarray], list, float]:
    """The images, each one's (left crop, right crop), and the seconds per image."""
    from limner.generation import GenerationSettings, generate

    images, pairs, seconds = [], [], 0.0
    for j, prompt in enumerate(prompts):
        s = GenerationSettings(
            prompt,
            num_images=IMAGES_PER_CONTEXT,
            seed=seed + 100 * j,
            steps=25,
            batch_size=IMAGES_PER_CONTEXT,
            regions=regions,
        )
        result = generate(base, s, **kwargs)
        seconds += result.record["timings"]["total_s"]
        lefts = [r["left"] for r in result.record.get("regions", [])]
        for im in result.images:
            images.append(np.asarray(im.convert("RGB")))
            pairs.append(window_crops(images[-1], lefts) if regions else crops(images[-1]))
    return images, pairs, seconds / len(images)


def read_seconds(concept: Path) -> float:
    """Training time as the concept recorded it (also when this run found it already trained)."""
    return round(json.loads((concept / "limner.json").read_text())["seconds"], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--left", default="duo_ball")
    ap.add_argument("--right", default="cross_cup")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "merge")
    ap.add_argument("--work", type=Path, default=Path("/tmp/limner-merge"))
    args = ap.parse_args()
    from limner.conditioning import apply_concepts
    from limner.evaluation.cache_keys import default_settings, digest
    from limner.evaluation.subjects import world_subjects
    from limner.methods import get_method
    from limner.methods.custom_diffusion import merge
    from limner.models.loading import WORLD_PROBES, load_base
    from limner.regions import split_regions
    from limner.world.probes import Probes

    torch.manual_seed(0)
    a, b = world_subjects(f"world:{args.left},{args.right}")
    cd = get_method("custom_diffusion")
    timings, concepts, defaults, loras = {}, {}, {}, {}

    fingerprint = load_base(None).fingerprint

    def trained(folder: Path, label: str, method, settings: dict, personalize) -> Path:
        """The concept in `folder`, trained by personalize(folder) unless a previous run left it with
        the same base, method defaults and settings (a key file beside its manifest says which)."""
        key = digest({"base": fingerprint, "defaults": default_settings(method), "settings": settings})
        key_file = folder / "bench-key"
        if not ((folder / "limner.json").exists() and key_file.exists() and key_file.read_text() == key):
            shutil.rmtree(folder, ignore_errors=True)
            personalize(folder)
            key_file.write_text(key)
        timings[label] = read_seconds(folder)
        return folder

    for key, subject, token, identifier in (("left", a, "<new1>", LORA_IDS[0]), ("right", b, "<new2>", LORA_IDS[1])):
        # K/V only (what the closed form solves for), Custom Diffusion's defaults (all of attn2) and
        # DreamBooth LoRA's defaults: the last two for per-window use
        for trained_as, folder, suffix, method, settings in (
            (concepts, f"cd-{subject.name}", "", cd, {"modifier_token": token, "mode": MODE}),
            (defaults, f"cd-{subject.name}-default", "-default", cd, {"modifier_token": token}),
            (loras, f"lora-{subject.name}", " LoRA", get_method("dreambooth_lora"), {"identifier": identifier}),
        ):
            trained_as[key] = trained(
                args.work / folder,
                f"train {subject.name}{suffix}",
                method,
                settings,
                lambda f, m=method, s=subject, kw=settings: m.personalize(load_base(None, dtype="fp32"), s, f, **kw),
            )
    t0 = time.perf_counter()
    merged = merge(
        load_base(None, dtype="fp32"), [concepts["left"], concepts["right"]], args.work / f"merged-{a.name}+{b.name}"
    )
    timings["merge"] = round(time.perf_counter() - t0, 1)
    # the paper's own solve (its two prompts, no padding rows, an equality constraint) beside limner's
    merged_paper = merge(
        load_base(None, dtype="fp32"),
        [concepts["left"], concepts["right"]],
        args.work / f"merged-paper-{a.name}+{b.name}",
        solve="paper",
    )
    # the same merge of the default (all of attn2) concepts: K/V in closed form, Q and out averaged
    merged_default = merge(
        load_base(None, dtype="fp32"),
        [defaults["left"], defaults["right"]],
        args.work / f"merged-default-{a.name}+{b.name}",
    )
    # one work folder serves every pair
    joint = trained(
        args.work / f"joint-{a.name}+{b.name}",
        "joint training",
        cd,
        {"mode": MODE, "joint": [a.name, b.name]},
        lambda f: cd.personalize(load_base(None, dtype="fp32"), [a, b], f, mode=MODE),
    )

    def prompts(left_phrase: str, right_phrase: str, regions: bool) -> list[str]:
        if regions:
            return [f"a {left_phrase} {c} BREAK a {right_phrase} {c}" for c in CONTEXTS]
        return [f"a {left_phrase} on the left and a {right_phrase} on the right {c}" for c in CONTEXTS]

    probes = Probes(WORLD_PROBES)
    n = IMAGES_PER_CONTEXT * len(CONTEXTS)
    upper = upper_bound_images(a.world, b.world, n)
    singles = single_renders(a.world, b.world, n)
    # variant -> (concept folders to apply, left phrase, right phrase)
    variants = {
        "base, class nouns": ([], a.class_noun, b.class_noun),
        "closed-form merge": ([merged], f"<new1> {a.class_noun}", f"<new2> {b.class_noun}"),
        "closed-form merge, the paper's solve": ([merged_paper], f"<new1> {a.class_noun}", f"<new2> {b.class_noun}"),
        "closed-form merge of default concepts": (
            [merged_default],
            f"<new1> {a.class_noun}",
            f"<new2> {b.class_noun}",
        ),
        "joint training": ([joint], f"<new1> {a.class_noun}", f"<new2> {b.class_noun}"),
    }
    # each single concept alone in the two-subject prompt: only its own side should match
    for key, folder in concepts.items():
        tok = json.loads((folder / "limner.json").read_text())["tokens"][0]
        left = f"{tok} {a.class_noun}" if key == "left" else a.class_noun
        right = f"{tok} {b.class_noun}" if key == "right" else b.class_noun
        variants[f"only {a.name if key == 'left' else b.name} concept"] = ([folder], left, right)
    # rows: every variant with one prompt, then every variant with regional prompts
    layouts = {False: "one prompt", True: "regional prompts"}
    grids = {f"upper bound (renders), {layouts[False]}": (upper, [crops(im) for im in upper], None)}
    regional = {f"upper bound (renders), {layouts[True]}": ([np.concatenate(p, 1) for p in singles], singles, None)}
    drift = {}
    for name, (folders, left, right) in variants.items():
        base = load_base(None)  # one base per variant, drawn in both layouts and with the class prompts
        for folder in folders:
            cd.install(base, [folder])
        for regions, rows_of_layout in ((False, grids), (True, regional)):
            rows_of_layout[f"{name}, {layouts[regions]}"] = draw(base, prompts(left, right, regions), regions)
        drift[name] = language_drift(base, a, b, probes)
    # separate concepts, each acting only in the window whose prompt names it, as
    # `limner generate --regions --concept A --concept B` applies them: regional prompts only
    phrases = {
        "custom": (f"<new1> {a.class_noun}", f"<new2> {b.class_noun}"),
        "lora": (f"{LORA_IDS[0]} {a.class_noun}", f"{LORA_IDS[1]} {b.class_noun}"),
    }
    for name, pair, kind in (
        ("separate concepts, each in its window", concepts, "custom"),
        ("separate default (all of attn2) concepts, each in its window", defaults, "custom"),
        ("separate DreamBooth LoRA concepts, each in its window", loras, "lora"),
    ):
        base = load_base(None)
        region_prompts = prompts(*phrases[kind], True)
        applied = apply_concepts(base, [pair["left"], pair["right"]], split_regions(region_prompts[0]))
        regional[f"{name}, {layouts[True]}"] = draw(
            base, region_prompts, True, conditioning=applied.condition(region_prompts[0], 25)
        )
    grids |= regional
    rows = {}
    for name, (_, pairs, per_image) in grids.items():
        rows[name] = two_subject_scores(pairs, a.name, b.name, probes) | {"seconds_per_image": per_image}

    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"| {a.name} (left) + {b.name} (right) | P(left subject), left crop | P(right subject), right crop | both recognised "
        "| s / image |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {v['left_fidelity']:.3f} | {v['right_fidelity']:.3f} | {v['both_recognised']:.3f} | "
        f"{'—' if v['seconds_per_image'] is None else format(v['seconds_per_image'], '.3f')} |"
        for k, v in rows.items()
    ]
    note = (
        f"\n{n} images per row ({IMAGES_PER_CONTEXT} seeds x {len(CONTEXTS)} contexts), 25 DPM++ steps, guidance 5. "
        "Chance for a probability is 1/12. One prompt: 64 px images, crops around the world's two-object positions. "
        "Regional prompts: 112 px wide canvases, two 64 px windows overlapping by 16 px, each window scored; "
        "its upper bound is each subject rendered alone. s / image: generation wall time per image, in batches of 4 "
        f"({os.cpu_count()} CPU threads). Training seconds: "
        + ", ".join(f"{k} {v}" for k, v in timings.items())
        + ".\nCommand: `python benchmarks/merge_world.py`\n"
    )
    drift_lines = [
        "",
        f'| language drift: class prompt alone | P({a.name}), "a {a.class_noun} ..." | P({b.name}), "a {b.class_noun} ..." |',
        "|---|---|---|",
    ] + [f"| {k} | {v['left']:.3f} | {v['right']:.3f} |" for k, v in drift.items()]
    (args.out / "results.md").write_text("\n".join(lines + drift_lines) + "\n" + note)
    (args.out / "results.json").write_text(
        json.dumps({"rows": rows, "language_drift": drift, "seconds": timings}, indent=1)
    )
    # one row of the grid per variant: the first image of each context (regional ones are wider)
    names = list(grids)
    rows_of_images = [
        [Image.fromarray(grids[name][0][c * IMAGES_PER_CONTEXT]) for c in range(len(CONTEXTS))] for name in names
    ]
    sheet = Image.new("RGB", (max(sum(im.width for im in row) for row in rows_of_images), 64 * len(names)), "white")
    for r, row in enumerate(rows_of_images):
        x = 0
        for im in row:
            sheet.paste(im, (x, 64 * r))
            x += im.width
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(args.out / "grid.png")
    print((args.out / "results.md").read_text())
    print("grid rows, top to bottom:", ", ".join(names))


if __name__ == "__main__":
    main()
