"""Random scenes and their captions: the training distribution of the world's base models.

Two things are kept out of that distribution on purpose, so that personalization and composition can
be measured honestly:
- the held-out subjects and identities of the world bench (see heldout.py) never appear, nor does any
  two-tone instance close to a subject (`near_heldout_subject`);
- one in eight (class, colour, context) triples never appears in a single-object caption, so that
  `limner world check` can test combinations the base model has never seen.
"""

from __future__ import annotations

import hashlib

import numpy as np

from limner.world import vocab
from limner.world.heldout import SUBJECTS, heldout_identity_keys
from limner.world.render import SPLITS, CharacterSpec, Entity, Identity, ObjectSpec, Render, Scene, Subject, render


def is_heldout_combo(cls: str, colour: str, context: str) -> bool:
    """True for the (class, colour, context) triples no training caption ever shows together."""
    digest = hashlib.md5(f"{cls}|{colour}|{context}".encode()).digest()
    return digest[0] % 8 == 0


def heldout_combos() -> list[tuple[str, str, str]]:
    return [
        (k, c, x)
        for k in vocab.OBJECT_CLASSES
        for c in vocab.COLOURS
        for x in vocab.CONTEXTS
        if is_heldout_combo(k, c, x)
    ]


def random_identity(rng: np.random.Generator, exclude: set[str] = frozenset()) -> Identity:
    while True:
        ident = Identity(*(int(rng.integers(n)) for n in vocab.IDENTITY_FACTORS.values()))
        if ident.key() not in exclude:
            return ident


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def with_article(noun_phrase: str) -> str:
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


def object_phrase(o: ObjectSpec, name: str | None = None, colour: bool = True, pattern: bool = True) -> str:
    """'a red striped ball with a hat', or for a two-tone instance 'a red and white ball with a blue heart'
    (`pattern` then says whether its second colour and emblem are named). `name` replaces the class
    noun phrase (e.g. 'sks ball') and a named subject's looks are never described."""
    instance = o.subject is not None and name is None
    words = []
    if colour and o.subject is None:
        words.append(o.colour)
    if colour and instance:
        two_tone = pattern and o.subject.colour_b != o.subject.colour_a  # one colour all over: named once
        words += [o.subject.colour_a, "and", o.subject.colour_b] if two_tone else [o.subject.colour_a]
    if pattern and o.subject is None and o.pattern != "plain":
        words.append(o.pattern)
    words.append(name or o.cls)
    phrase = with_article(" ".join(words))
    if instance and pattern:
        phrase += " with " + with_article(f"{o.subject.emblem_colour} {o.subject.emblem}")
    if o.accessory:
        phrase += f" with a {o.accessory}"
    return phrase


def character_phrase(c: CharacterSpec, clothes: bool, name: str | None = None) -> str:
    phrase = f"a {name or c.cls}"
    if clothes:
        pat = "" if c.shirt_pattern == "plain" else f" {c.shirt_pattern}"
        phrase += f" in {with_article(f'{c.shirt_colour}{pat} shirt')}"
    return phrase


def caption_for(scene: Scene, rng: np.random.Generator, full: bool = False, looks: bool = True) -> str:
    """A caption for a scene. With full=False some facts are dropped at random, as real captions
    do, which teaches the model class-only and context-free prompts too. With looks=False no entity's
    colours, pattern, emblem or clothes are named: what an image prompt has to supply."""
    drop = (lambda p: rng.random() < p) if not full else (lambda p: False)
    phrases = []
    for e in scene.entities:
        if isinstance(e, ObjectSpec):
            phrases.append(object_phrase(e, colour=looks and not drop(0.12), pattern=looks and not drop(0.25)))
        else:
            phrases.append(character_phrase(e, clothes=looks and (full or rng.random() < 0.5)))
    if len(phrases) == 2:
        text = f"{phrases[0]} on the left and {phrases[1]} on the right"
    else:
        text = phrases[0]
        if isinstance(scene.entities[0], CharacterSpec) and scene.entities[0].framing == "portrait" and not drop(0.5):
            text = "a portrait of " + text
    if not drop(0.1):
        text += " " + vocab.CONTEXTS[scene.context]
    if not full and rng.random() < 0.15:
        text = str(rng.choice(vocab.CAPTION_PREFIXES)) + " " + text
    return text


# --------------------------------------------------------------------------------------------
# Random scenes
# --------------------------------------------------------------------------------------------


def near_heldout_subject(instance: Subject) -> bool:
    """True for an instance too close to a held-out subject of its class for the base to see: three of
    its four looks (the two body colours, in either order, the emblem, the emblem's colour) agree."""
    for s in SUBJECTS:
        if s.cls == instance.cls:
            shared = len({s.colour_a, s.colour_b} & {instance.colour_a, instance.colour_b})
            if shared + (s.emblem == instance.emblem) + (s.emblem_colour == instance.emblem_colour) >= 3:
                return True
    return False


def random_instance(rng: np.random.Generator, cls: str, colour: str) -> Subject:
    """A two-tone instance of a class with an emblem, never one close to a held-out subject."""
    while True:
        others = [c for c in vocab.COLOURS if c != colour]
        second = str(rng.choice(others))
        instance = Subject(
            "instance",
            cls,
            colour,
            second,
            str(rng.choice(SPLITS)),
            str(rng.choice(vocab.EMBLEMS)),
            str(rng.choice([c for c in others if c != second])),
        )
        if not near_heldout_subject(instance):
            return instance


