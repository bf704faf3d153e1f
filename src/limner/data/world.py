"""The world stream: an endless, seeded supply of subjects the bench never shows, each drawn in several views.

Each sample is one subject (a two-tone object instance with an emblem, a plain object, or a character with
its own face) in one view; with `pair="view"` its reference is a second view of the same subject (another
context, pose and scale) with the background painted grey, so the encoder must carry the subject and not
the scene; `pair="crop"` also crops that cut-out to the subject's square box, so the subject fills the frame
and a small image encoder sees its emblem (limner.images.crop_to_subject); `pair="cut"` paints the target's own
background grey instead (one view, the pose and scale the target has). The bench's held-out subjects never
appear, nor anything near them: instances come from `scenes.random_instance`, which already refuses anything
`near_heldout_subject`, and faces one factor or less away from a held-out identity are refused here (stricter
than the base's training data, which only leaves out the identities themselves), so the bench measures
generalization to unseen subjects.

`subjects="characters"` is the identity methods' stream: characters only, mostly portraits (a full figure's
face is a few pixels), each sample carrying the target's 5 face keypoints and body keypoints from the
renderer. With `pair="view"` its reference is another view of the same person left whole (the methods find
the face and cut the person out themselves, as they must on real photos), with the person's mask beside
it; `clothes="vary"` redraws the shirt for that view (PhotoMaker, InstantID: the face alone carries the
identity), `clothes="same"` keeps it (StoryMaker keeps clothes).

Sample k of rank r is sample `k * world_size + r` of one global sequence, and sample g of that sequence is
drawn from `default_rng([seed, g])` alone: ranks never share a sample, and resuming is setting k.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from limner.data.sample import Sample, square_array, square_mask
from limner.errors import LimnerError
from limner.images import crop_to_subject, cut_out
from limner.world import vocab
from limner.world.heldout import IDENTITIES
from limner.world.render import SIZE, CharacterSpec, Identity, ObjectSpec, Scene, Subject, render
from limner.world.scenes import caption_for, is_heldout_combo, random_identity, random_instance

# What kind of subject each sample shows. Instances first: the bench's object subjects are instances, and
# an instance is only recognisable by its two colours and emblem, which is what the encoder must learn to
# carry. Characters are there for the identity methods; plain objects keep the base's common case.
SUBJECT_KINDS: dict[str, float] = {"instance": 0.55, "object": 0.15, "character": 0.30}
STREAM_SUBJECTS = ("all", "characters")
CLOTHES = ("vary", "same")
PORTRAIT_SHARE = {"all": 0.6, "characters": 0.8}  # the rest are full figures
OBJECT_SCALE = (0.2, 0.42)  # the base saw 0.22-0.4 (single objects) and 0.14-0.22 (beside another)


@dataclass(frozen=True)
class WorldSubject:
    """One subject of the stream: its kind, the traits fixed across its views, and a key naming them."""

    kind: str  # instance | object | character
    cls: str
    instance: Subject | None = None  # kind == "instance"
    colour: str | None = None  # kind == "object": body colour (instance: colour_a)
    pattern: str = "plain"
    accessory: str | None = None
    identity: Identity | None = None  # kind == "character"
    shirt: tuple[str, str] | None = None  # (colour, pattern)

    def key(self) -> str:
        if self.kind == "instance":
            s = self.instance
            return f"instance:{s.cls}:{s.colour_a}:{s.colour_b}:{s.split}:{s.emblem}:{s.emblem_colour}"
        if self.kind == "object":
            return f"object:{self.cls}:{self.colour}:{self.pattern}:{self.accessory or 'none'}"
        return f"character:{self.cls}:{self.identity.key()}:{self.shirt[0]}:{self.shirt[1]}"


def near_heldout_identity(identity: Identity) -> bool:
    """True for a face that is a held-out bench identity or differs from one in a single factor."""
    factors = identity.factors()
    return any(sum(a != b for a, b in zip(factors, h.identity.factors())) <= 1 for h in IDENTITIES)


def _random_face(rng: np.random.Generator) -> Identity:
    while True:
        ident = random_identity(rng)
        if not near_heldout_identity(ident):
            return ident


def _random_shirt(rng: np.random.Generator) -> tuple[str, str]:
    return str(rng.choice(list(vocab.COLOURS))), str(rng.choice(vocab.PATTERNS, p=[0.55, 0.15, 0.15, 0.15]))


def draw_subject(rng: np.random.Generator, subjects: str = "all") -> WorldSubject:
    """A random subject, never one the bench holds out or one near it (a character when subjects="characters")."""
    kind = str(rng.choice(list(SUBJECT_KINDS), p=list(SUBJECT_KINDS.values())))
    if kind == "character" or subjects == "characters":
        cls, shirt = str(rng.choice(vocab.CHARACTER_CLASSES)), _random_shirt(rng)  # this order: seeds reproduce
        return WorldSubject("character", cls, identity=_random_face(rng), shirt=shirt)
    cls, colour = str(rng.choice(vocab.OBJECT_CLASSES)), str(rng.choice(list(vocab.COLOURS)))
    if kind == "instance":
        return WorldSubject("instance", cls, instance=random_instance(rng, cls, colour), colour=colour)
    pattern = str(rng.choice(vocab.PATTERNS, p=[0.55, 0.15, 0.15, 0.15]))
    accessory = str(rng.choice(vocab.OBJECT_ACCESSORIES)) if rng.random() < 0.08 else None
    return WorldSubject("object", cls, colour=colour, pattern=pattern, accessory=accessory)


def _context(rng: np.random.Generator, subject: WorldSubject) -> str:
    """A context the base's single-object captions show with this class and colour (one triple in eight
    is kept from them for `limner world check`; the adapter's data keeps out of them too)."""
    contexts = list(vocab.CONTEXTS)
    if subject.kind != "character":
        contexts = [c for c in contexts if not is_heldout_combo(subject.cls, subject.colour, c)]
    return str(rng.choice(contexts))


