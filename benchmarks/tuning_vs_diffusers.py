"""limner's tuning methods side by side with diffusers' example training scripts, on the world base.

    python benchmarks/tuning_vs_diffusers.py --diffusers PATH/TO/diffusers-repo [--out benchmarks/results]

Run it in a virtual environment that has torchvision (diffusers' scripts import it; limner does not):
see ../shared/reference/ENVIRONMENT.md. Both tools run in that same environment, one process at a
time, on the same world subject, base and machine. Three measurements per method:

1. time per step at identical settings (steps, batch 4, 64 px, same learning rate, no prior
   preservation, no intermediate checkpoints): the wall time of a long run minus a short run,
   divided by the difference in steps, so process start-up and model loading cancel out;
2. the diffusers README recipe (its learning rate, batch, steps, prior preservation; 64 px as the
   world's resolution) against limner's defaults, both scored with the same world-bench subject
   fidelity (`limner eval` on the artifact), with end-to-end wall time (class images included);
3. peak resident memory of each training process (ru_maxrss of the child).

Every finished run is kept in results.json, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SUBJECT = "spot_dog"
CLASS_NOUN = "dog"
SHORT, LONG = 50, 250  # steps of the two timing runs
REPEATS = 2  # each timing run twice (--repeats), alternating tools; the fastest of each kind counts
BATCH, RES = 4, 64
METHODS = ("textual_inversion", "dreambooth", "dreambooth_lora", "custom_diffusion")
SCRIPTS = {
    "textual_inversion": "examples/textual_inversion/textual_inversion.py",
    "dreambooth": "examples/dreambooth/train_dreambooth.py",
    "dreambooth_lora": "examples/dreambooth/train_dreambooth_lora.py",
    "custom_diffusion": "examples/custom_diffusion/train_custom_diffusion.py",
}
TI_RECIPE = "3000 steps, lr 2e-3, no captions"
# diffusers' script weighs every timestep alike: min_snr_gamma=0 turns limner's min-SNR weighting off
TI_RECIPE_ARGS = [
    "--steps",
    "3000",
    "--lr",
    "2e-3",
    "--set",
    "captions=false",
    "--set",
    "weight_decay=0.01",
    "--set",
    "checkpoint_every=500",
    "--set",
    "min_snr_gamma=0",
]
# limner's defaults on other schedules: name -> extra arguments (the defaults are tuned for the
# hardest world subjects; a user in a hurry shortens them)
OTHER_RUNS = {
    # one TI seed's fidelity moves by up to 0.2 from the next: five more training seeds say whether
    # limner's defaults reach diffusers' recipe on average (report() uses the mean of the six); and
    # twice the steps, three seeds, since on the third edition the defaults' mean fell short
    "textual_inversion": {
        **{f"seed {i}": ["--set", f"seed={i}"] for i in range(1, 6)},
        **{"800 steps" + (f", seed {i}" if i else ""): ["--steps", "800", "--set", f"seed={i}"] for i in range(3)},
    },
    "dreambooth_lora": {"50 steps": ["--steps", "50"], "100 steps": ["--steps", "100"]},
    "custom_diffusion": {"50 steps": ["--steps", "50"], "100 steps": ["--steps", "100"]},
}
# --ti-recipe-in-limner: diffusers' TI recipe as limner runs it (the same 3000 x 4 samples at lr 2e-3,
# object templates without captions, weight decay 1e-2), three seeds: is a gap between the tools the
# recipe's or the implementation's? 13 minutes more, so not run by default
TI_RECIPE_RUNS = {
    f"{TI_RECIPE}" + (f", seed {i}" if i else ""): [*TI_RECIPE_ARGS, "--set", f"seed={i}"] for i in range(3)
}
# diffusers' recipe with more training seeds: TI ends up to ~0.2 apart from one seed to the next, so
# both tools' TI fidelity is the mean of three seeds (the wall time stays that of the seed-0 run)
DIFFUSERS_SEEDS = {"textual_inversion": (1, 2)}
# the script needs a one-token initializer; its default "ktn" is not one word in the world's vocabulary
CD_INITIALIZER = "vkt"
SCORE_IMAGES = 4  # per prompt, 16 prompts: with 2, the same method's score moved by ~0.15 between runs
SAME_LR = {"textual_inversion": 5e-3, "dreambooth": 2e-4, "dreambooth_lora": 2e-3, "custom_diffusion": 1e-3}


# --------------------------------------------------------------------------------------------
# Running one training process
# --------------------------------------------------------------------------------------------


def run(cmd: list[str], log: Path, env: dict) -> dict:
    """Wall seconds and peak RSS (MiB) of one process; its output goes to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{cmd[1]} failed (exit {code}); see {log}")
    return {"seconds": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "small_parent": True}


