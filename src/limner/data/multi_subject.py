"""Scenes of several subjects for FastComposer's pretraining: each subject's mask, where its noun ends in the
caption, and a crop of it with the background replaced by noise (what the image encoder reads).

FastComposer (Xiao et al., 2023) trains on images of up to 4 subjects, each with a segmentation mask and the
character offset where its noun phrase ends in the caption; the image token goes after that noun, and the subject's
crop (its bounding box, background pixels replaced by uniform noise) is what the image encoder sees. The world draws
such scenes exactly: 1 to `max_subjects` subjects side by side (the stream's subjects: instances, plain objects,
characters; never a bench subject or one near it), their visible masks from the renderer, and captions that name
each by its class noun only ("a ball on the left and a man on the right on the beach"), so the looks must come
through the image token.

`pair`: "self" crops each subject out of the target image itself, as the paper does; "view" crops it out of
another view of the same subject drawn alone (another context, pose and scale), which the world alone can offer and
which IP-Adapter's bench found to generalize better to unseen subjects (docs/world-bench-ip).

Sample k of rank r is sample `k * world_size + r` of one global sequence drawn from `default_rng([seed, g])`, as the
world stream's, so ranks never share a sample and resuming is setting k.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from limner.data.world import WorldSubject, _entity, draw_subject, draw_view
from limner.errors import LimnerError
from limner.world import vocab
from limner.world.render import CharacterSpec, Scene, render
from limner.world.scenes import is_heldout_combo

MAX_SUBJECTS = 4  # the paper trains on up to 4 subjects a scene
# how many subjects a scene shows, 1 to 4: two most often, as FastComposer's headline draws two at inference
SUBJECT_COUNTS = (0.3, 0.4, 0.2, 0.1)
OBJECT_SCALES = {1: (0.2, 0.42), 2: (0.15, 0.22), 3: (0.12, 0.16), 4: (0.1, 0.13)}  # the base saw 0.14-0.42
CHARACTER_SCALES = {1: 1.0, 2: 0.85, 3: 0.65, 4: 0.55}


@dataclass
class MultiSubjectSample:
    image: np.ndarray  # H x W x 3 uint8: the target
    text: str  # its caption, each subject named by its class noun
    noun_ends: list[int]  # per subject, the character offset in `text` just after its noun
    masks: list[np.ndarray]  # per subject, its visible H x W bool mask in the target
    references: list[np.ndarray]  # per subject, its crop with the background replaced by noise, padded square
    subjects: list[str]  # per subject, its key (limner.data.world.WorldSubject.key)


def subject_crop(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The subject's bounding box with every pixel outside its mask replaced by uniform noise (the paper's
    RandomSegmentProcessor), padded to a square with black as its PadToSquare does."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise LimnerError("the subject's mask is empty: the picture shows no subject to crop")
    noise = rng.integers(0, 256, image.shape, dtype=np.uint8)
    pasted = np.where(mask[..., None], image, noise)
    ys, xs = np.nonzero(mask)
    return pad_square(pasted[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])


def pad_square(image: np.ndarray) -> np.ndarray:
    """The picture centred on a black square (the official PadToSquare with fill 0)."""
    h, w = image.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side, 3), dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = image
    return square


def _placed(rng: np.random.Generator, subject: WorldSubject, i: int, n: int):
    """The subject in a fresh pose, at slot i of n from the left, sized so n of them fit."""
    entity = _entity(rng, subject)
    x = (i + 0.5) / n + (rng.uniform(-0.04, 0.04) if n > 1 else 0.0)
    if isinstance(entity, CharacterSpec):
        if n == 1:
            return entity
        return replace(entity, x=x, framing="full", y=rng.uniform(0.42, 0.5), scale=CHARACTER_SCALES[n])
    return replace(entity, x=x, scale=rng.uniform(*OBJECT_SCALES[n]))


def _caption(nouns: list[str], context: str | None, portrait: bool) -> tuple[str, list[int]]:
    """The caption in the base's own phrasing, and where each noun ends in it."""
    phrases = [f"a {noun}" for noun in nouns]
    if len(phrases) == 1:
        parts = ["a portrait of " + phrases[0] if portrait else phrases[0]]
    elif len(phrases) == 2:
        parts = [phrases[0], " on the left and ", phrases[1], " on the right"]
    else:
        parts = []
        for k, phrase in enumerate(phrases):
            parts += [phrase] + ([", "] if k < len(phrases) - 2 else [" and "] if k == len(phrases) - 2 else [])
    text, ends = "", []
    for part in parts:
        text += part
        if not part.startswith((" ", ",")):
            ends.append(len(text))
    if context:
        text += " " + vocab.CONTEXTS[context]
    return text, ends


