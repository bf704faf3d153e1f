"""FastComposer's inference settings swept on the world bench. Delayed subject conditioning (`alpha`, the share of
denoising steps drawn with the subjects fused in): as it rises, subject fidelity should rise and prompt fidelity
fall. limner's `subject_scale` (how far the fused token is pushed from its word) trades the same way. Reads a
`limner eval` run whose rows differ only in the swept setting, plots the scores, and with --grid draws each row's
first image of the first 8 prompts for a few subjects (what the scores do not show: the subject's form).

    limner eval -n 1 --no-bounds --out OUT --method fastcomposer:alpha=0.1 ... --method fastcomposer:alpha=1.0
    python benchmarks/fastcomposer_alpha_sweep.py OUT/results.json --out docs/world-bench-fastcomposer/alpha_sweep.png
    python benchmarks/fastcomposer_alpha_sweep.py OUT/results.json --setting subject_scale --out S.png --grid G.jpg
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MEASURES = {
    "subject_fidelity": "subject fidelity",
    "prompt_fidelity": "prompt fidelity",
    "class_accuracy": "class accuracy (the form kept)",
    "clip_t": "CLIP-T",
}
DEFAULTS = {"alpha": 0.7, "subject_scale": 1.0}  # a row that does not name the setting draws at its default
LABELS = {
    "alpha": "alpha (share of steps with the subject fused in)",
    "subject_scale": "subject_scale (the fused token pushed from its word)",
}


def sweep(results: dict, setting: str = "alpha") -> list[tuple[float, str, dict]]:
    """(value, row name, row) of each row of the method, in order of the swept setting's value."""
    points = []
    for name, row in results["rows"].items():
        if not name.startswith("fastcomposer"):
            continue
        found = re.search(rf"{setting}=([0-9.]+)", name)
        points.append((float(found.group(1)) if found else DEFAULTS[setting], name, row))
    return sorted(points, key=lambda p: p[0])


def measured(points: list[tuple[float, str, dict]]) -> dict[str, str]:
    """The measures every row has (reports from before class accuracy was read lack it)."""
    return {k: label for k, label in MEASURES.items() if all(k in row["mean"] for _, _, row in points)}


def plot(points: list[tuple[float, str, dict]], setting: str, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    values = [v for v, _, _ in points]
    for key, label in measured(points).items():
        ax.plot(values, [row["mean"][key] for _, _, row in points], marker="o", label=label)
    ax.set_xlabel(LABELS[setting])
    ax.set_ylim(0, 1.1)
    ax.set_title(f"FastComposer on the world bench: {setting}")
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(out)


def grid(points: list[tuple[float, str, dict]], subjects: list[str], out: Path, prompts: int = 8) -> None:
    """One strip per (subject, swept value): the first image of each of the first `prompts` prompts."""
    strips = []
    for subject in subjects:
        for _, _, row in points:
            drawn = list(row["images"][subject].values())[:prompts]
            strips.append([Image.open(paths[0]).convert("RGB").resize((64, 64)) for paths in drawn])
    canvas = Image.new("RGB", (64 * prompts, 64 * len(strips)))
    for y, strip in enumerate(strips):
        for x, image in enumerate(strip):
            canvas.paste(image, (64 * x, 64 * y))
    canvas.save(out, optimize=True, quality=90)  # quality: a JPEG (--grid G.jpg), for the noise of 64 px images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--setting", choices=sorted(DEFAULTS), default="alpha")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--grid", type=Path, default=None, help="also draw the rows' images here (.jpg or .png)")
    ap.add_argument("--subjects", nargs="+", default=["duo_ball", "ring_box", "moon_vase", "spot_dog"])
    args = ap.parse_args()
    points = sweep(json.loads(args.results.read_text()), args.setting)
    plot(points, args.setting, args.out)
    if args.grid:
        grid(points, args.subjects, args.grid)
    for value, _, row in points:
        print(
            f"{args.setting} {value:.2f}: "
            + ", ".join(f"{lb} {row['mean'][k]:.3f}" for k, lb in measured(points).items())
        )


if __name__ == "__main__":
    main()
