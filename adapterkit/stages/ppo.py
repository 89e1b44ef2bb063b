"""PPO: a policy adapter trained against a reward adapter, every role on ONE 4-bit base.

    adapterkit ppo tiny_ppo ppo.kl_coef=0.1

One quantized base sits in memory; each role is a set of named LoRA adapters on its modules:

    role        active adapters            trainable
    reference   parent stack (e.g. SFT)    -
    policy      parent stack + policy      policy
    reward      reward (+ its score head)  -
    value       value (+ value head)       value and value head (start as the reward's)

The reference is the policy with its own adapter switched off, never a second model.
setup (model, data, optimizer) -> train (rollout, score, GAE, PPO epochs) -> cleanup (artifact).
The maths is in ``adapterkit.losses`` (PPO, GAE, KL, whitening, KL controllers).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterkit import losses, rewards
from adapterkit.artifact import atomic_dir
from adapterkit.adapters import REWARD_STAGES, activate, load_parent_stack, lora_config, parent_record, save_adapter
from adapterkit.base import load_model
from adapterkit.config import PPOConfig
from adapterkit.data import load_data
from adapterkit.errors import DataError
from adapterkit.evaluate import generate, mean_token_kl, prompt_ids
from adapterkit.preflight import preflight
from adapterkit.plots import plot_curves
from adapterkit.stages.common import (AdapterRecord, base_manifest, check_finite, load_stage_tokenizer,
                                      save_stage_artifact)
from adapterkit.tokens import left_pad, model_device

log = logging.getLogger("adapterkit")
POLICY, VALUE, REWARD = "policy", "value", "reward"
CURVES = {"reward": "reward (train)", "eval_score": "held-out score", "kl": "KL to parent (train)",
          "entropy": "entropy", "value_loss": "value loss"}  # ppo_log.jsonl key -> ppo.png panel


def positions(mask):
    """Position ids that skip left padding, as ``generate`` computes them. (B, L) -> (B, L)"""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class SharedBase(torch.nn.Module):
    """The one PeftModel with every role's adapter, the reward and the value head.

    ``forward(role, ...)`` is the trainable pass (policy logits or values); the frozen roles run
    through ``score`` and ``response_logits`` under no_grad. Only policy and value weights ever
    require grad: peft's ``set_adapter`` toggles requires_grad, so ``use`` (``adapters.activate``)
    puts it back."""

    def __init__(self, peft_model, parents: list[str], scorer, value_head, temperature=1.0):
        super().__init__()
        self.peft, self.value_head, self.temperature = peft_model, value_head, temperature
        # reward.RewardScorer (the frozen "reward" adapter and its head), or a reward function
        self.scorer = scorer
        self.stacks = {"reference": parents, "policy": [*parents, POLICY], "value": [VALUE]}  # role -> adapters
        self.use("policy")

    def use(self, role: str) -> None:
        """Switch on ``role``'s adapters ([] = the bare base); policy and value stay trainable."""
        activate(self.peft, self.stacks[role], (POLICY, VALUE))

    def response_logits(self, ids, mask, n_resp: int):
        """Logits that predict the last n_resp tokens. (B, L) -> (B, R, V)"""
        out = self.peft(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                        logits_to_keep=n_resp + 1, use_cache=False)
        return out.logits[:, :-1].float() / self.temperature

    def response_values(self, ids, mask, n_resp: int):
        """V(s_t) for the state before each response token, from the backbone's last hidden
        states (no LM head). (B, L) -> (B, R)"""
        lm = self.peft.get_base_model()
        hidden = getattr(lm, lm.base_model_prefix)(
            input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False
        ).last_hidden_state[:, -n_resp - 1:-1]                         # (B, R, H)
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def forward(self, role: str, ids, mask, n_resp: int):
        self.use(role)
        if role == "policy":
            return self.response_logits(ids, mask, n_resp)
        return self.response_values(ids, mask, n_resp)


# -- setup -------------------------------------------------------------------------------------

