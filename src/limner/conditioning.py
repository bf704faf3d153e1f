"""The one path from concept folders to a generation.

`generate`, regional prompts, evaluation, the bench and the demo all apply concepts here, and nothing
here names a method: each concept's manifest names its method, and the method installs its own
concepts (composing several of its kind), says how a prompt is conditioned, and undoes itself.

    with apply_concepts(base, folders, regions) as applied:
        result = generate(base, settings, conditioning=applied.condition(settings.prompt, settings.steps))
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from limner.concepts import check_base, read_manifest
from limner.errors import LimnerError
from limner.io import pickles_allowed
from limner.methods import Conditioning, Installation, Method, WindowHook, get_method, install_key

if TYPE_CHECKING:
    from limner.models.loading import Base


class AppliedConcepts:
    """Concept folders installed into a loaded base for any number of generations. Concepts of one
    method install in one call, so they compose; a method that may replace whole models (a full
    DreamBooth UNet) installs first, so the others' weights go onto what it installed."""

    def __init__(
        self,
        base: Base,
        folders: list[Path],
        regions: list[str] | None = None,
        force: bool = False,
        allow_pickle: bool = False,
    ):
        self.base, self.regions = base, regions
        self.folders = [Path(f) for f in folders]
        self.manifests = [read_manifest(f) for f in self.folders]
        for folder, manifest in zip(self.folders, self.manifests):
            check_base(manifest, folder, base, force)
        check_distinct_tokens(self.folders, self.manifests)
        self.methods = [get_method(m["method"]) for m in self.manifests]
        self.groups = install_groups(self.methods, self.folders)
        self.installations: list[Installation] = []
        try:
            with pickles_allowed(allow_pickle):  # this call's --allow-pickle, never what a concept recorded
                for method, concepts in self.groups:
                    self.installations.append(method.install(base, concepts, regions))
        except BaseException:
            self.uninstall()
            raise

    def condition(self, prompt: str, steps: int, layout_steps: int | None = None) -> Conditioning:
        """What the concepts add to one generation of `prompt` in `steps` denoising steps.
        `layout_steps` overrides the methods' default number of steps laid out from the class prompt."""
        # regional prompts draw every window from its own prompt from the first step (no layout steps yet)
        layout, wanted = (
            (None, 0) if self.regions else layout_prompt(self.manifests, self.methods, prompt, steps, layout_steps)
        )
        kwargs: dict = {}
        for method, concepts in self.groups:
            kwargs |= method.condition(self.base, concepts, prompt)
        hooks = [i.before_window for i in self.installations if i.before_window is not None]
        return Conditioning(
            layout_prompt=layout,
            layout_steps=wanted,
            pipe_kwargs=kwargs,
            before_window=chain(hooks) if hooks else None,
            region_concepts=self.region_concepts(),
            concepts=self.recorded(),
        )

    def recorded(self) -> list[dict]:
        """For the record: each concept's folder, method, adapter and the settings it was made with, so that an
        image says what drew it (also for references encoded on the fly into a folder that is gone after)."""
        keys = ("method", "adapter", "config")
        return [{"folder": str(f)} | {k: m[k] for k in keys if k in m} for f, m, _ in self.ordered()]

    def region_concepts(self) -> list[list[str]] | None:
        """For the record: per region, the concepts acting in it (a concept that replaces the UNet acts in all)."""
        if not self.regions:
            return None
        return [[str(f) for f, m, method in self.ordered() if method.acts_in(m, p)] for p in self.regions]

    def ordered(self) -> list[tuple[Path, dict, Method]]:
        """The concepts in the order they were installed."""
        rank = {str(f): i for i, (_, concepts) in enumerate(self.groups) for f in concepts}
        return sorted(zip(self.folders, self.manifests, self.methods), key=lambda t: rank[str(t[0])])

    def uninstall(self) -> None:
        """Puts the base back as it was before, last installed first."""
        while self.installations:
            self.installations.pop().uninstall()

    def __enter__(self) -> AppliedConcepts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def check_distinct_tokens(folders: list[Path], manifests: list[dict]) -> None:
    """Two concepts with one token (two Textual Inversions both `<s*>`, two DreamBooth LoRAs both `sks`) cannot
    be told apart by a prompt: both would act wherever it is written. Refused, naming both, before anything is
    installed."""
    owner: dict[str, Path] = {}
    for folder, manifest in zip(folders, manifests):
        for token in dict.fromkeys(manifest.get("tokens") or ([manifest["token"]] if manifest.get("token") else [])):
            if token in owner and owner[token] != folder:
                raise LimnerError(
                    f"concepts {owner[token]} and {folder} both use the token {token!r}, so a prompt cannot tell them "
                    "apart; train one of them again with another --token (e.g. from its folder name)"
                )
            owner[token] = folder


def install_groups(methods: list[Method], folders: list[Path]) -> list[tuple[Method, list[Path]]]:
    """The concepts grouped by the method call that installs them, in the order they were given, the
    groups of methods that may replace whole models first."""
    groups: dict[str, tuple[Method, list[Path]]] = {}
    for method, folder in zip(methods, folders):
        groups.setdefault(install_key(method), (method, []))[1].append(folder)
    return sorted(groups.values(), key=lambda group: not group[0].installs_first)


def apply_concepts(
    base: Base,
    folders: list[Path],
    regions: list[str] | None = None,
    force: bool = False,
    allow_pickle: bool = False,
) -> AppliedConcepts:
    """Installs concept folders into a loaded base (see `AppliedConcepts`). Notes on what was done (a
    concept no region names) are warnings. `allow_pickle`: the command's --allow-pickle, for a pickled adapter
    a concept was encoded with."""
    return AppliedConcepts(base, folders, regions, force, allow_pickle)


def chain(hooks: list[WindowHook]) -> WindowHook:
    def before_window(i: int | None) -> None:
        for hook in hooks:
            hook(i)

    return before_window


def layout_prompt(
    manifests: list[dict], methods: list[Method], prompt: str, steps: int, layout_steps: int | None = None
) -> tuple[str | None, int]:
    """The prompt with each concept's token replaced by its class noun, and how many denoising steps follow
    it before the prompt itself takes over: `layout_steps`, or else the largest default among the methods of
    the concepts acting on the prompt (those it names, and those that act on every prompt). (None, 0) where
    nothing applies."""
    layout, wanted, acting = prompt, 0, False
    for manifest, method in zip(manifests, methods):
        words = method.class_prompt(layout, manifest)
        # the prompt names this concept in no words of its own (or an earlier one took them)
        if words == layout and not method.acts_on_every_prompt:
            continue
        layout, acting = words, True
        wanted = max(wanted, method.layout_steps(steps, manifest))
    if layout_steps is not None:
        if layout_steps and not acting:
            raise LimnerError(
                "--layout-steps: the prompt names no applied concept's token, so there is no class prompt to lay out "
                "from"
            )
        wanted = layout_steps
    return (layout, wanted) if wanted else (None, 0)


def concept_prompt(concept: Path, template: str) -> str:
    """A bench prompt template ("a {} on the beach") with the concept's words in place of the subject."""
    return get_method(read_manifest(concept)["method"]).prompt(template, concept)


__all__ = ["AppliedConcepts", "Conditioning", "apply_concepts", "concept_prompt", "layout_prompt"]
