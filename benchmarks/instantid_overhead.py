"""InstantID's encode time per person and generation latency against the bare base: one process, the three
alternating (so load drifts hit all alike), 6 batches of 4 images each (25 dpm++ steps, guidance 5; the fastest
and the median reported): the bare base; InstantID with the IdentityNet switched off (controlnet_scale 0: the
Image Adapter's decoupled attention alone); InstantID as it runs by default (the IdentityNet's extra pass at
every step).

    python benchmarks/instantid_overhead.py [ADAPTER]
"""

import sys
import tempfile
import time

import torch

from limner.conditioning import apply_concepts
from limner.evaluation.subjects import world_subjects
from limner.generation import GenerationSettings, generate
from limner.methods import Subject, get_method
from limner.models.loading import load_base

torch.set_grad_enabled(False)
base = load_base(None)
method = get_method("instantid")
adapter = method.adapter_for(base, sys.argv[1] if len(sys.argv) > 1 else None)
people = world_subjects("world:identities")
encodes = []
for person in people:  # 1 reference each, the adapter read each time (what `limner generate --image` pays)
    t = time.perf_counter()
    concept = method.personalize(
        base, Subject(person.name, person.class_noun, [person.images[0]]), tempfile.mkdtemp(), adapter=adapter
    )
    encodes.append(time.perf_counter() - t)
prompt = f"a portrait of a {people[-1].class_noun} on the beach"
s = GenerationSettings(prompt, num_images=4, steps=25, batch_size=4, seed=0)
timings: dict[str, list[float]] = {"bare": [], "adapter only": [], "instantid": []}
generate(base, s)
for _ in range(6):
    t = time.perf_counter()
    generate(base, s)
    timings["bare"].append(time.perf_counter() - t)
    with apply_concepts(base, [concept]) as applied:
        for name, scale in (("adapter only", 0.0), ("instantid", 0.8)):
            method.set_call_settings(base, [concept], {"controlnet_scale": scale})
            cond = applied.condition(s.prompt, s.steps)
            t = time.perf_counter()
            generate(base, s, conditioning=cond)
            timings[name].append(time.perf_counter() - t)
best = {k: min(v) / 4 for k, v in timings.items()}
median = {k: sorted(v)[len(v) // 2] / 4 for k, v in timings.items()}
print(f"encode per person (1 reference, adapter read each time): mean {sum(encodes) / len(encodes):.3f} s, "
      f"max {max(encodes):.3f} s")  # fmt: skip
print(
    f"threads {torch.get_num_threads()}: bare {best['bare']:.4f} s/image, adapter only {best['adapter only']:.4f} "
    f"({100 * (best['adapter only'] / best['bare'] - 1):+.1f}%), InstantID {best['instantid']:.4f} "
    f"({100 * (best['instantid'] / best['bare'] - 1):+.1f}%)"
)
print(
    f"medians: bare {median['bare']:.4f}, adapter only {median['adapter only']:.4f} "
    f"({100 * (median['adapter only'] / median['bare'] - 1):+.1f}%), InstantID {median['instantid']:.4f} "
    f"({100 * (median['instantid'] / median['bare'] - 1):+.1f}%)"
)
for k, v in timings.items():
    print(k, [round(x, 3) for x in v])