def build_model(config: PPOConfig, device, tokenizer) -> tuple[SharedBase, dict]:
    """ONE base; parents, policy, reward and value adapters on it. Returns the model and the
    manifest (with the parent stack and the reward adapter recorded)."""
    from peft import get_peft_model
    from adapterkit.stages.reward import RewardScorer
    p = config.ppo
    model = load_model(config.base, device)  # 4-bit kernels kept differentiable (quant.py)
    manifest = base_manifest(config, model, tokenizer)
    base_fp = manifest["base"]["fingerprint"]
    model, parents, manifest["parent"] = load_parent_stack(model, p.parent, base_fp)
    if parents:
        model.add_adapter(POLICY, lora_config(config))
    else:
        model = get_peft_model(model, lora_config(config), adapter_name=POLICY)
    if rewards.is_function_ref(p.reward):
        scorer = rewards.load_function(p.reward)
        manifest["reward_function"] = rewards.describe(p.reward)
    else:
        manifest["reward_model"] = parent_record(p.reward, base_fp, REWARD_STAGES, "reward model")
        scorer = RewardScorer.attach(model, tokenizer, manifest["reward_model"]["path"], name=REWARD)
    if p.value_init in (None, "reward") and isinstance(scorer, RewardScorer):
        # a second copy of the reward's LoRA and head, trainable
        head = RewardScorer.attach(model, tokenizer, manifest["reward_model"]["path"], name=VALUE).head.float()
    else:
        model.add_adapter(VALUE, lora_config(config))
        head = torch.zeros(1, model.config.hidden_size, device=model_device(model))
    value_head = torch.nn.Linear(head.size(1), 1, bias=False, device=head.device)
    value_head.weight.data.copy_(head)
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return SharedBase(model, parents, scorer, value_head, p.temperature), manifest


def load_prompts(source: str, config: PPOConfig, tokenizer) -> list:
    d = config.data
    rows = load_data(source, fmt=d.format, allowed=("prompt",), tokenizer=tokenizer,
                     max_length=d.max_length, on_long=d.on_long, hub_split=d.hub_split).rows
    return [r["prompt"] for r in rows]


@dataclass
class PPORun:
    """Everything ``setup`` builds; ``train`` advances it; ``cleanup`` saves the artifact."""
    config: PPOConfig
    accelerator: object
    model: object        # SharedBase, as accelerate prepared it (DDP under `accelerate launch`)
    tokenizer: object
    optimizer: object
    scheduler: object
    kl_ctl: object
    prompts: list        # token ids per training prompt
    eval_prompts: list   # raw held-out prompts (messages or text)
    total_steps: int
    manifest: dict
    train_prompts: list = field(default_factory=list)  # raw training prompts, as ``prompts``
    step: int = 0
    history: list = field(default_factory=list)
    evals: list = field(default_factory=list)  # [{"step", "eval_score"}], step 0 = the parent
    best: dict | None = None  # {"step", "eval_score", "weights": the policy adapter's tensors}

    @property
    def roles(self) -> SharedBase:
        return self.accelerator.unwrap_model(self.model)


