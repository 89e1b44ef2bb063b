"""What every stage shares: the ``Stage`` contract (setup -> train -> finish), the record it
returns, data loading, trainer arguments, the artifact.

    def train_sft(config):             # every stage's entry point
        return run_stage(sys.modules[__name__], config)
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from adapterkit.artifact import read_manifest, write_artifact
from adapterkit.base import default_device, fingerprint
from adapterkit.config import StageConfig, dump_config
from adapterkit.data import template_hash

log = logging.getLogger("adapterkit")


@dataclass
class AdapterRecord:
    """What a stage returns: where the adapter is, its manifest and its metrics."""
    path: Path
    manifest: dict
    metrics: dict = field(default_factory=dict)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "AdapterRecord":
        manifest = read_manifest(path)
        return cls(Path(path), manifest, manifest.get("metrics", {}))


class Stage(Protocol):
    """A stage module: ``setup`` builds everything (data, base, adapters, trainer) and trains
    nothing; ``train`` trains; ``finish`` evaluates and saves the artifact."""

    def setup(self, config: StageConfig) -> Any: ...

    def train(self, run: Any) -> Any: ...

    def finish(self, run: Any, result: Any) -> "AdapterRecord": ...


def run_stage(stage: Stage, config: StageConfig) -> "AdapterRecord":
    """Checks before any model loads (``preflight``), then setup -> train -> finish."""
    from adapterkit.distributed import main_first
    from adapterkit.preflight import preflight
    with main_first():  # under `accelerate launch`: the main process builds `tiny` (if asked) first
        preflight(config)  # output folder, adapters and data rows
    run = stage.setup(config)
    return stage.finish(run, stage.train(run))


def load_split(config: StageConfig, source: str, allowed: tuple[str, ...], tokenizer):
    """One data split, validated row by row, with the recipe's format and length policy."""
    from adapterkit.data import load_data
    d = config.data
    return load_data(source, fmt=d.format, allowed=allowed, tokenizer=tokenizer, max_length=d.max_length,
                     on_long=d.on_long, hub_split=d.hub_split)


def load_splits(config: StageConfig, allowed: tuple[str, ...], tokenizer):
    """(train, eval or None) as ``load_split`` reads them; the report counts the train rows."""
    train = load_split(config, config.data.train, allowed, tokenizer)
    evals = load_split(config, config.data.eval, allowed, tokenizer) if config.data.eval else None
    return train, evals


def trainer_kwargs(config: StageConfig, run_dir: str, has_eval: bool = False, per_epoch_eval: bool = False) -> dict:
    """The TrainingArguments fields every stage sets the same way. A bf16 or fp16 compute dtype
    on a GPU turns on the trainer's autocast (fp16 with its loss scaler) over fp32 adapter
    weights (``keep_adapters_fp32``); on CPU the stages compute in the base's own dtype.

    With ``train.save_steps`` the trainer writes its checkpoints (``checkpoints.py``) to
    ``config.checkpoint_dir`` instead of ``run_dir``; ``train.eval_steps`` evaluates on the
    held-out set every N steps (``has_eval``), else once per epoch when ``per_epoch_eval``."""
    from adapterkit.quant import resolve_dtype
    t = config.train
    cpu = not torch.cuda.is_available()
    dtype = resolve_dtype(config.base.compute_dtype, default_device())
    evals = ({"eval_strategy": "steps", "eval_steps": t.eval_steps} if has_eval and t.eval_steps
             else {"eval_strategy": "epoch" if has_eval and per_epoch_eval else "no"})
    return dict(
        output_dir=str(config.checkpoint_dir) if t.save_steps else run_dir,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps or None,
        save_total_limit=t.save_total_limit, report_to=config.trackers or "none", **evals,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate, num_train_epochs=t.num_epochs, max_steps=t.max_steps,
        warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps, seed=t.seed, data_seed=t.seed, disable_tqdm=not t.progress,
        use_cpu=cpu, bf16=dtype == torch.bfloat16 and not cpu, fp16=dtype == torch.float16 and not cpu,
        gradient_checkpointing=t.gradient_checkpointing, remove_unused_columns=False,
        dataloader_num_workers=0,
        # Under `accelerate launch` (DDP): every trainable weight (LoRA, a reward head) is used
        # in every forward, so DDP need not search the graph for unused ones; non-reentrant
        # checkpointing is the kind DDP supports with frozen 4-bit weights around LoRA.
        ddp_find_unused_parameters=False,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
    )


def trainer_metrics(result) -> dict:
    """A trainer's ``train_loss`` (the mean over the processes: transformers returns each
    process's own) and its step count."""
    from adapterkit.distributed import mean
    return {"train_loss": mean(result.training_loss), "steps": result.global_step}


