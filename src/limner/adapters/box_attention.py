"""Box attention: each subject's prompt token seen only inside its box of the image, and seen more there.

FastComposer's localization loss teaches each subject token's cross-attention to stay on its subject. On the world
that is not enough in a two-subject image: one subject takes the picture and the other is lost (measured in
docs/world-bench-fastcomposer). Box attention imposes that localization at inference, as eDiff-I's
paint-with-words and DenseDiffusion (Kim et al., 2023) steer cross-attention with a layout: in every cross-attention
layer, for the conditional rows of the batch, a pixel outside subject k's box cannot attend to subject k's token
(its logit gets -inf) and a pixel inside has `boost` added to that logit. Other tokens, the unconditional rows and
self-attention are left as they are. Boxes are fractions of the image: (x0, y0, x1, y1), y downwards.

    boxes = BoxAttention(pipe)              # wraps every attn2 processor of pipe.unet
    boxes.set(positions, parse_boxes("columns", 2), boost=6.0)
    ... pipe(...) ...
    boxes.remove()                          # the processors as they were
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from limner.errors import LimnerError

Box = tuple[float, float, float, float]
COLUMNS = "columns"
BLOCKED = -1e4  # a logit softmax turns into 0 in fp16 and fp32 alike


def parse_boxes(spec: str, count: int | None = None) -> list[Box]:
    """The boxes of `spec`: "columns" (`count` equal bands, left to right) or "x0,y0,x1,y1; ..." in fractions of the
    image. With `count`, there must be that many (one per subject)."""
    if spec.strip() == COLUMNS:
        if count is None:
            return []
        return [(k / count, 0.0, (k + 1) / count, 1.0) for k in range(count)]
    boxes = []
    for part in spec.split(";"):
        try:
            box = tuple(float(v) for v in part.split(","))
        except ValueError:
            box = ()
        if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            raise LimnerError(
                f"subject_boxes {spec!r}: {part.strip()!r} is not a box; give 'columns' or 'x0,y0,x1,y1' per "
                "subject in fractions of the image (0 <= x0 < x1 <= 1, the same for y), separated by ';'"
            )
        boxes.append(box)
    if count is not None and len(boxes) != count:
        raise LimnerError(
            f"subject_boxes {spec!r} gives {len(boxes)} boxes for {count} subjects; give one per subject, in the "
            "order of their triggers (or 'columns')"
        )
    return boxes


def box_bias(
    positions: list[int], boxes: list[Box], height: int, width: int, length: int, boost: float
) -> torch.Tensor:
    """[height * width, length] logits to add: token positions[k] blocked outside boxes[k] (by pixel centre), `boost`
    inside; zero for every other token."""
    cy = (torch.arange(height) + 0.5) / height
    cx = (torch.arange(width) + 0.5) / width
    bias = torch.zeros(height, width, length)
    for pos, (x0, y0, x1, y1) in zip(positions, boxes):
        inside = ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]
        bias[..., pos] = torch.where(inside, boost, BLOCKED)
    return bias.view(height * width, length)


def layer_grid(pixels: int, latent: tuple[int, int]) -> tuple[int, int]:
    """The (height, width) of a UNet layer with `pixels` positions, for a latent of `latent` size: each level halves
    it, rounding up as a stride-2 convolution does."""
    h, w = latent
    while h * w > pixels:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != pixels:
        raise LimnerError(
            f"box attention: a layer of {pixels} positions is no level of a {latent[0]}x{latent[1]} latent"
        )
    return h, w


class BoxAttention:
    """The boxes of the prompt being drawn, on wrapped attn2 processors of a pipeline's UNet (module docstring)."""

    def __init__(self, pipe: Any):
        self.pipe, unet = pipe, pipe.unet
        self.original = dict(unet.attn_processors)
        self.positions: list[int] = []
        self.boxes: list[Box] = []
        self.boost = 0.0
        self.latent: tuple[int, int] | None = None
        self._cache: dict[tuple, torch.Tensor] = {}
        unet.set_attn_processor(
            {n: (BoxedProcessor(p, self) if n.endswith("attn2.processor") else p) for n, p in self.original.items()}
        )
        self._hook = unet.register_forward_pre_hook(self._record_latent, with_kwargs=True)

    def set(self, positions: list[int], boxes: list[Box], boost: float) -> None:
        if len(positions) != len(boxes):
            raise LimnerError(f"box attention: {len(boxes)} boxes for {len(positions)} subject tokens")
        self.positions, self.boxes, self.boost = list(positions), list(boxes), float(boost)
        self._cache.clear()

    def clear(self) -> None:
        self.set([], [], 0.0)

    def remove(self) -> None:
        self._hook.remove()
        self.pipe.unet.set_attn_processor(self.original)

    def _record_latent(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.latent = tuple(sample.shape[-2:])

    def bias(self, batch: int, pixels: int, length: int, like: torch.Tensor) -> torch.Tensor | None:
        """[batch, pixels, length] logits for one layer's call, or None with no boxes set."""
        if not self.positions or self.latent is None:
            return None
        # diffusers' pipelines put the unconditional rows first under classifier-free guidance: boxes act on the
        # conditional ones, where the subjects' tokens are
        guided = bool(getattr(self.pipe, "do_classifier_free_guidance", False)) and batch % 2 == 0
        key = (batch, pixels, length, guided, like.dtype, like.device)
        if key not in self._cache:
            height, width = layer_grid(pixels, self.latent)
            bias = box_bias(self.positions, self.boxes, height, width, length, self.boost)
            full = torch.zeros(batch, pixels, length)
            full[batch // 2 if guided else 0 :] = bias
            self._cache[key] = full.to(like.device, like.dtype)
        return self._cache[key]


class BoxedProcessor:
    """A cross-attention processor with the boxes' logits added to its attention mask."""

    def __init__(self, inner: Any, boxes: BoxAttention):
        self.inner, self.boxes = inner, boxes

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None and hidden_states.ndim == 3:
            bias = self.boxes.bias(
                hidden_states.shape[0], hidden_states.shape[1], encoder_hidden_states.shape[1], hidden_states
            )
            if bias is not None:
                attention_mask = bias if attention_mask is None else attention_mask + bias
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
