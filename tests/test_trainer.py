"""The shared training loop, on a tiny random pipeline (training is the point here, quality is not: that is
measured on the world bench): resume, mixed precision and the frozen weights held in half, validation
images, a full disk, the shared data (captions, mirrored images, the masked loss) and accelerate launch
with two processes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import db_train, image_folder, subject, ti_config
from safetensors.torch import load_file

from limner.errors import LimnerError
from limner.methods import Subject, get_method
from limner.models.loading import load_base
from limner.training import TrainConfig, TrainingTask


def test_one_process_trains_in_full_then_mixed_precision(tiny_base, tmp_path):
    """accelerate refuses a second Accelerator with another precision in the same process: a notebook
    that trains twice, or an eval comparing precisions, must still work, and bf16 must still learn."""
    method = get_method("textual_inversion")
    outs = [
        method.personalize(
            load_base(str(tiny_base), device="cpu"),
            subject(),
            tmp_path / f"{i}-{p}",
            **ti_config(2, mixed_precision=p),
        )
        for i, p in enumerate(("no", "bf16", "no"))
    ]
    vectors = [load_file(str(o / "learned_embeds.safetensors"))["<s*>"] for o in outs]
    assert torch.equal(vectors[0], vectors[2]), "the full-precision run after a bf16 one is the run it was before"
    assert not torch.equal(vectors[0], vectors[1]), "bf16 autocast took effect"


def test_mixed_precision_holds_frozen_weights_in_half_and_gives_them_back(tmp_path):
    """What does not train is held in bf16 while training (half the memory of a frozen UNet), what trains
    stays fp32, and validation and everything after training see the frozen weights exactly as they were."""
    from torch import nn

    from limner.training import TrainingTask, train

    class Probe(TrainingTask):
        def __init__(self):
            torch.manual_seed(0)
            self.frozen, self.head = nn.Linear(4, 4).requires_grad_(False), nn.Linear(4, 1)
            self.frozen.weight.data = self.frozen.weight.data.bfloat16().float()  # stored in bf16: exact both ways
            self.seen = []

        def modules(self):
            return {"model": nn.Sequential(self.frozen, self.head)}

        def trainable_parameters(self):
            return list(self.head.parameters())

        def loss(self, batch, generator):
            self.seen.append((self.frozen.weight.dtype, self.head.weight.dtype))
            assert self.frozen.bias.dtype == torch.float32
            return self.head(self.frozen(batch["x"])).pow(2).mean()

        def trainable_state(self):
            return dict(self.head.state_dict())

        def load_trainable_state(self, state):
            self.head.load_state_dict(state)

    task, validated = Probe(), []
    before = task.frozen.weight.detach().clone()
    cfg = TrainConfig(max_steps=2, mixed_precision="bf16", checkpoint_every=0, validate_every=1)
    train(
        task,
        lambda g: {"x": torch.randn(2, 4, generator=g)},
        cfg,
        tmp_path,
        validate=lambda step: validated.append(task.frozen.weight.dtype),
    )
    assert task.seen == [(torch.bfloat16, torch.float32)] * 2
    assert validated == [torch.float32] * 2, "validation draws with the weights the pipeline had"
    assert task.frozen.weight.dtype == torch.float32 and torch.equal(task.frozen.weight, before), "given back exactly"
    # the bias is not exact in bf16: on a CPU it would need a copy beside the half weights, so it stays fp32
    assert task.frozen.bias.dtype == torch.float32


def test_masked_loss_weighs_the_subject_and_not_its_backgrounds(tiny_base, tmp_path):
    """background_weight=w with the subject's masks: each latent pixel's loss weighs 1 on the subject and
    w off it (mirrored with a mirrored image); w=1 is the paper's whole-image loss, w=0 trains otherwise."""
    from limner.training.data import subject_loss_weights

    images = subject().images
    masks = [np.zeros(im.shape[:2], bool) for im in images]
    for m in masks:
        m[:, :28] = True  # the subject: the left 28 of 48 columns, 24 of the 40 that the centre crop keeps
    blob = Subject("blob", "ball", images, masks=masks)

    w = subject_loss_weights(blob, 32, 4, True, 0.25)  # centre crop 40 x 40 -> 32 x 32 -> a 4 x 4 latent
    assert w.shape == (6, 1, 4, 4)
    assert torch.allclose(w[0, 0, :, :2], torch.ones(4, 2), atol=0.01) and torch.allclose(
        w[0, 0, :, 3], torch.full((4,), 0.25), atol=0.01
    )
    assert 0.25 < float(w[0, 0, 0, 2]) < 1, "a latent pixel on the subject's edge weighs in between"
    assert torch.equal(w[3], w[0].flip(-1)), "a mirrored image gets the mirrored mask"
    with pytest.raises(LimnerError, match="one mask per reference image"):
        subject_loss_weights(Subject("blob", "ball", images, masks=masks[:2]), 32, 4, False, 0.0)

    def vectors(name, **settings):
        out = get_method("textual_inversion").personalize(
            load_base(str(tiny_base), device="cpu"), blob, tmp_path / name, **ti_config(3), **settings
        )
        return load_file(str(out / "learned_embeds.safetensors"))["<s*>"].float()

    whole = vectors("whole")
    assert torch.allclose(vectors("w1", background_weight=1.0), whole, atol=1e-3)
    assert not torch.allclose(vectors("w0", background_weight=0.0), whole, atol=1e-3), "the masks reached the loss"
    with pytest.raises(LimnerError, match="background_weight"):
        vectors("bad", background_weight=2.0)
    with pytest.raises(LimnerError, match="masks/NAME.png"):
        get_method("textual_inversion").personalize(
            load_base(str(tiny_base), device="cpu"),
            subject(),
            tmp_path / "no-masks",
            **ti_config(1),
            background_weight=0.5,
        )


