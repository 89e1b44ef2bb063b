"""Reward model: a LoRA adapter plus a scalar head, Bradley-Terry loss, over trl's ``RewardTrainer``.

    adapterkit reward tiny_reward train.learning_rate=1e-3

setup (the 4-bit base as a 1-label sequence classifier, preference pairs, LoRA) -> train ->
held-out pairwise accuracy and margin -> save the artifact.

The artifact is a normal PEFT ``SEQ_CLS`` adapter: the head (``score``, a (1, H) weight) is
saved in ``adapter_model.safetensors`` beside the LoRA weights (peft's ``modules_to_save``),
so it never comes back randomly initialised. It serves two ways:

- vanilla ``AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)`` +
  ``PeftModel.from_pretrained(model, dir)``;
- ``scorer.RewardScorer``: the LoRA as a named adapter on a causal-LM base shared with the policy
  (what PPO needs), the head applied to the last hidden state of the last non-pad token.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from adapterkit import _compat
from adapterkit.adapters import lora_config
from adapterkit.base import load_model
from adapterkit.config import RewardConfig
from adapterkit.plots import history_series, plot_curves
from adapterkit.scorer import HEAD, batch_scores, pair_metrics
from adapterkit.stages.common import (AdapterRecord, base_manifest, keep_adapters_fp32, load_splits,
                                      load_stage_tokenizer, prepare_trainer, run_dir, run_stage,
                                      save_stage_artifact, trainer_kwargs, trainer_metrics, train_trainer)
from adapterkit.tokens import conversation_ids, model_device

SCORES_FILE = "eval_scores.json"


# -- training ------------------------------------------------------------------------------------

def keep_end(ids: list[int], max_length: int) -> list[int]:
    """A sequence cut to its last ``max_length`` tokens. The head reads the last token, and a
    pair's two sides differ at the end (same prompt, different responses): cutting the end
    off instead leaves the head reading a mid-prompt token, and a pair whose prompt fills
    ``max_length`` becomes two identical sequences (no signal; a tie, scored as wrong)."""
    return list(ids)[-max_length:]


def setup_data(config: RewardConfig, tokenizer):
    """Pairs tokenized here (so scoring uses the very same ids); a pair longer than
    ``data.max_length`` (``data.on_long=truncate``) loses the start of its prompt (``keep_end``)."""
    from datasets import Dataset
    d = config.data
    train, evals = load_splits(config, ("preference",), tokenizer)

    def tokenized(rows):
        return [{key: keep_end(conversation_ids(tokenizer, r.get("prompt"), r[key.removesuffix("_ids")]), d.max_length)
                 for key in ("chosen_ids", "rejected_ids")} for r in rows]
    report = {"train_rows": len(train.rows), **train.report}
    return Dataset.from_list(tokenized(train.rows)), (tokenized(evals.rows) if evals else None), report


def build_model(config: RewardConfig):
    """The base as a 1-label classifier with a LoRA adapter; the head trains in full."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed
    set_seed(config.train.seed)  # the head starts random: make it the same random every run
    with _compat.suppress_seqcls_warning():
        model = load_model(config.base, num_labels=1)
    if config.base.quantization != "none":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.train.gradient_checkpointing)
    return get_peft_model(model, lora_config(config, task_type="SEQ_CLS"))  # head: modules_to_save


@dataclass
class RewardRun:
    """Everything ``setup`` builds; ``finish`` evaluates it and saves the artifact."""
    config: RewardConfig
    trainer: object  # trl.RewardTrainer over the PeftModel
    eval_pairs: list[dict] | None
    manifest: dict
    report: dict
    scratch: str


def setup(config: RewardConfig) -> RewardRun:
    """Tokenizer, tokenized pairs, the base as a classifier with its LoRA, and the trainer."""
    from datasets import Dataset
    from trl import RewardConfig as TrlRewardConfig, RewardTrainer
    tokenizer = load_stage_tokenizer(config)
    train_ds, eval_pairs, report = setup_data(config, tokenizer)
    model = build_model(config)
    manifest = base_manifest(config, model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id  # where the classifier reads its score
    scratch = run_dir()
    during = eval_pairs if eval_pairs and config.train.eval_steps else None  # else evaluated at the end
    args = TrlRewardConfig(**trainer_kwargs(config, scratch, has_eval=during is not None), max_length=None,
                           center_rewards_coefficient=config.reward.center_rewards_coefficient)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                            eval_dataset=Dataset.from_list(during) if during else None)
    prepare_trainer(trainer, config)
    keep_adapters_fp32(trainer.model)  # trl made them bf16
    return RewardRun(config, trainer, eval_pairs, manifest, report, scratch)


def train(run: RewardRun):
    return train_trainer(run.trainer, run.config)


def finish(run: RewardRun, result) -> AdapterRecord:
    """Held-out accuracy and margin, the curves, and the artifact (LoRA + head)."""
    config, trainer = run.config, run.trainer
    tokenizer = trainer.processing_class
    history = trainer.state.log_history
    shutil.rmtree(run.scratch, ignore_errors=True)
    metrics = {**trainer_metrics(result), **run.report}
    scores = {}
    if run.eval_pairs:
        scores = evaluate_pairs(trainer.model, tokenizer, run.eval_pairs, config.reward.eval_batch_size)
        metrics |= {"eval_accuracy": scores["accuracy"], "eval_margin": scores["margin"]}

    def extra(tmp: Path) -> None:
        if scores:
            (tmp / SCORES_FILE).write_text(json.dumps(scores))
        plot_curves(tmp / "reward.png", history_series(history, ["loss", "accuracy", "margin", "eval_loss",
                                                                 "eval_accuracy"]),
                    "reward model (train)")

    return save_stage_artifact(
        config, {**run.manifest, "metrics": metrics, "reward": {"head": HEAD, "pad_token": tokenizer.pad_token}},
        lambda tmp: trainer.model.save_pretrained(tmp, safe_serialization=True), extra)


def train_reward(config: RewardConfig) -> AdapterRecord:
    """Train a reward adapter as the config says; returns the saved adapter's record."""
    return run_stage(sys.modules[__name__], config)


def evaluate_pairs(model, tokenizer, pairs: list[dict], batch_size: int) -> dict:
    """Held-out rewards of the trained classifier: chosen, rejected, accuracy, margin."""
    was_training = model.training
    model.eval()
    score_ids = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits[:, 0]  # noqa: E731
    device = model_device(model)
    chosen, rejected = (batch_scores(score_ids, [p[k] for p in pairs], tokenizer.pad_token_id, batch_size, device)
                        for k in ("chosen_ids", "rejected_ids"))
    model.train(was_training)
    return {"chosen": chosen, "rejected": rejected, **pair_metrics(chosen, rejected)}