def environment(work: Path) -> dict:
    # limner's cache (class images, retrieval indexes) lives in the work folder: the prepare step
    # builds the world pool's CLIP index there, untimed, as diffusers' retrieve.py runs untimed
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(ROOT / "src"),
        TQDM_MININTERVAL="5",
        LIMNER_CACHE=str(work / "cache"),
    )
    env.pop("WANDB_MODE", None)
    return env


def limner_cmd(method: str, subject: str, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "limner.cli",
        "train",
        "--method",
        method,
        "--subject",
        subject,
        "--class-noun",
        CLASS_NOUN,
        "--out",
        str(out),
        *extra,
    ]


# runs a script as `python script.py` does, then exits as limner's command line does: the exit handlers,
# without the interpreter's teardown (which, with a CUDA build of torch, adds ~120 MiB to the peak)
WITHOUT_TEARDOWN = (
    "import atexit, os, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
    "atexit._run_exitfuncs(); sys.stdout.flush(); os._exit(0)"
)


def diffusers_cmd(
    repo: Path, method: str, base: Path, data: Path, out: Path, *extra: str, teardown: bool = True
) -> list[str]:
    python = [sys.executable] if teardown else [sys.executable, "-c", WITHOUT_TEARDOWN]
    script = [
        *python,
        str(repo / SCRIPTS[method]),
        f"--pretrained_model_name_or_path={base}",
        f"--output_dir={out}",
        f"--resolution={RES}",
        "--seed=0",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
    ]
    data_arg = "--train_data_dir" if method == "textual_inversion" else "--instance_data_dir"
    return script + [f"{data_arg}={data}", *extra]


def same_settings_args(method: str, steps: int) -> tuple[list[str], list[str]]:
    """(limner args, diffusers args) for one identical-settings run."""
    lr = SAME_LR[method]
    limner = [
        "--steps",
        str(steps),
        "--batch-size",
        str(BATCH),
        "--lr",
        str(lr),
        "--set",
        "checkpoint_every=0",
        "--set",
        "captions=false",
    ]
    diffusers = [
        f"--max_train_steps={steps}",
        f"--train_batch_size={BATCH}",
        f"--learning_rate={lr}",
        "--checkpointing_steps=100000",
    ]
    if method == "textual_inversion":
        limner += [
            "--set",
            "weight_decay=0.01",
            "--set",
            "min_snr_gamma=0",
        ]  # diffusers' AdamW default, timesteps weighed alike
        diffusers += [
            "--placeholder_token=<s*>",
            f"--initializer_token={CLASS_NOUN}",
            "--learnable_property=object",
            "--save_steps=100000",
        ]
    elif method in ("dreambooth", "dreambooth_lora"):
        limner += ["--set", "prior_preservation=none"]
        diffusers += [f"--instance_prompt=a sks {CLASS_NOUN}"]
        if method == "dreambooth_lora":
            limner += ["--set", "lora_rank=8"]
            diffusers += ["--rank=8"]
    else:
        # the script's default --freeze_model crossattn_kv: attn2's K and V only
        limner += [
            "--set",
            "prior_preservation=false",
            "--set",
            f"initializer={CD_INITIALIZER}",
            "--set",
            "mode=crossattn_kv",
        ]
        diffusers += [
            f"--instance_prompt=a photo of a <new1> {CLASS_NOUN}",
            "--modifier_token=<new1>",
            f"--initializer_token={CD_INITIALIZER}",
        ]
    return limner, diffusers


