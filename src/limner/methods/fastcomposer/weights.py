"""FastComposer's weight files: limner's adapter and the official checkpoint, both under the official prefixes.

The official `pytorch_model.bin` holds the whole FastComposerModel: `unet.*` (the fine-tuned UNet, diffusers' names),
`text_encoder.*` (CLIP's text transformer: `embeddings.*`, `encoder.*`, `final_layer_norm.*`, which is
transformers' CLIPTextModel state dict), `image_encoder.*` (`vision_model.*` and `visual_projection.weight`: a
CLIPVisionModelWithProjection) and `postfuse_module.*` (the fuse MLP). It is a pickle, read only with allow_pickle
(torch.load with weights_only=True), and every module must be complete: missing keys are listed.

limner's adapter (`fastcomposer.safetensors`, fp16) keeps those prefixes for what it trained: `postfuse_module.*`
whole, `image_encoder.vision_model.encoder.layers.{i}.*` for the trainable last layers only, and the UNet's delta as
a LoRA (`unet.<module>.lora_A.weight` / `lora_B.weight`, peft's names), so a shipped world adapter stays a few MB
where the whole UNet would not.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from limner.errors import LimnerError
from limner.io import PICKLE_SUFFIXES, read_tensors, written_atomically

WEIGHTS = "fastcomposer.safetensors"
OFFICIAL_FILE = "pytorch_model.bin"
PARTS = ("unet", "text_encoder", "image_encoder", "postfuse_module")
LORA_NAME = "fastcomposer"  # the peft adapter name in the UNet
IGNORED = ("text_encoder.embeddings.position_ids", "image_encoder.vision_model.embeddings.position_ids")


def weights_path(adapter: Path) -> Path:
    """The weight file of an adapter: the file itself, a limner folder's fastcomposer.safetensors, or a folder
    holding the official pytorch_model.bin."""
    adapter = Path(adapter)
    if adapter.is_file():
        return adapter
    for name in (WEIGHTS, OFFICIAL_FILE):
        if (adapter / name).is_file():
            return adapter / name
    raise LimnerError(
        f"FastComposer adapter {adapter} holds neither {WEIGHTS} nor the official {OFFICIAL_FILE}; give a folder "
        "that `limner pretrain --method fastcomposer` wrote, or the official checkpoint (with --allow-pickle)"
    )


def read_weights(adapter: Path, allow_pickle: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """An adapter's weights split by part: {"unet": ..., "text_encoder": ..., "image_encoder": ...,
    "postfuse_module": ...}, each with its prefix removed (absent parts are empty)."""
    path = weights_path(adapter)
    if path.suffix not in PICKLE_SUFFIXES and path.suffix != ".safetensors":
        raise LimnerError(f"{path}: FastComposer weights are read from .safetensors (or a .bin with --allow-pickle)")
    flat = read_tensors(path, allow_pickle)
    if not isinstance(flat, dict):
        raise LimnerError(f"{path} holds no state dict: not a FastComposer checkpoint")
    unknown = sorted(k for k in flat if k.split(".")[0] not in PARTS)
    if unknown:
        raise LimnerError(
            f"{path} has keys that are not FastComposer weights: {unknown[:4]} (the official layout has only "
            f"{', '.join(p + '.*' for p in PARTS)})"
        )
    parts: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    for key, value in flat.items():
        if key in IGNORED:
            continue
        part, _, rest = key.partition(".")
        parts[part][rest] = value
    if not parts["postfuse_module"]:
        raise LimnerError(f"{path} has no postfuse_module.* weights: not a FastComposer checkpoint")
    return parts


def is_lora(unet_state: dict[str, torch.Tensor]) -> bool:
    return any(".lora_A." in k or ".lora_B." in k for k in unet_state)


def check_complete(given: dict[str, torch.Tensor], module: nn.Module, what: str, where: Path | str) -> None:
    """Every weight of `module` is in `given` and nothing else is: otherwise an error listing the first few."""
    expected = {k for k in module.state_dict() if not k.endswith("position_ids")}
    missing, unknown = sorted(expected - set(given)), sorted(set(given) - expected)
    if missing:
        raise LimnerError(
            f"FastComposer checkpoint {where} misses {len(missing)} {what} weights, e.g. "
            f"{', '.join(f'{what}.{k}' for k in missing[:4])}; give the complete checkpoint (or one for this base)"
        )
    if unknown:
        raise LimnerError(
            f"FastComposer checkpoint {where} has {what} weights this base lacks, e.g. "
            f"{', '.join(f'{what}.{k}' for k in unknown[:4])}: it was made for another base"
        )


def load_into(module: nn.Module, state: dict[str, torch.Tensor], what: str, where: Path | str) -> None:
    """`state` (a subset of the module's keys) copied into the module, shapes checked."""
    own = module.state_dict()
    for key, value in state.items():
        if key not in own:
            raise LimnerError(f"FastComposer adapter {where}: {what}.{key} is no weight of this base's {what}")
        if tuple(own[key].shape) != tuple(value.shape):
            raise LimnerError(
                f"FastComposer adapter {where}: {what}.{key} has shape {tuple(value.shape)}, this base's "
                f"{tuple(own[key].shape)}: it was made for another base"
            )
    module.load_state_dict(state, strict=False)


def add_unet_lora(unet: nn.Module, rank: int, alpha: float, targets: list[str]) -> list[nn.Parameter]:
    """A LoRA named `fastcomposer` on the UNet's `targets` (gaussian init, as diffusers' scripts); its parameters."""
    from peft import LoraConfig

    if LORA_NAME in (getattr(unet, "peft_config", None) or {}):
        raise LimnerError("this UNet already carries a FastComposer LoRA; apply one FastComposer adapter at a time")
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    unet.add_adapter(config, adapter_name=LORA_NAME)
    return [p for n, p in unet.named_parameters() if f"lora_A.{LORA_NAME}" in n or f"lora_B.{LORA_NAME}" in n]


def unet_lora_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, adapter_name=LORA_NAME)