def random_object(
    rng: np.random.Generator, x: float, scale_range=(0.22, 0.4), instance_rate: float = 0.0
) -> ObjectSpec:
    o = ObjectSpec(
        cls=str(rng.choice(vocab.OBJECT_CLASSES)),
        colour=str(rng.choice(list(vocab.COLOURS))),
        pattern=str(rng.choice(vocab.PATTERNS, p=[0.55, 0.15, 0.15, 0.15])),
        x=x + rng.uniform(-0.06, 0.06),
        y=rng.uniform(0.5, 0.66),
        scale=rng.uniform(*scale_range),
        rotation=rng.uniform(-20, 20),
        accessory=str(rng.choice(vocab.OBJECT_ACCESSORIES)) if rng.random() < 0.08 else None,
    )
    if instance_rate and rng.random() < instance_rate:  # no draw at rate 0: the first edition's data stay the same
        o.subject, o.pattern, o.accessory = random_instance(rng, o.cls, o.colour), "plain", None
    return o


def random_character(
    rng: np.random.Generator,
    x: float,
    framing: str,
    exclude: set[str],
    scale: float = 1.0,
    identity: Identity | None = None,
    cls: str | None = None,
) -> CharacterSpec:
    return CharacterSpec(
        cls=cls or str(rng.choice(vocab.CHARACTER_CLASSES)),
        identity=identity or random_identity(rng, exclude),
        shirt_colour=str(rng.choice(list(vocab.COLOURS))),
        shirt_pattern=str(rng.choice(vocab.PATTERNS, p=[0.55, 0.15, 0.15, 0.15])),
        framing=framing,
        x=x + rng.uniform(-0.05, 0.05),
        y=rng.uniform(0.47, 0.53) if framing == "portrait" else rng.uniform(0.42, 0.5),
        scale=scale * rng.uniform(0.9, 1.1),
        head_tilt=rng.uniform(-15, 15),
        arm_angles=(rng.uniform(5, 150), rng.uniform(5, 150)),
    )


def random_scene(
    rng: np.random.Generator,
    exclude_identities: set[str] | None = None,
    avoid_heldout_combos: bool = True,
    instance_rate: float = 0.0,
) -> Scene:
    """One scene of the base-model training distribution (held-out subjects never appear). A single
    object is a two-tone instance with an emblem at `instance_rate`."""
    exclude = heldout_identity_keys() if exclude_identities is None else exclude_identities
    context = str(rng.choice(list(vocab.CONTEXTS)))
    kind = rng.choice(
        ["object", "two_objects", "character", "object_character", "two_characters"], p=[0.42, 0.16, 0.26, 0.08, 0.08]
    )
    entities: list[Entity]
    if kind == "object":
        o = random_object(rng, 0.5, instance_rate=instance_rate)
        while avoid_heldout_combos and is_heldout_combo(o.cls, o.colour, context):
            o = random_object(rng, 0.5, instance_rate=instance_rate)
        entities = [o]
    elif kind == "two_objects":
        entities = [random_object(rng, 0.27, (0.15, 0.22)), random_object(rng, 0.73, (0.15, 0.22))]
    elif kind == "character":
        framing = "portrait" if rng.random() < 0.6 else "full"
        entities = [random_character(rng, 0.5, framing, exclude)]
    elif kind == "object_character":
        o = random_object(rng, 0.0, (0.14, 0.2))
        c = random_character(rng, 0.0, "full", exclude, scale=0.9)
        left, right = (o, c) if rng.random() < 0.5 else (c, o)
        left.x, right.x = 0.27 + rng.uniform(-0.04, 0.04), 0.73 + rng.uniform(-0.04, 0.04)
        entities = [left, right]
    else:
        entities = [
            random_character(rng, 0.28, "full", exclude, 0.85),
            random_character(rng, 0.72, "full", exclude, 0.85),
        ]
    scene = Scene(context=context, entities=entities, variant=int(rng.integers(2**31)))
    scene.caption = caption_for(scene, rng)
    return scene


def random_render(seed: int) -> Render:
    rng = np.random.default_rng(seed)
    return render(random_scene(rng))


def training_scene(rng: np.random.Generator) -> Scene:
    """A scene as the base model saw them: one character (portrait or full figure), two side by side, a
    character beside an object, or objects only (no face). Held-out identities never appear."""
    exclude = set(heldout_identity_keys())
    kind = rng.choice(["portrait", "full", "two", "with_object", "objects"], p=[0.35, 0.25, 0.15, 0.1, 0.15])
    if kind in ("portrait", "full"):
        entities = [random_character(rng, 0.5, str(kind), exclude)]
    elif kind == "two":
        entities = [
            random_character(rng, 0.28, "full", exclude, 0.85),
            random_character(rng, 0.72, "full", exclude, 0.85),
        ]
    elif kind == "with_object":
        c, o = random_character(rng, 0.0, "full", exclude, 0.9), random_object(rng, 0.0, (0.14, 0.2))
        left, right = (o, c) if rng.random() < 0.5 else (c, o)
        left.x, right.x = 0.27 + rng.uniform(-0.04, 0.04), 0.73 + rng.uniform(-0.04, 0.04)
        entities = [left, right]
    else:
        entities = (
            [random_object(rng, 0.5)]
            if rng.random() < 0.5
            else [random_object(rng, 0.27, (0.15, 0.22)), random_object(rng, 0.73, (0.15, 0.22))]
        )
    return Scene(str(rng.choice(list(vocab.CONTEXTS))), entities, variant=int(rng.integers(2**31)))