def setup(config: PPOConfig) -> PPORun:
    """Base + adapters, prompts, optimizer, scheduler and KL controller; resumes when asked."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from transformers import get_scheduler
    t, p = config.train, config.ppo
    acc = Accelerator(gradient_accumulation_steps=t.grad_accum, kwargs_handlers=[
        DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)])
    torch.manual_seed(t.seed)
    tokenizer = load_stage_tokenizer(config)  # template and data errors before the model loads
    raw = load_prompts(config.data.train, config, tokenizer)
    prompts = [prompt_ids(tokenizer, q) for q in raw]
    evals = load_prompts(config.data.eval, config, tokenizer) if config.data.eval else []
    roles, manifest = build_model(config, acc.device, tokenizer)
    per_step = p.rollout_batch_size * acc.num_processes
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_epochs * len(prompts) / per_step)
    params = [q for q in roles.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    updates = total * p.ppo_epochs * (p.rollout_batch_size // (t.batch_size * t.grad_accum))
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=int(t.warmup_ratio * updates),
                              num_training_steps=updates)
    model, optimizer = acc.prepare(roles, optimizer, device_placement=[False, False])
    kl_ctl = (losses.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl
              else losses.FixedKLController(p.kl_coef))
    run = PPORun(config, acc, model, tokenizer, optimizer, scheduler, kl_ctl, prompts, evals,
                 total, manifest, raw)
    if p.resume_from:
        load_checkpoint(run, p.resume_from)
    return run


# -- train -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def step_prompts(run: PPORun) -> list[int]:
    """Indices of this process's prompts for this step: a function of the step, so resuming
    sees the same."""
    b, acc, n = run.config.ppo.rollout_batch_size, run.accelerator, len(run.prompts)
    start = (run.step * acc.num_processes + acc.process_index) * b
    return [_epoch_order(n, run.config.train.seed, i // n)[i % n] for i in range(start, start + b)]


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
    from the next call's ``input_ids``."""

    def __init__(self, temperature: float):
        self.temperature, self.pending = temperature, None
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
        return scores

    def result(self, resp) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs, entropy), (B, R) each, for the generated responses resp (B, R)."""
        self.take(resp[:, -1])
        return torch.stack(self.logprobs, 1), torch.stack(self.entropy, 1)


@torch.no_grad()
def rollout(run: PPORun, prompts: list[list[int]], do_sample: bool = True) -> Rollout:
    """Responses sampled from the policy (eval mode, KV cache), with their log-probs."""
    roles, tok, p = run.roles, run.tokenizer, run.config.ppo
    ids, mask = left_pad(prompts, tok.pad_token_id, model_device(roles.peft))
    roles.use("policy")
    roles.peft.eval()
    sampling = dict(do_sample=True, temperature=p.temperature, top_k=0, top_p=1.0) if do_sample else {
        "do_sample": False}  # exact samples of pi (its logprobs are what PPO's ratio needs)
    recorder = SampledLogprobs(p.temperature)
    gen = roles.peft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=p.max_new_tokens,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                              use_cache=True, logits_processor=[recorder], **sampling)
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
    """Per rollout: reward score (B,); policy (from sampling) and reference log-probs, entropy
    and values (B, R)."""
    roles, t = run.roles, run.config.train
    chunk, parts = t.batch_size * t.grad_accum, []
    for i in range(0, ro.ids.size(0), chunk):
        ids, mask = ro.ids[i:i + chunk], ro.mask[i:i + chunk]
        resp = ids[:, -ro.n_resp:]
        roles.use("reference")
        part = {"ref_logprobs": gather_logprobs(roles.response_logits(ids, mask, ro.n_resp), resp)}
        roles.use("value")
        part["values"] = roles.response_values(ids, mask, ro.n_resp)
        if callable(roles.scorer):  # a reward function scores the decoded responses
            texts = run.tokenizer.batch_decode(resp, skip_special_tokens=True)
            part["scores"] = torch.tensor(rewards.score_completions(roles.scorer, ro.prompts[i:i + chunk], texts),
                                          device=ids.device)
        else:
            part["scores"] = roles.scorer.score_ids(ids, mask)
        parts.append(part)
    return {"logprobs": ro.logprobs, "entropy": ro.entropy,
            **{k: torch.cat([part[k] for part in parts]) for k in parts[0]}}


def add_advantages(run: PPORun, ro: Rollout, batch: dict) -> None:
    """InstructGPT's KL-shaped per-token reward, then GAE and whitened advantages."""
    p, mask, tok = run.config.ppo, ro.response_mask, run.tokenizer
    scores = batch["scores"]
    if p.missing_eos_penalty is not None:
        finished = (ro.ids[:, -ro.n_resp:] == tok.eos_token_id).any(-1)
        scores = scores - p.missing_eos_penalty * (~finished).float()
    rewards, kl = losses.per_token_rewards(scores, batch["logprobs"], batch["ref_logprobs"], mask,
                                           run.kl_ctl.value, p.kl_estimator)
    if p.whiten_rewards:
        rewards = losses.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = losses.gae_advantages(rewards, batch["values"], mask, p.gamma, p.lam)
    batch.update(kl=kl, returns=returns, advantages=losses.masked_whiten(advantages, mask))


