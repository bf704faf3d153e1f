"""Adds the rows of newer `limner eval` runs to a published world-bench report (docs/world-bench/), beside
the rows already there, and writes the report again (table, plots, page).

The published rows' images live only in the report's `images/` folder (the eval cache that drew them
is gone), so their paths are pointed there first. A newer run must share the report's settings, base
and subjects: rows drawn any other way would not compare, and the script refuses them.

    python benchmarks/add_bench_rows.py docs/world-bench /work/bench-out/*/results.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from limner.evaluation.report import write_report

SAME = ("settings", "base_fingerprint", "encoders")


def published_image(report: Path, src: str) -> str:
    """Where the report keeps its copy of `src` (write_html names copies after the source's full path)."""
    name = hashlib.sha256(str(Path(src).resolve()).encode()).hexdigest()[:16] + Path(src).suffix
    copy = report / "images" / name
    return str(copy.resolve()) if copy.exists() else src


def repoint(report: Path, results: dict) -> dict:
    for row in results["rows"].values():
        for prompts in row["images"].values():
            for prompt, paths in prompts.items():
                prompts[prompt] = [published_image(report, p) for p in paths]
    results["references"] = {
        s: [published_image(report, p) for p in paths] for s, paths in results.get("references", {}).items()
    }
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="the published report folder (its results.json is read)")
    ap.add_argument("runs", type=Path, nargs="+", help="results.json of newer eval runs")
    args = ap.parse_args()
    results = repoint(args.report, json.loads((args.report / "results.json").read_text()))
    subjects = [s["name"] for s in results["subjects"]]
    for path in args.runs:
        run = json.loads(path.read_text())
        differ = [k for k in SAME if run.get(k) != results.get(k)]
        if differ or [s["name"] for s in run["subjects"]] != subjects:
            raise SystemExit(f"{path}: {', '.join(differ) or 'subjects'} differ from {args.report}'s; not added")
        results["rows"].update(run["rows"])
        print(f"{path}: {', '.join(run['rows'])}")
    write_report(results, args.report)


if __name__ == "__main__":
    main()
