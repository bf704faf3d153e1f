"""`limner generate`: draw from a prompt, with any concept folders applied through limner.conditioning."""

from __future__ import annotations

import tempfile
import threading
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from limner.commands.options import (
    BaseOpt,
    ConfigOpt,
    DeviceOpt,
    DtypeOpt,
    FacesOpt,
    command,
    echo_notes,
    faces_setting,
    output_folder,
    removed_if_failed,
)
from limner.errors import LimnerError
from limner.progress import task_bar

SCALE = "scale"  # the per-call setting --ip-scale sets (an AdapterMethod's call_settings)
CONTROLNET_SCALE = "controlnet_scale"  # the one --controlnet-scale sets (InstantID's IdentityNet, StoryMaker's pose)
# One model load at a time in a process: `limner app` runs several generations in threads, and loading is not
# thread-safe in the libraries (transformers builds each model on the meta device through process-wide state, so a
# second load at the same moment failed with "Unsupported device type 'meta'"; diffusers' lazy imports raced too).
# The drawing itself runs side by side.
LOADING = threading.RLock()


def check_image_options(image: list[Path], method: str | None, adapter: str | None, ip_scale, concepts: list[Path]):
    """The encoder method that encodes --image (None without --image), after checking the options belong together."""
    from limner.commands.pretrain import encoder_method
    from limner.concepts import read_manifest
    from limner.methods import get_method, method_names
    from limner.methods.adapter import AdapterMethod

    if not image:
        for flag, value in (("--method", method), ("--adapter", adapter)):
            if value is not None:
                raise LimnerError(
                    f"{flag} is for --image (references encoded on the fly); give --image REF.png, or apply a "
                    "concept folder with --concept (it names its own method and adapter)"
                )
        if ip_scale is not None:
            methods = [get_method(read_manifest(c)["method"]) for c in concepts]
            if not any(isinstance(m, AdapterMethod) and SCALE in m.call_settings for m in methods):
                raise LimnerError(
                    "--ip-scale sets the image scale of --image references or of image-prompt concepts, and no "
                    "concept given has one"
                )
        return None
    if method is None:
        encoders = [n for n in method_names() if isinstance(get_method(n), AdapterMethod)]
        raise LimnerError(f"--image: name the method that encodes it with --method ({', '.join(encoders)})")
    return encoder_method(method, "--image")


def applied_or_named(base, folders: list[Path], regions: list[str] | None, force: bool, allow_pickle: bool = False):
    """apply_concepts, where a concept whose files are not what its limner.json's method reads (a folder copied in
    part, or a manifest from another concept) is one line naming the folders, not a library's traceback."""
    from limner.concepts import read_manifest
    from limner.conditioning import apply_concepts

    try:
        return apply_concepts(base, folders, regions, force, allow_pickle)
    except OSError as e:  # diffusers' "not the path to a directory containing a config.json", and the like
        if e.errno is not None:
            raise  # the system's refusal (a full disk, permissions): the command says it as such
        said = ", ".join(f"{f} ({read_manifest(f).get('method')})" for f in folders)
        raise LimnerError(
            f"--concept {said}: the files are not those its limner.json's method reads (a folder copied in part, or "
            "another concept's limner.json); train the concept again, or copy its whole folder"
        ) from e


def set_image_scale(applied, base, scale: float) -> None:
    """--ip-scale: the scale of every installed concept that takes one, for this call."""
    from limner.methods.adapter import AdapterMethod

    for method, concepts in applied.groups:
        if isinstance(method, AdapterMethod) and SCALE in method.call_settings:
            method.set_call_settings(base, concepts, {SCALE: scale})


def set_controlnet_scale(applied, base, scale: float) -> None:
    """--controlnet-scale: the ControlNet scale of every installed concept that steers with one, for this call."""
    groups = [(m, c) for m, c in applied.groups if CONTROLNET_SCALE in getattr(m, "call_settings", ())]
    if not groups:
        raise LimnerError(
            "--controlnet-scale sets the ControlNet scale of a method that steers with one (instantid's "
            "IdentityNet, storymaker's pose ControlNet), and no concept or --image given has one"
        )
    for method, concepts in groups:
        method.set_call_settings(base, concepts, {CONTROLNET_SCALE: scale})