def micro_step(run: PPORun, ro: Rollout, batch: dict, idx) -> dict:
    """Clipped policy and value losses on one micro-batch; one backward per role, so that
    gradient checkpointing recomputes each role with its own adapters active."""
    p, acc = run.config.ppo, run.accelerator
    ids, mask, rmask = ro.ids[idx], ro.mask[idx], ro.response_mask[idx]
    logprobs = gather_logprobs(run.model("policy", ids, mask, ro.n_resp), ids[:, -ro.n_resp:])
    pg_loss, clip_fraction, approx_kl = losses.ppo_policy_loss(
        logprobs, batch["logprobs"][idx], batch["advantages"][idx], rmask, p.clip_range)
    acc.backward(pg_loss)
    values = run.model("value", ids, mask, ro.n_resp)
    vf_loss, vf_clip = losses.ppo_value_loss(values, batch["values"][idx], batch["returns"][idx],
                                             rmask, p.clip_range_value)
    acc.backward(p.vf_coef * vf_loss)
    return {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(),
            "clip_fraction": clip_fraction.item(), "approx_kl": approx_kl.item(),
            "value_clip_fraction": vf_clip.item()}


def ppo_epochs(run: PPORun, ro: Rollout, batch: dict) -> dict:
    """ppo_epochs passes over the rollouts in shuffled minibatches of batch_size * grad_accum."""
    t, acc = run.config.train, run.accelerator
    params = [q for q in run.model.parameters() if q.requires_grad]
    # A CPU generator: the same minibatch order on every device, and after a resume; only the
    # (B,) index tensor then moves to the rollouts' device.
    order_rng = torch.Generator().manual_seed(t.seed + run.step)
    stats = []
    for _ in range(run.config.ppo.ppo_epochs):
        order = torch.randperm(ro.ids.size(0), generator=order_rng).to(ro.ids.device)
        for start in range(0, order.numel(), t.batch_size):
            with acc.accumulate(run.model):
                stats.append(micro_step(run, ro, batch, order[start:start + t.batch_size]))
                if acc.sync_gradients:
                    acc.clip_grad_norm_(params, t.max_grad_norm)
                    run.optimizer.step()
                    run.scheduler.step()
                    run.optimizer.zero_grad()
    return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}


def train_step(run: PPORun) -> dict:
    """Rollout -> score -> advantages -> PPO epochs -> KL controller; returns the step's log."""
    acc, p = run.accelerator, run.config.ppo
    torch.manual_seed(run.config.train.seed + 1000 * run.step + acc.process_index)
    chosen = step_prompts(run)
    ro = rollout(run, [run.prompts[i] for i in chosen])
    ro.prompts = [run.train_prompts[i] for i in chosen]
    batch = score_rollout(run, ro)
    add_advantages(run, ro, batch)
    stats = ppo_epochs(run, ro, batch)
    mask = ro.response_mask
    local = {"reward": batch["scores"].mean(), "kl": batch["kl"].sum(-1).mean(),
             "entropy": losses.masked_mean(batch["entropy"], mask),
             "response_length": mask.sum(-1).mean(), **stats}
    log = {k: acc.reduce(torch.as_tensor(v, device=acc.device).float(), "mean").item()
           for k, v in local.items()}
    log = {"step": run.step + 1, **log, "kl_coef": run.kl_ctl.value}
    run.kl_ctl.update(log["kl"], p.rollout_batch_size * acc.num_processes)
    run.step += 1
    run.history.append(log)
    return log


def train(run: PPORun) -> None:
    """PPO steps from ``run.step`` to the end, with a progress bar, held-out evaluations
    (``ppo.eval_every``; early stopping after ``ppo.patience`` without a new best) and
    checkpoints."""
    from tqdm.auto import tqdm
    p, acc = run.config.ppo, run.accelerator
    bar = tqdm(total=run.total_steps, initial=run.step, desc="ppo", dynamic_ncols=True,
               disable=not (run.config.train.progress and acc.is_main_process))
    evaluating = p.eval_every and run.eval_prompts
    if evaluating and not run.evals:
        record_eval(run)  # step 0: the parent, the score to beat
    while run.step < run.total_steps and not patience_spent(run):
        entry = train_step(run)
        check_finite(entry, f"ppo step {run.step}", "the last good checkpoint is kept"
                     if p.checkpoint_every else "nothing was saved")
        if evaluating and (run.step % p.eval_every == 0 or run.step == run.total_steps):
            entry["eval_score"] = record_eval(run)
        bar.update(1)
        bar.set_postfix(reward=f"{entry['reward']:.3f}", kl=f"{entry['kl']:.3f}",
                        vloss=f"{entry['value_loss']:.3f}", clip=f"{entry['clip_fraction']:.2f}",
                        **({"held_out": f"{entry['eval_score']:.3f}"} if "eval_score" in entry else {}))
        if run.step % run.config.train.logging_steps == 0:
            log.info("ppo %s", json.dumps(entry))
        if p.checkpoint_every and run.step % p.checkpoint_every == 0:
            save_checkpoint(run)
    bar.close()


