"""Every tokenise / pad / batch path: prompts, completions and conversations as token ids (one
rule each, shared by training, scoring and evaluation), and padded batches made directly on
the device of the model that consumes them (never a CPU batch handed to a CUDA model).

    ids, mask = left_pad([prompt_ids(tok, p) for p in prompts], tok.pad_token_id, model_device(model))
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


# -- token ids: one rule per kind of text -------------------------------------------------------

def render_ids(tokenizer, value, add_generation_prompt: bool = False) -> list[int]:
    """Messages through the chat template, or text without special tokens, as token ids."""
    if isinstance(value, list):
        out = tokenizer.apply_chat_template(value, tokenize=True, add_generation_prompt=add_generation_prompt)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return tokenizer(value, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, prompt) -> list[int]:
    """A prompt (messages or text) as token ids, ending where the assistant starts."""
    return render_ids(tokenizer, prompt, add_generation_prompt=True)


def as_chat(tokenizer, prompt):
    """A plain string becomes one user message when the tokenizer has a chat template."""
    if isinstance(prompt, str) and getattr(tokenizer, "chat_template", None):
        return [{"role": "user", "content": prompt}]
    return prompt


def split_ids(tokenizer, prompt, completion) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as trl's DPOTrainer cuts them: the completion starts where
    the rendered prompt and prompt + completion first differ."""
    if isinstance(prompt, list):
        turns = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        full = list(tokenizer.apply_chat_template(prompt + turns, tokenize=True, return_dict=True)["input_ids"])
        head = prompt_ids(tokenizer, prompt)
    else:
        head = tokenizer(text=prompt)["input_ids"]
        full = tokenizer(text=prompt + completion + tokenizer.eos_token)["input_ids"]
    n = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
    return full[:n], full[n:]


def conversation_ids(tokenizer, prompt, response) -> list[int]:
    """Prompt + response as trl's RewardTrainer tokenizes them (chat template, or text + EOS):
    one rule for training a reward model and for scoring with it."""
    if isinstance(prompt, list) or isinstance(response, list):
        turns = response if isinstance(response, list) else [{"role": "assistant", "content": response}]
        out = tokenizer.apply_chat_template((prompt or []) + turns, tokenize=True, return_dict=True)
        return list(out["input_ids"])
    text = (prompt or "") + response
    if not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return tokenizer(text=text)["input_ids"]
