"""Probes: small classifiers trained on renderer ground truth, the world's measuring instruments.

- `attributes`: class (12), colour (11: an object's colour, a character's shirt), accessory (an
  object's hat or bow) and context (8) of a single-entity image;
- `accessory`: whether an object wears a hat, a bow or nothing, read the way a generator draws them;
- `subject`: which of the 12 held-out object subjects is shown, or "other";
- `identity`: an identity embedder for characters. Like ArcFace it maps a face to a unit vector whose
  cosine says "same person"; it is trained to predict every identity factor, so it generalises to
  identities it never saw (the held-out ones among them).
They are trained with blur and noise so that they judge generated images, not only clean renders. The
subject probe, whose readings hinge on fine detail (a split, an emblem), also learns from the world VAE's
round trip of its renders and from a generator's loss of detail (`lose_detail`): trained on crisp renders
alone it read a plainly green-and-white cup with a red cross, once the base model had redrawn it, as a
teddy or a star. Accessories are the same kind of detail: the attribute probe's accessory head, trained on
crisp renders alone, read a hat on none of the VAE's round trips of renders wearing one (the base draws a
hat as a blurred cone), so the accessory probe, trained generator-styled on objects alone, reads them
instead (`ATTRIBUTE_READERS`). A generator-styled attribute probe was tried first: its class head fell
to 0.84 on fresh renders (benchmarks/attribute_probe).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from limner.images import to_unit_range
from limner.io import write_json_atomic, written_atomically
from limner.world import vocab
from limner.world.bench import IDENTITIES, SUBJECTS, heldout_identity_keys, identity_character, subject_object
from limner.world.render import Render, Scene, render
from limner.world.scenes import random_character, random_object

OTHER = "other"


class ProbeNet(nn.Module):
    """A small CNN: 64 px image -> feature vector -> one linear head per task. The first convolution
    strides by 2, which keeps a training step cheap on a laptop CPU."""

    def __init__(self, heads: dict[str, int], width: int = 16, feature_dim: int = 128):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.SiLU(),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.SiLU(),  # 32 px
            block(width, width * 2),
            block(width * 2, width * 4),  # 16, 8 px
            block(width * 4, width * 4),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # 4 px
            nn.Linear(width * 4, feature_dim),
            nn.SiLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, n) for name, n in heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        out = {name: head(f) for name, head in self.heads.items()}
        out["embedding"] = F.normalize(f, dim=-1)
        return out


@dataclass
class ProbeSpec:
    name: str
    labels: dict[str, list[str]]  # head -> label names
    generator_styled: bool = False  # trained also on VAE round trips, with `lose_detail` (needs the world VAE)
    train_size: int | None = None  # renders to train on, where fewer than the build's default will do

    def heads(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.labels.items()}


ATTRIBUTES = ProbeSpec(
    "attributes",
    {
        "class": list(vocab.CLASSES),
        "colour": list(vocab.COLOURS),
        "accessory": ["none", *vocab.OBJECT_ACCESSORIES],
        "context": list(vocab.CONTEXTS),
    },
)
IGNORE = -100  # a head with nothing to say about this image (e.g. accessory of a character)
# three classes need fewer renders, and each one's VAE round trip is most of the probe's cost (120 ms on a laptop CPU)
ACCESSORY = ProbeSpec(
    "accessory", {"accessory": ATTRIBUTES.labels["accessory"]}, generator_styled=True, train_size=6000
)
SUBJECT = ProbeSpec("subject", {"subject": [s.name for s in SUBJECTS] + [OTHER]}, generator_styled=True)
IDENTITY = ProbeSpec("identity", {k: [str(i) for i in range(n)] for k, n in vocab.IDENTITY_FACTORS.items()})
SPECS = {s.name: s for s in (ATTRIBUTES, ACCESSORY, SUBJECT, IDENTITY)}
# which probe reads each attribute a prompt can ask for
ATTRIBUTE_READERS = {"class": "attributes", "colour": "attributes", "context": "attributes", "accessory": "accessory"}


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [B, 64, 64, 3] (or a float tensor already in [-1, 1], [B, 3, 64, 64]) -> probe input."""
    if isinstance(images, np.ndarray):
        images = to_unit_range(images)
    if images.shape[-1] != 64:
        images = F.interpolate(images, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    return images


def degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random blur and noise, the kinds of damage a small generator does to an image."""
    b = x.shape[0]
    level = torch.randint(0, 4, (b,), generator=g)  # blur sigma 0, 0.5, 0.8, 1.2
    out = x.clone()
    for i, sigma in enumerate((0.5, 0.8, 1.2), start=1):
        sel = level == i
        if sel.any():
            out[sel] = gaussian_blur(x[sel], sigma, radius=2)
    noise = torch.randn(out.shape, generator=g) * torch.rand(b, 1, 1, 1, generator=g) * 0.12
    return (out + noise).clamp(-1, 1)


def gaussian_blur(x: torch.Tensor, sigma: float, radius: int = 3) -> torch.Tensor:
    """Separable Gaussian blur of [B, 3, H, W] images, edges replicated."""
    k = torch.arange(-radius, radius + 1).float()
    kernel = torch.exp(-(k**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel, groups=3)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.transpose(2, 3), groups=3)


def lose_detail(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """What the world's base model does to a picture it draws: detail lost to a grid as coarse as its
    16 x 16 latents, blur, a colour cast, noise."""
    b = x.shape[0]
    out = x.clone()
    grid = torch.tensor([16, 24, 32, 64])[torch.randint(0, 4, (b,), generator=g)]
    for size in (16, 24, 32):
        sel = grid == size
        if sel.any():
            small = F.interpolate(out[sel], size=(size, size), mode="bilinear", antialias=True)
            out[sel] = F.interpolate(small, size=(64, 64), mode="bilinear")
    blur = torch.randint(0, 4, (b,), generator=g)
    for level, sigma in enumerate((0.5, 0.9, 1.3), start=1):
        sel = blur == level
        if sel.any():
            out[sel] = gaussian_blur(out[sel], sigma)
    gain = 1 + (torch.rand(b, 3, 1, 1, generator=g) - 0.5) * 0.2
    shift = (torch.rand(b, 1, 1, 1, generator=g) - 0.5) * 0.2
    noise = torch.randn(out.shape, generator=g) * torch.rand(b, 1, 1, 1, generator=g) * 0.12
    return (out * gain + shift + noise).clamp(-1, 1)


@torch.no_grad()
def vae_round_trip(vae, images: np.ndarray, batch: int = 250) -> np.ndarray:
    """uint8 renders -> the same renders encoded and decoded by the world VAE (posterior mean)."""
    out = np.zeros_like(images)
    for i in tqdm(range(0, len(images), batch), desc="vae round trip", mininterval=2):
        x = to_input(images[i : i + batch]).to(vae.device, vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        out[i : i + batch] = y.add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return out


# --------------------------------------------------------------------------------------------
# Training data for each probe, drawn straight from the renderer
# --------------------------------------------------------------------------------------------


def _attributes_sample(rng: np.random.Generator) -> tuple[Render, dict[str, int]]:
    context = str(rng.choice(list(vocab.CONTEXTS)))
    ctx = list(vocab.CONTEXTS).index(context)
    if rng.random() < 0.65:
        o = random_object(rng, 0.5)
        if rng.random() < 0.25:
            o.accessory = str(rng.choice(vocab.OBJECT_ACCESSORIES))
        r = render(Scene(context, [o], variant=int(rng.integers(2**31))))
        acc = 0 if o.accessory is None else 1 + vocab.OBJECT_ACCESSORIES.index(o.accessory)
        return r, {
            "class": vocab.CLASSES.index(o.cls),
            "colour": list(vocab.COLOURS).index(o.colour),
            "accessory": acc,
            "context": ctx,
        }
    c = random_character(rng, 0.5, "portrait" if rng.random() < 0.6 else "full", set())
    r = render(Scene(context, [c], variant=int(rng.integers(2**31))))
    return r, {
        "class": vocab.CLASSES.index(c.cls),
        "colour": list(vocab.COLOURS).index(c.shirt_colour),
        "accessory": IGNORE,
        "context": ctx,
    }


def _accessory_sample(rng: np.random.Generator) -> tuple[Render, dict[str, int]]:
    """An object (a held-out subject 40% of the time, as the world bench draws them) wearing a hat, a
    bow or nothing, a third of the time each."""
    if rng.random() < 0.4:
        spec = subject_object(SUBJECTS[int(rng.integers(len(SUBJECTS)))], rng, scale=(0.18, 0.42))
    else:
        spec = random_object(rng, 0.5, (0.18, 0.42))
    worn = int(rng.integers(3))
    spec.accessory = ACCESSORY.labels["accessory"][worn] if worn else None
    return render(Scene(str(rng.choice(list(vocab.CONTEXTS))), [spec], variant=int(rng.integers(2**31)))), {
        "accessory": worn
    }


def _subject_sample(rng: np.random.Generator) -> tuple[Render, dict[str, int]]:
    context = str(rng.choice(list(vocab.CONTEXTS)))
    if rng.random() < 0.6:
        i = int(rng.integers(len(SUBJECTS)))
        spec = subject_object(SUBJECTS[i], rng, scale=(0.18, 0.42))
        label = i
    else:
        spec = random_object(rng, 0.5, (0.18, 0.42))
        if rng.random() < 0.3:  # same class as some subject, with a random second colour: a near miss
            spec = subject_object(SUBJECTS[int(rng.integers(len(SUBJECTS)))], rng, scale=(0.18, 0.42))
            spec.subject = _near_miss(spec.subject, rng)
        label = len(SUBJECTS)
    if rng.random() < 0.15:  # a subject with a hat is still the subject
        spec.accessory = str(rng.choice(vocab.OBJECT_ACCESSORIES))
    return render(Scene(context, [spec], variant=int(rng.integers(2**31)))), {"subject": label}


def _near_miss(subject, rng: np.random.Generator):
    """A two-tone object like a subject but with one property changed: it must read as 'other'."""
    from dataclasses import replace

    field = rng.choice(["colour_a", "colour_b", "emblem", "emblem_colour"])
    if field == "emblem":
        options = [e for e in vocab.EMBLEMS if e != subject.emblem]
    else:
        options = [c for c in vocab.COLOURS if c != getattr(subject, field)]
    changed = replace(subject, name="near-miss", **{str(field): str(rng.choice(options))})
    if any(replace(changed, name=s.name) == s for s in SUBJECTS):  # landed on another subject
        return replace(subject, name="near-miss", emblem_colour=subject.colour_a)
    return changed


def _identity_sample(rng: np.random.Generator) -> tuple[Render, dict[str, int]]:
    context = str(rng.choice(list(vocab.CONTEXTS)))
    c = random_character(rng, 0.5, "portrait", set(heldout_identity_keys()))
    r = render(Scene(context, [c], variant=int(rng.integers(2**31))))
    return r, dict(zip(vocab.IDENTITY_FACTORS, c.identity.factors()))


SAMPLERS = {
    "attributes": _attributes_sample,
    "accessory": _accessory_sample,
    "subject": _subject_sample,
    "identity": _identity_sample,
}


def make_set(name: str, n: int, seed: int, desc: str | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 64, 64, 3), np.uint8)
    labels: dict[str, list[int]] = {}
    for i in tqdm(range(n), desc=desc or f"render {name}", mininterval=2, disable=desc == ""):
        r, lab = SAMPLERS[name](rng)
        images[i] = r.image
        for k, v in lab.items():
            labels.setdefault(k, []).append(v)
    return images, {k: np.array(v) for k, v in labels.items()}


# --------------------------------------------------------------------------------------------
# Training, saving, loading
# --------------------------------------------------------------------------------------------


def probe_batch(
    spec: ProbeSpec,
    images: np.ndarray,
    labels: dict[str, np.ndarray],
    round_trips: np.ndarray | None,
    batch: int,
    g: torch.Generator,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A training batch of probe `spec` (inputs, labels per head) from its renders: degraded, or for a
    generator-styled probe half as the world VAE gives them back (`round_trips`), all with detail lost.
    The world build trains the probes on it (limner.world.stages.ProbeTask)."""
    if spec.generator_styled and round_trips is None:
        raise ValueError(f"the {spec.name} probe learns from the world VAE's round trips: pass round_trips")
    idx = torch.randint(len(images), (batch,), generator=g).numpy()
    if spec.generator_styled:
        via_vae = (torch.rand(batch, generator=g) < 0.5).numpy()[:, None, None, None]
        x = lose_detail(to_input(np.where(via_vae, round_trips[idx], images[idx])), g)
    else:
        x = degrade(to_input(images[idx]), g)
    return x, {k: torch.from_numpy(labels[k][idx]) for k in spec.labels}


def probe_loss(out: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of every head's cross-entropy (a head with nothing to say about an image is IGNORE there)."""
    return sum(F.cross_entropy(out[k], y.to(out[k].device), ignore_index=IGNORE) for k, y in labels.items())


@torch.no_grad()
def evaluate_probe(net: ProbeNet, name: str, n: int = 2000, seed: int = 12345) -> dict[str, float]:
    """Accuracy of each head on fresh renders the probe never saw (degraded as in training)."""
    spec = SPECS[name]
    images, labels = make_set(name, n, seed, desc="")
    g = torch.Generator().manual_seed(seed)
    preds: dict[str, list[np.ndarray]] = {k: [] for k in spec.labels}
    for i in range(0, n, 250):
        out = net(degrade(to_input(images[i : i + 250]), g))
        for k in spec.labels:
            preds[k].append(out[k].argmax(-1).numpy())
    acc = {}
    for k in spec.labels:
        p, y = np.concatenate(preds[k]), labels[k]
        valid = y != IGNORE
        acc[k] = float((p[valid] == y[valid]).mean())
    if name == "identity":
        acc["heldout_identification"] = identification_accuracy(net)
    return acc


@torch.no_grad()
def identification_accuracy(net: ProbeNet, per_identity: int = 10) -> float:
    """Nearest-centroid identification of the 8 held-out identities: the 5 reference images give each
    identity's centroid; fresh portraits in new poses and contexts must land nearest their own."""
    from limner.world.bench import identity_references

    centroids = torch.stack(
        [embed_identity(net, np.stack([r.image for r in identity_references(b)])).mean(0) for b in IDENTITIES]
    )
    centroids = F.normalize(centroids, dim=-1)
    rng = np.random.default_rng(777)
    correct = total = 0
    for i, b in enumerate(IDENTITIES):
        imgs = np.stack(
            [
                render(
                    Scene(
                        str(rng.choice(list(vocab.CONTEXTS))),
                        [identity_character(b, rng)],
                        variant=int(rng.integers(2**31)),
                    )
                ).image
                for _ in range(per_identity)
            ]
        )
        sims = embed_identity(net, imgs) @ centroids.t()
        correct += int((sims.argmax(-1) == i).sum())
        total += per_identity
    return correct / total


def embed_identity(net: ProbeNet, images) -> torch.Tensor:
    return net(to_input(images))["embedding"]


def save_probe(net: ProbeNet, name: str, folder: Path, metrics: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in net.state_dict().items() if v.dtype.is_floating_point}
    state.update({k: v.contiguous() for k, v in net.state_dict().items() if not v.dtype.is_floating_point})
    with written_atomically(folder / f"{name}.safetensors") as tmp:
        save_file(state, str(tmp))
    write_json_atomic(folder / f"{name}.json", {"labels": SPECS[name].labels, "accuracy": metrics})


def load_probe(folder: Path, name: str) -> ProbeNet:
    from safetensors.torch import load_file

    path = Path(folder) / f"{name}.safetensors"
    if not path.exists():
        from limner.errors import LimnerError

        raise LimnerError(
            f"probe {name!r} not found at {path}; reinstall limner or run `limner world build` to make it"
        )
    net = ProbeNet(SPECS[name].heads())
    state = {k: v.float() if v.dtype.is_floating_point else v for k, v in load_file(str(path)).items()}
    net.load_state_dict(state)
    return net.eval()


def probe_digests(folder: Path) -> dict[str, str]:
    """Which probes read a result: a digest of each probe's weights, so that readings by different
    probes are never mixed."""
    paths = {name: Path(folder) / f"{name}.safetensors" for name in SPECS}
    return {name: hashlib.sha256(path.read_bytes()).hexdigest()[:16] for name, path in paths.items() if path.exists()}


class Probes:
    """All probes of a world folder, loaded lazily, with label-level helpers."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._nets: dict[str, ProbeNet] = {}

    def net(self, name: str) -> ProbeNet:
        if name not in self._nets:
            self._nets[name] = load_probe(self.folder, name)
        return self._nets[name]

    @torch.no_grad()
    def logits(self, name: str, images) -> dict[str, torch.Tensor]:
        """Logits per head for uint8 [B, 64, 64, 3] images."""
        out = self.net(name)(to_input(images))
        return {k: out[k] for k in SPECS[name].labels}

    def predict(self, name: str, images) -> dict[str, torch.Tensor]:
        """Probabilities per head for uint8 [B, 64, 64, 3] images."""
        return {k: v.softmax(-1) for k, v in self.logits(name, images).items()}

    def subject_probabilities(self, images) -> tuple[torch.Tensor, list[str]]:
        """P(subject | one of the held-out subjects) [B, 12] and the subjects' names. The "other" class,
        trained on near misses, rejects anything a generator blurs, so it is left out of the comparison."""
        names = self.labels("subject", "subject")
        keep = [i for i, n in enumerate(names) if n != OTHER]
        return self.logits("subject", images)["subject"][:, keep].softmax(-1), [names[i] for i in keep]

    def labels(self, name: str, head: str) -> list[str]:
        return SPECS[name].labels[head]

    def read(self, name: str, images) -> dict[str, list[str]]:
        """The most likely label of each head for each image."""
        return {k: [SPECS[name].labels[k][int(i)] for i in v.argmax(-1)] for k, v in self.logits(name, images).items()}

    def read_attributes(self, images, heads: tuple[str, ...] = tuple(ATTRIBUTE_READERS)) -> dict[str, list[str]]:
        """The most likely value of each attribute in `heads` for each image, each read by its own probe."""
        readings = {name: self.read(name, images) for name in {ATTRIBUTE_READERS[h] for h in heads}}
        return {h: readings[ATTRIBUTE_READERS[h]][h] for h in heads}
