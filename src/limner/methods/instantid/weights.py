"""InstantID's files, read and written in the official layout (InstantX/InstantID on the Hugging Face hub):

    ip-adapter.bin        {"image_proj": Resampler weights, "ip_adapter": {"1.to_k_ip.weight", ...}}: the
                          IP-Adapter layout with the Resampler reading the face embedding (pickled: read only with
                          allow_pickle, by torch.load(weights_only=True)); limner writes the same entries flat, as
                          `ip-adapter.safetensors` (`image_proj.*`, `ip_adapter.*`; fp16), the form diffusers'
                          IP-Adapter loader also reads
    ControlNetModel/      the IdentityNet, a diffusers ControlNet folder (config.json,
                          diffusion_pytorch_model.safetensors): `ControlNetModel.from_pretrained` loads it

An adapter folder limner writes holds both, and `adapter.json`. An official download is either that folder (with
`ip-adapter.bin` or `.safetensors`) or the weight file with `ControlNetModel/` beside it.
"""

from __future__ import annotations

from pathlib import Path

from limner.errors import LimnerError
from limner.io import PICKLE_SUFFIXES

WEIGHTS = "ip-adapter.safetensors"
OFFICIAL_WEIGHTS = ("ip-adapter.safetensors", "ip-adapter.bin")
CONTROLNET = "ControlNetModel"


def adapter_files(adapter: Path, controlnet: str | Path | None = None) -> tuple[Path, Path]:
    """(the ip-adapter weight file, the IdentityNet folder) of an adapter folder, an official folder, or an official
    weight file with ControlNetModel/ beside it; `controlnet` names the IdentityNet folder elsewhere."""
    adapter = Path(adapter).expanduser()
    if adapter.is_file():
        weights, folder = adapter, adapter.parent
    elif adapter.is_dir():
        found = [adapter / name for name in OFFICIAL_WEIGHTS if (adapter / name).is_file()]
        if not found:
            raise LimnerError(
                f"InstantID adapter {adapter} holds neither {' nor '.join(OFFICIAL_WEIGHTS)}; give a folder that "
                "`limner pretrain --method instantid` wrote, or the official download (ip-adapter.bin and "
                "ControlNetModel/)"
            )
        weights, folder = found[0], adapter
    else:
        raise LimnerError(
            f"InstantID adapter {adapter} does not exist; give a folder that `limner pretrain --method instantid` "
            "wrote, or the official ip-adapter.bin with ControlNetModel/ beside it"
        )
    if weights.suffix not in PICKLE_SUFFIXES and weights.suffix != ".safetensors":
        raise LimnerError(f"{weights}: InstantID's adapter is read from .safetensors (or a .bin with --allow-pickle)")
    net = Path(controlnet).expanduser() if controlnet is not None else folder / CONTROLNET
    if not (net / "config.json").is_file():
        raise LimnerError(
            f"InstantID needs its IdentityNet, a ControlNet folder, and {net} has no config.json; put the official "
            f"{CONTROLNET}/ beside {weights.name}, or pass --set controlnet=DIR"
        )
    return weights, net


__all__ = ["CONTROLNET", "OFFICIAL_WEIGHTS", "WEIGHTS", "adapter_files"]