# -- held-out evaluation, best policy, early stopping ---------------------------------------------

@torch.no_grad()
def held_out_score(run: PPORun) -> float:
    """Mean score of the policy's greedy responses to the held-out prompts: the scorer's when
    one is set, else the reward's (function or reward adapter)."""
    p, roles, prompts = run.config.ppo, run.roles, run.eval_prompts
    roles.use("policy")
    responses = generate(roles.peft, run.tokenizer, prompts, max_new_tokens=p.max_new_tokens,
                         batch_size=p.rollout_batch_size)
    judge = p.scorer if p.scorer is not None else roles.scorer
    if callable(judge) or isinstance(judge, str):
        scores = rewards.score_completions(rewards.load_function(judge), prompts, responses)
    else:
        scores = judge.score(prompts, responses)
    return sum(scores) / len(scores)


def record_eval(run: PPORun) -> float:
    """Evaluate now; remember the policy's weights when this is the best evaluation so far."""
    from peft.utils import get_peft_model_state_dict
    score = held_out_score(run)
    run.evals.append({"step": run.step, "eval_score": score})
    if run.config.ppo.keep_best and (run.best is None or score > run.best["eval_score"]):
        weights = get_peft_model_state_dict(run.roles.peft, adapter_name=POLICY)
        run.best = {"step": run.step, "eval_score": score,
                    "weights": {k: v.detach().clone() for k, v in weights.items()}}
    return score


def patience_spent(run: PPORun) -> bool:
    """True after ``ppo.patience`` evaluations in a row without a new best."""
    patience = run.config.ppo.patience
    if not patience or len(run.evals) <= patience:
        return False
    best_before = max(e["eval_score"] for e in run.evals[:-patience])
    return all(e["eval_score"] <= best_before for e in run.evals[-patience:])


def restore_best(run: PPORun) -> None:
    """Put the best evaluation's policy weights back (``ppo.keep_best``)."""
    from peft.utils import set_peft_model_state_dict
    if run.best is None or run.best["step"] == run.step:
        return
    log.info("ppo: keeping the policy of step %d (held-out %.4f), the best of %d evaluations",
             run.best["step"], run.best["eval_score"], len(run.evals))
    set_peft_model_state_dict(run.roles.peft, run.best["weights"], adapter_name=POLICY)


# -- checkpoints: safetensors for tensors, JSON for the rest (no pickle) --------------------------

