"""BLIP-Diffusion's context-aware text encoder: the subject embeddings enter the token embeddings *before* the
CLIP text transformer, so every text token attends to them through the transformer's own layers.

    ids:      [BOS] a   ball on the beach , a ball on ...   [EOS] [PAD] ...        (77 - 16 positions)
    embedded: [BOS] a  <s_1 ... s_16>  ball on the beach , a ball on ... [EOS] ...  (77 positions)
                       ^ ctx_begin_pos = 2: right after BOS and "a"

The prompt is built as the official code builds it: "a {subject} {prompt}", repeated `prompt_reps` times (20)
joined by ", " to amplify it, then cut to the text budget that the 16 subject embeddings leave. Positions run
0..L-1 over the whole spliced sequence, and the mask is CLIP's causal one over it. The unconditional text of
classifier-free guidance is the plain prompt without subject embeddings, at the full length.

This runs on the base's own CLIPTextModel (a LoRA on it included); `ContextCLIPTextModel` in the diffusers
layout is the same weights under `text_model.` (formats.py).
"""

from __future__ import annotations

import torch

CTX_BEGIN_POS = 2
PROMPT_REPS = 20


def build_prompt(prompt: str, subject: str, prompt_strength: float = 1.0, prompt_reps: int = PROMPT_REPS) -> str:
    """The official prompt: "a {subject} {prompt}" repeated int(strength * reps) times, joined by ", "."""
    text = f"a {subject} {prompt.strip()}"
    return ", ".join([text] * int(prompt_strength * prompt_reps))


def text_budget(tokenizer, num_query_tokens: int) -> int:
    """Token positions left to the text once the subject embeddings take theirs."""
    return int(tokenizer.model_max_length) - num_query_tokens


def tokenize_with_context(tokenizer, prompts: list[str], num_query_tokens: int) -> torch.Tensor:
    """Token ids padded (and cut) to the text budget, as the official `_tokenize_text(with_query=True)`."""
    return tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=text_budget(tokenizer, num_query_tokens),
        return_tensors="pt",
    ).input_ids


def insert_context(token_embeds: torch.Tensor, ctx: torch.Tensor, ctx_begin_pos: int = CTX_BEGIN_POS) -> torch.Tensor:
    """[B, T, d] token embeddings with the [B, n, d] subject embeddings spliced in at ctx_begin_pos -> [B, T+n, d]."""
    return torch.cat([token_embeds[:, :ctx_begin_pos], ctx.to(token_embeds), token_embeds[:, ctx_begin_pos:]], dim=1)


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None]


def clip_parts(text_encoder):
    """(embeddings, encoder, final_layer_norm) of a CLIPTextModel, with or without transformers 4's text_model."""
    model = getattr(text_encoder, "text_model", text_encoder)
    return model.embeddings, model.encoder, model.final_layer_norm


def encode_with_context(
    text_encoder, input_ids: torch.Tensor, ctx: torch.Tensor | None, ctx_begin_pos: int = CTX_BEGIN_POS
) -> torch.Tensor:
    """The text encoder's last hidden states for `input_ids` with the subject embeddings `ctx` ([B, n, d], or
    None for plain text) inserted at ctx_begin_pos before the transformer."""
    embeddings, encoder, final_norm = clip_parts(text_encoder)
    device = embeddings.token_embedding.weight.device
    x = embeddings.token_embedding(input_ids.to(device))
    if ctx is not None:
        x = insert_context(x, ctx.to(device), ctx_begin_pos)
    length = x.shape[1]
    x = x + embeddings.position_embedding(torch.arange(length, device=device))[None]
    hidden = encoder(inputs_embeds=x, attention_mask=causal_mask(length, x.dtype, device)).last_hidden_state
    return final_norm(hidden)
