"""PhotoMaker's weight files: the official layout, read and written.

The official `photomaker-v1.bin` / `photomaker-v2.bin` is a pickle of two state dicts, `{"id_encoder": ...,
"lora_weights": ...}`; its safetensors conversion (which the official pipeline reads too) keeps them flat under
the prefixes `id_encoder.` and `lora_weights.`. limner reads the pickle only with allow_pickle (torch.load with
weights_only=True) and writes its own adapters as that safetensors conversion (`photomaker.safetensors`, fp16):

    id_encoder.vision_model.*               the CLIP vision tower (complete)
    id_encoder.visual_projection.weight     [text encoder 1 width, hidden]
    id_encoder.visual_projection_2.weight   [text encoder 2 width, hidden] (two-encoder bases: SDXL)
    id_encoder.fuse_module.*                the fuse MLP (mlp1.{layernorm,fc1,fc2}, mlp2.{...}, layer_norm)
    id_encoder.qformer_perceiver.*          v2 only: the face embedding's perceiver
    lora_weights.unet.<attention>.processor.to_{q,k,v,out}_lora.{down,up}.weight
                                            the UNet's LoRA in diffusers' attention-processor names (the official
                                            file's), alpha = rank (no alpha tensors)

peft names the same LoRA `<attention>.to_q.lora_A.weight` (down) / `lora_B` (up), `to_out.0` for `to_out`:
`lora_to_peft` and `lora_from_peft` map one onto the other by key.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from limner.errors import LimnerError
from limner.io import PICKLE_SUFFIXES, read_tensors, written_atomically

WEIGHTS = "photomaker.safetensors"
OFFICIAL_FILES = ("photomaker-v1.bin", "photomaker-v2.bin", "photomaker-v1.safetensors", "photomaker-v2.safetensors")
PARTS = ("id_encoder", "lora_weights")
LORA_NAME = "photomaker"  # the peft adapter name in the UNet, as the official pipeline names it
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # every attention projection of the UNet (paper: all attention)
IGNORED = ("vision_model.embeddings.position_ids",)  # a buffer older transformers saved; rebuilt, never loaded

# one LoRA tensor in any of the names it is found under: diffusers' attention processors (the official file), its
# later `to_q.lora.down` form, or peft's `to_q.lora_A`
_OFFICIAL = re.compile(r"(?:unet\.)?(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_DIFFUSERS = re.compile(r"(?:unet\.)?(.+)\.(to_q|to_k|to_v|to_out(?:\.0)?)\.lora\.(down|up)\.weight")
_PEFT = re.compile(r"(?:unet\.)?(.+)\.(to_q|to_k|to_v|to_out\.0)\.(lora_A|lora_B)\.weight")


def weights_path(adapter: Path) -> Path:
    """The weight file of an adapter: the file itself, a limner folder's photomaker.safetensors, or a folder holding
    an official file."""
    adapter = Path(adapter)
    if adapter.is_file():
        return adapter
    for name in (WEIGHTS, *OFFICIAL_FILES):
        if (adapter / name).is_file():
            return adapter / name
    raise LimnerError(
        f"PhotoMaker adapter {adapter} holds neither {WEIGHTS} nor an official {' / '.join(OFFICIAL_FILES[:2])}; "
        "give a folder that `limner pretrain --method photomaker` wrote, or the official file (--allow-pickle)"
    )


def read_weights(adapter: Path, allow_pickle: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """{"id_encoder": ..., "lora_weights": ...} of an adapter (official pickle, its safetensors conversion, or
    limner's), each part's keys without the prefix. A part missing is an error naming the file."""
    path = weights_path(adapter)
    if path.suffix not in PICKLE_SUFFIXES and path.suffix != ".safetensors":
        raise LimnerError(
            f"{path}: PhotoMaker weights are read from .safetensors (or the official .bin with --allow-pickle)"
        )
    raw = read_tensors(path, allow_pickle)
    if not isinstance(raw, dict):
        raise LimnerError(f"{path} holds no state dict: not a PhotoMaker checkpoint")
    parts: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    for key, value in raw.items():
        if key in PARTS and isinstance(value, dict):  # the official pickle: two nested state dicts
            parts[key].update(value)
            continue
        part, _, rest = key.partition(".")
        if part not in PARTS or not isinstance(value, torch.Tensor):
            raise LimnerError(
                f"{path} has a key that is no PhotoMaker weight: {key!r} (the official layout holds only id_encoder "
                "and lora_weights)"
            )
        parts[part][rest] = value
    for key in IGNORED:
        parts["id_encoder"].pop(key, None)
    for part, what in (("id_encoder", "the ID encoder"), ("lora_weights", "the UNet's LoRA")):
        if not parts[part]:
            raise LimnerError(
                f"PhotoMaker checkpoint {path} has no {part} ({what}); the official file holds both id_encoder and "
                "lora_weights: give the complete photomaker-v1.bin / -v2.bin (or its safetensors conversion)"
            )
    return parts


def variant_of(id_encoder: dict[str, torch.Tensor]) -> str:
    """v2 where the face embedding's perceiver is there, else v1."""
    return "v2" if any(k.startswith("qformer_perceiver.") for k in id_encoder) else "v1"


def lora_to_peft(lora: dict[str, torch.Tensor], where: Path | str) -> tuple[dict[str, torch.Tensor], int]:
    """The official LoRA keys as peft's (module.lora_A / lora_B), and its rank. An unknown key is an error."""
    out: dict[str, torch.Tensor] = {}
    for key, value in lora.items():
        if key.endswith(".alpha"):
            continue  # alpha = rank in the official file; a file with other alphas is refused below by its ranks
        match = _OFFICIAL.fullmatch(key) or _DIFFUSERS.fullmatch(key) or _PEFT.fullmatch(key)
        if match is None:
            raise LimnerError(f"PhotoMaker checkpoint {where}: lora_weights key {key!r} is no UNet attention LoRA")
        module, proj, kind = match.groups()
        proj = "to_out.0" if proj in ("to_out", "to_out.0") else proj
        side = "lora_A" if kind in ("down", "lora_A") else "lora_B"
        out[f"{module}.{proj}.{side}.weight"] = value
    ranks = {int(v.shape[0]) for k, v in out.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise LimnerError(f"PhotoMaker checkpoint {where}: its LoRA has ranks {sorted(ranks)}; one rank is expected")
    return out, ranks.pop()


def lora_from_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's LoRA keys as the official file's (`unet.<module>.processor.to_q_lora.down.weight`)."""
    out = {}
    for key, value in state.items():
        match = _PEFT.fullmatch(key)
        if match is None:
            raise ValueError(f"not a UNet attention LoRA key: {key}")
        module, proj, side = match.groups()
        proj = "to_out" if proj == "to_out.0" else proj
        out[f"unet.{module}.processor.{proj}_lora.{'down' if side == 'lora_A' else 'up'}.weight"] = value
    return out


def check_lora_shapes(lora: dict[str, torch.Tensor], unet: torch.nn.Module, where: Path | str) -> None:
    """Every LoRA tensor (peft's names) fits the UNet's layer it adapts: otherwise the file was made for another
    base, which the error says."""
    modules = dict(unet.named_modules())
    for key, value in lora.items():
        module_name, _, side = key.rpartition(".lora_")
        layer = modules.get(module_name)
        if layer is None or not hasattr(layer, "in_features"):
            raise LimnerError(
                f"PhotoMaker checkpoint {where}: its LoRA adapts {module_name}, which this base's UNet lacks: it was "
                "made for another base (the official files are for SDXL)"
            )
        base_layer = getattr(layer, "base_layer", layer)
        wanted = base_layer.in_features if side.startswith("A") else base_layer.out_features
        got = int(value.shape[1] if side.startswith("A") else value.shape[0])
        if got != wanted:
            raise LimnerError(
                f"PhotoMaker checkpoint {where}: its LoRA for {module_name} is {got} wide where this base's layer is "
                f"{wanted}: it was made for another base (the official files are for SDXL)"
            )


def save_weights(id_encoder: dict[str, torch.Tensor], lora_peft: dict[str, torch.Tensor], path: Path) -> None:
    """The official layout as flat fp16 safetensors (the official pipeline's safetensors form), written atomically."""
    from safetensors.torch import save_file

    flat = {f"id_encoder.{k}": v for k, v in id_encoder.items() if k not in IGNORED}
    flat |= {f"lora_weights.{k}": v for k, v in lora_from_peft(lora_peft).items()}
    half = {k: v.detach().to(torch.float16).contiguous() for k, v in flat.items()}
    with written_atomically(path) as tmp:
        save_file(half, str(tmp), metadata={"format": "pt"})
