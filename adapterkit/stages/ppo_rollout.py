"""PPO rollouts: responses sampled from the policy with their log-probs recorded while
sampling (no second forward pass), then scored: reward, reference log-probs and values."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from adapterkit import losses, rewards
from adapterkit.tokens import left_pad, model_device

if TYPE_CHECKING:
    from adapterkit.stages.ppo import PPORun


@dataclass
class Rollout:
    ids: torch.Tensor            # (B, L) left-padded prompt + right-padded response
    mask: torch.Tensor           # (B, L) attention mask
    response_mask: torch.Tensor  # (B, R) 1.0 up to and including the first EOS
    n_resp: int                  # R
    logprobs: torch.Tensor       # (B, R) log pi_old(token), as sampled
    entropy: torch.Tensor        # (B, R) entropy of pi_old at each response position
    prompts: list | None = None  # the raw prompts (B), for a reward function


class SampledLogprobs:
    """A logits processor that records log pi(token) and the entropy of pi at every sampling
    step, so PPO's old log-probs need no second forward pass. generate calls it before its
    temperature warper, so it applies the temperature itself; it keeps one step's (B, V)
    log-probs at a time (not the whole (B, R, V) history) and reads each step's sampled token
    from the next call's ``input_ids``.

    With ``generators`` (one per row) it also draws each row's token itself, from pi by the
    Gumbel-max trick with that row's own generator, and hands ``generate`` scores that its
    greedy search follows (0 for the drawn token, -inf elsewhere): a row's sample then depends
    on its seed alone, not on the other rows of its batch or on how many processes share the
    step (``row_generators``)."""

    def __init__(self, temperature: float, generators: list | None = None):
        self.temperature, self.pending, self.generators = temperature, None, generators
        self.logprobs: list[torch.Tensor] = []  # R of (B,)
        self.entropy: list[torch.Tensor] = []

    def take(self, tokens) -> None:
        """log pi of the tokens sampled from the pending step. tokens (B,)"""
        self.logprobs.append(self.pending.gather(-1, tokens[:, None]).squeeze(-1))

    def __call__(self, input_ids, scores):
        if self.pending is not None:
            self.take(input_ids[:, -1])
        logits = scores.float() / self.temperature                      # (B, V)
        self.pending = torch.log_softmax(logits, -1)
        self.entropy.append(losses.entropy_from_logits(logits))
        if self.generators is None:
            return scores
        u = torch.stack([torch.rand(logits.size(-1), generator=g, device=logits.device)
                         for g in self.generators])                       # (B, V) in [0, 1)
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))
        token = (self.pending + gumbel).argmax(-1)                         # (B,) ~ pi
        return torch.full_like(scores, float("-inf")).scatter_(-1, token[:, None], 0.0)

    def result(self, resp) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs, entropy), (B, R) each, for the generated responses resp (B, R)."""
        self.take(resp[:, -1])
        return torch.stack(self.logprobs, 1), torch.stack(self.entropy, 1)


def row_generators(seed: int, rows, device) -> list[torch.Generator]:
    """One generator per rollout row, seeded by the run's seed and the row's place in the
    step's global batch: row j of step s is the same sample whether one process draws the
    whole batch or each of N processes draws its share."""
    return [torch.Generator(device=device).manual_seed(seed * 2**32 + int(r)) for r in rows]


@torch.no_grad()
def rollout(run: PPORun, prompts: list[list[int]], do_sample: bool = True, rows=None) -> Rollout:
    """Responses sampled from the policy (eval mode, KV cache), with their log-probs. Row i is
    drawn with ``row_generators`` for ``rows[i]`` (its index in the step's global batch;
    ``range(len(prompts))`` when not given); ``do_sample=False``: greedy."""
    roles, tok, p = run.roles, run.tokenizer, run.config.ppo
    device = model_device(roles.peft)
    ids, mask = left_pad(prompts, tok.pad_token_id, device)
    roles.use("policy")
    roles.peft.eval()
    rows = range(len(prompts)) if rows is None else rows
    # exact samples of pi (its logprobs are what PPO's ratio needs): drawn by the recorder
    recorder = SampledLogprobs(p.temperature,
                               row_generators(run.config.train.seed, rows, device) if do_sample else None)
    gen = roles.peft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=p.max_new_tokens,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                              use_cache=True, logits_processor=[recorder], do_sample=False)
    roles.peft.train()
    resp = gen[:, ids.size(1):]                                    # (B, R)
    logprobs, entropy = recorder.result(resp)
    is_eos = (resp == tok.eos_token_id).long()
    resp_mask = ((is_eos.cumsum(-1) - is_eos) == 0).float()        # through the first EOS
    resp = resp.masked_fill(resp_mask == 0, tok.pad_token_id)
    return Rollout(torch.cat([ids, resp], 1), torch.cat([mask, resp_mask.long()], 1),
                   resp_mask, resp.size(1), logprobs, entropy)


def gather_logprobs(logits, tokens):
    """log pi(token). logits (B, R, V), tokens (B, R) -> (B, R)"""
    return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def score_rollout(run: PPORun, ro: Rollout) -> dict:
    """Per rollout: reward score (B,), and the ``ppo.scorer``'s when one is set (B,); policy
    (from sampling) and reference log-probs, entropy and values (B, R)."""
    roles, t = run.roles, run.config.train
    chunk, parts = t.batch_size * t.grad_accum, []
    for i in range(0, ro.ids.size(0), chunk):
        ids, mask = ro.ids[i:i + chunk], ro.mask[i:i + chunk]
        resp = ids[:, -ro.n_resp:]
        roles.use("reference")
        part = {"ref_logprobs": gather_logprobs(roles.response_logits(ids, mask, ro.n_resp), resp)}
        roles.use("value")
        part["values"] = roles.response_values(ids, mask, ro.n_resp)
        function = isinstance(roles.scorer, rewards.FunctionScorer)
        texts = (run.tokenizer.batch_decode(resp, skip_special_tokens=True)
                 if function or run.judge is not None else None)  # functions score decoded responses
        if function:
            part["scores"] = torch.tensor(roles.scorer.score(ro.prompts[i:i + chunk], texts), device=ids.device)
        else:
            part["scores"] = roles.scorer.score_ids(ids, mask)
        if run.judge is not None:  # ppo.scorer on the same samples: does the reward rank them as it does?
            part["true_scores"] = torch.tensor(run.judge.score(ro.prompts[i:i + chunk], texts), device=ids.device)
        parts.append(part)
    return {"logprobs": ro.logprobs, "entropy": ro.entropy,
            **{k: torch.cat([part[k] for part in parts]) for k in parts[0]}}
