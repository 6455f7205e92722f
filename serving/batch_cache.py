"""The running batch's KV cache, for the engine (``serving/engine.py``). Plain torch.

Every running sequence is a row of one key and one value tensor per layer,
``[rows, kv_heads, length, head_dim]``, left-padded to the longest row (``pads``: each row's
padding). ``attention_mask`` masks each row's padding and ``position_ids`` give each row its true
position, so a row's tokens are what it would get served alone.

- ``prefill_inputs``: the newcomers' prompts left-padded into one forward pass, with the mask and
  positions that keep each row as if alone (none when no row is padded).
- ``BatchCache.join`` pads prefilled rows into the batch (every row on the left when they are
  longer); ``keep`` leaves the rows that stay, in order, with the padding they all share trimmed;
  ``clear`` leaves none. ``decode_inputs`` are one decoding step's mask, positions and cache
  (transformers' ``DynamicCache``); ``update`` takes the step's cache back.

It holds no sequences: the engine keeps them in the same row order.
"""

from __future__ import annotations

from typing import Any

import torch


def prefill_inputs(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, list[int], dict[str, Any]]:
    """``input_ids`` of ``prompts`` left-padded to the longest, each row's padding, and the
    ``attention_mask`` and ``position_ids`` that keep each row as if alone."""
    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    ids = torch.tensor([[0] * pad + prompt for prompt, pad in zip(prompts, pads, strict=True)], device=device)
    kwargs: dict[str, Any] = {}
    if any(pads):
        pad = torch.tensor(pads, device=device)[:, None]
        span = torch.arange(width, device=device)[None, :]
        kwargs = {"attention_mask": (span >= pad).long(), "position_ids": (span - pad).clamp(min=0)}
    return ids, pads, kwargs


class BatchCache:
    """One key and one value tensor per layer for the running batch, each row left-padded."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pads: list[int] = []  # left padding of each row
        self.keys: list[torch.Tensor] = []  # per layer, [rows, kv_heads, length, head_dim]
        self.values: list[torch.Tensor] = []

    def clear(self) -> None:
        self.pads, self.keys, self.values = [], [], []

    def join(self, keys: list[torch.Tensor], values: list[torch.Tensor], pads: list[int]) -> None:
        """Add prefilled rows (``pads``: each row's left padding) after the batch's rows."""
        if not self.pads:
            self.pads, self.keys, self.values = list(pads), keys, values
            return
        current, width = self.keys[0].shape[-2], keys[0].shape[-2]
        if width > current:  # the newcomers are longer: pad every row on the left
            grow = width - current
            self.keys = [_pad_left(k, grow) for k in self.keys]
            self.values = [_pad_left(v, grow) for v in self.values]
            self.pads = [p + grow for p in self.pads]
            current = width
        shift = current - width
        self.keys = [torch.cat([k, _pad_left(n, shift)]) for k, n in zip(self.keys, keys, strict=True)]
        self.values = [torch.cat([v, _pad_left(n, shift)]) for v, n in zip(self.values, values, strict=True)]
        self.pads.extend(p + shift for p in pads)

    def keep(self, keep: list[int]) -> None:
        """Only the rows ``keep`` (at least one, in order) stay; the padding they all share goes."""
        index = torch.tensor(keep, device=self.device)
        trim = min(self.pads[i] for i in keep)  # padding every remaining row shares
        self.keys = [k.index_select(0, index)[:, :, trim:] for k in self.keys]
        self.values = [v.index_select(0, index)[:, :, trim:] for v in self.values]
        self.pads = [self.pads[i] - trim for i in keep]

    def decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """One decoding step's ``attention_mask``, ``position_ids`` and cache."""
        from transformers import DynamicCache

        length = self.keys[0].shape[-2]
        pads = torch.tensor(self.pads, device=self.device)
        mask = (torch.arange(length + 1, device=self.device)[None, :] >= pads[:, None]).long()
        positions = (length - pads)[:, None]
        return mask, positions, DynamicCache(ddp_cache_data=list(zip(self.keys, self.values, strict=True)))

    def update(self, cache: Any) -> None:
        """The step's cache back (every row one token longer)."""
        self.keys = [layer.keys for layer in cache.layers]
        self.values = [layer.values for layer in cache.layers]


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    if width == 0:
        return tensor
    shape = list(tensor.shape)
    shape[-2] = width
    return torch.cat([tensor.new_zeros(shape), tensor], dim=-2)
