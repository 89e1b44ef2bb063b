"""`adapterkit plan` against measured peaks: for each stage, the peak of allocated tensor bytes
during two real training steps (``adapterkit.memcheck``) and the plan for the same shapes.

    python benchmarks/plan_check.py [--out benchmarks/results/plan_check_cpu.json]   # CPU
    python benchmarks/plan_check.py --out benchmarks/results/plan_check_<card>.json  # CUDA (not run yet)

CPU (no CUDA): the benchmark model (a 311M Llama from config, NF4 checkpoint, hidden 1024,
28 layers; ``common.build_base``), fp32 compute, measured from torch's profiler allocation
events. With CUDA: the same model and an 8B-shaped Llama (Llama-3-8B's dimensions and
vocabulary, random weights, built here: ~16 GB of disk and RAM while it is made), bf16
compute, measured by ``torch.cuda.max_memory_allocated``; ``--models 311m`` skips the 8B.
Each stage runs in its own process. Data: the tiny task's words in rows of 5 to 60 words
(padded batches; ``memcheck.padded_task_data``). DPO and PPO stack on an SFT adapter and PPO
uses a reward adapter, each trained for one step on the same base first.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import LLAMA_SHAPES, build_base, run_side, scratch  # noqa: E402

# per stage: the recipe overrides of the measured run (small batches: two real steps on a CPU)
RUNS = {
    "cpu": {"sft": ["train.batch_size=4", "data.max_length=96"],
            "sft+ckpt": ["train.batch_size=4", "data.max_length=96", "train.gradient_checkpointing=true"],
            "reward": ["train.batch_size=2", "data.max_length=96"],
            "dpo": ["train.batch_size=2", "data.max_length=96"],
            "ppo": ["ppo.rollout_batch_size=8", "train.batch_size=4", "train.grad_accum=1", "ppo.ppo_epochs=1",
                    "ppo.max_new_tokens=16", "ppo.temperature=1.5"]},
    "cuda": {"sft": ["train.batch_size=8", "data.max_length=512"],
             "sft+ckpt": ["train.batch_size=8", "data.max_length=512", "train.gradient_checkpointing=true"],
             "reward": ["train.batch_size=4", "data.max_length=512"],
             "dpo": ["train.batch_size=4", "data.max_length=512", "train.gradient_checkpointing=true"],
             "ppo": ["ppo.rollout_batch_size=32", "train.batch_size=8", "train.grad_accum=1", "ppo.ppo_epochs=1",
                     "ppo.max_new_tokens=64", "ppo.temperature=1.5", "train.gradient_checkpointing=true"]},
}


def build_shaped(out: Path, dims: dict) -> dict:
    """A randomly initialised Llama with ``dims`` and the tiny task's tokenizer, saved in bf16."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from adapterkit.tiny import ensure_tiny
    tok = AutoTokenizer.from_pretrained(ensure_tiny() / "base")
    torch.manual_seed(0)
    config = LlamaConfig(**dims, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id)
    torch.set_default_dtype(torch.bfloat16)  # made in bf16: no fp32 copy of 8B weights in RAM
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"parameters": model.num_parameters(), "checkpoint": "bf16", **dims}


def stage_overrides(stage: str, base: Path, data: dict, parents: dict) -> list[str]:
    name = stage.split("+")[0]
    own = {"sft": [f"data.train={data['sft']}", "data.on_long=truncate"],
           "reward": [f"data.train={data['pairs']}", "data.on_long=truncate"],
           "dpo": [f"data.train={data['pairs']}", "data.on_long=truncate", "dpo.prompts=null",
                   f"dpo.parent=[{parents.get('sft')}]"],
           "ppo": [f"ppo.parent=[{parents.get('sft')}]", f"ppo.reward={parents.get('reward')}"]}[name]
    return [f"base.name={base}", "base.compute_dtype=auto", *own]


def side(stage: str, overrides: list[str]) -> dict:
    """One stage, measured and planned (run in its own process)."""
    from adapterkit.config import load_config
    from adapterkit.memcheck import measure_stage
    from adapterkit.memory import plan
    name = stage.split("+")[0]
    config = load_config(name, f"tiny_{name}", [*overrides, f"output.dir={tempfile.mkdtemp()}/out"])
    m = measure_stage(config, steps=2)
    shape = dict(m.shape)
    if name == "ppo":
        config = config.model_copy(update={"ppo": config.ppo.model_copy(update={"max_new_tokens": shape["response_len"]})})
        shape = {"seq_len": shape["prompt_len"]}
    p = plan(config, device=m.device, **shape)
    return {"measured_bytes": m.peak_bytes, "planned_bytes": p.peak_bytes, "static_bytes": m.static_bytes,
            "error": (p.peak_bytes - m.peak_bytes) / m.peak_bytes, "shape": m.shape, "peak_phase": p.peak_phase,
            "terms": p.terms, "overrides": overrides}


def train_parents(base: Path, data: dict) -> dict:
    """An SFT and a reward adapter on ``base``, one step each (DPO's and PPO's parents)."""
    from adapterkit.config import load_config
    from adapterkit.stages import train_stage
    out = {}
    for stage, rows in (("sft", data["sft"]), ("reward", data["pairs"])):
        folder = Path(scratch()) / stage
        config = load_config(stage, f"tiny_{stage}", [f"base.name={base}", f"data.train={rows}", "data.eval=null",
                                                      "data.on_long=truncate", "data.max_length=32",
                                                      "train.batch_size=2", "train.max_steps=1",
                                                      "train.progress=false", f"output.dir={folder}"])
        out[stage] = str(train_stage(stage, config).path)
    return out


def machine() -> dict:
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "cpu": cpu,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the report to this JSON file")
    parser.add_argument("--models", default="311m,8b", help="with CUDA: 311m and/or 8b (CPU: 311m only)")
    parser.add_argument("--stages", default=",".join(RUNS["cpu"]))
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(side(args.side, json.loads(args.overrides))))
        return
    import torch
    from adapterkit.memcheck import padded_task_data
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = [m for m in args.models.split(",") if device == "cuda" or m == "311m"]
    # rows of 5 to 60 words (CPU) or 5 to 600 (CUDA: its runs fill max_length=512), padded in batches
    data = padded_task_data(Path(scratch()) / "data", longest=60 if device == "cpu" else 600)
    report = {"machine": machine(), "measured": "peak allocated tensor bytes over two training steps "
              "(CPU: profiler allocation events + tensors alive at the start; CUDA: max_memory_allocated)",
              "models": {}}
    for model in models:
        base = Path(scratch()) / "base"
        size = (build_base(base, 1024, 28, "nf4") if model == "311m" else build_shaped(base, LLAMA_SHAPES["8B"]))
        parents = train_parents(base, data) if {"dpo", "ppo"} & set(args.stages.split(",")) else {}
        entry = report["models"][model] = {"model": size, "stages": {}}
        for stage in args.stages.split(","):
            overrides = [*stage_overrides(stage, base, data, parents), *RUNS[device][stage]]
            result = run_side(__file__, sys.executable, ["--side", stage, "--overrides", json.dumps(overrides)])
            entry["stages"][stage] = result
            print(f"{model} {stage}: measured {result['measured_bytes'] / 2**20:.1f} MiB, planned "
                  f"{result['planned_bytes'] / 2**20:.1f} MiB ({result['error']:+.1%})", file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