def load_unet_lora(unet: nn.Module, state: dict[str, torch.Tensor], lora: dict, where: Path | str) -> None:
    from peft import set_peft_model_state_dict

    add_unet_lora(unet, int(lora["rank"]), float(lora["alpha"]), list(lora["targets"]))
    result = set_peft_model_state_dict(unet, state, adapter_name=LORA_NAME)
    unexpected = getattr(result, "unexpected_keys", None) or []
    # a LoRA module left without its weights keeps lora_B at zero: the adapter would silently do nothing there
    missing = [k for k in getattr(result, "missing_keys", None) or [] if "lora_" in k and LORA_NAME in k]
    if missing:
        remove_unet_lora(unet)
        raise LimnerError(
            f"FastComposer adapter {where}: LoRA weights missing for {len(missing)} tensors, e.g. {missing[:4]}"
        )
    if unexpected:
        remove_unet_lora(unet)
        raise LimnerError(
            f"FastComposer adapter {where}: LoRA weights for modules this UNet lacks, e.g. {unexpected[:4]}"
        )


def remove_unet_lora(unet: nn.Module) -> None:
    """The LoRA gone; where it was the UNet's only adapter, peft's wrapper layers too (the state dict's names as
    before, so an official checkpoint still loads by key)."""
    adapters = getattr(unet, "peft_config", None) or {}
    if LORA_NAME not in adapters:
        return
    if len(adapters) == 1:
        unet.unload_lora()
    else:
        unet.delete_adapters(LORA_NAME)


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """A flat state as fp16 safetensors, written atomically."""
    from safetensors.torch import save_file

    half = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    with written_atomically(path) as tmp:
        save_file(half, str(tmp), metadata={"format": "pt"})
