"""BLIP-Diffusion's subject encoder: a BLIP-2 Q-Former over a frozen image encoder, and the paper's ProjLayer.

    image ──► visual_encoder (frozen ViT) ──► patch features ─┐ cross-attention, every layer
    16 learned query tokens ─┐                                 ▼
    subject text ("ball") ───┴─► [queries ; text] ──► Q-Former layers ──► the 16 query outputs ──► ProjLayer
                                                                                    = 16 subject embeddings

The module is laid out exactly as diffusers' `Blip2QFormerModel` (the converted official checkpoint): `embeddings`
(BERT word and position embeddings, LayerNorm over [queries; text]), `visual_encoder` (embeddings, pre_layernorm,
encoder, post_layernorm), `query_tokens`, `encoder.layer.N.{attention, crossattention, intermediate(_query),
output(_query)}` and `proj_layer`; so its state dict is that folder's `model.safetensors`, key for key. The layers
themselves are transformers' (`Blip2Encoder` for the image, `Blip2QFormerEncoder` for the Q-Former), which run on
transformers 5 where diffusers' own forward no longer does.

Stage 1 of the paper is BLIP-2's multimodal representation learning, of which limner trains two objectives with
heads that only pretraining uses (`Stage1Heads`): image-text contrastive learning (ITC: the best-matching query
against the text's [CLS], in both directions) and image-grounded text generation (ITG: the text decoded from the
queries through a multimodal causal mask, the first token [DEC]).

On the world the frozen image encoder is the base's own CLIP vision tower, converted exactly (`vision_from_clip`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from limner.errors import LimnerError

NUM_QUERY_TOKENS = 16
DEC = "[DEC]"  # BLIP-2's decoder start token, which diffusers adds to the tokenizer as bos_token
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", DEC]


# ---------------------------------------------------------------------------------------------------------------
# Configuration and tokenizer
# ---------------------------------------------------------------------------------------------------------------


def blip2_config(
    vision: dict,
    vocab_size: int,
    hidden_size: int = 256,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 512,
    num_query_tokens: int = NUM_QUERY_TOKENS,
    max_text_positions: int = 32,
    tokenizer: str | None = None,
):
    """The `Blip2Config` diffusers' Blip2QFormerModel reads (qformer_config, vision_config, num_query_tokens,
    tokenizer), for a Q-Former of this size over a vision tower described by `vision` (Blip2VisionConfig fields)."""
    from transformers import Blip2Config

    qformer = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "intermediate_size": intermediate_size,
        "cross_attention_frequency": 1,  # cross-attention to the image in every layer, as BLIP-Diffusion's
        "encoder_hidden_size": vision["hidden_size"],
        "max_position_embeddings": max_text_positions,
        "use_qformer_text_input": True,  # the text half of each layer (intermediate/output) exists
        "pad_token_id": 0,
    }
    config = Blip2Config(vision_config=vision, qformer_config=qformer, num_query_tokens=num_query_tokens)
    config.tokenizer = tokenizer
    return config


def world_words() -> list[str]:
    from limner.world import vocab

    words = []
    for phrase in [*vocab.first_edition_words(), *vocab.added_words()]:
        words += phrase.lower().split()
    return words


def build_bert_tokenizer(words: list[str]):
    """A BERT WordPiece tokenizer whose vocabulary is BERT's special tokens (with [DEC] already in it, so
    diffusers' `add_special_tokens({"bos_token": "[DEC]"})` adds nothing), single characters and `words`."""
    from transformers import BertTokenizer

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(",.!?'-:;()&/")
    tokens = list(dict.fromkeys([*SPECIAL, *chars, *(f"##{c}" for c in chars if c.isalnum()), *words]))
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, truncation_side="right")
    tok.add_special_tokens({"bos_token": DEC})
    return tok


def save_bert_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer's files, plus a `vocab.txt` (one token a line, by id) that transformers 4's slow BertTokenizer
    needs where the fast one's tokenizer.json is not read."""
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    (folder / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab))


def load_bert_tokenizer(folder: Path):
    from transformers import BertTokenizer

    if not (Path(folder) / "vocab.txt").is_file() and not (Path(folder) / "tokenizer.json").is_file():
        raise LimnerError(
            f"{folder} holds no BERT tokenizer (vocab.txt or tokenizer.json): the Q-Former reads the subject's class "
            "text with one; give the folder its config's `tokenizer` names"
        )
    tok = BertTokenizer.from_pretrained(str(folder), truncation_side="right")
    tok.add_special_tokens({"bos_token": DEC})
    return tok


# ---------------------------------------------------------------------------------------------------------------
# The modules, in diffusers' layout
# ---------------------------------------------------------------------------------------------------------------


