"""A ControlNet stored as a delta against its UNet (limner.adapters.controlnet: save_controlnet_delta,
materialise_controlnet, load_controlnet), on the tiny random pipeline: a change of low rank comes back, a truncated
one keeps its largest directions, the residuals follow, another UNet is refused, a diffusers folder still loads as
one; and the shipped world InstantID adapter, stored this way, loads, exports as a plain diffusers folder, and keeps
the three identity adapters within their 30 MB."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from limner.adapters.controlnet import (
    DELTA_WEIGHTS,
    controlnet_from_unet,
    is_controlnet_delta,
    load_controlnet,
    materialise_controlnet,
    save_controlnet,
    save_controlnet_delta,
)
from limner.errors import LimnerError
from limner.methods import get_method
from limner.methods.instantid.weights import CONTROLNET, compact_adapter
from limner.models.loading import ASSETS, load_base

IDENTITY_ADAPTERS = ("photomaker", "instantid", "storymaker")
IDENTITY_BUDGET = 30_000_000  # bytes of fp16 safetensors, the three together


@pytest.fixture(scope="module")
def unet(tiny_base):
    return load_base(str(tiny_base), device="cpu").pipe.unet


def _trained(unet, change_rank: int = 2, seed: int = 0):
    """A ControlNet copied from `unet` whose copied matrices all moved by a change of rank `change_rank` (as
    training moves them), its own tensors (condition encoder, zero convolutions) anything."""
    torch.manual_seed(seed)
    net = controlnet_from_unet(unet)
    copied = set(unet.state_dict())
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name in copied and p.ndim >= 2:
                flat = p.view(p.shape[0], -1)
                change = torch.randn(flat.shape[0], change_rank) @ torch.randn(change_rank, flat.shape[1])
                flat.add_(0.02 * change)
            else:
                p.add_(0.05 * torch.randn_like(p))
    return net


def _residuals(net, seed: int = 3):
    torch.manual_seed(seed)
    cfg = net.config
    x = torch.randn(2, cfg.in_channels, 8, 8)
    context = torch.randn(2, 4, cfg.cross_attention_dim)
    cond = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        down, mid = net(x, torch.tensor([10, 700]), context, controlnet_cond=cond, return_dict=False)
    return [*down, mid]


def _relative(a, b) -> float:
    return float(sum((x - y).pow(2).sum() for x, y in zip(a, b)) ** 0.5 / sum(y.pow(2).sum() for y in b) ** 0.5)


def test_a_low_rank_change_comes_back_and_a_truncated_one_keeps_its_largest_directions(unet, tmp_path):
    net = _trained(unet, change_rank=2)
    exact = tmp_path / "exact"
    meta = save_controlnet_delta(net, unet, exact, energy=0.9999)
    assert is_controlnet_delta(exact) and meta["ranks"].startswith("2-2")
    with safe_open(str(exact / DELTA_WEIGHTS), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
        assert any(k.endswith(".delta_up") for k in f.keys())
    back = materialise_controlnet(exact, unet)
    original = {k: v.half().float() for k, v in net.state_dict().items()}  # what an fp16 folder would hold
    for name, value in back.state_dict().items():
        assert torch.allclose(value, original[name], atol=2e-3, rtol=1e-3), name
    assert _relative(_residuals(back), _residuals(net)) < 2e-3

    # truncated to rank 1: each matrix keeps the larger of its change's two directions, so the residuals move
    # less than with the change dropped (the UNet's own tensors), and more than at rank 2
    truncated = tmp_path / "rank1"
    save_controlnet_delta(net, unet, truncated, rank=1)
    assert (truncated / DELTA_WEIGHTS).stat().st_size < (exact / DELTA_WEIGHTS).stat().st_size
    dropped = controlnet_from_unet(unet)
    own = {k: v for k, v in net.state_dict().items() if k not in unet.state_dict()}
    dropped.load_state_dict(own, strict=False)
    full = _residuals(net)
    e_truncated = _relative(_residuals(materialise_controlnet(truncated, unet)), full)
    assert 2e-3 < e_truncated < 0.8 * _relative(_residuals(dropped), full)


def test_load_controlnet_materialises_a_delta_on_its_unet_and_still_reads_a_diffusers_folder(unet, tmp_path):
    net = _trained(unet)
    save_controlnet_delta(net, unet, tmp_path / "delta", energy=0.9999)
    save_controlnet(net, tmp_path / "full")
    assert not is_controlnet_delta(tmp_path / "full")
    from_delta, from_full = load_controlnet(tmp_path / "delta", unet), load_controlnet(tmp_path / "full", unet)
    assert not from_delta.training and not any(p.requires_grad for p in from_delta.parameters())
    assert _relative(_residuals(from_delta), _residuals(from_full)) < 2e-3
    # the same UNet loaded in another precision is the same UNet (the ControlNet follows its dtype)
    import copy

    half = load_controlnet(tmp_path / "delta", copy.deepcopy(unet).to(torch.bfloat16))
    assert next(half.parameters()).dtype == torch.bfloat16


def test_a_delta_on_another_unet_is_refused_naming_the_folder(unet, tmp_path):
    import copy

    save_controlnet_delta(_trained(unet), unet, tmp_path / "delta", rank=1)
    other = copy.deepcopy(unet)
    with torch.no_grad():
        other.down_blocks[0].resnets[0].conv1.weight.add_(1e-2)
    with pytest.raises(LimnerError, match=r"delta.*against another UNet.*fingerprint"):
        load_controlnet(tmp_path / "delta", other)
    (tmp_path / "delta" / DELTA_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(LimnerError, match=DELTA_WEIGHTS):
        load_controlnet(tmp_path / "delta", unet)


def test_compact_adapter_records_how_and_draws_as_the_full_one(tiny_base, tmp_path):
    """An InstantID adapter compacted (its IdentityNet a delta against the base UNet) records how it was made, and
    `limner export` writes the full diffusers ControlNet back from it."""
    import hashlib

    from diffusers import ControlNetModel

    from limner.methods.instantid.weights import WEIGHTS

    base = load_base(str(tiny_base), device="cpu")
    method = get_method("instantid")
    source = tmp_path / "full"
    (source / CONTROLNET).parent.mkdir(parents=True)
    net = _trained(base.pipe.unet)
    save_controlnet(net, source / CONTROLNET)
    from limner.methods.adapter import write_adapter_manifest
    from limner.methods.ip_adapter import save_adapter_weights

    fake = {"image_proj.latents": torch.zeros(1, 4, 8), "ip_adapter.1.to_k_ip.weight": torch.zeros(2, 2)}
    save_adapter_weights(fake, source / WEIGHTS)  # export copies it as it is
    write_adapter_manifest(source, "instantid", base, steps=2)
    compact = compact_adapter(base, source, tmp_path / "compact", energy=0.9999)
    manifest = json.loads((compact / "adapter.json").read_text())
    record = manifest["identitynet_delta"]
    weights = source / CONTROLNET / "diffusion_pytorch_model.safetensors"
    assert record["source_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["energy"] == 0.9999 and record["ranks"].startswith("2-2") and manifest["steps"] == 2
    assert is_controlnet_delta(compact / CONTROLNET) and (compact / WEIGHTS).is_file()

    exported = method.export(base, compact, tmp_path / "export")
    plain = ControlNetModel.from_pretrained(exported / CONTROLNET)  # diffusers alone reads it
    assert _relative(_residuals(plain), _residuals(net)) < 2e-3


# ---- the shipped world adapter ---------------------------------------------------------------------------------


def test_the_three_shipped_identity_adapters_fit_their_30_mb():
    sizes = {
        name: sum(p.stat().st_size for p in (ASSETS / "world" / "adapters" / name).rglob("*.safetensors"))
        for name in IDENTITY_ADAPTERS
    }
    assert all(sizes.values()) and sum(sizes.values()) <= IDENTITY_BUDGET, sizes


def test_the_shipped_instantid_identitynet_is_a_delta_on_the_world_unet_and_exports_in_full(tmp_path):
    from diffusers import ControlNetModel

    world = load_base(device="cpu")
    folder = ASSETS / "world" / "adapters" / "instantid"
    manifest = json.loads((folder / "adapter.json").read_text())
    assert is_controlnet_delta(folder / CONTROLNET)
    assert set(manifest["identitynet_delta"]) >= {"rank", "energy", "source_sha256", "unet_fingerprint"}
    with safe_open(str(folder / CONTROLNET / DELTA_WEIGHTS), "pt") as f:
        assert f.metadata()["unet_fingerprint"] == manifest["identitynet_delta"]["unet_fingerprint"]
    net = load_controlnet(folder / CONTROLNET, world.pipe.unet)
    residuals = _residuals(net)
    assert all(torch.isfinite(r).all() for r in residuals) and any(r.abs().max() > 0 for r in residuals)
    exported = get_method("instantid").export(world, None, tmp_path / "export")
    plain = ControlNetModel.from_pretrained(exported / CONTROLNET)
    assert _relative(_residuals(plain), residuals) < 2e-3  # the same IdentityNet, up to fp16
    exported_manifest = json.loads((exported / "adapter.json").read_text())
    assert "identitynet_delta" not in exported_manifest and "identitynet_materialised_from" in exported_manifest
