"""DPO: a LoRA adapter trained on top of a frozen parent stack, over trl's ``DPOTrainer``.

    adapterkit dpo tiny_dpo dpo.beta=0.1 'dpo.parent=[runs/tiny/sft]'

One base in memory. The parent adapters (usually the SFT adapter) are loaded frozen as
``parent0, parent1, ...``; the policy is that stack plus the trained adapter ``default``; the
reference is the same model with only ``default`` switched off - the parent stack, not the
bare base, and no second copy of anything.

- ``dpo.mode=new``: ``default`` is a fresh LoRA on top of the whole stack (policy = reference
  at step 0, as LoRA's B starts at zero).
- ``dpo.mode=continue``: ``default`` starts as a copy of the last parent and replaces it in the
  policy stack; the original stays frozen in the reference.

trl's own PEFT reference switches every adapter off (the bare base), or a ``ref`` copy of
``default`` on alone; ``StackDPOTrainer`` replaces that one computation.

setup (base, parents, policy adapter, data, trainer) -> train -> evaluate against the parent
(held-out pairs, generation score, KL, win rate) -> save only ``default`` in PEFT's root layout.
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass

import torch

from adapterkit import _compat
from adapterkit.adapters import (REWARD_STAGES, activate, load_parent_stack, lora_config, parent_record,
                                 use_adapters)
from adapterkit.base import load_model
from adapterkit.config import DPOConfig
from adapterkit.data import load_data
from adapterkit.evaluate import compare_to_parent, completion_logps
from adapterkit.plots import history_series, plot_curves
from adapterkit.stages.common import (AdapterRecord, base_manifest, keep_adapters_fp32, load_splits,
                                      load_stage_tokenizer, prepare_trainer, run_dir, run_stage,
                                      save_stage_artifact, trainer_kwargs, trainer_metrics, train_trainer)
from adapterkit.tokens import to_device

ADAPTER = "default"  # peft saves this name at the root of the adapter directory
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
NON_MODEL_KEYS = {"completion_mask", *REF_KEYS}
LOGGED = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


# -- the trainer: reference = parent stack ---------------------------------------------------------

def _trainer_class():
    from trl import DPOTrainer

    class StackDPOTrainer(DPOTrainer):
        """trl's DPOTrainer whose reference log-probs come from the parent stack
        (``self.reference``: adapter names), with the policy adapter switched off."""
        reference: list[str] = []

        def compute_ref_log_probs(self, model, inputs):
            """(ref_chosen_logps (B,), ref_rejected_logps (B,)) for a padded batch of 2B rows."""
            kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)  # (2B, T)
            peft_model = self.accelerator.unwrap_model(self.model)
            with (torch.no_grad(),
                  _compat.disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
                  use_adapters(peft_model, self.reference), self.accelerator.autocast()):
                per_token = model(**kwargs, use_cache=False, labels=labels, fused_lm_head=True).log_probs
            logps = per_token[:, -(labels.shape[1] - 1):].sum(dim=1)  # (2B,); 0 off the completion
            return logps.chunk(2, dim=0)

    def add_reference(trainer, model, inputs):
        if REF_KEYS[0] in inputs:  # precomputed (``dpo.precompute_ref_logps``)
            return inputs
        return {**inputs, **dict(zip(REF_KEYS, trainer.compute_ref_log_probs(model, inputs)))}

    return _compat.with_reference_in_batch(StackDPOTrainer, add_reference)  # trl reads them from the batch


# -- setup ---------------------------------------------------------------------------------------------

@dataclass
class PolicyStack:
    """Adapter names switched on for the policy and for the reference, and the parent records."""
    policy: list[str]
    reference: list[str]
    parents: list[dict]  # the manifest's parent entries


def build_stack(config: DPOConfig, model, base_fp: dict):
    """Frozen parents + the trainable ``default`` adapter; returns (PeftModel, PolicyStack)."""
    from peft import get_peft_model
    model, parents, entries = load_parent_stack(model, config.dpo.parent, base_fp)
    if config.dpo.mode == "continue":  # a trainable copy of the last parent replaces it
        model.load_adapter(entries[-1]["path"], adapter_name=ADAPTER, is_trainable=True)
        policy = parents[:-1] + [ADAPTER]
    elif parents:
        model.add_adapter(ADAPTER, lora_config(config))
        policy = parents + [ADAPTER]
    else:  # no parent: plain DPO against the bare base
        model = get_peft_model(model, lora_config(config))
        policy = [ADAPTER]
    activate(model, policy, [ADAPTER])
    return model, PolicyStack(policy, parents, entries)


def snapshot_adapters(model) -> dict[str, torch.Tensor]:
    """Copies of every LoRA weight on the model: the parents and ``default``'s starting point."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def restore_adapters(model, saved: dict[str, torch.Tensor], stack: PolicyStack) -> None:
    """Undo what trl 1.16's init does to a PeftModel it is handed: it adds a ``ref`` copy of
    ``default`` (a second policy-sized adapter we never use) and, on a quantized base, casts
    the trainable weights to bf16 (``continue`` would start from a bf16-rounded parent). Every
    adapter gets its exact weights back; only ``default`` trains."""
    if _compat.TRL_REF_ADAPTER in model.peft_config:
        model.delete_adapter(_compat.TRL_REF_ADAPTER)
    params = dict(model.named_parameters())
    for name, value in saved.items():
        params[name].data = value
    activate(model, stack.policy, [ADAPTER])


