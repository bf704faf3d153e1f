"""Low-rank adapters (LoRA) through peft: adding them to a model, the kohya file layout, and
switching named adapters per region window. DreamBooth LoRA uses them today; PhotoMaker, StoryMaker
and the UNet deltas of BLIP-Diffusion and FastComposer will ship as LoRAs too."""

from __future__ import annotations

import re

import torch

from limner.regions import WindowHook


def add_lora(model: torch.nn.Module, rank: int, alpha: float, targets: list[str]) -> list[torch.nn.Parameter]:
    """Adds a rank-`rank` adapter to every target module (peft, gaussian init as diffusers' scripts);
    returns the adapter's parameters, the only ones to train."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
    return [p for n, p in model.named_parameters() if "lora_" in n]


def to_kohya(diffusers_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """diffusers/peft LoRA keys -> kohya's (lora_unet_* / lora_te_*, lora_down / lora_up, .alpha)."""
    out = {}
    sdxl = any(k.startswith("text_encoder_2.") for k in diffusers_state)
    for key, value in diffusers_state.items():
        prefix, _, rest = key.partition(".")
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight", rest)
        if match is None:
            raise ValueError(f"not a LoRA weight key: {key}")
        module, kind = match.groups()
        head = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}[prefix]
        name = head + module.replace(".", "_")
        part = "lora_down" if kind in ("lora_A", "lora.down") else "lora_up"
        out[f"{name}.{part}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def adapters_per_window(unet: torch.nn.Module, adapters: list[str], weights: list[list[float]]) -> WindowHook:
    """A hook that gives adapter j weight `weights[i][j]` in window i, and every adapter weight 1 again
    with None. Only the UNet's adapters switch: the regions' text is encoded once, before denoising."""
    everywhere = [1.0] * len(adapters)
    active = everywhere

    def use_window(i: int | None) -> None:
        nonlocal active
        want = everywhere if i is None else weights[i]
        if want != active:
            unet.set_adapters(adapters, weights=want)
            active = want

    return use_window
