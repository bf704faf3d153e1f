"""Adds the rows of newer `limner eval` runs to a published world-bench report (docs/world-bench/), beside
the rows already there, and writes the report again (table, plots, page).

The published rows' images live only in the report's `images/` folder (the eval cache that drew them
is gone), so their paths are pointed there first. A newer run must share the report's settings, base
and subjects: rows drawn any other way would not compare, and the script refuses them.

    python benchmarks/add_bench_rows.py docs/world-bench /work/bench-out/*/results.json

When a new adapter ships, the rows its predecessor drew keep their numbers under another name (`--rename
'ip_adapter=>ip_adapter, stage 1'`) or go (`--rename 'ip_adapter:scale=3.0=>'`), and the new rows take the names.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from limner.evaluation.report import write_report

SAME = ("settings", "base_fingerprint", "encoders")


def unset_dropped(value):
    """A settings dict without its unset (None) entries (a setting added since, left unset, draws as before) and
    without the layout steps, which every row records for itself."""
    if not isinstance(value, dict):
        return value
    return {k: v for k, v in value.items() if v is not None and k != "layout_steps"}


def published_image(report: Path, src: str) -> str:
    """Where the report keeps its copy of `src` (write_html names copies after the source's full path)."""
    name = hashlib.sha256(str(Path(src).resolve()).encode()).hexdigest()[:16] + Path(src).suffix
    copy = report / "images" / name
    return str(copy.resolve()) if copy.exists() else src


def repoint(report: Path, results: dict) -> dict:
    """The published rows' images, pointed at the report's copies; the page showed only some of them, and the
    others (no longer anywhere) are left out of the page, not out of the scores."""
    for row in results["rows"].values():
        for prompts in row["images"].values():
            for prompt, paths in prompts.items():
                prompts[prompt] = [q for q in (published_image(report, p) for p in paths) if Path(q).exists()]
    results["references"] = {
        s: [q for q in (published_image(report, p) for p in paths) if Path(q).exists()]
        for s, paths in results.get("references", {}).items()
    }
    return results


def renamed(rows: dict, items: list[str]) -> dict:
    """`rows` with each 'OLD=>NEW' of `items` applied in order, in their order; an empty NEW drops the row."""
    for old, _, new in (item.partition("=>") for item in items):
        if old not in rows:
            raise SystemExit(f"no row named {old!r} to rename; the rows are: {', '.join(rows)}")
        rows = {new if name == old else name: row for name, row in rows.items() if name != old or new}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="the published report folder (its results.json is read)")
    ap.add_argument("runs", type=Path, nargs="+", help="results.json of newer eval runs")
    ap.add_argument("--html-prompts", type=int, default=2, help="prompts per subject on the page (the report's 2)")
    ap.add_argument("--html-images", type=int, default=2, help="images per prompt on the page (the report's 2)")
    ap.add_argument("--label", action="append", default=[], help="'OLD=>NEW': show row OLD under the name NEW")
    ap.add_argument(
        "--rename",
        action="append",
        default=[],
        help="'OLD=>NEW': keep the published row OLD as NEW before the new rows are added (a newer row of the same "
        "name then stands beside it, e.g. after a new adapter ships); 'OLD=>' drops it",
    )
    args = ap.parse_args()
    results = repoint(args.report, json.loads((args.report / "results.json").read_text()))
    results["rows"] = renamed(results["rows"], args.rename)
    subjects = [s["name"] for s in results["subjects"]]
    for path in args.runs:
        run = json.loads(path.read_text())
        differ = [k for k in SAME if unset_dropped(run.get(k)) != unset_dropped(results.get(k))]
        if differ or [s["name"] for s in run["subjects"]] != subjects:
            raise SystemExit(f"{path}: {', '.join(differ) or 'subjects'} differ from {args.report}'s; not added")
        results["rows"].update(run["rows"])
        print(f"{path}: {', '.join(run['rows'])}")
    results["rows"] = renamed(results["rows"], args.label)
    write_report(results, args.report, args.html_prompts, args.html_images)


if __name__ == "__main__":
    main()