def recipe_args(method: str, class_dir: Path) -> list[str]:
    """diffusers' README recipe for each script (examples/*/README.md), at the world's 64 px."""
    if method == "textual_inversion":
        return [
            "--placeholder_token=<s*>",
            f"--initializer_token={CLASS_NOUN}",
            "--learnable_property=object",
            "--train_batch_size=1",
            "--gradient_accumulation_steps=4",
            "--max_train_steps=3000",
            "--learning_rate=5e-4",
            "--scale_lr",
            "--save_steps=100000",
        ]
    if method == "dreambooth":
        return [
            f"--instance_prompt=a photo of sks {CLASS_NOUN}",
            "--with_prior_preservation",
            "--prior_loss_weight=1.0",
            f"--class_prompt=a photo of {CLASS_NOUN}",
            f"--class_data_dir={class_dir}",
            "--num_class_images=200",
            "--train_batch_size=1",
            "--learning_rate=5e-6",
            "--max_train_steps=800",
            "--checkpointing_steps=100000",
        ]
    if method == "dreambooth_lora":
        return [
            f"--instance_prompt=a photo of sks {CLASS_NOUN}",
            "--train_batch_size=1",
            "--learning_rate=1e-4",
            "--max_train_steps=500",
            "--checkpointing_steps=100000",
        ]
    return [
        f"--class_data_dir={class_dir}",
        "--with_prior_preservation",
        "--real_prior",
        "--prior_loss_weight=1.0",
        f"--class_prompt={CLASS_NOUN}",
        "--num_class_images=200",
        f"--instance_prompt=photo of a <new1> {CLASS_NOUN}",
        "--train_batch_size=2",
        "--learning_rate=1e-5",
        "--max_train_steps=250",
        "--scale_lr",
        "--hflip",
        "--modifier_token=<new1>",
        f"--initializer_token={CD_INITIALIZER}",
        "--checkpointing_steps=100000",
    ]


# --------------------------------------------------------------------------------------------
# Data: the subject's references for both tools, retrieved regularisation images for Custom Diffusion
# --------------------------------------------------------------------------------------------


def prepare(work: Path, refs: Path) -> None:
    """References, Custom Diffusion's retrieved regularisation set (which also builds the world pool's
    CLIP index in limner's cache, untimed), the base's path and fingerprint."""
    from limner.evaluation.cache_keys import default_settings, digest
    from limner.methods import get_method
    from limner.methods.custom_diffusion import CustomDiffusionConfig, regularization_set
    from limner.models.loading import WORLD_BASE, fingerprint, load_base

    write_references(refs)
    pairs = regularization_set(load_base(None), CLASS_NOUN, CustomDiffusionConfig(num_reg_images=200))
    write_real_prior(work / "custom_diffusion" / "class-images", pairs)
    defaults = {m: digest(default_settings(get_method(m))) for m in METHODS}
    (work / "prepared.json").write_text(
        json.dumps({"base": str(WORLD_BASE), "fingerprint": fingerprint(WORLD_BASE), "defaults": defaults})
    )


def write_references(folder: Path) -> None:
    from PIL import Image

    from limner.evaluation.subjects import world_subjects

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(world_subjects(f"world:{SUBJECT}")[0].images):
        Image.fromarray(im).save(folder / f"{i}.png")


