"""Several separately tuned Custom Diffusion concepts in one model, in closed form (no training).

For each cross-attention key and value projection W, with C_reg the text features of captions whose
meaning must survive and C the features of each concept's own prompts (from its modifier token on,
padding rows included), V the tuned models' outputs on C, limner solves

    W = argmin ||W C_reg^T - W0 C_reg^T||^2 + w ||W C^T - V||^2,   w = 10 N / M per row,

a weighted least-squares form of the paper's equality-constrained problem (its eq. 4-5, W C^T = V): once
padding rows are constrained, C has more rows than the feature dimension and the equality has no
solution. The same solve serves regional composition, where each window gets the merge of the concepts
its prompt names.

`solve="paper"` (`limner merge --solve paper`) is the paper's own: C holds only the rows of its two
prompts ("<new1> dog", "a photo of a <new1> dog") from the modifier token through the end token, no
padding, and the constraint is an equality:

    W = argmin ||W C_reg^T - W0 C_reg^T||   s.t.   W C^T = V
      = W0 + v d^T,   d^T = C (C_reg^T C_reg)^-1,   v = (V - W0 C^T) (d^T C^T)^-1.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from limner.concepts import MANIFEST, check_base, read_manifest, write_json_atomic, write_model_card
from limner.errors import LimnerError
from limner.io import disk_guard
from limner.methods.custom_diffusion.formats import install_weights, layer_weights, read_weights, save_concept
from limner.methods.custom_diffusion.retrieval import world_pool
from limner.methods.textual_inversion import load_embedding
from limner.regions import WindowHook, prompt_names, warn_if_unnamed
from limner.training.conditioning import PromptEncoder

METHOD = "custom_diffusion"  # the manifest's method name (the method module imports this one)

if TYPE_CHECKING:
    from limner.models.loading import Base


@torch.no_grad()
def prompt_features(
    encoder: PromptEncoder, prompts: list[str], from_token: str | None = None, through_end: bool = False
) -> torch.Tensor:
    """Every encoder-output row the UNet's cross-attention sees for these prompts, padding included,
    deduplicated: the inputs of W_k and W_v. With `from_token`, only the rows from that token on: the
    text encoder is causal, so the rows before it (begin token, "a photo of") are the same in every
    prompt and belong to C_reg, not to one concept. The rows after the end token matter as much as the
    phrase: they carry the concept too, and a merge that leaves them out loses it. `through_end`: only
    up to the end token, as the paper constrains them."""
    tokenizer = encoder.tokenizers[0]
    feats = encoder.encode(encoder.tokenize(prompts))[0].float().cpu()
    ids = tokenizer(
        prompts, padding="max_length", truncation=True, max_length=feats.shape[1], return_tensors="pt"
    ).input_ids
    first = [0] * len(prompts)
    if from_token is not None:
        token_id = tokenizer.convert_tokens_to_ids(from_token)
        first = [int((row == token_id).nonzero()[0]) for row in ids]
    last = [feats.shape[1]] * len(prompts)
    if through_end:  # the first end token after the begin token, and nothing after it
        last = [int((row[1:] == tokenizer.eos_token_id).nonzero()[0]) + 2 for row in ids]
    rows = torch.cat([feats[i, start:end] for i, (start, end) in enumerate(zip(first, last))])
    return torch.unique(rows.round(decimals=5), dim=0)


def closed_form_solver(
    C_reg: torch.Tensor, C: torch.Tensor, constraint_weight: float = 10.0, ridge: float = 1e-4
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The merge for every layer that reads these features: W = solve(W0, V) minimises
    ||W C_reg^T - W0 C_reg^T||^2 + w ||W C^T - V||^2, the paper's eq. 4-5 with its constraint W C^T = V
    made a weighted least-squares term, w = constraint_weight * N / M per row.

    Once padding rows are constrained, C has more rows than the feature dimension and the paper's
    equality has no solution; its pseudo-inverse then silently fits C alone and ignores C_reg. The
    weighted form is defined either way and tends to the paper's solution as the weight grows. Every
    K and V layer reads the same text features, so the system is built and factored once.
    C_reg [N, d]; C [M, d]; W0 [out, d]; V [out, M]."""
    w = constraint_weight * C_reg.shape[0] / C.shape[0]
    gram = C_reg.t() @ C_reg
    A = gram + w * C.t() @ C
    A = A + ridge * A.diagonal().mean() * torch.eye(A.shape[0])
    factors = torch.linalg.lu_factor(A)

    def solve(W0: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        B = W0 @ gram + w * V @ C  # [out, d]
        return torch.linalg.lu_solve(*factors, B.t()).t()  # A is symmetric

    return solve


def paper_solver(C_reg: torch.Tensor, C: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The paper's equality-constrained merge (module docstring): W = W0 + v d^T with d^T = C (C_reg^T
    C_reg)^-1 and v = (V - W0 C^T) (d^T C^T)^-1. The inverses are pseudo-inverses, so a singular C_reg^T
    C_reg (fewer captions than dimensions) or dependent constraint rows still give the paper's answer
    where it exists. C_reg [N, d]; C [M, d]; W0 [out, d]; V [out, M]."""
    d_t = C @ torch.linalg.pinv(C_reg.t() @ C_reg)  # [M, d]
    inverse = torch.linalg.pinv(d_t @ C.t())  # [M, M]

    def solve(W0: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        return W0 + (V - W0 @ C.t()) @ inverse @ d_t

    return solve


MERGE_SOLVES = ("weighted", "paper")


def closed_form(
    W0: torch.Tensor,
    C_reg: torch.Tensor,
    C: torch.Tensor,
    V: torch.Tensor,
    constraint_weight: float = 10.0,
    ridge: float = 1e-4,
) -> torch.Tensor:
    """The merged weights of one layer (see `closed_form_solver`)."""
    return closed_form_solver(C_reg, C, constraint_weight, ridge)(W0, V)


# C_reg on a real base without a caption file: varied everyday captions. The paper takes 200 real
# captions; a handful of "a photo of a dog" prompts gives a few dozen distinct feature rows for 768 or
# 2048 dimensions, so the solve's ridge, not the captions, would decide what the merge keeps.
GENERIC_NOUNS = (
    "dog",
    "cat",
    "person",
    "woman",
    "man",
    "child",
    "car",
    "bicycle",
    "house",
    "tree",
    "flower",
    "cup",
    "chair",
    "table",
    "book",
    "bird",
    "horse",
    "boat",
    "mountain",
    "city street",
    "bowl of fruit",
    "teddy bear",
    "backpack",
    "guitar",
    "clock",
    "lamp",
    "vase",
    "shoe",
    "hat",
    "kitchen",
)
GENERIC_SETTINGS = (
    "",
    "on a table",
    "in a park",
    "on the beach",
    "in the snow",
    "at night",
    "in a living room",
    "in the city",
    "in a forest",
    "under a blue sky",
    "next to a window",
    "on the grass",
)
GENERIC_FORMS = (
    "a photo of a {}",
    "a {}",
    "a close-up photo of a {}",
    "a painting of a {}",
    "a picture of a {}",
    "a watercolor of a {}",
    "an old photo of a {}",
    "a drawing of a {}",
)


def generic_captions(n: int) -> list[str]:
    """n distinct captions: a fixed shuffle of every form x noun x setting."""
    combos = [(f, noun, setting) for f in GENERIC_FORMS for noun in GENERIC_NOUNS for setting in GENERIC_SETTINGS]
    order = np.random.default_rng(0).permutation(len(combos))[:n]
    return [f"{combos[i][0].format(combos[i][1])} {combos[i][2]}".strip() for i in order]


def merge_captions(base, n: int, captions: Path | None = None) -> list[str]:
    """C_reg: n captions that must keep their meaning through the merge: the first n lines of a caption
    file (the paper's source), else the world's own captions, or varied generic captions on a real model."""
    if captions is not None:
        try:
            lines = [line.strip() for line in Path(captions).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise LimnerError(
                f"--captions {captions}: cannot read it as text ({e}); give a UTF-8 file with one caption per line"
            ) from e
        if not lines:
            raise LimnerError(f"--captions {captions} has no captions; give one caption per line")
        return lines[:n]
    if base.is_world:
        pool = world_pool(n, seed=11)
        return [caption for _, caption in pool.load(list(range(n)))]
    return generic_captions(n)


def read_concepts(base, concepts: list[Path], force: bool = False) -> list[dict]:
    """The manifests of Custom Diffusion concepts that can be used together on this base."""
    manifests = [read_manifest(c) for c in concepts]
    for c, m in zip(concepts, manifests):
        if m.get("method") != METHOD:
            raise LimnerError(
                f"{c} is a {m.get('method')} concept; only Custom Diffusion concepts merge in closed form"
            )
        check_base(m, c, base, force)
    tokens = [t for m in manifests for t in m["tokens"]]
    if len(set(tokens)) != len(tokens):
        raise LimnerError(
            f"the concepts share a modifier token ({', '.join(tokens)}); train them with distinct tokens (e.g. "
            "<new1>, <new2>)"
        )
    if len({m["mode"] for m in manifests}) != 1:
        modes = ", ".join(f"{c} ({m['mode']})" for c, m in zip(concepts, manifests))
        raise LimnerError(
            f"Custom Diffusion concepts of different modes cannot be merged or composed: {modes}; "
            "train them with one --set mode=crossattn_kv (what the closed-form merge solves for) or mode=crossattn"
        )
    return manifests


def concept_features(encoder: PromptEncoder, manifest: dict) -> torch.Tensor:
    """C of one concept: for each of its modifier tokens (a merged or jointly trained concept has
    several), the features from the token on in "<new1> noun", "a photo of a <new1> noun" and every
    training prompt that names it (contexts, captions, augmentation prefixes): the prompts whose
    outputs the concept learned, so the ones on which the merge must keep them."""
    tokens = manifest["tokens"]
    nouns = manifest.get("class_nouns") or []
    nouns = nouns if len(nouns) == len(tokens) else [manifest["class_noun"]] * len(tokens)
    trained = manifest.get("training_prompts") or []
    rows = [
        prompt_features(
            encoder, [f"{t} {n}", f"a photo of a {t} {n}", *(p for p in trained if t in p.split())], from_token=t
        )
        for t, n in zip(tokens, nouns)
    ]
    return torch.unique(torch.cat(rows), dim=0)


def merged_weights(
    base,
    concepts: list[Path],
    manifests: list[dict],
    num_reg_captions: int = 200,
    captions: Path | None = None,
    solve: str = "weighted",
) -> dict[str, torch.Tensor]:
    """The closed-form merge of the concepts' attn2 weights (their modifier tokens must be loaded):
    limner's weighted solve, or the paper's (`solve="paper"`, see the module docstring)."""
    if solve not in MERGE_SOLVES:
        raise LimnerError(f"--solve {solve!r}: use one of {', '.join(MERGE_SOLVES)}")
    mode = manifests[0]["mode"]
    if mode == "crossattn":
        warnings.warn(
            "the closed form covers attn2's K and V; these concepts also trained Q and the output projection, "
            "which are averaged. For the paper's merge, train with --set mode=crossattn_kv.",
            stacklevel=3,
        )
    encoder = PromptEncoder(base.pipe, base.resolution)
    W0 = layer_weights(base.pipe.unet, mode)
    tuned = [read_weights(Path(c) / m["files"]["weights"]) for c, m in zip(concepts, manifests)]
    C_reg = prompt_features(encoder, merge_captions(base, num_reg_captions, captions))
    # C: the features from each concept's modifier token on, padding rows included, in the paper's two
    # prompts and the concept's training prompts. On the world (regional prompts, both subjects
    # recognised) the paper's two prompts alone kept 0.000 and 0.083 of images on two pairs, because
    # the concept also lives in the rows after the phrase; these constraints keep 0.375 and 0.583.
    per_concept = [(paper_features if solve == "paper" else concept_features)(encoder, m) for m in manifests]
    C = torch.cat(per_concept)
    solver, merged = (paper_solver if solve == "paper" else closed_form_solver)(C_reg, C), {}
    for key, w0 in W0.items():
        if not key.endswith(".weight") or not any(p in key for p in ("to_k_custom", "to_v_custom")):
            merged[key] = torch.stack([t[key].float() for t in tuned]).mean(0)  # q/out (crossattn mode): average
            continue
        V = torch.cat([t[key].float() @ c.t() for t, c in zip(tuned, per_concept)], dim=1)
        merged[key] = solver(w0, V)
    return merged


def paper_features(encoder: PromptEncoder, manifest: dict) -> torch.Tensor:
    """C as the paper constrains it: for each modifier token, the rows of "<new1> noun" and "a photo of a
    <new1> noun" from the token through the end token, no padding."""
    tokens = manifest["tokens"]
    nouns = manifest.get("class_nouns") or []
    nouns = nouns if len(nouns) == len(tokens) else [manifest["class_noun"]] * len(tokens)
    rows = [
        prompt_features(encoder, [f"{t} {n}", f"a photo of a {t} {n}"], from_token=t, through_end=True)
        for t, n in zip(tokens, nouns)
    ]
    return torch.unique(torch.cat(rows), dim=0)


def load_tokens(base, concepts: list[Path], manifests: list[dict]) -> None:
    for c, m in zip(concepts, manifests):
        for token, name in m["files"]["tokens"].items():
            load_embedding(base, Path(c) / name, token=token)


def compose(
    base: Base, concepts: list[Path], region_prompts: list[str] | None = None, force: bool = False
) -> WindowHook | None:
    """Several separately trained concepts in one generation, each with its modifier tokens.

    Without regions they are merged in closed form. With regional prompts (one per window, left to
    right) each window is denoised with the weights of the concepts its prompt names: one concept's
    own weights, the closed-form merge of several, the base's for none. No concept then gives up
    fidelity to another. Returns the hook for `regional_images`: `use_window(i)` installs window i's
    weights, `use_window(None)` the base's again."""
    manifests = read_concepts(base, concepts, force)
    load_tokens(base, concepts, manifests)
    unet = base.pipe.unet
    if region_prompts is None:
        install_weights(unet, merged_weights(base, concepts, manifests))
        return None
    for c, m in zip(concepts, manifests):
        warn_if_unnamed(str(c), m["tokens"], region_prompts)
    original = layer_weights(unet, manifests[0]["mode"])
    weights = []
    for prompt in region_prompts:
        named = [i for i, m in enumerate(manifests) if prompt_names(prompt, m["tokens"])]
        if not named:
            state = original
        elif len(named) == 1:
            state = read_weights(Path(concepts[named[0]]) / manifests[named[0]]["files"]["weights"])
        else:
            state = merged_weights(base, [concepts[i] for i in named], [manifests[i] for i in named])
        # cast once, so switching windows at every step is a copy on the UNet's device
        weights.append({k: v.to(unet.device, unet.dtype) for k, v in state.items()})
    installed = None

    def use_window(i: int | None) -> None:
        nonlocal installed
        state = original if i is None else weights[i]
        if state is not installed:
            install_weights(unet, state)
            installed = state

    return use_window


def merge(
    base,
    concepts: list[Path],
    out: Path,
    num_reg_captions: int = 200,
    force: bool = False,
    captions: Path | None = None,
    solve: str = "weighted",
) -> Path:
    """Merges separately trained Custom Diffusion concepts (distinct modifier tokens) into one, with
    limner's weighted solve or the paper's (`solve="paper"`)."""
    pipe = base.pipe
    manifests = read_concepts(base, concepts, force)
    load_tokens(base, concepts, manifests)
    merged = merged_weights(base, concepts, manifests, num_reg_captions, captions, solve)
    mode, tokens = manifests[0]["mode"], [t for m in manifests for t in m["tokens"]]
    encoder = PromptEncoder(pipe, base.resolution)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    install_weights(pipe.unet, merged)
    vectors = {
        name: te.get_input_embeddings().weight[tok.convert_tokens_to_ids(tokens)].detach().float()
        for tok, (name, te) in zip(encoder.tokenizers, encoder.text_encoders().items())
    }
    with disk_guard(f"the merged concept in {out}"):
        files = save_concept(pipe, out, mode, tokens, vectors)
    manifest = {
        "method": METHOD,
        "subject": [m["subject"] for m in manifests],
        "class_noun": manifests[0]["class_noun"],
        "class_nouns": [m["class_noun"] for m in manifests],
        "tokens": tokens,
        "mode": mode,
        "merged_from": [str(c) for c in concepts],
        "merge": solve,
        "base_fingerprint": base.fingerprint,
        "base_path": str(base.path),
        "files": files,
        "steps": 0,
        "example_prompt": " and ".join(f"a {m['tokens'][0]} {m['class_noun']}" for m in manifests),
        "training_prompts": sorted({p for m in manifests for p in m.get("training_prompts") or []}),
    }
    write_json_atomic(out / MANIFEST, manifest)
    write_model_card(out, manifest)
    return out