class QFormerEmbeddings(nn.Module):
    """BERT word + position embeddings of the text, after the query tokens; one LayerNorm over both."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # persistent, as diffusers registers it: the converted checkpoint holds it
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)))

    def forward(self, input_ids: torch.Tensor | None, query_embeds: torch.Tensor | None) -> torch.Tensor:
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds)
        if input_ids is not None:
            positions = self.position_ids[:, : input_ids.shape[1]]
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        return self.dropout(self.LayerNorm(torch.cat(parts, dim=1)))


class VisionEmbeddings(nn.Module):
    """[class] + patch embeddings (a convolution without bias) + learned positions."""

    def __init__(self, config):
        super().__init__()
        d, p = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, d))
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Parameter(torch.randn(1, (config.image_size // p) ** 2 + 1, d))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(len(patches), 1, -1).to(patches.dtype)
        x = torch.cat([cls, patches], dim=1)
        return x + self.position_embedding[:, : x.shape[1]].to(x.dtype)


class VisualEncoder(nn.Module):
    """The frozen image encoder: a ViT whose every output token is layer-normed (BLIP-2's ln_vision)."""

    def __init__(self, config):
        from transformers.models.blip_2.modeling_blip_2 import Blip2Encoder

        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Blip2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.pre_layernorm(self.embeddings(pixel_values))
        return self.post_layernorm(self.encoder(inputs_embeds=x).last_hidden_state)


class ProjLayer(nn.Module):
    """The paper's projection of the Q-Former's query outputs into the text encoder's embedding space:
    x + Dropout(Linear(QuickGELU(Linear(LayerNorm(x)))))."""

    def __init__(self, dim: int, hidden_dim: int, drop_p: float = 0.1, eps: float = 1e-12):
        super().__init__()
        from transformers.activations import QuickGELUActivation

        self.dense1 = nn.Linear(dim, hidden_dim)
        self.act_fn = QuickGELUActivation()
        self.dense2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(drop_p)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.dense2(self.act_fn(self.dense1(self.LayerNorm(x)))))


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, Lq, Lk] (or [B, Lk]) of 1 (attend) / 0 (do not) -> the additive [B, 1, Lq|1, Lk] mask attention takes."""
    keep = keep[:, None, None, :] if keep.dim() == 2 else keep[:, None]
    return (1.0 - keep.to(dtype)) * torch.finfo(dtype).min


class SubjectEncoder(nn.Module):
    """The Q-Former with its frozen image encoder and the ProjLayer: `state_dict()` is diffusers' qformer/."""

    def __init__(self, config, tokenizer):
        from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerEncoder

        super().__init__()
        self.config = config
        q = config.qformer_config
        q._attn_implementation = "eager"  # masks are additive tensors built here; eager takes them as they are
        config.vision_config._attn_implementation = "eager"
        self.tokenizer = tokenizer
        self.embeddings = QFormerEmbeddings(q)
        self.visual_encoder = VisualEncoder(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, q.hidden_size))
        self.proj_layer = ProjLayer(q.hidden_size, 4 * q.hidden_size)
        self.encoder = Blip2QFormerEncoder(q)
        self.init_weights()

    def init_weights(self) -> None:
        """BERT's initialisation for the Q-Former (normal 0.02, LayerNorm 1/0): a new encoder before stage 1."""
        for name, m in self.named_modules():
            if name.startswith("visual_encoder"):
                continue
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.query_tokens, std=0.02)

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    def tokenize(self, texts: list[str], max_length: int | None = None, decoder: bool = False) -> tuple:
        """(input_ids, attention_mask) of BERT tokens; decoder=True starts them with [DEC] instead of [CLS]."""
        limit = max_length or self.embeddings.position_ids.shape[1]
        t = self.tokenizer(texts, padding="longest", truncation=True, max_length=limit, return_tensors="pt")
        ids = t.input_ids.to(self.device)
        if decoder:
            ids = ids.clone()
            ids[:, 0] = self.tokenizer.bos_token_id
        return ids, t.attention_mask.to(self.device)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # frozen: BLIP-2 and BLIP-Diffusion never train the image encoder
            return self.visual_encoder(pixels.to(self.device))

    def run(
        self,
        input_ids: torch.Tensor | None,
        keep: torch.Tensor,
        image_features: torch.Tensor | None = None,
        with_queries: bool = True,
    ) -> torch.Tensor:
        """The Q-Former's last hidden states of [queries; text]; `keep` is the [B, L] padding mask or the [B, L, L]
        attention pattern over the whole sequence."""
        b = (input_ids if input_ids is not None else image_features).shape[0]
        queries = self.query_tokens.expand(b, -1, -1) if with_queries else None
        x = self.embeddings(input_ids, queries)
        return self.encoder(
            x,
            attention_mask=additive_mask(keep, x.dtype),
            encoder_hidden_states=image_features,
            query_length=self.num_query_tokens if with_queries else 0,
        ).last_hidden_state

    def multimodal(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """The query outputs of image and subject text together ([B, 16, d]): what LAVIS's `extract_features(...,
        mode="multimodal")` gives BLIP-Diffusion."""
        ids, mask = self.tokenize(texts)
        n = self.num_query_tokens
        keep = torch.cat([torch.ones(len(ids), n, dtype=mask.dtype, device=mask.device), mask], dim=1)
        return self.run(ids, keep, self.image_features(pixels))[:, :n]

    def forward(self, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """The subject embeddings: ProjLayer(the multimodal query outputs), [B, 16, d]."""
        return self.proj_layer(self.multimodal(pixels, texts))


def vision_from_clip(clip_vision_state: dict[str, torch.Tensor], prefix: str = "vision_model.") -> dict:
    """A CLIP vision tower's weights as the Q-Former's visual_encoder (BLIP-2's layout): q/k/v fused into qkv,
    with q and v biases kept and k's dropped. Exact: a key bias adds q·b_k to every logit of a query, which the
    softmax ignores."""
    s = {k.removeprefix(prefix): v for k, v in clip_vision_state.items() if k.startswith(prefix)}
    out = {
        "embeddings.class_embedding": s["embeddings.class_embedding"].reshape(1, 1, -1),
        "embeddings.patch_embedding.weight": s["embeddings.patch_embedding.weight"],
        "embeddings.position_embedding": s["embeddings.position_embedding.weight"].unsqueeze(0),
        "pre_layernorm.weight": s["pre_layrnorm.weight"],
        "pre_layernorm.bias": s["pre_layrnorm.bias"],
        "post_layernorm.weight": s["post_layernorm.weight"],
        "post_layernorm.bias": s["post_layernorm.bias"],
    }
    layers = sorted({int(k.split(".")[2]) for k in s if k.startswith("encoder.layers.")})
    for i in layers:
        c, o = f"encoder.layers.{i}.", f"encoder.layers.{i}."
        q, k, v = (s[f"{c}self_attn.{n}_proj.weight"] for n in "qkv")
        out[f"{o}self_attn.qkv.weight"] = torch.cat([q, k, v])
        out[f"{o}self_attn.qkv.bias"] = torch.cat(
            [
                s[f"{c}self_attn.q_proj.bias"],
                torch.zeros_like(s[f"{c}self_attn.k_proj.bias"]),
                s[f"{c}self_attn.v_proj.bias"],
            ]
        )
        out[f"{o}self_attn.projection.weight"] = s[f"{c}self_attn.out_proj.weight"]
        out[f"{o}self_attn.projection.bias"] = s[f"{c}self_attn.out_proj.bias"]
        for n in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            for p in ("weight", "bias"):
                out[f"{o}{n}.{p}"] = s[f"{c}{n}.{p}"]
    return out


def vision_config_from_clip(clip_config: dict) -> dict:
    """Blip2VisionConfig fields for a converted CLIP vision tower."""
    return {
        "hidden_size": clip_config["hidden_size"],
        "intermediate_size": clip_config["intermediate_size"],
        "num_hidden_layers": clip_config["num_hidden_layers"],
        "num_attention_heads": clip_config["num_attention_heads"],
        "image_size": clip_config["image_size"],
        "patch_size": clip_config["patch_size"],
        "hidden_act": clip_config.get("hidden_act", "quick_gelu"),
        "layer_norm_eps": clip_config.get("layer_norm_eps", 1e-5),
        "qkv_bias": True,
    }


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: multimodal representation learning (BLIP-2's ITC and ITG)
# ---------------------------------------------------------------------------------------------------------------


class Stage1Heads(nn.Module):
    """What only stage 1 trains besides the Q-Former: the contrastive projections and temperature, and the
    language-model head (its decoder tied to the word embeddings, as BERT's)."""

    def __init__(self, hidden: int, embed_dim: int = 128):
        super().__init__()
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.lm_transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12))


def itc_loss(encoder: SubjectEncoder, heads: Stage1Heads, features: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Image-text contrastive: each image's best-matching query against each text's [CLS] output; cross-entropy
    over the batch both ways."""
    n = encoder.num_query_tokens
    b = features.shape[0]
    queries = encoder.run(None, torch.ones(b, n, device=features.device), features)  # the image alone
    image = F.normalize(heads.vision_proj(queries), dim=-1)  # [B, n, e]
    ids, mask = encoder.tokenize(texts)
    text = encoder.run(ids, mask, with_queries=False)[:, 0]  # the text alone: its [CLS]
    text = F.normalize(heads.text_proj(text), dim=-1)  # [B, e]
    temp = heads.temp.clamp(0.001, 0.5)
    sim_i2t = torch.einsum("iqe,te->itq", image, text).amax(-1) / temp
    target = torch.arange(b, device=features.device)
    return (F.cross_entropy(sim_i2t, target) + F.cross_entropy(sim_i2t.t(), target)) / 2


def itg_loss(encoder: SubjectEncoder, heads: Stage1Heads, features: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Image-grounded text generation: the text, started with [DEC], predicted token by token; queries see each
    other and the image only, each text token sees every query and the tokens before it."""
    ids, mask = encoder.tokenize(texts, decoder=True)
    n, (b, t) = encoder.num_query_tokens, ids.shape
    keep = torch.zeros(b, n + t, n + t, device=ids.device)
    keep[:, :n, :n] = 1
    keep[:, n:, :n] = 1
    keep[:, n:, n:] = torch.tril(torch.ones(t, t, device=ids.device)) * mask[:, None, :]
    hidden = encoder.run(ids, keep, features)[:, n:]
    logits = heads.lm_transform(hidden) @ encoder.embeddings.word_embeddings.weight.t()
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
