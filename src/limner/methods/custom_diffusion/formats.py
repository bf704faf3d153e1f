"""Custom Diffusion's weights file: diffusers' attention-processor layout
(`<attn2 name>.processor.to_k_custom_diffusion.weight`, ...), written and read by limner (diffusers' own
loader does nothing with it in 0.42), and the modifier tokens as one embedding file each."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from limner.errors import LimnerError
from limner.io import child, read_tensors, written_atomically

if TYPE_CHECKING:
    pass


WEIGHTS_FILE = "pytorch_custom_diffusion_weights.safetensors"
MODES = {"crossattn_kv": ("to_k", "to_v"), "crossattn": ("to_q", "to_k", "to_v", "to_out.0")}


def cross_attention_layers(unet) -> dict[str, torch.nn.Module]:
    """name -> attn2 module, in the order of unet.attn_processors."""
    return {name: m for name, m in unet.named_modules() if name.endswith("attn2")}


def trained_projections(unet, mode: str):
    """(attn2 name, projection, parameter name, parameter) for every weight Custom Diffusion trains."""
    for name, attn in cross_attention_layers(unet).items():
        for proj in MODES[mode]:
            for pname, p in base_layer(attn.get_submodule(proj)).named_parameters(recurse=False):
                yield name, proj, pname, p


def base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The plain linear layer, also when a LoRA (peft) wraps it."""
    return getattr(module, "base_layer", module)


# --------------------------------------------------------------------------------------------
# Regularisation images: retrieved from a captioned pool by CLIP similarity to the class prompt


_KEY = {
    "to_k": "to_k_custom_diffusion",
    "to_v": "to_v_custom_diffusion",
    "to_q": "to_q_custom_diffusion",
    "to_out.0": "to_out_custom_diffusion.0",
}


def layer_weights(unet, mode: str) -> dict[str, torch.Tensor]:
    """diffusers' Custom Diffusion layout: '<attn2 name>.processor.to_k_custom_diffusion.weight', ..."""
    # a copy: on a CPU in fp32, .cpu().float() would be the parameter itself, and installing other weights
    # would change what was meant to be kept
    return {
        f"{name}.processor.{_KEY[proj]}.{pname}": p.detach().to("cpu", torch.float32, copy=True)
        for name, proj, pname, p in trained_projections(unet, mode)
    }


def read_weights(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Reads limner's and diffusers' Custom Diffusion files (.safetensors; .bin only with opt-in,
    then with weights_only=True). Entries of self-attention processors, which diffusers' trainer
    also writes, carry no weights and are ignored."""
    state = read_tensors(Path(path), allow_pickle)
    return {k: v for k, v in state.items() if "_custom_diffusion" in k and ".attn2." in k}


def install_weights(unet, state: dict[str, torch.Tensor]) -> int:
    """Writes Custom Diffusion weights into the matching attn2 projections (equivalent to diffusers'
    CustomDiffusionAttnProcessor with train_kv, which computes k and v with those weights)."""
    layers = cross_attention_layers(unet)
    reverse = {v: k for k, v in _KEY.items()}
    n = 0
    for key, value in state.items():
        layer, _, rest = key.partition(".processor.")
        proj_key, _, pname = rest.rpartition(".")
        if layer not in layers or proj_key not in reverse:
            raise LimnerError(
                f"Custom Diffusion weight {key} does not match this UNet (no layer {layer}); was it trained on "
                "another base?"
            )
        target = base_layer(layers[layer].get_submodule(reverse[proj_key]))
        param = getattr(target, pname)
        if param.shape != value.shape:
            raise LimnerError(
                f"Custom Diffusion weight {key} has shape {tuple(value.shape)}, the UNet's is {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(value.to(param))
        n += 1
    return n


def save_concept(pipe, folder: Path, mode: str, tokens: list[str], vectors: dict[str, torch.Tensor]) -> dict:
    """The K/V weights, and one embedding file per modifier token, `<new1>.safetensors` as diffusers
    writes it ({token: [1, d]}; on SDXL {"clip_l", "clip_g"} as A1111 does)."""
    with written_atomically(folder / WEIGHTS_FILE) as tmp:
        save_file({k: v.half() for k, v in layer_weights(pipe.unet, mode).items()}, str(tmp))
    files = {"weights": WEIGHTS_FILE, "tokens": {}}
    for i, token in enumerate(tokens):
        rows = {name: v[i : i + 1].detach().cpu().half().contiguous() for name, v in vectors.items()}
        state = (
            {"clip_l": rows["text_encoder"], "clip_g": rows["text_encoder_2"]}
            if "text_encoder_2" in rows
            else {token: rows["text_encoder"]}
        )
        name = f"{token}.safetensors"
        with written_atomically(child(folder, name, "the modifier token's file")) as tmp:
            save_file(state, str(tmp))
        files["tokens"][token] = name
    return files
