"""``/generate``'s prompt checks against a deployment's ``openai_api.Limits``: each unusable value a 400."""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.errors import BadRequest


def tokenize(texts: list[str], limits: Any, tokenizer: Any) -> list[list[int]]:
    """Token ids of each prompt text, every way a text can be unusable a 400."""
    if tokenizer is None:
        raise BadRequest("this model has no tokenizer (pytorch flavour): send token ids, not text")
    if not texts:
        raise BadRequest("no prompts (an empty list or a CSV without rows); send at least one")
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's "\\udb93": a half of a pair, no character at all
            raise BadRequest(
                f"a prompt holds {e.object[e.start : e.end]!a}, a lone surrogate; send valid Unicode"
            ) from e
    if len(texts) > limits.max_prompts:
        raise BadRequest(f"{len(texts)} prompts is over the limit of {limits.max_prompts} per request")
    prompts = [[int(t) for t in tokenizer(text)["input_ids"]] for text in texts]
    if any(not p for p in prompts):
        raise BadRequest("a prompt is empty after tokenization; send some text")
    return prompts


def token_row(row: list[Any], limits: Any) -> list[int]:
    """One sequence of ``input_ids``: a flat list of integer token ids inside the vocabulary."""
    try:
        array = np.asarray(row)
    except ValueError as e:
        raise BadRequest(f'"input_ids" rows must be flat lists of token ids ({e})') from e
    if array.ndim != 1:
        raise BadRequest(f'"input_ids" rows must be flat lists of token ids; got a row of shape {list(array.shape)}')
    return [int(t) for t in integer_ids(array, "input_ids", limits.vocab_size)]


def integer_ids(array: np.ndarray, name: str, vocab: int | None) -> np.ndarray:
    """``array`` as int64 token ids: integers (a float with no fraction is one), inside the vocabulary."""
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):  # NaN or Infinity: JSON takes them, ids do not
        raise BadRequest(f"{name} must be integer token ids; got NaN or Infinity")
    if array.dtype.kind not in "iuf" or (array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0)):
        raise BadRequest(f"{name} must be integer token ids; got {array.dtype} values")
    if array.dtype.kind == "f" and np.abs(array).max() >= 2**62:  # before the cast, which would wrap
        raise BadRequest(f"{name} holds token ids far outside any vocabulary (up to {np.abs(array).max():.3g})")
    ids = array.astype(np.int64)
    if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
        raise BadRequest(f"{name} holds token ids outside 0-{vocab - 1} (got {ids.min()}..{ids.max()})")
    return ids


def check_length(length: int, limits: Any, prompt_tokens: int) -> None:
    """A request longer than the model's positions, or one the engine could never hold, is a 400."""
    if limits.max_positions is not None and length > limits.max_positions:
        raise BadRequest(
            f"{length} tokens (prompt plus new tokens) is over the model's limit of {limits.max_positions}"
        )
    budget = limits.tokens_in_flight
    if budget is not None and length > budget:
        raise BadRequest(
            f"{prompt_tokens} prompt tokens plus max_new_tokens={length - prompt_tokens} is over the {budget} tokens "
            "this deployment holds at once; shorten the prompt or ask for fewer tokens"
        )
