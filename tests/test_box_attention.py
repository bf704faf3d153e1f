"""Box attention (limner.adapters.box_attention): a subject's token reaches only the pixels of its box."""

from __future__ import annotations

import pytest
import torch

from limner.adapters.box_attention import BoxAttention, box_bias, layer_grid, parse_boxes
from limner.errors import LimnerError
from limner.models.loading import load_base


@pytest.fixture(scope="module")
def pipe():
    return load_base(None, device="cpu", dtype="float32").pipe


def first_cross_attention(unet) -> torch.nn.Module:
    name = next(n for n in unet.attn_processors if n.endswith("attn2.processor"))
    return unet.get_submodule(name.removesuffix(".processor"))


def attend(attn, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    return attn.processor(attn, hidden, context)


def test_parse_boxes_gives_columns_and_explicit_boxes_and_names_what_is_wrong():
    assert parse_boxes("columns", 2) == [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    assert parse_boxes("0,0,0.4,1; 0.6,0.2,1,0.9", 2) == [(0, 0, 0.4, 1), (0.6, 0.2, 1, 0.9)]
    with pytest.raises(LimnerError, match="'0.5,0,0.2,1' is not a box"):
        parse_boxes("0.5,0,0.2,1")
    with pytest.raises(LimnerError, match="is not a box"):
        parse_boxes("left;right")
    with pytest.raises(LimnerError, match="gives 1 boxes for 2 subjects"):
        parse_boxes("0,0,1,1", 2)


def test_the_bias_blocks_a_token_outside_its_box_and_boosts_it_inside():
    bias = box_bias([3, 5], parse_boxes("columns", 2), 2, 4, 8, boost=2.0).view(2, 4, 8)
    assert (bias[:, :2, 3] == 2.0).all() and (bias[:, 2:, 3] < -1e3).all()  # token 3: the left half
    assert (bias[:, 2:, 5] == 2.0).all() and (bias[:, :2, 5] < -1e3).all()  # token 5: the right half
    assert (bias[..., [0, 1, 2, 4, 6, 7]] == 0).all()  # every other token as it was


def test_layer_grids_follow_the_unets_levels_for_any_aspect():
    assert layer_grid(12 * 16, (12, 16)) == (12, 16)
    assert layer_grid(3 * 4, (12, 16)) == (3, 4)
    assert layer_grid(3 * 5, (5, 9)) == (3, 5)  # odd sizes round up, as a stride-2 convolution does
    with pytest.raises(LimnerError, match="no level"):
        layer_grid(7, (12, 16))


def test_a_subjects_token_changes_only_the_pixels_of_its_box(pipe):
    """Changing subject 0's token (the left box) moves the left half's attention output and not the right half's;
    with no boxes set it moves both. Then remove() puts the processors back."""
    before = {n: type(p) for n, p in pipe.unet.attn_processors.items()}
    boxes = BoxAttention(pipe)
    try:
        attn = first_cross_attention(pipe.unet)
        side = 8
        boxes.latent = (side, side)  # what the UNet's forward records; this layer is called alone here
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(1, side * side, attn.to_q.in_features, generator=g)
        context = torch.randn(1, 10, attn.to_k.in_features, generator=g)
        changed = context.clone()
        changed[:, 4] += 3.0
        boxes.set([4, 7], parse_boxes("columns", 2), boost=6.0)
        moved = (attend(attn, hidden, changed) - attend(attn, hidden, context)).abs().amax(-1).view(side, side)
        assert (moved[:, side // 2 :] == 0).all() and (moved[:, : side // 2] > 1e-3).all()
        boxes.clear()
        moved = (attend(attn, hidden, changed) - attend(attn, hidden, context)).abs().amax(-1).view(side, side)
        assert (moved[:, side // 2 :] > 1e-3).all()
    finally:
        boxes.remove()
    assert {n: type(p) for n, p in pipe.unet.attn_processors.items()} == before


def test_under_guidance_the_unconditional_rows_are_left_alone(pipe):
    attn = first_cross_attention(pipe.unet)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 64, attn.to_q.in_features, generator=g)
    context = torch.randn(2, 10, attn.to_k.in_features, generator=g)
    plain = attend(attn, hidden, context)
    pipe._guidance_scale = 5.0  # as the pipeline's call sets it: [unconditional rows; conditional rows]
    boxes = BoxAttention(pipe)
    try:
        boxes.latent = (8, 8)
        boxes.set([4], [(0.0, 0.0, 0.5, 1.0)], boost=6.0)
        boxed = attend(attn, hidden, context)
    finally:
        boxes.remove()
        del pipe._guidance_scale
    assert torch.allclose(boxed[0], plain[0], atol=1e-6)
    assert not torch.allclose(boxed[1], plain[1], atol=1e-3)
