"""The contract every personalization method keeps.

Data flows one way: reference images -> `Subject` -> `Method` (train, or encode with a pretrained
adapter) -> concept folder -> `install` into a loaded base -> a `Conditioning` per generation
(limner.generation defines it: what generation takes besides the prompt) -> images -> evaluation. A
method declares what it can do (`Capabilities`) rather than being probed for it, and owns how its
concepts compose: `install` takes all of its concepts of one generation at once (Custom Diffusion merges
them, LoRAs become named peft adapters) and returns an `Installation` that undoes itself, so evaluation
need not reload the base after every concept.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from limner.generation import Conditioning
from limner.regions import WindowHook, prompt_names
from limner.subject import Subject

if TYPE_CHECKING:
    from limner.models.loading import Base
    from limner.training import TrainConfig

Family = Literal["tuning", "encoder", "identity"]
FAMILIES: tuple[Family, ...] = ("tuning", "encoder", "identity")
Score = Callable[[list], float]  # images -> a number, logged against training time (e.g. the world's subject probe)


@dataclass(frozen=True)
class Capabilities:
    """What a method can do, declared (as peft declares `is_mixed_compatible`), never probed."""

    joint: bool = False  # trains several subjects together into one concept, a token each
    regional: bool = False  # with --regions, acts only in the windows whose prompt names its token
    reads_masks: bool = False  # some setting makes it read the subject's masks (see Method.reads_masks)
    needs_faces: bool = False  # references must show a face (identity methods)
    needs_adapter: bool = False  # personalizing encodes with a pretrained adapter (encoder and identity methods)


@dataclass
class Installation:
    """What installing concepts into a base did: an optional hook that switches weights per region
    window, and the steps that undo the installation, run last to first."""

    before_window: WindowHook | None = None
    undo: list[Callable[[], None]] = field(default_factory=list)

    def uninstall(self) -> None:
        while self.undo:
            self.undo.pop()()


class Method(ABC):
    """One personalization method, named as in its paper."""

    name: ClassVar[str]
    family: ClassVar[Family]
    capabilities: ClassVar[Capabilities] = Capabilities()
    config_cls: ClassVar[type | None] = None  # the settings dataclass (fields carry their help text)
    token_setting: ClassVar[str | None] = None  # the setting `limner train --token` sets, if any
    # concepts of several methods that one `install` call composes (DreamBooth and DreamBooth LoRA): their group
    install_group: ClassVar[str | None] = None
    installs_first: ClassVar[bool] = False  # it may replace whole models, so the other methods install onto them
    # share of the denoising steps drawn, by default, from the prompt with the class noun in place of the
    # concept's token before the concept's own prompt takes over
    layout_fraction: ClassVar[float] = 0.0
    # its concepts act on every prompt through the prompt embeddings, named by no word of it (BLIP-Diffusion's
    # subject embeddings): their layout steps draw from the prompt's words alone
    acts_on_every_prompt: ClassVar[bool] = False

    @abstractmethod
    def personalize(
        self, base: Base, subject: Subject | list[Subject], out: Path, *, score: Score | None = None, **overrides: Any
    ) -> Path:
        """Writes a concept folder for the subject (several, where `capabilities.joint`); returns it.

        A tuning method trains on `base` itself (new tokens, LoRA adapters, a fine-tuned UNet stay in it): load
        a fresh base to draw with the concept, as `limner train`, `eval` and `demo` do."""

    @abstractmethod
    def install(self, base: Base, concepts: list[Path], regions: list[str] | None = None) -> Installation:
        """Installs every concept of this method for the generations to come, composing them; with
        regional prompts, the returned installation's hook switches weights per window."""

    def condition(self, base: Base, concepts: list[Path], prompt: str) -> dict[str, Any]:
        """Per-call pipeline arguments for one prompt (tuning methods need none: their concepts live in
        the installed weights and tokens)."""
        return {}

    @abstractmethod
    def prompt(self, template: str, concept: Path) -> str:
        """A bench prompt template ("a {} on the beach") with this concept's words in place of the subject."""

    def acts_in(self, manifest: dict, region_prompt: str) -> bool:
        """Whether a concept acts in a region window with this prompt: where the prompt names one of its tokens."""
        return prompt_names(region_prompt, manifest.get("tokens", []))

    def layout_steps(self, steps: int, manifest: dict | None = None) -> int:
        """How many of `steps` denoising steps follow the class prompt by default: the concept's own
        `layout_fraction` setting where its manifest records one, else the method's."""
        fraction = (manifest or {}).get("config", {}).get("layout_fraction", self.layout_fraction)
        return round(fraction * steps)

    def class_prompt(self, prompt: str, manifest: dict) -> str:
        """The prompt with this concept's words in it replaced by class words: what the layout steps draw from.
        By default its token becomes its class noun ("a sks dog" and "a <s*>" alike become "a dog")."""
        token, noun = manifest.get("token"), manifest.get("class_noun")
        if not token or not noun or token not in prompt:
            return prompt
        return prompt.replace(f"{token} {noun}", noun).replace(token, noun)

    def default_config(self) -> Any:
        """The method's settings dataclass with its defaults; None for a method without settings."""
        return self.config_cls() if self.config_cls is not None else None

    def default_train_config(self, num_subjects: int = 1) -> TrainConfig | None:
        """The trainer's defaults for this method (`num_subjects` trained jointly); None if it does not train."""
        return None

    def recipes(self, num_subjects: int = 1) -> dict[str, dict[str, Any]]:
        """Named sets of settings besides limner's defaults (`--set recipe=paper`): name -> flat settings,
        method and trainer settings alike, for `num_subjects` trained jointly."""
        return {}

    def reads_masks(self, overrides: dict) -> bool:
        """Whether a run with these settings reads the subject's masks."""
        return False

    def key_inputs(self, overrides: dict) -> dict:
        """What else shaped a concept besides settings, subject and base (an adapter's fingerprint): part of
        eval's cache key."""
        return {}


def install_key(method: Method) -> str:
    """Methods whose concepts one `install` call composes share this key."""
    return method.install_group or method.name


__all__ = [
    "FAMILIES",
    "Capabilities",
    "Conditioning",
    "Family",
    "Installation",
    "Method",
    "Score",
    "WindowHook",
    "install_key",
]