def write_real_prior(folder: Path, pairs: list) -> None:
    """The layout diffusers' retrieve.py writes (images/, images.txt, caption.txt), filled with the
    images and captions limner's Custom Diffusion retrieves from the same world pool."""
    from PIL import Image

    if (folder / "caption.txt").exists():
        return
    (folder / "images").mkdir(parents=True, exist_ok=True)
    paths, captions = [], []
    for i, (im, caption) in enumerate(pairs):
        p = folder / "images" / f"{i}.png"
        Image.fromarray(im).save(p)
        paths.append(str(p))
        captions.append(caption)
    (folder / "images.txt").write_text("\n".join(paths) + "\n")
    (folder / "caption.txt").write_text("\n".join(captions) + "\n")


# --------------------------------------------------------------------------------------------
# Scoring: diffusers' outputs wrapped as limner concepts, then `limner eval` on each
# --------------------------------------------------------------------------------------------


def wrap_diffusers_output(method: str, out: Path, base_fingerprint: str) -> Path:
    """A concept folder (limner.json + links to diffusers' files) beside the script's output, so
    limner's loaders, which read diffusers' formats, install them as they install limner's own."""
    concept = out.with_name(out.name + "-concept")
    shutil.rmtree(concept, ignore_errors=True)
    concept.mkdir()
    m = {"method": method, "subject": SUBJECT, "class_noun": CLASS_NOUN, "base_fingerprint": base_fingerprint}
    if method == "textual_inversion":
        m |= {"token": "<s*>", "tokens": ["<s*>"]}
        links = {"learned_embeds.safetensors": "learned_embeds.safetensors"}
    elif method == "dreambooth":
        m |= {"identifier": "sks", "tokens": ["sks"], "lora": False, "config": {"train_text_encoder": False}}
        links = {"pipeline": "."}  # the script's output folder is a full pipeline
    elif method == "dreambooth_lora":
        m |= {"identifier": "sks", "tokens": ["sks"], "lora": True, "config": {"train_text_encoder": False}}
        links = {"pytorch_lora_weights.safetensors": "pytorch_lora_weights.safetensors"}
    else:
        files = {"weights": "pytorch_custom_diffusion_weights.safetensors", "tokens": {"<new1>": "<new1>.safetensors"}}
        m |= {"tokens": ["<new1>"], "files": files}
        links = {name: name for name in (files["weights"], "<new1>.safetensors")}
    for name, target in links.items():
        (concept / name).symlink_to((out / target).resolve())
    (concept / "limner.json").write_text(json.dumps(m, indent=1))
    return concept


def score(concept: Path, env: dict) -> dict:
    """The artifact's world-bench subject fidelity, with what it was measured on."""
    work = concept.with_name(concept.name + "-eval")
    out = work / "report"
    cmd = [
        sys.executable,
        "-m",
        "limner.cli",
        "eval",
        "--concept",
        str(concept),
        "--subjects",
        f"world:{SUBJECT}",
        "-n",
        str(SCORE_IMAGES),
        "--no-bounds",
        "--cache",
        str(work / "eval-cache"),
        "--out",
        str(out),
    ]
    run(cmd, work / "eval.log", env)
    rows = json.loads((out / "results.json").read_text())["rows"]
    fidelity = round(next(iter(rows.values()))["mean"]["subject_fidelity"], 4)
    return {
        "subject_fidelity": fidelity,
        "score_images": SCORE_IMAGES,
        "subject_probe": subject_probe(),
        "concept": str(concept),
    }