def test_reference_images_are_mirrored_only_when_asked(tiny_base, tmp_path):
    """A subject is often not symmetric (a logo, text): flipping is an opt-in setting (flip=true),
    which adds each reference image's mirror image to the training data."""

    from limner.training.data import encode_images, fit_square

    base = load_base(str(tiny_base), device="cpu")
    vae, res, images = base.pipe.vae, base.resolution, subject().images
    plain, both = encode_images(vae, images, res), encode_images(vae, images, res, flip=True)
    assert len(plain.mean) == 3 and both.source.tolist() == [0, 1, 2, 0, 1, 2]
    mirrored = encode_images(vae, [fit_square(im, res)[:, ::-1].copy() for im in images], res)
    assert torch.allclose(both.mean[3:], mirrored.mean, atol=1e-5)

    ti = get_method("textual_inversion")
    a = ti.personalize(base, subject(), tmp_path / "a", **ti_config(2))
    b = ti.personalize(load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "b", **ti_config(2, flip=True))
    vectors = [load_file(str(c / "learned_embeds.safetensors"))["<s*>"] for c in (a, b)]
    assert not torch.equal(*vectors), "flip=true trains on other images"


def test_captions_reach_the_training_prompts_and_can_be_turned_off(tiny_base, tmp_path):
    base = load_base(str(tiny_base), device="cpu")
    s = subject()
    s.captions = ["on the beach", "in the snow", ""]
    db = get_method("dreambooth_lora")
    out = db.personalize(base, s, tmp_path / "c", train=db_train(), prior_preservation="none")
    prompts = json.loads((out / "limner.json").read_text())["training_prompts"]
    assert prompts == ["a sks ball on the beach", "a sks ball in the snow", "a sks ball"]
    off = db.personalize(
        load_base(str(tiny_base), device="cpu"),
        s,
        tmp_path / "d",
        train=db_train(),
        prior_preservation="none",
        captions=False,
    )
    assert json.loads((off / "limner.json").read_text())["training_prompts"] == ["a sks ball"] * 3
    s.captions = ["on the beach"]
    with pytest.raises(LimnerError, match="1 captions for 3 images"):
        get_method("textual_inversion").personalize(base, s, tmp_path / "e", **ti_config(1))


def test_resume_latest_gives_the_same_result_as_an_uninterrupted_run(tiny_base, tmp_path):

    straight = get_method("textual_inversion").personalize(
        load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "a", **ti_config(6)
    )
    # interrupted after 4 steps (checkpoint at 4), then resumed to 6
    get_method("textual_inversion").personalize(
        load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "b", **ti_config(4)
    )
    resumed = get_method("textual_inversion").personalize(
        load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "b", **ti_config(6, resume="latest")
    )
    a = load_file(str(straight / "learned_embeds.safetensors"))["<s*>"]
    b = load_file(str(resumed / "learned_embeds.safetensors"))["<s*>"]
    assert torch.equal(a, b)


