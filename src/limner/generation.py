"""Text-to-image generation on any base, with everything needed to reproduce an image recorded.

Each image i of a run uses its own generator seeded with seed + i, so an image can be regenerated
alone, with any batch size, on the same device.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from limner import progress
from limner.errors import LimnerError
from limner.io import write_json_atomic, written_atomically
from limner.models.loading import Base
from limner.regions import WindowHook, canvas_width, regional_images, split_regions, window_offsets
from limner.values import bounds, parse_fields

SCHEDULERS = {
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


@dataclass
class GenerationSettings:
    prompt: str
    negative_prompt: str = ""
    num_images: int = field(default=4, metadata=bounds(at_least=1, flag="-n/--num-images"))
    seed: int = field(default=0, metadata=bounds(at_least=0, flag="--seed"))
    steps: int = field(default=25, metadata=bounds(at_least=1, flag="--steps"))
    guidance_scale: float = field(default=5.0, metadata=bounds(at_least=0, flag="--guidance"))
    scheduler: str = field(default="dpm++", metadata=bounds(choices=tuple(SCHEDULERS), flag="--scheduler"))
    # None: the base's native resolution; a multiple of 8 (check_settings, which knows the base)
    height: int | None = field(default=None, metadata=bounds(at_least=8, flag="--height"))
    width: int | None = field(default=None, metadata=bounds(at_least=8, flag="--width"))
    batch_size: int = field(default=4, metadata=bounds(at_least=1, flag="--batch-size"))
    regions: bool = False  # the prompt is several prompts separated by BREAK, each drawn in its own window
    # The first `layout_steps` denoising steps follow `layout_prompt` (the prompt with the class noun in place of
    # the concept's token), the rest the prompt: where things go and what surrounds them is settled early, from
    # words the base knows, and the concept only draws the subject (PhotoMaker's delayed merge, start_merge_step)
    layout_prompt: str | None = None
    layout_steps: int = field(default=0, metadata=bounds(at_least=0, flag="--layout-steps"))

    def __post_init__(self) -> None:
        parse_fields(self)  # before the base loads: --steps 0, --guidance nan and the like end here, named


@dataclass
class Conditioning:
    """What applied concepts add to one generation besides the prompt itself (limner.conditioning makes it)."""

    # the first `layout_steps` denoising steps follow `layout_prompt` (each concept's token replaced by its
    # class noun), the rest the prompt: PhotoMaker's delayed merge, FastComposer's delayed conditioning
    layout_prompt: str | None = None
    layout_steps: int = 0
    # per-call pipeline arguments: prompt_embeds with image tokens fused in, ip_adapter_image_embeds, a control image
    pipe_kwargs: dict[str, Any] = field(default_factory=dict)
    before_window: WindowHook | None = None  # regional prompts: switches each window's weights
    region_concepts: list[list[str]] | None = None  # for the record: the concepts acting in each region
    # for the record: each concept's folder, method, adapter and the settings it was made with
    concepts: list[dict] | None = None


@dataclass
class GenerationResult:
    images: list[Image.Image]
    record: dict
    paths: list[Path] = field(default_factory=list)


def set_scheduler(pipe, name: str) -> None:
    import diffusers

    if name not in SCHEDULERS:
        raise LimnerError(f"--scheduler {name!r} is unknown; choose one of: {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)


def check_settings(base: Base, s: GenerationSettings) -> tuple[int, int]:
    """Validates sizes and counts; returns (height, width)."""
    height = base.resolution if s.height is None else s.height
    width = base.resolution if s.width is None else s.width
    if s.regions:
        regions = len(split_regions(s.prompt))
        width = canvas_width(base.resolution, regions) if s.width is None else s.width
        if width < base.resolution:
            raise LimnerError(
                f"--width {width} is narrower than one region's window ({base.resolution} px, the base's native "
                f"size); leave --width out for {canvas_width(base.resolution, regions)}"
            )
    for name, v in (("--height", height), ("--width", width)):
        if v <= 0 or v % 8:
            raise LimnerError(
                f"{name} {v} is not a positive multiple of 8 (the VAE works on 8-pixel blocks); try "
                f"{max(8, round(v / 8) * 8)}"
            )
    if s.layout_steps:
        if not 0 < s.layout_steps < s.steps:
            raise LimnerError(f"--layout-steps {s.layout_steps} must be between 1 and --steps - 1 ({s.steps - 1})")
        if not s.layout_prompt:
            raise LimnerError(
                "layout_steps needs a layout_prompt: the prompt with the class noun in place of the concept's token"
            )
        if s.regions:
            raise LimnerError("--layout-steps does not work with --regions yet; draw without one of them")
    return height, width


def prompt_note(tokenizer, prompts: list[tuple[str, str]]) -> str | None:
    """One line on what the tokenizer does to the prompts ((label, text) pairs) that a person would not guess, or
    None: the words it does not know, which it spells from letter fragments, and what its length limit cuts."""
    unknown = dict.fromkeys(w for _, text in prompts for w in unknown_words(tokenizer, text))
    room = tokenizer.model_max_length - 2  # begin and end tokens
    cuts = []
    for label, text in prompts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) > room:
            cut = tokenizer.decode(ids[room:]).split()
            shown = " ".join(cut[:6]) + (f" ... ({len(cut) - 6} more words)" if len(cut) > 6 else "")
            cuts.append(f"the {label} is {len(ids)} tokens, {room} fit: cut {shown!r}")
    said = f"words the tokenizer does not know (drawn from letter fragments): {', '.join(unknown)}"
    return "; ".join(([said] if unknown else []) + cuts) or None


def unknown_words(tokenizer, text: str) -> list[str]:
    """Words a BPE tokenizer can only spell from fragments, none of them half the word: words it has never seen
    ("xylophone" -> x y l o ph one on the world base). A rare word a real CLIP splits into sub-words
    ("photo" + "realistic") is not reported."""
    words = []
    for word in dict.fromkeys(text.lower().replace(",", " ").split()):
        if word == "break" or not any(c.isalpha() for c in word) or "<" in word or ">" in word:
            continue  # a concept's pseudo-word (<s*>, <new1>) is the concept's to define, not a word to spell
        pieces = [t.replace("</w>", "") for t in tokenizer.tokenize(word)]
        if len(pieces) > 1 and 2 * max(len(p) for p in pieces) < len(word):
            words.append(word)
    return words


def a1111_parameters(s: GenerationSettings, seed: int, height: int, width: int, base: Base) -> str:
    """The 'parameters' text A1111 and many viewers read from a PNG."""
    lines = [s.prompt]
    if s.negative_prompt:
        lines.append(f"Negative prompt: {s.negative_prompt}")
    lines.append(
        f"Steps: {s.steps}, Sampler: {s.scheduler}, CFG scale: {s.guidance_scale}, Seed: {seed}, "
        f"Size: {width}x{height}, Model hash: {base.fingerprint}, Model: {base.path.name}"
    )
    return "\n".join(lines)


def next_run_id(out: Path) -> int:
    """The next free run number: after every earlier run's record and images (also those of an
    interrupted run, which wrote images but no record)."""
    ids = [int(p.name[:5]) for p in out.iterdir() if p.name[:5].isdigit() and p.suffix in (".json", ".png")]
    return max(ids, default=0) + 1


def save_png(image: Image.Image, path: Path, text: dict[str, str]) -> None:
    info = PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    with written_atomically(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or min(len(images), 4)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def prepare_output(out: Path | None) -> None:
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise LimnerError(f"--out {out} is a file; give a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)


@torch.no_grad()
def generate(
    base: Base,
    s: GenerationSettings,
    out: Path | None = None,
    conditioning: Conditioning | None = None,
    **pipe_kwargs: Any,
) -> GenerationResult:
    """Generates s.num_images images; with `out`, writes PNGs (with parameters), a grid and a JSON record.

    `conditioning` is what applied concepts add (limner.conditioning): layout steps, per-call pipeline
    arguments, the per-window hook of regional prompts. Extra keyword arguments go to the pipeline call."""
    # 1. Check inputs
    region_concepts = concepts = None
    if conditioning is not None:
        if conditioning.layout_steps:
            s = replace(s, layout_prompt=conditioning.layout_prompt, layout_steps=conditioning.layout_steps)
        pipe_kwargs = conditioning.pipe_kwargs | pipe_kwargs
        if conditioning.before_window is not None:
            pipe_kwargs["before_window"] = conditioning.before_window
        region_concepts = conditioning.region_concepts
        concepts = conditioning.concepts
    height, width = check_settings(base, s)
    prepare_output(out)
    pipe = base.pipe
    prompts = split_regions(s.prompt) if s.regions else [s.prompt]
    lefts = window_offsets(width, base.resolution, len(prompts), pipe.vae_scale_factor) if s.regions else []
    labels = [f"region {i + 1} prompt" for i in range(len(prompts))] if s.regions else ["prompt"]
    note = prompt_note(pipe.tokenizer, [*zip(labels, prompts), ("negative prompt", s.negative_prompt)])
    warnings_seen = [note] if note else []
    if note:
        warnings.warn(note, stacklevel=1)  # once per call, one line (limner's own: generate() is wrapped by torch)
    # 2. Scheduler
    set_scheduler(pipe, s.scheduler)
    # 3. Denoise in batches, one generator per image
    images: list[Image.Image] = []
    t0 = time.perf_counter()
    for start in range(0, s.num_images, s.batch_size):
        n = min(s.batch_size, s.num_images - start)
        gens = [torch.Generator(device="cpu").manual_seed(s.seed + start + i) for i in range(n)]
        if s.regions:
            images += draw_regions(base, s, prompts, lefts, gens, height, width, **pipe_kwargs)
            progress.advance(n)
            continue
        call = dict(pipe_kwargs)
        if "ip_adapter_image_embeds" in call:
            call["ip_adapter_image_embeds"] = image_embeds_for_batch(pipe, call["ip_adapter_image_embeds"], s)
        text = with_step_status(text_inputs(pipe, s, n, call, base.family == "sdxl"), s.steps)
        result = pipe(
            negative_prompt=[s.negative_prompt] * n if s.negative_prompt else None,
            num_inference_steps=s.steps,
            guidance_scale=s.guidance_scale,
            height=height,
            width=width,
            generator=gens,
            **text,
            **call,
        )
        images += result.images
        progress.advance(n)
    progress.status(step=None)
    seconds = time.perf_counter() - t0
    # 4. Record
    record = {
        "prompt": s.prompt,
        "negative_prompt": s.negative_prompt,
        "seeds": [s.seed + i for i in range(s.num_images)],
        "settings": asdict(s) | {"height": height, "width": width},
        "base": {
            "path": str(base.path),
            "fingerprint": base.fingerprint,
            "family": base.family,
            "world": base.is_world,
        },
        "device": str(base.device),
        "dtype": str(base.dtype).replace("torch.", ""),
        "timings": {"total_s": round(seconds, 3), "per_image_s": round(seconds / s.num_images, 4)},
        "warnings": warnings_seen,
    }
    if concepts:
        record["concepts"] = concepts
    if s.regions:
        record["regions"] = [{"prompt": p, "left": x, "width": base.resolution} for p, x in zip(prompts, lefts)]
        for region, names in zip(record["regions"], region_concepts or []):
            region["concepts"] = names
    result = GenerationResult(images=images, record=record)
    if out is not None:
        write_outputs(result, s, base, out, height, width)
    return result


# prompt embeddings a method may supply instead of the prompt's text (pipeline argument -> the name of the
# tensor the pipeline's step-end callback sees)
EMBEDDING_INPUTS = {"prompt_embeds": "prompt_embeds", "pooled_prompt_embeds": "add_text_embeds"}


def text_inputs(pipe: Any, s: GenerationSettings, n: int, call: dict, sdxl: bool) -> dict:
    """The text conditioning arguments of one batch of n images: the prompt, or the prompt embeddings a
    method supplied (taken out of `call`, one row repeated per image); with layout steps, the layout
    prompt first and a switch to the prompt's conditioning once they are done."""
    embeds = {k: call.pop(k) for k in EMBEDDING_INPUTS if k in call}
    embeds = {k: v.expand(n, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in embeds.items()}
    if not s.layout_steps:
        return embeds or {"prompt": [s.prompt] * n}
    if embeds:
        wanted = {EMBEDDING_INPUTS[k]: v for k, v in embeds.items()}
    else:
        wanted = encoded_prompt(pipe, s.prompt, n, sdxl)
    return {"prompt": [s.layout_prompt] * n} | switch_conditioning_after(wanted, n, s.layout_steps)


def with_step_status(text: dict, steps: int) -> dict:
    """The pipeline arguments `text`, with the denoising step shown on the current limner bar: a batch of a real
    checkpoint on a CPU takes minutes, and a bar that moves only between batches looks stuck. Chains a step-end
    callback the arguments already hold (the layout steps' switch)."""
    if not progress.active():
        return text
    inner = text.get("callback_on_step_end")

    def show_step(pipe, i, t, tensors):
        progress.status(step=f"{i + 1}/{steps}")
        return inner(pipe, i, t, tensors) if inner is not None else {}

    return text | {"callback_on_step_end": show_step}


def image_embeds_for_batch(pipe: Any, embeds: list[torch.Tensor], s: GenerationSettings) -> list:
    """`ip_adapter_image_embeds` for a batch, from one row each of [negative; positive] (what a method's condition
    gives, the form diffusers takes under classifier-free guidance): passed as they are, or the positive half
    alone where the pipeline runs without guidance. The pipeline repeats each half once per image of the batch
    itself; repeating them here too gave each image n copies of its tokens, which attention reads as one copy
    at n times the cost. Other shapes pass as given."""
    guided = s.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None  # the pipeline's own test
    return [e if e.shape[0] != 2 or guided else e[1:] for e in embeds]


def encoded_prompt(pipe: Any, prompt: str, n: int, sdxl: bool) -> dict[str, torch.Tensor]:
    """The prompt's text conditioning as the step-end callback names it."""
    if sdxl:  # two encoders' hidden states, and the pooled embedding SDXL also conditions on
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt, device=pipe.device, num_images_per_prompt=n, do_classifier_free_guidance=False
        )
        return {"prompt_embeds": embeds, "add_text_embeds": pooled}
    return {"prompt_embeds": pipe.encode_prompt(prompt, pipe.device, n, False)[0]}


