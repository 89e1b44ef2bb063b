"""Generation and scoring on held-out prompts, and the KL of a stack to its parent."""
from __future__ import annotations

import torch

from adapterkit.tokens import completion_batch, left_pad, model_device, prompt_ids, split_ids  # noqa: F401


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int = 16, batch_size: int = 32,
             do_sample: bool = False, **generate_kwargs) -> list[str]:
    """Greedy (by default) responses, decoded without special tokens."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_pad([prompt_ids(tokenizer, p) for p in prompts[i:i + batch_size]],
                             tokenizer.pad_token_id, device)
        gen = model.generate(input_ids=ids, attention_mask=mask,
                             max_new_tokens=max_new_tokens, do_sample=do_sample,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             use_cache=True, **generate_kwargs)
        out += tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return out


def mean_score(model, tokenizer, prompts: list, scorer, **kwargs) -> tuple[float, list[str]]:
    """Mean score of greedy responses to ``prompts`` under a reward function (a callable, or
    its name; see ``adapterkit.rewards``), and the responses."""
    from adapterkit.rewards import load_function, score_completions
    responses = generate(model, tokenizer, prompts, **kwargs)
    scores = score_completions(load_function(scorer), prompts, responses)
    return sum(scores) / len(scores), responses


# -- log-probs of completions, and the KL of a stack to its parent --------------------------------

def completion_batches(tokenizer, prompts: list, completions: list, batch_size: int, device):
    """Yields right-padded (ids, attention mask, completion mask), each (B, T), on ``device``."""
    for i in range(0, len(prompts), batch_size):
        pairs = [split_ids(tokenizer, p, c) for p, c in zip(prompts[i:i + batch_size], completions[i:i + batch_size])]
        yield completion_batch(pairs, tokenizer.pad_token_id, device)


def _token_logprobs(model, ids, mask):
    """(B, T) -> next-token log-distributions (B, T-1, V), fp32, on the model's device (callers
    reduce them there and move only the small result)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


@torch.no_grad()
def completion_logps(model, tokenizer, prompts: list, completions: list, batch_size: int = 32) -> torch.Tensor:
    """log pi(completion | prompt) summed over the completion's tokens, (N,), with the adapters
    that are switched on now."""
    out = []
    for ids, mask, comp in completion_batches(tokenizer, prompts, completions, batch_size, model_device(model)):
        logp = _token_logprobs(model, ids, mask)                               # (B, T-1, V)
        taken = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)                  # (B, T-1)
        out.append((taken * comp[:, 1:]).sum(-1).cpu())                        # (B,)
    return torch.cat(out)


@torch.no_grad()
def mean_token_kl(model, tokenizer, prompts: list, responses: list, policy: list[str],
                  reference: list[str], batch_size: int = 32) -> float:
    """Mean over response tokens of KL(pi_policy || pi_reference), exact over the vocabulary,
    at the positions of ``responses`` (usually the policy's own). Adapters are named lists."""
    from adapterkit.adapters import use_adapters
    total, count = 0.0, 0
    for ids, mask, comp in completion_batches(tokenizer, prompts, responses, batch_size, model_device(model)):
        with use_adapters(model, policy):
            logp = _token_logprobs(model, ids, mask)                           # (B, T-1, V)
        with use_adapters(model, reference):
            logq = _token_logprobs(model, ids, mask)
        kl = (logp.exp() * (logp - logq)).sum(-1)                              # (B, T-1)
        total += (kl * comp[:, 1:]).sum().item()
        count += int(comp[:, 1:].sum())
    return total / max(count, 1)


# -- a policy against its parent -------------------------------------------------------------------

def compare_to_parent(model, tokenizer, prompts: list, policy: list[str], parent: list[str], scorer=None,
                      max_new_tokens: int = 16, batch_size: int = 32) -> tuple[dict, dict]:
    """Greedy responses of the policy and of its parent (adapter name lists) to held-out prompts:
    the mean per-token KL(policy || parent) on the policy's responses, and each one's mean score
    under ``scorer`` (a reward function or its name) when given. Returns (metrics, responses)."""
    from adapterkit.adapters import use_adapters
    from adapterkit.rewards import load_function, score_completions
    responses = {}
    for who, adapters in (("policy", policy), ("parent", parent)):
        with use_adapters(model, adapters):
            responses[who] = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size)
    out = {"kl": mean_token_kl(model, tokenizer, prompts, responses["policy"], policy, parent)}
    if scorer is not None:
        score = load_function(scorer)
        for who, key in (("policy", "score"), ("parent", "parent_score")):
            out[key] = sum(score_completions(score, prompts, responses[who])) / len(prompts)
    return out, responses


def ranking_agreement(scores: torch.Tensor, truth: torch.Tensor) -> float | None:
    """How often ``scores`` order two samples as ``truth`` does: over the pairs whose true
    scores differ, the fraction whose scores differ the same way (a tie in ``scores`` counts
    half). 1: the same order; 0.5: chance; None: no pair with different true scores.
    scores, truth: (N,)."""
    scores, truth = scores.float(), truth.to(scores.device).float()
    ahead = truth[:, None] > truth[None, :]          # (N, N): each differing pair once, truth's order
    if not ahead.any():
        return None
    gap = (scores[:, None] - scores[None, :])[ahead]  # (pairs,)
    return ((gap > 0).float() + 0.5 * (gap == 0).float()).mean().item()
