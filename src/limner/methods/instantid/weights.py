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

`compact_adapter` stores an adapter's IdentityNet as a delta against its base's UNet (limner.adapters.controlnet's
`save_controlnet_delta`): how the world adapter is shipped, within the asset budget. limner loads either form; `limner
export --method instantid` writes the full one back for other libraries.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from limner.errors import LimnerError
from limner.io import PICKLE_SUFFIXES, write_json_atomic

if TYPE_CHECKING:
    from limner.models.loading import Base

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


def compact_adapter(
    base: Base, source: str | Path, out: str | Path, rank: int | None = None, energy: float | None = None
) -> Path:
    """A copy of the adapter folder `source` (what `limner pretrain --method instantid` wrote, its IdentityNet in
    full) in `out`, the IdentityNet stored as a delta against `base`'s UNet, each copied matrix's change truncated
    to `rank` or to the rank keeping `energy` of it. adapter.json records how (`identitynet_delta`: rank, energy,
    the ranks taken, the UNet's fingerprint, the sha256 of the full weights it came from), so it can be made
    again."""
    from limner.adapters.controlnet import DELTA_WEIGHTS, load_controlnet, save_controlnet_delta
    from limner.methods.adapter import ADAPTER_MANIFEST, read_adapter_manifest

    source, out = Path(source), Path(out)
    weights, net = adapter_files(source)
    full = net / "diffusion_pytorch_model.safetensors"
    if not full.is_file():
        raise LimnerError(f"{net} holds no full IdentityNet (diffusion_pytorch_model.safetensors) to compact")
    manifest = read_adapter_manifest(source)
    source_sha256 = hashlib.sha256(full.read_bytes()).hexdigest()  # before `out` may replace it
    controlnet = load_controlnet(net, base.pipe.unet)
    out.mkdir(parents=True, exist_ok=True)
    if weights.resolve() != (out / weights.name).resolve():
        shutil.copyfile(weights, out / weights.name)
    recorded = save_controlnet_delta(controlnet, base.pipe.unet, out / CONTROLNET, rank=rank, energy=energy)
    manifest["identitynet_delta"] = {
        "file": f"{CONTROLNET}/{DELTA_WEIGHTS}",
        "rank": rank,
        "energy": energy,
        "ranks": recorded["ranks"],
        "unet_fingerprint": recorded["unet_fingerprint"],
        "source_sha256": source_sha256,
    }
    write_json_atomic(out / ADAPTER_MANIFEST, manifest)
    return out


__all__ = ["CONTROLNET", "OFFICIAL_WEIGHTS", "WEIGHTS", "adapter_files", "compact_adapter"]
