"""How well the subject probe reads pictures in the base model's own style, whose subject is known exactly.

    python benchmarks/subject_probe.py [--probes DIR ...] [--per-subject 16] [--out benchmarks/subject_probe]

Renders of the 12 held-out subjects are noised to 0.4 and to 0.6 and redrawn by the world base given only
"a CLASS CONTEXT" (`limner.world.check.redrawn_subjects`); each probe folder given (default: the shipped
one) reads them. The first subject probe, trained on crisp renders alone, is in git history:

    mkdir -p /tmp/probe1 && for f in subject.json subject.safetensors; do
        git show 8b0b82f:src/limner/assets/world/probes/$f > /tmp/probe1/$f; done
    python benchmarks/subject_probe.py --probes /tmp/probe1 --probes src/limner/assets/world/probes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from limner.models.loading import WORLD_PROBES, load_base  # noqa: E402
from limner.world.bench import SUBJECTS  # noqa: E402
from limner.world.check import REDRAW_STRENGTHS, redrawn_subjects, subject_hits  # noqa: E402
from limner.world.probes import Probes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--probes", type=Path, action="append", help="A probes folder holding subject.safetensors (repeatable)."
    )
    ap.add_argument("--per-subject", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "subject_probe")
    args = ap.parse_args()
    folders = args.probes or [WORLD_PROBES]
    base = load_base(device="cpu")
    sets = {s: redrawn_subjects(base, s, args.per_subject) for s in REDRAW_STRENGTHS}
    results = {}
    for folder in folders:
        probes = Probes(folder)
        row = {}
        for strength, (images, labels) in sets.items():
            hit = subject_hits(probes, images, labels)
            row[str(strength)] = {
                "accuracy": float(hit.mean()),
                "per_subject": {s.name: float(hit[labels == i].mean()) for i, s in enumerate(SUBJECTS)},
            }
        results[str(folder)] = row
    lines = [
        f"Subject probe accuracy (argmax among the 12 held-out subjects) on {args.per_subject} redrawn renders per "
        "subject and strength.",
        "",
    ]
    header = "| probes | strength | all | " + " | ".join(s.name for s in SUBJECTS) + " |"
    lines += [header, "|" + "---|" * (3 + len(SUBJECTS))]
    for folder, row in results.items():
        for strength, r in row.items():
            cells = " | ".join(f"{r['per_subject'][s.name]:.2f}" for s in SUBJECTS)
            lines.append(f"| {folder} | {strength} | {r['accuracy']:.3f} | {cells} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(table + "\n")
    (args.out / "results.json").write_text(
        json.dumps({"per_subject_images": args.per_subject, "results": results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
