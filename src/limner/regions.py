"""Regional composition (MultiDiffusion, Bar-Tal et al., 2023): one image from several prompts.

The canvas is wider than the base's native frame. Each prompt owns one native-size window, left to
right, and neighbouring windows overlap. At every denoising step each window is denoised with its own
prompt, and where windows overlap their noise predictions are averaged. The seams are therefore
denoised jointly, and the result is one scene, not tiles pasted together.

Why limner needs it: a base draws one subject per frame far better than a scene of several. The world
base, for one, draws two-object scenes as blobs. Giving each concept its own window composes concepts
that a single prompt cannot place together: a merged Custom Diffusion model, several LoRAs or
embeddings. Prompts are separated by "BREAK", as in A1111's Regional Prompter.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable

import torch
from PIL import Image

from limner.errors import LimnerError

SEPARATOR = "BREAK"
# called before window i is denoised (to install that window's weights), and with None at the end
WindowHook = Callable[[int | None], None]
OVERLAP = 0.25  # the share of a window that its right-hand neighbour also covers


def split_regions(prompt: str) -> list[str]:
    """The prompts of the regions, left to right."""
    parts = [p.strip(" ,") for p in prompt.split(SEPARATOR)]
    if len(parts) < 2 or not all(parts):
        raise LimnerError(
            f"--regions needs two or more non-empty prompts separated by {SEPARATOR!r}, e.g. "
            f"'a <new1> ball on the beach {SEPARATOR} a <new2> cup on the beach'; got {prompt!r}"
        )
    return parts


def mentions(prompt: str, word: str) -> bool:
    """Whether a region's prompt names a concept's token or identifier as a word of its own (in any
    case, as CLIP's tokenizer lowercases)."""
    return re.search(rf"(?<![\w<>]){re.escape(word)}(?![\w<>])", prompt, re.IGNORECASE) is not None


def prompt_names(prompt: str, tokens: list[str]) -> bool:
    """Whether a region's prompt names a concept by any of its tokens (words, identifier, modifiers)."""
    return any(mentions(prompt, t) for t in tokens)


def warn_if_unnamed(concept: str, words: list[str], prompts: list[str]) -> None:
    """A concept acts only in the regions that name it: say so when none does."""
    if not any(prompt_names(p, words) for p in prompts):
        warnings.warn(
            f"no region's prompt names {' or '.join(words)}, so {concept} acts in none of them", stacklevel=3
        )


def canvas_width(window: int, regions: int, overlap: float = OVERLAP) -> int:
    """The default canvas width in pixels: `regions` windows, each overlapping the next by `overlap`."""
    stride = window - max(8, round(window * overlap / 8) * 8)  # at least one 8-pixel block is shared
    return window + (regions - 1) * stride


def window_offsets(canvas: int, window: int, regions: int, factor: int = 1) -> list[int]:
    """Left edges of the windows in pixels, spread evenly from one edge to the other on the latent grid
    (`factor` pixels per latent)."""
    lat_canvas, lat_window = canvas // factor, window // factor
    return [factor * round(i * (lat_canvas - lat_window) / (regions - 1)) for i in range(regions)]


def encode_regions(
    pipe, prompts: list[str], negative: str
) -> tuple[torch.Tensor, torch.Tensor, dict | None, dict | None]:
    """Text conditioning of each region's prompt and of the negative prompt: (cond [k, L, D], uncond,
    and on SDXL the pooled embeddings the UNet also takes)."""
    negatives = [negative] * len(prompts) if negative else None
    device = pipe.unet.device
    if getattr(pipe, "text_encoder_2", None) is None:
        cond, uncond = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=negatives)
        return cond, uncond, None, None
    cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
        prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=negatives
    )
    return cond, uncond, {"text_embeds": pooled}, {"text_embeds": pooled_uncond}


