"""What each kind of job runs. Nothing here trains, draws or scores by itself:

- `train` and `eval` run `limner train` / `limner eval` as child processes, with the options a person would
  type, so a training can be cancelled (its process group ended), resumed (`--resume latest` in the same
  concept folder) and keeps running while pages come and go. Their progress is read from what the command
  prints (its own progress bar: step, loss, time left) and the validation images it writes;
- `generate` and `compare` call the body of `limner generate` in the server's process (the world base loads
  in well under a second, and a child process would spend ~10 s importing torch): each generation loads its
  own base, so several run at once without sharing installed concepts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from limner.app.db import Job

TRAIN, EVAL, GENERATE, COMPARE = "train", "eval", "generate", "compare"
# the kinds that hold the machine's one heavy slot (a training, or an evaluation that trains and scores)
HEAVY = (TRAIN, EVAL)
LIGHT = (GENERATE, COMPARE)
KINDS = HEAVY + LIGHT

# a tqdm status line: "desc:  40%|####      | 4/10 [00:05<00:07, 1.2s/it, loss=0.1234, lr=5e-3]"
BAR = re.compile(
    r"(?:(?P<desc>[^|\r\n]*?):\s+\d+%\|[^|]*\|\s*)?(?P<step>\d+)/(?P<total>\d+)\s+\[(?P<elapsed>[\d:]+)<(?P<left>[\d:?]+)"
    r"(?P<rest>[^\]]*)\]"
)
LOSS = re.compile(r"loss=(?P<loss>[-+\d.eE]+)")


@dataclass
class Context:
    """What a running job may tell its worker, and ask it."""

    library: Path
    base: str | None
    log: Path
    report: Callable[[dict[str, Any]], None]  # progress, as JSON
    started: Callable[[int], None]  # a child process's id, so a cancel or a restart can end it
    cancelled: Callable[[], bool]


def clock_seconds(text: str) -> float | None:
    """tqdm's "01:02" or "1:01:02" as seconds; None for "?"."""
    if "?" in text:
        return None
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def parse_progress(text: str) -> dict[str, Any] | None:
    """The last progress bar state in a command's output (tqdm redraws its line with carriage returns)."""
    last = None
    for m in BAR.finditer(text):
        last = m
    if last is None:
        return None
    loss = LOSS.search(last["rest"])
    return {
        "stage": (last["desc"] or "").strip(),
        "step": int(last["step"]),
        "total": int(last["total"]),
        "elapsed_s": clock_seconds(last["elapsed"]),
        "left_s": clock_seconds(last["left"]),
        "loss": float(loss["loss"]) if loss else None,
    }


def limner_command(*args: str) -> list[str]:
    """The command line a person would type, run with this interpreter (the app's own limner)."""
    return [sys.executable, "-m", "limner.cli", *args]


def train_command(params: dict[str, Any], base: str | None) -> list[str]:
    args = ["train", "--method", params["method"], "--subject", params["subject"], "--out", params["out"]]
    if params.get("class_noun"):
        args += ["--class-noun", params["class_noun"]]
    if params.get("steps"):
        args += ["--steps", str(int(params["steps"]))]
    for key, value in params.get("settings", {}).items():
        args += ["--set", f"{key}={value}"]
    if params.get("resume"):
        args += ["--resume", "latest"]
    if base:
        args += ["--base", base]
    return limner_command(*args)


def eval_command(params: dict[str, Any], library: Path, base: str | None) -> list[str]:
    args = ["eval", "--concept", params["concept"], "--subjects", params["subjects"], "--out", params["out"]]
    args += ["-n", str(params.get("images", 1)), "--steps", str(params.get("steps", 25)), "--no-bounds"]
    if params.get("prompts"):
        args += ["--prompts", str(params["prompts"])]
    args += ["--cache", str(library / ".eval-cache")]
    if base:
        args += ["--base", base]
    return limner_command(*args)


