"""`limner export`: a method's pretrained adapter, with the base, in another library's folder layout.

BLIP-Diffusion: diffusers' `BlipDiffusionPipeline` folder (model_index.json, qformer/, text_encoder/ as
ContextCLIPTextModel, image_processor/, unet/ with the stage-2 delta merged, vae/, tokenizer/, scheduler/).
InstantID: the official adapter layout (ip-adapter.safetensors, ControlNetModel/ with full weights) that the community
InstantID pipeline and `ControlNetModel.from_pretrained` read, beside the user's own base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from limner.commands.options import BaseOpt, DeviceOpt, command, output_folder, removed_if_failed
from limner.errors import LimnerError


def exporters() -> list[str]:
    """The methods that write another library's folder: those whose class defines `export(base, adapter, out)`."""
    from limner.methods import REGISTRY, method_names

    return [name for name in method_names() if callable(getattr(REGISTRY[name], "export", None))]


@command
def export_cmd(
    method: Annotated[
        str, typer.Option("--method", help="The method whose adapter to export (blip_diffusion, instantid).")
    ],
    out: Annotated[Path, typer.Option("--out", help="A new folder for the exported pipeline.")],
    adapter: Annotated[
        Optional[Path],
        typer.Option("--adapter", help="The adapter folder. Default: the one limner ships for the base."),
    ] = None,
    base: BaseOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Export a pretrained adapter with its base as another library's pipeline folder."""
    from limner.methods import get_method
    from limner.models.loading import load_base

    if method not in exporters():
        raise LimnerError(f"limner export --method {method}: exports exist for {', '.join(exporters())}")
    output_folder(out)
    if out.exists() and any(out.iterdir()):
        raise LimnerError(f"--out {out} is not empty; give a new folder (nothing was overwritten)")
    b = load_base(base, device=device, dtype="fp32")
    with removed_if_failed(out):
        folder = get_method(method).export(b, adapter, out)
    typer.echo(f"{method} pipeline written to {folder}")