def switch_conditioning_after(wanted: dict[str, torch.Tensor], n: int, steps: int) -> dict:
    """Pipeline arguments that swap the text conditioning to `wanted` once `steps` denoising steps are done."""

    def swap(pipe, i, t, current):
        if i != steps - 1:
            return {}
        # under classifier-free guidance each tensor is [negative; positive]: keep the negative half
        return {k: torch.cat([current[k][:n], v]) if len(current[k]) == 2 * n else v for k, v in wanted.items()}

    return {"callback_on_step_end": swap, "callback_on_step_end_tensor_inputs": list(wanted)}


def draw_regions(
    base: Base,
    s: GenerationSettings,
    prompts: list[str],
    lefts: list[int],
    gens: list[torch.Generator],
    height: int,
    width: int,
    cross_attention_kwargs: dict | None = None,
    before_window=None,
    **unsupported,
) -> list[Image.Image]:
    if unsupported:
        raise LimnerError(f"regional prompts do not take {', '.join(sorted(unsupported))}; draw without --regions")
    return regional_images(
        base.pipe,
        prompts,
        lefts,
        base.resolution,
        s.negative_prompt,
        gens,
        s.steps,
        s.guidance_scale,
        height,
        width,
        cross_attention_kwargs=cross_attention_kwargs,
        before_window=before_window,
    )


def write_outputs(
    result: GenerationResult, s: GenerationSettings, base: Base, out: Path, height: int, width: int
) -> None:
    """One PNG per image (parameters in its metadata), a grid and the JSON record; every file is
    written under a temporary name and renamed, so an interrupted run leaves no half-written file."""
    run = next_run_id(out)
    for i, (im, seed) in enumerate(zip(result.images, result.record["seeds"])):
        path = out / f"{run:05d}-{i:02d}.png"
        save_png(
            im,
            path,
            {
                "parameters": a1111_parameters(s, seed, height, width, base),
                "limner": json.dumps({"seed": seed, "base_fingerprint": base.fingerprint}),
            },
        )
        result.paths.append(path)
    grid = out / f"{run:05d}-grid.png"
    save_png(make_grid(result.images), grid, {"parameters": a1111_parameters(s, s.seed, height, width, base)})
    result.record["files"] = {"images": [p.name for p in result.paths], "grid": grid.name}
    write_json_atomic(out / f"{run:05d}.json", result.record)
