"""PPO: a policy adapter trained against a reward adapter, every role on ONE 4-bit base.

    adapterkit ppo tiny_ppo ppo.kl_coef=0.1

One quantized base sits in memory; each role is a set of named LoRA adapters on its modules:

    role        active adapters            trainable
    reference   parent stack (e.g. SFT)    -
    policy      parent stack + policy      policy
    reward      reward (+ its score head)  -
    value       value (+ value head)       value and value head (start as the reward's)

The reference is the policy with its own adapter switched off, never a second model.
setup (model, data, optimizer) -> train (rollout, score, GAE, PPO epochs) -> finish (artifact).
Rollouts are in ``ppo_rollout.py``, checkpoints in ``ppo_checkpoint.py``.
The maths is in ``adapterkit.losses`` (PPO, GAE, KL, whitening, KL controllers).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterkit import losses, rewards
from adapterkit.adapters import save_adapter
from adapterkit.config import PPOConfig
from adapterkit.distributed import all_sum, global_sum, launched, state, tensor_sum
from adapterkit.evaluate import compare_to_parent, generate, ranking_agreement
from adapterkit.plots import plot_curves
from adapterkit.stages.common import (AdapterRecord, check_finite, load_splits, load_stage_tokenizer,
                                      resume_checkpoint, run_stage, save_stage_artifact)
from adapterkit.stages.ppo_checkpoint import load_checkpoint, save_checkpoint
from adapterkit.stages.ppo_model import POLICY, SharedBase, build_model
from adapterkit.stages.ppo_rollout import Rollout, gather_logprobs, rollout, score_rollout  # noqa: F401
from adapterkit.tokens import prompt_ids

log = logging.getLogger("adapterkit")
# ppo_log.jsonl key -> ppo.png panel. The log's "kl" is the train KL (sampled responses, the
# KL-shaped reward's estimator); the manifest's "kl" is the held-out KL (greedy responses to
# data.eval, as DPO reports it): two quantities, named apart wherever they are shown.
CURVES = {"reward": "reward (train) and held-out score", "kl": "train KL to parent (sampled)",
          "entropy": "entropy", "value_loss": "value loss",
          "agreement": "reward vs scorer: pairs of samples in the same order"}
TRACKED = ("reward", "kl", "entropy", "value_loss", "policy_loss", "clip_fraction", "approx_kl",
           "response_length", "kl_coef", "eval_score", "train_score", "agreement")  # accelerate's trackers, per step
# Below this mean agreement of the reward with ppo.scorer on the train samples (0.5: chance)
# finish warns. Measured (ppo_screen in benchmarks/results/README.md): tiny seeds 0-4, where PPO
# gains +0.10..+0.29, 0.75-0.90; reverse seeds whose PPO gains nothing, 0.38-0.54.
AGREEMENT_WARNING = 0.6


@dataclass
class PPORun:
    """Everything ``setup`` builds; ``train`` advances it; ``finish`` saves the artifact."""
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
    score_moments: losses.RunningMoments = field(default_factory=losses.RunningMoments)  # ppo.normalize_scores
    judge: object = None  # ppo.scorer (a rewards.FunctionScorer), or None

    @property
    def roles(self) -> SharedBase:
        return self.accelerator.unwrap_model(self.model)


def setup(config: PPOConfig) -> PPORun:
    """Base + adapters, prompts, optimizer, scheduler and KL controller; resumes when asked."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from transformers import get_scheduler
    t, p = config.train, config.ppo
    state()  # the process group (gloo on CPU), as every stage sets it up
    acc = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=t.grad_accum, kwargs_handlers=[
        DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)],
        log_with=config.trackers or None, project_dir=str(config.logging_dir) if config.trackers else None)
    if config.trackers:  # train.report_to: the trainer stages' trackers, through accelerate
        acc.init_trackers(config.output.name or "ppo", config=tracked_config(config))
    torch.manual_seed(t.seed)
    tokenizer = load_stage_tokenizer(config)  # template and data errors before the model loads
    train_rows, eval_rows = load_splits(config, ("prompt",), tokenizer)
    raw = [r["prompt"] for r in train_rows.rows]
    prompts = [prompt_ids(tokenizer, q) for q in raw]
    evals = [r["prompt"] for r in eval_rows.rows] if eval_rows else []
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
                 total, manifest, raw, judge=rewards.FunctionScorer.load(p.scorer) if p.scorer is not None else None)
    checkpoint = resume_checkpoint(config)
    if checkpoint is not None:
        log.info("ppo: resuming from %s", checkpoint)
        load_checkpoint(run, checkpoint)
    return run


