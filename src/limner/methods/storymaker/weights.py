"""StoryMaker's weight file: the official layout, its LoRA, and installing both into a UNet.

The official checkpoint (`mask.bin`) is `{"image_proj": ..., "ip_adapter": ...}`: the projection's state
(limner.methods.storymaker.projection) and a ModuleList of *every* attention processor of the UNet in
`unet.attn_processors` order, so entry i is attn1 for even i and attn2 for odd i in SD-type UNets. Each holds
its LoRA (`{i}.to_q_lora.down.weight`, `.up.weight`, and the same for to_k, to_v, to_out; rank 128 on SDXL,
alpha None so the update is up(down(x))) and each attn2 also its image keys and values
(`{i}.to_k_ip.weight`, `{i}.to_v_ip.weight`): the IP-Adapter numbering limner.adapters.ip_attention writes.

limner writes the same keys flat in `storymaker.safetensors` (`image_proj.*`, `ip_adapter.*`, fp16) and reads
them back, or the official nested `.bin` with allow_pickle (torch.load with weights_only=True). The LoRA is
carried in the UNet by peft (named `storymaker`, alpha = rank so its scale is 1 as the official layer's): the
official LoRA on to_k/to_v reads the text only, as peft's on attn.to_k does beside the separate image keys.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from limner.adapters.lora import add_named_lora, load_named_lora
from limner.errors import LimnerError
from limner.io import PICKLE_SUFFIXES, read_tensors, written_atomically

WEIGHTS = "storymaker.safetensors"
LORA_NAME = "storymaker"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # of attn1 and attn2, as the official processors
_OFFICIAL_PROJ = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
_PEFT_KEY = re.compile(r"(.+\.attn[12])\.(to_q|to_k|to_v|to_out\.0)\.lora_([AB])\.weight")
_OFFICIAL_KEY = re.compile(r"(\d+)\.(to_q_lora|to_k_lora|to_v_lora|to_out_lora)\.(down|up)\.weight")


def weights_path(adapter: Path) -> Path:
    adapter = Path(adapter)
    if adapter.is_file():
        return adapter
    if (adapter / WEIGHTS).is_file():
        return adapter / WEIGHTS
    candidates = sorted(p for p in adapter.glob("*") if p.suffix in (".safetensors", *PICKLE_SUFFIXES))
    if len(candidates) == 1:
        return candidates[0]
    raise LimnerError(
        f"StoryMaker adapter {adapter} holds no {WEIGHTS} (and not exactly one official weight file); give a folder "
        "that `limner pretrain --method storymaker` wrote, or the official mask.bin with --allow-pickle"
    )


def read_weights(adapter: Path, allow_pickle: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": ..., "ip_adapter": ...} from limner's flat file or the official nested one."""
    path = weights_path(adapter)
    if path.suffix not in PICKLE_SUFFIXES and path.suffix != ".safetensors":
        raise LimnerError(f"{path}: StoryMaker weights are read from .safetensors (or a .bin with --allow-pickle)")
    state = read_tensors(path, allow_pickle)
    if not isinstance(state, dict):
        raise LimnerError(f"{path} holds no state dict: not a StoryMaker checkpoint")
    if isinstance(state.get("image_proj"), dict):  # the official nested layout
        parts = {"image_proj": dict(state["image_proj"]), "ip_adapter": dict(state.get("ip_adapter") or {})}
    else:
        unknown = sorted(k for k in state if not k.startswith(("image_proj.", "ip_adapter.")))
        if unknown:
            raise LimnerError(
                f"{path} has keys that are not StoryMaker weights: {unknown[:4]} (the official layout has only "
                "image_proj.* and ip_adapter.*)"
            )
        parts = {
            part: {k.removeprefix(f"{part}."): v for k, v in state.items() if k.startswith(f"{part}.")}
            for part in ("image_proj", "ip_adapter")
        }
    if "bg_embed" not in parts["image_proj"]:
        raise LimnerError(f"{path} has no image_proj.bg_embed: not a StoryMaker checkpoint (an IP-Adapter file?)")
    if not any(_OFFICIAL_KEY.fullmatch(k) for k in parts["ip_adapter"]):
        raise LimnerError(
            f"{path} has no LoRA weights (ip_adapter.N.to_q_lora.down.weight ...): StoryMaker's UNet LoRA is missing; "
            "give the complete checkpoint"
        )
    return parts


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """A flat official state as fp16 safetensors, written atomically."""
    from safetensors.torch import save_file

    half = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    with written_atomically(path) as tmp:
        save_file(half, str(tmp), metadata={"format": "pt"})


