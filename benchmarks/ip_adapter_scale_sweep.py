"""The IP-Adapter paper's trade-off on the world bench: subject fidelity rises and prompt fidelity falls as the
image scale goes from 0 to 1. Reads a `limner eval` run whose rows differ only in `scale` and plots both.

    limner eval -n 1 --out OUT --method ip_adapter:adapter=A,scale=0 ... --method ip_adapter:adapter=A,scale=1.0
    python benchmarks/ip_adapter_scale_sweep.py OUT/results.json --out docs/world-bench-ip/scale_sweep.png
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
    """(scale, mean scores) of each row that names a scale, in scale order."""
    points = []
    for name, row in results["rows"].items():
        found = re.search(r"scale=([0-9.]+)", name)
        if found:
            points.append((float(found.group(1)), row["mean"]))
    return sorted(points, key=lambda p: p[0])


def plot(points: list[tuple[float, dict]], bounds: dict, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    scales = [s for s, _ in points]
    for key, label in MEASURES.items():
        ax.plot(scales, [m[key] for _, m in points], marker="o", label=label)
    lower = bounds.get("lower-bound", {}).get("mean", {}).get("subject_fidelity")
    if lower is not None:
        ax.axhline(lower, color="grey", linestyle=":", label="subject fidelity, base with the class noun")
    ax.set_xlabel("IP-Adapter scale")
    ax.set_ylim(0, 1.2)
    ax.set_title("IP-Adapter on the world bench: image scale")
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    results = json.loads(args.results.read_text())
    points = sweep(results)
    plot(points, results["rows"], args.out)
    for scale, m in points:
        print(f"scale {scale:.2f}: " + ", ".join(f"{label} {m[k]:.3f}" for k, label in MEASURES.items()))


if __name__ == "__main__":
    main()
