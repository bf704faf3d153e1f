"""StoryMaker's world pretraining data: one character in another view with the same clothes, and scenes of two.

Most batches are the identity stream's samples (`open_stream("world", pair="view", subjects="characters",
clothes="same")`): a character's target view and a whole second view of the same person in the same shirt, which
the method reads as the official pipeline reads a reference (face found, character cut out). A share of batches
(`two_share`) shows two characters side by side, each with its own reference view drawn alone: the pictures in
which the attention-map loss has something to separate. A batch is all one kind, so its image tokens line up
(background + 20 per character).

Sample k of a batch-of-B stream belongs to batch k // B, whose kind is drawn from `default_rng([seed, batch, 9])`;
a two-character sample is drawn from `default_rng([seed, g, 11])`; resuming is setting k. The trainer takes whole
batches (`next_batch`), so a sample dropped for want of a face never shifts the next batch's start (the shipped
adapter was trained before this: after its first dropped sample, a batch took the kind of its first sample and
skipped the other kind's, which left 9% of its batches with two characters where 25% were asked).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from limner.data import open_stream
from limner.data.world import WorldSubject, draw_subject, render_view
from limner.errors import LimnerError
from limner.world import vocab
from limner.world.pose import openpose_points, skeletons_of
from limner.world.render import CharacterSpec, Scene, render
from limner.world.scenes import caption_for

PORTRAIT_SHARE = 0.8  # of the references drawn for two-character scenes, as the identity stream's


@dataclass
class StorySample:
    image: np.ndarray  # the target, H x W x 3 uint8
    text: str
    references: list[np.ndarray]  # per character, a whole other view of it (same clothes)
    masks: list[np.ndarray]  # per character, its visible mask in the target (from the renderer: training only)
    reference_masks: list[np.ndarray]  # per character, its mask in its reference view
    subjects: list[str]
    poses: list[np.ndarray] | None = None  # per character, its OpenPose points [18, 2] in the target's pixels


class StoryStream:
    """Endless, seeded, resumable; see the module docstring."""

    def __init__(self, *, seed: int = 0, rank: int = 0, world_size: int = 1, batch_size: int = 8, two_share=0.25):
        if not 0 <= two_share <= 1:
            raise LimnerError(f"two_share {two_share} must be between 0 and 1")
        self.seed, self.rank, self.world_size, self.batch_size, self.two_share = (
            seed,
            rank,
            world_size,
            batch_size,
            two_share,
        )
        self.single = open_stream(
            "world",
            seed=seed,
            rank=rank,
            world_size=world_size,
            pair="view",
            captions="class",
            subjects="characters",
            clothes="same",
        )
        self.k = 0
        self.skipped: dict[str, int] = {}

    def two_characters(self, k: int) -> bool:
        rng = np.random.default_rng([self.seed, self.rank, k // self.batch_size, 9])
        return bool(rng.random() < self.two_share)

    def sample(self, k: int) -> StorySample:
        if self.two_characters(k):
            return self._pair(k)
        s = self.single.sample(k)
        pose = openpose_points(s.face_keypoints, s.body_keypoints or {})
        return StorySample(s.image, s.text, s.references, [s.mask], s.reference_masks, [s.subject], [pose])

    def _pair(self, k: int) -> StorySample:
        """Two characters side by side (full figures), each with a reference view of its own, same shirt."""
        g = k * self.world_size + self.rank
        rng = np.random.default_rng([self.seed, g, 11])
        subjects: list[WorldSubject] = [draw_subject(rng, "characters") for _ in range(2)]
        references, reference_masks, entities = [], [], []
        for i, subject in enumerate(subjects):
            view = render_view(rng, subject, True, PORTRAIT_SHARE)
            references.append(view.image)
            reference_masks.append(view.entities[0].mask)
            entities.append(
                CharacterSpec(
                    cls=subject.cls,
                    identity=subject.identity,
                    shirt_colour=subject.shirt[0],
                    shirt_pattern=subject.shirt[1],
                    framing="full",
                    x=(i + 0.5) / 2 + rng.uniform(-0.04, 0.04),
                    y=rng.uniform(0.42, 0.5),
                    scale=0.85,
                    head_tilt=rng.uniform(-15, 15),
                    arm_angles=(rng.uniform(5, 150), rng.uniform(5, 150)),
                )
            )
        scene = Scene(str(rng.choice(list(vocab.CONTEXTS))), entities, variant=int(rng.integers(2**31)))
        scene.caption = caption_for(scene, rng, looks=False)
        drawn = render(scene)
        masks = [e.mask for e in drawn.entities]
        keys = [s.key() for s in subjects]
        return StorySample(
            drawn.image, drawn.caption, references, masks, reference_masks, keys, skeletons_of(drawn.entities)
        )

    def next_batch(self) -> list[StorySample]:
        """The samples of the next batch (all one kind), from the next batch boundary on."""
        self.k = -(-self.k // self.batch_size) * self.batch_size  # a position inside a batch moves to the next one
        samples = [self.sample(k) for k in range(self.k, self.k + self.batch_size)]
        self.k += self.batch_size
        return samples

    def __iter__(self) -> Iterator[StorySample]:
        return self

    def __next__(self) -> StorySample:
        sample = self.sample(self.k)
        self.k += 1
        return sample

    def state_dict(self) -> dict:
        return {
            "kind": "world-story",
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
            "subjects": "characters",
            "clothes": "same",
            "pair": "view",
            "captions": "class",
            "two_character_share": self.two_share,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "samples": self.k,
        }
