"""The words of the world: every noun, colour and place a caption can name.

Everything here is data. The renderer draws these things; the tokenizer is built from these words;
the probes classify into these lists. Identity parameters of characters are deliberately absent from
the caption vocabulary: a caption never names a face, only a class ("a man") and sometimes clothes.
"""

from __future__ import annotations

CONTEXTS: dict[str, str] = {
    # context -> the phrase a caption uses for it
    "beach": "on the beach",
    "snow": "in the snow",
    "grass": "on the grass",
    "night": "at night",
    "city": "in the city",
    "room": "in a room",
    "underwater": "underwater",
    "desert": "in the desert",
}

OBJECT_CLASSES: tuple[str, ...] = ("ball", "box", "cup", "vase", "kite", "star", "teddy", "dog")
CHARACTER_CLASSES: tuple[str, ...] = ("man", "woman", "boy", "girl")
CLASSES: tuple[str, ...] = OBJECT_CLASSES + CHARACTER_CLASSES

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (245, 220, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "purple": (135, 45, 185),
    "pink": (245, 135, 185),
    "white": (246, 246, 246),
    "black": (28, 28, 28),
    "brown": (125, 75, 35),
    "grey": (130, 130, 130),
}
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
OBJECT_ACCESSORIES: tuple[str, ...] = ("hat", "bow")
# Emblems on two-tone object instances. The held-out subjects are such instances; the base model sees
# other instances, their second colour and emblem named in some captions ("a red and white ball with a
# blue heart"), so that a subject is new to it as an instance, not as a kind of thing, as a DreamBench
# dog is new to Stable Diffusion.
EMBLEMS: tuple[str, ...] = ("heart", "ring", "cross", "triangle", "crescent", "diamond")
SIDES: tuple[str, ...] = ("left", "right")

# Identity parameters (never in captions). Each is a small discrete set so that an identity is an
# exact, reproducible combination and the identity embedder can be trained on ground truth.
FACE_SHAPES: tuple[float, ...] = (1.0, 0.86, 0.74)  # head width / height
SKIN_TONES: tuple[tuple[int, int, int], ...] = (
    (255, 224, 196),
    (236, 192, 150),
    (198, 140, 96),
    (141, 94, 60),
    (92, 60, 40),
)
HAIR_STYLES: tuple[str, ...] = ("short", "long", "bun", "spiky", "bald")
HAIR_COLOURS: tuple[tuple[int, int, int], ...] = (
    (20, 16, 14),
    (110, 66, 30),
    (235, 200, 90),
    (190, 70, 30),
    (185, 185, 190),
    (60, 90, 200),
)
EYE_COLOURS: tuple[tuple[int, int, int], ...] = ((90, 50, 20), (50, 120, 230), (40, 160, 70), (20, 20, 20))
EYE_SPACINGS: tuple[float, ...] = (0.28, 0.38, 0.48)
NOSE_SIZES: tuple[float, ...] = (0.07, 0.12, 0.18)
MOUTH_WIDTHS: tuple[float, ...] = (0.18, 0.30, 0.44)
FACE_ACCESSORIES: tuple[str, ...] = ("none", "glasses", "earrings", "headband")

IDENTITY_FACTORS: dict[str, int] = {
    "face_shape": len(FACE_SHAPES),
    "skin": len(SKIN_TONES),
    "hair_style": len(HAIR_STYLES),
    "hair_colour": len(HAIR_COLOURS),
    "eye_colour": len(EYE_COLOURS),
    "eye_spacing": len(EYE_SPACINGS),
    "nose": len(NOSE_SIZES),
    "mouth": len(MOUTH_WIDTHS),
    "accessory": len(FACE_ACCESSORIES),
}

CAPTION_PREFIXES: tuple[str, ...] = ("a photo of", "a picture of", "a rendering of")

# Words the base model never sees in a training caption: identifiers for personalization methods
# (DreamBooth's rare token, Custom Diffusion's modifiers, PhotoMaker's trigger) and the phrases
# that methods' templates use. They are in the vocabulary so that they tokenize to a single token.
RARE_IDENTIFIERS: tuple[str, ...] = ("sks", "zwx", "ohwx", "qrv", "vkt", "img")
TEMPLATE_WORDS: tuple[str, ...] = (
    "photo",
    "picture",
    "rendering",
    "of",
    "the",
    "a",
    "an",
    "in",
    "on",
    "at",
    "with",
    "and",
    "my",
    "one",
    "two",
    "small",
    "big",
    "very",
    "far",
    "away",
    "zoomed",
    "close",
    "up",
    "cropped",
    "clean",
    "dark",
    "bright",
    "cool",
    "nice",
    "good",
    "weird",
    "large",
    "little",
    "shirt",
    "wearing",
    "portrait",
    "next",
    "to",
    "left",
    "right",
    "style",
    "painting",
    "person",
    "face",
    "is",
    "it",
    "this",
    "that",
    "s",
    "by",
    "art",
    "drawing",
    "sculpture",
    "toy",
    "object",
    "thing",
    "background",
)


def first_edition_words() -> list[str]:
    """The words of the world's first edition, in the tokenizer's order."""
    words: list[str] = []
    for phrase in list(CONTEXTS.values()) + list(CAPTION_PREFIXES):
        words += phrase.split()
    words += list(CONTEXTS) + list(CLASSES) + list(COLOURS) + list(PATTERNS)
    words += list(OBJECT_ACCESSORIES) + list(SIDES) + list(RARE_IDENTIFIERS) + list(TEMPLATE_WORDS)
    return sorted(set(words))


def added_words() -> list[str]:
    """Words added since the first edition. The tokenizer appends them after every earlier token, so
    no earlier token id moves and a model trained before still reads its words the same way."""
    return list(EMBLEMS)


def caption_words() -> list[str]:
    """Every whole word the world's captions and method templates use."""
    return first_edition_words() + added_words()