@functools.cache  # asked for every row; the probe does not change during a run
def subject_probe() -> str:
    """The digest of the world's subject probe, which reads every fidelity here: a row read by another
    probe is scored again."""
    from limner.models.loading import WORLD_PROBES
    from limner.world.probes import probe_digests

    return probe_digests(WORLD_PROBES)["subject"]


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--diffusers", type=Path, required=True, help="a checkout of the diffusers repository")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--work", type=Path, default=Path("/tmp/limner-bench"))
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument(
        "--no-other-schedules", action="store_true", help="skip limner's runs on other schedules (OTHER_RUNS)"
    )
    ap.add_argument(
        "--ti-recipe-in-limner", action="store_true", help="also run diffusers' TI recipe with limner (TI_RECIPE_RUNS)"
    )
    ap.add_argument(
        "--per-step-only",
        action="store_true",
        help="measure the identical-settings rows (time per step, memory) of both tools again, in this one run, and "
        "keep the recorded fidelity rows as they are (for a change that leaves what limner learns bit for bit the "
        "same: benchmarks/behaviour_fingerprint.py)",
    )
    ap.add_argument("--repeats", type=int, default=REPEATS, help="runs of each identical-settings timing, per tool")
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    refs = args.work / "references"
    if args.prepare:
        return prepare(args.work, refs)
    env = environment(args.work)
    # the data is prepared in a child process: this one stays small, because a child's peak RSS
    # (ru_maxrss) starts from its parent's size at the fork
    run(
        [sys.executable, __file__, "--diffusers", str(args.diffusers), "--work", str(args.work), "--prepare"],
        args.work / "prepare.log",
        env,
    )
    prepared = json.loads((args.work / "prepared.json").read_text())
    base = Path(prepared["base"])
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.per_step_only:
        timed = [
            k for k in results if any(k.startswith(f"{m}/same/") or k.startswith(f"{m}/memory/") for m in args.methods)
        ]
        results = {k: v for k, v in results.items() if k not in timed}
    else:
        results = for_defaults(for_base(results, prepared["fingerprint"]), prepared["defaults"])

    def once(key: str, fn):
        if key not in results:
            results[key] = fn()
            results_path.write_text(json.dumps(results, indent=1))
            print(key, results[key], flush=True)
        return results[key]

    for method in args.methods:
        work = args.work / method
        for rep in range(args.repeats):
            # both lengths every time: one slow short run alone moved a ratio by ~0.3
            for steps in (SHORT, LONG):
                lim, dif = same_settings_args(method, steps)
                for tool, cmd in (
                    ("limner", limner_cmd(method, str(refs), work / f"limner-{steps}", *lim)),
                    (
                        "diffusers",
                        diffusers_cmd(args.diffusers, method, base, refs, work / f"diffusers-{steps}", *dif),
                    ),
                ):
                    once(
                        same_key(method, tool, steps, rep),
                        lambda cmd=cmd, log=work / f"{tool}-{steps}.log": run(cmd, log, env),
                    )
                    shutil.rmtree(work / f"{tool}-{steps}", ignore_errors=True)

        # diffusers' script once more, ending as limner's command line ends: the memory the training needs
        quiet_out = work / "diffusers-without-teardown"
        quiet_cmd = diffusers_cmd(
            args.diffusers, method, base, refs, quiet_out, *same_settings_args(method, SHORT)[1], teardown=False
        )
        once(
            f"{method}/memory/diffusers-without-teardown",
            lambda cmd=quiet_cmd, log=work / "diffusers-without-teardown.log": run(cmd, log, env),
        )
        shutil.rmtree(quiet_out, ignore_errors=True)
        if args.per_step_only:
            continue

        # Custom Diffusion's real prior is written by prepare(); diffusers' DreamBooth draws its class
        # images into an empty folder inside the timed run, as limner draws its own
        class_dir = (
            args.work / "custom_diffusion" / "class-images" if method == "custom_diffusion" else work / "class-images"
        )

        def diffusers_recipe(seed: int = 0, method=method, work=work, class_dir=class_dir):
            name = "diffusers-recipe" + (f"-seed{seed}" if seed else "")
            out = work / name
            cmd = diffusers_cmd(
                args.diffusers, method, base, refs, out, *recipe_args(method, class_dir), f"--seed={seed}"
            )
            return run(cmd, work / f"{name}.log", env) | score(
                wrap_diffusers_output(method, out, prepared["fingerprint"]), env
            )

        def limner_recipe(label: str = "defaults", extra: tuple[str, ...] = (), method=method, work=work):
            name = "limner-" + label.replace(" ", "_").replace(",", "")
            out = work / name
            cache = work / "limner-class-image-cache"  # emptied: limner draws its class images inside the timed run
            shutil.rmtree(cache, ignore_errors=True)
            extra = [*extra, "--set", f"class_image_cache={cache}"] if method.startswith("dreambooth") else list(extra)
            r = run(limner_cmd(method, f"world:{SUBJECT}", out, *extra), work / f"{name}.log", env)
            return r | score(out, env) | {"steps": label, "defaults": prepared["defaults"][method]}

        for key in [k for k in results if k.startswith(f"{method}/recipe/")]:
            rescore(results, key, env)
        results_path.write_text(json.dumps(results, indent=1))
        once(f"{method}/recipe/diffusers", diffusers_recipe)
        for seed in DIFFUSERS_SEEDS.get(method, ()):
            once(f"{method}/recipe/diffusers/seed {seed}", lambda seed=seed: diffusers_recipe(seed))
        once(f"{method}/recipe/limner", limner_recipe)
        # the same defaults on another schedule: does a shorter (or longer) run reach diffusers' fidelity sooner?
        other = {} if args.no_other_schedules else OTHER_RUNS.get(method, {})
        if args.ti_recipe_in_limner and method == "textual_inversion":
            other = other | TI_RECIPE_RUNS
        for label, extra in other.items():
            once(
                f"{method}/recipe/limner/{label}", lambda label=label, extra=tuple(extra): limner_recipe(label, extra)
            )
    report(results, args.out)


