"""Methods register themselves by name; the command line, generation and evaluation find them here.

A new method is one module that subclasses `Method` (or `TuningMethod`) and decorates it with
`@register`: nothing else in limner changes. Built-in modules are imported on first lookup.
"""

from __future__ import annotations

import importlib

from limner.errors import LimnerError
from limner.methods.base import FAMILIES, Method

REGISTRY: dict[str, type[Method]] = {}
# modules of limner.methods that define methods
BUILTIN = (
    "textual_inversion",
    "dreambooth",
    "custom_diffusion",
    "ip_adapter",
    "fastcomposer",
    "blip_diffusion",
    "photomaker",
    "instantid",
    "storymaker",
)


def register(cls: type[Method]) -> type[Method]:
    if cls.family not in FAMILIES:
        raise ValueError(f"{cls.__name__}.family must be one of {FAMILIES}")
    REGISTRY[cls.name] = cls
    return cls


def load_builtin_methods() -> None:
    for module in BUILTIN:
        importlib.import_module(f"limner.methods.{module}")


def get_method(name: str) -> Method:
    load_builtin_methods()
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY)) or "none yet"
        raise LimnerError(f"unknown method {name!r}; available: {known}")
    return REGISTRY[name]()


def method_names() -> list[str]:
    load_builtin_methods()
    return sorted(REGISTRY)
