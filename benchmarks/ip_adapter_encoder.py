"""Is the world's image encoder what holds IP-Adapter back on the world bench? A subject encoder trained to tell one
subject from another across views, measured beside the base's CLIP image tower.

IP-Adapter reads references through a CLIP image encoder far stronger than the text CLIP of the model it serves
(OpenCLIP ViT-H/14 for SD 1.5). The world's CLIP image tower was trained 500 steps on captions, before the world
had its two-tone instances. This script trains that tower on with a contrastive loss between two views of one
subject (another context, pose and scale; each cut out on grey, as IP-Adapter's references are) against every
other subject of the batch, among them a sibling that differs from it in one look (the emblem, its colour, the
split or the second colour). It learns from which views show the same subject, nothing else (no attribute label,
no probe); the bench's held-out subjects never appear (the world stream's `draw_subject`, and a sibling near a
held-out subject is refused). Then it measures what each encoder's pooled embedding (plain IP-Adapter's input)
carries on cut-out views of fresh instances: a linear probe of each look, how often a view's nearest other view
is its own, and its own rather than its sibling's.

    python benchmarks/ip_adapter_encoder.py --out /tmp/views [--steps 800] [--emblem-share 0.25] [--crop]
    limner pretrain --method ip_adapter --data world --set image_encoder=/tmp/views/image_encoder ...

The trained encoder lands in OUT/image_encoder (fp16, the CLIP vision layout, with the base's feature_extractor
beside it: `--set image_encoder=` reads it) and the numbers in OUT/result.json; ip_adapter_encoder/ keeps the
numbers of the runs in benchmarks/README.md (not the weights).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from limner.data.world import WorldSubject, draw_subject, draw_view
from limner.errors import LimnerError
from limner.images import crop_to_subject, cut_out
from limner.io import copy_folder, replace_folder, write_json_atomic
from limner.methods.ip_adapter import FEATURE_EXTRACTOR, IMAGE_ENCODER, ImageEncoder
from limner.models.loading import WORLD_BASE
from limner.training import TrainConfig, TrainingTask, train
from limner.world import vocab
from limner.world.render import SPLITS
from limner.world.scenes import near_heldout_subject, with_article

LOOKS = ("cls", "colour_a", "colour_b", "split", "emblem", "emblem_colour")


@dataclass
class ViewsBuildConfig:
    steps: int = 800
    families: int = 48  # subjects a batch (each instance with a sibling), two views each
    lr: float = 1e-4
    temperature: float = 0.07
    emblem_share: float = 0.25  # of siblings that differ in the emblem; the rest split the other three looks evenly
    crop: bool = False  # each cut-out view cropped to the subject's box (IP-Adapter's pair=crop), as it will read them
    loss: str = (
        "views"  # views: two views of a subject against the batch; captions: each view against its looks' words
    )
    seed: int = 0
    checkpoint_every: int = 100


def sibling(rng: np.random.Generator, subject: WorldSubject, emblem_share: float = 0.25) -> WorldSubject:
    """The instance with one look changed (emblem, emblem colour, split or second colour), never one near a
    held-out subject: the negative that only that look tells apart."""
    s = subject.instance
    others = (1 - emblem_share) / 3
    while True:
        look = str(
            rng.choice(["emblem", "emblem_colour", "split", "colour_b"], p=[emblem_share, others, others, others])
        )
        if look == "emblem":
            new = replace(s, emblem=str(rng.choice([e for e in vocab.EMBLEMS if e != s.emblem])))
        elif look == "split":
            new = replace(s, split=next(x for x in SPLITS if x != s.split))
        else:
            taken = {s.colour_a, s.colour_b, s.emblem_colour}
            new = replace(s, **{look: str(rng.choice([c for c in vocab.COLOURS if c not in taken]))})
        if not near_heldout_subject(new):
            return replace(subject, instance=new)


def reference_view(image: np.ndarray, mask: np.ndarray, crop: bool) -> np.ndarray:
    """A view as IP-Adapter reads it as a reference: cut out on grey, and cropped to the subject with pair=crop."""
    return crop_to_subject(image, mask) if crop else cut_out(image, mask)


def view_pairs(
    rng: np.random.Generator, families: int, emblem_share: float = 0.25, crop: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two cut-out views [N, 64, 64, 3] of each subject of `families` families (an instance and its sibling, or
    one plain object or character), and each subject's family [N]."""
    first, second, family = [], [], []
    for f in range(families):
        subject = draw_subject(rng)
        for s in [subject, sibling(rng, subject, emblem_share)] if subject.kind == "instance" else [subject]:
            for views in (first, second):
                image, _, mask = draw_view(rng, s)
                views.append(reference_view(image, mask, crop))
            family.append(f)
    return np.stack(first), np.stack(second), np.array(family)