def processor_index(unet: nn.Module) -> dict[str, int]:
    """attention module path ("...attn1") -> its index in the official ModuleList of unet.attn_processors."""
    return {name.removesuffix(".processor"): i for i, name in enumerate(unet.attn_processors)}


def add_lora(unet: nn.Module, rank: int) -> list[nn.Parameter]:
    """The LoRA on every attention's to_q, to_k, to_v, to_out (attn1 and attn2), scale 1; its parameters."""
    return add_named_lora(unet, LORA_NAME, rank, rank, lora_targets())


def lora_targets() -> str:
    """peft's target pattern: to_q, to_k, to_v, to_out of attn1 and attn2, as the official processors."""
    return "|".join(rf".*\.attn[12]\.{re.escape(t)}$" for t in LORA_TARGETS)


def lora_official_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's StoryMaker LoRA as `{i}.to_q_lora.down.weight` ... (without the ip_adapter. prefix)."""
    from peft import get_peft_model_state_dict

    index = processor_index(unet)
    out = {}
    for key, value in get_peft_model_state_dict(unet, adapter_name=LORA_NAME).items():
        match = _PEFT_KEY.fullmatch(key)
        if match is None:
            raise LimnerError(f"unexpected LoRA weight {key} in the UNet")
        module, proj, ab = match.groups()
        out[f"{index[module]}.{_OFFICIAL_PROJ[proj]}.{'down' if ab == 'A' else 'up'}.weight"] = value.detach().cpu()
    return out


def load_lora(unet: nn.Module, ip_adapter: dict[str, torch.Tensor], where: Path | str) -> None:
    """Adds the LoRA (its rank read from the file) and loads the official `{i}.to_*_lora.*` weights; every
    module's pair must be there."""
    state, rank = lora_peft_state(unet, ip_adapter, where)
    problems = load_named_lora(unet, LORA_NAME, state, rank, rank, lora_targets())
    if problems:
        raise LimnerError(f"StoryMaker adapter {where}: {'; '.join(problems)}; it was made for another base")


def lora_peft_state(
    unet: nn.Module, ip_adapter: dict[str, torch.Tensor], where: Path | str
) -> tuple[dict[str, torch.Tensor], int]:
    """The official `{i}.to_*_lora.*` weights under peft's names for this UNet, and their rank; a file without a
    pair for every attention projection is refused."""
    names = {i: module for module, i in processor_index(unet).items()}
    lora = {k: v for k, v in ip_adapter.items() if _OFFICIAL_KEY.fullmatch(k)}
    downs = [v for k, v in lora.items() if k.endswith("down.weight")]
    if not downs:
        raise LimnerError(f"StoryMaker adapter {where} holds no LoRA weights (ip_adapter.{{i}}.to_q_lora.down...)")
    back = {v: k for k, v in _OFFICIAL_PROJ.items()}
    state = {}
    for key, value in lora.items():
        i, proj, part = _OFFICIAL_KEY.fullmatch(key).groups()
        if int(i) not in names:
            raise LimnerError(f"StoryMaker adapter {where}: LoRA for attention {i}, which this UNet lacks")
        state[f"{names[int(i)]}.{back[proj]}.lora_{'A' if part == 'down' else 'B'}.weight"] = value
    if len(state) != 2 * len(LORA_TARGETS) * len(names):
        raise LimnerError(
            f"StoryMaker adapter {where}: LoRA weights for {len(state) // 2} of the UNet's "
            f"{len(LORA_TARGETS) * len(names)} projections; it was made for another base"
        )
    return state, int(downs[0].shape[0])


def ip_entries(ip_adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image keys and values (`{i}.to_k_ip.weight`, `{i}.to_v_ip.weight`) of an ip_adapter state."""
    return {k: v for k, v in ip_adapter.items() if k.endswith(("to_k_ip.weight", "to_v_ip.weight"))}