@command
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    num_images: Annotated[int, typer.Option("-n", "--num-images")] = 4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    steps: Annotated[int, typer.Option("--steps")] = 25,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale.")] = 5.0,
    negative: Annotated[str, typer.Option("--negative", help="Negative prompt.")] = "",
    scheduler: Annotated[str, typer.Option("--scheduler", help="dpm++, ddim, euler, euler_a or unipc.")] = "dpm++",
    height: Annotated[Optional[int], typer.Option("--height", help="Default: the base's native size.")] = None,
    width: Annotated[Optional[int], typer.Option("--width")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 4,
    regions: Annotated[
        bool,
        typer.Option(
            "--regions",
            help="The prompt is several prompts separated by BREAK, drawn left to right, "
            "each in its own window of a wider canvas (MultiDiffusion): composes concepts a single "
            "prompt cannot place together.",
        ),
    ] = False,
    out: Annotated[Path, typer.Option("--out", help="Folder for PNGs, grid and JSON record.")] = Path("out"),
    concept: Annotated[
        Optional[list[Path]],
        typer.Option("--concept", help="A concept folder to apply (repeatable: concepts compose)."),
    ] = None,
    embedding: Annotated[
        Optional[list[str]],
        typer.Option(
            "--embedding", help="A Textual Inversion file, FILE or FILE:TOKEN (diffusers, A1111/kohya, SDXL)."
        ),
    ] = None,
    allow_pickle: Annotated[
        bool,
        typer.Option("--allow-pickle", help="Allow .pt/.bin embeddings and adapters (read with weights_only=True)."),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Apply concepts trained on another base anyway.")] = False,
    image: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--image",
            help="A reference picture of the subject (repeatable), encoded on the fly by --method (an encoder "
            "method: see `limner methods`), as diffusers' ip_adapter_image.",
        ),
    ] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="The encoder method that encodes --image.")] = None,
    adapter: Annotated[
        Optional[str],
        typer.Option(
            "--adapter",
            help="For --image: the pretrained adapter (a `limner pretrain` folder or an official file). Default: "
            "the one limner ships for the world base.",
        ),
    ] = None,
    setting: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set",
            help="For --image: a setting of --method KEY=VALUE (repeatable), as `limner train --set`, e.g. --set "
            "subject_scale=2 --set subject_boxes=columns for fastcomposer (see `limner methods METHOD`).",
        ),
    ] = None,
    ip_scale: Annotated[
        Optional[float],
        typer.Option(
            "--ip-scale",
            help="The image scale of the --image references and of image-prompt concepts, for this call "
            "(0: image off; about 0.5 lets the text steer too). Default: each concept's own.",
        ),
    ] = None,
    controlnet_scale: Annotated[
        Optional[float],
        typer.Option(
            "--controlnet-scale",
            help="The ControlNet scale of concepts that steer with one (instantid's IdentityNet, 0.8 by default), "
            "for this call (0: off, no extra pass). Default: each concept's own.",
        ),
    ] = None,
    layout_steps: Annotated[
        Optional[int],
        typer.Option(
            "--layout-steps",
            help="The first K denoising steps follow the prompt with each concept's "
            "token replaced by its class noun (default: the concepts' method's; Textual "
            "Inversion: a fifth of --steps), 0: off.",
        ),
    ] = None,
    faces: FacesOpt = None,
    pose_image: Annotated[
        Optional[Path],
        typer.Option(
            "--pose-image",
            help="For --image with a method that takes a pose: instantid, a picture whose face's keypoints set "
            "the pose drawn (default: the first reference's); storymaker, an OpenPose skeleton picture drawn through "
            "its adapter's pose ControlNet, the world's on the world base (default: no pose).",
        ),
    ] = None,
    base: BaseOpt = None,
    config: ConfigOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Generate images from a prompt (on the world base unless --base is given)."""
    from limner.generation import GenerationSettings, check_settings, generate, prepare_output
    from limner.methods.settings import parse_setting
    from limner.methods.textual_inversion import load_embedding_spec
    from limner.models.loading import load_base
    from limner.regions import split_regions

    if not regions and "BREAK" in prompt.split():
        typer.echo(
            "note: the prompt holds BREAK but --regions is off, so BREAK is drawn as a word; add --regions "
            "to draw each part in its own window",
            err=True,
        )
    if regions and layout_steps:
        raise LimnerError("--layout-steps does not work with --regions yet; draw without one of them")
    if ip_scale is not None and ip_scale < 0:
        raise LimnerError(f"--ip-scale {ip_scale}: an image scale must be 0 or more (0 switches the image off)")
    if controlnet_scale is not None and controlnet_scale < 0:
        raise LimnerError(f"--controlnet-scale {controlnet_scale}: must be 0 or more (0 switches the ControlNet off)")
    encoder = check_image_options(image or [], method, adapter, ip_scale, concept or [])
    if setting and encoder is None:
        raise LimnerError(
            "--set is for --image (a setting of the method that encodes it); a concept folder carries the settings "
            "it was made with: give them to `limner train --set` instead"
        )
    method_settings = dict(parse_setting(item, "--set") for item in setting or [])
    if pose_image is not None and not hasattr(encoder.default_config() if encoder else None, "pose_image"):
        raise LimnerError(
            "--pose-image sets the pose of --image references for a method that takes one (instantid, storymaker)"
        )
    settings = GenerationSettings(
        prompt=prompt,
        negative_prompt=negative,
        num_images=num_images,
        seed=seed,
        steps=steps,
        guidance_scale=guidance,
        scheduler=scheduler,
        height=height,
        width=width,
        batch_size=batch_size,
        regions=regions,
    )
    output_folder(out)
    with LOADING:
        b = load_base(base, device=device, dtype=dtype, config=config)
    check_settings(b, settings)
    with removed_if_failed(out):
        with tempfile.TemporaryDirectory(prefix="limner-references-") as tmp:
            folders = list(concept or [])
            if encoder is not None:  # the references, encoded into a concept folder that lives for this call
                with LOADING, warnings.catch_warnings(record=True) as caught:  # the image tower is a model load
                    warnings.simplefilter("always")
                    folders.append(
                        encoder.concept_from_files(
                            b,
                            list(image or []),
                            Path(tmp) / "concept",
                            class_noun="subject",
                            adapter=adapter,
                            **({"allow_pickle": True} if allow_pickle else {}),
                            **faces_setting(encoder, faces),
                            **({"pose_image": str(pose_image)} if pose_image is not None else {}),
                            **method_settings,
                        )
                    )
                echo_notes(caught)  # which face of a reference was taken
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with LOADING:
                    applied = applied_or_named(
                        b, folders, split_regions(prompt) if regions else None, force, allow_pickle
                    )
            echo_notes(caught)
            if ip_scale is not None:
                set_image_scale(applied, b, ip_scale)
            if controlnet_scale is not None:
                set_controlnet_scale(applied, b, controlnet_scale)
            prepare_output(out)
            conditioning = applied.condition(prompt, steps, layout_steps)
        for spec in embedding or []:
            if (token := load_embedding_spec(b, spec, allow_pickle)) not in prompt:
                typer.echo(f"warning: the prompt does not contain the embedding's token {token!r}", err=True)
        with warnings.catch_warnings(record=True) as caught, task_bar(num_images, "generate"):
            warnings.simplefilter("always")
            result = generate(b, settings, out, conditioning)
        echo_notes(caught, "warning")  # what the tokenizer did not know or cut, in one line
        t = result.record["timings"]
        typer.echo(f"wrote {len(result.paths)} images, grid and record to {out}/ ({t['per_image_s']:.2f} s per image)")
