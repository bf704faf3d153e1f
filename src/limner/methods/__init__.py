"""The extension point for personalization methods.

Data flows one way: reference images -> Subject -> Method (train or encode) -> concept folder ->
generation (the method installs the concept into a pipeline through attention processors, adapters or
new tokens) -> images -> evaluation. A method is one module in this package that subclasses `Method`
and registers itself with `@register`; the CLI, `limner generate --concept` and `limner eval` find it
through `get_method`, so adding a method changes nothing else. A setting added to an existing method
is declared with `added_setting(default)` (or defaults to None), so that concepts eval cached before it
existed are found again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

FAMILIES = ("tuning", "encoder", "identity")
KEY_NEUTRAL = "key_neutral"  # dataclass field metadata: the value at which a setting stays out of eval's cache key


def added_setting(default):
    """The dataclass field of a setting added after concepts were cached: at `default`, which must do what
    the method did before the setting existed, eval's cache key leaves it out, so those concepts are found
    again. (A setting whose default is None is left out at None anyway.)"""
    return field(default=default, metadata={KEY_NEUTRAL: default})


@dataclass
class Subject:
    """What a user personalizes on: a few reference images of one subject and its class noun."""

    name: str
    class_noun: str  # "dog", "man": the coarse word the subject belongs to
    images: list[np.ndarray]  # uint8 [H, W, 3]
    masks: list[np.ndarray] | None = None  # bool [H, W], where the subject is (optional)
    meta: dict = field(default_factory=dict)
    # per image, what the picture shows besides the subject ("on the beach"): appended to the training
    # prompt, so the identifier learns the subject and not its backgrounds (optional)
    captions: list[str] | None = None


class Method(ABC):
    """One personalization method, named as in its paper.

    `personalize` turns a Subject into a concept folder (weights in the method's interoperable
    formats + limner.json); `apply` installs a concept into a loaded base so that generation uses it;
    `prompt` turns a bench prompt template ("a {} on the beach") into this method's prompt.
    """

    name: ClassVar[str]
    family: ClassVar[str]  # one of FAMILIES
    token_setting: ClassVar[str | None] = None  # the setting `limner train --token` sets, if any
    # share of the denoising steps drawn, by default, from the prompt with the class noun in place of the
    # concept's token before the concept's own prompt takes over (GenerationSettings.layout_steps)
    layout_fraction: ClassVar[float] = 0.0

    @abstractmethod
    def personalize(self, base, subject: Subject, out: Path, **config) -> Path: ...

    @abstractmethod
    def apply(self, base, concept: Path) -> None: ...

    @abstractmethod
    def prompt(self, template: str, concept: Path) -> str: ...

    def layout_steps(self, steps: int) -> int:
        """How many of `steps` denoising steps follow the class prompt by default."""
        return round(self.layout_fraction * steps)

    def default_train_config(self):
        """The method's default limner.training.TrainConfig; None for methods that do not train."""
        return None

    def default_config(self):
        """The method's settings dataclass with its defaults; None for a method without settings."""
        return None

    def default_settings(self) -> dict:
        """Every default that shapes a concept (method and training settings): part of eval's cache
        key, so changing a default never reuses a concept trained under the old one."""
        from dataclasses import asdict

        cfg, train = self.default_config(), self.default_train_config()
        if cfg is None:
            return {"train": asdict(train) if train is not None else None}
        if getattr(cfg, "train", None) is None:
            cfg.train = train
        return asdict(cfg)

    def settings_with(self, overrides: dict) -> dict:
        """default_settings() with `overrides` (method and training settings in one flat dict, as on the
        command line) applied: a run whose settings come out equal to a later default is the same run."""
        from dataclasses import fields

        from limner.training import TrainConfig

        settings, cfg = self.default_settings(), self.default_config()
        train_fields = fields(TrainConfig)
        train_names = {f.name for f in train_fields}
        train = settings["train"] if isinstance(settings.get("train"), dict) else settings
        # "5" on the command line reads as an int; a float setting keeps it as 5.0, as its default would be
        floats = {f.name for f in train_fields + (fields(cfg) if cfg is not None else ()) if "float" in str(f.type)}
        for key, value in overrides.items():
            (train if key in train_names else settings)[key] = float(value) if key in floats and type(value) is int else value
        return settings

    def reads_masks(self, overrides: dict) -> bool:
        """Whether a run with these settings reads the subject's masks (then they are part of the
        subject's cache key)."""
        return False

    def key_settings(self, overrides: dict) -> dict:
        """settings_with(overrides) less what cannot have changed a concept trained before the setting
        existed: unset (None) settings, and `added_setting`s at their default. Eval's cache key."""
        from dataclasses import fields

        from limner.training import TrainConfig

        cfg = self.default_config()
        declared = fields(TrainConfig) + (fields(cfg) if cfg is not None else ())
        neutral = {f.name: f.metadata[KEY_NEUTRAL] for f in declared if KEY_NEUTRAL in f.metadata}

        def keyed(settings: dict) -> dict:
            return {k: keyed(v) if isinstance(v, dict) else v for k, v in settings.items()
                    if v is not None and not (k in neutral and v == neutral[k])}

        return keyed(self.settings_with(overrides))


REGISTRY: dict[str, type[Method]] = {}
BUILTIN = ("textual_inversion", "dreambooth", "custom_diffusion")  # modules of this package that define methods


def parse_setting(item: str, where: str) -> tuple[str, object]:
    """'key=value' -> (key, value), the value read as int, float or bool where it looks like one."""
    from limner.errors import LimnerError

    key, eq, text = item.partition("=")
    if not eq or not key.strip():
        raise LimnerError(f"{where}: settings are key=value pairs (e.g. prior_preservation=none), got {item!r}")
    text = text.strip()
    for cast in (int, float):
        try:
            return key.strip(), cast(text)
        except ValueError:
            pass
    return key.strip(), {"true": True, "false": False}.get(text.lower(), text)


def with_settings(config, overrides: dict, method: str):
    """The method's config dataclass with `overrides` applied; an unknown key is an error naming it."""
    from dataclasses import fields, replace

    from limner.errors import LimnerError

    known = {f.name for f in fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise LimnerError(f"{method} has no setting {', '.join(map(repr, unknown))}; its settings: {', '.join(sorted(known))}")
    return replace(config, **overrides)


def register(cls: type[Method]) -> type[Method]:
    if cls.family not in FAMILIES:
        raise ValueError(f"{cls.__name__}.family must be one of {FAMILIES}")
    REGISTRY[cls.name] = cls
    return cls


def load_builtin_methods() -> None:
    import importlib

    for module in BUILTIN:
        importlib.import_module(f"limner.methods.{module}")


def get_method(name: str) -> Method:
    from limner.errors import LimnerError

    load_builtin_methods()
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY)) or "none yet"
        raise LimnerError(f"unknown method {name!r}; available: {known}")
    return REGISTRY[name]()