def _entity(
    rng: np.random.Generator, subject: WorldSubject, portrait_share: float = 0.6
) -> ObjectSpec | CharacterSpec:
    """The subject in a fresh pose, place and scale."""
    if subject.kind == "character":
        framing = "portrait" if rng.random() < portrait_share else "full"
        return CharacterSpec(
            cls=subject.cls,
            identity=subject.identity,
            shirt_colour=subject.shirt[0],
            shirt_pattern=subject.shirt[1],
            framing=framing,
            x=0.5 + rng.uniform(-0.05, 0.05),
            y=rng.uniform(0.47, 0.53) if framing == "portrait" else rng.uniform(0.42, 0.5),
            scale=rng.uniform(0.85, 1.1),
            head_tilt=rng.uniform(-15, 15),
            arm_angles=(rng.uniform(5, 150), rng.uniform(5, 150)),
        )
    return ObjectSpec(
        cls=subject.cls,
        colour=subject.colour,
        pattern=subject.pattern,
        x=0.5 + rng.uniform(-0.06, 0.06),
        y=rng.uniform(0.5, 0.66),
        scale=rng.uniform(*OBJECT_SCALE),
        rotation=rng.uniform(-20, 20),
        accessory=subject.accessory,
        subject=subject.instance,
    )


def draw_view(
    rng: np.random.Generator, subject: WorldSubject, looks: bool = True
) -> tuple[np.ndarray, str, np.ndarray]:
    """(64 px image, caption, subject mask) of the subject in a random context, pose and scale; with
    looks=False the caption names its class, accessory and context but not its colours or emblem."""
    r = render_view(rng, subject, looks)
    return r.image, r.caption, r.entities[0].mask


def render_view(rng: np.random.Generator, subject: WorldSubject, looks: bool = True, portrait_share: float = 0.6):
    """draw_view's whole render: the image, its caption and the subject's truth (mask, keypoints)."""
    scene = Scene(_context(rng, subject), [_entity(rng, subject, portrait_share)], variant=int(rng.integers(2**31)))
    scene.caption = caption_for(scene, rng, looks=looks)
    return render(scene)