def run_command(argv: list[str], ctx: Context, watch: Path | None = None) -> int:
    """Runs a limner command as its own process group, its output into the job's log, its progress bar and any
    validation images under `watch` reported as they appear. Returns the exit code."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ctx.log.parent.mkdir(parents=True, exist_ok=True)
    with open(ctx.log, "ab") as log:
        log.write(("$ " + " ".join(argv[2:]) + "\n").encode())
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        ctx.started(proc.pid)
        tail = ""
        assert proc.stdout is not None
        while True:
            chunk = proc.stdout.read1(65536)
            if not chunk:
                break
            log.write(chunk)
            log.flush()
            tail = (tail + chunk.decode(errors="replace"))[-4000:]
            state = parse_progress(tail) or {}
            if watch is not None:
                state["validation"] = [str(p) for p in sorted((watch / "validation").glob("*.png"))]
            if state:
                ctx.report(state)
        return proc.wait()


def end_process_group(pid: int, wait_s: float = 10.0) -> None:
    """Ends a job's child process and everything it started (accelerate launches more): SIGTERM, then SIGKILL."""
    import time

    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def last_error(log: Path) -> str:
    """The command's own one-line error, or else the last line it printed."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]", log.read_text(errors="replace")) if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["the command failed and printed nothing"])[-1]


def run_train(job: Job, ctx: Context) -> dict[str, Any]:
    out = Path(job.params["out"])
    if run_command(train_command(job.params, ctx.base), ctx, watch=out) != 0:
        raise JobFailed(last_error(ctx.log))
    return {"concept": str(out)}


def run_eval(job: Job, ctx: Context) -> dict[str, Any]:
    out = Path(job.params["out"])
    if run_command(eval_command(job.params, ctx.library, ctx.base), ctx) != 0:
        raise JobFailed(last_error(ctx.log))
    return {
        "report": str(out / "index.html"),
        "markdown": str(out / "results.md"),
        "plots": [str(p) for p in (out / "fidelity.png", out / "training_curves.png") if p.exists()],
    }


def generate_into(out: Path, params: dict[str, Any], base: str | None, prompt: str) -> dict[str, Any]:
    """One `limner generate` into `out`, in this process; returns its record (with the files' full paths)."""
    from limner.commands.generate import generate

    # the command's body without its exit-code wrapper: a LimnerError reaches the worker, which records it
    generate.__wrapped__(  # the options a person would give; every other one keeps the command's default
        prompt=prompt,
        num_images=int(params.get("num_images", 1)),
        seed=int(params.get("seed", 0)),
        steps=int(params.get("steps", 25)),
        guidance=float(params.get("guidance", 5.0)),
        negative=params.get("negative", ""),
        scheduler=params.get("scheduler", "dpm++"),
        height=params.get("height") or None,
        width=params.get("width") or None,
        regions=bool(params.get("regions")),
        out=out,
        concept=[Path(c) for c in params.get("concepts", [])] or None,
        # reference images of the subject, encoded on the fly by an encoder method (`--image`, `--method`)
        image=[Path(p) for p in params.get("images", [])] or None,
        method=params.get("method") if params.get("images") else None,
        setting=params.get("settings") if params.get("images") else None,
        layout_steps=params.get("layout_steps"),
        base=base,
    )
    record_path = sorted(out.glob("[0-9]*.json"))[-1]
    record = json.loads(record_path.read_text())
    record["record_path"] = str(record_path)
    record["image_paths"] = [str(out / f) for f in record["files"]["images"]]
    record["grid_path"] = str(out / record["files"]["grid"])
    return record


def job_output(job: Job, ctx: Context, name: str) -> Path:
    """Where a job writes: the folder its page named, else `name` in the job's own folder (the page names the same
    one once it knows the job's id, and a worker may claim the job before it does)."""
    return Path(job.params.get("out") or ctx.log.parent / name)


def run_generate(job: Job, ctx: Context) -> dict[str, Any]:
    record = generate_into(job_output(job, ctx, "images"), job.params, ctx.base, job.params["prompt"])
    return {"record": record["record_path"], "images": record["image_paths"], "grid": record["grid_path"]}


def run_compare(job: Job, ctx: Context) -> dict[str, Any]:
    """One prompt template and seed for each concept: its words in the template's {} (as the bench does)."""
    from PIL import Image

    from limner.conditioning import concept_prompt
    from limner.generation import make_grid

    out = job_output(job, ctx, "compare")
    columns = []
    for i, concept in enumerate(job.params["concepts"]):
        if ctx.cancelled():
            break
        prompt = concept_prompt(Path(concept), job.params["template"])
        single = dict(job.params, concepts=[concept])
        record = generate_into(out / f"{i:02d}-{Path(concept).name}", single, ctx.base, prompt)
        columns.append({"concept": concept, "prompt": prompt, "images": record["image_paths"]})
        ctx.report({"step": i + 1, "total": len(job.params["concepts"])})
    rows = max((len(c["images"]) for c in columns), default=0)
    # one column per concept: the grid is filled row by row, so image i of every concept makes row i
    images = [Image.open(c["images"][r]) for r in range(rows) for c in columns if r < len(c["images"])]
    grid = out / "compare-grid.png"
    if images:
        make_grid(images, cols=len(columns)).save(grid)
    return {"columns": columns, "grid": str(grid) if images else None}


class JobFailed(Exception):
    """A job's own failure, with the one line that explains it."""


RUNNERS: dict[str, Callable[[Job, Context], dict[str, Any]]] = {
    TRAIN: run_train,
    EVAL: run_eval,
    GENERATE: run_generate,
    COMPARE: run_compare,
}
