"""What an evaluation runs: its settings and rows (reference bounds, methods to personalize with,
concept folders to score), and the prompts they are drawn and scored with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from limner.errors import LimnerError
from limner.evaluation.subjects import EvalSubject
from limner.generation import SCHEDULERS
from limner.methods import get_method, parse_setting, split_settings
from limner.values import bounds, parse_fields

LOWER, UPPER = "lower-bound", "upper-bound"
DESCRIBED = "described"  # the base given the subject told in words (world objects): how far words alone reach
FIDELITY_THRESHOLD = 0.5  # "time to reach subject fidelity 0.5" in reports and bench


@dataclass
class EvalSettings:
    images_per_prompt: int = field(default=4, metadata=bounds(at_least=1, flag="-n/--images-per-prompt"))
    seed: int = field(default=0, metadata=bounds(at_least=0, flag="--seed"))
    steps: int = field(default=25, metadata=bounds(at_least=1, flag="--steps"))
    guidance: float = field(default=5.0, metadata=bounds(at_least=0, flag="--guidance"))
    scheduler: str = field(default="dpm++", metadata=bounds(choices=tuple(SCHEDULERS), flag="--scheduler"))
    # fewer prompts per subject, for quick runs
    max_prompts: int | None = field(default=None, metadata=bounds(at_least=1, flag="--prompts"))
    # a concept's first steps follow the class prompt; None: each method's default
    layout_steps: int | None = field(default=None, metadata=bounds(at_least=0, flag="--layout-steps"))

    def __post_init__(self) -> None:
        parse_fields(self)  # before any concept is trained or image drawn
        if self.layout_steps is not None and self.layout_steps >= self.steps:
            raise LimnerError(
                f"--layout-steps {self.layout_steps} must be between 0 and --steps - 1 ({self.steps - 1})"
            )


@dataclass(frozen=True)
class Row:
    """One line of the results table: a reference bound, a method to personalize with, or an
    existing concept folder to score."""

    name: str
    method: str | None = None
    concept: Path | None = None
    config: tuple[tuple[str, object], ...] = ()  # method settings, e.g. (("prior_preservation", "none"),)

    @classmethod
    def parse(cls, spec: str) -> Row:
        """'lower-bound', 'upper-bound', 'described', 'METHOD' or 'METHOD:key=value,key=value'."""
        if spec in (LOWER, UPPER, DESCRIBED):
            return cls(spec)
        method, _, settings = spec.partition(":")
        config = [parse_setting(item, f"--method {spec}") for item in split_settings(settings, f"--method {spec}")]
        return cls(spec, method=method, config=tuple(config))

    @classmethod
    def for_concept(cls, folder: Path) -> Row:
        from limner.concepts import read_manifest

        manifest = read_manifest(folder)
        if "method" not in manifest:
            raise LimnerError(f"--concept {folder}: limner.json names no method")
        return cls(f"{manifest['method']}:{folder.name}", method=manifest["method"], concept=folder)

    @property
    def draws_drift(self) -> bool:
        """Whether the row also draws the class prompt alone (language drift): not the renders, nor the words."""
        return self.name not in (UPPER, DESCRIBED)

    def subjects(self, subjects: list[EvalSubject]) -> list[EvalSubject]:
        """A concept folder belongs to one subject: the one its manifest names (or the only one given)."""
        untold = [s.name for s in subjects if s.kind != "object" or s.world is None] if self.name == DESCRIBED else []
        if untold:
            raise LimnerError(
                f"--method {DESCRIBED} tells a subject in the words the world's captions use for objects, which "
                f"{', '.join(untold)} cannot be told in: pass --subjects world:objects (or world object names)"
            )
        if self.concept is None:
            return subjects
        from limner.concepts import read_manifest

        name = read_manifest(self.concept).get("subject")
        mine = [s for s in subjects if s.name == name]
        if not mine and len(subjects) == 1:
            return subjects
        if not mine:
            raise LimnerError(
                f"--concept {self.concept} was trained on subject {name!r}, which is not among --subjects "
                f"({', '.join(s.name for s in subjects)}); pass --subjects with that subject"
            )
        return mine


@dataclass
class RowResult:
    row: str
    per_subject: dict[str, dict[str, float]] = field(default_factory=dict)
    images: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # subject -> prompt -> image paths
    concepts: dict[str, dict] = field(default_factory=dict)  # subject -> concept manifest (methods only)
    seconds: dict[str, float] = field(default_factory=dict)
    layout_steps: int = 0  # of each concept's first denoising steps, drawn from the class prompt


def layout_steps_of(row: Row, settings: EvalSettings, manifest: dict | None = None) -> int:
    """How many of a row's first denoising steps follow the class prompt: the setting, or the concept's
    default (its manifest's, where given; else its method's)."""
    if row.method is None:
        return 0
    if settings.layout_steps is not None:
        return settings.layout_steps
    return get_method(row.method).layout_steps(settings.steps, manifest)


def class_prompt(template: str, subject: EvalSubject) -> str:
    """The prompt with the subject replaced by its class noun: the lower bound's prompt, and the
    text that CLIP-T compares against (as in DreamBench)."""
    return template.format(subject.class_noun)
