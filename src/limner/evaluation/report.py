"""Writing results: JSON, a Markdown table, plots, and a static HTML report viewable offline."""

from __future__ import annotations

import hashlib
import html
import json
import re
import shutil
from pathlib import Path

import numpy as np

from limner.evaluation.protocol import FIDELITY_THRESHOLD, LOWER, UPPER
from limner.io import write_text_atomic

COPIED_IMAGE = re.compile(r"[0-9a-f]{16}\.[A-Za-z]+")  # the names write_html gives the images it copies

# Reported DreamBench numbers (DINO, CLIP-I, CLIP-T), from the papers; shown beside real-model runs.
PAPER_DREAMBENCH = {
    "Real images (DreamBooth paper)": (0.774, 0.885, None),
    "DreamBooth (SD)": (0.668, 0.803, 0.305),
    "Textual Inversion": (0.569, 0.780, 0.255),
    "BLIP-Diffusion zero-shot": (0.594, 0.779, 0.300),
    "BLIP-Diffusion fine-tuned": (0.670, 0.805, 0.302),
}

COLUMNS = [  # (key, header) in display order; a column appears when any row has it
    ("subject_fidelity", "subject fidelity"),
    ("prompt_fidelity", "prompt fidelity"),
    ("language_drift", "language drift"),
    ("class_prompt_accuracy", "class-prompt class acc."),
    ("dino", "DINO"),
    ("clip_i", "CLIP-I"),
    ("clip_t", "CLIP-T"),
    ("face_sim", "Face-Sim"),
    ("face_div", "Face-Div"),
    ("diversity", "diversity"),
]