@torch.no_grad()
def regional_images(
    pipe,
    prompts: list[str],
    lefts: list[int],
    window: int,
    negative: str,
    generators: list[torch.Generator],
    steps: int,
    guidance: float,
    height: int,
    width: int,
    cross_attention_kwargs: dict | None = None,
    before_window: WindowHook | None = None,
) -> list[Image.Image]:
    """One image per generator: a height x width canvas whose windows (`window` pixels wide, left edges
    `lefts` from `window_offsets`) are each denoised with their own prompt.

    `before_window(i)`, if given, runs before window i is denoised (e.g. to install that region's
    concept weights); the UNet then runs window by window instead of on all windows at once.
    `before_window(None)` runs at the end, to put the pipeline back as it was."""
    unet, scheduler, factor = pipe.unet, pipe.scheduler, pipe.vae_scale_factor
    device, dtype = unet.device, unet.dtype
    n = len(generators)
    cond, uncond, added, added_uncond = encode_regions(pipe, prompts, negative)
    guided = guidance > 1.0
    k = len(prompts)
    # conditioning rows [uncond views..., cond views...], each view-major: view i, then image j
    hidden = torch.cat(([uncond.repeat_interleave(n, 0)] if guided else []) + [cond.repeat_interleave(n, 0)])
    added_kwargs = None
    if added is not None:  # SDXL: pooled text and the size / crop conditioning of one window
        pooled = torch.cat(
            ([added_uncond["text_embeds"].repeat_interleave(n, 0)] if guided else [])
            + [added["text_embeds"].repeat_interleave(n, 0)]
        )
        time_ids = torch.tensor([[height, window, 0, 0, height, window]], device=device, dtype=pooled.dtype)
        added_kwargs = {"text_embeds": pooled, "time_ids": time_ids.repeat(len(pooled), 1)}
    # one UNet call for all windows, or one per window when each window has its own weights; for each
    # call, its windows and their conditioning rows (uncond rows, then cond rows)
    groups = [list(range(k))] if before_window is None else [[i] for i in range(k)]
    calls = []
    for group in groups:
        rows = torch.cat([torch.arange(i * n, (i + 1) * n) for i in group])
        rows = (torch.cat([rows, rows + k * n]) if guided else rows).to(device)
        added_rows = None if added_kwargs is None else {key: v[rows] for key, v in added_kwargs.items()}
        calls.append((group, hidden[rows], added_rows))

    lat_h, lat_w, lat_win = height // factor, width // factor, window // factor
    offsets = [x // factor for x in lefts]
    coverage = torch.zeros(lat_w, device=device, dtype=torch.float32)
    for o in offsets:
        coverage[o : o + lat_win] += 1
    shape = (1, unet.config.in_channels, lat_h, lat_w)
    latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]).to(device)
    scheduler.set_timesteps(steps, device=device)
    latents = latents * scheduler.init_noise_sigma
    # ancestral samplers draw fresh noise: from each image's own generator, where the scheduler takes one
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}

    try:
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t).to(dtype)
            eps = []
            for group, hidden_rows, added_rows in calls:
                if before_window is not None:
                    before_window(group[0])
                views = torch.cat([x[..., offsets[i] : offsets[i] + lat_win] for i in group])
                pred = unet(
                    torch.cat([views, views]) if guided else views,
                    t,
                    encoder_hidden_states=hidden_rows,
                    added_cond_kwargs=added_rows,
                    cross_attention_kwargs=cross_attention_kwargs,
                ).sample.float()
                if guided:
                    pred_uncond, pred_cond = pred.chunk(2)
                    pred = pred_uncond + guidance * (pred_cond - pred_uncond)
                eps.append(pred)
            eps = torch.cat(eps)  # view-major, as the windows are ordered
            # average each view's prediction where windows overlap
            total = torch.zeros_like(latents)
            for i, o in enumerate(offsets):
                total[..., o : o + lat_win] += eps[i * n : (i + 1) * n]
            latents = scheduler.step(total / coverage, t, latents, **step_kwargs).prev_sample
    finally:
        if before_window is not None:
            before_window(None)
    return decode(pipe, latents)


def decode(pipe, latents: torch.Tensor) -> list[Image.Image]:
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)  # SDXL's VAE overflows in fp16
    dtype = torch.float32 if upcast else vae.dtype
    if upcast:
        vae.to(torch.float32)
    try:
        images = vae.decode(latents.to(dtype) / vae.config.scaling_factor, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    return pipe.image_processor.postprocess(images, output_type="pil")
