"""PhotoMaker's identity mixing on the world: two held-out people of one class stacked at one trigger, their shares of
the stack set by their weights (3:1, 1:1, 1:3 over 4 + 4 references: 6/2, 4/4, 2/6 stacked tokens). For each pair
and weight, 4 context prompts x 2 seeds ("a portrait of a CLASS img CONTEXT", 25 dpm++ steps, guidance 5); Face-Sim
(the world identity embedder, mean cosine to each person's 5 references, as eval scores it) of the drawings to
either person. Also each person alone (weight 1, 4 references), as the ends of the scale.

    python benchmarks/photomaker_mixing.py [ADAPTER]
"""

import sys
import tempfile

import numpy as np
import torch

from limner.conditioning import apply_concepts
from limner.encoders.faces import WorldFaceEmbedder
from limner.evaluation.subjects import load_subjects
from limner.generation import GenerationSettings, generate
from limner.methods import Subject, get_method
from limner.models.loading import WORLD_PROBES, load_base
from limner.world import vocab

torch.set_grad_enabled(False)
base = load_base(None)
method = get_method("photomaker")
adapter = method.adapter_for(base, sys.argv[1] if len(sys.argv) > 1 else None)
people = {p.name: p for p in load_subjects("world:identities")}
faces = WorldFaceEmbedder(WORLD_PROBES)
PAIRS = [("ada", "eve"), ("ben", "finn"), ("cleo", "hana"), ("dev", "gus")]
WEIGHTS = {"A alone": (1, 0), "3:1": (3, 1), "1:1": (1, 1), "1:3": (1, 3), "B alone": (0, 1)}


def reference_embeddings(name: str) -> torch.Tensor:
    emb, found = faces.faces(list(people[name].images))
    return emb[found]


def concept(name: str, weight: float):
    p = people[name]
    return method.personalize(
        base, Subject(name, p.class_noun, list(p.images[:4])), tempfile.mkdtemp(), adapter=adapter, weight=weight
    )


rows: dict[str, list[tuple[float, float]]] = {k: [] for k in WEIGHTS}
for a, b in PAIRS:
    refs = {n: reference_embeddings(n) for n in (a, b)}
    for label, (wa, wb) in WEIGHTS.items():
        concepts = [concept(n, w) for n, w in ((a, wa), (b, wb)) if w > 0]
        drawn = []
        with apply_concepts(base, concepts) as applied:
            for context in list(vocab.CONTEXTS.values())[:4]:
                prompt = f"a portrait of a {people[a].class_noun} img {context}"
                s = GenerationSettings(prompt, num_images=2, steps=25, guidance_scale=5.0, scheduler="dpm++", seed=0)
                drawn += generate(base, s, conditioning=applied.condition(prompt, s.steps)).images
        emb, found = faces.faces(drawn)
        sim = {n: float((emb[found] @ refs[n].T).mean()) for n in (a, b)}
        rows[label].append((sim[a], sim[b]))
        print(f"{a}+{b} {label}: Face-Sim to {a} {sim[a]:.3f}, to {b} {sim[b]:.3f} ({int(found.sum())} faces)")
print("\n| weights A:B | Face-Sim to A | Face-Sim to B | A - B |\n|---|---|---|---|")
for label, values in rows.items():
    sa, sb = np.mean([v[0] for v in values]), np.mean([v[1] for v in values])
    print(f"| {label} | {sa:.3f} | {sb:.3f} | {sa - sb:+.3f} |")
