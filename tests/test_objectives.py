"""The objectives in losses.py are the ones the stages train with.

DPO trains through trl's DPOTrainer and the reward model through trl's RewardTrainer (their
loss code is trl's; we keep it, see losses.py). These tests pin trl's loss, on a real batch of
a partly trained run, to ``losses.dpo_loss`` and ``losses.bradley_terry_loss``, so the unit
tests of those functions (test_losses.py) speak for the objective that really runs, and a trl
upgrade that changes it fails here.
"""
from __future__ import annotations

import json
import shutil

import torch

from conftest import load_jsonl
from helpers import tol


def trl_loss(trainer, n: int = 8) -> float:
    """trl's own loss on the first ``n`` training rows, in eval mode (no dropout)."""
    from adapterkit.tokens import to_device
    batch = to_device(trainer.data_collator([trainer.train_dataset[i] for i in range(n)]), trainer.model)
    trainer.model.eval()
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


def test_trl_dpo_loss_is_losses_dpo_loss(sft_adapter, tiny_dir, tmp_path):
    from adapterkit import losses
    from adapterkit.config import load_config
    from adapterkit.stages.dpo import pair_logps, setup
    config = load_config("dpo", "tiny_dpo", [
        f"output.dir={tmp_path / 'out'}", "train.progress=false", f"dpo.parent={json.dumps([str(sft_adapter.path)])}",
        "data.train=tiny:preferences_eval", "data.eval=null", "dpo.prompts=null", "dpo.sft_weight=0",
        "train.max_steps=2"])
    run = setup(config)
    run.trainer.train()  # the policy has moved off its parent: the loss is not log 2
    expected = trl_loss(run.trainer)
    rows = load_jsonl(tiny_dir / "data" / "preferences_eval.jsonl")[:8]  # the rows of that batch
    model, tok = run.trainer.model, run.trainer.processing_class
    pc, pr = pair_logps(model, tok, rows, run.stack.policy)      # (8,), (8,)
    rc, rr = pair_logps(model, tok, rows, run.stack.reference)
    ours, _, _ = losses.dpo_loss(pc, pr, rc, rr, beta=config.dpo.beta, loss_type=config.dpo.loss_type)
    assert abs(expected - 0.6931) > 1e-3
    assert abs(ours.mean().item() - expected) <= tol(cpu=1e-4, cuda=5e-2)
    shutil.rmtree(run.trainer.args.output_dir, ignore_errors=True)


def test_reward_trainer_loss_is_bradley_terry(tmp_path):
    from adapterkit import losses
    from adapterkit.config import load_config
    from adapterkit.scorer import batch_scores
    from adapterkit.stages.reward import setup
    from adapterkit.tokens import model_device
    run = setup(load_config("reward", "tiny_reward", [f"output.dir={tmp_path / 'out'}", "train.progress=false",
                                                      "train.max_steps=2"]))
    run.trainer.train()
    expected = trl_loss(run.trainer)
    model, pad = run.trainer.model, run.trainer.processing_class.pad_token_id
    rows = [run.trainer.train_dataset[i] for i in range(8)]
    score_ids = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits[:, 0]  # noqa: E731
    chosen, rejected = (torch.tensor(batch_scores(score_ids, [r[k] for r in rows], pad, 8, model_device(model)))
                        for k in ("chosen_ids", "rejected_ids"))
    assert (chosen - rejected).abs().max() > 1e-3  # a trained head: the loss is not log 2
    assert abs(losses.bradley_terry_loss(chosen, rejected).item() - expected) <= tol(cpu=1e-5, cuda=5e-2)
    shutil.rmtree(run.scratch, ignore_errors=True)
