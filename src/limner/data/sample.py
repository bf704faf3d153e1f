"""What every pretraining source yields, and the one preprocessing all of them share.

A `Sample` is one training example of an encoder method: a target image with its caption, and the image(s)
the method conditions on. The paper's IP-Adapter conditions on the target itself (`references == [image]`);
a world stream with `pair="view"` conditions on another view of the same subject instead, which real data
cannot offer (`pair="crop"`: that view cropped to the subject, so it fills the frame), or with `pair="cut"` on the
target itself, its background cut out by the subject's mask (as FastComposer pairs its subject crops).
A `SampleStream` is endless and resumable: the shared training loop saves its `state_dict()` in each checkpoint,
so a resumed run reads exactly the samples the uninterrupted run would have read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from limner.errors import LimnerError

PAIRS = ("self", "view", "crop", "cut")
CUT_OUT_PAIRS = ("view", "crop", "cut")  # pairings whose condition shows the subject on grey, not its scene
# the world stream's captions: full (the subject's looks named, as the base was trained) or class (class noun,
# accessory and context only: the looks left to the image prompt, as a bench prompt leaves them)
CAPTIONS = ("full", "class")
MIN_SIDE = 16  # pixels: an image smaller than this on either side is skipped, not upscaled into a blur


@dataclass
class Sample:
    image: np.ndarray  # H x W x 3 uint8: the target image
    text: str  # its caption
    # the conditioning image(s): [image] for pair="self", another view for "view"/"crop", the image cut out for "cut"
    references: list[np.ndarray]
    mask: np.ndarray | None = None  # H x W bool subject mask of the target, where known
    subject: str | None = None  # a subject id (world: its key), None for real data
    # the identity methods' world stream (subjects="characters") fills these from the renderer
    face_keypoints: np.ndarray | None = None  # [5, 2] (x, y) in target pixels: eyes, nose tip, mouth corners
    body_keypoints: dict[str, tuple[float, float]] | None = None  # name -> (x, y) in target pixels
    reference_masks: list[np.ndarray] | None = None  # per reference, where the subject is


@runtime_checkable
class SampleStream(Protocol):
    """An endless iterable of `Sample`, resumable from `state_dict()`."""

    skipped: dict[str, int]  # reason -> samples skipped so far (undecodable, too small, no caption ...)

    def __iter__(self) -> Iterator[Sample]: ...

    def state_dict(self) -> dict: ...  # JSON-able position, for exact resume

    def load_state_dict(self, state: dict) -> None: ...

    def describe(self) -> dict: ...  # what an adapter manifest records: kind, path, seed, pair, counts


def check_stream_args(
    spec: str, seed: int, rank: int, world_size: int, resolution: int, pair: str, captions: str = "full"
) -> None:
    """The arguments every stream shares, checked before anything is read."""
    if pair not in PAIRS:
        raise LimnerError(f"pair={pair!r} for data {spec!r}: use one of {', '.join(PAIRS)}")
    if captions not in CAPTIONS:
        raise LimnerError(f"captions={captions!r} for data {spec!r}: use one of {', '.join(CAPTIONS)}")
    if not isinstance(world_size, int) or world_size < 1:
        raise LimnerError(f"world_size={world_size!r} for data {spec!r}: give the number of processes, 1 or more")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise LimnerError(f"rank={rank!r} for data {spec!r}: give this process's index, 0 to {world_size - 1}")
    if not isinstance(resolution, int) or resolution < MIN_SIDE:
        raise LimnerError(f"resolution={resolution!r} for data {spec!r}: give a side in pixels, {MIN_SIDE} or more")
    if not isinstance(seed, int) or seed < 0:
        raise LimnerError(f"seed={seed!r} for data {spec!r}: give a non-negative integer")


def square(image: Image.Image, resolution: int, resample: int = Image.BICUBIC) -> Image.Image:
    """The shorter side resized to `resolution`, then the centre square: what every encoder method trains on.
    Cropping before resizing would be cheaper, but resizing first keeps the crop at exactly the centre pixel
    for odd sizes, as the tuning methods' instance data do."""
    w, h = image.size
    if (w, h) == (resolution, resolution):
        return image
    s = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), resample)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def square_array(image: np.ndarray, resolution: int) -> np.ndarray:
    return np.asarray(square(Image.fromarray(image), resolution))


def square_mask(mask: np.ndarray, resolution: int) -> np.ndarray:
    """A bool mask fitted exactly as its image is (bilinear coverage, then half covered counts as inside)."""
    grey = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(square(grey, resolution, Image.BILINEAR)) >= 128
