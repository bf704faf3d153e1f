"""PhotoMaker's encode time per person and generation latency against the bare base, on the world.

Encode: each held-out person from 1 and from 4 references, the adapter read and the ID encoder built each time (as
`limner train --method photomaker` does), the face analysis included; the mean over the 8 people. Generation: one
process, the bare base and PhotoMaker alternating (so load drifts hit both alike), the fastest of 6 batches of 4
images each (25 dpm++ steps, guidance 5). PhotoMaker's time includes its conditioning (the prompt encoded with the
class word stacked, the fuse module), and its UNet carries the LoRA unmerged, as peft runs it; the bare base draws
the same prompt without the trigger.

    python benchmarks/photomaker_overhead.py [ADAPTER]
"""

import sys
import tempfile
import time

import torch

from limner.conditioning import apply_concepts
from limner.evaluation.subjects import load_subjects
from limner.generation import GenerationSettings, generate
from limner.methods import Subject, get_method
from limner.models.loading import load_base

torch.set_grad_enabled(False)
base = load_base(None)
method = get_method("photomaker")
adapter = method.adapter_for(base, sys.argv[1] if len(sys.argv) > 1 else None)
people = load_subjects("world:identities")
encode: dict[int, list[float]] = {1: [], 4: []}
for person in people:
    for n in encode:
        subject = Subject(person.name, person.class_noun, list(person.images[:n]))
        t = time.perf_counter()
        concept = method.personalize(base, subject, tempfile.mkdtemp(), adapter=adapter)
        encode[n].append(time.perf_counter() - t)
prompt = f"a portrait of a {people[0].class_noun} img on the beach"
s = GenerationSettings(prompt, num_images=4, steps=25, batch_size=4, seed=0)
plain = GenerationSettings(prompt.replace(" img", ""), num_images=4, steps=25, batch_size=4, seed=0)
bare, pm = [], []
generate(base, plain)
for _ in range(6):
    t = time.perf_counter()
    generate(base, plain)
    bare.append(time.perf_counter() - t)
    with apply_concepts(base, [concept]) as applied:
        t = time.perf_counter()
        generate(base, s, conditioning=applied.condition(s.prompt, s.steps))
        pm.append(time.perf_counter() - t)
b, p = min(bare) / 4, min(pm) / 4
for n, times in encode.items():
    print(f"encode from {n} reference(s): mean {sum(times) / len(times):.3f} s, max {max(times):.3f} s (8 people)")
print(
    f"threads {torch.get_num_threads()}: bare {b:.4f} s/image, PhotoMaker {p:.4f}, overhead {100 * (p / b - 1):+.1f}%"
)
print("bare", [round(x, 3) for x in bare])
print("photomaker", [round(x, 3) for x in pm])
