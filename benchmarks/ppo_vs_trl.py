"""adapterkit PPO (policy, reference, reward and value on ONE 4-bit base) vs trl 1.12.0's
``trl.experimental.ppo.PPOTrainer`` (the last trl with PPO): peak memory and seconds per PPO
step, same model and settings, in one run.

    python3 -m venv .venv-trl112 && .venv-trl112/bin/pip install torch==2.13.0 && \\
        .venv-trl112/bin/pip install trl==1.12.0 transformers==5.24.0 peft==0.21.2 \\
        bitsandbytes==0.50.2 accelerate==1.15.0 datasets==5.2.0
    python benchmarks/ppo_vs_trl.py [--hidden 1024 --layers 28 --steps 6 --repeats 2] [--peer-python .venv-trl112/bin/python]

The base is a Llama built from config (random weights, the tiny task's tokenizer; the default
has about 310M parameters), saved already quantized to NF4 (``--checkpoint bf16`` saves it in
bf16 instead, and each load then holds the whole bf16 file while it quantizes, which on CPU
outweighs the 4-bit models themselves). Every model on either side is that base in 4-bit NF4
with fp32 compute. One prepared reward adapter (LoRA r=8 on every linear layer + a scalar
head) serves both sides.

- adapterkit (this environment): one base in memory with the policy LoRA, the reward LoRA and
  head, and a value LoRA and head initialised from the reward's; the reference is the policy
  with its adapter off.
- trl 1.12.0 (its own environment, ``--peer-python``): the policy is the base + a LoRA
  (reference: adapter off, as trl does with PEFT); the reward model and the value model are
  separate 4-bit sequence classifiers, as its trainer requires, each with the reward adapter
  (the value model's trainable).

Same prompts (the tiny task's), rollout batch, minibatch (micro-batch x accumulation), PPO
epochs, sampling (temperature 1, no top-k/top-p), response length, KL coefficient, learning
rate and clip ranges. Each side runs in its own process: on CPU it reports the peak RSS and the
peak RSS above its baseline after imports; on CUDA the peak allocated. Seconds per step is the
median wall time of a PPO step (rollout, scoring, update) over ``--steps`` steps, the first
left out as warm-up. Prints a
JSON report with the ratios adapterkit / trl (of the medians, with ``--repeats``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (LORA, build_base, clock, device, finish, load_nf4, machine, median_run, memory_report,  # noqa: E402
                    rss_mb, run_side, scratch, step_times)

SETTINGS = dict(rollout=8, micro_batch=4, grad_accum=2, ppo_epochs=1, response_length=16,
                temperature=1.0, kl_coef=0.05, learning_rate=1e-5, clip_range=0.2, clip_range_value=0.2,
                vf_coef=0.1, gamma=1.0, lam=0.95)


# -- the sides -------------------------------------------------------------------------------

def prepare(base: str, out: str) -> dict:
    """A reward adapter with random LoRA B and head (a trained one costs the same), saved as PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(load_nf4(base, num_labels=1), LoraConfig(task_type="SEQ_CLS", init_lora_weights=False, **LORA))
    model.save_pretrained(out, safe_serialization=True)
    return {"reward_adapter": out}


def import_stack() -> float:
    """Import what both sides use, then return the RSS baseline (MiB)."""
    import accelerate, bitsandbytes, datasets, peft, torch, transformers  # noqa: F401
    return rss_mb()


def run_adapterkit(base: str, reward: str, prompts: str, steps: int) -> dict:
    import adapterkit.stages.ppo, adapterkit.stages.reward  # noqa: F401, E401
    baseline = import_stack()
    from adapterkit.config import load_config
    from adapterkit.stages.ppo import setup, train_step
    s = SETTINGS
    config = load_config("ppo", "tiny_ppo", [
        f"base.name={base}", "base.compute_dtype=float32",  # fp32 compute, as the peer's
        "ppo.parent=[]", f"ppo.reward={reward}", "ppo.value_init=reward",
        f"data.train={prompts}", "data.eval=null", "ppo.scorer=null", f"train.max_steps={steps}",
        f"ppo.rollout_batch_size={s['rollout']}", f"train.batch_size={s['micro_batch']}",
        f"train.grad_accum={s['grad_accum']}", f"ppo.ppo_epochs={s['ppo_epochs']}",
        f"ppo.max_new_tokens={s['response_length']}", f"ppo.temperature={s['temperature']}",
        f"ppo.kl_coef={s['kl_coef']}", f"train.learning_rate={s['learning_rate']}",
        f"ppo.clip_range={s['clip_range']}", f"ppo.clip_range_value={s['clip_range_value']}",
        f"ppo.vf_coef={s['vf_coef']}", f"ppo.gamma={s['gamma']}", f"ppo.lam={s['lam']}",
        "ppo.whiten_rewards=false", "train.gradient_checkpointing=false", "train.progress=false",
        f"lora.r={LORA['r']}", f"lora.lora_alpha={LORA['lora_alpha']}", f"output.dir={scratch()}"])
    run = setup(config)
    stamps = [time.perf_counter()]
    while run.step < run.total_steps:
        train_step(run)
        stamps.append(time.perf_counter())
    return {**step_times(stamps), **memory_report(baseline)}


