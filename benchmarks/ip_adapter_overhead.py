"""Generation latency with an IP-Adapter concept against the bare base: one process, the two alternating (so
load drifts hit both alike), the fastest of 6 batches of 4 images each (25 dpm++ steps, guidance 5).

    python benchmarks/ip_adapter_overhead.py src/limner/assets/world/adapters/ip_adapter-plain
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

adapter = sys.argv[1]
base = load_base(None)
subject = load_subjects("world:objects")[0]
concept = get_method("ip_adapter").personalize(base, subject, tempfile.mkdtemp(), adapter=adapter)
s = GenerationSettings("a ball on the beach", num_images=4, steps=25, batch_size=4, seed=0)
bare, ip = [], []
generate(base, s)
for _ in range(6):
    t = time.perf_counter()
    generate(base, s)
    bare.append(time.perf_counter() - t)
    with apply_concepts(base, [concept]) as applied:
        cond = applied.condition(s.prompt, s.steps)
        t = time.perf_counter()
        generate(base, s, conditioning=cond)
        ip.append(time.perf_counter() - t)
b, i = min(bare) / 4, min(ip) / 4
print(
    f"threads {torch.get_num_threads()}: bare {b:.4f} s/image, with adapter {i:.4f}, overhead {100 * (i / b - 1):+.1f}%"
)
print("bare", [round(x, 3) for x in bare])
print("ip", [round(x, 3) for x in ip])
