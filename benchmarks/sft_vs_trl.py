"""adapterkit SFT vs plain trl SFTTrainer: tokens per second and peak memory, one run.

    python benchmarks/sft_vs_trl.py [--hidden 512 --layers 8 --steps 30]

Both sides get the same base (a Llama built from config with the tiny tokenizer, loaded in
4-bit NF4), the same data (the tiny task's SFT split), the same LoRA settings and batch. Each
side runs in its own subprocess so peak memory is its own: peak RSS on CPU (and peak RSS above
the process's baseline after imports), peak allocated on CUDA. Prints a JSON report with the
ratios adapterkit / trl.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LORA, compare, device, load_nf4, memory_report, rss_mb, scratch  # noqa: E402



def import_stack() -> float:
    """Import everything either side uses, then return the RSS baseline (MiB)."""
    import datasets, peft, torch, transformers, trl  # noqa: F401
    import adapterkit.stages.sft  # noqa: F401
    return rss_mb()


def result(trainer, seconds: float, baseline: float) -> dict:
    tokens = max(h.get("num_tokens", 0) for h in trainer.state.log_history)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, **memory_report(baseline)}


def run_adapterkit(base: str, steps: int, batch: int) -> dict:
    baseline = import_stack()
    from adapterkit.config import load_config
    from adapterkit.stages.sft import setup as setup_sft
    config = load_config("sft", "tiny_sft", [
        f"base.name={base}", "base.compute_dtype=float32",  # fp32 compute, as the peer's
        "data.eval=null", f"train.max_steps={steps}",
        f"train.batch_size={batch}",
        f"lora.r={LORA['r']}", f"lora.lora_alpha={LORA['lora_alpha']}", "train.progress=false",
        "train.gradient_checkpointing=false", f"output.dir={scratch()}"])
    run = setup_sft(config)
    start = time.perf_counter()
    run.trainer.train()
    return result(run.trainer, time.perf_counter() - start, baseline)


def run_trl(base: str, steps: int, batch: int) -> dict:
    baseline = import_stack()
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from adapterkit.tiny import ensure_tiny
    rows = [json.loads(line) for line in open(ensure_tiny() / "data" / "sft.jsonl")]
    model = load_nf4(base)
    args = SFTConfig(output_dir=scratch(), max_steps=steps, per_device_train_batch_size=batch,
                     learning_rate=3e-3, logging_steps=10, report_to="none", save_strategy="no",
                     max_length=64, assistant_only_loss=True, disable_tqdm=True,
                     use_cpu=device() == "cpu", gradient_checkpointing=False, bf16=False)  # fp32 compute, as ours
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(base),
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    start = time.perf_counter()
    trainer.train()
    return result(trainer, time.perf_counter() - start, baseline)


SIDES = {"adapterkit": run_adapterkit, "trl": run_trl}


def main() -> None:
    compare(__file__, __doc__, SIDES,
            ("tokens_per_s", "peak_rss_mb", "peak_rss_above_baseline_mb", "peak_allocated_mb"),
            hidden=512, layers=8, steps=30, batch=16)


if __name__ == "__main__":
    main()
