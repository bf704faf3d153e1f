"""limner's FastComposer pretraining step against the official FastComposer training code's, on the world base.

    python benchmarks/fastcomposer_vs_official.py --official PATH [--out benchmarks/fastcomposer_official] \
        [--work /tmp/limner-fastcomposer-bench] [--threads N] [--pause PATTERN] [--smoke]

PATH is the official repository (github.com/mit-han-lab/fastcomposer): a checkout, or a git directory without a
work tree such as /work/.mirror/mit-han-lab+fastcomposer/repo (then its HEAD is read with `git show`). Its
fastcomposer/ package is copied into the work folder and patched there; the repository itself is never changed and
none of its code is kept in limner's. Each patch (PATCHES) is written into results.json and results.md with its
reason.

Setup. The official code imports torchvision and datasets, and torchvision does not import beside limner's torch
2.13 CPU build, so both sides run in one separate venv, limner from src/ (PYTHONPATH), so that the two share torch
and every library (the other versions as limner's own venv has them):

    python3 -m venv /work/bench-venv
    /work/bench-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 diffusers==0.42.1 transformers==5.25.0 \
        accelerate==1.16.0 peft==0.21.2 safetensors==0.8.0 numpy==2.4.6 pillow==12.3.0 huggingface_hub==2.4.0 \
        tokenizers==0.23.3 typer tqdm datasets
    /work/bench-venv/bin/python benchmarks/fastcomposer_vs_official.py \
        --official /work/.mirror/mit-han-lab+fastcomposer/repo

What is measured: time per step and peak memory of pretraining, `limner pretrain --method fastcomposer --data
world` against the official `fastcomposer/train.py` (run as `python train.py`, one process, as `accelerate
launch` with one process runs it), both on the world base (its UNet, VAE, text encoder and tokenizer, and its
image_encoder/ in place of OpenAI's CLIP ViT-L/14), 64 px, batch 8, fp32, AdamW lr 1e-4 (weight decay 0.01,
constant, gradient clipping at 1.0: both sides' defaults), localization loss weight 1e-3 on the middle 5
cross-attention blocks (balanced L1), masked denoising loss with probability 0.5, uncondition probability 0.1,
each subject kept with probability 0.9, up to 4 subjects, the image encoder's last 2 layers trained. The official
options follow its scripts/run_training.sh except where the world base needs otherwise (resolution, object
resolution, batch, learning rate, precision, model paths) and the options with nothing to do on one CPU process
(--allow_tf32, the multi-GPU launch, wandb, checkpoint resumption); its `--object_types person` is left out, as
the world's subjects are people, animals and objects alike. s/step = (wall(LONG steps) - wall(SHORT steps)) /
(LONG - SHORT), each wall time the fastest of REPEATS runs alternating the tools, so start-up, loading and the
final save cancel out; peak memory = the largest ru_maxrss of the training process over those runs, started from
this small process (plus the official run once more ending as limner's command line does, without the
interpreter's teardown).

Data. The first IMAGES scenes of limner's `MultiSubjectWorldStream` (seed 0, pair "self": each subject cropped
out of the scene itself, as the paper and the official code do) are written once into the work folder in the
official FFHQ-wild layout: `image_ids_train.txt`, and per scene `<chunk>/<id>.jpg` (the image),
`<chunk>/<id>.npy` (a uint8 segmentation map, subject k's visible pixels = k + 1) and `<chunk>/<id>.json`
({"caption", "segments": [{"id", "bbox": [x1, y1, x2, y2], "end", "coco_label"}]}, `end` the character offset
after the subject's noun). limner draws the very same scenes from the world as it trains (`--data world --seed 0
--set pair=self`: its first IMAGES samples are these), so its steps include drawing them (the time per scene is
measured while exporting and reported); the official reads them back from disk, an epoch every IMAGES / 8 steps.

Differences that stay (recorded in results.json's 'semantics'): the official tunes the whole UNet, limner a
rank-32 LoRA on the UNet's attention and feed-forward layers; the official encodes max_num_objects (4) crops per
sample, padding included, limner only the subjects kept; the official augments each crop (zoom, rotation, colour
jitter, blur, grey, flip, elastic) and flips the target with its mask, limner does neither; the official's masked
loss zeroes the error outside the mask and averages over the whole latent, limner averages over the mask.

`--pause PATTERN` stops the processes matching PATTERN (pgrep -f) during each timed run and always resumes them
after it. Every finished run is kept in results.json, so an interrupted benchmark resumes where it stopped.
`--smoke` runs 2 and 4 steps once each (a check that both sides run end to end, not a measurement): give it an
--out of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from timed_processes import PAUSER, measure_once, run, write_results  # noqa: E402  (benchmarks/ is the script's folder)

PACKAGE = "fastcomposer"  # the official package, copied into WORK/official/
OFFICIAL_FILES = ("__init__.py", "train.py", "model.py", "data.py", "transforms.py", "utils.py")
IMAGES = 80  # world scenes written once: 10 batches of 8, one official epoch
BATCH, RES, LR, SEED = 8, 64, 1e-4, 0
LOCALIZATION_WEIGHT, LOCALIZATION_BLOCKS, MASK_LOSS_PROB = 1e-3, 5, 0.5
UNCONDITION_PROB, APPEAR_PROB, MAX_OBJECTS, ENCODER_LAYERS = 0.1, 0.9, 4, 2
PAIR = "self"  # each subject's crop cut out of the scene itself, as the official dataset does
SHORT, LONG = 10, 40  # steps of the two timing runs (1 and 4 official epochs)
REPEATS = 2  # each timing run twice, alternating tools; the faster counts
CHUNK = 5  # the official dataset finds scene ID in folder ID[:5]

# Minimal patches to the official files as copied: (file, text, replacement, why); each text must occur exactly
# once. A replacement's {placeholders} are filled from the base (see patch_official).
PATCHES = [
    (
        "train.py",
        "        log_with=args.report_to,\n        logging_dir=args.logging_dir,\n",
        "        log_with=args.report_to,\n        project_dir=args.logging_dir,\n",
        "accelerate 1.x's Accelerator takes no logging_dir (TypeError); project_dir is where it now puts the "
        "trackers' logs (none here: no --report_to)",
    ),
    (
        "model.py",
        "from transformers.models.clip.modeling_clip import (\n    _expand_mask,\n    CLIPTextTransformer,\n",
        "from transformers.models.clip.modeling_clip import (\n",
        "transformers 5 has neither `_expand_mask` nor `CLIPTextTransformer` (CLIPTextModel now holds the text "
        "transformer's parts itself), so the import fails; `_expand_mask` served only a padding mask, which the "
        "training never passes",
    ),
    (
        "model.py",
        "    _build_causal_attention_mask = CLIPTextTransformer._build_causal_attention_mask\n",
        "    def _build_causal_attention_mask(self, bsz, seq_len, dtype):  # patched: transformers 4's, gone in 5\n"
        "        mask = torch.full((seq_len, seq_len), torch.finfo(dtype).min, dtype=dtype).triu(1)\n"
        "        return mask[None, None].expand(bsz, 1, seq_len, seq_len)\n",
        "the method was transformers 4's CLIPTextTransformer's, gone in 5: the same additive causal mask (the "
        "dtype's lowest value above the diagonal, 0 elsewhere), [bsz, 1, seq, seq]",
    ),
    (
        "model.py",
        "        text_model = model.text_model\n",
        "        text_model = model\n",
        "transformers 5's CLIPTextModel keeps embeddings, encoder and final_layer_norm itself (no .text_model)",
    ),
    (
        "model.py",
        "            attention_mask=attention_mask,\n            causal_attention_mask=causal_attention_mask,\n",
        "            attention_mask=causal_attention_mask,\n",
        "transformers 5's CLIPEncoder takes one attention mask and passes an unknown keyword down unused, so the "
        "text encoder would attend both ways; the training passes no padding mask, so the causal mask is the whole "
        "mask, as transformers 5's own CLIPTextModel builds it (checked: the patched encoder gives the base text "
        "encoder's output, results.json 'checks')",
    ),
    (
        "model.py",
        "        model = CLIPModel.from_pretrained(global_model_name_or_path)\n",
        "        from transformers import CLIPVisionModelWithProjection  # patched: the vision tower alone\n\n"
        "        model = CLIPVisionModelWithProjection.from_pretrained(global_model_name_or_path)\n",
        "the official loads a whole CLIP (text and vision) to keep its vision_model and visual_projection; the "
        "world base's image_encoder/ is a CLIPVisionModelWithProjection, those two modules alone, which CLIPModel "
        "cannot load",
    ),
    (
        "model.py",
        "            (0.48145466, 0.4578275, 0.40821073),\n            (0.26862954, 0.26130258, 0.27577711),\n",
        "            {mean},\n            {std},\n",
        "OpenAI CLIP's normalisation; the world's image encoder reads mean and std 0.5 (its feature_extractor/, "
        "what limner's encoder uses)",
    ),
    (
        "model.py",
        '    UNET_LAYER_NAMES = [\n        "down_blocks.0",\n        "down_blocks.1",\n        "down_blocks.2",\n'
        '        "mid_block",\n        "up_blocks.1",\n        "up_blocks.2",\n        "up_blocks.3",\n    ]\n',
        "    UNET_LAYER_NAMES = {layers}\n",
        "the list names SD 1.5's 7 blocks with attention (its up_blocks.0 has none); the world UNet has 3 levels "
        "and 5 such blocks. Unpatched, the middle 5 of SD's names would catch 4 of the world's (up_blocks.0 "
        "missed, up_blocks.2 holding no attention); with the world's own list they are the blocks limner's "
        "localization loss reads (checked: the same attn2 layers, results.json 'checks')",
    ),
]
# options of the official train.py as scripts/run_training.sh sets them, changed only for the world base
OFFICIAL_OPTIONS = {
    "train_batch_size": BATCH,
    "learning_rate": LR,
    "unet_lr_scale": 1.0,
    "mixed_precision": "no",
    "seed": SEED,
    "image_encoder_type": "clip",
    "num_image_tokens": 1,
    "max_num_objects": MAX_OBJECTS,
    "train_resolution": RES,
    "object_resolution": RES,  # the world's image encoder reads 64 px (the official resizes to it in any case)
    "text_image_linking": "postfuse",
    "object_appear_prob": APPEAR_PROB,
    "uncondition_prob": UNCONDITION_PROB,
    "object_background_processor": "random",
    "disable_flashattention": True,
    "train_image_encoder": True,
    "image_encoder_trainable_layers": ENCODER_LAYERS,
    "mask_loss": True,
    "mask_loss_prob": MASK_LOSS_PROB,
    "object_localization": True,
    "object_localization_weight": LOCALIZATION_WEIGHT,
    "object_localization_loss": "balanced_l1",
    "localization_layers": LOCALIZATION_BLOCKS,  # the default, named
    "checkpointing_steps": 10**9,  # none during the run (limner: checkpoint_every=0)
}


# --------------------------------------------------------------------------------------------
# Running one process
# --------------------------------------------------------------------------------------------


def environment(work: Path, official: bool) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_MININTERVAL="5", LIMNER_CACHE=str(work / "cache"))
    # the official package (as `pip install -e .` of its setup.py would give it), or limner's src/
    env["PYTHONPATH"] = str(work / "official") if official else str(ROOT / "src")
    env.pop("WANDB_MODE", None)
    return env


# runs a script as `python script.py` does, then exits as limner's command line does: the exit handlers,
# without the interpreter's teardown (which, with a CUDA build of torch, adds to the peak)
WITHOUT_TEARDOWN = (
    "import atexit, os, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
    "atexit._run_exitfuncs(); sys.stdout.flush(); os._exit(0)"
)


def limner_cmd(out: Path, steps: int) -> list[str]:
    return [
        *[sys.executable, "-m", "limner.cli", "pretrain", "--method", "fastcomposer", "--data", "world"],
        *["--out", str(out), "--steps", str(steps), "--batch-size", str(BATCH), "--lr", str(LR), "--seed", str(SEED)],
        *["--set", "checkpoint_every=0", "--set", f"pair={PAIR}"],
    ]


def official_cmd(work: Path, base: Path, out: Path, steps: int, teardown: bool = True) -> list[str]:
    python = [sys.executable] if teardown else [sys.executable, "-c", WITHOUT_TEARDOWN]
    options = OFFICIAL_OPTIONS | {
        "pretrained_model_name_or_path": base,
        "image_encoder_name_or_path": base / "image_encoder",
        "dataset_name": work / "data",
        "output_dir": out,
        "logging_dir": out / "logs",
        "max_train_steps": steps,
        "num_train_epochs": steps,  # as run_training.sh: max_train_steps decides
    }
    flags = [f"--{k}" if v is True else f"--{k}={v}" for k, v in options.items()]
    return [*python, str(work / "official" / PACKAGE / "train.py"), *flags]


def finished(tool: str, out: Path) -> None:
    """A run that exits 0 without its output is not a finished run."""
    wanted = out / ("adapter.json" if tool == "limner" else "model_index.json")
    if not wanted.is_file():
        raise SystemExit(f"{tool} exited without writing {wanted}")


# --------------------------------------------------------------------------------------------
# Prepare (a child process, so this one stays small): data, patched official files, checks
# --------------------------------------------------------------------------------------------


def prepare(work: Path, official: Path) -> None:
    from limner.models.loading import WORLD_BASE, fingerprint

    base = Path(WORLD_BASE)
    draw = write_data(work)
    layers = attention_blocks(base)
    commit, patches = patch_official(work, official, base, layers)
    prepared = {
        "base": str(base),
        "fingerprint": fingerprint(base),
        "official_commit": commit,
        "patches": patches,
        "data": draw,
        "semantics": semantics(work),
        "checks": checks(work, base),
        "versions": versions(),
    }
    (work / "prepared.json").write_text(json.dumps(prepared, indent=1))


def write_data(work: Path) -> dict:
    """IMAGES world scenes in the official FFHQ-wild layout (once), and how long the world took to draw them."""
    import numpy as np
    from PIL import Image

    from limner.data.multi_subject import MultiSubjectWorldStream

    folder, record = work / "data", work / "data.json"
    if record.exists():
        return json.loads(record.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    stream = MultiSubjectWorldStream(seed=SEED, pair=PAIR, max_subjects=MAX_OBJECTS)  # limner's run, rank 0 of 1
    ids, subjects, overlap, seconds = [], 0, 0, 0.0
    for k in range(IMAGES):
        t0 = time.perf_counter()
        s = stream.sample(k)
        seconds += time.perf_counter() - t0
        image_id = f"{k:0{CHUNK + 3}d}"
        chunk = folder / image_id[:CHUNK]
        chunk.mkdir(parents=True, exist_ok=True)
        segmap = np.zeros(s.image.shape[:2], np.uint8)
        for i, mask in enumerate(s.masks):
            overlap += int((segmap[mask] > 0).sum())
            segmap[mask] = i + 1
        segments = []
        for i, end in enumerate(s.noun_ends):
            ys, xs = np.nonzero(segmap == i + 1)
            if not len(ys):
                raise SystemExit(f"scene {k}: subject {i} is hidden behind the others in the segmentation map")
            box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]  # sliced [:, y1:y2, x1:x2]
            noun = s.text[:end].split()[-1]
            segments.append({"id": i + 1, "bbox": box, "end": int(end), "coco_label": noun})
        Image.fromarray(s.image).save(chunk / f"{image_id}.jpg", quality=95)
        np.save(chunk / f"{image_id}.npy", segmap)
        (chunk / f"{image_id}.json").write_text(json.dumps({"caption": s.text, "segments": segments}))
        ids.append(image_id)
        subjects += len(s.masks)
    (folder / "image_ids_train.txt").write_text("\n".join(ids) + "\n")
    draw = {
        "scenes": IMAGES,
        "subjects": subjects,
        "overlapping_mask_pixels": overlap,
        "world_draw_s_per_scene": round(seconds / IMAGES, 4),
        "world_draw_s_per_batch": round(seconds / IMAGES * BATCH, 4),
    }
    record.write_text(json.dumps(draw, indent=1))
    return draw


def attention_blocks(base: Path) -> list[str]:
    """The world UNet's blocks holding cross-attention, in the order the sample flows through them (what the
    official UNET_LAYER_NAMES lists for SD 1.5)."""
    unet = json.loads((base / "unet" / "config.json").read_text())
    names = [f"down_blocks.{i}" for i, t in enumerate(unet["down_block_types"]) if "CrossAttn" in t]
    names += ["mid_block"] if "CrossAttn" in (unet.get("mid_block_type") or "") else []
    return names + [f"up_blocks.{i}" for i, t in enumerate(unet["up_block_types"]) if "CrossAttn" in t]


def read_official(official: Path, name: str) -> str:
    on_disk = official / PACKAGE / name
    if on_disk.is_file():
        return on_disk.read_text()
    return git(official, "show", f"HEAD:{PACKAGE}/{name}")


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"--official {repo}: git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def patch_official(work: Path, official: Path, base: Path, layers: list[str]) -> tuple[str, list[dict]]:
    """The official package copied into WORK/official/ with PATCHES applied; (its commit, the patches as applied)."""
    processor = json.loads((base / "feature_extractor" / "preprocessor_config.json").read_text())
    fill = {
        "mean": repr(tuple(processor["image_mean"])),
        "std": repr(tuple(processor["image_std"])),
        "layers": repr(layers),
    }
    package = work / "official" / PACKAGE
    shutil.rmtree(package, ignore_errors=True)
    package.mkdir(parents=True)
    for name in OFFICIAL_FILES:
        text = read_official(official, name)
        for file, old, new, _ in PATCHES:
            if file != name:
                continue
            if text.count(old) != 1:
                raise SystemExit(f"{name}: expected {old!r} once, found it {text.count(old)} times: update the patch")
            text = text.replace(old, new.format(**fill))
        (package / name).write_text(text)
    commit = git(official, "rev-parse", "HEAD").strip()
    applied = [{"file": f, "replaced": old, "with": new.format(**fill), "why": why} for f, old, new, why in PATCHES]
    return commit, applied


def default_of(utils: str, name: str) -> str:
    """An option's default as written in the official utils.py's parse_args."""
    found = re.search(rf'"--{name}",[^)]*?default=([^,\n)]+)', utils)
    return found.group(1).strip().strip("\"'") if found else "?"


def semantics(work: Path) -> dict:
    """The training recipe on both sides: the official options as passed (or their defaults) against limner's
    settings; `same` compares the shared ones, `differences` lists what stays different by design."""
    from limner.methods.fastcomposer import FastComposerSettings, pretrain_defaults

    utils = (work / "official" / PACKAGE / "utils.py").read_text()
    o = OFFICIAL_OPTIONS
    official = {
        "batch": o["train_batch_size"],
        "resolution": o["train_resolution"],
        "lr": o["learning_rate"],
        "lr_schedule": default_of(utils, "lr_scheduler"),
        "weight_decay": float(default_of(utils, "adam_weight_decay")),
        "max_grad_norm": float(default_of(utils, "max_grad_norm")),
        "ema": False,  # --use_ema not given (run_training.sh neither)
        "localization_weight": o["object_localization_weight"],
        "localization_blocks": o["localization_layers"],
        "localization_loss": o["object_localization_loss"],
        "mask_loss_prob": o["mask_loss_prob"] if o["mask_loss"] else 0.0,
        "uncondition_prob": o["uncondition_prob"],
        "object_appear_prob": o["object_appear_prob"],
        "max_subjects": o["max_num_objects"],
        "image_encoder_trainable_layers": o["image_encoder_trainable_layers"],
        "precision": "fp32" if o["mixed_precision"] == "no" else o["mixed_precision"],
    }
    s, t = FastComposerSettings(), pretrain_defaults()
    limner = {
        "batch": BATCH,  # --batch-size
        "resolution": RES,  # the world base's
        "lr": LR,  # --lr
        "lr_schedule": t.lr_schedule if not t.lr_warmup_steps else f"{t.lr_schedule} after warm-up",
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "ema": t.ema_decay is not None,
        "localization_weight": s.localization_weight,
        "localization_blocks": s.localization_blocks,
        "localization_loss": "balanced_l1",  # limner.methods.fastcomposer.training.balanced_l1
        "mask_loss_prob": s.mask_loss_prob,
        "uncondition_prob": s.uncondition_prob,
        "object_appear_prob": s.object_appear_prob,
        "max_subjects": s.max_subjects,
        "image_encoder_trainable_layers": s.image_encoder_trainable_layers,
        "precision": "fp32" if t.mixed_precision == "no" else t.mixed_precision,
    }
    differences = {
        "unet": ("whole UNet", f"LoRA rank {s.lora_rank} (attention and feed-forward layers)"),
        "crops encoded per sample": (f"max_num_objects ({MAX_OBJECTS}), zero padding included", "the kept ones"),
        "crop augmentation": ("zoom, rotation, colour jitter, blur, grey, flip, elastic", "none"),
        "target flip": ("random horizontal flip of image and segmentation map", "none (flip=false)"),
        "masked loss": ("error zeroed outside the mask, mean over the whole latent", "mean over the mask"),
        "scenes": (f"{IMAGES} exported scenes, read from disk each epoch", "drawn from the world as it trains"),
    }
    return {
        "official": official,
        "limner": limner,
        "same": official == limner,
        "differences": {k: {"official": a, "limner": b} for k, (a, b) in differences.items()},
    }


def checks(work: Path, base: Path) -> dict:
    """The patched official modules against the base's own: the text encoder's output, the image encoder's
    embedding and the attn2 layers whose maps each side's localization loss reads."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    from limner.adapters.attention_maps import middle_cross_attention_blocks

    sys.path.insert(0, str(work / "official"))
    from fastcomposer import model as official  # the patched copy

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    ids = tokenizer(["a ball on the left and a dog on the right on the beach"], padding="max_length").input_ids
    ids = torch.tensor(ids)
    with torch.no_grad():
        mine = official.FastComposerTextEncoder.from_pretrained(str(base), subfolder="text_encoder")(ids)[0]
        theirs = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")(ids).last_hidden_state
        pixels = torch.rand(2, 1, 3, RES, RES)  # [0, 1], as the official object transforms give them
        encoder = official.FastComposerCLIPImageEncoder.from_pretrained(str(base / "image_encoder"))
        embeds = encoder(pixels).flatten(1)
        reference = CLIPVisionModelWithProjection.from_pretrained(base / "image_encoder")
        expected = reference(pixel_values=(pixels[:, 0] - 0.5) / 0.5).image_embeds
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    attn2 = [n for n, _ in unet.named_modules() if n.endswith("attn2")]
    official.unet_store_cross_attention_scores(unet, {}, LOCALIZATION_BLOCKS)  # marks the layers it captures
    official_layers = sorted(n for n, m in unet.named_modules() if hasattr(m, "old_get_attention_scores"))
    limner_blocks = middle_cross_attention_blocks(unet, LOCALIZATION_BLOCKS)
    limner_layers = sorted(n for n in attn2 if any(n.startswith(b + ".") for b in limner_blocks))
    return {
        "text_encoder_max_abs_diff": float((mine - theirs).abs().max()),
        "image_encoder_max_abs_diff": float((embeds - expected).abs().max()),
        "localization_layers_official": official_layers,
        "localization_layers_limner": limner_layers,
        "localization_layers_same": official_layers == limner_layers,
    }


