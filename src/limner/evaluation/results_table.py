"""The results table of an evaluation, once: its columns, each row's cells and which of them is best. The Markdown
report (results.md, the command's output) and the HTML page (a sortable table) are both written from it."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

from limner.evaluation.rows import DESCRIBED, FIDELITY_THRESHOLD, LOWER, UPPER

# (key, header, what it measures, whether lower is better), in display order; a column appears when any row has it
COLUMNS = [
    ("subject_fidelity", "subject fidelity", "is it this subject? (subject probe or identity cosine)", False),
    ("prompt_fidelity", "prompt fidelity", "share of the asked context / colour / accessory read back", False),
    ("class_accuracy", "class acc.", "the subject's images still read as its class (its form kept)", False),
    ("language_drift", "language drift", "subject fidelity of the class prompt alone: the concept leaking", True),
    ("class_prompt_accuracy", "class-prompt class acc.", "the class prompt alone still draws the class", False),
    ("dino", "DINO", "DINO similarity to the references", False),
    ("clip_i", "CLIP-I", "CLIP image similarity to the references", False),
    ("clip_t", "CLIP-T", "CLIP similarity of image and prompt", False),
    ("face_sim", "Face-Sim", "identity-embedding similarity to the references", False),
    ("face_div", "Face-Div", "identity-embedding diversity across seeds", False),
    ("diversity", "diversity", "mean pairwise CLIP distance across seeds", False),
]
TIME = "time_to_fidelity"
TIME_HEADER = f"train s to fidelity {FIDELITY_THRESHOLD}"
TIME_HELP = (
    f"mean training seconds until validation images reached subject fidelity {FIDELITY_THRESHOLD} (subjects that "
    "reached it / all); ranked by the subjects that reached it, then by seconds"
)
MISSED_WEIGHT_S = 1e6  # in a time cell's rank, each share of subjects that never reached fidelity outweighs any time
REFERENCES = (LOWER, UPPER, DESCRIBED)  # the scale every score is read against, not contenders for the best value


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    help: str
    lower_is_better: bool
    digits: int = 3  # as shown: values equal at this precision tie


@dataclass(frozen=True)
class Cell:
    text: str
    value: float | None = None  # what the cell sorts and ranks by; None: not measured ("—"); inf: never reached


@dataclass(frozen=True)
class Table:
    columns: list[Column]
    rows: dict[str, list[Cell]]

    def best(self) -> set[tuple[str, str]]:
        """(row, column key) of each column's best value among the methods (the bounds are references: the upper
        bound, renders of the subject itself, would win every fidelity column). A column with fewer than two
        values has no best; tied values are all best."""
        methods = [name for name in self.rows if name not in REFERENCES]
        marked = set()
        for i, col in enumerate(self.columns):
            values = {n: self.rows[n][i].value for n in methods if self.rows[n][i].value is not None}
            values = {n: round(v, col.digits) for n, v in values.items() if math.isfinite(v)}
            if len(values) < 2:
                continue
            best = (min if col.lower_is_better else max)(values.values())
            marked |= {(n, col.key) for n, v in values.items() if v == best}
        return marked


def time_cell(t: dict | None) -> Cell:
    """Time to fidelity, ranked by the share of subjects that reached it, then by the mean seconds of those that
    did: a method that reached it on 2 subjects of 12 in 8 s is not faster than one that reached it on all 12."""
    if not t:
        return Cell("—")
    if t["mean_seconds"] is None:
        return Cell(f"never (0/{t['of']})", math.inf)
    missed = (t["of"] - t["reached"]) / t["of"]
    return Cell(f"{t['mean_seconds']:.0f} ({t['reached']}/{t['of']})", MISSED_WEIGHT_S * missed + t["mean_seconds"])


def cell(column: Column, row: dict) -> Cell:
    if column.key == TIME:
        return time_cell(row.get(TIME))
    value = row["mean"].get(column.key)
    return Cell("—") if value is None else Cell(f"{value:.3f}", value)


def results_table(results: dict) -> Table:
    rows = results["rows"]
    cols = [Column(k, h, d, low) for k, h, d, low in COLUMNS if any(k in r["mean"] for r in rows.values())]
    if any(r.get(TIME) for r in rows.values()):
        cols.append(Column(TIME, TIME_HEADER, TIME_HELP, lower_is_better=True, digits=0))
    return Table(cols, {name: [cell(c, r) for c in cols] for name, r in rows.items()})


def markdown(table: Table) -> list[str]:
    lines = ["| method | " + " | ".join(c.header for c in table.columns) + " |", "|---|" + "---|" * len(table.columns)]
    lines += [f"| {name} | " + " | ".join(c.text for c in cells) + " |" for name, cells in table.rows.items()]
    return lines


# Sorts a table.sortable by the clicked column: best first on the first click (each header says which way is
# better), reversed on the next; cells without a value stay last either way. Inline: the page works offline.
SORT_SCRIPT = """<script>
for (const table of document.querySelectorAll('table.sortable')) {
  const heads = [...table.tHead.rows[0].cells];
  heads.forEach((th, i) => th.addEventListener('click', () => {
    const first = th.dataset.better === 'high' ? 'descending' : 'ascending';
    const dir = th.getAttribute('aria-sort') === first ? (first === 'ascending' ? 'descending' : 'ascending') : first;
    heads.forEach(h => h.removeAttribute('aria-sort'));
    th.setAttribute('aria-sort', dir);
    const key = row => row.cells[i].dataset.v;
    const body = table.tBodies[0];
    const rows = [...body.rows];
    rows.sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === undefined || y === undefined) {  // the method column: by name
        const order = a.cells[i].textContent.localeCompare(b.cells[i].textContent);
        return dir === 'ascending' ? order : -order;
      }
      if (x === '' || y === '') return (x === '') - (y === '');  // not measured: last
      return dir === 'ascending' ? parseFloat(x) - parseFloat(y) : parseFloat(y) - parseFloat(x);
    });
    rows.forEach(row => body.appendChild(row));
  }));
}
</script>"""

TABLE_STYLE = (
    "table.sortable{border-collapse:collapse;margin:8px 0}"
    "table.sortable th,table.sortable td{border:1px solid #ddd;padding:4px 8px}"
    "table.sortable td.num{text-align:right;font-variant-numeric:tabular-nums}"
    "table.sortable th{background:#f3f3f3;cursor:pointer;user-select:none;vertical-align:bottom}"
    "table.sortable thead th{max-width:9em} table.sortable tbody th{font-weight:normal;max-width:24em}"
    "table.sortable th[aria-sort=ascending]::after{content:' \\25B2'}"
    "table.sortable th[aria-sort=descending]::after{content:' \\25BC'}"
    "table.sortable td.best{font-weight:bold;background:#dff3df}"
    "table.sortable tr.reference td{color:#666;font-style:italic}"
)


def html_table(table: Table) -> str:
    """The table as HTML: sortable by clicking a header, each column's best value marked (class 'best')."""
    best = table.best()
    head = ["<th scope='col'>method</th>"]
    for c in table.columns:
        arrow, better = ("\u2193", "low") if c.lower_is_better else ("\u2191", "high")
        title = f"{c.help}; {'lower' if c.lower_is_better else 'higher'} is better"
        head.append(
            f"<th scope='col' data-key='{c.key}' data-better='{better}' title='{html.escape(title, quote=True)}'>"
            f"{html.escape(c.header).replace('-', '&#8209;')}&nbsp;{arrow}</th>"  # no line break inside CLIP-I
        )
    body = []
    for name, cells in table.rows.items():
        tds = [f"<th scope='row'>{html.escape(name)}</th>"]
        for c, cell in zip(table.columns, cells):
            marked = " best" if (name, c.key) in best else ""
            value = "" if cell.value is None else repr(cell.value) if math.isfinite(cell.value) else "1e308"
            tds.append(f"<td class='num{marked}' data-key='{c.key}' data-v='{value}'>{html.escape(cell.text)}</td>")
        kind = " class='reference'" if name in REFERENCES else ""
        body.append(f"<tr{kind}>" + "".join(tds) + "</tr>")
    return (  # in a box that scrolls sideways when the window is narrower than the table
        "<div style='overflow-x:auto'><table class='sortable' id='results'><thead><tr>"
        + "".join(head)
        + "</tr></thead><tbody>\n"
        + "\n".join(body)
        + "\n</tbody></table></div>"
    )