def save_checkpoint(run: PPORun) -> None:
    """Policy and value adapters, value head, AdamW state, scheduler, KL coefficient, step."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    if not run.accelerator.is_main_process:
        return
    out = Path(run.config.ppo.checkpoint_dir or f"{run.config.output.dir}.checkpoint")
    with atomic_dir(out) as tmp:
        weights = {f"{name}/{k}": v for name in (POLICY, VALUE)
                   for k, v in get_peft_model_state_dict(run.roles.peft, adapter_name=name).items()}
        weights["value_head.weight"] = run.roles.value_head.weight
        if run.best is not None:
            weights.update({f"best/{k}": v for k, v in run.best["weights"].items()})
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()},
                  tmp / "adapters.safetensors")
        state = run.optimizer.state_dict()  # {"state": {i: {name: value}}, "param_groups": [...]}
        flat = {f"{i}/{k}": v for i, s in state["state"].items() for k, v in s.items()}
        save_file({k: v.detach().cpu().contiguous() for k, v in flat.items() if torch.is_tensor(v)},
                  tmp / "optimizer.safetensors")
        meta = {"step": run.step, "kl_coef": run.kl_ctl.value, "history": run.history, "evals": run.evals,
                "best": None if run.best is None else {k: run.best[k] for k in ("step", "eval_score")},
                "param_groups": state["param_groups"], "scheduler": run.scheduler.state_dict(),
                "optimizer_scalars": {k: v for k, v in flat.items() if not torch.is_tensor(v)}}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))


def load_checkpoint(run: PPORun, path: str | os.PathLike) -> None:
    """Restore what ``save_checkpoint`` wrote; the next step is the one after it."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    path = Path(path)
    if not (path / "trainer.json").is_file():
        raise DataError(f"{path}: not a PPO checkpoint (no trainer.json)")
    weights = load_file(str(path / "adapters.safetensors"))
    meta = json.loads((path / "trainer.json").read_text())
    for name in (POLICY, VALUE):
        set_peft_model_state_dict(run.roles.peft, {k.split("/", 1)[1]: v for k, v in weights.items()
                                                   if k.startswith(f"{name}/")}, adapter_name=name)
    run.roles.value_head.weight.data.copy_(weights["value_head.weight"])
    state: dict = {}
    optimizer = load_file(str(path / "optimizer.safetensors"))
    for key, v in [*optimizer.items(), *meta["optimizer_scalars"].items()]:
        i, k = key.split("/", 1)
        state.setdefault(int(i), {})[k] = v
    run.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    run.scheduler.load_state_dict(meta["scheduler"])
    run.kl_ctl.value, run.step, run.history = meta["kl_coef"], meta["step"], meta["history"]
    run.evals = meta.get("evals", [])
    if meta.get("best") is not None:
        run.best = {**meta["best"], "weights": {k.split("/", 1)[1]: v for k, v in weights.items()
                                                 if k.startswith("best/")}}


# -- evaluation and cleanup --------------------------------------------------------------------

def evaluate_policy(run: PPORun) -> dict:
    """Greedy responses of policy and parent on held-out prompts: ground-truth scores, and the
    mean per-token KL(policy || parent) on the policy's responses (as the DPO stage reports)."""
    prompts, p, roles = run.eval_prompts, run.config.ppo, run.roles
    if not prompts:
        return {}
    kw = dict(max_new_tokens=p.max_new_tokens, batch_size=p.rollout_batch_size)
    responses = {}
    for role in ("policy", "reference"):
        roles.use(role)
        responses[role] = generate(roles.peft, run.tokenizer, prompts, **kw)
    out = {"kl": mean_token_kl(roles.peft, run.tokenizer, prompts, responses["policy"],
                               roles.stacks["policy"], roles.stacks["reference"])}
    if p.scorer is not None:
        score = rewards.load_function(p.scorer)
        for role, key in (("policy", "score"), ("reference", "parent_score")):
            out[key] = sum(rewards.score_completions(score, prompts, responses[role])) / len(prompts)
    roles.use("policy")
    return out


def cleanup(run: PPORun) -> AdapterRecord:
    """Evaluate, then save the policy adapter with its manifest, curves and log."""
    acc, history = run.accelerator, run.history
    acc.wait_for_everyone()
    if acc.is_main_process:
        last = history[-1] if history else {}
        restore_best(run)
        metrics = {**evaluate_policy(run), "steps": run.step, "train_reward": last.get("reward"),
                   "train_kl": last.get("kl"), "kl_coef": run.kl_ctl.value}
        if run.best is not None:
            metrics |= {"best_step": run.best["step"], "best_eval_score": run.best["eval_score"]}

        def extra(tmp: Path) -> None:
            points = {k: [(h["step"], h[k]) for h in history if k in h] for k in CURVES}
            points["eval_score"] = [(e["step"], e["eval_score"]) for e in run.evals]
            plot_curves(tmp / "ppo.png", {CURVES[k]: v for k, v in points.items()}, "PPO")
            (tmp / "ppo_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))

        save_stage_artifact(run.config, {**run.manifest, "metrics": metrics, "evals": run.evals},
                            lambda tmp: save_adapter(run.roles.peft, POLICY, tmp), extra)
    acc.wait_for_everyone()
    return AdapterRecord.from_dir(run.config.output.dir)


def train_ppo(config: PPOConfig) -> AdapterRecord:
    """Train a PPO policy adapter as the config says; returns the saved adapter's record."""
    preflight(config)  # output folder, adapters and data rows, before any model loads
    run = setup(config)
    train(run)
    return cleanup(run)
