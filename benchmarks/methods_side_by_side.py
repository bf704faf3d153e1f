"""Every method on the world bench in one table and one subject-vs-prompt fidelity plot, read from the published
reports (docs/world-bench*/results.json): the tuning methods beside the encoder methods, zero-shot and fine-tuned.
Writes docs/side-by-side.md and docs/side-by-side.png.

    python benchmarks/methods_side_by_side.py
"""

from __future__ import annotations

import json
from pathlib import Path

from limner.io import write_text_atomic

DOCS = Path(__file__).resolve().parent.parent / "docs"

# (report, row, label, family)
ROWS = [
    ("world-bench-ip", "lower-bound", "lower bound (base, class noun)", "bound"),
    ("world-bench-ip", "upper-bound", "upper bound (renders)", "bound"),
    ("world-bench-ip/described", "described", "base, subject told in words", "bound"),
    ("world-bench", "textual_inversion", "Textual Inversion, no layout steps", "tuning"),
    ("world-bench-ti", "textual_inversion", "Textual Inversion (limner's default)", "tuning"),
    ("world-bench", "custom_diffusion (all of attn2: limner's default)", "Custom Diffusion", "tuning"),
    ("world-bench", "dreambooth_lora", "DreamBooth-LoRA", "tuning"),
    ("world-bench", "dreambooth", "DreamBooth", "tuning"),
    ("world-bench-ip", "ip_adapter", "IP-Adapter plain", "zero-shot"),
    ("world-bench-ip", "ip_adapter:variant=plus", "IP-Adapter plus", "zero-shot"),
    ("world-bench-ip", "ip_adapter:scale=2.0", "IP-Adapter plain, scale 2", "zero-shot"),
    ("world-bench-blip/prompts-16", "blip_diffusion", "BLIP-Diffusion", "zero-shot"),
    ("world-bench-fastcomposer", "fastcomposer", "FastComposer", "zero-shot"),
    ("world-bench-fastcomposer", "fastcomposer:subject_scale=2", "FastComposer, subject_scale 2", "zero-shot"),
    ("world-bench-ip", "ip_adapter:finetune_steps=100", "IP-Adapter plain, 100-step fine-tune", "fine-tuned"),
    (
        "world-bench-blip/prompts-16",
        "blip_diffusion:finetune_steps=40",
        "BLIP-Diffusion, 40-step fine-tune",
        "fine-tuned",
    ),
]
NOTE = (
    "All rows: the 12 held-out object subjects, all 16 bench prompts, 25 dpm++ steps, guidance 5, seeds from 0. The "
    "tuning methods' reports drew 4 images a prompt, the encoder methods' 2 (seeds 0-1 of the same 0-3): one "
    "protocol, half the images. Written by benchmarks/methods_side_by_side.py from the reports linked."
)
# where labels would collide: to the left of the point, below it
LABEL_LEFT = {
    "Textual Inversion, no layout steps",
    "BLIP-Diffusion, 40-step fine-tune",
    "FastComposer, subject_scale 2",
    "IP-Adapter plus",
}
LABEL_BELOW = {"Textual Inversion, no layout steps", "FastComposer", "IP-Adapter plus"}
MARKERS = {"bound": "s", "tuning": "o", "zero-shot": "^", "fine-tuned": "D"}


def read_rows() -> list[dict]:
    reports: dict[str, dict] = {}
    rows = []
    for report, name, label, family in ROWS:
        results = reports.setdefault(report, json.loads((DOCS / report / "results.json").read_text()))
        row = results["rows"][name]
        rows.append(
            {
                "label": label,
                "family": family,
                "subject": row["mean"]["subject_fidelity"],
                "prompt": row["mean"]["prompt_fidelity"],
                "images": results["settings"]["images_per_prompt"],
                "layout_steps": row.get("layout_steps") or 0,
                "report": report,
            }
        )
    return rows


def write_table(rows: list[dict], path: Path) -> None:
    lines = [
        "| method | family | subject fidelity | prompt fidelity | images per prompt | layout steps | report |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['family']} | {r['subject']:.3f} | {r['prompt']:.3f} | {r['images']} | "
            f"{r['layout_steps'] or ''} | [{r['report']}]({r['report']}/results.md) |"
        )
    write_text_atomic(path, "\n".join(lines) + "\n\n" + NOTE + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for family, marker in MARKERS.items():
        mine = [r for r in rows if r["family"] == family]
        ax.scatter([r["prompt"] for r in mine], [r["subject"] for r in mine], marker=marker, s=50, label=family)
        for r in mine:
            left, below = r["label"] in LABEL_LEFT, r["label"] in LABEL_BELOW
            ax.annotate(
                r["label"],
                (r["prompt"], r["subject"]),
                textcoords="offset points",
                xytext=(-5 if left else 5, -10 if below else 3),
                ha="right" if left else "left",
                fontsize=7,
            )
    ax.axhline(0.45, color="grey", lw=0.8, ls="--")
    ax.axvline(0.70, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("prompt fidelity")
    ax.set_ylabel("subject fidelity")
    ax.set_title("world bench: 12 held-out objects, 16 prompts (dashed: the encoder issues' floors)", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    rows = read_rows()
    write_table(rows, DOCS / "side-by-side.md")
    plot(rows, DOCS / "side-by-side.png")
    print(f"wrote {DOCS / 'side-by-side.md'} and {DOCS / 'side-by-side.png'}")


if __name__ == "__main__":
    main()