def run_trl(base: str, reward: str, prompts: str, steps: int) -> dict:
    import trl
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    baseline = import_stack()
    s = SETTINGS
    tok = AutoTokenizer.from_pretrained(base, padding_side="left")
    rows = [json.loads(line)["prompt"] for line in open(prompts)]
    ids = [list(tok.apply_chat_template(p, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
           for p in rows]
    data = Dataset.from_list([{"input_ids": i} for i in ids])
    policy = load_nf4(base)
    reward_model = PeftModel.from_pretrained(load_nf4(base, num_labels=1), reward)
    value_model = PeftModel.from_pretrained(load_nf4(base, num_labels=1), reward, is_trainable=True)
    args = PPOConfig(
        output_dir=scratch(), per_device_train_batch_size=s["micro_batch"],
        gradient_accumulation_steps=s["grad_accum"], num_mini_batches=1, num_ppo_epochs=s["ppo_epochs"],
        local_rollout_forward_batch_size=s["rollout"], total_episodes=steps * s["rollout"],
        response_length=s["response_length"], temperature=s["temperature"], kl_coef=s["kl_coef"],
        learning_rate=s["learning_rate"], cliprange=s["clip_range"], cliprange_value=s["clip_range_value"],
        vf_coef=s["vf_coef"], gamma=s["gamma"], lam=s["lam"], stop_token="eos", num_sample_generations=0,
        report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=device() == "cpu",
        gradient_checkpointing=False, lr_scheduler_type="constant", bf16=False)  # fp32 compute, as ours
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward_model,
                         value_model=value_model, train_dataset=data, eval_dataset=data.select(range(8)),
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    stamps = [time.perf_counter()]
    trainer.add_callback(clock(stamps))
    trainer.train()
    return {**step_times(stamps), "trl": trl.__version__, **memory_report(baseline)}


# -- the driver ------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peer-python", default=str(Path(__file__).resolve().parents[1] / ".venv-trl112/bin/python"),
                        help="python of an environment with trl 1.12.0 (see above)")
    parser.add_argument("--checkpoint", choices=["nf4", "bf16"], default="nf4",
                        help="the base as both sides read it: pre-quantized (default) or bf16, quantized while "
                        "loading (on CPU the whole bf16 file is then resident during each load)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side; the report gives medians")
    parser.add_argument("--preload", metavar="LIB", help="run both sides with LD_PRELOAD=LIB, e.g. "
                        "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 (under glibc, stock bitsandbytes' freed "
                        "4-bit dequantization buffers make the peer's CPU peak RSS noisy)")
    parser.add_argument("--out", help="also write the report to this JSON file")
    parser.add_argument("--side", choices=["prepare", "adapterkit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--reward", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "prepare":
        print(json.dumps(prepare(args.base, args.reward)))
        return
    if args.side:  # a child: run one side, print its JSON
        run = run_adapterkit if args.side == "adapterkit" else run_trl
        print(json.dumps(run(args.base, args.reward, args.prompts, args.steps)))
        return
    if not os.access(args.peer_python, os.X_OK):
        raise SystemExit(f"{args.peer_python}: no such python; make the trl 1.12.0 environment first (see --help)")
    from adapterkit.tiny import ensure_tiny
    work = Path(scratch())
    base, reward, prompts = work / "base", work / "reward", ensure_tiny() / "data" / "prompts.jsonl"
    report = {"model": build_base(base, args.hidden, args.layers, args.checkpoint), "steps": args.steps,
              "settings": SETTINGS, **machine()}
    common = ["--base", str(base), "--reward", str(reward), "--prompts", str(prompts), "--steps", str(args.steps)]
    run_side(__file__, sys.executable, ["--side", "prepare", *common])
    runs = {"adapterkit": [], "trl": []}
    for _ in range(args.repeats):  # alternating, so a slow spell of the machine hits both
        runs["adapterkit"].append(run_side(__file__, sys.executable, ["--side", "adapterkit", *common], args.preload))
        runs["trl"].append(run_side(__file__, args.peer_python, ["--side", "trl", *common], args.preload))
    report.update({side: median_run(r) for side, r in runs.items()}, repeats=args.repeats, allocator=args.preload or "glibc")
    finish(report, ("seconds_per_step", "peak_rss_mb", "peak_rss_above_baseline_mb", "peak_allocated_mb"),
           args.out)

if __name__ == "__main__":
    main()
