"""`limner demo`'s choices; the demo itself is run by the README's quick start."""

from __future__ import annotations

from limner.demo import new_contexts
from limner.evaluation.subjects import world_subjects


def test_demo_draws_each_subject_in_four_contexts_its_references_never_showed():
    for subject in world_subjects("world:duo_ball,sea_cup"):
        prompts = new_contexts(subject)
        assert len(prompts) == 4 and len({p.template for p in prompts}) == 4
        assert all(p.context not in subject.meta["contexts"] for p in prompts)
        assert [p.accessory for p in prompts] == [None, None, None, "hat"]  # 5 of 8 places are in the references
