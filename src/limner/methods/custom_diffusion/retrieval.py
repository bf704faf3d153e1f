"""Custom Diffusion's regularisation images: real captioned images whose pictures are closest (CLIP
image-text similarity) to the class prompt, retrieved from a pool, trained with their own captions."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from limner.errors import LimnerError
from limner.io import IMAGE_SUFFIXES, cache_dir, written_atomically
from limner.methods.custom_diffusion.config import CustomDiffusionConfig

if TYPE_CHECKING:
    pass


@dataclass
class Pool:
    """A captioned image pool to retrieve from, read lazily: only the retrieved images are loaded once
    the pool's CLIP index is cached."""

    key: str  # names the pool's content, for its cached index
    size: int
    load: Callable[[list[int]], list[tuple[np.ndarray, str]]]  # (image, caption) at these indices


def world_pool(n: int, seed: int = 7) -> Pool:
    """n world renders with their captions; render i depends only on (seed, i)."""
    from limner.world.render import render
    from limner.world.scenes import random_scene

    def load(indices: list[int]) -> list[tuple[np.ndarray, str]]:
        renders = [render(random_scene(np.random.default_rng([seed, i]))) for i in indices]
        return [(r.image, r.caption) for r in renders]

    # the renderer's source is part of the key: a change to the world changes what render i shows
    world = files("limner.world")
    code = hashlib.sha256(
        b"".join((world / f).read_bytes() for f in ("render.py", "scenes.py", "vocab.py"))
    ).hexdigest()[:12]
    return Pool(f"world-{seed}-{n}-{code}", n, load)


def folder_pool(folder: Path) -> Pool:
    folder = Path(folder)
    images = [
        p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".txt").exists()
    ]
    if not images:
        raise LimnerError(f"reg_pool {folder}: no captioned images (each image needs a .txt caption beside it)")
    # a changed, added or removed file changes the key, and with it the index
    stats = [(p.name, p.stat()) for p in images]  # ctime changes with every write, whatever the mtime says
    stamp = hashlib.sha256(
        "".join(f"{n}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}\n" for n, st in stats).encode()
    ).hexdigest()[:16]

    def load(indices: list[int]) -> list[tuple[np.ndarray, str]]:
        pairs = []
        for i in indices:
            with Image.open(images[i]) as im:
                pairs.append((np.asarray(im.convert("RGB")), images[i].with_suffix(".txt").read_text().strip()))
        return pairs

    return Pool(f"{folder.resolve()}-{stamp}", len(images), load)


def pool_index(pool: Pool, clip, clip_id: str, chunk: int = 256) -> torch.Tensor:
    """CLIP image embeddings [size, d] of the whole pool, computed once per (pool, CLIP model) and kept
    in the cache, as retrieval services keep their index: later trainings only embed the class prompt."""
    path = cache_dir("retrieval") / f"{hashlib.sha256(f'{pool.key}|{clip_id}'.encode()).hexdigest()[:24]}.safetensors"
    try:
        embs = load_file(str(path))["embeddings"]
        if embs.shape[0] == pool.size:
            return embs
    except Exception:  # noqa: BLE001 - missing or unreadable: the index is built again
        pass
    embs = torch.cat(
        [
            clip.images([im for im, _ in pool.load(list(range(i, min(i + chunk, pool.size))))])
            for i in range(0, pool.size, chunk)
        ]
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with written_atomically(path) as tmp:
            save_file({"embeddings": embs.contiguous()}, str(tmp))
    except Exception as e:  # noqa: BLE001 - a cache that cannot be written (read-only, full) only costs the next run time
        warnings.warn(
            f"could not cache the retrieval index in {path.parent} ({e}); set LIMNER_CACHE to a writable folder",
            stacklevel=2,
        )
    return embs


def retrieve(pool: Pool, class_prompt: str, n: int, clip, clip_id: str) -> list[tuple[np.ndarray, str]]:
    """The n pool images most similar (CLIP image-text cosine) to the class prompt; clip_id names the
    CLIP model (its fingerprint)."""
    sims = pool_index(pool, clip, clip_id) @ clip.texts([class_prompt])[0]
    return pool.load(sims.argsort(descending=True)[:n].tolist())


def regularization_set(base, class_noun: str, cfg: CustomDiffusionConfig) -> list[tuple[np.ndarray, str]]:
    from limner.encoders.clip import CLIPEncoder, WorldCLIP
    from limner.models.loading import fingerprint

    if cfg.reg_pool:
        if not cfg.clip:
            raise LimnerError(
                "retrieving regularisation images from --reg-pool needs a CLIP model: set clip to a local CLIPModel "
                "folder"
            )
        return retrieve(
            folder_pool(Path(cfg.reg_pool)),
            f"a photo of a {class_noun}",
            cfg.num_reg_images,
            CLIPEncoder(cfg.clip),
            fingerprint(Path(cfg.clip)),
        )
    if not base.is_world:
        raise LimnerError(
            "Custom Diffusion's prior preservation on a real model needs reg_pool (a folder of captioned images) and "
            "clip; or set prior_preservation to false"
        )
    from limner.models.loading import WORLD_BASE

    # the world's CLIP lives in the base folder: the base's fingerprint names it
    return retrieve(
        world_pool(cfg.reg_pool_size), f"a {class_noun}", cfg.num_reg_images, WorldCLIP(WORLD_BASE), base.fingerprint
    )


# --------------------------------------------------------------------------------------------
