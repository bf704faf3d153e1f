"""kill -9 during training, then `--resume latest`: for each tuning method and for adapter pretraining, a run killed
in the middle of a step and again while it writes a checkpoint ends, once resumed, with weights bit-identical to a
run never interrupted; a killed run leaves nothing that `generate` accepts, and a kill during a checkpoint write
leaves the previous checkpoint whole and used.

The kills are real SIGKILLs of a `limner` process (tests/reliability/killpoint.py chooses the point; it also runs
as a script: `python tests/reliability/killpoint.py step:2 -- train ...`)."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from limner.cli import app
from reliability.killpoint import PRELOAD, run_limner

STEPS, EVERY = 6, 2  # checkpoints at 2, 4, 6; killed in step 3, then while writing step 4's


def forkserver():
    """Runs fork from one server that imported torch, diffusers and limner once (see killpoint.run_limner)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


CTX = forkserver()
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def limner(*args, log: Path, kill: str | None = None):
    """`limner ARGS` in a process of its own, killed with SIGKILL at the point `kill` names (killpoint.arm). One
    thread each: the same arithmetic in every run, and two runs side by side on a small machine. The fork server
    takes the environment when the first run starts it, so it is set for that moment only (not for other tests)."""
    proc = CTX.Process(target=run_limner, args=([str(a) for a in args], kill, str(log)))
    saved = {k: os.environ.get(k) for k in ONE_THREAD}
    os.environ.update(ONE_THREAD)
    try:
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return proc, log


def finished(run) -> tuple[int, str]:
    proc, log = run
    proc.join(300)
    return proc.exitcode, log.read_text()


def weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every weights file a finished run leaves (its checkpoints aside), by path inside the folder."""
    return {
        str(p.relative_to(folder)): load_file(str(p))
        for p in sorted(folder.rglob("*.safetensors"))
        if "checkpoints" not in p.relative_to(folder).parts
    }


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a.values(), b.values())
    )


def generate_accepts(kind: str, out: Path, ip_base: Path, refs: Path, tiny_base: Path) -> bool:
    """Whether `limner generate` takes the killed run's folder as a concept (or adapter)."""
    if kind == "pretrain":
        args = [
            "--base",
            str(ip_base),
            "--method",
            "ip_adapter",
            "--adapter",
            str(out),
            "--image",
            str(refs / "0.png"),
        ]
    else:
        args = ["--base", str(tiny_base), "--concept", str(out)]
    r = CliRunner().invoke(
        app, ["generate", "a ball", "-n", "1", "--steps", "1", "--out", str(out.parent / "x"), *args]
    )
    return r.exit_code == 0


RUNS = {
    "textual_inversion": ["train", "--method", "textual_inversion"],
    "dreambooth": ["train", "--method", "dreambooth", "--set", "prior_preservation=none"],
    "dreambooth_lora": ["train", "--method", "dreambooth_lora", "--set", "prior_preservation=none"],
    "custom_diffusion": ["train", "--method", "custom_diffusion", "--set", "prior_preservation=false"],
    "ip_adapter pretraining": ["pretrain", "--method", "ip_adapter", "--lr", "0.01"],
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_base):
    from helpers import image_folder, pretraining_folder, tiny_ip_base

    root = tmp_path_factory.mktemp("faults")
    return {
        "refs": image_folder(root / "refs", n=3),
        "data": pretraining_folder(root / "data"),
        "ip_base": tiny_ip_base(root / "ip-base"),
        "tiny_base": Path(tiny_base),
    }


@pytest.mark.parametrize("run", list(RUNS))
def test_killed_twice_then_resumed_is_bit_identical(inputs, tmp_path, report, run):
    kind = RUNS[run][0]
    if kind == "pretrain":
        given = ["--data", inputs["data"], "--base", inputs["ip_base"], "--batch-size", "2"]
    else:
        given = [
            "--subject",
            inputs["refs"],
            "--class-noun",
            "ball",
            "--base",
            inputs["tiny_base"],
            "--batch-size",
            "1",
        ]
    args = [*RUNS[run], *given, "--steps", STEPS, "--set", f"checkpoint_every={EVERY}"]
    # one folder name: a concept's default token is its folder's name
    straight, out = tmp_path / "straight" / "concept", tmp_path / "killed" / "concept"
    logs = tmp_path / "logs"
    logs.mkdir()
    t0 = time.monotonic()
    # the uninterrupted run and the first killed one side by side
    reference = limner(*args, "--out", straight, log=logs / "straight.txt")
    first = limner(*args, "--out", out, kill="step:2", log=logs / "1.txt")
    (code_ref, log_ref), (code_1, _) = finished(reference), finished(first)
    assert code_ref == 0, log_ref
    after_1 = sorted(p.name for p in (out / "checkpoints").iterdir())
    accepted_1 = generate_accepts(kind, out, inputs["ip_base"], inputs["refs"], inputs["tiny_base"])
    # resumed, and killed again while writing the checkpoint of step 4
    code_2, _ = finished(
        limner(*args, "--out", out, "--resume", "latest", kill="checkpoint-write:4", log=logs / "2.txt")
    )
    after_2 = sorted(p.name for p in (out / "checkpoints").iterdir())
    accepted_2 = generate_accepts(kind, out, inputs["ip_base"], inputs["refs"], inputs["tiny_base"])
    # resumed to the end
    code_3, log_3 = finished(limner(*args, "--out", out, "--resume", "latest", log=logs / "3.txt"))
    same = code_3 == 0 and bool(weights(straight)) and identical(weights(straight), weights(out))
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp"))
    seconds = time.monotonic() - t0
    report.case(
        "faults",
        "CLI",
        f"{kind} --method {RUNS[run][2]}: {STEPS} steps, a checkpoint every {EVERY}; kill -9 in step 3, resume; "
        "kill -9 while writing step 4's checkpoint, resume",
        "killed runs exit -9 leaving no concept generate accepts; the half-written checkpoint is skipped for the "
        "previous one; final weights bit-identical to an uninterrupted run",
        f"exits {code_1}, {code_2}, {code_3}; checkpoints after kill 1: {after_1}, after kill 2: {after_2}; "
        f"generate accepted the killed folder: {accepted_1 or accepted_2}; "
        f"{len(weights(out))} weights files bit-identical: {same}; left-over .tmp: {left or 'none'} ({seconds:.0f} s)",
    )
    assert code_1 == code_2 == -9
    assert after_1 == ["step-000002"] and after_2 == ["step-000002", "step-000004.tmp"]
    assert not accepted_1 and not accepted_2
    # the control: generate takes the finished runs (so a refusal above is the killed folder's, not a broken command)
    assert generate_accepts(kind, out, inputs["ip_base"], inputs["refs"], inputs["tiny_base"])
    assert "resuming at step 2/6" in log_3, log_3
    assert same, log_3
    assert not left
