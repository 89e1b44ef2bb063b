"""Supervised fine-tuning: a QLoRA adapter over trl's ``SFTTrainer``.

    adapterkit sft tiny_sft lora.r=16 train.learning_rate=1e-4

setup (base, data, LoRA) -> train -> save the artifact (PEFT files, manifest, card, curve).
"""
from __future__ import annotations

import logging
import shutil
import sys
from dataclasses import dataclass

from adapterkit.adapters import lora_config
from adapterkit.base import load_model
from adapterkit.config import SFTConfig
from adapterkit.data import has_generation_markers, split_last_turn
from adapterkit.plots import history_series, plot_curves
from adapterkit.stages.common import (AdapterRecord, base_manifest, keep_adapters_fp32, load_splits,
                                      load_stage_tokenizer, prepare_trainer, run_dir, run_stage,
                                      save_stage_artifact, trainer_kwargs, trainer_metrics, train_trainer)

log = logging.getLogger("adapterkit")
SFT_FORMATS = ("messages", "prompt_completion", "text")


def setup_data(config: SFTConfig, tokenizer):
    """Validated train/eval datasets in a format SFTTrainer takes, and the load report."""
    from datasets import Dataset
    train, evals = load_splits(config, SFT_FORMATS, tokenizer)
    assistant_only = train.format == "messages" and has_generation_markers(tokenizer)
    if train.format == "messages" and not assistant_only:
        log.warning("the chat template has no %s markers: training on the last assistant turn of "
                    "each conversation only", "{% generation %}")
    def to_ds(loaded):
        rows = loaded.rows
        if loaded.format == "messages" and not assistant_only:
            rows = split_last_turn(rows)
        return Dataset.from_list(rows)
    report = {"train_rows": len(train.rows), "format": train.format, **train.report}
    return to_ds(train), (to_ds(evals) if evals else None), assistant_only, report


@dataclass
class SFTRun:
    """Everything ``setup`` builds; ``finish`` turns it into an artifact."""
    config: SFTConfig
    trainer: object  # trl.SFTTrainer over the PeftModel
    manifest: dict
    report: dict
    scratch: str


def setup(config: SFTConfig) -> SFTRun:
    """Base (quantized), tokenizer, validated data, LoRA and trainer; nothing trained yet."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed
    from trl import SFTConfig as TrlSFTConfig, SFTTrainer

    tokenizer = load_stage_tokenizer(config)  # template and data errors before the model loads
    train_ds, eval_ds, assistant_only, report = setup_data(config, tokenizer)
    model = load_model(config.base)
    manifest = base_manifest(config, model, tokenizer)
    if config.base.quantization != "none":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.train.gradient_checkpointing)
    set_seed(config.train.seed)  # LoRA's A starts random: the same random every run
    model = get_peft_model(model, lora_config(config))
    scratch = run_dir()
    args = TrlSFTConfig(
        **trainer_kwargs(config, scratch, has_eval=eval_ds is not None, per_epoch_eval=True),
        max_length=config.data.max_length,
        packing=config.train.packing, padding_free=config.train.padding_free,
        assistant_only_loss=assistant_only, completion_only_loss=None,
        pad_token=tokenizer.pad_token, eos_token=tokenizer.eos_token)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer)
    prepare_trainer(trainer, config)
    keep_adapters_fp32(trainer.model)
    return SFTRun(config, trainer, manifest, report, scratch)


def train(run: SFTRun):
    return train_trainer(run.trainer, run.config)


def finish(run: SFTRun, result) -> AdapterRecord:
    """Metrics, loss curve and the adapter artifact."""
    trainer = run.trainer
    metrics = {**trainer_metrics(result), **run.report}
    if trainer.eval_dataset is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    history = trainer.state.log_history
    shutil.rmtree(run.scratch, ignore_errors=True)

    def extra(tmp):
        plot_curves(tmp / "loss.png", history_series(history, ["loss", "eval_loss"]), "SFT loss")

    return save_stage_artifact(
        run.config, {**run.manifest, "metrics": metrics},
        lambda tmp: trainer.model.save_pretrained(tmp, safe_serialization=True), extra)


def train_sft(config: SFTConfig) -> AdapterRecord:
    """Train an SFT adapter as the config says; returns the saved adapter's record."""
    return run_stage(sys.modules[__name__], config)
