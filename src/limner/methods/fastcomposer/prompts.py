"""FastComposer's prompts: the trigger written after each subject's noun, and the delayed subject conditioning.

The official code writes its image token `<|image|>` right after a subject's noun ("a man <|image|> and a woman
<|image|> in the snow"), removes it from the token ids, and flags the token *before* it (the noun's last token,
counting the begin-of-text token) as where the subject's image embedding is fused in; the k-th trigger takes the
k-th reference. limner does the same with the text split at each trigger, each piece tokenized alone: the pieces are
whole words, so their tokens are the clean prompt's tokens, and the flagged positions are the official ones
(tests/test_fastcomposer.py compares both on a fixed prompt).

Delayed subject conditioning: the official pipeline draws denoising steps i <= (1 - alpha) * steps from the text-only
prompt (the trigger removed, nothing fused), the rest from the prompt with the subjects fused in: the layout
settles from words the model knows, then the subjects take over. alpha 0.7 by default (the paper's 0.6-0.8).
"""

from __future__ import annotations

import re

from limner.errors import LimnerError

TRIGGER = "<|image|>"  # the official image token


def _pattern(trigger: str) -> re.Pattern:
    # the trigger with the spaces before it (removed with it); a trigger made of letters only as a word of its own
    before = r"\b" if trigger[0].isalnum() else ""
    after = r"\b" if trigger[-1].isalnum() else ""
    return re.compile(r"\s*" + before + re.escape(trigger) + after)


def without_triggers(prompt: str, trigger: str = TRIGGER) -> str:
    """The text-only prompt: every trigger removed ("a ball <|image|> on the beach" -> "a ball on the beach")."""
    return _pattern(trigger).sub("", prompt)


def count_triggers(prompt: str, trigger: str = TRIGGER) -> int:
    return len(_pattern(trigger).findall(prompt))


def with_triggers(text: str, noun_ends: list[int], trigger: str = TRIGGER) -> str:
    """A caption with the trigger written after each noun (character offsets where the nouns end), as the official
    data code inserts its image token at each segment's end."""
    for end in sorted(noun_ends, reverse=True):
        text = f"{text[:end]} {trigger}{text[end:]}"
    return text


def tokenize_with_triggers(tokenizer, prompt: str, trigger: str = TRIGGER) -> tuple[list[int], list[int]]:
    """(the clean prompt's token ids, begin and end tokens included, padded to the tokenizer's length; the position
    of the token before each trigger, in order). A trigger with no word before it, or one whose noun the length
    limit cuts, is an error naming the prompt."""
    pieces = _pattern(trigger).split(prompt)
    ids: list[int] = [tokenizer.bos_token_id]
    positions: list[int] = []
    for k, piece in enumerate(pieces):
        ids += tokenizer(piece, add_special_tokens=False).input_ids if piece.strip() else []
        if k < len(pieces) - 1:
            if len(ids) == 1 or not piece.strip():
                raise LimnerError(
                    f"prompt {prompt!r}: trigger {trigger} {k + 1} follows no word; write it right after the "
                    f"subject's noun, e.g. 'a dog {trigger} on the beach'"
                )
            positions.append(len(ids) - 1)
    length = tokenizer.model_max_length
    ids = ids[: length - 1] + [tokenizer.eos_token_id]
    if positions and positions[-1] >= length - 1:
        raise LimnerError(
            f"prompt {prompt!r}: the noun before trigger {len(positions)} lies past the text encoder's {length - 2} "
            "tokens; shorten the prompt"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ids + [pad] * (length - len(ids)), positions


def check_subject_count(prompt: str, triggers: int, subjects: int, trigger: str = TRIGGER) -> None:
    """One subject per trigger, in order; anything else is an error saying what to change."""
    if triggers == 0:
        raise LimnerError(
            f"FastComposer prompt {prompt!r} has no trigger {trigger}: write it after each subject's noun, e.g. "
            f"'a ball {trigger} and a dog {trigger} on the beach' (the k-th trigger takes the k-th subject)"
        )
    if subjects > triggers:
        raise LimnerError(
            f"{subjects} subjects (references or concepts) but the prompt {prompt!r} has {triggers} trigger"
            f"{'s' if triggers != 1 else ''} {trigger}: give one reference per subject and write {trigger} after "
            "each subject's noun"
        )
    if subjects < triggers:
        raise LimnerError(
            f"the prompt {prompt!r} has {triggers} triggers {trigger} but only {subjects} subject"
            f"{'s' if subjects != 1 else ''} was given: one reference (--image) or concept per trigger, in order"
        )


def text_only_steps(alpha: float, steps: int) -> int:
    """How many of `steps` denoising steps the text-only prompt draws: the official pipeline's i <= (1 - alpha) *
    steps, computed the same way (so the switch falls on the same step), at most steps - 1."""
    start = (1 - alpha) * steps
    return min(steps - 1, sum(1 for i in range(steps) if i <= start))