def for_base(results: dict, fingerprint: str) -> dict:
    """The results that still hold on this base. Times per step and memory depend only on the
    architecture and sizes; fidelities, and so the recipe runs, depend on the weights: they are run
    again when the world base has changed since they were measured."""
    if results.get("base_fingerprint") == fingerprint:
        # a row that must be scored again (rescore) and whose artifact is gone is trained again
        gone = [
            k for k, v in results.items() if "/recipe/" in k and needs_scoring(v) and not Path(v["concept"]).exists()
        ]
        if gone:
            print(
                f"{len(gone)} recipe runs were read by another subject probe and their artifacts are gone: "
                "training them again",
                flush=True,
            )
        return {k: v for k, v in results.items() if k not in gone}
    stale = [k for k in results if "/recipe/" in k]
    if stale:
        print(
            f"base changed ({results.get('base_fingerprint', 'unrecorded')} -> {fingerprint}): "
            f"measuring the {len(stale)} recipe runs again",
            flush=True,
        )
    return {k: v for k, v in results.items() if k not in stale} | {"base_fingerprint": fingerprint}


def for_defaults(results: dict, defaults: dict[str, str]) -> dict:
    """The results that still hold for limner's defaults: a limner recipe row (the defaults, or the
    defaults with a few settings changed) is measured again when the method's defaults have changed."""
    stale = [k for k, v in results.items() if "/recipe/limner" in k and v.get("defaults") != defaults[k.split("/")[0]]]
    if stale:
        print(f"limner's defaults changed: measuring {len(stale)} limner recipe runs again", flush=True)
    return {k: v for k, v in results.items() if k not in stale}


def needs_scoring(row: dict) -> bool:
    """Scored with another number of images, or read by another subject probe."""
    return row.get("score_images") != SCORE_IMAGES or row.get("subject_probe") != subject_probe()


def rescore(results: dict, key: str, env: dict) -> None:
    """A row that needs scoring again is scored from its artifact, if that is still on disk (training
    it again would take diffusers' TI recipe ten minutes); for_base drops the others."""
    row = results[key]
    concept = Path(row["concept"])
    if needs_scoring(row) and concept.exists():
        row.update(score(concept, env))
        print(key, "rescored:", row["subject_fidelity"], flush=True)


