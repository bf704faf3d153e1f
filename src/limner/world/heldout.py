"""The held-out subjects and identities of the world bench: data only, below both the bench (which
renders their references) and the scene sampler (which keeps them out of the base models' training
data). Kept apart so neither needs the other to know what is held out."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from limner.world.render import Identity, Subject

SUBJECTS: tuple[Subject, ...] = (
    Subject("duo_ball", "ball", "red", "white", "horizontal", "heart", "blue"),
    Subject("ring_box", "box", "blue", "yellow", "vertical", "ring", "red"),
    Subject("cross_cup", "cup", "green", "white", "horizontal", "cross", "red"),
    Subject("moon_vase", "vase", "purple", "orange", "horizontal", "crescent", "yellow"),
    Subject("tri_kite", "kite", "yellow", "black", "vertical", "triangle", "white"),
    Subject("gem_star", "star", "pink", "blue", "vertical", "diamond", "white"),
    Subject("heart_teddy", "teddy", "brown", "pink", "horizontal", "heart", "red"),
    Subject("spot_dog", "dog", "white", "black", "vertical", "ring", "orange"),
    Subject("sun_ball", "ball", "yellow", "green", "vertical", "cross", "purple"),
    Subject("gift_box", "box", "red", "green", "horizontal", "diamond", "yellow"),
    Subject("sea_cup", "cup", "blue", "orange", "vertical", "triangle", "white"),
    Subject("night_dog", "dog", "grey", "brown", "horizontal", "heart", "yellow"),
)

# (name, class, identity factors in vocab.IDENTITY_FACTORS order)
_IDENTITIES: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("ada", "woman", (1, 0, 1, 3, 1, 0, 0, 1, 1)),
    ("ben", "man", (0, 3, 3, 0, 0, 2, 2, 2, 0)),
    ("cleo", "girl", (0, 1, 2, 2, 2, 1, 0, 0, 3)),
    ("dev", "boy", (2, 4, 0, 5, 3, 0, 1, 1, 2)),
    ("eve", "woman", (2, 2, 1, 4, 1, 2, 1, 2, 2)),
    ("finn", "man", (1, 1, 4, 1, 2, 1, 2, 0, 1)),
    ("gus", "boy", (0, 0, 3, 2, 1, 2, 0, 2, 3)),
    ("hana", "girl", (1, 3, 1, 0, 3, 0, 1, 0, 0)),
)


@dataclass(frozen=True)
class BenchIdentity:
    name: str
    cls: str
    identity: Identity


IDENTITIES: tuple[BenchIdentity, ...] = tuple(BenchIdentity(n, c, Identity(*f)) for n, c, f in _IDENTITIES)


@lru_cache(maxsize=1)
def heldout_identity_keys() -> frozenset[str]:
    return frozenset(b.identity.key() for b in IDENTITIES)
