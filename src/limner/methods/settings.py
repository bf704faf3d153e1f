"""Method settings: dataclasses whose fields carry their help text, as peft's configs do.

A method's settings are one dataclass (its `config_cls`), validated in `__post_init__`, so a bad
value fails where it is given, naming the setting. The trainer's settings (`TrainConfig`) ride in its
`train` field. On the command line both arrive as one flat list of `--set key=value` pairs, split
here, in one place.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, field, fields
from typing import Any

from limner.errors import LimnerError
from limner.training.config import split_train_settings
from limner.values import bounds, typed_replace

HELP = "help"
# the value at which a setting stays out of eval's cache key (limner.evaluation.cache_keys): a setting
# added after concepts were cached, whose default does what the method did before it existed
KEY_NEUTRAL = "key_neutral"


def setting(
    default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, added: bool = False, **declared: Any
) -> Field:
    """A settings field with its help text. `added=True` marks a setting added after concepts were
    cached: at its default, eval's cache key leaves it out, so those concepts are found again (a setting
    whose default is None is left out at None anyway). `declared` are the values it takes
    (`limner.values.bounds`: at_least=1, choices=(...), word=True), checked wherever it is set."""
    metadata = {HELP: help} | ({KEY_NEUTRAL: default} if added else {}) | bounds(**declared)
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def added_setting(default: Any) -> Field:
    """A setting added after concepts were cached (see `setting(added=True)`)."""
    return setting(default, added=True)


LIMNER_RECIPE = "limner"  # limner's own defaults: no recipe applied


def recipe_setting() -> Field:
    """The `recipe` field every tuning method's settings carry: which named set of defaults made a concept."""
    return setting(
        LIMNER_RECIPE,
        "limner: limner's defaults; paper: the paper's recipe as its official code (or diffusers' example) runs it "
        "(`limner methods NAME` lists what each recipe sets; settings given beside it win)",
        added=True,
    )


def with_recipe(method: Any, overrides: dict, num_subjects: int = 1) -> dict:
    """`overrides` with `recipe=NAME` expanded into that recipe's settings (method and trainer settings in one
    flat dict); a setting given explicitly wins over the recipe's. Unchanged without a recipe."""
    name = overrides.get("recipe", LIMNER_RECIPE)
    if name == LIMNER_RECIPE:
        return overrides
    recipes = method.recipes(num_subjects)
    if name not in recipes:
        raise LimnerError(f"--set recipe={name}: {method.name} has the recipes {', '.join([LIMNER_RECIPE, *recipes])}")
    return recipes[name] | overrides


def split_settings(text: str, where: str = "--method") -> list[str]:
    """'a=1,b={"up": 2, "down": 1}' -> ['a=1', 'b={"up": 2, "down": 1}']: split at the commas outside brackets and
    quotes, so a setting whose value is JSON (IP-Adapter's per-block scales) can sit in a `--method M:k=v,...` spec."""
    items, depth, quoted, start = [], 0, False, 0
    for i, char in enumerate(text):
        if char == '"':
            quoted = not quoted
        elif not quoted:
            depth += (char in "{[") - (char in "}]")
            if depth < 0:
                break
            if char == "," and depth == 0:
                items.append(text[start:i])
                start = i + 1
    if depth or quoted:
        raise LimnerError(f"{where}: unbalanced brackets or quotes in {text!r}")
    items.append(text[start:])
    return [item for item in items if item.strip()]


def parse_setting(item: str, where: str) -> tuple[str, object]:
    """'key=value' -> (key, value), the value read as int, float or bool where it is exactly one ("4", "0.5",
    "true"); any other text stays text ("1e-3", "no", "08"), for the setting's declared type to read
    (`with_settings`), so a word that looks like a number is not rewritten ("1e3" is not "1000.0")."""
    key, eq, text = item.partition("=")
    if not eq or not key.strip():
        raise LimnerError(f"{where}: settings are key=value pairs (e.g. prior_preservation=none), got {item!r}")
    text = text.strip()
    for cast in (int, float):
        try:
            value = cast(text)
        except ValueError:
            continue
        if str(value) == text:
            return key.strip(), value
    return key.strip(), {"true": True, "false": False}.get(text.lower(), text)


def with_settings(config: Any, overrides: dict, method: str) -> Any:
    """The method's config dataclass with `overrides` parsed to each setting's declared type, checked against
    its declared values and applied; an unknown key is an error naming it."""
    return typed_replace(config, overrides, method)


def describe(config_cls: type) -> list[tuple[str, Any, str]]:
    """(name, default, help) of every setting: what `limner train --method M --help-settings` shows."""
    rows = []
    for f in fields(config_cls):
        default = (
            f.default
            if f.default is not MISSING
            else (f.default_factory() if f.default_factory is not MISSING else None)
        )
        rows.append((f.name, default, f.metadata.get(HELP, "")))
    return rows


def command_line_settings(
    method: Any,
    items: list[str],
    num_subjects: int = 1,
    token: str | None = None,
    num_vectors: int | None = None,
    **trainer_options: Any,
) -> dict:
    """The overrides `limner train` passes to `personalize`: `--set` items (method and trainer settings in one
    list), `--token` and `--num-vectors`, and trainer options given as flags (`--steps`, `--lr`, ...), which
    win over `--set`; options left out (None) keep what `--set` or the defaults say."""
    overrides = dict(parse_setting(item, "--set") for item in items)
    if token is not None:
        if num_subjects > 1:
            raise LimnerError(
                f"--token: joint training names its {num_subjects} tokens <new1> to <new{num_subjects}> "
                "(one per subject, in --subject's order); leave --token out"
            )
        if method.token_setting is None:
            raise LimnerError(f"--token: {method.name} has no token or identifier to set")
        overrides[method.token_setting] = token
    if num_vectors is not None:
        overrides["num_vectors"] = num_vectors
    overrides = with_recipe(method, overrides, num_subjects)
    train = method.default_train_config(num_subjects)
    if train is not None:
        train, overrides = split_train_settings(train, overrides)
    config = method.default_config()
    if config is not None:  # every method setting checked now, before a base loads or anything is written
        with_settings(config, overrides, method.name)
    if train is not None:
        given = {k: v for k, v in trainer_options.items() if v is not None}
        overrides["train"] = typed_replace(train, given, method.name)
    return overrides