def same_key(method: str, tool: str, steps: int, rep: int) -> str:
    return f"{method}/same/{tool}/{steps}" + (f"#{rep}" if rep else "")


def fastest(results: dict, method: str, tool: str, steps: int) -> float:
    """The fastest of every recorded run of this kind (runs repeated after an interrupted benchmark count too)."""
    key = same_key(method, tool, steps, 0)
    return min(v["seconds"] for k, v in results.items() if k == key or k.startswith(key + "#"))


def per_step(results: dict, method: str, tool: str) -> float:
    return (fastest(results, method, tool, LONG) - fastest(results, method, tool, SHORT)) / (LONG - SHORT)


def peak_memory(results: dict, method: str) -> tuple[float, float, bool]:
    """(limner MiB, diffusers MiB, clean): only runs started from a small parent count when both tools
    have one, because a child's ru_maxrss starts at its parent's size at the fork."""

    def peaks(tool: str, clean: bool) -> list[float]:
        return [
            v["peak_rss_mib"]
            for k, v in results.items()
            if k.startswith(f"{method}/same/{tool}/") and (v.get("small_parent") or not clean)
        ]

    clean = bool(peaks("limner", True) and peaks("diffusers", True))
    return max(peaks("limner", clean)), max(peaks("diffusers", clean)), clean


def schedules(runs: list[dict]) -> dict[str, list[dict]]:
    """limner's recipe runs grouped by schedule: "seed N" runs belong to the defaults, "X, seed N" to X."""
    groups: dict[str, list[dict]] = {}
    for v in runs:
        label = str(v["steps"])
        label = "defaults" if label.startswith("seed ") else label.split(", seed ")[0]
        groups.setdefault(label, []).append(v)
    return groups


def diffusers_fidelity(results: dict, method: str) -> dict:
    """diffusers' recipe run; where it also ran with other seeds, the mean fidelity of all of them
    (with the wall time of the first run, the one timed on an idle machine)."""
    first = results[f"{method}/recipe/diffusers"]
    seeds = [first] + [v for k, v in results.items() if k.startswith(f"{method}/recipe/diffusers/seed ")]
    if len(seeds) == 1:
        return first
    mean = sum(v["subject_fidelity"] for v in seeds) / len(seeds)
    each = ", ".join(f"{v['subject_fidelity']:.3f}" for v in seeds)
    label = f"mean of {len(seeds)} seeds ({each})"
    return first | {"subject_fidelity": mean, "label": label}


