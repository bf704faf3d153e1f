"""Writing results: JSON, a Markdown table, plots, and a static HTML report viewable offline."""

from __future__ import annotations

import hashlib
import html
import json
import re
import shutil
from pathlib import Path

import numpy as np

from limner.evaluation.protocol import DESCRIBED, FIDELITY_THRESHOLD, LOWER, UPPER
from limner.evaluation.results_table import SORT_SCRIPT, TABLE_STYLE, html_table, markdown, results_table
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


def markdown_table(results: dict) -> str:
    notes = ["", settings_note(results)]
    if results["world"]:
        notes.append(world_note(results))
    else:
        notes += ["", PAPERS_NOTE, "", "| paper | DINO | CLIP-I | CLIP-T |", "|---|---|---|---|"]
        notes += ["| " + " | ".join(row) + " |" for row in paper_rows()]
    return "\n".join(markdown(results_table(results)) + notes) + "\n"


PAPERS_NOTE = "Reported in the papers on DreamBench (real photos; for reference only, not this run):"


def paper_rows() -> list[list[str]]:
    return [
        [k, f"{d:.3f}", f"{ci:.3f}", "—" if ct is None else f"{ct:.3f}"] for k, (d, ci, ct) in PAPER_DREAMBENCH.items()
    ]


def settings_note(results: dict) -> str:
    """What the run was: subjects, images, seeds, sampler, layout steps, the encoders and probes that scored it."""
    s = results["settings"]
    probes = results.get("probes")
    return (
        f"{len(results['subjects'])} subjects, {s['images_per_prompt']} images per prompt, seeds from {s['seed']}, "
        f"{s['steps']} {s['scheduler']} steps, guidance {s['guidance']}, {layout_note(results)}. Encoders: "
        + ", ".join(f"{k} = {v}" for k, v in results["encoders"].items() if v)
        + "."
        + ("" if not probes else " Probes: " + ", ".join(f"{k} {v}" for k, v in probes.items()) + ".")
    )


def world_note(results: dict) -> str:
    """What the world's rows and columns mean."""
    described = (
        f" `{DESCRIBED}`: the base model given the subject told in words (its colours, emblem and the emblem's "
        "colour, as the world's captions name them)."
        if DESCRIBED in results["rows"]
        else ""
    )
    return (
        f"`{LOWER}`: the base model given only the class noun; `{UPPER}`: fresh renders of the subject doing what "
        f"the prompt asks.{described} Subject fidelity: the subject probe's probability of the right subject among "
        "the 12 held-out subjects (objects) or "
        "identity-embedding cosine (characters). Prompt fidelity: share of the asked context / colour / accessory "
        "the attribute probe reads back. Language drift: subject fidelity of images from the class prompt alone "
        "(lower is better). Diversity: mean pairwise CLIP distance across seeds."
    )


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

    runs = {
        name: list(r["concepts"].values())
        for name, r in results["rows"].items()
        if any(m.get("curve") for m in r.get("concepts", {}).values())
    }
    if not runs:  # nothing trained per subject (an encoder method's zero-shot rows): no empty plot
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
        ".note{max-width:60em;font-size:14px;color:#333} .plots{display:flex;flex-wrap:wrap;gap:16px}",
        # plots at the size they were drawn (fidelity 600 px, curves 1200 px wide), narrower only on a narrow window
        "img.plot{image-rendering:auto;width:auto;height:auto;max-width:100%;border:1px solid #eee}",
        TABLE_STYLE,
        "</style></head><body><h1>limner eval</h1>",
        *results_html(results),
    ]
    plots = [plot for plot in ("fidelity.png", "training_curves.png") if (out / plot).exists()]
    if plots:  # each links to itself: a click shows it alone, at full size
        parts.append(
            "<div class='plots'>"
            + "".join(
                f"<a href='{p}' title='open at full size'><img class='plot' src='{p}' alt='{p}'></a>" for p in plots
            )
            + "</div>"
        )
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
    parts += [SORT_SCRIPT, "</body></html>"]
    page = out / "index.html"
    write_text_atomic(page, "\n".join(parts))
    for stale in img_dir.iterdir():
        # only files named as local() names them: anything else in the folder is not ours to delete
        if stale.name not in shown and COPIED_IMAGE.fullmatch(stale.name):
            stale.unlink()
    return page


def note_html(text: str) -> str:
    """A note's Markdown (`code` spans its only markup) as an HTML paragraph."""
    return "<p class='note'>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text)) + "</p>"


def results_html(results: dict) -> list[str]:
    """The results table (sortable, each column's best marked) and the notes on what the run was."""
    parts = [
        html_table(results_table(results)),
        "<p class='note'>Click a header to sort (best first, again to reverse); arrows say which way is better; "
        "<b>bold green</b>: the best value among the methods in its column (the bounds are references).</p>",
        note_html(settings_note(results)),
    ]
    if results["world"]:
        parts.append(note_html(world_note(results)))
    else:
        cells = ["".join(f"<td>{html.escape(c)}</td>" for c in row) for row in paper_rows()]
        parts += [
            f"<p class='note'>{html.escape(PAPERS_NOTE)}</p><table class='papers'>",
            "<tr><th>paper</th><th>DINO</th><th>CLIP-I</th><th>CLIP-T</th></tr>",
            *(f"<tr>{c}</tr>" for c in cells),
            "</table>",
        ]
    return parts


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
