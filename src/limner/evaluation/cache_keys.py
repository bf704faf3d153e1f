"""Eval's cache key of a trained concept: everything that shaped it, however it was given.

A concept is trained once per (method, settings, subject, base) and reused afterwards. The settings
part is the method's defaults with the run's overrides applied, so a run whose settings equal a later
default is the same run, and changing a default never reuses a concept trained under the old one. A
setting added later is left out at its neutral value (`limner.methods.settings.setting(added=True)`,
or None), so the concepts trained before it existed are found again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields
from typing import Any

from limner.methods import Method
from limner.methods.settings import KEY_NEUTRAL, with_recipe
from limner.training import TrainConfig
from limner.values import parse_value


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def default_settings(method: Method) -> dict:
    """Every default that shapes a concept (method and training settings)."""
    cfg, train = method.default_config(), method.default_train_config()
    if cfg is None:
        return {"train": asdict(train) if train is not None else None}
    if getattr(cfg, "train", None) is None:
        cfg.train = train
    return asdict(cfg)


def settings_with(method: Method, overrides: dict) -> dict:
    """default_settings() with `overrides` (method and training settings in one flat dict, as on the
    command line) applied."""
    overrides = with_recipe(method, overrides)
    settings, cfg = default_settings(method), method.default_config()
    train_fields = fields(TrainConfig)
    train_names = {f.name for f in train_fields}
    train = settings["train"] if isinstance(settings.get("train"), dict) else settings
    # each value as its setting's declared type, so "5" and 5.0 for a float setting (or "1e-3" and 0.001) are one key
    declared = {f.name: f for f in train_fields + (fields(cfg) if cfg is not None else ())}
    for key, value in overrides.items():
        (train if key in train_names else settings)[key] = (
            parse_value(declared[key], value) if key in declared else value
        )
    return settings


def key_settings(method: Method, overrides: dict) -> dict:
    """settings_with(overrides) less what cannot have changed a concept trained before the setting
    existed: unset (None) settings, and added settings at their neutral value."""
    cfg = method.default_config()
    declared = fields(TrainConfig) + (fields(cfg) if cfg is not None else ())
    neutral = {f.name: f.metadata[KEY_NEUTRAL] for f in declared if KEY_NEUTRAL in f.metadata}

    def keyed(settings: dict) -> dict:
        return {
            k: keyed(v) if isinstance(v, dict) else v
            for k, v in settings.items()
            if v is not None and not (k in neutral and v == neutral[k])
        }

    return keyed(settings_with(method, overrides))


def concept_key(method: Method, config: dict, subject_fingerprint: str, base_fingerprint: str) -> str:
    """A trained concept's cache key (see the module docstring)."""
    key = {
        "method": method.name,
        "settings": key_settings(method, config),
        "subject": subject_fingerprint,
        "base": base_fingerprint,
    }
    inputs = method.key_inputs(config)
    return digest(
        key | ({"inputs": inputs} if inputs else {})
    )  # keys of methods without other inputs stay as they were
