"""What the world base draws when told a held-out subject's looks in words: a yardstick for an encoder method.

An image prompt (IP-Adapter, BLIP-Diffusion, FastComposer) has to tell the frozen base what the subject looks like.
The words that name every look ("a blue and orange cup with a white triangle") say it as plainly as anything can,
in the language the base was trained on; the subject probe's reading of the base's pictures from those words is
therefore a rough ceiling for a zero-shot image prompt through the same frozen base (a fine-tuned UNet can go past
it), beside the class noun alone (the bench's lower bound). The held-out subjects' combinations of looks never
appeared in the base's training; each look did.

    python benchmarks/words_ceiling.py --out benchmarks/results/words_ceiling.json [--prompts 4] [-n 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from limner.generation import GenerationSettings, generate
from limner.images import at_64px
from limner.io import write_json_atomic
from limner.models.loading import WORLD_PROBES, load_base
from limner.world.bench import SUBJECTS, object_prompts
from limner.world.probes import Probes


def looks_phrase(s) -> str:
    """The subject's looks as the base's captions name an instance's (the article is the prompt's)."""
    return f"{s.colour_a} and {s.colour_b} {s.cls} with a {s.emblem_colour} {s.emblem}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=4, help="the bench's first K prompts of each subject")
    parser.add_argument("-n", type=int, default=2, help="images per prompt")
    args = parser.parse_args()
    if not 1 <= args.prompts <= len(object_prompts()) or args.n < 1:
        parser.error(f"--prompts must be between 1 and {len(object_prompts())}, -n at least 1")
    base, probes = load_base(None, device="cpu"), Probes(WORLD_PROBES)
    rows = {}
    for s in SUBJECTS:
        row = {}
        for form, phrase in (("class noun", s.cls), ("looks in words", looks_phrase(s))):
            images = []
            for prompt in object_prompts()[: args.prompts]:
                text = prompt.template.format(phrase)
                drawn = generate(base, GenerationSettings(text, num_images=args.n, seed=0)).images
                images += list(at_64px(drawn))
            p, names = probes.subject_probabilities(np.stack(images))
            row[form] = round(float(p[:, names.index(s.name)].mean()), 3)
        rows[s.name] = row
        print(s.name, row, flush=True)
    mean = {form: round(float(np.mean([r[form] for r in rows.values()])), 3) for form in next(iter(rows.values()))}
    print("mean", mean)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        args.out, {"prompts": args.prompts, "images_per_prompt": args.n, "mean": mean, "per_subject": rows}
    )


if __name__ == "__main__":
    main()