class WorldStream:
    """The world's endless sample stream (see the module docstring). Rendering is on the CPU: about 1.6 ms
    a view at 64 px on one core, two views a sample with pair="view"."""

    def __init__(
        self,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        resolution: int = SIZE,
        pair: str = "self",
        captions: str = "full",
        subjects: str = "all",
        clothes: str = "vary",
    ):
        if subjects not in STREAM_SUBJECTS:
            raise LimnerError(f"subjects={subjects!r} for the world stream: use one of {', '.join(STREAM_SUBJECTS)}")
        if clothes not in CLOTHES:
            raise LimnerError(f"clothes={clothes!r} for the world stream: use one of {', '.join(CLOTHES)}")
        if pair in ("crop", "cut") and subjects == "characters":
            raise LimnerError(
                f"pair={pair!r} is for objects; the identity stream's second view stays whole (pair=view)"
            )
        self.seed, self.rank, self.world_size, self.resolution, self.pair = seed, rank, world_size, resolution, pair
        self.captions, self.subjects, self.clothes = captions, subjects, clothes
        self.k = 0  # the next sample of this rank
        self.skipped: dict[str, int] = {}  # nothing is ever skipped: every draw renders

    def subject(self, k: int) -> WorldSubject:
        """The subject of this rank's sample k, without drawing it (cheap: to check what the stream shows)."""
        return draw_subject(np.random.default_rng([self.seed, k * self.world_size + self.rank, 0]), self.subjects)

    def sample(self, k: int) -> Sample:
        """This rank's sample k: a pure function of (seed, rank, world_size, k)."""
        if self.subjects == "characters":
            return self._character_sample(k)
        g = k * self.world_size + self.rank
        subject = self.subject(k)
        looks = self.captions == "full"
        image, caption, mask = draw_view(np.random.default_rng([self.seed, g, 1]), subject, looks)
        if self.pair in ("view", "crop"):
            other, _, other_mask = draw_view(np.random.default_rng([self.seed, g, 2]), subject)
            reference = self._fit((crop_to_subject if self.pair == "crop" else cut_out)(other, other_mask))
        elif self.pair == "cut":
            reference = self._fit(cut_out(image, mask))
        image = self._fit(image)
        mask = mask if self.resolution == SIZE else square_mask(mask, self.resolution)
        return Sample(
            image=image,
            text=caption,
            references=[image] if self.pair == "self" else [reference],
            mask=mask,
            subject=subject.key(),
        )

    def _character_sample(self, k: int) -> Sample:
        """A character's view with its keypoints; with pair="view" a second, whole view and its mask."""
        g = k * self.world_size + self.rank
        subject, share = self.subject(k), PORTRAIT_SHARE["characters"]
        target = render_view(np.random.default_rng([self.seed, g, 1]), subject, self.captions == "full", share)
        references, reference_masks = [self._fit(target.image)], [self._fit_mask(target.entities[0].mask)]
        if self.pair == "view":
            rng = np.random.default_rng([self.seed, g, 2])
            if self.clothes == "vary":
                subject = replace(subject, shirt=_random_shirt(rng))
            view = render_view(rng, subject, True, share)
            references, reference_masks = [self._fit(view.image)], [self._fit_mask(view.entities[0].mask)]
        truth, scale = target.entities[0], self.resolution / SIZE
        return Sample(
            image=self._fit(target.image),
            text=target.caption,
            references=references,
            mask=self._fit_mask(truth.mask),
            subject=self.subject(k).key(),
            face_keypoints=None if truth.face_keypoints is None else np.asarray(truth.face_keypoints) * scale,
            body_keypoints={name: (x * scale, y * scale) for name, (x, y) in truth.body_keypoints.items()},
            reference_masks=reference_masks,
        )

    def more_views(self, k: int, count: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """`count` further whole views of the person of this rank's sample k, with their masks, drawn as its
        reference view is (clothes redrawn per view with clothes="vary"): for a method that stacks several
        references of one person (PhotoMaker). A pure function of (seed, rank, world_size, k, count)."""
        if self.subjects != "characters":
            raise LimnerError("more_views draws the identity stream's people: open it with subjects='characters'")
        g = k * self.world_size + self.rank
        images, masks = [], []
        for j in range(count):
            rng = np.random.default_rng([self.seed, g, 3 + j])  # 1 and 2 draw the target and the reference
            subject = self.subject(k)
            if self.clothes == "vary":
                subject = replace(subject, shirt=_random_shirt(rng))
            view = render_view(rng, subject, True, PORTRAIT_SHARE["characters"])
            images.append(self._fit(view.image))
            masks.append(self._fit_mask(view.entities[0].mask))
        return images, masks

    def _fit(self, image: np.ndarray) -> np.ndarray:
        return image if self.resolution == SIZE else square_array(image, self.resolution)

    def _fit_mask(self, mask: np.ndarray) -> np.ndarray:
        return mask if self.resolution == SIZE else square_mask(mask, self.resolution)

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        sample = self.sample(self.k)
        self.k += 1
        return sample

    def state_dict(self) -> dict:
        return {"kind": "world", "seed": self.seed, "rank": self.rank, "world_size": self.world_size, "k": self.k}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for name in ("kind", "seed", "rank", "world_size"):
            if state.get(name) != mine[name]:
                raise LimnerError(
                    f"the saved data position is for {name}={state.get(name)!r}, this world stream has "
                    f"{mine[name]!r}: resume with the settings the run started with"
                )
        if not isinstance(state.get("k"), int) or state["k"] < 0:
            raise LimnerError(f"the saved world-stream position {state.get('k')!r} is not a sample index")
        self.k = state["k"]

    def describe(self) -> dict:
        return {
            "kind": "world",
            "path": None,
            "seed": self.seed,
            "pair": self.pair,
            "captions": self.captions,
            "subjects": self.subjects,
            "clothes": self.clothes,
            "resolution": self.resolution,
            "rank": self.rank,
            "world_size": self.world_size,
            "samples": self.k,
            "skipped": dict(self.skipped),
            "subject_kinds": dict(SUBJECT_KINDS) if self.subjects == "all" else {"character": 1.0},
        }
