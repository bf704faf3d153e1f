"""limner's IP-Adapter side by side with diffusers' IP-Adapter training tutorials, on the world base.

    python benchmarks/ip_adapter_vs_diffusers.py --diffusers PATH/TO/diffusers-repo --site DIR \
        [--adapter ADAPTER_FOLDER] [--out benchmarks/ip_adapter]

Run it in the virtual environment of tuning_vs_diffusers.py (torch + torchvision + diffusers; limner runs from
`src/` in it). diffusers' tutorials (examples/research_projects/ip_adapter/) import the IP-Adapter authors'
package: `--site DIR` is a folder holding it and einops, e.g.
`pip install --no-deps --target DIR ip-adapter==0.1.0 einops`. Three measurements:

1. pretraining, time per step and peak memory: `limner pretrain --method ip_adapter` (variant plain, and plus
   with the Resampler as wide as the world's cross-attention) against `tutorial_train_ip-adapter.py` and
   `tutorial_train_plus.py`, on the same base and image encoder, the same N world images and captions (an
   image folder with metadata.jsonl for limner, the tutorials' JSON list for diffusers), 64 px, batch 8, fp32,
   the paper's drop rates, AdamW 1e-4 with weight decay 0.01, no clipping; s/step = (wall(long) -
   wall(short)) / (steps difference), each wall time the fastest of REPEATS runs, so start-up and loading
   cancel out; peak memory = the largest ru_maxrss of the training process, started from this small process;
2. generation latency per image (25 dpm++ steps, guidance 5, batch 4, one process per side, after a warm-up
   batch) with an IP-Adapter concept against the bare base, same prompt;
3. personalization time: `limner train --method ip_adapter` (encoding the subject's references with the
   adapter) against DreamBooth's training time at limner's defaults on the same subject, read from
   tuning_vs_diffusers.py's results.json (not trained again here).

diffusers' scripts are copied into the work folder and patched there, never edited in place: each patch
(PATCHES, IP_ADAPTER_PATCHES) is written into results.json and results.md with the reason. `--pause PATTERN`
stops the processes matching PATTERN (pgrep -f) during each timed run and always resumes them after it.
Every finished run is kept in results.json, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from timed_processes import PAUSER, measure_once, run, write_results  # noqa: E402  (benchmarks/ is the script's folder)

TUNING_RESULTS = ROOT / "benchmarks" / "results" / "results.json"
TUTORIALS = "examples/research_projects/ip_adapter"
SCRIPTS = {"plain": "tutorial_train_ip-adapter.py", "plus": "tutorial_train_plus.py"}
VARIANTS = ("plain", "plus")
IMAGES = 80  # world samples written once: 10 batches of 8, one tutorial epoch
BATCH, RES, LR, WEIGHT_DECAY = 8, 64, 1e-4, 0.01
SHORT, LONG = 10, 40  # steps of the two timing runs (1 and 4 tutorial epochs)
REPEATS = 2  # each timing run twice, alternating tools; the faster counts
SUBJECT, CLASS_NOUN = "spot_dog", "dog"  # tuning_vs_diffusers.py's subject: DreamBooth's time is measured there
PROMPT = "a dog on the beach"  # the generation prompt, both sides
GEN = {"steps": 25, "scheduler": "dpm++", "guidance": 5.0, "batch": 4, "timed_batches": 3}

# The tutorials' minimal patches: (script, text, replacement, why). Each text must occur exactly once.
PATCHES = [
    (
        script,
        "self.clip_image_processor = CLIPImageProcessor()",
        "self.clip_image_processor = CLIPImageProcessor.from_pretrained({extractor!r})",
        "CLIPImageProcessor() makes 224 px inputs, and the world's 64 px image encoder refuses them (ValueError: "
        "Input image size (224*224) doesn't match model (64*64)): the base's own feature_extractor/ (64 px, mean "
        "and std 0.5, what limner's encoder reads) instead",
    )
    for script in SCRIPTS.values()
]
# The IP-Adapter authors' package (ip-adapter 0.1.0 on PyPI, the tutorials' requirements.txt) as copied into
# the work folder: its package import reaches a module diffusers has since moved
IP_ADAPTER_PATCHES = [
    (
        "ip_adapter/ip_adapter.py",
        "from diffusers.pipelines.controlnet import MultiControlNetModel",
        "from diffusers import MultiControlNetModel",
        "diffusers.pipelines.controlnet no longer exports MultiControlNetModel (diffusers 0.42 keeps it at the "
        "top level); without this, `import ip_adapter.ip_adapter` (ImageProjModel) fails before training starts",
    )
]


# --------------------------------------------------------------------------------------------
# Running one process
# --------------------------------------------------------------------------------------------


def environment(work: Path, site: Path | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_MININTERVAL="5", LIMNER_CACHE=str(work / "cache"))
    env["PYTHONPATH"] = os.pathsep.join(
        [str(work / "site"), str(site)] if site is not None else [str(ROOT / "src")]
    )  # diffusers' runs: the patched ip_adapter package first, then its folder (einops); limner's: src/
    env.pop("WANDB_MODE", None)
    return env


# runs a script as `python script.py` does, then exits as limner's command line does: the exit handlers,
# without the interpreter's teardown (which, with a CUDA build of torch, adds ~120 MiB to the peak)
WITHOUT_TEARDOWN = (
    "import atexit, os, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
    "atexit._run_exitfuncs(); sys.stdout.flush(); os._exit(0)"
)


def limner_cmd(variant: str, data: Path, out: Path, steps: int) -> list[str]:
    extra = ["--set", f"resampler_dim={RESAMPLER_DIM}"] if variant == "plus" else []
    return [
        *[sys.executable, "-m", "limner.cli", "pretrain", "--method", "ip_adapter", "--data", str(data)],
        *["--out", str(out), "--steps", str(steps), "--batch-size", str(BATCH), "--lr", str(LR)],
        *["--set", f"variant={variant}", "--set", f"weight_decay={WEIGHT_DECAY}", "--set", "checkpoint_every=0"],
        *["--set", "max_grad_norm=0", "--set", "pair=self", *extra],  # the tutorials do not clip
    ]


def diffusers_cmd(work: Path, variant: str, base: Path, out: Path, steps: int, teardown: bool = True) -> list[str]:
    assert steps * BATCH % IMAGES == 0, "the tutorials run whole epochs"
    python = [sys.executable] if teardown else [sys.executable, "-c", WITHOUT_TEARDOWN]
    return [
        *python,
        str(work / "scripts" / SCRIPTS[variant]),
        f"--pretrained_model_name_or_path={base}",
        f"--image_encoder_path={base / 'image_encoder'}",
        f"--data_json_file={work / 'data.json'}",
        f"--data_root_path={work / 'data'}",
        f"--output_dir={out}",
        f"--resolution={RES}",
        f"--train_batch_size={BATCH}",
        f"--learning_rate={LR}",
        f"--weight_decay={WEIGHT_DECAY}",
        f"--num_train_epochs={steps * BATCH // IMAGES}",  # the tutorials run whole epochs: IMAGES / BATCH steps each
        "--save_steps=100000",
        "--mixed_precision=no",
        "--report_to=tensorboard",  # the default: only checked, never written (the script inits no tracker)
    ]


# the Resampler's width: the world's cross-attention width, as the tutorial builds it (dim=cross_attention_dim)
RESAMPLER_DIM = 256


# --------------------------------------------------------------------------------------------
# Prepare (a child process, so this one stays small): data, patched scripts, semantics check
# --------------------------------------------------------------------------------------------


def prepare(work: Path, repo: Path, site: Path) -> None:
    from limner.models.loading import WORLD_BASE, fingerprint

    base = Path(WORLD_BASE)
    write_data(work)
    patches = patch_scripts(work, repo, site, base)
    prepared = {
        "base": str(base),
        "fingerprint": fingerprint(base),
        "patches": patches,
        "semantics": semantics(work),
        "cross_attention_dim": json.loads((base / "unet" / "config.json").read_text())["cross_attention_dim"],
    }
    (work / "prepared.json").write_text(json.dumps(prepared, indent=1))


def write_data(work: Path) -> None:
    """IMAGES world samples (the paper's pairing: each conditions on itself), written once in both layouts."""
    from PIL import Image

    from limner.data import open_stream

    folder = work / "data"
    if (work / "data.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    stream = iter(open_stream("world", seed=0, resolution=RES, pair="self"))
    rows = []
    for i in range(IMAGES):
        s = next(stream)
        name = f"{i:04d}.png"
        Image.fromarray(s.image).save(folder / name)
        rows.append({"file_name": name, "text": s.text})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "data.json").write_text(json.dumps([{"image_file": r["file_name"], "text": r["text"]} for r in rows]))


def apply_patches(text: str, patches: list, where: str, **fmt: str) -> str:
    for _, old, new, _ in patches:
        if text.count(old) != 1:
            raise SystemExit(f"{where}: expected {old!r} once, found it {text.count(old)} times: update the patch")
        text = text.replace(old, new.format(**fmt))
    return text


def patch_scripts(work: Path, repo: Path, site: Path, base: Path) -> list[dict]:
    scripts = work / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    for name in SCRIPTS.values():
        src = (repo / TUTORIALS / name).read_text()
        mine = [p for p in PATCHES if p[0] == name]
        (scripts / name).write_text(apply_patches(src, mine, name, extractor=str(base / "feature_extractor")))
    package = work / "site" / "ip_adapter"
    shutil.rmtree(package, ignore_errors=True)
    shutil.copytree(site / "ip_adapter", package)
    for rel, *_ in IP_ADAPTER_PATCHES:
        path = work / "site" / rel
        path.write_text(apply_patches(path.read_text(), [p for p in IP_ADAPTER_PATCHES if p[0] == rel], rel))
    return [
        {"file": f, "replaced": old, "with": new.format(extractor=str(base / "feature_extractor")), "why": why}
        for f, old, new, why in PATCHES + [(f"ip_adapter package: {f}", o, n, w) for f, o, n, w in IP_ADAPTER_PATCHES]
    ]


def semantics(work: Path) -> dict:
    """The training objective on both sides, read from the scripts and limner's defaults, and compared."""
    from limner.methods.ip_adapter import IPAdapterSettings
    from limner.training.config import TrainConfig

    found = {}
    for variant, name in SCRIPTS.items():
        text = (work / "scripts" / name).read_text()
        rates = re.search(r"t_drop_rate=([\d.]+), i_drop_rate=([\d.]+), ti_drop_rate=([\d.]+)", text)
        order = (
            "rand_num < self.i_drop_rate" in text
            and "rand_num < (self.i_drop_rate + self.t_drop_rate)" in text
            and "rand_num < (self.i_drop_rate + self.t_drop_rate + self.ti_drop_rate)" in text
        )
        found[variant] = {
            "drop_image": float(rates.group(2)),
            "drop_text": float(rates.group(1)),
            "drop_both": float(rates.group(3)),
            "one_draw_image_text_both": order,
            "loss": "mse(noise_pred, noise) mean"
            if 'F.mse_loss(noise_pred.float(), noise.float(), reduction="mean")' in text
            else "?",
            "dropped_image": "zero embedding"
            if "torch.zeros_like(image_embed)" in text
            else "zero image (encoded)"
            if "torch.zeros_like(clip_image)" in text
            else "?",
        }
    s, t = IPAdapterSettings(), TrainConfig()
    limner = {
        "drop_image": s.drop_image,
        "drop_text": s.drop_text,
        "drop_both": s.drop_both,
        "one_draw_image_text_both": True,  # limner.methods.ip_adapter.official_drops
        "loss": "mse(noise_pred, noise) mean" if not t.min_snr_gamma and not t.noise_offset else "weighted",
        "dropped_image": {"plain": "zero embedding", "plus": "zero image (encoded)"},
    }
    same = all(
        found[v][k] == (limner[k][v] if isinstance(limner[k], dict) else limner[k]) for v in found for k in found[v]
    )
    return {"diffusers": found, "limner": limner, "same": same}


# --------------------------------------------------------------------------------------------
# Generation latency (a child process per side)
# --------------------------------------------------------------------------------------------


def generation_child(concept: str) -> None:
    """Prints {"per_image_s": [...]}: GEN['timed_batches'] batches after a warm-up one, bare or with `concept`."""
    import torch

    from limner.conditioning import apply_concepts
    from limner.generation import GenerationSettings, generate
    from limner.models.loading import load_base

    torch.manual_seed(0)
    b = load_base(None)
    conditioning = None
    if concept != "none":
        conditioning = apply_concepts(b, [Path(concept)], None, False).condition(PROMPT, GEN["steps"], None)
    s = GenerationSettings(
        prompt=PROMPT,
        num_images=GEN["batch"],
        steps=GEN["steps"],
        guidance_scale=GEN["guidance"],
        scheduler=GEN["scheduler"],
        batch_size=GEN["batch"],
    )
    times = []
    for i in range(GEN["timed_batches"] + 1):
        r = generate(b, s, None, conditioning)
        if i:
            times.append(r.record["timings"]["per_image_s"])
    print("RESULT " + json.dumps({"per_image_s": times}), flush=True)


def generation(work: Path, concept: Path | None, log: Path, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--generation-child", str(concept or "none")]
    cmd += ["--quick"] if GEN["timed_batches"] == 1 else []
    r = run(cmd, log, env)
    times = json.loads(log.read_text().split("RESULT ")[-1])["per_image_s"]
    return r | {"per_image_s": min(times), "per_image_s_all": times}


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--diffusers", type=Path, help="a checkout of the diffusers repository")
    ap.add_argument(
        "--site",
        type=Path,
        help="a folder with the ip_adapter package (ip-adapter 0.1.0) and einops for the tutorials",
    )
    ap.add_argument(
        "--adapter", help="the plain adapter to encode and draw with (a `limner pretrain` folder; default: shipped)"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "ip_adapter")
    ap.add_argument("--work", type=Path, default=Path("/tmp/limner-ip-bench"))
    ap.add_argument("--pause", help="pgrep -f pattern of processes to stop during each timed run (always resumed)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every timed process (default: torch's, all cores)")
    ap.add_argument("--report-only", action="store_true", help="write results.md from results.json")
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--generation-child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # a try of the whole run: fewer steps
    args = ap.parse_args()
    if args.quick:
        global LONG, REPEATS
        LONG, REPEATS = 20, 1
        GEN["timed_batches"] = 1
    if args.generation_child:
        return generation_child(args.generation_child)
    if args.prepare:
        return prepare(args.work, args.diffusers, args.site)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.report_only:
        return report(results, args.out)
    if args.diffusers is None or args.site is None:
        raise SystemExit(
            "give --diffusers (a diffusers checkout) and --site (ip_adapter and einops: see the docstring)"
        )
    PAUSER.pattern = args.pause
    # a SIGTERM ends the benchmark through the finally clauses, so nothing stays stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = environment(args.work)
    denv = environment(args.work, args.site.resolve())
    if args.threads:
        env["OMP_NUM_THREADS"] = denv["OMP_NUM_THREADS"] = str(args.threads)
    # the data is prepared in a child process: this one stays small, because a child's peak RSS
    # (ru_maxrss) starts from its parent's size at the fork
    run(
        [sys.executable, __file__, "--diffusers", str(args.diffusers), "--site", str(args.site.resolve())]
        + ["--work", str(args.work), "--prepare"],
        args.work / "prepare.log",
        env,
        timed=False,
    )
    prepared = json.loads((args.work / "prepared.json").read_text())
    if prepared["cross_attention_dim"] != RESAMPLER_DIM:
        raise SystemExit(f"RESAMPLER_DIM {RESAMPLER_DIM} is not this base's cross-attention width: update it")
    if (
        results.get("base_fingerprint") not in (None, prepared["fingerprint"])
        or results.get("threads") != args.threads
    ):
        print("base or threads changed: measuring everything again", flush=True)
        results = {}
    results |= {k: prepared[k] for k in ("patches", "semantics")} | {"base_fingerprint": prepared["fingerprint"]}
    results["threads"] = args.threads
    base = Path(prepared["base"])

    once = partial(measure_once, results, results_path)  # each measurement saved as it is made

    try:
        for variant in VARIANTS:
            work = args.work / variant
            for rep in range(REPEATS):
                for steps in (SHORT, LONG):
                    for tool in ("limner", "diffusers"):
                        out = work / f"{tool}-{steps}"
                        cmd = (
                            limner_cmd(variant, args.work / "data", out, steps)
                            if tool == "limner"
                            else diffusers_cmd(args.work, variant, base, out, steps)
                        )
                        e = env if tool == "limner" else denv
                        key = f"{variant}/same/{tool}/{steps}" + (f"#{rep}" if rep else "")
                        once(key, lambda cmd=cmd, e=e, log=work / f"{tool}-{steps}-{rep}.log": run(cmd, log, e))
                        shutil.rmtree(out, ignore_errors=True)
            quiet = work / "diffusers-without-teardown"
            once(
                f"{variant}/memory/diffusers-without-teardown",
                lambda cmd=diffusers_cmd(args.work, variant, base, quiet, SHORT, teardown=False), log=work / "diffusers-without-teardown.log": (
                    run(cmd, log, denv)
                ),
            )
            shutil.rmtree(quiet, ignore_errors=True)

        # personalization: encode spot_dog's references with the adapter (the concept is kept for generation)
        concept = args.work / "concept"
        encode_cmd = [
            *[sys.executable, "-m", "limner.cli", "train", "--method", "ip_adapter", "--subject", f"world:{SUBJECT}"],
            *["--class-noun", CLASS_NOUN, "--out", str(concept)],
            *(["--adapter", args.adapter] if args.adapter else []),
        ]
        for rep in range(REPEATS):

            def encode(rep=rep):
                shutil.rmtree(concept, ignore_errors=True)
                r = run(encode_cmd, args.work / f"encode-{rep}.log", env)
                manifest = json.loads((concept / "limner.json").read_text())
                return r | {
                    "adapter": manifest.get("adapter"),
                    "adapter_fingerprint": manifest.get("adapter_fingerprint"),
                    "manifest_seconds": find_seconds(manifest),
                }

            once("encode" + (f"#{rep}" if rep else ""), encode)
        if not (concept / "limner.json").exists():
            run(encode_cmd, args.work / "encode-again.log", env, timed=False)
        for rep in range(REPEATS):
            for side, c in (("bare", None), ("adapter", concept)):
                key = f"generation/{side}" + (f"#{rep}" if rep else "")
                once(
                    key, lambda c=c, log=args.work / f"generation-{side}-{rep}.log": generation(args.work, c, log, env)
                )
    finally:
        print(f"others paused for {PAUSER.seconds:.0f} s in all", flush=True)
    results["paused_seconds_this_run"] = round(PAUSER.seconds, 1)
    results_path.write_text(json.dumps(results, indent=1))
    report(results, args.out)


def find_seconds(manifest: dict):
    """The encode time a concept's manifest records, wherever it keeps it (None if it keeps none)."""
    for k in ("seconds", "train_seconds", "encode_seconds"):
        if k in manifest:
            return manifest[k]
    return None


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def fastest(results: dict, key: str) -> dict:
    runs = [v for k, v in results.items() if k == key or k.startswith(key + "#")]
    return min(runs, key=lambda v: v["seconds"])


def per_step(results: dict, variant: str, tool: str) -> float:
    long = fastest(results, f"{variant}/same/{tool}/{LONG}")["seconds"]
    short = fastest(results, f"{variant}/same/{tool}/{SHORT}")["seconds"]
    return (long - short) / (LONG - SHORT)


def peak(results: dict, variant: str, tool: str) -> float:
    return max(v["peak_rss_mib"] for k, v in results.items() if k.startswith(f"{variant}/same/{tool}/"))


def report(results: dict, out: Path) -> None:
    lines = [
        "| variant | s/step limner | s/step diffusers | ratio | peak MiB limner | peak MiB diffusers (without exit "
        "teardown) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for v in VARIANTS:
        if f"{v}/same/diffusers/{LONG}" not in results:
            continue
        ls, ds = per_step(results, v, "limner"), per_step(results, v, "diffusers")
        lm, dm = peak(results, v, "limner"), peak(results, v, "diffusers")
        quiet = results.get(f"{v}/memory/diffusers-without-teardown", {}).get("peak_rss_mib")
        label = v if v == "plain" else f"{v} (Resampler width {RESAMPLER_DIM})"
        lines.append(
            f"| {label} | {ls:.3f} | {ds:.3f} | {ls / ds:.2f} | {lm:.0f} | {dm:.0f}"
            + (f" ({quiet:.0f})" if quiet else "")
            + f" | {lm / dm:.2f}{f' ({lm / quiet:.2f})' if quiet else ''} |"
        )
        summary[v] = {"step_ratio": round(ls / ds, 3), "memory_ratio": round(lm / dm, 3)}
    if "generation/adapter" in results:
        bare = fastest_gen(results, "bare")
        adapter = fastest_gen(results, "adapter")
        overhead = adapter / bare - 1
        summary["generation_overhead"] = round(overhead, 4)
        lines += [
            "",
            "| generation, s per image | bare base | with an IP-Adapter concept | overhead |",
            "|---|---|---|---|",
            f"| {GEN['steps']} {GEN['scheduler']} steps, guidance {GEN['guidance']}, batch {GEN['batch']} "
            f"| {bare:.4f} | {adapter:.4f} | {overhead * 100:+.1f}% |",
        ]
    if "encode" in results:
        enc = fastest(results, "encode")
        db = dreambooth_seconds()
        summary["encode_vs_dreambooth"] = round(enc["seconds"] / db, 4) if db else None
        lines += [
            "",
            f"| personalizing `{SUBJECT}` | wall s (whole process) | ratio to DreamBooth |",
            "|---|---|---|",
            f"| IP-Adapter: encode the references (`limner train --method ip_adapter`) | {enc['seconds']:.1f}"
            + (f" (in-process {enc['manifest_seconds']:.2f})" if enc.get("manifest_seconds") else "")
            + f" | {enc['seconds'] / db:.3f} |"
            if db
            else " |",
            f"| DreamBooth at limner's defaults (benchmarks/results/results.json, not rerun) | {db:.1f} | 1 |"
            if db
            else "",
        ]
    sem = results.get("semantics", {})
    patches = results.get("patches", [])
    note = [
        "",
        f"World base `{results.get('base_fingerprint', 'unrecorded')}`; {IMAGES} world images with their "
        f"captions (the paper's pairing: each conditions on itself), {RES} px, batch {BATCH}, fp32, AdamW lr {LR} "
        f"weight decay {WEIGHT_DECAY}, constant, no clipping (limner `--set max_grad_norm=0`; its default clips at "
        f"1.0); s/step = (wall({LONG} steps) - wall({SHORT} steps)) / {LONG - SHORT}, each the fastest of "
        f"{REPEATS} runs; peak memory: the largest max RSS of the training process over those runs, started from "
        "a small parent; in brackets, the tutorial run once more ending as limner's command line does, without "
        "the interpreter's teardown. Plus: limner `--set resampler_dim=256` (4 heads of 64) against the "
        "tutorial's Resampler(dim=cross_attention_dim=256, heads=12, dim_head=64), the same queries (16), depth "
        "(4) and feed-forward (x4), so the tutorial's attention inside the Resampler is 3x wider. Generation: the "
        f"fastest of {GEN['timed_batches']} batches after a warm-up one, in each of {REPEATS} processes per side. "
        + (
            f"Every timed process ran on {results['threads']} thread(s) (OMP_NUM_THREADS). "
            if results.get("threads")
            else ""
        )
        + f"Other processes paused during timed runs: {results.get('paused_seconds_this_run', 0):.0f} s.",
        "",
        "Same loss semantics: "
        + ("yes: " if sem.get("same") else "NO (see results.json 'semantics'): ")
        + "drop image / text / both 0.05 each from one uniform draw, MSE between predicted and true noise "
        "averaged over the batch, timesteps uniform; a dropped image is a zero embedding (plain) or the encoded "
        "zero image (plus) on both sides.",
        "",
        "Patches applied to copies of diffusers' tutorials in the work folder (diffusers' own files untouched):",
        "",
        *[f"- `{p['file']}`: `{p['replaced']}` -> `{p['with']}`. {p['why']}" for p in patches],
        "",
        "Command: `python benchmarks/ip_adapter_vs_diffusers.py --diffusers PATH --site DIR --adapter ADAPTER` "
        "(torch 2.14.1 + torchvision 0.29.1 venv, diffusers 0.42.1, ip-adapter 0.1.0 + einops in DIR).",
    ]
    write_results(out, lines + note, summary)


def fastest_gen(results: dict, side: str) -> float:
    return min(v["per_image_s"] for k, v in results.items() if k.startswith(f"generation/{side}"))


def dreambooth_seconds() -> float | None:
    """DreamBooth at limner's defaults on the same subject, from tuning_vs_diffusers.py's results."""
    if not TUNING_RESULTS.exists():
        return None
    row = json.loads(TUNING_RESULTS.read_text()).get("dreambooth/recipe/limner")
    return row["seconds"] if row else None


if __name__ == "__main__":
    main()