class ViewContrast(TrainingTask):
    """Symmetric InfoNCE between the pooled embeddings of two views of each subject in the batch."""

    def __init__(self, model: nn.Module, temperature: float):
        self.model, self.temperature = model.float().train().requires_grad_(True), temperature

    def modules(self) -> dict[str, nn.Module]:
        return {"image_encoder": self.model}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        model = self.wrapped.get("image_encoder", self.model)
        a, b = (F.normalize(model(pixel_values=batch[k]).image_embeds, dim=-1) for k in ("first", "second"))
        logits = a @ b.T / self.temperature
        labels = torch.arange(len(a), device=a.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def looks_caption(subject: WorldSubject) -> str:
    """An instance's looks in the world's caption words, no context (a reference is cut out): 'a red and white
    ball with a blue heart' (the split has no word: siblings that differ in it share a caption)."""
    s = subject.instance
    return f"{with_article(f'{s.colour_a} and {s.colour_b} {s.cls}')} with {with_article(f'{s.emblem_colour} {s.emblem}')}"


class CaptionContrast(ViewContrast):
    """CLIP's loss with the text side frozen: each view's pooled embedding against the world CLIP's embedding of
    its looks' caption, over the batch (identical captions are positives for each other, as the world's CLIP stage
    trained), so the image embedding stays in the space of the words the base was trained on."""

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        model = self.wrapped.get("image_encoder", self.model)
        image = F.normalize(model(pixel_values=batch["views"]).image_embeds, dim=-1)
        logits = image @ batch["texts"].T / self.temperature
        same = (batch["caption_ids"][:, None] == batch["caption_ids"][None, :]).float()
        target = same / same.sum(1, keepdim=True)
        return (
            torch.sum(-target * logits.log_softmax(1), 1) + torch.sum(-target * logits.log_softmax(0).T, 1)
        ).mean() / 2


def caption_batches(cfg: ViewsBuildConfig, encoder: ImageEncoder):
    """next_batch: one view of each instance and its sibling, with the frozen world CLIP's embedding of its caption."""
    from limner.encoders.clip import WorldCLIP

    clip, embedded = WorldCLIP(WORLD_BASE), {}  # the text side is frozen: each caption is encoded once

    def texts(captions: list[str]) -> torch.Tensor:
        new = sorted(set(captions) - set(embedded))
        if new:
            embedded.update(zip(new, clip.texts(new)))
        return torch.stack([embedded[c] for c in captions])

    def next_batch(generator: torch.Generator) -> dict:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        views, captions = [], []
        while len(views) < 2 * cfg.families:
            subject = draw_subject(rng)
            if subject.kind != "instance":
                continue
            for s in (subject, sibling(rng, subject, cfg.emblem_share)):
                image, _, mask = draw_view(rng, s)
                views.append(reference_view(image, mask, cfg.crop))
                captions.append(looks_caption(s))
        names = sorted(set(captions))
        return {
            "views": encoder.pixels(views),
            "texts": texts(captions),
            "caption_ids": torch.tensor([names.index(c) for c in captions]),
        }

    return next_batch


def view_batches(cfg: ViewsBuildConfig, encoder: ImageEncoder):
    """next_batch: view pairs as the encoder's pixel values, preprocessed as IP-Adapter preprocesses references."""

    def next_batch(generator: torch.Generator) -> dict:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        first, second, _ = view_pairs(rng, cfg.families, cfg.emblem_share, cfg.crop)
        swap = torch.rand(len(first), generator=generator).numpy() < 0.5  # neither side is always "the reference"
        return {
            "first": encoder.pixels(list(np.where(swap[:, None, None, None], second, first))),
            "second": encoder.pixels(list(np.where(swap[:, None, None, None], first, second))),
        }

    return next_batch


def train_views(start: Path, out: Path, work: Path, cfg: ViewsBuildConfig) -> dict:
    """Trains the encoder in `start`/image_encoder (the world base's CLIP image tower) on view pairs (resumable
    from `work`); writes it to `out` in fp16 with `start`'s feature extractor; returns what was run."""
    t0 = time.time()
    encoder = ImageEncoder(Path(start) / IMAGE_ENCODER)
    settings = TrainConfig(
        max_steps=cfg.steps,
        batch_size=cfg.families,
        learning_rate=cfg.lr,
        weight_decay=0.01,
        lr_schedule="cosine",
        lr_warmup_steps=min(50, cfg.steps // 10),
        seed=cfg.seed,
        checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=1,
        resume="latest",
    )
    captions = cfg.loss == "captions"
    task = (CaptionContrast if captions else ViewContrast)(encoder.model, cfg.temperature)
    batches = (caption_batches if captions else view_batches)(cfg, encoder)
    log = train(
        task, batches, settings, work / ("view_encoder" if cfg.loss == "views" else "captions_encoder"), cfg.loss
    )
    out.mkdir(parents=True, exist_ok=True)
    replace_folder(out / IMAGE_ENCODER, task.model.eval().half().save_pretrained)
    copy_folder(Path(start) / FEATURE_EXTRACTOR, out / FEATURE_EXTRACTOR)
    return {
        "started_from": "the world base's image_encoder",
        "settings": asdict(cfg),
        "steps": log.steps,
        "seconds": round(time.time() - t0, 1),
        "curve": log.curve[:: max(1, len(log.curve) // 100)] + log.curve[-1:],  # ~100 points and the last
    }


def _embed(encoder: ImageEncoder, images: np.ndarray) -> torch.Tensor:
    """The pooled embeddings plain IP-Adapter reads, 250 pictures at a time."""
    chunks = [list(images[i : i + 250]) for i in range(0, len(images), 250)]
    return torch.cat([encoder.features(encoder.pixels(chunk), "plain") for chunk in chunks])


def _linear_probe(train_x: torch.Tensor, train_y: list, test_x: torch.Tensor, test_y: list) -> float:
    """Held-out accuracy of a softmax regression (features standardised on the training half)."""
    classes = sorted(set(train_y) | set(test_y))
    ty, vy = (torch.tensor([classes.index(c) for c in y]) for y in (train_y, test_y))
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    tx, vx = (train_x - mean) / std, (test_x - mean) / std
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(tx.shape[1], len(classes), generator=g) * 0.01).requires_grad_(True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        (F.cross_entropy(tx @ w + b, ty) + 1e-3 * w.pow(2).sum()).backward()
        opt.step()
    return float(((vx @ w + b).argmax(-1) == vy).float().mean())


def measure_views(folder: Path, n: int = 1500, seed: int = 12345, crop: bool = False) -> dict:
    """What the encoder in `folder`/image_encoder carries, on cut-out views of fresh subjects: a linear probe's
    accuracy for each look of an instance (trained on n instances, tested on n // 3 others), and, on a fresh set
    of families, how often a view's nearest other view is its own (among all) and its own rather than its
    sibling's."""
    folder = Path(folder)
    if not (folder / IMAGE_ENCODER / "config.json").is_file():
        raise LimnerError(
            f"{folder} holds no {IMAGE_ENCODER}/config.json: give a folder this script wrote (or the base)"
        )
    encoder = ImageEncoder(folder / IMAGE_ENCODER)
    rng = np.random.default_rng(seed)
    views, looks = [], {k: [] for k in LOOKS}
    while len(views) < n + n // 3:
        subject = draw_subject(rng)
        if subject.kind == "instance":
            image, _, mask = draw_view(rng, subject)
            views.append(reference_view(image, mask, crop))
            for k in LOOKS:
                looks[k].append(getattr(subject.instance, k))
    x = _embed(encoder, np.stack(views))
    probe = {k: round(_linear_probe(x[:n], v[:n], x[n:], v[n:]), 3) for k, v in looks.items()}
    chance = {k: round(1 / len(set(v)), 3) for k, v in looks.items()}
    first, second, family = view_pairs(rng, max(20, n // 5), crop=crop)
    a, b = (F.normalize(_embed(encoder, v), dim=-1) for v in (first, second))
    sim = a @ b.T
    own = sim.diagonal()
    pairs = [i for i in range(len(family) - 1) if family[i] == family[i + 1]]  # an instance and its sibling
    beside = [float(own[i] > sim[i, i + 1]) for i in pairs] + [float(own[i + 1] > sim[i + 1, i]) for i in pairs]
    return {
        "linear_probe": probe,
        "chance": chance,
        "view_top1": round(float((sim.argmax(1) == torch.arange(len(a))).float().mean()), 3),
        "views": len(a),
        "own_view_over_sibling": round(float(np.mean(beside)), 3) if beside else None,
    }


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the encoder and result.json")
    parser.add_argument("--work", type=Path, default=None, help="checkpoints (resumable); default OUT/work")
    parser.add_argument("--steps", type=int, default=ViewsBuildConfig.steps)
    parser.add_argument("--emblem-share", type=float, default=ViewsBuildConfig.emblem_share)
    parser.add_argument("-n", type=int, default=1500, help="instances the linear probes learn from")
    parser.add_argument("--crop", action="store_true", help="views cropped to the subject (IP-Adapter's pair=crop)")
    parser.add_argument(
        "--loss", choices=("views", "captions"), default="views", help="what a view is pulled towards (see the config)"
    )
    args = parser.parse_args()
    if args.steps < 1 or not 0 <= args.emblem_share <= 1 or args.n < 30:
        parser.error("--steps must be at least 1, --emblem-share between 0 and 1, -n at least 30")
    cfg = ViewsBuildConfig(steps=args.steps, emblem_share=args.emblem_share, crop=args.crop, loss=args.loss)
    record = train_views(WORLD_BASE, args.out, args.work or args.out / "work", cfg)
    record["measured"] = {
        "encoder": measure_views(args.out, args.n, crop=args.crop),
        "base": measure_views(WORLD_BASE, args.n, crop=args.crop),
    }
    write_json_atomic(args.out / "result.json", record)
    print(json.dumps(record["measured"], indent=2))


if __name__ == "__main__":
    main()