def verbose() -> bool:
    """``adapterkit -v`` (or a program that set the ``adapterkit`` logger to INFO): every log."""
    return log.isEnabledFor(logging.INFO)


# What the progress bar shows of the trainer's logs (key -> label): the few numbers that matter.
BAR_KEYS = {"loss": "loss", "eval_loss": "eval_loss", "accuracy": "acc", "margin": "margin",
            "eval_accuracy": "eval_acc", "rewards/margins": "margin", "rewards/accuracies": "acc"}


def prepare_trainer(trainer, config: StageConfig) -> None:
    """What every trainer stage adds to its trl trainer:

    - output: one progress bar, with ``BAR_KEYS`` beside it, instead of transformers' raw log
      dicts (those only with ``adapterkit -v``) and, in a notebook, instead of its HTML table;
      ``train.progress=false``: nothing at all;
    - a stop on a NaN or infinite loss (``stop_on_nonfinite``);
    - tracking: the trackers' local files in ``config.logging_dir`` (not the scratch folder);
    - checkpoints as safetensors and JSON, no pickle (``checkpoints.py`` lists the files;
      ``_compat.safetensors_checkpoints`` replaces transformers' file hooks);
    - resume: the trained adapter (``default``) restored by name from a checkpoint, however many
      frozen adapters sit beside it (transformers would load it into the first active one)."""
    from transformers import PrinterCallback, ProgressCallback

    from adapterkit import _compat
    stop_on_nonfinite(trainer)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    for callback in list(trainer.callback_handler.callbacks):  # in Jupyter, transformers' HTML bar + log table
        if type(callback).__name__ == "NotebookProgressCallback":
            trainer.remove_callback(callback)
    if config.train.progress:
        trainer.add_callback(_progress_bar(config.stage))
    elif verbose():
        trainer.add_callback(PrinterCallback)
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "TensorBoardCallback" and callback.logging_dir is None:
            callback.logging_dir = str(config.logging_dir)
    _compat.safetensors_checkpoints(trainer, load_adapter=_load_adapter_checkpoint)


def _progress_bar(stage: str):
    from transformers import ProgressCallback

    class StageProgress(ProgressCallback):
        """transformers' bar, named for the stage, with the latest numbers as its postfix; the
        raw dicts only when verbose, and no second bar for evaluation."""
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.set_description(stage)

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            if verbose():
                super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if verbose():
                return super().on_log(args, state, control, logs=logs, **kwargs)
            if self.training_bar is not None and logs:
                shown = {label: f"{logs[k]:.4g}" for k, label in BAR_KEYS.items()
                         if isinstance(logs.get(k), (int, float))}
                if shown:
                    self.training_bar.set_postfix(shown, refresh=False)

    return StageProgress()


