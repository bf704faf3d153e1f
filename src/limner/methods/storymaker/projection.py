"""StoryMaker's image projection: each character's face and body become 20 tokens, a learned background adds 20.

Per character (the official `faceid_plus` module, in the paper's terms):

    face   the identity embedding -> MLP -> 4 tokens -> LayerNorm, refined by a perceiver that reads the CLIP
           tokens of the aligned face crop, residually (x + perceiver(x, face tokens)): IP-Adapter FaceID Plus's
           face branch, which diffusers ships as `IPAdapterFaceIDPlusImageProjection` (shortcut on, scale 1)
    body   the CLIP tokens of the character cut out on white -> the Perceiver Resampler -> 16 tokens
    then   [face; body] + the positional embedding of the character's place (1st, 2nd, ...), and a zero-initialised
           residual projection: tokens = LN(proj_out(t)) + t

and one learned background embedding (20 tokens) before all characters: the decoupled image attention reads
[background; character 1; character 2], and the attention-map loss ties each group of 20 to its region.

The official checkpoint's `image_proj` keys are kept (`proj.0`, `proj.2`, `norm`, `perceiver_resampler.*`,
`resample.*`, `pos_embed`, `bg_embed`, `proj_out`, `norm_out`); the Resampler blocks under the official names
(`layers.N.0.to_kv`, `layers.N.1.3`, ...) as IP-Adapter Plus files name them. World-sized modules differ from
the official SDXL ones only in widths and the face perceiver's depth (settings recorded in adapter.json).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from limner.adapters import projection_from_state_dict, projection_state_dict, resampler
from limner.errors import LimnerError

FACE_TOKENS = 4
BODY_TOKENS = 16
CHARACTER_TOKENS = FACE_TOKENS + BODY_TOKENS  # 20: the official num_tokens
MAX_CHARACTERS = 3  # positional embeddings the official module holds (it draws up to 2 at inference)

# diffusers' block names -> the official Resampler's (IP-Adapter Plus / FaceID Plus files)
_BLOCK_NAMES = [
    (r"layers\.(\d+)\.ln0\.", r"layers.\1.0.norm1."),
    (r"layers\.(\d+)\.ln1\.", r"layers.\1.0.norm2."),
    (r"layers\.(\d+)\.attn\.to_q\.", r"layers.\1.0.to_q."),
    (r"layers\.(\d+)\.attn\.to_out\.0\.", r"layers.\1.0.to_out."),
    (r"layers\.(\d+)\.ff\.0\.", r"layers.\1.1.0."),
    (r"layers\.(\d+)\.ff\.1\.net\.0\.proj\.", r"layers.\1.1.1."),
    (r"layers\.(\d+)\.ff\.1\.net\.2\.", r"layers.\1.1.3."),
]
# diffusers' FaceID Plus names -> the official faceid_plus's, outside the perceiver's blocks
_FACE_NAMES = [
    (r"^proj\.net\.0\.proj\.", "proj.0."),
    (r"^proj\.net\.2\.", "proj.2."),
    (r"^(proj_in|proj_out|norm_out)\.", r"perceiver_resampler.\1."),
    (r"^layers\.", "perceiver_resampler.layers."),
]


@dataclass(frozen=True)
class ProjectionShape:
    """What a StoryMaker projection is built from (adapter.json records it; official SDXL: 512, 1280, 2048,
    face_depth 4, resampler_dim 1280)."""

    id_dim: int  # the face analyser's identity embedding (ArcFace 512, the world's 128)
    clip_dim: int  # the image encoder's token width (penultimate hidden states)
    cross_dim: int  # the UNet's cross-attention width
    face_depth: int = 4
    resampler_dim: int = 1280


class StoryMakerProjection(nn.Module):
    """faceid_plus: (identity embeddings [n, id], face crop tokens [n, L, clip], body tokens [n, L, clip]) ->
    [1 + n, 20, cross] (background first)."""

    def __init__(self, shape: ProjectionShape):
        super().__init__()
        from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

        self.shape = shape
        d = shape.cross_dim
        heads = max(1, d // 64)
        self.face = IPAdapterFaceIDPlusImageProjection(
            embed_dims=d,
            output_dims=d,
            hidden_dims=shape.clip_dim,
            id_embeddings_dim=shape.id_dim,
            depth=shape.face_depth,
            dim_head=64,
            heads=heads,
            num_tokens=FACE_TOKENS,
            ffn_ratio=4,
            ffproj_ratio=2,
        )
        self.face.shortcut, self.face.shortcut_scale = True, 1.0  # out = x + perceiver(x, face)
        self.resample = resampler(
            embedding_dim=shape.clip_dim, output_dim=d, dim=shape.resampler_dim, num_queries=BODY_TOKENS
        )
        self.pos_embed = nn.Parameter(torch.zeros(MAX_CHARACTERS, CHARACTER_TOKENS, d))
        self.bg_embed = nn.Parameter(torch.zeros(1, CHARACTER_TOKENS, d))
        self.proj_out = nn.Linear(d, d)
        self.norm_out = nn.LayerNorm(d)
        nn.init.zeros_(self.proj_out.weight)  # the residual starts as the identity
        nn.init.zeros_(self.proj_out.bias)

    def characters(
        self,
        id_embeds: torch.Tensor,
        face_tokens: torch.Tensor,
        body_tokens: torch.Tensor,
        places: torch.Tensor | None = None,
        keep_face: torch.Tensor | None = None,
        keep_body: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[n, 20, cross]: each character's face and body tokens at its place (0 first; default 0..n-1).
        keep_face / keep_body: [n] 0/1 (training drops each with p 0.1, as the official module does)."""
        n = len(id_embeds)
        self.face.clip_embeds = face_tokens[:, None]
        try:
            face = self.face(id_embeds)
        finally:
            self.face.clip_embeds = None  # no feature tensor kept alive on the module
        body = self.resample(body_tokens)
        if keep_face is not None:
            face = face * keep_face.view(n, 1, 1).to(face)
        if keep_body is not None:
            body = body * keep_body.view(n, 1, 1).to(body)
        if places is None:
            places = torch.arange(n, device=face.device)
        if int(places.max()) >= MAX_CHARACTERS:
            raise LimnerError(f"StoryMaker places at most {MAX_CHARACTERS} characters in one picture")
        tokens = torch.cat([face, body], dim=1) + self.pos_embed[places]
        return self.norm_out(self.proj_out(tokens)) + tokens

    def forward(
        self,
        id_embeds: torch.Tensor,
        face_tokens: torch.Tensor,
        body_tokens: torch.Tensor,
        places: torch.Tensor | None = None,
        keep_face: torch.Tensor | None = None,
        keep_body: torch.Tensor | None = None,
        background: bool = True,
    ) -> torch.Tensor:
        """The official output for the characters of one picture, in order: [1 + n, 20, cross]; with
        background=False the characters' tokens alone (`characters`). Training calls this, not `characters`:
        under accelerate with several processes the module is wrapped (DDP), which forwards `forward` only and
        synchronises gradients only through it."""
        chars = self.characters(id_embeds, face_tokens, body_tokens, places, keep_face, keep_body)
        return torch.cat([self.bg_embed, chars]) if background else chars

    def picture_tokens(self, characters: list[torch.Tensor]) -> torch.Tensor:
        """One picture's image tokens [(1 + n) * 20, cross]: the background's, then each character's."""
        return torch.cat([self.bg_embed[0], *characters])


