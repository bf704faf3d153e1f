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


def text_encoder_lora_problem() -> str | None:
    """Why a text encoder's LoRA cannot be added or loaded with the installed packages, or None.

    transformers' own peft integration adds it (and diffusers' `load_lora_weights` loads it through
    the same integration), and every entry point of that integration refuses a peft older than its
    MIN_PEFT_VERSION (0.5 in transformers 4.57, 0.18 in 5.0, 0.20 in 5.20 to 5.23, 0.22 from 5.24).
    The UNet's LoRA goes through diffusers' integration, which has its own, lower, minimum."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        from transformers.integrations import peft as integration
    except ImportError:  # no integration to refuse; peft itself then says what is missing
        return None
    need = getattr(integration, "MIN_PEFT_VERSION", None)
    try:
        have = version("peft")
    except PackageNotFoundError:
        have = None
    if need is None or (have is not None and Version(have) >= Version(need)):
        return None
    return (
        f"a text encoder's LoRA needs peft >= {need} with transformers {version('transformers')} (installed: "
        f"peft {have or 'none'}); install peft>={need}, or, where no such peft is published yet, transformers<5.24 "
        "(whose 5.20 to 5.23 take peft 0.20 and 0.21)"
    )


def to_kohya(diffusers_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """diffusers/peft LoRA keys -> kohya's (lora_unet_* / lora_te_*, lora_down / lora_up, .alpha).

    The UNet's converted keys end in lora.down / lora.up, the text encoders' in lora_linear_layer.down
    / .up, peft's own in lora_A / lora_B. kohya names CLIP's modules as transformers 4 lays them out
    (text_model.encoder.layers...), which A1111, ComfyUI and diffusers' kohya reader expect; transformers
    5 dropped the `text_model` level, so it is put back here."""
    out = {}
    sdxl = any(k.startswith("text_encoder_2.") for k in diffusers_state)
    for key, value in diffusers_state.items():
        prefix, _, rest = key.partition(".")
        match = re.fullmatch(
            r"(.+)\.(lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up)\.weight", rest
        )
        if match is None:
            raise ValueError(f"not a LoRA weight key: {key}")
        module, kind = match.groups()
        head = {
            "unet": "lora_unet_",
            "text_encoder": "lora_te1_" if sdxl else "lora_te_",
            "text_encoder_2": "lora_te2_",
        }[prefix]
        if prefix != "unet" and not module.startswith("text_model."):
            module = f"text_model.{module}"
        name = head + module.replace(".", "_")
        part = "lora_down" if kind in ("lora_A", "lora.down", "lora_linear_layer.down") else "lora_up"
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


# ---- one named LoRA on a model (PhotoMaker's "photomaker"): added, read, loaded with checks, removed --------------


def add_named_lora(model: torch.nn.Module, name: str, rank: int, alpha: float, targets: list[str]) -> list:
    """A LoRA adapter called `name` on the model's `targets` (gaussian init, as diffusers' scripts); its parameters.
    A model already carrying one of that name is refused (one adapter of a kind at a time)."""
    from peft import LoraConfig

    from limner.errors import LimnerError

    if name in (getattr(model, "peft_config", None) or {}):
        raise LimnerError(f"this model already carries a LoRA named {name!r}; apply one such adapter at a time")
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    model.add_adapter(config, adapter_name=name)
    return [p for n, p in model.named_parameters() if f"lora_A.{name}" in n or f"lora_B.{name}" in n]


def named_lora_state(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights under peft's names (`<module>.lora_A.weight`, `<module>.lora_B.weight`)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=name)


def load_named_lora(
    model: torch.nn.Module, name: str, state: dict[str, torch.Tensor], rank: int, alpha: float, targets: list[str]
) -> list[str]:
    """Adds the adapter and loads `state` (peft's names) into it. Returns what is wrong, [] when nothing is: LoRA
    modules left without weights (their lora_B would stay zero, the adapter silently off there) or weights for
    modules the model lacks; the adapter is removed again if anything is."""
    from peft import set_peft_model_state_dict

    add_named_lora(model, name, rank, alpha, targets)
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    missing = [k for k in getattr(result, "missing_keys", None) or [] if "lora_" in k and name in k]
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    problems = [f"no weights for {len(missing)} LoRA tensors, e.g. {missing[:3]}"] if missing else []
    problems += [f"weights for modules this model lacks, e.g. {unexpected[:3]}"] if unexpected else []
    if problems:
        remove_named_lora(model, name)
    return problems


def remove_named_lora(model: torch.nn.Module, name: str) -> None:
    """The adapter gone; where it was the model's only one, peft's wrapper layers too (the state dict's names as
    before)."""
    adapters = getattr(model, "peft_config", None) or {}
    if name not in adapters:
        return
    if len(adapters) == 1:
        model.unload_lora()
    else:
        model.delete_adapters(name)
