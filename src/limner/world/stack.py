"""The world's model stack: a CLIP-format tokenizer, a small CLIP, a small VAE and a small UNet.

All of them are the standard transformers/diffusers classes with small configs, so the saved folder
is an ordinary Stable Diffusion 1.x folder that plain diffusers loads.
"""

from __future__ import annotations

from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from limner.world import vocab

MAX_LENGTH = 32  # world captions are at most ~25 tokens; a short context keeps attention cheap
TEXT_DIM = 256
BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"

TEXT_CONFIG = dict(
    vocab_size=0,
    hidden_size=TEXT_DIM,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    projection_dim=TEXT_DIM,
    hidden_act="quick_gelu",
)
VISION_CONFIG = dict(
    image_size=64,
    patch_size=8,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    projection_dim=TEXT_DIM,
    hidden_act="quick_gelu",
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 64, 128),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=16,
    sample_size=64,
)
# attention at 8x8 and 4x4 only: at 16x16 it would cost twice the step time for little gain at 64 px
UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(64, 128, 256),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=8,
    norm_num_groups=16,
)


def _bpe_pieces(word: str) -> list[str]:
    """The symbols CLIP's BPE starts a word from: its characters, the last one ending in '</w>'."""
    return list(word[:-1]) + [word[-1] + "</w>"]


def _apply_bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE: repeatedly merge the adjacent pair of lowest rank until none is known."""
    while len(pieces) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary is the world's words plus single characters.

    Merges are added word by word, each new one only after the earlier ones have done all they can,
    so every world word ends as exactly one token. Any other word still tokenizes (into smaller
    pieces), as real CLIP tokenizers do with rare words.
    """
    chars = (
        [chr(c) for c in range(ord("a"), ord("z") + 1)]
        + [str(d) for d in range(10)]
        + list("<>,.!?'-_|()[]{}:;/\"&+*=#")
    )
    tokens: list[str] = []
    for c in chars:
        tokens += [c, c + "</w>"]
    ranks: dict[tuple[str, str], int] = {}

    def add_words(words: list[str]) -> None:
        for word in words:
            pieces = _apply_bpe(_bpe_pieces(word), ranks)
            while len(pieces) > 1:
                ranks[(pieces[0], pieces[1])] = len(ranks)
                tokens.append(pieces[0] + pieces[1])
                pieces = _apply_bpe(_bpe_pieces(word), ranks)

    add_words(vocab.first_edition_words())
    tokens += [BOS, EOS]
    add_words(vocab.added_words())  # after the special tokens, so no first-edition token id moves
    vocab_dict = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    merges = sorted(ranks, key=ranks.get)
    tok = CLIPTokenizer(vocab=vocab_dict, merges=merges, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    tok.model_max_length = MAX_LENGTH
    return tok


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    cfg = dict(
        TEXT_CONFIG,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(CLIPTextConfig(**cfg))


def build_image_encoder() -> CLIPVisionModelWithProjection:
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION_CONFIG))


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)
