"""Runs a `limner` command that kills itself with SIGKILL (kill -9: no cleanup, no finally, no flush) at a chosen
point of its training, as a power cut or the OOM killer would:

    python tests/reliability/killpoint.py step:3 -- train --method dreambooth ...
    python tests/reliability/killpoint.py checkpoint-write:4 -- train ...

- `step:N`: in the middle of the optimizer step after step N (its forward pass done, its backward pass not);
- `checkpoint-write:N`: while writing the checkpoint of step N, after half of its weights file reached the disk.

The points are hooks on the trainer's own functions, so each kill lands exactly where the test says on any machine
(a kill from outside at a moment in time would land wherever a loaded machine happened to be)."""

from __future__ import annotations

import os
import signal
import sys


def kill_now() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    import accelerate
    import safetensors.torch

    import limner.training.loop as loop

    where, step = point.split(":")
    step = int(step)
    if where == "step":
        saved = loop.save_checkpoint
        armed = []

        def save_then_arm(out, at, *args, **kwargs):
            path = saved(out, at, *args, **kwargs)
            if at == step:
                armed.append(True)
            return path

        backward = accelerate.Accelerator.backward

        def backward_or_die(self, loss, **kwargs):
            if armed:
                kill_now()
            return backward(self, loss, **kwargs)

        loop.save_checkpoint = save_then_arm
        accelerate.Accelerator.backward = backward_or_die
    elif where == "checkpoint-write":
        save_file = safetensors.torch.save_file

        def half_written(tensors, filename, metadata=None):
            if f"step-{step:06d}.tmp" not in str(filename):
                return save_file(tensors, filename, metadata=metadata)
            data = safetensors.torch.save(tensors, metadata=metadata)
            with open(filename, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            kill_now()

        safetensors.torch.save_file = half_written
    else:
        raise SystemExit(f"unknown kill point {point!r}: step:N or checkpoint-write:N")


def run_limner(args: list[str], point: str | None, log: str) -> None:
    """`limner ARGS` in this process, killed at `point` (None: never), its output into `log`: the body of a process
    forked from a server that has imported torch and diffusers once (multiprocessing's forkserver), so a run costs
    its work and not ~6 s of imports."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    torch.set_num_threads(1)  # every run the same arithmetic, whatever the machine
    if point:
        arm(point)
    from limner.cli import main

    sys.argv = ["limner", *args]
    main()  # ends the process with the command's exit code


# what the fork server imports before it forks any run
PRELOAD = [
    "torch",
    "accelerate",
    "peft",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "transformers.models.clip.modeling_clip",
    "limner.cli",
    "limner.models.loading",
    "limner.training.loop",
    "limner.methods.textual_inversion",
    "limner.methods.dreambooth",
    "limner.methods.custom_diffusion",
    "limner.methods.ip_adapter",
]


if __name__ == "__main__":
    point, dashes, *args = sys.argv[1:]
    assert dashes == "--", "usage: killpoint.py POINT -- LIMNER ARGS"
    arm(point)
    from limner.cli import main

    sys.argv = ["limner", *args]
    main()
