"""The eval report's page: a results table (sortable, each column's best marked), notes, readable plots, offline."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

from limner.evaluation.report import markdown_table, write_report


def timed(reached: int, of: int, seconds: float | None) -> dict:
    return {"threshold": 0.5, "per_subject": {}, "reached": reached, "of": of, "mean_seconds": seconds}


def results() -> dict:
    def row(subject, prompt, drift, time=None):
        mean = {"subject_fidelity": subject, "prompt_fidelity": prompt}
        if drift is not None:
            mean["language_drift"] = drift
        return {"mean": mean, "per_subject": {}, "images": {}, "concepts": {}, "time_to_fidelity": time}

    return {
        "settings": {"images_per_prompt": 2, "seed": 0, "steps": 6, "scheduler": "dpm++", "guidance": 5.0},
        "world": True,
        "subjects": [{"name": "duo_ball", "class_noun": "ball", "kind": "object"}],
        "encoders": {"clip": "clip:world"},
        "probes": None,
        "rows": {
            "lower-bound": row(0.10, 0.86, 0.11),
            "upper-bound": row(0.95, 0.99, None),  # a reference: best everywhere, never marked
            "dreambooth": row(0.88, 0.80, 0.12, timed(12, 12, 27.0)),
            "textual_inversion": row(0.64, 0.90, 0.05, timed(2, 12, 8.0)),  # fast, but on 2 subjects of 12
        },
        "references": {},
    }


class ResultsTable(HTMLParser):
    """The cells of <table id='results'>: its headers' data-key, each row's name and cells (text, classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = self.in_body = False
        self.keys: list[str] = []
        self.rows: dict[str, dict[str, tuple[str, set[str]]]] = {}
        self.cell: dict | None = None
        self.row: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "results":
            self.inside = True
        elif self.inside and tag == "tbody":
            self.in_body = True
        elif self.inside and tag == "th" and not self.in_body and a.get("data-key"):
            self.keys.append(a["data-key"])
        elif self.in_body and tag in ("th", "td"):
            self.cell = {"key": a.get("data-key"), "classes": set((a.get("class") or "").split()), "text": ""}

    def handle_data(self, data):
        if self.cell is not None:
            self.cell["text"] += data

    def handle_endtag(self, tag):
        if tag == "table" and self.inside:
            self.inside = self.in_body = False
        elif self.cell is not None and tag in ("th", "td"):
            if self.cell["key"] is None:  # the row's name
                self.row = self.cell["text"]
                self.rows[self.row] = {}
            else:
                self.rows[self.row][self.cell["key"]] = (self.cell["text"], self.cell["classes"])
            self.cell = None


def test_report_page_has_a_sortable_table_with_each_columns_best_marked(tmp_path: Path):
    written = write_report(results(), tmp_path / "report")
    page = written["html"].read_text()
    table = ResultsTable()
    table.feed(page)
    assert table.keys == ["subject_fidelity", "prompt_fidelity", "language_drift", "time_to_fidelity"]
    assert list(table.rows) == ["lower-bound", "upper-bound", "dreambooth", "textual_inversion"]
    best = {(row, key) for row, cells in table.rows.items() for key, (_, css) in cells.items() if "best" in css}
    assert best == {
        ("dreambooth", "subject_fidelity"),  # the upper bound's 0.95 is a reference, not a method
        ("textual_inversion", "prompt_fidelity"),
        ("textual_inversion", "language_drift"),  # lower is better
        ("dreambooth", "time_to_fidelity"),  # all 12 subjects in 27 s beats 2 of 12 in 8 s
    }
    assert table.rows["dreambooth"]["subject_fidelity"][0] == "0.880"
    assert table.rows["upper-bound"]["language_drift"][0] == "—"
    assert table.rows["dreambooth"]["time_to_fidelity"][0] == "27 (12/12)"
    # the sort script is inline, each header says which way is better, and nothing is fetched from elsewhere
    assert "addEventListener('click'" in page and "data-better='low'" in page and "data-better='high'" in page
    assert "http://" not in page and "https://" not in page
    # no Markdown table in a <pre>; the notes are HTML; plots at their own size, each a link to itself
    assert "<pre>" not in page and "| method |" not in page and "<code>lower-bound</code>" in page
    assert "<a href='fidelity.png' title='open at full size'><img class='plot' src='fidelity.png'" in page


def test_markdown_table_ranks_nothing_and_reads_as_before(tmp_path: Path):
    text = markdown_table(results())
    assert text.splitlines()[:2] == [
        f"| method | subject fidelity | prompt fidelity | language drift | train s to fidelity {0.5} |",
        "|---|---|---|---|---|",
    ]
    assert "| textual_inversion | 0.640 | 0.900 | 0.050 | 8 (2/12) |" in text
    real = results() | {"world": False}
    assert "Reported in the papers on DreamBench" in markdown_table(real)
    page = write_report(real, tmp_path / "real")["html"].read_text()
    assert "<table class='papers'>" in page and json.loads((tmp_path / "real" / "results.json").read_text())


def test_training_curves_are_drawn_only_where_something_trained_per_subject(tmp_path: Path):
    zero_shot = results()
    encoded = {"concepts": {"duo_ball": {"seconds": 0.2}}}  # encoded from references: no training curve
    zero_shot["rows"]["ip_adapter"] = zero_shot["rows"].pop("dreambooth") | encoded
    written = write_report(zero_shot, tmp_path / "encoder")
    assert "training_curves" not in written and not (tmp_path / "encoder" / "training_curves.png").exists()
    tuned = results()
    curve = [{"step": s, "seconds": s * 0.5, "loss": 0.2 - s / 1000} for s in range(1, 41)]
    tuned["rows"]["dreambooth"]["concepts"] = {"duo_ball": {"curve": curve}}
    assert (tmp_path / "tuned" / "training_curves.png") == write_report(tuned, tmp_path / "tuned")["training_curves"]