def report(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if same_key(m, "limner", LONG, 0) in results]
    mixed = [k for k, v in results.items() if "/recipe/" in k and v.get("score_images") != SCORE_IMAGES]
    if mixed:
        raise SystemExit(
            f"scored with another number of images than {SCORE_IMAGES}: {', '.join(mixed)}; delete them and run again"
        )
    lines = [
        "| method | s/step limner | s/step diffusers | ratio | peak MiB limner | peak MiB diffusers (without exit teardown) | "
        "diffusers recipe: fidelity, wall s | limner defaults: fidelity, wall s | limner, other schedules or seeds: fidelity, wall s | "
        "wall-time ratio to diffusers' fidelity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    table = {}
    for m in methods:
        ls, ds = per_step(results, m, "limner"), per_step(results, m, "diffusers")
        lm, dm, clean = peak_memory(results, m)
        mark = "" if clean else " *"
        quiet = results.get(f"{m}/memory/diffusers-without-teardown", {}).get("peak_rss_mib")
        dm_text = f"{dm:.0f}{mark}" + (f" ({quiet:.0f})" if quiet else "")
        if f"{m}/recipe/limner" not in results or f"{m}/recipe/diffusers" not in results:
            # an interrupted run: the recipe rows of this method are still to be measured
            table[m] = {"step_ratio": ls / ds, "wall_ratio": float("nan"), "mem_ratio": lm / dm}
            lines.append(
                f"| {m} | {ls:.3f} | {ds:.3f} | {ls / ds:.2f} | {lm:.0f}{mark} | {dm_text} | not measured yet | | | |"
            )
            continue
        dr, lr = diffusers_fidelity(results, m), results[f"{m}/recipe/limner"]
        # the fastest limner run (defaults, or the defaults on another schedule) that reached at least
        # the fidelity diffusers' recipe reached; where the defaults ran with several seeds, their mean
        # stands for them (never the luckiest seed)
        runs = [v for k, v in results.items() if k.startswith(f"{m}/recipe/limner")]
        candidates = []
        for label, group in schedules(runs).items():
            if len(group) == 1:
                candidates.append(group[0])
                continue
            mean = {k: sum(v[k] for v in group) / len(group) for k in ("subject_fidelity", "seconds")}
            candidates.append(mean | {"steps": f"{label}, mean of {len(group)} seeds"})
            runs.append(candidates[-1])
        good = [v for v in candidates if v["subject_fidelity"] >= dr["subject_fidelity"]]
        reached = bool(good)
        fastest_good = min(good, key=lambda v: v["seconds"]) if good else None
        ratio = fastest_good["seconds"] / dr["seconds"] if reached else float("nan")
        table[m] = {"step_ratio": ls / ds, "wall_ratio": ratio, "mem_ratio": lm / dm}
        lines.append(
            f"| {m} | {ls:.3f} | {ds:.3f} | {ls / ds:.2f} | {lm:.0f}{mark} | {dm_text} | {dr['subject_fidelity']:.3f}{' ' + dr['label'] if 'label' in dr else ''}, {dr['seconds']:.0f} | "
            f"{lr['subject_fidelity']:.3f}, {lr['seconds']:.0f} | "
            + "; ".join(f"{v['steps']}, {v['subject_fidelity']:.3f}, {v['seconds']:.0f}" for v in runs if v is not lr)
            + f" | {ratio:.2f}{'' if reached else ' (not reached)'} |"
        )
    note = (
        f"\nWorld base `{results.get('base_fingerprint', 'unrecorded')}`, subject `{SUBJECT}`; identical settings: batch {BATCH}, {RES} px, constant LR, s/step = (wall({LONG} steps) - "
        f"wall({SHORT} steps)) / {LONG - SHORT}, each wall time the fastest of its runs. Recipes: diffusers' README settings at {RES} px; limner's defaults. Fidelity: "
        f"world-bench subject fidelity of the finished artifact (16 prompts x {SCORE_IMAGES} images, `limner eval`). Wall time: the whole "
        "training process, class images included. Peak memory: the largest max RSS of the training process over the "
        "identical-settings runs started from a small parent process (* where only runs under an earlier version of this script, "
        "whose parent held a loaded pipeline, exist: a child's ru_maxrss starts from its parent's size); in brackets, diffusers' "
        "script run once more (50 steps) ending as limner's command line does, without the interpreter's teardown, which "
        "with this CUDA build of torch adds ~120 MiB to any process's peak: the memory the training itself needs. Command: `python benchmarks/tuning_vs_diffusers.py --diffusers PATH` "
        "(torch 2.14.1 + torchvision 0.29.1 venv, diffusers 0.42.1, 2 CPU cores).\n"
    )
    (out / "results.md").write_text("\n".join(lines) + "\n" + note)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.25
    for i, (key, label) in enumerate(
        (
            ("step_ratio", "time per step"),
            ("wall_ratio", "wall time to diffusers' fidelity"),
            ("mem_ratio", "peak memory"),
        )
    ):
        ax.bar([j + i * width for j in range(len(methods))], [table[m][key] for m in methods], width, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.7, color="k", lw=0.8, ls="--")
    ax.set_xticks([j + width for j in range(len(methods))], methods, fontsize=8)
    ax.set_ylabel("limner / diffusers")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ratios.png", dpi=120)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
