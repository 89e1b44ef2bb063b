"""adapterkit DPO (reference = the policy with its adapter switched off) vs trl's DPOTrainer
with an explicit second reference model: peak memory and seconds per step, in one run.

    python benchmarks/dpo_vs_trl.py [--hidden 1024 --layers 12 --steps 8 --batch 4]

Both sides get the same base (a Llama built from config, random weights, the tiny task's
tokenizer; saved already in NF4, or in bf16 with ``--checkpoint bf16``), loaded in 4-bit NF4
with fp32 compute, the same preference pairs (the tiny task's), LoRA r=8 on every linear
layer, the same batch, length, beta and loss. adapterkit trains a new
adapter on the bare base (``dpo.parent=[]``), its reference being the same model with the
adapter off; trl gets a second 4-bit copy of the base as ``ref_model``, as a user does who
wants the reference kept apart. Each side runs in its own process, so each peak is its own:
peak RSS and peak RSS above the process's baseline after imports on CPU, peak allocated on
CUDA; seconds per step is the median over the steps after the first. Prints a JSON report
with the ratios adapterkit / trl.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LORA, clock, compare, device, load_nf4, memory_report, rss_mb, scratch, step_times  # noqa: E402

BETA, LR, MAX_LENGTH = 0.1, 1e-4, 64


def import_stack() -> float:
    """Import everything either side uses, then return the RSS baseline (MiB)."""
    import datasets, peft, torch, transformers, trl  # noqa: F401
    import adapterkit.stages.dpo  # noqa: F401
    return rss_mb()


def timed_train(trainer) -> dict:
    stamps = [time.perf_counter()]
    trainer.add_callback(clock(stamps))
    trainer.train()
    return step_times(stamps)


def run_adapterkit(base: str, steps: int, batch: int) -> dict:
    baseline = import_stack()
    from adapterkit.config import load_config
    from adapterkit.stages.dpo import setup as setup_dpo
    config = load_config("dpo", "tiny_dpo", [
        f"base.name={base}", "base.compute_dtype=float32",  # fp32 compute, as the peer's load_nf4
        "dpo.parent=[]", "dpo.sft_weight=0", f"dpo.beta={BETA}", "dpo.prompts=null",
        "dpo.scorer=null", "data.eval=null", f"data.max_length={MAX_LENGTH}", f"train.max_steps={steps}",
        f"train.batch_size={batch}", f"train.learning_rate={LR}", f"lora.r={LORA['r']}",
        f"lora.lora_alpha={LORA['lora_alpha']}", "train.progress=false", f"output.dir={scratch()}"])
    run = setup_dpo(config)
    return {**timed_train(run.trainer), **memory_report(baseline)}


def run_trl(base: str, steps: int, batch: int) -> dict:
    baseline = import_stack()
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from adapterkit.tiny import ensure_tiny
    rows = [json.loads(line) for line in open(ensure_tiny() / "data" / "preferences.jsonl")]
    policy, reference = load_nf4(base), load_nf4(base)
    args = DPOConfig(output_dir=scratch(), max_steps=steps, per_device_train_batch_size=batch,
                     learning_rate=LR, beta=BETA, loss_type=["sigmoid"], max_length=MAX_LENGTH,
                     logging_steps=steps, report_to="none", save_strategy="no", disable_tqdm=True,
                     use_cpu=device() == "cpu", gradient_checkpointing=False, bf16=False)  # fp32 compute, as ours
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(base),
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    return {**timed_train(trainer), **memory_report(baseline)}


SIDES = {"adapterkit": run_adapterkit, "trl": run_trl}


def main() -> None:
    compare(__file__, __doc__, SIDES,
            ("seconds_per_step", "peak_rss_mb", "peak_rss_above_baseline_mb", "peak_allocated_mb"),
            hidden=1024, layers=12, steps=8, batch=4)


if __name__ == "__main__":
    main()
