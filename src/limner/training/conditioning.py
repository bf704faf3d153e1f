"""Text conditioning for training, the same for every method: SD 1.x/2.x (one CLIP text encoder) or
SDXL (two, concatenated penultimate states, plus the pooled embedding and size/crop time ids)."""

from __future__ import annotations

import torch


class PromptEncoder:
    def __init__(self, pipe, resolution: int):
        self.pipe = pipe
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.resolution = resolution
        self.tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if self.sdxl else [])

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        encoders = {"text_encoder": self.pipe.text_encoder}
        if self.sdxl:
            encoders["text_encoder_2"] = self.pipe.text_encoder_2
        return encoders

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """[B, n_encoders, L] token ids (each tokenizer pads to its own limit; SDXL's are equal)."""
        ids = [
            tok(
                prompts, padding="max_length", truncation=True, max_length=tok.model_max_length, return_tensors="pt"
            ).input_ids
            for tok in self.tokenizers
        ]
        return torch.stack(ids, dim=1)

    def encode(
        self, ids: torch.Tensor, encoders: dict[str, torch.nn.Module] | None = None
    ) -> tuple[torch.Tensor, dict]:
        """(encoder_hidden_states, unet kwargs) for token ids from `tokenize`. `encoders` may be the
        accelerate-wrapped text encoders (so gradients reach trained embeddings across processes)."""
        encoders = encoders or self.text_encoders()
        te = encoders["text_encoder"]
        device = next(self.pipe.text_encoder.parameters()).device
        if not self.sdxl:
            return te(ids[:, 0].to(device))[0], {}
        out1 = te(ids[:, 0].to(device), output_hidden_states=True)
        out2 = encoders["text_encoder_2"](ids[:, 1].to(device), output_hidden_states=True)
        cond = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        pooled = out2[0]  # CLIPTextModelWithProjection: the projected pooled embedding
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=cond.dtype, device=cond.device).expand(ids.shape[0], -1)
        return cond, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    @torch.no_grad()
    def encode_frozen(self, prompts: list[str]) -> tuple[torch.Tensor, dict]:
        """Cached conditioning for prompts whose text encoders do not train."""
        cond, kwargs = self.encode(self.tokenize(prompts))
        return cond.detach(), {k: {kk: vv.detach() for kk, vv in v.items()} for k, v in kwargs.items()}


def select(cond: torch.Tensor, kwargs: dict, idx) -> tuple[torch.Tensor, dict]:
    """Rows `idx` of cached conditioning."""
    return cond[idx], {k: {kk: vv[idx] for kk, vv in v.items()} for k, v in kwargs.items()}


def concat(parts: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, dict]:
    cond = torch.cat([p[0] for p in parts])
    if not parts[0][1]:
        return cond, {}
    keys = parts[0][1]["added_cond_kwargs"].keys()
    return cond, {
        "added_cond_kwargs": {k: torch.cat([p[1]["added_cond_kwargs"][k].to(cond) for p in parts]) for k in keys}
    }
