"""`limner world check`: does the base model draw what a caption asks, on combinations it never saw?

Prompts come from the (class, colour, context) triples held out of base training (scenes.py); the
world's probes read the generated images; the report is per-attribute accuracy.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from limner.errors import LimnerError
from limner.generation import GenerationSettings, generate, make_grid, prepare_output
from limner.models.loading import WORLD_PROBES, Base
from limner.world import vocab
from limner.world.probes import Probes
from limner.world.scenes import heldout_combos, with_article

FLOORS = {"context": 0.85, "class": 0.75, "colour": 0.6}


def check_prompts(n: int, seed: int = 0) -> list[tuple[str, str, str, str]]:
    """n held-out (prompt, class, colour, context) cases, spread over all held-out triples."""
    combos = heldout_combos()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(combos))
    picked = [combos[i] for i in np.resize(order, n)]
    return [(f"{with_article(f'{colour} {cls}')} {vocab.CONTEXTS[ctx]}", cls, colour, ctx) for cls, colour, ctx in picked]


def world_check(base: Base, n: int = 48, seed: int = 0, steps: int = 25, guidance: float = 5.0,
                scheduler: str = "dpm++", probes_dir: Path = WORLD_PROBES, out: Path | None = None) -> dict:
    if n < 1:
        raise LimnerError(f"-n must be at least 1, got {n}")
    probes = Probes(probes_dir)
    probes.net("attributes")  # fail before generating anything if the probe is missing
    cases = check_prompts(n, seed)
    images = []
    t0 = time.perf_counter()
    for i, (prompt, *_rest) in enumerate(cases):
        s = GenerationSettings(prompt=prompt, num_images=1, seed=seed + i, steps=steps, guidance_scale=guidance,
                               scheduler=scheduler, batch_size=1)
        images.append(np.asarray(generate(base, s).images[0].convert("RGB").resize((64, 64))))
    seconds = time.perf_counter() - t0
    pred = probes.predict("attributes", np.stack(images))
    hits = {"class": [], "colour": [], "context": []}
    rows = []
    for i, (prompt, cls, colour, ctx) in enumerate(cases):
        got = {k: probes.labels("attributes", k)[int(pred[k][i].argmax())] for k in hits}
        want = {"class": cls, "colour": colour, "context": ctx}
        for k in hits:
            hits[k].append(got[k] == want[k])
        rows.append({"prompt": prompt, "want": want, "got": got})
    accuracy = {k: float(np.mean(v)) for k, v in hits.items()}
    report = {"n": n, "seed": seed, "steps": steps, "guidance": guidance, "scheduler": scheduler,
              "accuracy": accuracy, "floors": FLOORS, "passes_floors": all(accuracy[k] >= f for k, f in FLOORS.items()),
              "seconds_per_image": round(seconds / n, 4), "base_fingerprint": base.fingerprint, "cases": rows}
    if out is not None:
        from PIL import Image

        prepare_output(out)
        make_grid([Image.fromarray(im) for im in images], cols=8).save(out / "world-check-grid.png")
    return report


def format_table(report: dict) -> str:
    lines = ["| attribute | accuracy | floor |", "|---|---|---|"]
    for k, f in FLOORS.items():
        lines.append(f"| {k} | {report['accuracy'][k]:.3f} | {f:.2f} |")
    return "\n".join(lines)
