"""PhotoMaker's prompts: the trigger word after the class word, the stacked class token, and start_merge_step.

The user writes the trigger `img` right after the class word ("a portrait of a woman img on the beach"). The
official pipeline removes the trigger from the token ids and repeats the token before it (the class word's last
token) once per ID image (twice per image in v2, whose ID encoder gives 2 tokens an image); those copies are the
positions the fuse module overwrites, copy k with image k's embedding: the stacked ID embedding. One trigger per
prompt, as the official pipeline allows. limner splits the prompt at the trigger and tokenizes each side alone (as
FastComposer's prompts do), so the trigger need not be a token of the tokenizer.

Delayed conditioning: the official pipeline draws denoising steps i <= start_merge_step from the prompt without
its trigger (nothing fused), the rest from the stacked ID embedding, with start_merge_step = int(ratio * steps)
and ratio 0.2 by default (the demo's style strength 20%): the layout settles from the text, then the identity
takes over. limner's layout steps are those text-only steps.
"""

from __future__ import annotations

import re

from limner.errors import LimnerError
from limner.methods.fastcomposer.prompts import count_triggers, without_triggers

TRIGGER = "img"  # the official trigger word

__all__ = ["TRIGGER", "count_triggers", "merge_step_count", "stacked_token_ids", "without_triggers"]


def stacked_token_ids(tokenizer, prompt: str, copies: int, trigger: str = TRIGGER) -> tuple[list[int], list[int]]:
    """(the prompt's token ids without its trigger, the class word's last token repeated `copies` times, begin and
    end tokens included, padded to the tokenizer's length; the positions of those copies, in order).

    A prompt without exactly one trigger, a trigger after no word, or copies the length limit cuts, is an error
    naming the prompt."""
    # the trigger as a word of its own with the spaces before it, as FastComposer's prompts remove theirs
    pieces = re.split(r"\s*\b" + re.escape(trigger) + r"\b", prompt)
    if len(pieces) != 2:
        raise LimnerError(
            f"PhotoMaker prompt {prompt!r} has {len(pieces) - 1} trigger words {trigger!r}; write it once, right "
            f"after the class word: 'a portrait of a woman {trigger} on the beach'"
        )
    if copies < 1:
        raise LimnerError("PhotoMaker needs at least one ID image to stack at the class word")
    before, after = pieces
    ids: list[int] = [tokenizer.bos_token_id]
    ids += tokenizer(before, add_special_tokens=False).input_ids if before.strip() else []
    if len(ids) == 1:
        raise LimnerError(
            f"prompt {prompt!r}: the trigger {trigger!r} follows no word; write it right after the class word, e.g. "
            f"'a man {trigger} in the snow'"
        )
    first = len(ids) - 1
    ids += [ids[-1]] * (copies - 1)
    ids += tokenizer(after, add_special_tokens=False).input_ids if after.strip() else []
    length = tokenizer.model_max_length
    if first + copies > length - 1:
        raise LimnerError(
            f"prompt {prompt!r}: the class word stacked {copies} times runs past the text encoder's {length - 2} "
            "tokens; shorten the prompt or give fewer references"
        )
    ids = ids[: length - 1] + [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ids + [pad] * (length - len(ids)), list(range(first, first + copies))


def merge_step_count(steps: int, ratio: float) -> int:
    """How many of `steps` denoising steps the prompt without its trigger draws: the official i <= start_merge_step
    with start_merge_step = int(ratio * steps), at most steps - 1 (so the identity always acts)."""
    return min(steps - 1, int(ratio * steps) + 1)