def markdown_table(results: dict) -> str:
    rows = results["rows"]
    cols = [(k, h) for k, h in COLUMNS if any(k in r["mean"] for r in rows.values())]
    lines = ["| method | " + " | ".join(h for _, h in cols) + " |", "|---|" + "---|" * len(cols)]
    timed = any(r.get("time_to_fidelity") for r in rows.values())
    if timed:
        lines[0] += f" train s to fidelity {FIDELITY_THRESHOLD} |"
        lines[1] += "---|"
    for name, r in rows.items():
        cells = [f"{r['mean'][k]:.3f}" if k in r["mean"] else "—" for k, _ in cols]
        if timed:
            t = r.get("time_to_fidelity")
            cells.append(
                "—"
                if not t
                else f"{t['mean_seconds']:.0f} ({t['reached']}/{t['of']})"
                if t["mean_seconds"] is not None
                else f"never (0/{t['of']})"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = [
        "",
        f"{len(results['subjects'])} subjects, {results['settings']['images_per_prompt']} images per prompt, seeds "
        "from "
        f"{results['settings']['seed']}, {results['settings']['steps']} {results['settings']['scheduler']} steps, "
        f"guidance {results['settings']['guidance']}, {layout_note(results)}. Encoders: "
        + ", ".join(f"{k} = {v}" for k, v in results["encoders"].items() if v)
        + "."
        + (
            ""
            if not results.get("probes")
            else " Probes: " + ", ".join(f"{k} {v}" for k, v in results["probes"].items()) + "."
        ),
    ]
    if results["world"]:
        notes.append(
            f"`{LOWER}`: the base model given only the class noun; `{UPPER}`: fresh renders of the subject doing what "
            "the prompt asks. Subject fidelity: the subject probe's probability of the right subject among the 12 "
            "held-out subjects (objects) or "
            "identity-embedding cosine (characters). Prompt fidelity: share of the asked context / colour / accessory "
            "the attribute probe reads back. Language drift: subject fidelity of images from the class prompt alone "
            "(lower is better). Diversity: mean pairwise CLIP distance across seeds."
        )
    else:
        notes += [
            "",
            "Reported in the papers on DreamBench (real photos; for reference only, not this run):",
            "",
            "| paper | DINO | CLIP-I | CLIP-T |",
            "|---|---|---|---|",
        ]
        for k, (d, ci, ct) in PAPER_DREAMBENCH.items():
            notes.append(f"| {k} | {d:.3f} | {ci:.3f} | {'—' if ct is None else f'{ct:.3f}'} |")
    return "\n".join(lines + notes) + "\n"


def plot_fidelity(results: dict, path: Path) -> Path | None:
    """Subject fidelity against prompt fidelity, one point per row: the trade-off at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = {
        n: r["mean"]
        for n, r in results["rows"].items()
        if "subject_fidelity" in r["mean"] and "prompt_fidelity" in r["mean"]
    }
    x_key, y_key = ("prompt_fidelity", "subject_fidelity") if pts else ("clip_t", "clip_i")
    pts = pts or {n: r["mean"] for n, r in results["rows"].items() if "clip_t" in r["mean"]}
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    xs, ys = [m[x_key] for m in pts.values()], [m[y_key] for m in pts.values()]
    x_span, y_span = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    placed = []
    for name, m in sorted(pts.items(), key=lambda item: -item[1][y_key]):
        x, y = m[x_key], m[y_key]
        ax.scatter(x, y, s=40)
        # a label goes below its point where it would run into the label of a point just above it
        crowded = any(abs(x - px) < 0.35 * x_span and abs(y - py) < 0.06 * y_span for px, py in placed)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, -11) if crowded else (5, 4), fontsize=8)
        placed.append((x, y))
    ax.set_xlabel(x_key.replace("_", " "))
    ax.set_ylabel(y_key.replace("_", " "))
    ax.set_title("subject vs prompt fidelity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_training_curves(results: dict, path: Path) -> Path | None:
    """Left: training loss against time. Right: subject fidelity of validation images against time,
    with the line every method must cross for "time to reach fidelity"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {name: list(r.get("concepts", {}).values()) for name, r in results["rows"].items() if r.get("concepts")}
    if not runs:
        return None
    fig, (ax_loss, ax_fid) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for i, (name, metas) in enumerate(runs.items()):
        colour = f"C{i}"
        for j, meta in enumerate(metas):
            curve = meta.get("curve") or []
            # a running mean keeps the noisy per-step loss readable
            losses = (
                np.convolve([c["loss"] for c in curve], np.ones(20) / 20, mode="valid")
                if len(curve) >= 20
                else [c["loss"] for c in curve]
            )
            ax_loss.plot(
                [c["seconds"] for c in curve][-len(losses) :],
                losses,
                color=colour,
                alpha=0.5,
                label=name if j == 0 else None,
            )
            val = meta.get("validation") or []
            ax_fid.plot(
                [v["seconds"] for v in val],
                [v["score"] for v in val],
                color=colour,
                alpha=0.5,
                marker=".",
                label=name if j == 0 else None,
            )
    for ax, label in ((ax_loss, "training loss (running mean)"), (ax_fid, "subject fidelity (validation)")):
        ax.set_xlabel("training seconds")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax_fid.axhline(FIDELITY_THRESHOLD, color="grey", linestyle="--", linewidth=1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_html(results: dict, out: Path, max_prompts: int = 8, max_images: int = 4) -> Path:
    """index.html: per subject, the reference images, then per prompt one row of images per method.
    Images are copied next to the page, so the folder works offline and can be moved; images an
    earlier report copied there and this page no longer shows are removed."""
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    shown: set[str] = set()

    def local(src: str) -> str:
        # named after the source's full path: references of different subjects share file names
        dst = img_dir / (hashlib.sha256(str(Path(src).resolve()).encode()).hexdigest()[:16] + Path(src).suffix)
        shutil.copyfile(src, dst)
        shown.add(dst.name)
        return f"images/{dst.name}"

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>limner eval</title><style>",
        "body{font-family:sans-serif;margin:20px} img{image-rendering:pixelated;width:96px;height:96px;margin:1px}",
        "td{vertical-align:top;padding:2px 6px} th{text-align:left} .p{font-size:12px;color:#444;max-width:220px}",
        "</style></head><body><h1>limner eval</h1>",
    ]
    parts.append("<pre>" + html.escape(markdown_table(results)) + "</pre>")
    for plot in ("fidelity.png", "training_curves.png"):
        if (out / plot).exists():
            parts.append(f"<img src='{plot}' style='width:480px;height:auto;image-rendering:auto'>")
    rows = results["rows"]
    for subj in results["subjects"]:
        name = subj["name"]
        parts.append(f"<h2>{html.escape(name)} <small>({html.escape(subj['class_noun'])})</small></h2>")
        refs = results.get("references", {}).get(name, [])
        if refs:
            parts.append("<div>references: " + "".join(f"<img src='{local(p)}'>" for p in refs) + "</div>")
        prompts = [p for p in next(iter(rows.values()))["images"].get(name, {}) if p != "__drift__"][:max_prompts]
        parts.append("<table><tr><th>prompt</th>" + "".join(f"<th>{html.escape(r)}</th>" for r in rows) + "</tr>")
        for prompt in prompts:
            cells = []
            for r in rows.values():
                paths = r["images"].get(name, {}).get(prompt, [])
                cells.append("<td>" + "".join(f"<img src='{local(p)}'>" for p in paths[:max_images]) + "</td>")
            parts.append(f"<tr><td class='p'>{html.escape(prompt)}</td>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    page = out / "index.html"
    write_text_atomic(page, "\n".join(parts))
    for stale in img_dir.iterdir():
        # only files named as local() names them: anything else in the folder is not ours to delete
        if stale.name not in shown and COPIED_IMAGE.fullmatch(stale.name):
            stale.unlink()
    return page


def write_report(results: dict, out: Path, html_prompts: int = 8, html_images: int = 4) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "results.json", "markdown": out / "results.md"}
    write_text_atomic(written["json"], json.dumps(results, indent=2))
    write_text_atomic(written["markdown"], markdown_table(results))
    for name, fn in (("fidelity", plot_fidelity), ("training_curves", plot_training_curves)):
        p = fn(results, out / f"{name}.png")
        if p:
            written[name] = p
    written["html"] = write_html(results, out, html_prompts, html_images)
    return written


def layout_note(results: dict) -> str:
    """How many of each row's first denoising steps followed the class prompt (GenerationSettings.layout_steps)."""
    if "layout_steps" not in results["settings"]:  # results from before layout steps existed
        return "no layout steps"
    laid_out = [f"{name} {row['layout_steps']}" for name, row in results["rows"].items() if row.get("layout_steps")]
    return "layout steps: " + (", ".join(laid_out) or "none")
