"""FastComposer's encode time and generation latency against the bare base: one process, the two alternating (so
load drifts hit both alike), the fastest of 6 batches of 4 images each (25 dpm++ steps, guidance 5). With the
adapter the UNet carries its LoRA (unmerged, as peft runs it) and the prompt embeddings come from the fuse MLP;
the bare base draws the same prompt without the trigger.

    python benchmarks/fastcomposer_overhead.py [ADAPTER]
"""

import sys
import tempfile
import time

import torch

from limner.conditioning import apply_concepts
from limner.evaluation.subjects import load_subjects
from limner.generation import GenerationSettings, generate
from limner.methods import get_method
from limner.models.loading import load_base

torch.set_grad_enabled(False)
base = load_base(None)
method = get_method("fastcomposer")
adapter = method.adapter_for(base, sys.argv[1] if len(sys.argv) > 1 else None)
subject = load_subjects("world:objects")[0]
t = time.perf_counter()
concept = method.personalize(base, subject, tempfile.mkdtemp(), adapter=adapter)
encode = time.perf_counter() - t
prompt = "a ball <|image|> on the beach"
s = GenerationSettings(prompt, num_images=4, steps=25, batch_size=4, seed=0)
plain = GenerationSettings(prompt.replace(" <|image|>", ""), num_images=4, steps=25, batch_size=4, seed=0)
bare, fc = [], []
generate(base, plain)
for _ in range(6):
    t = time.perf_counter()
    generate(base, plain)
    bare.append(time.perf_counter() - t)
    with apply_concepts(base, [concept]) as applied:
        cond = applied.condition(s.prompt, s.steps)
        t = time.perf_counter()
        generate(base, s, conditioning=cond)
        fc.append(time.perf_counter() - t)
b, f = min(bare) / 4, min(fc) / 4
print(f"encode (5 references, adapter loaded each time) {encode:.2f} s")
print(
    f"threads {torch.get_num_threads()}: bare {b:.4f} s/image, FastComposer {f:.4f}, overhead {100 * (f / b - 1):+.1f}%"
)
print("bare", [round(x, 3) for x in bare])
print("fastcomposer", [round(x, 3) for x in fc])
