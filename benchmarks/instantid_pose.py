"""InstantID's claim that the IdentityNet steers the pose, measured on the world: each of the 8 held-out people is
encoded from 1 reference with the pose of another picture (`pose_image`: 2 pose pictures per person from the world
stream, whose faces sit elsewhere and at other sizes than the reference's), and drawn with the IdentityNet at its
default scale (0.8) and switched off (controlnet_scale 0: the Image Adapter alone). The world face analyser finds
the generated face; its 5 keypoints are compared with the requested ones (pixels of the 64 px picture, mean over
the 5 points). Chance: the error between two unrelated pose pictures' keypoints (what a drawing that ignores the
pose scores on average).

    python benchmarks/instantid_pose.py [ADAPTER] [OUT_JSON] [OUT_PNG]
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from limner.adapters.controlnet import draw_kps
from limner.conditioning import apply_concepts
from limner.data import open_stream
from limner.encoders.faces import face_analysis, largest_face
from limner.evaluation.subjects import world_subjects
from limner.generation import GenerationSettings, generate
from limner.methods import Subject, get_method
from limner.models.loading import load_base

torch.set_grad_enabled(False)
IMAGES, POSES_PER_PERSON, SCALES = 4, 2, (0.8, 0.0)
args = sys.argv[1:]
base = load_base(None)
method = get_method("instantid")
adapter = method.adapter_for(base, args[0] if args else None)
out_json = Path(args[1]) if len(args) > 1 else Path("docs/world-bench-identities/instantid-pose.json")
out_png = Path(args[2]) if len(args) > 2 else Path("docs/world-bench-identities/instantid-pose.png")
faces = face_analysis(None)
people = world_subjects("world:identities")

# pose pictures: world characters (training identities: only their keypoints are used) with one face found
stream = iter(open_stream("world", pair="view", subjects="characters", clothes="vary", seed=123))
poses = []
while len(poses) < POSES_PER_PERSON * len(people):
    picture = next(stream).image
    found = faces.analyse([picture])[0]
    if len(found) == 1:
        poses.append((picture, found[0].keypoints))
chance = float(
    np.mean([np.linalg.norm(a[1] - b[1], axis=1).mean() for i, a in enumerate(poses) for b in poses[i + 1 :]])
)

tmp = Path(tempfile.mkdtemp())
rows, sheet = [], []
for k, person in enumerate(people):
    for j in range(POSES_PER_PERSON):
        picture, wanted = poses[k * POSES_PER_PERSON + j]
        pose_file = tmp / f"pose-{k}-{j}.png"
        Image.fromarray(picture).save(pose_file)
        concept = method.personalize(
            base,
            Subject(person.name, person.class_noun, [person.images[0]]),
            tmp / f"{person.name}-{j}",
            adapter=adapter,
            pose_image=str(pose_file),
        )
        prompt = f"a {person.class_noun}"
        drawn = {}
        with apply_concepts(base, [concept]) as applied:
            for scale in SCALES:
                method.set_call_settings(base, [concept], {"controlnet_scale": scale})
                s = GenerationSettings(prompt, num_images=IMAGES, steps=25, batch_size=IMAGES, seed=100 * k + j)
                drawn[scale] = generate(base, s, conditioning=applied.condition(prompt, s.steps)).images
        for scale, images in drawn.items():
            for im in images:
                face = largest_face(faces.analyse([np.asarray(im)])[0])
                error = None if face is None else float(np.linalg.norm(face.keypoints - wanted, axis=1).mean())
                rows.append({"person": person.name, "pose": j, "controlnet_scale": scale, "error_px": error})
        if j == 0:  # the pose drawn, then the pictures with and without the IdentityNet
            strip = [draw_kps(64, 64, wanted), np.asarray(person.images[0])]
            strip += [np.asarray(im) for im in drawn[SCALES[0]][:2]] + [np.asarray(im) for im in drawn[SCALES[1]][:2]]
            sheet.append(np.concatenate(strip, axis=1))

summary = {}
for scale in SCALES:
    errors = [r["error_px"] for r in rows if r["controlnet_scale"] == scale]
    found = [e for e in errors if e is not None]
    summary[f"controlnet_scale={scale}"] = {
        "images": len(errors),
        "face_found": round(len(found) / len(errors), 3),
        "keypoint_error_px_mean": round(float(np.mean(found)), 2) if found else None,
        "keypoint_error_px_median": round(float(np.median(found)), 2) if found else None,
        "within_4px": round(float(np.mean([e <= 4 for e in found])), 3) if found else None,
    }
summary["chance_error_px"] = round(chance, 2)
record = {
    "adapter": str(adapter),
    "people": len(people),
    "poses_per_person": POSES_PER_PERSON,
    "images_per_pose": IMAGES,
    "summary": summary,
    "rows": rows,
}
out_json.write_text(json.dumps(record, indent=1) + "\n")
Image.fromarray(np.concatenate(sheet, axis=0)).resize((6 * 64 * 3, len(sheet) * 64 * 3), Image.NEAREST).save(out_png)
print(json.dumps(summary, indent=1))
