"""What a new user gets wrong, refused before any work with one clear line (issue 28, section 4): values
parsed to their declared types and ranges, user words that would become paths, outputs that would be
overwritten, damaged files, colliding tokens, prompts the tokenizer cuts."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from limner.cli import app
from limner.errors import LimnerError
from limner.methods import get_method
from limner.methods.settings import command_line_settings
from limner.methods.tuning import TuningMethod

MISSING_BASE = "/nonexistent/base"  # a command that reached its base would fail on it: these must fail first


def configured(method: str, *items: str, **flags):
    """The settings `limner train --method METHOD --set ITEM ...` trains with (checked as the command line does)."""
    m = get_method(method)
    overrides = command_line_settings(m, list(items), **flags)
    return m.configure(overrides) if isinstance(m, TuningMethod) else overrides


def test_set_values_are_parsed_to_each_settings_declared_type():
    cfg = configured("textual_inversion", "flip=no", "num_vectors=2", "norm_cap=none", "learning_rate=1e-3")
    assert cfg.train.flip is False and cfg.num_vectors == 2 and cfg.norm_cap is None
    assert cfg.train.learning_rate == 1e-3 and isinstance(cfg.train.learning_rate, float)
    assert configured("textual_inversion", "flip=yes").train.flip is True
    cfg = configured("dreambooth_lora", "lora_rank=8", "lora_alpha=4", "identifier=1e3")
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.identifier) == (8, 4.0, "1e3")  # a word is not made a number


@pytest.mark.parametrize(
    ("method", "items", "flags", "named"),
    [
        ("textual_inversion", ["num_vectors=two"], {}, "num_vectors"),
        ("textual_inversion", ["flip=maybe"], {}, "flip"),
        ("textual_inversion", ["templates=poem"], {}, "templates"),
        ("textual_inversion", [], {"token": ""}, "--token"),
        ("textual_inversion", [], {"token": "two words"}, "--token"),
        ("textual_inversion", [], {"max_steps": 0}, "--steps"),
        ("textual_inversion", [], {"max_steps": -5}, "--steps"),
        ("textual_inversion", [], {"batch_size": 0}, "--batch-size"),
        ("textual_inversion", [], {"learning_rate": -1.0}, "--lr"),
        ("textual_inversion", ["learning_rate=nan"], {}, "--lr"),
        ("textual_inversion", ["max_grad_norm=-1"], {}, "max_grad_norm"),
        ("dreambooth_lora", ["lora_rank=abc"], {}, "lora_rank"),
        ("dreambooth_lora", ["lora_rank=0"], {}, "lora_rank"),
        ("dreambooth", ["prior_loss_weight=-1"], {}, "prior_loss_weight"),
        ("dreambooth", ["prior_preservation=maybe"], {}, "prior_preservation"),
        ("custom_diffusion", ["mode=all"], {}, "mode"),
        ("custom_diffusion", ["augment_variants=0"], {}, "augment_variants"),
        ("ip_adapter", ["drop_image=lots"], {}, "drop_image"),
    ],
)
def test_bad_setting_values_are_refused_naming_the_setting(method, items, flags, named):
    with pytest.raises(LimnerError, match=named):
        configured(method, *items, **flags)


def test_settings_built_in_python_are_checked_too():
    from limner.generation import GenerationSettings
    from limner.training import TrainConfig

    with pytest.raises(LimnerError, match="max_steps"):
        TrainConfig(max_steps=0)
    with pytest.raises(LimnerError, match="--guidance"):
        GenerationSettings("a ball", guidance_scale=math.nan)
    with pytest.raises(LimnerError, match="--steps"):
        get_method("textual_inversion").personalize(None, None, "unused", max_steps=-5)
    assert TrainConfig(max_steps="5").max_steps == 5


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["train", "--method", "textual_inversion", "--subject", "world:duo_ball", "--steps", "0"], "--steps"),
        (["train", "--method", "textual_inversion", "--subject", "world:duo_ball", "--steps", "-5"], "--steps"),
        (["train", "--method", "dreambooth", "--subject", "world:duo_ball", "--batch-size", "0"], "--batch-size"),
        (["train", "--method", "dreambooth", "--subject", "world:duo_ball", "--lr", "-1"], "--lr"),
        (["train", "--method", "textual_inversion", "--subject", "world:duo_ball", "--token", ""], "--token"),
        (["train", "--method", "textual_inversion", "--subject", "world:duo_ball", "--set", "flip=what"], "flip"),
        (["generate", "a ball", "--guidance", "nan"], "--guidance"),
        (["generate", "a ball", "--steps", "0"], "--steps"),
        (["generate", "a ball", "--scheduler", "fast"], "--scheduler"),
        (["eval", "--method", "textual_inversion", "--guidance", "inf"], "--guidance"),
        (["demo", "--steps", "0"], "--steps"),
    ],
)
def test_bad_values_on_the_command_line_fail_before_any_work(tmp_path, args, named):
    out = tmp_path / "out"
    base = [] if args[0] == "demo" else ["--base", MISSING_BASE]
    r = CliRunner().invoke(app, [*args, "--out", str(out), *base])
    assert r.exit_code == 2, r.output
    assert named in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists()


def test_eval_cache_keys_read_each_setting_as_its_type():
    """`--method lora:learning_rate=1e-3` and `learning_rate=0.001` trained the same concept: one cache key."""
    from limner.evaluation.cache_keys import key_settings
    from limner.evaluation.rows import Row

    m = get_method("dreambooth_lora")
    keys = [
        key_settings(m, dict(Row.parse(f"dreambooth_lora:{spec}").config))
        for spec in ("learning_rate=1e-3", "learning_rate=0.001")
    ]
    assert keys[0] == keys[1] and keys[0]["train"]["learning_rate"] == 0.001


def test_a_json_setting_keeps_its_commas_in_a_method_spec():
    """`limner eval --method 'ip_adapter:scale={"down": 1.5, "up": 3.0},references=concat'`: per-block scales
    are one setting, not three broken ones."""
    from limner.evaluation.rows import Row

    config = dict(Row.parse('ip_adapter:scale={"down": 1.5, "up": {"block_1": [2.0, 3.0]}},references=concat').config)
    assert config == {"scale": '{"down": 1.5, "up": {"block_1": [2.0, 3.0]}}', "references": "concat"}
    assert dict(Row.parse('ip_adapter:scale={"a,}": [1, 2]},variant=plus').config)["variant"] == "plus"
    with pytest.raises(LimnerError, match="key=value"):
        Row.parse("ip_adapter:scale=2.0,concat")
    for unbalanced in ('scale={"down": 1.5,references=concat', "scale=],variant=plus", 'scale={"up": "1}'):
        with pytest.raises(LimnerError, match="unbalanced"):
            Row.parse(f"ip_adapter:{unbalanced}")


@pytest.mark.parametrize(
    ("method", "extra", "named"),
    [
        ("custom_diffusion", ["--token", "../../x"], "--token"),
        ("custom_diffusion", ["--token", "/tmp/x"], "--token"),
        ("textual_inversion", ["--token", "..\\x"], "--token"),
        ("dreambooth", ["--token", "sks\n"], "--token"),
        ("dreambooth", ["--class-noun", "../../x"], "class noun"),
        ("dreambooth", ["--class-noun", "/etc/dog"], "class noun"),
    ],
)
def test_user_words_that_would_become_paths_are_refused(tmp_path, method, extra, named):
    from helpers import image_folder

    folder = image_folder(tmp_path / "refs")
    args = [
        "train",
        "--method",
        method,
        "--subject",
        str(folder),
        "--out",
        str(tmp_path / "c"),
        "--base",
        MISSING_BASE,
    ]
    r = CliRunner().invoke(app, [*args, *(["--class-noun", "ball"] if "--class-noun" not in extra else []), *extra])
    assert r.exit_code == 2 and named in r.output and "Traceback" not in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refs"]


def test_names_from_files_stay_inside_their_folder(tmp_path):
    import json

    from limner.evaluation.subjects import load_subjects
    from limner.io import child

    assert child(tmp_path, "<new1>.safetensors", "token") == tmp_path / "<new1>.safetensors"
    for name in ("../x", "/etc/passwd", "a/b", "..", ""):
        with pytest.raises(LimnerError, match="outside"):
            child(tmp_path, name, "token")
    refs = tmp_path / "refs"
    from helpers import image_folder

    image_folder(refs)
    manifest = tmp_path / "subjects.json"
    manifest.write_text(json.dumps([{"name": "../../escape", "path": "refs", "class_noun": "ball"}]))
    with pytest.raises(LimnerError, match="subject's name"):
        load_subjects(str(manifest))


def train_args(tiny_base, refs, out, *extra):
    return [
        "train",
        "--method",
        "textual_inversion",
        "--subject",
        str(refs),
        "--class-noun",
        "ball",
        "--steps",
        "1",
    ] + ["--batch-size", "1", "--base", str(tiny_base), "--out", str(out), *extra]


def test_a_trained_concept_is_never_overwritten_unless_asked(tiny_base, tmp_path):
    from helpers import image_folder

    refs, out = image_folder(tmp_path / "refs"), tmp_path / "concept"
    assert CliRunner().invoke(app, train_args(tiny_base, refs, out, "--token", "<old>")).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    r = CliRunner().invoke(app, train_args(tiny_base, refs, out, "--token", "<new>"))
    assert r.exit_code == 2 and "already holds" in r.output and "--force" in r.output and "--resume latest" in r.output
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    r = CliRunner().invoke(app, train_args(tiny_base, refs, out, "--token", "<new>", "--force"))
    assert r.exit_code == 0, r.output
    names = {p.name for p in out.iterdir()}
    assert "new.safetensors" in names and "old.safetensors" not in names  # no old weights beside the new


def test_a_failed_training_leaves_no_folder_it_made(tiny_base, tmp_path, monkeypatch):
    from helpers import image_folder

    from limner.methods.textual_inversion import TextualInversion

    def fail(*args, **kwargs):
        raise LimnerError("stop here")

    monkeypatch.setattr(TextualInversion, "prepare", fail)
    out = tmp_path / "deep" / "concept"
    r = CliRunner().invoke(app, train_args(tiny_base, image_folder(tmp_path / "refs"), out))
    assert r.exit_code == 2 and "stop here" in r.output and not out.exists()


def test_outputs_that_would_lose_work_are_refused_before_it(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "limner.json").write_text('{"method": "custom_diffusion"}')
    afile = tmp_path / "afile"
    afile.write_text("mine")
    cases = [
        (["merge", str(a), str(b), "--out", str(a)], "one of the concepts"),
        (["merge", str(a), str(b), "--out", str(b / ".." / "b")], "one of the concepts"),
        (["merge", str(a), str(b), "--out", str(a.parent / "a")], "one of the concepts"),
        (["eval", "--method", "textual_inversion", "--out", str(afile)], "is a file"),
        (["generate", "a ball", "--out", str(afile)], "is a file"),
    ]
    for args, said in cases:
        r = CliRunner().invoke(app, [*args, "--base", MISSING_BASE])
        assert r.exit_code == 2 and said in r.output, (args, r.output)
    assert afile.read_text() == "mine"


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def one_line_naming(r, path) -> bool:
    lines = r.output.strip().splitlines()
    return r.exit_code == 2 and len(lines) == 1 and str(path) in lines[0] and "Traceback" not in r.output


def test_damaged_weight_files_are_one_line_naming_the_file(tiny_base, tmp_path):
    import shutil

    from helpers import image_folder

    generate = ["generate", "a <blob>", "-n", "1", "--steps", "1", "--out", str(tmp_path / "img")]
    # a base whose UNet was cut short
    broken_base = tmp_path / "base"
    shutil.copytree(tiny_base, broken_base)
    unet = next((broken_base / "unet").glob("*.safetensors"))
    truncate(unet)
    r = CliRunner().invoke(app, [*generate, "--base", str(broken_base)])
    assert one_line_naming(r, unet) and "truncated" in r.output, r.output
    # a concept's weights, and the same file given as an embedding
    concept = tmp_path / "concept"
    r = CliRunner().invoke(app, train_args(tiny_base, image_folder(tmp_path / "refs"), concept, "--token", "<blob>"))
    assert r.exit_code == 0, r.output
    for weights in concept.glob("*.safetensors"):
        truncate(weights, 0.9)
    r = CliRunner().invoke(app, [*generate, "--base", str(tiny_base), "--concept", str(concept)])
    assert r.exit_code == 2 and "damaged" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = CliRunner().invoke(app, [*generate, "--base", str(tiny_base), "--embedding", str(weights)])
    assert one_line_naming(r, weights), r.output
    # a pickle that does not unpickle
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x04not a pickle at all")
    r = CliRunner().invoke(app, [*generate, "--base", str(tiny_base), "--embedding", str(bad), "--allow-pickle"])
    assert one_line_naming(r, bad) and "unpickle" in r.output, r.output
    assert not (tmp_path / "img").exists()


def test_version_and_shell_completion():
    from importlib.metadata import version

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"limner {version('limner')}"
    r = CliRunner().invoke(app, ["--help"])
    assert "--install-completion" in r.output and "--show-completion" in r.output


def test_concepts_trained_with_the_defaults_compose_and_collisions_are_named(tiny_base, tmp_path):
    """Each concept's default token is its folder's name, so two trained with the defaults compose; two with one
    token are refused naming both; an embedding may not redefine a word the base (or a concept) has."""
    import json

    from helpers import image_folder

    from limner.conditioning import apply_concepts
    from limner.models.loading import load_base

    refs = image_folder(tmp_path / "refs")
    for name in ("rex", "Blue Cup!"):
        r = CliRunner().invoke(app, train_args(tiny_base, refs, tmp_path / name))
        assert r.exit_code == 0, r.output
    tokens = [json.loads((tmp_path / n / "limner.json").read_text())["token"] for n in ("rex", "Blue Cup!")]
    assert tokens == ["<rex>", "<blue-cup>"]
    base = load_base(str(tiny_base), device="cpu")
    apply_concepts(base, [tmp_path / "rex", tmp_path / "Blue Cup!"]).uninstall()
    r = CliRunner().invoke(app, train_args(tiny_base, refs, tmp_path / "twin", "--token", "<rex>"))
    assert r.exit_code == 0, r.output
    with pytest.raises(LimnerError, match=r"both use the token '<rex>'"):
        apply_concepts(base, [tmp_path / "rex", tmp_path / "twin"])
    generate = [
        "generate",
        "a ball",
        "-n",
        "1",
        "--steps",
        "1",
        "--base",
        str(tiny_base),
        "--out",
        str(tmp_path / "i"),
    ]
    weights = tmp_path / "rex" / "learned_embeds.safetensors"
    for spec in (f"{weights}:ball", f"{weights}:<blob> x"):
        r = CliRunner().invoke(app, [*generate, "--embedding", spec])
        assert r.exit_code == 2 and "--embedding" in r.output, r.output
    r = CliRunner().invoke(app, [*generate, "--concept", str(tmp_path / "rex"), "--embedding", str(weights)])
    assert r.exit_code == 2 and "already in the tokenizer" in r.output, r.output


def test_a_prompt_is_told_honestly_in_one_line(tmp_path):
    """Unknown words and what the tokenizer's limit cuts: said once, in one line; BREAK without --regions: said."""
    long_tail = " ".join(["red ball"] * 200)
    prompt = f"a zebra xylophone ball on the beach BREAK a dog {long_tail}"
    r = CliRunner().invoke(app, ["generate", prompt, "-n", "1", "--steps", "1", "--out", str(tmp_path / "i")])
    assert r.exit_code == 0, r.output
    notes = [line for line in r.output.splitlines() if line.startswith(("note:", "warning:"))]
    told = [line for line in notes if "does not know" in line]
    assert len(told) == 1 and "zebra, xylophone" in told[0] and "cut 'ball red" in told[0], notes
    assert len(told[0]) < 300, "the cut words are summed up, not printed whole"
    assert any("BREAK" in line and "--regions" in line for line in notes)
    said = [line for line in r.output.splitlines() if line.strip() and not line.startswith("generate:")]
    assert len(said) == 3, said  # the two notes and where the images went, beside limner's one progress bar


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    """replace_folder: a write that fails leaves the old folder as it was and no temporary folder behind; one that
    succeeds leaves only the new contents."""
    from limner.io import copy_folder, replace_folder

    folder = tmp_path / "encoder"
    folder.mkdir()
    (folder / "old.txt").write_text("old")

    def half_then_fail(tmp) -> None:
        tmp.mkdir()
        (tmp / "half.txt").write_text("half")
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        replace_folder(folder, half_then_fail)
    assert [p.name for p in tmp_path.iterdir()] == ["encoder"] and [p.name for p in folder.iterdir()] == ["old.txt"]
    source = tmp_path / "source"
    source.mkdir()
    (source / "new.txt").write_text("new")
    copy_folder(source, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder", "source"]
    assert [p.name for p in folder.iterdir()] == ["new.txt"]
