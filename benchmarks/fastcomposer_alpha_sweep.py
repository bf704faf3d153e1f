"""FastComposer's delayed subject conditioning on the world bench: as alpha (the share of denoising steps drawn with
the subjects fused in) rises, subject fidelity should rise and prompt fidelity fall. Reads a `limner eval` run whose
rows differ only in `alpha` and plots both.

    limner eval -n 1 --prompts 4 --no-bounds --out OUT --method fastcomposer:alpha=0.1 ... --method fastcomposer:alpha=1.0
    python benchmarks/fastcomposer_alpha_sweep.py OUT/results.json --out docs/world-bench-fastcomposer/alpha_sweep.png
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MEASURES = {"subject_fidelity": "subject fidelity", "prompt_fidelity": "prompt fidelity", "clip_t": "CLIP-T"}


def sweep(results: dict) -> list[tuple[float, dict]]:
    """(alpha, mean scores) of each row that names an alpha, in alpha order."""
    points = []
    for name, row in results["rows"].items():
        found = re.search(r"alpha=([0-9.]+)", name)
        if found:
            points.append((float(found.group(1)), row["mean"]))
    return sorted(points, key=lambda p: p[0])


def plot(points: list[tuple[float, dict]], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    alphas = [a for a, _ in points]
    for key, label in MEASURES.items():
        ax.plot(alphas, [m[key] for _, m in points], marker="o", label=label)
    ax.set_xlabel("alpha (share of steps with the subject fused in)")
    ax.set_ylim(0, 1.1)
    ax.set_title("FastComposer on the world bench: delayed subject conditioning")
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    points = sweep(json.loads(args.results.read_text()))
    plot(points, args.out)
    for alpha, m in points:
        print(f"alpha {alpha:.2f}: " + ", ".join(f"{label} {m[k]:.3f}" for k, label in MEASURES.items()))


if __name__ == "__main__":
    main()