def test_resume_with_other_settings_is_refused(tiny_base, tmp_path):
    get_method("textual_inversion").personalize(
        load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "c", **ti_config(2)
    )
    cfg = ti_config(4, resume="latest")
    cfg["train"].learning_rate = 1e-3
    with pytest.raises(LimnerError, match="learning_rate"):
        get_method("textual_inversion").personalize(
            load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "c", **cfg
        )


def test_validation_images_and_a_full_disk(tiny_base, tmp_path, monkeypatch):
    import errno

    import limner.methods.textual_inversion as ti

    base = load_base(str(tiny_base), device="cpu")
    cfg = ti_config(4)
    cfg["train"].validate_every = 2
    out = get_method("textual_inversion").personalize(base, subject(), tmp_path / "c", **cfg)
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000002.png", "step-000004.png"]
    before = (out / "learned_embeds.safetensors").read_bytes()

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ti, "save_file", full_disk)
    with pytest.raises(LimnerError, match="disk is full"):
        get_method("textual_inversion").personalize(
            load_base(str(tiny_base), device="cpu"), subject(), tmp_path / "c", **ti_config(6, resume="latest")
        )
    assert (out / "learned_embeds.safetensors").read_bytes() == before, "the earlier artifact is intact"


def _launch(processes: int, tiny_base, folder, out, *args: str):
    """`limner train` of Textual Inversion on the tiny base, under `accelerate launch` with N gloo processes
    on the CPU (a CPU-only machine runs `--multi_gpu` as gloo processes)."""
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--module",
        "limner.cli",
        "train",
        "--method",
        "textual_inversion",
        "--subject",
        str(folder),
        "--class-noun",
        "ball",
        "--batch-size",
        "1",
        "--base",
        str(tiny_base),
        "--out",
        str(out),
        "--device",
        "cpu",
        *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_cpu_processes_under_accelerate_launch(tiny_base, tmp_path):
    proc = _launch(2, tiny_base, image_folder(tmp_path / "subj"), tmp_path / "c", "--steps", "3")
    manifest = json.loads((tmp_path / "c" / "limner.json").read_text())
    assert manifest["num_processes"] == 2 and manifest["steps"] == 3
    assert proc.stdout.count("concept written") == 1, "one process writes the artifact"


def test_two_processes_resume_exactly_and_follow_the_one_process_lr_schedule(tiny_base, tmp_path):
    """Each process draws its own batches and noise, so each process's generator state is in the checkpoint
    (restoring process 0's in both made them draw the same batches after a resume); and the learning rate
    follows the same curve per optimizer step whatever the number of processes (accelerate's scheduler stepped
    once per process: a cosine reached its end halfway with two)."""
    import shutil

    from typer.testing import CliRunner

    from limner.cli import app

    folder = image_folder(tmp_path / "subj")
    run = ["--steps", "4", "--set", "lr_schedule=cosine", "--set", "lr_warmup_steps=1"]
    run += ["--set", "checkpoint_every=1", "--set", "keep_checkpoints=4", "--token", "<s*>"]  # one token in both
    _launch(2, tiny_base, folder, tmp_path / "straight", *run)
    # the straight run's checkpoint at step 1 is what a run killed after step 1 leaves behind (killed later, the
    # old schedule's steps after the resume all had a learning rate of 0: they learned nothing to compare)
    shutil.copytree(tmp_path / "straight/checkpoints/step-000001", tmp_path / "resumed/checkpoints/step-000001")
    _launch(2, tiny_base, folder, tmp_path / "resumed", *run, "--resume", "latest")
    vectors = [load_file(str(tmp_path / d / "learned_embeds.safetensors"))["<s*>"] for d in ("straight", "resumed")]
    assert torch.equal(*vectors), "the resumed run ends where the uninterrupted one does"

    common = ["--subject", str(folder), "--class-noun", "ball", "--batch-size", "1", "--base", str(tiny_base)]
    r = CliRunner().invoke(
        app,
        ["train", "--method", "textual_inversion", *common, "--out", str(tmp_path / "one"), "--device", "cpu", *run],
    )
    assert r.exit_code == 0, r.output

    def lrs(name):
        return [row["lr"] for row in json.loads((tmp_path / name / "limner.json").read_text())["curve"]]

    assert lrs("one") == pytest.approx([5e-3, 5e-3, 3.75e-3, 1.25e-3])  # warm-up, then the cosine from step 1 to 4
    assert lrs("straight") == lrs("resumed") == lrs("one")

    # one process cannot go on with the batches of two
    shutil.copytree(tmp_path / "straight/checkpoints/step-000001", tmp_path / "single/checkpoints/step-000001")
    r = CliRunner().invoke(
        app,
        ["train", "--method", "textual_inversion", *common, "--out", str(tmp_path / "single"), "--device", "cpu"]
        + [*run, "--resume", "latest"],
    )
    assert r.exit_code != 0 and "written by 2 process(es)" in r.output, r.output


