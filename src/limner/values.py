"""Settings as a user gives them, checked before any work starts.

Every settings dataclass (a method's, the trainer's, generation's) declares each field's type and, in the
field's metadata, its bounds (`bounds(at_least=1)`), the flag that also sets it and whether it is a word
that may end up in a file name. `typed_replace` parses what the user gave (text from `--set key=value`, or
values from the Python API) to the declared type and checks it against those bounds; `check_fields` checks a
dataclass built directly. One place, so `--set flip=no` is False (not a non-empty string), `lora_rank=abc`
and `--steps -5` are refused with the setting's name, and no command keeps checks of its own.
"""

from __future__ import annotations

import math
import numbers
import unicodedata
from dataclasses import Field, fields, replace
from typing import Any

from limner.errors import LimnerError

BOUNDS = "bounds"  # field metadata: {"at_least": x, "above": x, "at_most": x, "below": x}
CHOICES = "choices"  # field metadata: the only values a text setting takes
FLAG = "flag"  # field metadata: the command-line flag that also sets the field, named in messages
WORD = "word"  # field metadata: the value is a prompt word that may name a file (checked by check_word)
TRUE, FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
NONE = {"none", "null"}
MAX_WORD = 100  # characters: a token or class noun ends up in file and folder names, which filesystems cap at 255


def bounds(
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    choices: tuple[str, ...] | None = None,
    flag: str | None = None,
    word: bool = False,
) -> dict:
    """Field metadata declaring what values a setting takes (see the module docstring)."""
    given = dict(at_least=at_least, above=above, at_most=at_most, below=below)
    limits = {k: v for k, v in given.items() if v is not None}
    return (
        ({BOUNDS: limits} if limits else {})
        | ({CHOICES: tuple(choices)} if choices else {})
        | ({FLAG: flag} if flag else {})
        | ({WORD: True} if word else {})
    )


def label(f: Field) -> str:
    """A setting as messages name it: `max_steps (--steps)`."""
    return f"{f.name} ({f.metadata[FLAG]})" if FLAG in f.metadata else f.name


def declared_types(f: Field) -> tuple[list[str], bool]:
    """(the scalar type names a field declares, whether it takes None), from the annotation text that
    `from __future__ import annotations` leaves (`"int | None"`) or a type itself."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    parts = [p.strip() for p in text.replace("Optional[", "").rstrip("]").split("|")]
    return [p for p in parts if p != "None"], "None" in parts or "Optional[" in text


def parse_value(f: Field, value: Any) -> Any:
    """`value` as the field's declared type: text parsed ("no" -> False, "4" -> 4, "none" -> None), an int
    for a float field made a float. A type the parser does not know (a dict, another dataclass) is left to
    the dataclass's own checks."""
    types, optional = declared_types(f)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in NONE):
        if optional:
            return None
        raise LimnerError(f"{label(f)}: give a value; this setting cannot be none")
    for name in types:
        parsed = _as(name, value)
        if parsed is not _NO:
            return parsed
    if any(name not in SCALARS for name in types):
        return value  # e.g. `float | dict`: a dict (or its JSON text) is the dataclass's to read
    raise LimnerError(f"{label(f)}={value!r}: {SCALARS[types[0]]}{' or none' if optional else ''}")


_NO = object()
SCALARS = {
    "bool": "give true or false (yes/no, on/off and 1/0 work too)",
    "int": "give a whole number",
    "float": "give a finite number",
    "str": "give text",
}


def _as(name: str, value: Any) -> Any:
    """`value` as the scalar type `name`, or _NO where it is not one. Numbers of any kind (numpy's too)
    count; a bool is not a number here, as `--set steps=true` is a mistake."""
    text = value.strip() if isinstance(value, str) else None
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if name == "bool":
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in TRUE | FALSE:
            return text.lower() in TRUE
        return bool(value) if number and value in (0, 1) else _NO
    if name == "int":
        if number:
            return int(value) if float(value).is_integer() else _NO
        return _parsed(int, text)
    if name == "float":
        parsed = float(value) if number else _parsed(float, text)
        return parsed if parsed is _NO or math.isfinite(parsed) else _NO
    if name == "str":  # a word that reads as a number ("123") is still the word
        whole = number and isinstance(value, numbers.Integral)
        return value if isinstance(value, str) else str(value) if whole else _NO
    return _NO


def _parsed(cast: type, text: str | None) -> Any:
    try:
        return cast(text) if text is not None else _NO
    except ValueError:
        return _NO


def check_value(f: Field, value: Any) -> None:
    """A parsed value against the field's declared bounds (and, for a word, check_word)."""
    if value is None:
        return
    if f.metadata.get(WORD):
        check_word(value, label(f))
    if CHOICES in f.metadata and value not in f.metadata[CHOICES]:
        raise LimnerError(f"{label(f)}={value!r}: use one of {', '.join(f.metadata[CHOICES])}")
    limits = f.metadata.get(BOUNDS, {})
    if not limits or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise LimnerError(f"{label(f)}={value}: give a finite number")
    tests = {
        "at_least": (lambda lim: value >= lim, "at least"),
        "above": (lambda lim: value > lim, "more than"),
        "at_most": (lambda lim: value <= lim, "at most"),
        "below": (lambda lim: value < lim, "less than"),
    }
    for key, lim in limits.items():
        ok, words = tests[key]
        if not ok(lim):
            raise LimnerError(f"{label(f)}={value}: must be {words} {lim:g}")


def typed_replace(config: Any, overrides: dict, owner: str) -> Any:
    """`config` (a dataclass) with `overrides` parsed to their declared types, checked, and applied; a key
    that names no field is an error listing the fields (`owner`: whose settings, for the message)."""
    declared = {f.name: f for f in fields(config)}
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        raise LimnerError(
            f"{owner} has no setting {', '.join(map(repr, unknown))}; its settings: {', '.join(sorted(declared))} "
            f"(`limner methods {owner}` explains each)"
        )
    parsed = {k: parse_value(declared[k], v) for k, v in overrides.items()}
    for k, v in parsed.items():
        check_value(declared[k], v)
    return replace(config, **parsed)


def parse_fields(config: Any) -> None:
    """Every field of a dataclass built directly (not through typed_replace) parsed to its declared type, in
    place, and checked against its bounds: for a settings dataclass's `__post_init__`."""
    for f in fields(config):
        value = parse_value(f, getattr(config, f.name))
        check_value(f, value)
        setattr(config, f.name, value)


def check_word(text: Any, what: str, *, phrase: bool = False) -> str:
    """A user's token, identifier or class noun: it goes into prompts and into file and folder names (a
    Custom Diffusion token's embedding file, the class images' cache folder), so it must be a word and
    never a path: not empty, no path separator or control character, no whitespace inside a token (a
    `phrase`, such as the class noun "teddy bear", may hold single spaces), at most MAX_WORD characters."""
    if not isinstance(text, str) or not text.strip():
        raise LimnerError(f"{what}: give a word (it is empty)")
    bad = sorted({c for c in text if c in "/\\" or unicodedata.category(c).startswith("C")})
    if bad:
        raise LimnerError(
            f"{what} {text!r}: a word may not hold {', '.join(map(repr, bad))} (it names files); choose another"
        )
    if text != text.strip() or (not phrase and any(c.isspace() for c in text)):
        kind = "a phrase without leading or trailing spaces" if phrase else "one word without spaces"
        raise LimnerError(f"{what} {text!r}: give {kind}")
    if len(text) > MAX_WORD:
        raise LimnerError(f"{what}: {len(text)} characters; give at most {MAX_WORD}")
    return text