def _load_adapter_checkpoint(trainer, checkpoint: str, model=None) -> None:
    """The trained weights from a checkpoint, for our PEFT models: the checkpoint's root adapter is
    ``default`` (the one that trains), loaded into the existing weights, so their dtype (fp32,
    ``keep_adapters_fp32``) and the frozen parents stay as they are."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict
    model = model if model is not None else trainer.model
    weights = load_peft_weights(checkpoint, device="cpu")
    result = set_peft_model_state_dict(model, weights, adapter_name="default")
    if result.unexpected_keys:
        from adapterkit.errors import DataError
        raise DataError(f"{checkpoint}: its adapter does not fit this run's ({result.unexpected_keys[0]} ...)")


def resume_checkpoint(config: StageConfig) -> str | None:
    """``train.resume_from`` resolved to a checkpoint folder (``checkpoints.resolve_resume``)."""
    from adapterkit.checkpoints import resolve_resume
    path = resolve_resume(config.train.resume_from, config.checkpoint_dir)
    return None if path is None else str(path)


def train_trainer(trainer, config: StageConfig):
    """``trainer.train()``, from ``train.resume_from`` when set (model, optimizer, scheduler,
    RNG and data position are the checkpoint's: the run goes on as if never stopped)."""
    checkpoint = resume_checkpoint(config)
    if checkpoint is not None:
        log.info("%s: resuming from %s", config.stage, checkpoint)
    return trainer.train(resume_from_checkpoint=checkpoint)


def check_finite(values: dict, where: str, kept: str = "nothing was saved") -> None:
    """Stop a run whose loss (or any logged number) became NaN or infinite: training on from
    there only writes garbage weights over the last good ones."""
    import math
    bad = {k: v for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        from adapterkit.errors import TrainingDiverged
        detail = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise TrainingDiverged(f"{where}: {detail}; the run stopped and {kept}. Lower "
                               "train.learning_rate or check the data")


def stop_on_nonfinite(trainer) -> None:
    """A callback that raises ``TrainingDiverged`` when a logged loss is not finite."""
    from transformers import TrainerCallback

    class StopOnNonFinite(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            check_finite({k: float(v) for k, v in (logs or {}).items()
                          if "loss" in k and isinstance(v, (int, float))}, f"step {state.global_step}")

    trainer.add_callback(StopOnNonFinite())


def keep_adapters_fp32(model) -> None:
    """Trainable weights (LoRA, a reward head) are fp32 master weights, whatever the compute dtype.

    trl 1.16 casts them to bf16 on a quantized base (the QLoRA paper's setting). We undo that:
    AdamW's updates to a LoRA weight are often below bf16's resolution (8 bits of mantissa) and
    would be rounded away; fp16 training needs fp32 weights for its loss scaler anyway; and on
    CPU (fp32 compute) nothing may change. The cost is small: adapters are <1% of the base.
    On a GPU the forward runs in bf16/fp16 under the trainer's autocast (``trainer_kwargs``)
    and peft casts activations to the adapter's dtype and back, so the 4-bit base still
    computes in ``base.compute_dtype``.

    Under FSDP (``accelerate launch`` with ``fsdp_qlora.yaml``) they stay in the base's dtype,
    as in the FSDP-QLoRA recipe: FSDP flattens each wrapped layer into one tensor of one dtype."""
    from adapterkit.distributed import engine
    if engine() == "fsdp":
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)


def load_stage_tokenizer(config: StageConfig):
    """The base's tokenizer, with ``data.chat_template`` when given, checked against the chat
    contract: loaded before the model, so template and data errors cost no model load."""
    from adapterkit.base import load_tokenizer
    from adapterkit.data import check_chat_contract, use_chat_template
    tokenizer = load_tokenizer(config.base)
    use_chat_template(tokenizer, config.data.chat_template)
    check_chat_contract(tokenizer, config.base.name)
    return tokenizer


def base_manifest(config: StageConfig, model, tokenizer, parent: list[dict] | None = None) -> dict:
    """The manifest's common part; ``base.compute_dtype`` is the dtype this run resolved (the
    recipe beside it keeps what was asked, e.g. ``auto``); ``inputs`` is what the adapter
    depends on, hashed (``inputs.stage_inputs``)."""
    from adapterkit.inputs import stage_inputs
    from adapterkit.quant import DTYPE_NAMES, resolve_dtype
    from adapterkit.tokens import model_device
    dtype = DTYPE_NAMES[resolve_dtype(config.base.compute_dtype, model_device(model))]
    base_fp = fingerprint(model, tokenizer)
    return {
        "name": config.output.name or config.stage, "version": None, "stage": config.stage,
        "domain": config.output.domain, "tags": list(config.output.tags),
        "base": {"source": config.base.name, "fingerprint": base_fp,
                 "quantization": config.base.quantization, "compute_dtype": dtype},
        "chat_template_sha256": template_hash(tokenizer),
        "parent": parent or [],
        "recipe": config.model_dump(mode="json"),
        "inputs": stage_inputs(config, base_fp, tokenizer),  # what ``adapterkit pipeline`` reuses by
    }


def save_stage_artifact(config: StageConfig, manifest: dict,
                        write_weights: Callable[[Path], None], extra: Callable[[Path], None] | None = None
                        ) -> AdapterRecord:
    """PEFT files + resolved config + curves + manifest + card, atomically. Under
    ``accelerate launch`` only the main process writes and publishes; the others wait for it
    and return the record it wrote."""
    from adapterkit.distributed import barrier, is_main
    if not is_main():
        barrier()
        return AdapterRecord.from_dir(config.output.dir)

    def write(tmp: Path) -> None:
        write_weights(tmp)
        (tmp / "config.yaml").write_text(dump_config(config))
        if extra is not None:
            extra(tmp)

    from adapterkit.preflight import check_output
    check_finite({k: v for k, v in manifest.get("metrics", {}).items() if "loss" in k}, f"{config.stage} run")
    check_output(config)  # again: something may have appeared there while the run trained
    path = write_artifact(config.output.dir, write, manifest)
    record = AdapterRecord.from_dir(path)
    if config.output.publish:
        from adapterkit.registry import Registry
        entry = Registry.open(config.output.registry).publish(path, name=config.output.publish,
                                                              domain=config.output.domain)
        record.manifest["published"] = entry
    barrier()
    return record


def run_dir() -> str:
    """Scratch space for the trainer (without ``train.save_steps``; logs only). Stages remove it when
    they finish; a run that stops early leaves it to be removed when the process exits, and
    one killed with -9 leaves it to the next run's sweep (its lock is free then)."""
    from adapterkit.safety import owned_scratch
    return str(owned_scratch(Path(tempfile.gettempdir()), "adapterkit-run-"))
