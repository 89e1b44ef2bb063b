"""What each GPU holds, per stage, for 8B- and 70B-shaped Llama bases on one GPU, DDP and FSDP:
the planner's memory model (``adapterkit/memory.py``), nothing loaded, nothing downloaded.

    python benchmarks/scaling_table.py > docs/scaling_table.md

The shapes are Llama-3.1's published config.json values (``common.LLAMA_SHAPES``); the stage recipes are the tiny ones
with a real batch and length (below). Not a measurement: see ``plan_check.py`` for how close
the model is to measured peaks.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLAMA_SHAPES  # noqa: E402

ROWS = ["data.max_length=1024", "train.batch_size=4", "train.gradient_checkpointing=true"]
PPO = ["data.max_length=512", "ppo.max_new_tokens=256", "ppo.rollout_batch_size=32", "train.batch_size=4",
       "train.gradient_checkpointing=true"]
GIB = 2 ** 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs for the DDP and FSDP columns")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from adapterkit.memory import per_gpu_table, plan
    plans = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size, shape in LLAMA_SHAPES.items():
            folder = Path(tmp) / size
            LlamaConfig(**shape).save_pretrained(folder)
            for stage in ("sft", "reward", "dpo", "ppo"):
                plans[f"{size} {stage}"] = plan(f"tiny_{stage}", [f"base.name={folder}",
                                                                   *(PPO if stage == "ppo" else ROWS)])
    rows = per_gpu_table(plans, args.gpus)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    print("| base, stage | " + " | ".join(f"{s} (GiB per GPU)" for s in setups) + " |")
    print("|---|" + "---|" * len(setups))
    for name in plans:
        cells = ["refused (PPO: 1 GPU or DDP)" if r["stage"] == "ppo" and r["setup"].startswith("FSDP")
                 else f"{r['total'] / GIB:.1f}" for r in rows if r["plan"] == name]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