def setup_data(config: DPOConfig, tokenizer):
    from datasets import Dataset
    train, evals = load_splits(config, ("preference",), tokenizer)
    return Dataset.from_list(train.rows), (evals.rows if evals else []), {"train_rows": len(train.rows), **train.report}


def precompute_reference(trainer, batch_size: int) -> None:
    """Reference log-probs for every training pair, once, as dataset columns."""
    from torch.utils.data import DataLoader
    loader = DataLoader(trainer.train_dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=trainer.data_collator)
    chosen, rejected = [], []
    for batch in loader:
        batch = to_device(batch, trainer.model)
        c, r = trainer.compute_ref_log_probs(trainer.model, batch)
        chosen += c.float().cpu().tolist()
        rejected += r.float().cpu().tolist()
    trainer.train_dataset = (trainer.train_dataset.add_column(REF_KEYS[0], chosen)
                             .add_column(REF_KEYS[1], rejected))


def loss_terms(d) -> dict:
    """trl's loss list: the DPO variant, plus the chosen NLL when ``sft_weight`` > 0 (RPO)."""
    if d.sft_weight == 0:
        return {"loss_type": [d.loss_type]}
    return {"loss_type": [d.loss_type, "sft"], "loss_weights": [1.0, d.sft_weight]}


@dataclass
class DPORun:
    """Everything ``setup`` builds; ``finish`` evaluates it and saves the artifact."""
    config: DPOConfig
    trainer: object  # StackDPOTrainer over the PeftModel
    stack: PolicyStack
    eval_pairs: list[dict]
    manifest: dict
    report: dict
    reward_dir: str | None  # resolved and checked against the base before training
    scratch: str  # the trainer's logs (its checkpoints, with train.save_steps, go to config.checkpoint_dir)


def setup(config: DPOConfig) -> DPORun:
    """Base, frozen parents, the policy adapter, data and trainer; nothing trained yet."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOConfig as TrlDPOConfig
    tokenizer = load_stage_tokenizer(config)  # template and data errors before the model loads
    train_ds, eval_pairs, report = setup_data(config, tokenizer)
    model = load_model(config.base)
    manifest = base_manifest(config, model, tokenizer)
    reward_dir = None
    if config.dpo.reward is not None:  # a wrong reward adapter fails now, not after training
        reward_dir = parent_record(config.dpo.reward, manifest["base"]["fingerprint"], REWARD_STAGES,
                                  "reward model")["path"]
    if config.base.quantization != "none":
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.train.gradient_checkpointing)
    set_seed(config.train.seed)  # the new adapter's A starts random: the same random every run
    model, stack = build_stack(config, model, manifest["base"]["fingerprint"])
    manifest["parent"] = stack.parents
    d = config.dpo
    during = eval_pairs if eval_pairs and config.train.eval_steps else None  # else evaluated at the end
    scratch = run_dir()
    args = TrlDPOConfig(**trainer_kwargs(config, scratch, has_eval=during is not None),
                        max_length=config.data.max_length, beta=d.beta, label_smoothing=d.label_smoothing,
                        **loss_terms(d))
    saved = snapshot_adapters(model)
    trainer = _trainer_class()(model=model, ref_model=None, args=args, train_dataset=train_ds,
                               processing_class=tokenizer, eval_dataset=Dataset.from_list(during) if during else None)
    restore_adapters(trainer.model, saved, stack)
    prepare_trainer(trainer, config)
    keep_adapters_fp32(trainer.model)  # ``default`` trains in fp32 (common.py)
    trainer.reference = stack.reference
    if d.precompute_ref_logps:
        precompute_reference(trainer, config.train.batch_size)
    return DPORun(config, trainer, stack, eval_pairs, manifest, report, reward_dir, scratch)


# -- evaluation against the parent ---------------------------------------------------------------

def pair_logps(model, tokenizer, pairs: list[dict], adapters: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of chosen and rejected completions, (N,) each, under ``adapters``."""
    prompts = [p["prompt"] for p in pairs]
    with use_adapters(model, adapters):
        return (completion_logps(model, tokenizer, prompts, [p["chosen"] for p in pairs]),
                completion_logps(model, tokenizer, prompts, [p["rejected"] for p in pairs]))


