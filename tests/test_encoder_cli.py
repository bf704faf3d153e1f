"""The command line of the encoder methods (IP-Adapter on tiny bases): `limner pretrain` (resume, --from reproduces,
a finished adapter is never overwritten), `limner generate --image` (one and two references, --ip-scale, the same
image as the bare base at scale 0), `limner train` then `--concept`, `limner eval` and `limner demo` on a tiny world
adapter, and each bad input with exit code 2 and nothing half-written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import ToyStream, pretraining_folder, tiny_ip_base
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from limner.cli import app

METHOD = "ip_adapter"
WEIGHTS = "ip_adapter.safetensors"
GEN = ["-n", "1", "--steps", "2", "--seed", "3"]


def run(*args) -> object:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def fails(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output


def image(folder) -> np.ndarray:
    return np.asarray(Image.open(next(folder.glob("*-00.png"))))


@pytest.fixture(scope="module")
def ip_base(tmp_path_factory):
    return tiny_ip_base(tmp_path_factory.mktemp("encoder-cli") / "base")


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refs")
    rng = np.random.default_rng(1)
    for name in ("ref", "ref2"):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def adapter(ip_base, tmp_path_factory):
    """`limner pretrain` on an image folder with metadata.jsonl: 2 steps, then resumed to 3, then reproduced with
    --from into a second folder (the same weights: the resumed run continues exactly)."""
    root = tmp_path_factory.mktemp("pretrain")
    data = pretraining_folder(root / "data")
    out = root / "adapter"
    args = ["pretrain", "--method", METHOD, "--data", data, "--base", ip_base, "--batch-size", "2", "--lr", "0.01"]
    r = run(*args, "--out", out, "--steps", "2", "--set", "checkpoint_every=1")
    assert r.exit_code == 0, r.output
    assert f"adapter written to {out} ({METHOD}, plain, 2 steps;" in r.output and "kB)" in r.output
    # a finished adapter is not overwritten without --resume or --force
    before = (out / WEIGHTS).read_bytes()
    fails(run(*args, "--out", out, "--steps", "2"), "already holds a finished")
    assert (out / WEIGHTS).read_bytes() == before
    # --resume latest continues from the last checkpoint
    r = run(*args, "--out", out, "--steps", "3", "--set", "checkpoint_every=1", "--resume", "latest")
    assert r.exit_code == 0 and "3 steps" in r.output, r.output
    manifest = json.loads((out / "adapter.json").read_text())
    assert manifest["steps"] == 3 and manifest["data"]["kind"] == "folder"
    # --from runs again what adapter.json recorded: 3 straight steps draw what 2 + 1 resumed drew
    again = root / "again"
    r = run("pretrain", "--from", out, "--out", again, "--base", ip_base)
    assert r.exit_code == 0, r.output
    a, b = load_file(str(out / WEIGHTS)), load_file(str(again / WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((again / "adapter.json").read_text())["settings"] == manifest["settings"]
    # --force pretrains again from step 0, not from the old run's checkpoints
    r = run("pretrain", "--from", out, "--out", again, "--base", ip_base, "--steps", "1", "--force")
    assert r.exit_code == 0 and "plain, 1 step;" in r.output, r.output
    assert [p.name for p in (again / "checkpoints").iterdir()] == ["step-000001"]
    return out


def test_generate_with_references_given_directly(ip_base, adapter, refs, tmp_path):
    common = [*GEN, "--base", ip_base]
    with_image = ["--method", METHOD, "--adapter", adapter, "--image", refs / "ref.png"]
    assert run("generate", "a ball on the beach", *common, "--out", tmp_path / "bare").exit_code == 0
    r = run("generate", "a ball on the beach", *common, *with_image, "--out", tmp_path / "one")
    assert r.exit_code == 0, r.output
    r = run(
        "generate",
        "a ball on the beach",
        *common,
        *with_image,
        "--image",
        refs / "ref2.png",
        "--out",
        tmp_path / "two",
    )
    assert r.exit_code == 0, r.output
    r = run("generate", "a ball on the beach", *common, *with_image, "--ip-scale", "0", "--out", tmp_path / "off")
    assert r.exit_code == 0, r.output
    bare, one, two, off = (image(tmp_path / d) for d in ("bare", "one", "two", "off"))
    assert not np.array_equal(one, bare) and not np.array_equal(two, one), "the references steer the picture"
    assert np.array_equal(off, bare), "--ip-scale 0 switches the image off: the bare base's picture, bit for bit"
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["00001-00.png", "00001-grid.png", "00001.json"]


def test_train_an_encoded_concept_then_generate_with_it(ip_base, adapter, refs, tmp_path):
    subject = tmp_path / "subject"
    subject.mkdir()
    shutil.copy(refs / "ref.png", subject / "0.png")
    concept = tmp_path / "concept"
    args = ["train", "--method", METHOD, "--subject", subject, "--class-noun", "ball", "--base", ip_base]
    r = run(*args, "--out", concept, "--adapter", adapter, "--set", "scale=0.6")
    assert r.exit_code == 0 and f"concept written to {concept}" in r.output, r.output
    manifest = json.loads((concept / "limner.json").read_text())
    assert manifest["method"] == METHOD and manifest["config"]["scale"] == 0.6 and manifest["steps"] == 0
    common = [*GEN, "--base", ip_base, "--concept", concept]
    for name, extra in (("c", []), ("c0", ["--ip-scale", "0"]), ("c6", ["--ip-scale", "0.6"])):
        r = run("generate", "a ball on the beach", *common, *extra, "--out", tmp_path / name)
        assert r.exit_code == 0, r.output
    run("generate", "a ball on the beach", *GEN, "--base", ip_base, "--out", tmp_path / "bare")
    c, c0, c6, bare = (image(tmp_path / d) for d in ("c", "c0", "c6", "bare"))
    assert np.array_equal(c, c6) and np.array_equal(c0, bare) and not np.array_equal(c, bare)
    fails(run(*args, "--out", tmp_path / "x", "--adapter", adapter, "--steps", "5"), "--steps")
    fails(run(*args, "--out", tmp_path / "x", "--steps", "5"), "--steps")
    fails(
        run("train", "--method", "textual_inversion", "--subject", subject, "--class-noun", "ball", "--out",
            tmp_path / "x", "--adapter", adapter, "--base", ip_base),
        "reads no pretrained adapter",
    )  # fmt: skip
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("what", ["corrupt", "empty", "one-pixel", "missing"])
def test_bad_references_are_named(ip_base, adapter, tmp_path, what):
    bad = tmp_path / f"{what}.png"
    if what == "corrupt":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif what == "empty":
        bad.write_bytes(b"")
    elif what == "one-pixel":
        Image.new("RGB", (1, 1)).save(bad)
    message = {"corrupt": "could not be read", "empty": "could not be read", "one-pixel": "1x1 px"}
    r = run("generate", "a ball", *GEN, "--base", ip_base, "--method", METHOD, "--adapter", adapter, "--image", bad,
            "--out", tmp_path / "out")  # fmt: skip
    fails(r, message.get(what, "does not exist"))
    assert str(bad.name) in r.output or what == "one-pixel"
    assert not (tmp_path / "out").exists(), "nothing written"


def test_bad_adapters_and_options_exit_2(ip_base, tiny_base, adapter, refs, tmp_path):
    gen = ["generate", "a ball", *GEN, "--method", METHOD, "--image", refs / "ref.png", "--out", tmp_path / "out"]
    # an adapter pretrained on another base
    fails(run(*gen, "--base", tiny_base, "--adapter", adapter), "pretrained on base")
    # an official file with unknown keys
    unknown = tmp_path / "unknown.safetensors"
    save_file(load_file(str(adapter / WEIGHTS)) | {"text_model.extra.weight": torch.zeros(2)}, str(unknown))
    fails(run(*gen, "--base", ip_base, "--adapter", unknown), "not IP-Adapter weights")
    # a pickle, read only with --allow-pickle
    flat = load_file(str(adapter / WEIGHTS))
    nested = {
        part: {k.removeprefix(f"{part}."): v for k, v in flat.items() if k.startswith(f"{part}.")}
        for part in ("image_proj", "ip_adapter")
    }
    pickled = tmp_path / "official" / "ip-adapter.bin"
    pickled.parent.mkdir()
    torch.save(nested, pickled)
    fails(run(*gen, "--base", ip_base, "--adapter", pickled), "--allow-pickle")
    assert not (tmp_path / "out").exists()
    r = run(*gen, "--base", ip_base, "--adapter", pickled, "--allow-pickle")
    assert r.exit_code == 0, r.output
    shutil.rmtree(tmp_path / "out")
    # a negative --ip-scale; a real base without --adapter (how to get one); a tuning method with --image
    fails(run(*gen, "--base", ip_base, "--adapter", adapter, "--ip-scale", "-0.5"), "must be 0 or more")
    r = run(*gen, "--base", ip_base)
    fails(r, "limner pretrain --method ip_adapter")
    assert "official" in r.output and "--adapter" in r.output
    fails(run(*gen[:-6], "--method", "dreambooth", "--image", refs / "ref.png", "--base", ip_base), "limner train")
    fails(run(*gen[:-6], "--image", refs / "ref.png", "--base", ip_base), "--method")
    fails(run("generate", "a ball", "--adapter", adapter, "--base", ip_base), "--image")
    fails(run("generate", "a ball", "--ip-scale", "0.5", "--base", ip_base), "no concept given has one")
    assert not (tmp_path / "out").exists(), "nothing written by a refused command"


def test_pretrain_refuses_bad_data_and_tuning_methods(ip_base, tmp_path):
    args = ["pretrain", "--method", METHOD, "--base", ip_base, "--steps", "1", "--batch-size", "1"]
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(run(*args, "--data", empty, "--out", tmp_path / "a"), f"data {empty}")
    malformed = pretraining_folder(tmp_path / "malformed", n=2)
    with open(malformed / "metadata.jsonl", "a") as f:
        f.write('{"file_name": "0.png", "text": \n')
    fails(run(*args, "--data", malformed, "--out", tmp_path / "b"), "metadata.jsonl, line 3: not a JSON object")
    # images too small to use: found while training; the folder the run made goes with the error
    tiny = pretraining_folder(tmp_path / "tiny", n=2, size=4)
    fails(run(*args, "--data", tiny, "--out", tmp_path / "c"), "is usable")
    fails(run(*args, "--data", tmp_path / "nowhere", "--out", tmp_path / "d"), "no such file or folder")
    assert not any((tmp_path / d).exists() for d in "abcd"), "nothing half-written"
    r = run("pretrain", "--method", "dreambooth", "--data", "world", "--out", tmp_path / "e")
    fails(r, "limner train --method dreambooth")
    assert METHOD in r.output  # names the methods that pretrain
    fails(run("pretrain", "--method", METHOD, "--out", tmp_path / "e"), "--data")
    fails(run("pretrain", "--from", tmp_path, "--out", tmp_path / "e"), "no adapter.json")


# ---------------------------------------------------------------------------------------------------------------
# On the world base: a tiny adapter of 1 step, through eval and the demo with no change to either
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_adapter(tmp_path_factory):
    from limner.methods import get_method
    from limner.models.loading import load_base

    out = tmp_path_factory.mktemp("world-adapter") / "adapter"
    quick = {"max_steps": 1, "batch_size": 1, "checkpoint_every": 0}
    return get_method(METHOD).pretrain(load_base(device="cpu"), ToyStream(n=1, size=64), out, **quick)


def test_eval_and_demo_run_an_encoder_method_unchanged(world_adapter, tmp_path):
    r = run(
        "eval", "--method", f"{METHOD}:adapter={world_adapter}", "--subjects", "world:duo_ball", "--prompts", "2",
        "-n", "1", "--steps", "4", "--no-bounds", "--cache", tmp_path / "cache", "--out", tmp_path / "report",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    (row,) = json.loads((tmp_path / "report" / "results.json").read_text())["rows"].values()
    assert np.isfinite(row["mean"]["subject_fidelity"]) and row["concepts"]["duo_ball"]["method"] == METHOD
    # without a shipped adapter (or with one) the demo says how to get one before writing anything
    from limner.methods import get_method
    from limner.models.loading import load_base

    if get_method(METHOD).default_adapter(load_base(device="cpu")) is None:
        r = run("demo", "--method", METHOD, "--out", tmp_path / "demo")
        fails(r, f"limner pretrain --method {METHOD} --data world")
        assert not (tmp_path / "demo").exists()


def test_the_shipped_world_adapter_is_the_default(world_adapter, refs, tmp_path, monkeypatch):
    """With a world adapter where limner ships it, --image, the demo and eval need no --adapter; eval keys a concept
    by the shipped adapter's fingerprint."""
    import limner.demo
    from limner.evaluation.cache_keys import concept_key
    from limner.methods import get_method
    from limner.models import loading

    method = get_method(METHOD)
    key_before = concept_key(method, {}, "s", "b")
    monkeypatch.setattr(loading, "ASSETS", tmp_path / "assets")
    shutil.copytree(world_adapter, tmp_path / "assets" / "world" / "adapters" / f"{METHOD}-plain")
    assert (
        method.default_adapter(loading.load_base(device="cpu")) == tmp_path / "assets/world/adapters/ip_adapter-plain"
    )
    assert concept_key(method, {}, "s", "b") != key_before
    assert method.default_adapter(loading.load_base(device="cpu"), "plus") is None
    r = run("generate", "a ball", *GEN, "--method", METHOD, "--image", refs / "ref.png", "--out", tmp_path / "g")
    assert r.exit_code == 0, r.output
    contexts = limner.demo.new_contexts
    monkeypatch.setattr(limner.demo, "new_contexts", lambda subject, n=4: contexts(subject, 1))  # one, for time
    r = run("demo", "--method", METHOD, "--out", tmp_path / "demo")
    assert r.exit_code == 0, r.output
    assert f"{METHOD} encoded duo_ball's 5 references in" in r.output and "no training" in r.output
    record = json.loads((tmp_path / "demo" / "scores.json").read_text())
    assert record["encoded"] and record["train_seconds"] < 30