class _Line(TrainingTask):
    """A linear model on random data: the loop's bookkeeping is the point, not the model."""

    def __init__(self):
        torch.manual_seed(0)
        self.model, self.seen = torch.nn.Linear(4, 1), []

    def modules(self):
        return {"model": self.model}

    def trainable_parameters(self):
        return list(self.model.parameters())

    def loss(self, batch, generator):
        return (self.wrapped["model"](batch["x"]) - batch["x"].sum(1, keepdim=True)).pow(2).mean()

    def after_optimizer_step(self):
        self.seen.append([p.detach().clone() for p in self.model.parameters()])

    def trainable_state(self):
        return dict(self.model.state_dict())

    def load_trainable_state(self, state):
        self.model.load_state_dict(state)


def _batches(stop_at: int | None = None):
    drawn = []

    def next_batch(g):
        drawn.append(1)
        if len(drawn) == stop_at:
            raise KeyboardInterrupt  # the process dies mid-run
        return {"x": torch.randn(8, 4, generator=g)}

    return next_batch


def test_ema_and_lr_floor_resume_exactly(tmp_path):
    """With ema_decay the task holds the EMA of its parameters when training ends (the build's warm-up:
    decay min(d, (1 + step) / (10 + step))); the cosine ends at lr_floor of the peak; and a run killed
    after a checkpoint, resumed, ends with the EMA and weights of the run that was never interrupted."""
    from dataclasses import replace

    from limner.training import lr_lambda, train, trained_state

    cfg = TrainConfig(
        max_steps=7,
        learning_rate=0.05,
        lr_schedule="cosine",
        lr_warmup_steps=2,
        lr_floor=0.1,
        ema_decay=0.8,
        checkpoint_every=3,
        weight_decay=0.0,
    )
    straight = _Line()
    start = [p.detach().clone() for p in straight.model.parameters()]
    train(straight, _batches(), cfg, tmp_path / "a")

    ema = start
    for step, weights in enumerate(straight.seen):
        decay = min(0.8, (1 + step) / (10 + step))
        ema = [e * decay + w * (1 - decay) for e, w in zip(ema, weights)]
    assert all(torch.allclose(p, e, atol=1e-6) for p, e in zip(straight.model.parameters(), ema)), (
        "the EMA is swapped in"
    )
    raw = trained_state(tmp_path / "a")
    assert torch.equal(raw["weight"], straight.seen[-1][0]) and not torch.equal(
        raw["weight"], straight.model.weight.detach()
    )
    assert (
        lr_lambda(cfg)(cfg.max_steps) == pytest.approx(0.1)
        and lr_lambda(replace(cfg, lr_floor=0.0))(cfg.max_steps) == 0.0
    )

    with pytest.raises(KeyboardInterrupt):
        train(_Line(), _batches(stop_at=5), cfg, tmp_path / "b")  # dies in step 5, after the checkpoint at step 3
    resumed = _Line()
    train(resumed, _batches(), replace(cfg, resume="latest"), tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(straight.model.parameters(), resumed.model.parameters())), (
        "the same EMA"
    )
    assert torch.equal(trained_state(tmp_path / "b")["weight"], raw["weight"]), "the same trained weights"
    with pytest.raises(LimnerError, match="ema_decay"):
        train(_Line(), _batches(), replace(cfg, resume="latest", ema_decay=0.9, max_steps=9), tmp_path / "b")