def versions() -> dict:
    from importlib.metadata import version

    names = ("torch", "torchvision", "diffusers", "transformers", "accelerate", "peft", "datasets")
    return {n: version(n) for n in names} | {"python": sys.version.split()[0]}


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def main() -> None:
    global SHORT, LONG, REPEATS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, help="the official FastComposer repository: a checkout or a git dir")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "fastcomposer_official")
    ap.add_argument("--work", type=Path, default=Path("/tmp/limner-fastcomposer-bench"))
    ap.add_argument("--pause", help="pgrep -f pattern of processes to stop during each timed run (always resumed)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every timed process (default: torch's, all cores)")
    ap.add_argument("--smoke", action="store_true", help="2 and 4 steps once each: that both sides run, no timing")
    ap.add_argument("--report-only", action="store_true", help="write results.md from results.json")
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        SHORT, LONG, REPEATS = 2, 4, 1
    if args.prepare:
        return prepare(args.work, args.official)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.report_only:
        return report(results, args.out)
    if args.official is None:
        raise SystemExit("give --official PATH: the official FastComposer repository (a checkout or a git dir)")
    PAUSER.pattern = args.pause
    # a SIGTERM ends the benchmark through the finally clauses, so nothing stays stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.work.mkdir(parents=True, exist_ok=True)
    env, oenv = environment(args.work, official=False), environment(args.work, official=True)
    if args.threads:
        env["OMP_NUM_THREADS"] = oenv["OMP_NUM_THREADS"] = str(args.threads)
    # prepared in a child process: this one stays small, because a child's peak RSS (ru_maxrss) starts from its
    # parent's size at the fork
    run(
        [sys.executable, __file__, "--official", str(args.official.resolve()), "--work", str(args.work), "--prepare"],
        args.work / "prepare.log",
        env,
        timed=False,
    )
    prepared = json.loads((args.work / "prepared.json").read_text())
    if not prepared["checks"]["localization_layers_same"]:
        raise SystemExit(f"the two sides' localization layers differ: {prepared['checks']}")
    plan = {"short": SHORT, "long": LONG, "repeats": REPEATS, "threads": args.threads}
    if results.get("base_fingerprint") not in (None, prepared["fingerprint"]) or results.get("plan") not in (
        None,
        plan,
    ):
        print("base, steps or threads changed: measuring everything again", flush=True)
        results = {}
    keep = ("official_commit", "patches", "data", "semantics", "checks", "versions")
    results |= {k: prepared[k] for k in keep} | {"base_fingerprint": prepared["fingerprint"], "plan": plan}
    base = Path(prepared["base"])

    once = partial(measure_once, results, results_path)  # each measurement saved as it is made

    def timed(tool: str, steps: int, rep: int, teardown: bool = True) -> dict:
        out = args.work / "runs" / f"{tool}-{steps}"
        shutil.rmtree(out, ignore_errors=True)
        if tool == "limner":
            cmd, e = limner_cmd(out, steps), env
        else:
            cmd, e = official_cmd(args.work, base, out, steps, teardown), oenv
        r = run(cmd, args.work / "logs" / f"{tool}-{steps}-{rep}{'' if teardown else '-without-teardown'}.log", e)
        finished(tool, out)
        shutil.rmtree(out, ignore_errors=True)
        return r

    try:
        for rep in range(REPEATS):
            for steps in (SHORT, LONG):
                for tool in ("limner", "official"):
                    key = f"same/{tool}/{steps}" + (f"#{rep}" if rep else "")
                    once(key, lambda tool=tool, steps=steps, rep=rep: timed(tool, steps, rep))
        once("memory/official-without-teardown", lambda: timed("official", SHORT, 0, teardown=False))
    finally:
        print(f"others paused for {PAUSER.seconds:.0f} s in all", flush=True)
    results["paused_seconds_this_run"] = round(PAUSER.seconds, 1)
    results_path.write_text(json.dumps(results, indent=1))
    report(results, args.out)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def fastest(results: dict, key: str) -> dict:
    runs = [v for k, v in results.items() if k == key or k.startswith(key + "#")]
    return min(runs, key=lambda v: v["seconds"])


