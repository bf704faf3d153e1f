"""Prompt fidelity of a world-bench report, split by what each prompt asks: context, colour, accessory.

    python benchmarks/prompt_fidelity_by_attribute.py [docs/world-bench/results.json] [--out benchmarks/prompt_fidelity]

The world bench's prompt fidelity is the share of asked attributes the attribute probe reads back. 4 of
its 16 prompts ask for a hat or a bow, which the shipped base does not draw on an object (`limner world
check` measures it), so no method can score above about 0.875. This reads the report's images again
and gives, per row, how often each attribute was drawn, and prompt fidelity over the attributes the
base can draw (context and colour), mean and lowest subject.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from limner.evaluation.rows import class_prompt  # noqa: E402
from limner.evaluation.scoring import asked as attributes_asked  # noqa: E402
from limner.evaluation.scoring import load_rgb  # noqa: E402
from limner.evaluation.subjects import load_subjects  # noqa: E402
from limner.images import at_64px  # noqa: E402
from limner.models.loading import WORLD_PROBES  # noqa: E402
from limner.world.probes import Probes  # noqa: E402

DRAWABLE = ("context", "colour")  # what the shipped base draws when asked (world check: 1.00 / 0.94)


def read_row(row: dict, subjects: list, probes: Probes) -> dict:
    """Per attribute, the share of images that show it; per subject, prompt fidelity over DRAWABLE."""
    drawn: dict[str, list[bool]] = {}
    per_subject = {}
    for subject in subjects:
        scores = []
        for prompt in subject.prompts:
            want = attributes_asked(prompt)
            predicted = probes.predict(
                "attributes", at_64px(load_rgb(row["images"][subject.name][class_prompt(prompt.template, subject)]))
            )
            hits = {
                head: predicted[head].argmax(-1).numpy() == probes.labels("attributes", head).index(value)
                for head, value in want.items()
            }
            for head, h in hits.items():
                drawn.setdefault(head, []).extend(h.tolist())
            asked = [hits[head] for head in DRAWABLE if head in hits]
            scores.extend(np.mean(asked, axis=0).tolist())
        per_subject[subject.name] = float(np.mean(scores))
    lowest = min(per_subject, key=per_subject.get)
    return {
        "drawn": {head: float(np.mean(h)) for head, h in drawn.items()},
        "images_asked": {head: len(h) for head, h in drawn.items()},
        "prompt_fidelity_drawable": float(np.mean(list(per_subject.values()))),
        "lowest": [lowest, per_subject[lowest]],
        "per_subject": per_subject,
        "prompt_fidelity": row["mean"].get("prompt_fidelity"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, nargs="?", default=ROOT / "docs" / "world-bench" / "results.json")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "prompt_fidelity")
    args = ap.parse_args()
    report = json.loads(args.report.read_text())
    subjects = load_subjects("world:" + ",".join(s["name"] for s in report["subjects"]))
    probes = Probes(WORLD_PROBES)
    rows = {name: read_row(row, subjects, probes) for name, row in report["rows"].items()}
    lines = [
        "| row | prompt fidelity | context drawn | colour drawn | accessory drawn | prompt fidelity, context and colour only: mean | lowest subject |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        d = r["drawn"]
        lines.append(
            f"| {name} | {r['prompt_fidelity']:.3f} | {d['context']:.3f} | {d['colour']:.3f} | {d['accessory']:.3f} | "
            f"{r['prompt_fidelity_drawable']:.3f} | {r['lowest'][0]} {r['lowest'][1]:.3f} |"
        )
    note = (
        f"\nRead from `{args.report.relative_to(ROOT) if args.report.is_relative_to(ROOT) else args.report}` "
        f"({len(subjects)} subjects; images asked per attribute: {rows[next(iter(rows))]['images_asked']}). "
        "Command: `python benchmarks/prompt_fidelity_by_attribute.py`.\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"report": str(args.report), "rows": rows}, indent=1))
    (args.out / "results.md").write_text("\n".join(lines) + "\n" + note)
    print("\n".join(lines) + "\n" + note)


if __name__ == "__main__":
    main()