def test_fp16_loss_scale_resumes_exactly(tmp_path, monkeypatch):
    """Under fp16 the loss scaler's state (its scale, the good steps since it last grew) is in the checkpoint:
    a resumed run skips and scales the steps the uninterrupted run did. accelerate 1.16 gives a CPU no scaler
    under fp16 (nor autocast: it trains in fp32), so this run gets what a GPU gets: torch's GradScaler (on
    the CPU), fp16 autocast, and gradients unscaled before clipping."""
    from dataclasses import replace

    import limner.training.loop as loop
    from limner.training import train

    scalers, make_accelerator = [], loop._accelerator

    def as_on_a_gpu(cfg, modules, out):
        accelerator = make_accelerator(cfg, modules, out)
        accelerator.native_amp = True
        # the default initial scale overflows fp16 at first; growing every 2nd good step, it overflows again
        accelerator.scaler = torch.amp.GradScaler("cpu", growth_interval=2)
        scalers.append(accelerator.scaler)
        return accelerator

    monkeypatch.setattr(loop, "_accelerator", as_on_a_gpu)
    cfg = TrainConfig(max_steps=6, learning_rate=0.05, checkpoint_every=3, mixed_precision="fp16", weight_decay=0.0)
    straight = _Line()
    train(straight, _batches(), cfg, tmp_path / "a")
    skipped = [torch.equal(a[0], b[0]) for a, b in zip(straight.seen, straight.seen[1:])]
    assert any(skipped[2:]), "the scaler skips a step after the checkpoint at step 3"

    with pytest.raises(KeyboardInterrupt):
        train(_Line(), _batches(stop_at=5), cfg, tmp_path / "b")  # dies in step 5, after the checkpoint at step 3
    resumed = _Line()
    train(resumed, _batches(), replace(cfg, resume="latest"), tmp_path / "b")
    assert scalers[2].state_dict() == scalers[0].state_dict()
    assert all(torch.equal(a, b) for a, b in zip(straight.model.parameters(), resumed.model.parameters()))


def test_new_trainer_settings_leave_existing_runs_as_they_were(tmp_path):
    """At their defaults (no EMA, lr_floor 0, no peak given) the new settings change nothing: eval's cache
    keys leave them out, a checkpoint written before they existed still resumes, and the log only gains
    columns (time per step, TFLOP/s, MFU)."""
    import csv

    from limner.evaluation.cache_keys import key_settings
    from limner.methods.settings import KEY_NEUTRAL
    from limner.training import TrainConfig as Config
    from limner.training import train

    assert Config.__dataclass_fields__["lr_floor"].metadata[KEY_NEUTRAL] == 0.0
    keyed = key_settings(get_method("textual_inversion"), {})["train"]
    assert not {"lr_floor", "ema_decay", "peak_tflops"} & set(keyed)

    cfg = TrainConfig(max_steps=4, learning_rate=0.05, checkpoint_every=2)
    train(_Line(), _batches(), cfg, tmp_path)
    meta_path = tmp_path / "checkpoints" / "step-000002" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    for k in ("lr_floor", "ema_decay"):
        del meta["config"][k]  # as the trainer wrote it before these settings existed
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "checkpoints" / "step-000004").rename(tmp_path / "later")
    log = train(
        _Line(),
        _batches(),
        TrainConfig(max_steps=4, learning_rate=0.05, checkpoint_every=2, resume="latest", peak_tflops=1.0),
        tmp_path,
    )
    assert log.resumed_from == 2 and log.flops_per_step == 2 * (2 * 8 * 4), (
        "forward 2*B*in*out, and as much for the weight's gradient"
    )
    with open(tmp_path / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "seconds", "loss", "lr", "step_seconds", "tflops", "mfu"] and len(rows) == 4
    assert float(rows[-1]["step_seconds"]) > 0 and float(rows[-1]["mfu"]) == pytest.approx(float(rows[-1]["tflops"]))