def evaluate_pairs(model, tokenizer, pairs: list[dict], stack: PolicyStack, beta: float) -> dict:
    """Held-out pairs: implicit rewards beta*log(pi/ref), and how often each model prefers chosen."""
    pc, pr = pair_logps(model, tokenizer, pairs, stack.policy)      # (N,), (N,)
    rc, rr = pair_logps(model, tokenizer, pairs, stack.reference)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return {"eval_rewards_chosen": chosen.mean().item(), "eval_rewards_rejected": rejected.mean().item(),
            "eval_margin": (chosen - rejected).mean().item(),
            "eval_reward_accuracy": (chosen > rejected).float().mean().item(),
            "eval_pref_accuracy": (pc > pr).float().mean().item(),
            "parent_pref_accuracy": (rc > rr).float().mean().item()}


def evaluate_prompts(model, tokenizer, config: DPOConfig, stack: PolicyStack, reward_dir: str | None) -> dict:
    """Greedy responses of policy and parent on held-out prompts: ground-truth score, KL of the
    policy to its parent on the policy's responses, and the win rate under a reward model."""
    d = config.dpo
    prompts = [r["prompt"] for r in load_data(d.prompts, fmt="auto", allowed=("prompt", "preference",
                                                                              "prompt_completion")).rows]
    out, responses = compare_to_parent(model, tokenizer, prompts, stack.policy, stack.reference, d.scorer,
                                       d.max_new_tokens)
    if reward_dir is not None:
        out["win_rate"] = win_rate(model, tokenizer, reward_dir, prompts, responses)
    return out


def win_rate(model, tokenizer, reward_dir: str, prompts: list, responses: dict) -> float:
    """Share of prompts where the reward model prefers the policy's response (ties count half)."""
    from adapterkit.scorer import RewardScorer
    scorer = RewardScorer.attach(model, tokenizer, reward_dir, name="reward")
    policy, parent = scorer.score(prompts, responses["policy"]), scorer.score(prompts, responses["parent"])
    model.delete_adapter("reward")
    return sum((p > q) + 0.5 * (p == q) for p, q in zip(policy, parent)) / len(prompts)


# -- train and save --------------------------------------------------------------------------------------

def last_logged(history: list[dict]) -> dict:
    """The last training values trl logged for each of ``LOGGED``."""
    out = {}
    for entry in history:
        out |= {f"train_{k.replace('/', '_')}": entry[k] for k in LOGGED if k in entry}
    return out


def train(run: DPORun):
    return train_trainer(run.trainer, run.config)


def finish(run: DPORun, result) -> AdapterRecord:
    """Evaluate against the parent, then save ``default`` alone with the manifest and curves."""
    config, trainer, stack = run.config, run.trainer, run.stack
    model, tokenizer = trainer.model, trainer.processing_class
    history = trainer.state.log_history
    shutil.rmtree(run.scratch, ignore_errors=True)
    model.eval()
    metrics = {**trainer_metrics(result), **run.report,
               **last_logged(history)}
    if run.eval_pairs:
        metrics |= evaluate_pairs(model, tokenizer, run.eval_pairs, stack, config.dpo.beta)
    if config.dpo.prompts:
        metrics |= evaluate_prompts(model, tokenizer, config, stack, run.reward_dir)
    activate(model, stack.policy, [ADAPTER])

    def extra(tmp) -> None:
        plot_curves(tmp / "dpo.png", history_series(history, ["loss", *LOGGED, "eval_loss"]), "DPO (train)")

    manifest = {**run.manifest, "metrics": metrics,
                "dpo": {"mode": config.dpo.mode, "policy_stack": stack.policy,
                        "reference_stack": stack.reference, "adapter": ADAPTER}}
    return save_stage_artifact(
        config, manifest,
        lambda tmp: model.save_pretrained(tmp, selected_adapters=[ADAPTER], safe_serialization=True), extra)


def train_dpo(config: DPOConfig) -> AdapterRecord:
    """Train a DPO adapter on its parent stack as the config says; returns the saved record."""
    return run_stage(sys.modules[__name__], config)
