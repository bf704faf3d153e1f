"""The concept: one folder per personalized subject, whatever the method.

It holds the method's weights in their interoperable formats, `limner.json` (method, base
fingerprint, tokens, class noun, training settings, steps, timings, curve) and a README model card.
"""

from __future__ import annotations

import json
from pathlib import Path

from limner.errors import LimnerError
from limner.io import write_json_atomic, write_text_atomic  # write_json_atomic: re-exported for methods

MANIFEST = "limner.json"


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise LimnerError(
            f"concept {folder} has no {MANIFEST}; it is not a limner concept folder (train one with `limner train`)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8 text
        raise LimnerError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise LimnerError(f"{path} holds a JSON {type(manifest).__name__}, not a concept's manifest (an object)")
    return manifest


def concept_files(manifest: dict) -> set[str]:
    """The file names a concept's manifest lists under "files" (however the method nests them)."""

    def names(value) -> set[str]:
        if isinstance(value, str):
            return {value}
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
        return {n for v in items for n in names(v)}

    return names(manifest.get("files", {}))


def remove_stale_files(folder: Path, old: dict, new: dict) -> list[str]:
    """After a concept was trained again into its folder (--force): the files the old manifest listed that the
    new one does not (an embedding named after the old token), so no old weights are left beside the new."""
    from limner.io import child

    stale = sorted(concept_files(old) - concept_files(new))
    for name in stale:
        path = child(Path(folder), name, f"{folder}/{MANIFEST}'s file")
        if path.is_file():
            path.unlink()
    return stale


def check_base(manifest: dict, folder: Path, base, force: bool = False) -> None:
    """A concept trained on another base gets a clear error unless forced."""
    want = manifest.get("base_fingerprint")
    if want and want != base.fingerprint and not force:
        raise LimnerError(
            f"concept {folder} was trained on base {want} ({manifest.get('base_path', '?')}) but the loaded base is "
            f"{base.fingerprint} ({base.path}); load that base, or pass --force to apply it anyway"
        )


def write_concept(out: Path, method: str, trained_on, base, log, wall_seconds: float, **fields) -> dict:
    """Writes limner.json (the fields every trained concept shares, plus the method's own) and the
    model card; returns the manifest."""
    manifest = {
        "method": method,
        "subject": trained_on.name,
        "class_noun": trained_on.class_noun,
        "base_fingerprint": base.fingerprint,
        "base_path": str(base.path),
        "steps": log.steps,
        "seconds": round(log.seconds, 2),
        "wall_seconds": round(wall_seconds, 2),
        "curve": log.curve,
        "validation": log.validation,
        "num_processes": log.num_processes,
    } | fields
    write_json_atomic(Path(out) / MANIFEST, manifest)
    write_model_card(Path(out), manifest)
    return manifest


# what a concept's recipe setting (limner.methods.settings.recipe_setting) means, for its model card
RECIPES = {
    "limner": "limner's defaults (not the paper's settings; `limner methods METHOD` lists both)",
    "paper": "the paper's, as its official code or diffusers' example trains it (`--set recipe=paper`)",
}


def write_model_card(folder: Path, manifest: dict, samples: list[str] | None = None) -> None:
    recipe = manifest.get("config", {}).get("recipe")
    lines = [
        f"# {manifest.get('subject', folder.name)} ({manifest['method']})",
        "",
        f"A limner concept: `{manifest['method']}` personalization of a *{manifest.get('class_noun', '?')}*.",
        "",
        f"- base: `{manifest.get('base_path')}` (fingerprint `{manifest.get('base_fingerprint')}`)",
        f"- tokens: {', '.join(f'`{t}`' for t in manifest.get('tokens', [])) or '—'}",
        f"- steps: {manifest.get('steps')}, training time: {manifest.get('seconds', '?')} s",
        *([f"- recipe: {RECIPES.get(recipe, recipe)}"] if recipe else []),
        *([f"- trains: {manifest['trains']}"] if manifest.get("trains") else []),
        "",
        "Use it:",
        "",
        "```bash",
        f'limner generate "{manifest.get("example_prompt", "a photo of it")}" --concept {folder}',
        "```",
    ]
    for s in samples or []:
        lines.append(f"![sample]({s})")
    # renamed into place like the weights, so an interrupted rewrite leaves the previous card whole
    write_text_atomic(folder / "README.md", "\n".join(lines) + "\n")
