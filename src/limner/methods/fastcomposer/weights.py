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

from limner.adapters.lora import load_named_lora
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


def load_unet_lora(unet: nn.Module, state: dict[str, torch.Tensor], lora: dict, where: Path | str) -> None:
    """limner's adapter's UNet LoRA (peft's names; rank, alpha, targets as adapter.json records them) into the UNet
    beside any LoRA already there; an adapter whose weights do not fit is refused, naming it, the UNet untouched."""
    problems = load_named_lora(unet, LORA_NAME, state, int(lora["rank"]), float(lora["alpha"]), list(lora["targets"]))
    if problems:
        raise LimnerError(f"FastComposer adapter {where}: {'; '.join(problems)}")


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """A flat state as fp16 safetensors, written atomically."""
    from safetensors.torch import save_file

    half = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    with written_atomically(path) as tmp:
        save_file(half, str(tmp), metadata={"format": "pt"})
