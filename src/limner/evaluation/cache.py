"""Eval's caches: generated images keyed by everything that affects them, concepts trained once per
(method, settings, subject, base), and the base loaded only when something is missing."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from limner import progress
from limner.conditioning import AppliedConcepts
from limner.evaluation.cache_keys import concept_key, digest
from limner.evaluation.rows import EvalSettings
from limner.evaluation.scoring import world_fidelity_score
from limner.evaluation.subjects import EvalSubject
from limner.io import child, written_atomically
from limner.methods import get_method
from limner.methods.settings import with_recipe
from limner.training import split_train_settings

if TYPE_CHECKING:
    from limner.models.loading import Base


class ImageCache:
    """Generated images stored by a key of everything that affects them."""

    def __init__(self, root: Path):
        self.root = root / "images"
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.png"

    def put(self, key: str, image: Image.Image) -> Path:
        p = self.path(key)
        with written_atomically(p) as tmp:  # parallel evaluations share one cache
            image.save(tmp, format="PNG")
        return p


class BaseHandle:
    """Loads the base only when an image is actually missing from the cache."""

    def __init__(self, spec: str | None, device: str, fingerprint: str):
        from limner.models.loading import resolve_device, resolve_dtype

        self.spec, self.device, self.fingerprint, self._base = spec, device, fingerprint, None
        dev = resolve_device(device)
        # images made in another precision are other images: the device type and dtype are part of the key
        self.precision = f"{dev.type}/{resolve_dtype('auto', dev, world=spec is None)}".replace("torch.", "")

    def get(self):
        if self._base is None:
            from limner.models.loading import load_base

            self._base = load_base(self.spec, device=self.device)
        return self._base

    def reset(self) -> None:
        """Drops the loaded pipeline, so the next concept starts from a clean base."""
        self._base = None


def generate_cached(
    handle: BaseHandle,
    cache: ImageCache,
    prompt: str,
    settings: EvalSettings,
    key_parts: dict,
    prepare: Callable[[Base], AppliedConcepts] | None = None,
    layout_prompt: str | None = None,
    layout_steps: int = 0,
) -> list[Path]:
    """N images of one prompt, from the cache where possible; `prepare(base)` installs the row's concept
    (once) and returns it. With `layout_steps`, the first steps follow `layout_prompt`."""
    from limner.generation import GenerationSettings, generate

    layout = (
        {"layout_prompt": layout_prompt, "layout_steps": layout_steps} if layout_steps else {}
    )  # keys without it are unchanged
    keys = [
        digest(
            key_parts
            | layout
            | {
                "prompt": prompt,
                "seed": settings.seed + i,
                "steps": settings.steps,
                "guidance": settings.guidance,
                "scheduler": settings.scheduler,
            }
        )
        for i in range(settings.images_per_prompt)
    ]
    missing = [i for i, k in enumerate(keys) if not cache.path(k).exists()]
    cache.hits += len(keys) - len(missing)
    cache.misses += len(missing)
    progress.advance(len(keys) - len(missing))  # generate() counts the images it draws
    if missing:
        base = handle.get()
        applied = prepare(base) if prepare is not None else None
        # one batched call when the run is contiguous (the usual case); image i always has seed + i
        runs = [missing] if missing == list(range(missing[0], missing[-1] + 1)) else [[i] for i in missing]
        for run in runs:
            s = GenerationSettings(
                prompt=prompt,
                num_images=len(run),
                seed=settings.seed + run[0],
                steps=settings.steps,
                guidance_scale=settings.guidance,
                scheduler=settings.scheduler,
                batch_size=len(run),
                layout_prompt=layout_prompt if layout_steps else None,
                layout_steps=layout_steps,
            )
            # the concepts' per-call arguments; the layout steps are the row's (the key names them)
            pipe_kwargs = (
                applied.condition(prompt, settings.steps, layout_steps=0).pipe_kwargs if applied is not None else {}
            )
            for i, image in zip(run, generate(base, s, **pipe_kwargs).images):
                cache.put(keys[i], image)
    return [cache.path(k) for k in keys]


def concept_fingerprint(concept: Path) -> str:
    """Weights and settings of a concept; not its logs, checkpoints or timings."""
    from limner.concepts import read_manifest
    from limner.models.loading import fingerprint

    m = read_manifest(concept)
    stable = {k: m.get(k) for k in ("method", "subject", "base_fingerprint", "config", "steps", "tokens")}
    if m.get("adapter_fingerprint"):
        # an encoder concept draws through its adapter: two adapters over the same image encoder encode the same
        # embeddings, and must not share images (kept out of the key when absent, so tuning caches stay valid)
        stable["adapter_fingerprint"] = m["adapter_fingerprint"]
    return digest([stable, fingerprint(Path(concept), skip=("limner.json", "README.md", "train_log.csv"))])


def personalize_cached(
    method_name: str, subject: EvalSubject, handle: BaseHandle, cache_root: Path, config: dict
) -> tuple[Path, dict]:
    """Trains (or encodes) a concept once per (method, subject, base, config); reused afterwards."""
    from limner.concepts import read_manifest, write_json_atomic

    method = get_method(method_name)
    key = concept_key(method, config, subject.fingerprint(masks=method.reads_masks(config)), handle.fingerprint)
    folder = child(cache_root / "concepts", f"{method_name}-{subject.name}-{key}", "the subject's name")
    if not (folder / "limner.json").exists():
        # trained in a side folder (resumable after an interruption) and renamed when complete
        work = folder.with_name(folder.name + ".partial")
        t0 = time.perf_counter()
        train_cfg = method.default_train_config()
        config = with_recipe(method, config)  # the recipe's trainer settings join the ones split off below
        if train_cfg is not None and "train" not in config:
            from dataclasses import replace

            # training settings (max_steps=600, learning_rate=1e-3) go into the method's TrainConfig
            train_cfg, config = split_train_settings(train_cfg, config)
            # validation every sixth of training, scored by the world's probes: a fidelity-vs-time curve
            every = max(1, train_cfg.max_steps // 6) if subject.world is not None else 0
            config = config | {"train": replace(train_cfg, resume="latest", validate_every=every)}
        score = world_fidelity_score(subject) if subject.world is not None else None
        from limner.models.loading import load_base

        handle.reset()
        # trained in full precision (mixed precision is the trainer's business), whatever the device
        method.personalize(
            load_base(handle.spec, device=handle.device, dtype="fp32"), subject, work, score=score, **config
        )
        meta = read_manifest(work)
        meta.setdefault("personalize_seconds", round(time.perf_counter() - t0, 2))
        write_json_atomic(work / "limner.json", meta)
        os.replace(work, folder)
    return folder, read_manifest(folder)


def save_references(subject: EvalSubject, cache_root: Path) -> list[Path]:
    folder = child(cache_root / "references", f"{subject.name}-{subject.fingerprint()}", "the subject's name")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(subject.images):
        p = folder / f"{i}.png"
        if not p.exists():
            Image.fromarray(im).save(p)
        paths.append(p)
    return paths