def test_drop_conditioning_replaces_whole_rows_with_the_empty_one():
    from limner.training import drop_conditioning

    ids, empty = torch.arange(12).view(4, 3), torch.tensor([[49406, 49407, 49407]])
    g = torch.Generator().manual_seed(0)
    assert drop_conditioning(ids, empty, 0.0, g) is ids and torch.equal(
        g.get_state(), torch.Generator().manual_seed(0).get_state()
    )
    assert torch.equal(drop_conditioning(ids, empty, 1.0, g), empty.expand(4, 3))
    mixed = drop_conditioning(ids, empty, 0.5, torch.Generator().manual_seed(1))
    drop = torch.rand(4, generator=torch.Generator().manual_seed(1)) < 0.5
    assert torch.equal(mixed[drop], empty.expand(int(drop.sum()), 3)) and torch.equal(mixed[~drop], ids[~drop])
    embeds = torch.randn(4, 2, 8)
    assert torch.equal(drop_conditioning(embeds, torch.zeros(2, 8), 1.0, g), torch.zeros(4, 2, 8)), (
        "image embeddings too"
    )


def test_resume_continues_the_data_stream_where_the_checkpoint_left_it(tmp_path):
    """train(..., data=stream) keeps each process's position in the stream in every checkpoint and restores it
    before the first resumed step: a run killed after a checkpoint and resumed on a freshly opened stream reads
    the samples the uninterrupted run read, and ends with its weights. Without the position the resumed run
    would read the stream from its start again and end elsewhere (checked too)."""
    import shutil
    from dataclasses import replace

    from PIL import Image

    from limner.data import open_stream
    from limner.training import train

    folder = tmp_path / "data"
    folder.mkdir()
    rows = []
    for i in range(10):
        Image.new("RGB", (20, 20), (i * 25, 255 - i * 20, i * 7)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")

    def batches(stream, stop_at: int | None = None):
        it, drawn = iter(stream), []

        def next_batch(g):
            drawn.append(1)
            if len(drawn) == stop_at:
                raise KeyboardInterrupt  # the process dies mid-run
            colours = np.stack([next(it).image.mean((0, 1)) / 255 for _ in range(3)])
            return {"x": torch.from_numpy(np.c_[colours, np.ones(3)]).float()}

        return next_batch

    cfg = TrainConfig(max_steps=7, learning_rate=0.05, checkpoint_every=3, weight_decay=0.0)
    straight, stream = _Line(), open_stream(str(folder), seed=1)
    train(straight, batches(stream), cfg, tmp_path / "a", data=stream)
    assert json.loads((tmp_path / "a" / "checkpoints" / "step-000007" / "data-rank0.json").read_text()) == (
        stream.state_dict()
    )

    with pytest.raises(KeyboardInterrupt):  # dies in step 5, after the checkpoint at step 3
        train(_Line(), batches(s := open_stream(str(folder), seed=1), stop_at=5), cfg, tmp_path / "b", data=s)
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    resumed, fresh = _Line(), open_stream(str(folder), seed=1)
    train(resumed, batches(fresh), replace(cfg, resume="latest"), tmp_path / "b", data=fresh)
    assert all(torch.equal(a, b) for a, b in zip(straight.model.parameters(), resumed.model.parameters()))
    assert fresh.state_dict() == stream.state_dict()

    blind, restarted = _Line(), open_stream(str(folder), seed=1)  # resumed without the stream's position
    train(blind, batches(restarted), replace(cfg, resume="latest"), tmp_path / "c")
    assert not torch.equal(blind.model.weight, straight.model.weight), "the position is what made it exact"

    shutil.rmtree(tmp_path / "c" / "checkpoints" / "step-000007")  # step 6: written by the run without the stream
    with pytest.raises(LimnerError, match="holds no position in the data stream"):
        train(
            _Line(),
            batches(s := open_stream(str(folder), seed=1)),
            replace(cfg, resume="latest"),
            tmp_path / "c",
            data=s,
        )


def test_clipping_matches_torch_bit_for_bit_and_leaves_gradients_under_the_cap_alone():
    from accelerate import Accelerator

    from limner.training.loop import clip_gradients

    accelerator = Accelerator(cpu=True)
    for scale in (0.01, 10.0, float("nan")):
        grads = [torch.randn(5, 3) * scale, torch.randn(7) * scale]
        ours = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        theirs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        clip_gradients(accelerator, ours, 1.0)
        torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        for p, q in zip(ours, theirs):
            assert torch.equal(p.grad, q.grad) or (p.grad.isnan().all() and q.grad.isnan().all())
