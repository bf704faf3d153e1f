"""Low-rank adapters (LoRA) through peft: adding them to a model, the kohya file layout, and
switching named adapters per region window (DreamBooth LoRA), and a method's own named LoRA (PhotoMaker,
StoryMaker, FastComposer, BLIP-Diffusion) installed beside other LoRA concepts and removed without disturbing them."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

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
    """A hook that gives adapter j `weights[i][j]` times its weight in window i, and with None the weights it had
    when the first window began. Only these adapters' scales change: every other adapter (a user's own LoRA, another
    method's) stays active at its weight. Only the UNet's adapters switch: the regions' text is encoded once, before
    denoising."""
    start: dict[tuple[torch.nn.Module, str], float] | None = None  # (layer, adapter) -> scale before window 0

    def use_window(i: int | None) -> None:
        nonlocal start
        if start is None:
            if i is None:
                return
            layers = tuner_layers(unet)
            start = {(layer, a): layer.scaling[a] for layer in layers for a in adapters if a in layer.scaling}
        for (layer, adapter), scale in start.items():
            layer.scaling[adapter] = scale if i is None else scale * weights[i][adapters.index(adapter)]
        if i is None:
            start = None

    return use_window


# ---- a named LoRA (PhotoMaker's "photomaker", StoryMaker's, FastComposer's, BLIP-Diffusion's) beside others -------
#
# A method's own LoRA joins whatever LoRAs the model already runs (a DreamBooth LoRA concept composed beside it):
# peft's model-level calls would not let it. add_adapter and load_lora_adapter make the new adapter the *only*
# active one, set_adapters activates exactly the names given, and delete_adapters, when it empties a layer's active
# set, activates the first remaining adapter instead of the set that was there before. So the active set is kept
# here, per layer, and each call only adds or takes away its own name.


def add_named_lora(model: torch.nn.Module, name: str, rank: int, alpha: float, targets: list[str] | str) -> list:
    """A LoRA adapter called `name` on the model's `targets` (gaussian init, as diffusers' scripts), active at weight
    1 beside the adapters already active; its parameters. A model already carrying one of that name is refused (one
    adapter of a kind at a time)."""
    from peft import LoraConfig

    refuse_second(model, name)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    with joining_the_active(model, name):
        model.add_adapter(config, adapter_name=name)
    return [p for n, p in model.named_parameters() if f"lora_A.{name}" in n or f"lora_B.{name}" in n]


def named_lora_state(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights under peft's names (`<module>.lora_A.weight`, `<module>.lora_B.weight`)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=name)


def load_named_lora(
    model: torch.nn.Module,
    name: str,
    state: dict[str, torch.Tensor],
    rank: int,
    alpha: float,
    targets: list[str] | str,
) -> list[str]:
    """Adds the adapter (active beside the others) and loads `state` (peft's names) into it. Returns what is wrong,
    [] when nothing is: LoRA modules left without weights (their lora_B would stay zero, the adapter silently off
    there) or weights for modules the model lacks; the adapter is removed again if anything is."""
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


def load_diffusers_lora(unet: torch.nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """A LoRA in diffusers' file layout (`unet.` + its keys, rank and alpha read from them by diffusers' own loader)
    added as adapter `name`, active at weight 1 beside the adapters already active."""
    refuse_second(unet, name)
    with joining_the_active(unet, name):
        unet.load_lora_adapter(state, prefix="unet", adapter_name=name)


def activate_named_lora(model: torch.nn.Module, name: str, weight: float = 1.0) -> None:
    """Adapter `name` active at `weight` (the factor on its alpha / rank, as diffusers' set_adapters), every other
    adapter left active or not, at its weight, as it was."""
    for layer in tuner_layers(model):
        active = list(layer.active_adapters)
        if name not in active:
            set_active(layer, [*active, name])
        layer.set_scale(name, weight)


def remove_named_lora(model: torch.nn.Module, name: str) -> None:
    """The adapter gone and the other adapters active as they were; layers left with no adapter lose peft's wrapper
    (the state dict's names as before the adapter came), and where it was the model's only one, peft's bookkeeping
    goes too."""
    adapters = getattr(model, "peft_config", None) or {}
    if name not in adapters:
        return
    if len(adapters) == 1:
        model.unload_lora()
        return
    with others_kept_active(model, [name]):
        model.delete_adapters(name)
    unwrap_empty_layers(model)


@contextmanager
def others_kept_active(model: torch.nn.Module, leaving: list[str]) -> Iterator[None]:
    """Around a peft/diffusers call that deletes the adapters `leaving`: afterwards each layer runs what it ran before
    less those (where a layer's active set empties, peft would activate a stand-in adapter that was off there)."""
    keep = {layer: [a for a in layer.active_adapters if a not in leaving] for layer in tuner_layers(model)}
    with warnings.catch_warnings():  # peft's note that it picked a stand-in adapter: the set is put back below
        warnings.simplefilter("ignore")
        yield
    for layer, active in keep.items():
        set_active(layer, active)


def refuse_second(model: torch.nn.Module, name: str) -> None:
    from limner.errors import LimnerError

    if name in (getattr(model, "peft_config", None) or {}):
        raise LimnerError(f"this model already carries a LoRA named {name!r}; apply one such adapter at a time")


def tuner_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def joining_the_active(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Around a peft/diffusers call that adds adapter `name` and makes it the only active one: afterwards each layer
    runs what it ran before plus `name` (a layer new to peft: the model's previous set plus `name`)."""
    before = {layer: list(layer.active_adapters) for layer in tuner_layers(model)}
    everywhere = list(dict.fromkeys(a for active in before.values() for a in active))
    yield
    for layer in tuner_layers(model):
        set_active(layer, [*before.get(layer, everywhere), name])


def set_active(layer: torch.nn.Module, active: list[str]) -> None:
    """The layer's active adapters, its parameters' requires_grad untouched (peft's set_adapter would make the
    active ones trainable and freeze the rest: a training's adapter or a caller's choice undone)."""
    flags = [(p, p.requires_grad) for p in layer.parameters()]
    layer.set_adapter(active)
    for p, flag in flags:
        p.requires_grad_(flag)


def unwrap_empty_layers(model: torch.nn.Module) -> None:
    """peft's wrapper taken off every layer that no longer carries any adapter (delete_adapters leaves them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer) and not any(getattr(child, a) for a in child.adapter_layer_names):
                setattr(parent, child_name, child.get_base_layer())
