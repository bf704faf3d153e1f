"""How closely the world IdentityNet stored as a delta against the world UNet (limner.adapters.controlnet's
`save_controlnet_delta`: each copied matrix's change as a truncated-SVD factor pair) reproduces the full one, by
what it does rather than by its weights: the IdentityNet's inputs are recorded during real generations (held-out
people, 1 reference each, their own pose, 10 dpm++ steps, so timesteps across the schedule), and the residuals the
full and the compressed IdentityNet give on those inputs are compared (relative error: the norm of the difference
over the full residuals' norm, all 13 residuals together, and the worst single one).

    python benchmarks/instantid_identitynet_delta.py FULL_ADAPTER [OUT_JSON]

FULL_ADAPTER: an InstantID adapter folder whose ControlNetModel/ holds full weights (what `limner pretrain` writes,
e.g. the shipped one's source run /work/pretrain/instantid).
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

from limner.adapters.controlnet import (
    DELTA_WEIGHTS,
    controlnet_from_unet,
    installed_signals,
    load_controlnet,
    save_controlnet_delta,
)
from limner.conditioning import apply_concepts
from limner.evaluation.subjects import world_subjects
from limner.generation import GenerationSettings, generate
from limner.methods import Subject, get_method
from limner.models.loading import load_base

torch.set_grad_enabled(False)
PEOPLE, STEPS = 3, 10
CANDIDATES = [{"rank": r} for r in (16, 32, 64, 96, 128)] + [{"energy": e} for e in (0.8, 0.9, 0.95, 0.98, 0.99)]
full_adapter = Path(sys.argv[1])
out_json = Path(sys.argv[2]) if len(sys.argv) > 2 else None
base = load_base(None, device="cpu")
unet = base.pipe.unet
method = get_method("instantid")
full = load_controlnet(full_adapter / "ControlNetModel", unet)
tmp = Path(tempfile.mkdtemp())

# the IdentityNet's inputs in real generations
calls = []
for k, person in enumerate(world_subjects("world:identities")[:PEOPLE]):
    concept = method.personalize(
        base, Subject(person.name, person.class_noun, [person.images[0]]), tmp / person.name, adapter=full_adapter
    )
    prompt = f"a portrait of a {person.class_noun}"
    with apply_concepts(base, [concept]) as applied:
        net = installed_signals(unet)[0].controlnet
        hook = net.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append((args, dict(kwargs))), with_kwargs=True
        )
        try:
            s = GenerationSettings(prompt, num_images=2, steps=STEPS, batch_size=2, seed=k)
            generate(base, s, conditioning=applied.condition(prompt, s.steps))
        finally:
            hook.remove()


def residuals(controlnet):
    out = []
    for args, kwargs in calls:
        down, mid = controlnet(*args, **kwargs)
        out.append([*down, mid])
    return out


def relative_errors(got, reference):
    diff = sum(float((a - b).pow(2).sum()) for ra, rb in zip(got, reference) for a, b in zip(ra, rb))
    norm = sum(float(b.pow(2).sum()) for rb in reference for b in rb)
    worst = max(float((a - b).norm() / b.norm()) for ra, rb in zip(got, reference) for a, b in zip(ra, rb))
    return round((diff / norm) ** 0.5, 4), round(worst, 4)


reference = residuals(full)
# the scale of the question: the training's change to the copied tensors dropped altogether (the UNet's own tensors,
# the condition encoder and zero convolutions as trained)
untrained_copy = controlnet_from_unet(unet)
shared = set(unet.state_dict())
untrained_copy.load_state_dict({k: v for k, v in full.state_dict().items() if k not in shared}, strict=False)
error, worst = relative_errors(residuals(untrained_copy), reference)
rows = [{"change": "dropped", "residual_rel_error": error, "worst_residual_rel_error": worst}]
print(json.dumps(rows[0]), flush=True)
for candidate in CANDIDATES:
    folder = tmp / "net"
    meta = save_controlnet_delta(full, unet, folder, **candidate)
    compact = load_controlnet(folder, unet)
    error, worst = relative_errors(residuals(compact), reference)
    row = {
        **candidate,
        "ranks": meta["ranks"],
        "mb": round((folder / DELTA_WEIGHTS).stat().st_size / 1e6, 2),
        "residual_rel_error": error,
        "worst_residual_rel_error": worst,
    }
    rows.append(row)
    print(json.dumps(row), flush=True)
record = {"full_adapter": str(full_adapter), "people": PEOPLE, "steps": STEPS, "calls": len(calls), "rows": rows}
if out_json:
    out_json.write_text(json.dumps(record, indent=1) + "\n")
