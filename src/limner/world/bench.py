"""The world bench: held-out subjects and identities (defined in heldout.py), their reference images
and prompt lists.

None of these appear in the base models' training data: object subjects are two-tone bodies with an
emblem, combinations of colours and emblem that no training instance comes close to (the base sees
other two-tone instances, see scenes.near_heldout_subject), and identities are parameter
combinations the training sampler excludes. Everything is seeded, so the 5 reference images
of a subject are the same on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from limner.world import vocab
from limner.world.heldout import IDENTITIES, SUBJECTS, BenchIdentity, heldout_identity_keys
from limner.world.render import CharacterSpec, ObjectSpec, Render, Scene, Subject, render
from limner.world.scenes import object_phrase, random_character

# the held-out data live in heldout.py (scenes.py needs them too); importable from here as before
__all__ = [
    "IDENTITIES",
    "REFERENCE_COUNT",
    "SUBJECTS",
    "BenchIdentity",
    "BenchPrompt",
    "described_prompt",
    "heldout_identity_keys",
    "identity_by_name",
    "identity_character",
    "identity_prompts",
    "identity_references",
    "object_prompts",
    "subject_by_name",
    "subject_object",
    "subject_references",
]


def subject_by_name(name: str) -> Subject:
    for s in SUBJECTS:
        if s.name == name:
            return s
    raise KeyError(f"unknown world subject {name!r}; known: {', '.join(s.name for s in SUBJECTS)}")


def identity_by_name(name: str) -> BenchIdentity:
    for b in IDENTITIES:
        if b.name == name:
            return b
    raise KeyError(f"unknown world identity {name!r}; known: {', '.join(b.name for b in IDENTITIES)}")


# --------------------------------------------------------------------------------------------
# Reference images: 5 per subject, varied pose, scale and context
# --------------------------------------------------------------------------------------------

REFERENCE_COUNT = 5


def subject_object(subject: Subject, rng: np.random.Generator, x: float = 0.5, scale=(0.26, 0.4)) -> ObjectSpec:
    return ObjectSpec(
        cls=subject.cls,
        colour=subject.colour_a,
        x=x + rng.uniform(-0.06, 0.06),
        y=rng.uniform(0.5, 0.62),
        scale=rng.uniform(*scale),
        rotation=rng.uniform(-20, 20),
        subject=subject,
    )


def identity_character(b: BenchIdentity, rng: np.random.Generator, framing: str = "portrait") -> CharacterSpec:
    return random_character(rng, 0.5, framing, set(), identity=b.identity, cls=b.cls)


def subject_references(subject: Subject, count: int = REFERENCE_COUNT, seed: int = 0) -> list[Render]:
    rng = np.random.default_rng([seed, SUBJECTS.index(subject)])
    contexts = rng.permutation(list(vocab.CONTEXTS))[:count]
    refs = []
    for ctx in contexts:
        spec = subject_object(subject, rng)
        scene = Scene(
            str(ctx), [spec], variant=int(rng.integers(2**31)), caption=f"a {subject.cls} {vocab.CONTEXTS[ctx]}"
        )
        refs.append(render(scene))
    return refs


def identity_references(b: BenchIdentity, count: int = REFERENCE_COUNT, seed: int = 0) -> list[Render]:
    rng = np.random.default_rng([seed, 100 + IDENTITIES.index(b)])
    contexts = rng.permutation(list(vocab.CONTEXTS))[:count]
    refs = []
    for ctx in contexts:
        spec = identity_character(b, rng)
        spec.identity_name = b.name
        scene = Scene(
            str(ctx),
            [spec],
            variant=int(rng.integers(2**31)),
            caption=f"a portrait of a {b.cls} {vocab.CONTEXTS[ctx]}",
        )
        refs.append(render(scene))
    return refs


# --------------------------------------------------------------------------------------------
# Prompt lists in the style of DreamBench: recontextualisation, accessorisation, property change.
# "{}" stands for the subject's noun phrase ("ball" for the class, "sks ball" for DreamBooth, ...).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchPrompt:
    template: str
    kind: str  # recontextualisation | accessorisation | property
    context: str | None = None  # the context the prompt asks for, if any
    colour: str | None = None  # the colour the prompt asks for (property change), if any
    accessory: str | None = None


def described_prompt(subject: Subject, prompt: BenchPrompt) -> str:
    """The prompt with the subject told in the words the base was trained on ('a red and white ball with a
    blue heart on the beach'): its two colours (or the one the prompt asks for), its emblem and the emblem's
    colour, then the accessory and context, in the order of the world's own captions. Which way the colours
    split has no words in those captions, so this is as much of the subject as words can give the base."""
    if prompt.colour:  # recoloured all over, as the upper bound renders it
        subject = replace(subject, colour_a=prompt.colour, colour_b=prompt.colour)
    phrase = object_phrase(ObjectSpec(subject.cls, subject.colour_a, accessory=prompt.accessory, subject=subject))
    return f"{phrase} {vocab.CONTEXTS[prompt.context]}" if prompt.context else phrase


def object_prompts() -> list[BenchPrompt]:
    prompts = [
        BenchPrompt("a {} " + phrase, "recontextualisation", context=ctx) for ctx, phrase in vocab.CONTEXTS.items()
    ]
    for acc, ctx in (("hat", "beach"), ("bow", "snow"), ("hat", "city"), ("bow", "room")):
        prompts.append(
            BenchPrompt(f"a {{}} with a {acc} {vocab.CONTEXTS[ctx]}", "accessorisation", context=ctx, accessory=acc)
        )
    for colour, ctx in (("red", "grass"), ("blue", "desert"), ("green", "night"), ("yellow", "underwater")):
        prompts.append(BenchPrompt(f"a {colour} {{}} {vocab.CONTEXTS[ctx]}", "property", context=ctx, colour=colour))
    return prompts


def identity_prompts() -> list[BenchPrompt]:
    prompts = [
        BenchPrompt("a portrait of a {} " + phrase, "recontextualisation", context=ctx)
        for ctx, phrase in vocab.CONTEXTS.items()
    ]
    for colour, ctx in (("red", "beach"), ("blue", "city"), ("green", "snow"), ("yellow", "room")):
        prompts.append(
            BenchPrompt(
                f"a portrait of a {{}} in a {colour} shirt {vocab.CONTEXTS[ctx]}",
                "property",
                context=ctx,
                colour=colour,
            )
        )
    return prompts
