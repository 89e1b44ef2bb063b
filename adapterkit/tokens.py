"""Padding and batching of token ids, made directly on the device of the model that consumes
them (one host-to-device copy per tensor, never a CPU batch handed to a CUDA model).

    ids, mask = left_pad(seqs, tok.pad_token_id, model_device(model))   # for generate
    batch = to_device(collated, model)                                   # a collator's dict
"""
from __future__ import annotations

import torch


def model_device(model) -> torch.device:
    """Where ``model`` reads its inputs: its input embeddings' device (with a device map, the
    first layer's), else its first parameter's."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def to_device(batch, model):
    """A tensor, or a dict / list / tuple of them (other values kept), on ``model``'s device."""
    device = model if isinstance(model, torch.device) else model_device(model)
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _long(rows: list[list[int]], device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the left (for generation), on ``device``."""
    width = max(len(s) for s in seqs)
    return (_long([[pad_id] * (width - len(s)) + list(s) for s in seqs], device),
            _long([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device))


def right_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the right, on ``device``."""
    width = max(len(s) for s in seqs)
    return (_long([list(s) + [pad_id] * (width - len(s)) for s in seqs], device),
            _long([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device))


def completion_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int, device
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt ids, completion ids) pairs -> right-padded (ids, attention mask, completion
    mask), each (B, T), on ``device``; the completion mask is 1 on the completion's tokens."""
    ids, mask = right_pad([list(p) + list(c) for p, c in pairs], pad_id, device)
    width = ids.shape[1]
    comp = _long([[0] * len(p) + [1] * len(c) + [0] * (width - len(p) - len(c)) for p, c in pairs], device)
    return ids, mask, comp
