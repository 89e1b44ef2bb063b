"""Generation and scoring on held-out prompts, and the KL of a stack to its parent."""
from __future__ import annotations

from typing import Callable

import torch


def prompt_ids(tokenizer, prompt) -> list[int]:
    """A prompt (messages or text) as token ids, ending where the assistant starts."""
    if isinstance(prompt, list):
        out = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the left for generation."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int = 16, batch_size: int = 32,
             do_sample: bool = False, **generate_kwargs) -> list[str]:
    """Greedy (by default) responses, decoded without special tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_pad([prompt_ids(tokenizer, p) for p in prompts[i:i + batch_size]],
                             tokenizer.pad_token_id)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=do_sample,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             use_cache=True, **generate_kwargs)
        out += tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return out


def prompt_text(prompt) -> str:
    """The last user message of a conversational prompt, or the prompt itself."""
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt


def mean_score(model, tokenizer, prompts: list, scorer: Callable[[str, str], float],
               **kwargs) -> tuple[float, list[str]]:
    """Mean ground-truth score of greedy responses to ``prompts``."""
    responses = generate(model, tokenizer, prompts, **kwargs)
    scores = [scorer(prompt_text(p), r) for p, r in zip(prompts, responses)]
    return sum(scores) / len(scores), responses