def tracked_config(config: PPOConfig) -> dict:
    """The recipe's scalars, flattened (``ppo.kl_coef``), as trackers take hyperparameters."""
    flat = {f"{section}.{k}": v for section, values in config.model_dump(mode="json").items()
            if isinstance(values, dict) for k, v in values.items()}
    return {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}


# -- train -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def step_rows(run: PPORun) -> range:
    """This process's rows of the step's global batch, numbered over the whole run: a function
    of the step, so resuming sees the same; process k of N has the k-th share of the rows one
    process would draw with a rollout batch N times as large."""
    b, acc = run.config.ppo.rollout_batch_size, run.accelerator
    start = (run.step * acc.num_processes + acc.process_index) * b
    return range(start, start + b)


def step_prompts(run: PPORun) -> list[int]:
    """Indices of this process's prompts for this step (``step_rows``, epoch by epoch)."""
    n = len(run.prompts)
    return [_epoch_order(n, run.config.train.seed, i // n)[i % n] for i in step_rows(run)]


def add_advantages(run: PPORun, ro: Rollout, batch: dict) -> None:
    """InstructGPT's KL-shaped per-token reward (on normalised scores with
    ``ppo.normalize_scores``: statistics of every process's scores), then GAE and whitened
    advantages. Under ``accelerate launch`` rewards and advantages are whitened over the step's
    global batch (every process's tokens), as one process holding the whole batch would."""
    p, mask, tok = run.config.ppo, ro.response_mask, run.tokenizer
    scores = batch["scores"]
    if p.missing_eos_penalty is not None:
        finished = (ro.ids[:, -ro.n_resp:] == tok.eos_token_id).any(-1)
        scores = scores - p.missing_eos_penalty * (~finished).float()
    if p.normalize_scores:  # kl_coef in units of the reward's spread, whatever the reward's scale
        run.score_moments.update(run.accelerator.gather(scores))
        scores = run.score_moments.normalise(scores)
    rewards, kl = losses.per_token_rewards(scores, batch["logprobs"], batch["ref_logprobs"], mask,
                                           run.kl_ctl.value, p.kl_estimator)
    if p.whiten_rewards:
        rewards = losses.masked_whiten(rewards, mask, shift_mean=False, all_sum=global_sum())
    advantages, returns = losses.gae_advantages(rewards, batch["values"], mask, p.gamma, p.lam)
    batch.update(kl=kl, returns=returns, advantages=losses.masked_whiten(advantages, mask, all_sum=global_sum()))


def token_share(run: PPORun, rmask) -> torch.Tensor | float:
    """N x this process's share of a micro-batch's response tokens over N processes (1 alone).
    The losses are token means over each process's tokens and DDP averages the gradients, so
    scaling each process's loss by it makes the update the token mean over all of them: what
    one process holding every process's micro-batch computes."""
    if not launched():
        return 1.0
    tokens = rmask.sum()
    return tokens * run.accelerator.num_processes / tensor_sum(tokens).clamp(min=1.0)


def micro_step(run: PPORun, ro: Rollout, batch: dict, idx) -> dict:
    """Clipped policy and value losses on one micro-batch; one backward per role, so that
    gradient checkpointing recomputes each role with its own adapters active."""
    p, acc = run.config.ppo, run.accelerator
    ids, mask, rmask = ro.ids[idx], ro.mask[idx], ro.response_mask[idx]
    share = token_share(run, rmask)
    logprobs = gather_logprobs(run.model("policy", ids, mask, ro.n_resp), ids[:, -ro.n_resp:])
    pg_loss, clip_fraction, approx_kl = losses.ppo_policy_loss(
        logprobs, batch["logprobs"][idx], batch["advantages"][idx], rmask, p.clip_range)
    acc.backward(pg_loss * share)
    values = run.model("value", ids, mask, ro.n_resp)
    vf_loss, vf_clip = losses.ppo_value_loss(values, batch["values"][idx], batch["returns"][idx],
                                             rmask, p.clip_range_value)
    acc.backward(p.vf_coef * vf_loss * share)
    # token means, weighted as the losses are: their mean over processes is the global token mean
    return {k: float(v.detach() * share) for k, v in (("policy_loss", pg_loss), ("value_loss", vf_loss),
            ("clip_fraction", clip_fraction), ("approx_kl", approx_kl), ("value_clip_fraction", vf_clip))}


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
    ro = rollout(run, [run.prompts[i] for i in chosen], rows=step_rows(run))
    ro.prompts = [run.train_prompts[i] for i in chosen]
    batch = score_rollout(run, ro)
    add_advantages(run, ro, batch)
    stats = ppo_epochs(run, ro, batch)
    mask = ro.response_mask
    local = {"reward": batch["scores"].mean(), "kl": batch["kl"].sum(-1).mean(),
             "entropy": losses.masked_mean(batch["entropy"], mask) * token_share(run, mask),
             "response_length": mask.sum(-1).mean(), **stats}
    if run.judge is not None:  # the scorer's mean on the samples the reward scored
        local["train_score"] = batch["true_scores"].mean()
    log = {k: acc.reduce(torch.as_tensor(v, device=acc.device).float(), "mean").item()
           for k, v in local.items()}
    log = {"step": run.step + 1, **log, "kl_coef": run.kl_ctl.value}
    if run.judge is not None:  # over every process's samples: the same number on each
        agreement = ranking_agreement(acc.gather(batch["scores"]), acc.gather(batch["true_scores"]))
        log |= {"agreement": agreement} if agreement is not None else {}
    run.kl_ctl.update(log["kl"], p.rollout_batch_size * acc.num_processes)
    run.step += 1
    run.history.append(log)
    return log


def train(run: PPORun) -> None:
    """PPO steps from ``run.step`` to the end, with a progress bar, held-out evaluations
    (``ppo.eval_every``; early stopping after ``ppo.patience`` without a new best) and
    checkpoints."""
    from tqdm.auto import tqdm
    p, acc, save_steps = run.config.ppo, run.accelerator, run.config.train.save_steps
    bar = tqdm(total=run.total_steps, initial=run.step, desc="ppo", dynamic_ncols=True,
               disable=not (run.config.train.progress and acc.is_main_process))
    evaluating = p.eval_every and run.eval_prompts
    if (p.keep_best or p.patience) and not run.eval_prompts:
        log.warning("ppo.keep_best/ppo.patience: no held-out prompts (data.eval is empty), so "
                    "nothing is evaluated and the last policy is saved")
    if evaluating and p.keep_best and run.judge is None and not rewards.is_function_ref(p.reward):
        log.warning("ppo.keep_best: no ppo.scorer, so held-out answers are judged by the reward model PPO "
                    "optimises, which cannot see it being over-optimised; set ppo.scorer=module:function")
    if evaluating and not run.evals:
        record_eval(run)  # step 0: the parent, the score to beat
    while run.step < run.total_steps and not patience_spent(run):
        entry = train_step(run)
        check_finite(entry, f"ppo step {run.step}", "the last good checkpoint is kept"
                     if save_steps else "nothing was saved")
        if evaluating and (run.step % p.eval_every == 0 or run.step == run.total_steps):
            entry["eval_score"] = record_eval(run)
        bar.update(1)
        bar.set_postfix(reward=f"{entry['reward']:.3f}", train_kl=f"{entry['kl']:.3f}",
                        vloss=f"{entry['value_loss']:.3f}", clip=f"{entry['clip_fraction']:.2f}",
                        **({"held_out": f"{entry['eval_score']:.3f}"} if "eval_score" in entry else {}))
        if run.step % run.config.train.logging_steps == 0:
            log.info("ppo %s", json.dumps(entry))
            if run.config.trackers:
                acc.log({k: entry[k] for k in TRACKED if k in entry}, step=run.step)
        if save_steps and run.step % save_steps == 0:
            save_checkpoint(run)
    bar.close()


# -- held-out evaluation, best policy, early stopping ---------------------------------------------

@torch.no_grad()
def held_out_score(run: PPORun) -> float:
    """Mean score of the policy's greedy responses to the held-out prompts: the scorer's when
    one is set, else the reward's (function or reward adapter). Under ``accelerate launch``
    each process scores its share of the prompts and the sums are added up, so every process
    gets the same number (and ``keep_best``/``patience`` decide the same way on each)."""
    p, roles, acc = run.config.ppo, run.roles, run.accelerator
    prompts = run.eval_prompts[acc.process_index::acc.num_processes]
    scores = []
    if prompts:
        roles.use("policy")
        responses = generate(roles.peft, run.tokenizer, prompts, max_new_tokens=p.max_new_tokens,
                             batch_size=p.rollout_batch_size)
        scores = (run.judge or roles.scorer).score(prompts, responses)
    total, count = all_sum([float(sum(scores)), float(len(scores))])
    return total / count


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


# -- evaluation and finish ---------------------------------------------------------------------

def evaluate_policy(run: PPORun) -> dict:
    """Greedy responses of policy and parent on held-out prompts: ground-truth scores, and the
    mean per-token KL(policy || parent) on the policy's responses (as the DPO stage reports)."""
    prompts, p, roles = run.eval_prompts, run.config.ppo, run.roles
    if not prompts:
        return {}
    out, _ = compare_to_parent(roles.peft, run.tokenizer, prompts, roles.stacks["policy"],
                               roles.stacks["reference"], p.scorer, p.max_new_tokens)  # DPO's batching too
    roles.use("policy")
    return out


def finish(run: PPORun, result=None) -> AdapterRecord:
    """Evaluate, then save the policy adapter with its manifest, curves and log. Under
    ``accelerate launch`` the main process evaluates and writes while the others wait for it
    in ``save_stage_artifact``."""
    acc, history = run.accelerator, run.history
    metrics = {}
    if acc.is_main_process:
        last = history[-1] if history else {}
        restore_best(run)
        metrics = {**evaluate_policy(run), "steps": run.step, "train_reward": last.get("reward"),
                   "train_kl": last.get("kl"), "kl_coef": run.kl_ctl.value, **judged(history)}
        if run.best is not None:
            metrics |= {"best_step": run.best["step"], "best_eval_score": run.best["eval_score"]}

    def extra(tmp: Path) -> None:
        points = {CURVES[k]: [(h["step"], h[k]) for h in history if k in h] for k in CURVES}
        by = "scorer" if run.judge is not None else "reward"
        points[CURVES["reward"]] = {  # one panel: over-optimisation shows as the lines parting
            "reward (train)": points[CURVES["reward"]],
            f"held-out score ({by})": [(e["step"], e["eval_score"]) for e in run.evals],
            "scorer on the train samples": [(h["step"], h["train_score"]) for h in history if "train_score" in h]}
        plot_curves(tmp / "ppo.png", points, "PPO")
        (tmp / "ppo_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))

    record = save_stage_artifact(run.config, {**run.manifest, "metrics": metrics, "evals": run.evals},
                                 lambda tmp: save_adapter(run.roles.peft, POLICY, tmp), extra)
    if run.config.trackers:
        acc.end_training()
    return record


def judged(history: list[dict]) -> dict:
    """With ``ppo.scorer``: the scorer's mean on the last step's samples, and the reward's
    agreement with it over the run (mean of the steps); a warning when that is near chance."""
    agreement = [h["agreement"] for h in history if "agreement" in h]
    if not agreement:
        return {}
    mean = sum(agreement) / len(agreement)
    if mean < AGREEMENT_WARNING:
        log.warning("ppo: the reward put the train samples in ppo.scorer's order for %.0f%% of the pairs "
                    "(50%% is chance): it rewards what the scorer does not, and PPO optimised that", 100 * mean)
    return {"train_score": history[-1]["train_score"], "train_agreement": mean}


def train_ppo(config: PPOConfig) -> AdapterRecord:
    """Train a PPO policy adapter as the config says; returns the saved adapter's record."""
    return run_stage(sys.modules[__name__], config)