def official_state(projection: StoryMakerProjection) -> dict[str, torch.Tensor]:
    """The projection's weights under the official `image_proj` names (without the prefix)."""
    state = {_official_face_name(k): v for k, v in _fused(projection.face.state_dict()).items()}
    state |= {f"resample.{k}": v for k, v in projection_state_dict(projection.resample).items()}
    for name in ("pos_embed", "bg_embed", "proj_out.weight", "proj_out.bias", "norm_out.weight", "norm_out.bias"):
        state[name] = projection.get_parameter(name).detach().cpu().contiguous()
    return state


def load_official_state(projection: StoryMakerProjection, state: dict[str, torch.Tensor], where: str) -> None:
    """Official `image_proj` weights into the projection; a missing, unknown or misshapen key is an error naming
    the file."""
    expected = official_state(projection)
    missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unknown:
        raise LimnerError(
            f"StoryMaker adapter {where}: image_proj keys missing {missing[:4]}, unknown {unknown[:4]}; give a "
            "file that `limner pretrain --method storymaker` wrote for this base"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise LimnerError(
                f"StoryMaker adapter {where}: image_proj.{key} has shape {tuple(value.shape)}, this base and face "
                f"analyser need {tuple(expected[key].shape)}: it was made for another base or face analyser"
            )
    own_face = projection.face.state_dict()
    face = {mine: state[_official_face_name(mine)] for mine in _fused(own_face)}
    projection.face.load_state_dict(_split(face, own_face))
    resample = {k.removeprefix("resample."): v for k, v in state.items() if k.startswith("resample.")}
    projection.resample = projection_from_state_dict(resample).to(projection.bg_embed.device)
    with torch.no_grad():
        for name in ("pos_embed", "bg_embed", "proj_out.weight", "proj_out.bias", "norm_out.weight", "norm_out.bias"):
            projection.get_parameter(name).copy_(state[name])


def _official_face_name(key: str) -> str:
    """diffusers' FaceID Plus name (to_k/to_v already fused) -> the official faceid_plus one."""
    for names in (_BLOCK_NAMES, _FACE_NAMES):
        for pattern, replacement in names:
            key, n = re.subn(pattern, replacement, key)
            if n:
                break
    return key


def _fused(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official blocks compute keys and values with one to_kv layer (rows [keys; values]):
    layers.N.attn.to_k/to_v -> layers.N.0.to_kv."""
    fused = {}
    for key, value in state.items():
        if key.endswith("attn.to_k.weight"):
            kv = torch.cat([value, state[key.replace("to_k", "to_v")]])
            fused[key.replace("attn.to_k.", "0.to_kv.")] = kv.detach().cpu().contiguous()
        elif not key.endswith("attn.to_v.weight"):
            fused[key] = value.detach().cpu().contiguous()
    return fused


def _split(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """layers.N.0.to_kv back into diffusers' layers.N.attn.to_k and to_v."""
    out = {}
    for key, value in state.items():
        if ".0.to_kv." in key:
            k = key.replace(".0.to_kv.", ".attn.to_k.")
            rows = own[k].shape[0]
            out[k], out[k.replace("to_k", "to_v")] = value[:rows], value[rows:]
        else:
            out[key] = value
    return out