class MultiSubjectWorldStream:
    """The world's endless stream of several-subject scenes (see the module docstring)."""

    def __init__(
        self,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_subjects: int = MAX_SUBJECTS,
        pair: str = "view",
    ):
        if pair not in ("self", "view"):  # each subject's crop is cut to its box already: no "crop" pairing here
            raise LimnerError(f"pair={pair!r}: use self or view")
        if not 1 <= max_subjects <= MAX_SUBJECTS:
            raise LimnerError(f"max_subjects={max_subjects}: the world stream draws 1 to {MAX_SUBJECTS} a scene")
        self.seed, self.rank, self.world_size, self.pair = seed, rank, world_size, pair
        self.max_subjects = max_subjects
        self.k = 0
        self.skipped: dict[str, int] = {}  # a subject hidden behind the others is left out of its scene, not skipped

    def sample(self, k: int) -> MultiSubjectSample:
        g = k * self.world_size + self.rank
        rng = np.random.default_rng([self.seed, g, 7])
        counts = np.asarray(SUBJECT_COUNTS[: self.max_subjects])
        n = 1 + int(rng.choice(len(counts), p=counts / counts.sum()))
        subjects = [draw_subject(rng) for _ in range(n)]
        contexts = [
            c
            for c in vocab.CONTEXTS
            if not any(s.kind != "character" and is_heldout_combo(s.cls, s.colour, c) for s in subjects)
        ]
        context = str(rng.choice(contexts or list(vocab.CONTEXTS)))
        entities = [_placed(rng, s, i, n) for i, s in enumerate(subjects)]
        scene = Scene(context, entities, variant=int(rng.integers(2**31)))
        drawn = render(scene)
        seen = [i for i, truth in enumerate(drawn.entities) if truth.mask.sum() >= 4]  # hidden ones are left out
        portrait = n == 1 and isinstance(entities[0], CharacterSpec) and entities[0].framing == "portrait"
        text, ends = _caption([subjects[i].cls for i in seen], None if rng.random() < 0.1 else context, portrait)
        masks = [drawn.entities[i].mask for i in seen]
        if self.pair == "self":
            references = [subject_crop(drawn.image, m, rng) for m in masks]
        else:
            references = []
            for i in seen:
                view, _, view_mask = draw_view(rng, subjects[i])
                references.append(subject_crop(view, view_mask, rng))
        return MultiSubjectSample(drawn.image, text, ends, masks, references, [subjects[i].key() for i in seen])

    def __iter__(self) -> Iterator[MultiSubjectSample]:
        return self

    def __next__(self) -> MultiSubjectSample:
        sample = self.sample(self.k)
        self.k += 1
        return sample

    def state_dict(self) -> dict:
        return {
            "kind": "world-multi",
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "k": self.k,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for name in ("kind", "seed", "rank", "world_size"):
            if state.get(name) != mine[name]:
                raise LimnerError(
                    f"the saved data position is for {name}={state.get(name)!r}, this stream has {mine[name]!r}: "
                    "resume with the settings the run started with"
                )
        self.k = int(state["k"])

    def describe(self) -> dict:
        return {
            "kind": "world",
            "scenes": "multi-subject",
            "path": None,
            "seed": self.seed,
            "pair": self.pair,
            "max_subjects": self.max_subjects,
            "subject_counts": list(SUBJECT_COUNTS[: self.max_subjects]),
            "rank": self.rank,
            "world_size": self.world_size,
            "samples": self.k,
        }