def per_step(results: dict, tool: str, short: int, long: int) -> float:
    return (
        fastest(results, f"same/{tool}/{long}")["seconds"] - fastest(results, f"same/{tool}/{short}")["seconds"]
    ) / (long - short)


def peak(results: dict, tool: str) -> float:
    return max(v["peak_rss_mib"] for k, v in results.items() if k.startswith(f"same/{tool}/"))


def one_line(code: str) -> str:
    """A patch's text for a markdown line: its lines stripped, joined by a return sign."""
    return " \u23ce ".join(line.strip() for line in code.splitlines() if line.strip())


def report(results: dict, out: Path) -> None:
    plan = results.get("plan") or {"short": SHORT, "long": LONG, "repeats": REPEATS, "threads": None}
    short, long = plan["short"], plan["long"]
    if f"same/official/{long}" not in results or f"same/limner/{long}" not in results:
        print("no finished pair of runs to report yet", flush=True)
        return
    ls, os_ = per_step(results, "limner", short, long), per_step(results, "official", short, long)
    lm, om = peak(results, "limner"), peak(results, "official")
    quiet = results.get("memory/official-without-teardown", {}).get("peak_rss_mib")
    data, sem, checked = results.get("data", {}), results.get("semantics", {}), results.get("checks", {})
    lines = [
        "| FastComposer pretraining | s/step limner | s/step official | ratio (issue: at most 1.0) | peak MiB limner "
        "| peak MiB official (without exit teardown) | ratio |",
        "|---|---|---|---|---|---|---|",
        f"| world base, batch {BATCH}, {RES} px, fp32 | {ls:.3f} | {os_:.3f} | {ls / os_:.2f} | {lm:.0f} | {om:.0f}"
        + (f" ({quiet:.0f})" if quiet else "")
        + f" | {lm / om:.2f}{f' ({lm / quiet:.2f})' if quiet else ''} |",
        "",
        f"Of limner's step, drawing its {BATCH} scenes from the world takes about "
        f"{data.get('world_draw_s_per_batch', float('nan')):.3f} s (measured while exporting the official's "
        f"{data.get('scenes', IMAGES)} scenes, {data.get('subjects', '?')} subjects); the official reads them back "
        "from disk.",
    ]
    summary = {"step_ratio": round(ls / os_, 3), "memory_ratio": round(lm / om, 3)}
    if quiet:
        summary["memory_ratio_without_teardown"] = round(lm / quiet, 3)
    smoke = long - short < 10
    note = [
        "",
        *(
            [
                "**A smoke run** (a few steps, one run each, under whatever load the machine had): not a measurement.",
                "",
            ]
            if smoke
            else []
        ),
        f"World base `{results.get('base_fingerprint', 'unrecorded')}`; official FastComposer "
        f"`{results.get('official_commit', '?')[:12]}`; {', '.join(f'{k} {v}' for k, v in results.get('versions', {}).items())}. "
        f"s/step = (wall({long} steps) - wall({short} steps)) / {long - short}, each the fastest of {plan['repeats']} "
        "run(s) alternating the tools; peak memory: the largest max RSS of the training process over those runs, "
        "started from a small parent; in brackets, the official run once more ending as limner's command line "
        "does, without the interpreter's teardown. "
        + (
            f"Every timed process ran on {plan['threads']} thread(s) (OMP_NUM_THREADS). "
            if plan.get("threads")
            else ""
        )
        + f"Other processes paused during timed runs: {results.get('paused_seconds_this_run', 0):.0f} s.",
        "",
        "Same recipe: "
        + ("yes" if sem.get("same") else "NO (see results.json 'semantics')")
        + ": AdamW lr 1e-4, weight decay 0.01, constant, clipping at 1.0, no EMA; localization loss (balanced L1) "
        "weight 1e-3 on the middle 5 cross-attention blocks ("
        + ("the same attn2 layers on both sides" if checked.get("localization_layers_same") else "layers DIFFER")
        + "), masked loss on half the steps, uncondition 0.1, each subject kept with 0.9, up to 4 subjects, the "
        "image encoder's last 2 layers trained. The patched official text encoder gives the base's output (max "
        f"|diff| {checked.get('text_encoder_max_abs_diff', float('nan')):.1e}), its image encoder the base's "
        f"embedding ({checked.get('image_encoder_max_abs_diff', float('nan')):.1e}).",
        "",
        "Different by design (official / limner):",
        "",
        *[f"- {k}: {v['official']} / {v['limner']}" for k, v in sem.get("differences", {}).items()],
        "",
        "Patches applied to the copy of the official fastcomposer/ package in the work folder (the repository "
        "untouched):",
        "",
        *[
            f"- `{p['file']}`: `{one_line(p['replaced'])}` -> `{one_line(p['with'])}`. {p['why']}"
            for p in results.get("patches", [])
        ],
        "",
        "Command: `/work/bench-venv/bin/python benchmarks/fastcomposer_vs_official.py --official PATH` (the venv in "
        "the script's docstring).",
    ]
    write_results(out, lines + note, summary)


if __name__ == "__main__":
    main()
