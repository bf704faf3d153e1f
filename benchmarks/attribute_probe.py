"""Does the attribute probe see the hats and bows the world base draws? Checked where the answer is known.

    python benchmarks/attribute_probe.py [--probes DIR ...] [--per-subject 12] [--out benchmarks/attribute_probe]

Renders of the 12 held-out subjects wearing a hat, a bow or nothing in turn go through the world VAE and
back, as everything the base draws does; each probe folder given (default: the shipped one) reads them, and
reads the base's own pictures asked for an accessory (`limner world check`'s prompts) and asked for none
(false positives). The first attribute probe, trained on crisp renders alone, is the shipped one; the
candidate in benchmarks/attribute_probe/candidate was trained by the probes stage's code with the subject
probe's recipe (`generator_styled`: half of its renders as the VAE gives them back, all with `lose_detail`):

    python benchmarks/attribute_probe.py --probes src/limner/assets/world/probes --probes benchmarks/attribute_probe/candidate
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from limner.io import write_json_atomic, write_text_atomic  # noqa: E402
from limner.models.loading import WORLD_PROBES, load_base  # noqa: E402
from limner.world import vocab  # noqa: E402
from limner.world.bench import SUBJECTS, subject_object  # noqa: E402
from limner.world.check import ACCESSORY_CASES, accessory_prompts, check_prompts, draw  # noqa: E402
from limner.world.probes import Probes, vae_round_trip  # noqa: E402
from limner.world.render import Scene, render  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probes", type=Path, action="append", help="A probes folder holding attributes.safetensors (repeatable).")
    ap.add_argument("--per-subject", type=int, default=12)
    ap.add_argument("--plain", type=int, default=48, help="Base pictures asked for no accessory (false positives).")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "attribute_probe")
    args = ap.parse_args()
    base = load_base(device="cpu")
    rng = np.random.default_rng(4242)
    worn, renders = [], []
    for subject in SUBJECTS:
        for k in range(args.per_subject):
            spec = subject_object(subject, rng)
            spec.accessory = [*vocab.OBJECT_ACCESSORIES, None][k % 3]
            renders.append(render(Scene(str(rng.choice(list(vocab.CONTEXTS))), [spec], variant=int(rng.integers(2**31)))).image)
            worn.append(spec.accessory or "none")
    renders, worn = np.stack(renders), np.array(worn)
    wearing = worn != "none"
    round_trips = vae_round_trip(base.pipe.vae, renders)
    asked_cases = accessory_prompts(ACCESSORY_CASES)
    asked = np.stack(draw(base, [p for p, _ in asked_cases]))
    plain = np.stack(draw(base, [c[0] for c in check_prompts(args.plain)]))
    results = {}
    for folder in args.probes or [WORLD_PROBES]:
        probes = Probes(folder)
        crisp, trip, got_asked, got_plain = (np.array(probes.read("attributes", im)["accessory"]) for im in (renders, round_trips, asked, plain))
        results[str(folder)] = {
            "renders_worn_read": float(np.mean(crisp[wearing] == worn[wearing])),
            "round_trips_worn_read": float(np.mean(trip[wearing] == worn[wearing])),
            "round_trips_bare_read_as_worn": float(np.mean(trip[~wearing] != "none")),
            "base_asked_read": float(np.mean(got_asked == np.array([a for _, a in asked_cases]))),
            "base_plain_read_as_worn": float(np.mean(got_plain != "none")),
        }
    lines = [f"Attribute probe, accessory head. {len(worn)} renders of the held-out subjects, two thirds wearing a hat or a "
             f"bow, read as rendered and after the world VAE's round trip; the base's pictures: {ACCESSORY_CASES} asked for an "
             f"accessory, {args.plain} asked for none.", "",
             "| probes | renders wearing one, read right | round trips wearing one, read right | round trips bare, read as "
             "wearing one | base asked, read right | base not asked, read as wearing one |", "|---|---|---|---|---|---|"]
    for folder, r in results.items():
        lines.append(f"| {folder} | {r['renders_worn_read']:.3f} | {r['round_trips_worn_read']:.3f} | "
                     f"{r['round_trips_bare_read_as_worn']:.3f} | {r['base_asked_read']:.3f} | {r['base_plain_read_as_worn']:.3f} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "results.md", table + "\n")
    write_json_atomic(args.out / "results.json", {"per_subject": args.per_subject, "results": results})


if __name__ == "__main__":
    main()
