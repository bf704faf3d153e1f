"""What a user personalizes on: a few reference images of one subject, its class noun, and optionally
masks and captions. Methods read it; evaluation extends it with prompts and ground truth."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from limner.values import check_word


@dataclass
class Subject:
    name: str
    class_noun: str  # "dog", "man": the coarse word the subject belongs to
    images: list[np.ndarray]  # uint8 [H, W, 3]
    masks: list[np.ndarray] | None = None  # bool [H, W], where the subject is (optional)
    meta: dict = field(default_factory=dict)
    # per image, what the picture shows besides the subject ("on the beach"): appended to the training
    # prompt, so the identifier learns the subject and not its backgrounds (optional)
    captions: list[str] | None = None

    def __post_init__(self) -> None:
        # the class noun goes into prompts and the class images' cache folder, the name into eval's cache folders
        check_word(self.class_noun, "the class noun (--class-noun)", phrase=True)
        check_word(self.name, "the subject's name", phrase=True)
